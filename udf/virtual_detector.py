"""`VirtualDetectorUDF`: BF/ABF/ADF/HAADF images, with rings that may be chosen after calibration.

Every frame is recorded as its radial profile: sums in fine radial bins (``bin_px``, default
0.5 px; each pixel shared linearly between its two nearest bins) around a centre, out to the frame's half diagonal, as abTEM's
FlexibleAnnularDetector does.  Any ring is then a sum over bins (linear inside the edge bins),
chosen before, during or after the run.  Two ways of recording:

* *centred* (``recorded`` = 2): around the given (calibrated) centre -- the profile alone, one
  compiled pass per tile (`kernels.radial_profiles`).
* *provisional* (``recorded`` = 1): while the centre is not known, around a provisional one
  (each partition's bright-disk centroid), with each bin's dipole moment as well, so frames
  binned around it are corrected to the calibrated centre to first order (see `radial_bins`).
  Only these partitions carry the per-frame dipoles; once the centre is given, partitions
  neither allocate nor ship them.

The live engine passes the centre and disk radius found on the first analysed block with
LiberTEM's ``update_parameters_experimental``; frames already recorded are not lost.
"""
from __future__ import annotations

from types import SimpleNamespace

import numpy as np
from libertem.udf.base import UDF

from .kernels import radial_profiles
from .radial_bins import DEFAULT_RINGS, BinnedFrames, RingScale, bin_taps, bright_disk_center, n_bins_for

PROVISIONAL_FRAMES = 8
PROVISIONAL, CENTRED = 1, 2  # values of the per-frame ``recorded`` result (0: not yet)
BINS, RINGS = PROVISIONAL, CENTRED  # earlier names
RECORD = ("radial", "dipole", "center_used", "recorded")  # the per-frame results


class _FirstFrames:
    """A partition's first frames summed across signal tiles, and the tiles held until they are whole."""

    def __init__(self, sig_shape: tuple[int, int], n: int, start: int):
        self.sum = np.zeros(sig_shape, np.float64)
        self.n, self.start = n, start  # how many frames; the nav index of the first
        self.need = n * int(np.prod(sig_shape))
        self.covered = 0  # frame pixels summed so far
        self.held: list = []  # (float32 frames (n, pixels), sig slice, result views)


class VirtualDetectorUDF(UDF):
    """Virtual ring detectors (BF, ABF, ADF, HAADF by default) on the scan grid.

    Parameters
    ----------
    center
        Disk centre (row, col) in detector pixels; None: until calibrated, each partition uses
        the centroid of the bright disk in its first frames (corrected later, see ``true_center``).
    radius_px
        Zero-disk radius in pixels (α); or give ``alpha_mrad`` with ``mrad_per_px``.
    alpha_mrad, mrad_per_px
        Convergence semi-angle and detector calibration.
    rings
        {name: (inner, outer, unit)} with unit 'alpha', 'mrad' or 'px'; default BF 0-0.5 α,
        ABF 0.5-1 α, ADF 1.5-3 α, HAADF 3-4.5 α.
    bin_px
        Width of the radial bins in pixels (0.5: ring edges and the recentering stay accurate
        for small disks, e.g. 4-5 px radius).
    true_center
        Centre to evaluate binned frames around, when it differs from the recording centre
        (first-order dipole correction); default: ``center``.
    mode
        "auto": dipoles only while the centre is not known; "bins": dipoles for every frame
        (so a ``true_center`` given later can still correct them).
    images
        Compute the ring images in ``get_results`` (off in the live engine, which does it itself).
    provisional_center
        While ``center`` is not known, record every partition around this one instead of its own
        first frames' centroid (the live engine passes the first partition's: a block-wide
        partition's few frames can put the centroid 1-3 px off, more than the first-order
        recentering corrects).

    Results
    -------
    One image per ring; per frame ``radial`` (n_bins), ``dipole`` (n_bins, 2; zero for frames
    recorded around a given centre), ``center_used`` (2) and ``recorded`` (1 provisional centre,
    2 given centre, 0 not yet).

    Examples
    --------
    >>> udf = VirtualDetectorUDF(center=(31.5, 31.5), alpha_mrad=13.6, mrad_per_px=1.3)
    >>> res = ctx.run_udf(dataset=ds, udf=udf)  # doctest: +SKIP
    >>> haadf = res["haadf"].data  # doctest: +SKIP
    """

    def __init__(self, center: tuple[float, float] | None = None, radius_px: float | None = None,
                 alpha_mrad: float | None = None, mrad_per_px: float | None = None,
                 rings: dict | None = None, bin_px: float = 0.5, true_center: tuple[float, float] | None = None,
                 mode: str = "auto", images: bool = True, provisional_center: tuple[float, float] | None = None):
        if mode not in ("auto", "bins"):
            raise ValueError(f"mode must be 'auto' or 'bins', got {mode!r}")
        rings = {k: tuple(v) for k, v in (DEFAULT_RINGS if rings is None else rings).items()}
        for name, (inner, outer, unit) in rings.items():
            if not 0 <= inner < outer or unit not in ("alpha", "mrad", "px"):
                raise ValueError(f"ring {name!r}: need 0 <= inner < outer and unit alpha, mrad or px; "
                                 f"got ({inner}, {outer}, {unit!r})")
        super().__init__(center=None if center is None else tuple(float(c) for c in center),
                         radius_px=radius_px, alpha_mrad=alpha_mrad, mrad_per_px=mrad_per_px,
                         rings=rings, bin_px=float(bin_px),
                         true_center=None if true_center is None else tuple(float(c) for c in true_center),
                         mode=mode, images=images,
                         provisional_center=None if provisional_center is None else tuple(float(c) for c in provisional_center))

    def _sig(self) -> tuple[int, int]:
        sig = tuple(self.meta.dataset_shape.sig)
        if len(sig) != 2:
            raise ValueError(f"VirtualDetectorUDF needs 2D frames, got signal shape {sig}")
        return sig

    def _center(self) -> tuple[float, float]:
        """The given centre; else a provisional one per partition (bright-disk centroid of its first frames)."""
        if self.params.center is not None:
            return tuple(self.params.center)
        provisional = self.task_data.matrices.get("provisional")
        if provisional is not None:
            return provisional
        h, w = self._sig()
        return ((h - 1) / 2, (w - 1) / 2)

    def scale(self) -> RingScale:
        p = self.params
        radius = p.radius_px
        if radius is None and p.alpha_mrad is not None and p.mrad_per_px is not None:
            radius = p.alpha_mrad / p.mrad_per_px
        mpp = p.mrad_per_px
        if mpp is None and radius is not None and p.alpha_mrad is not None:
            mpp = p.alpha_mrad / radius
        return RingScale(radius_px=radius, mrad_per_px=mpp)

    def rings_px(self) -> list[tuple[float, float]] | None:
        """Inner/outer radius of each ring in pixels, or None while the scale is unknown."""
        scale = self.scale()
        try:
            return [(scale.to_px(a, u), scale.to_px(b, u)) for a, b, u in self.params.rings.values()]
        except ValueError:
            return None

    def get_tiling_preferences(self):
        """Deep tiles: the per-tile bookkeeping is Python, so fewer, larger tiles are faster."""
        return {"depth": 256, "total_size": self.TILE_SIZE_MAX}

    def get_preferred_input_dtype(self):
        """Frames as they come (e.g. uint16): cast per tile here, and recorders keep the native type."""
        return self.USE_NATIVE_DTYPE

    def _dipoles(self) -> bool:
        """Per-frame dipoles are recorded (and their buffer allocated) only while they can be needed."""
        return self.params.center is None or self.params.mode == "bins"

    def _dipole_bins(self, nb: int) -> int:
        """Bins of the dipole buffer: all of them in the main process (its buffer outlives a centre
        update; untouched pages cost nothing), one in a partition that does not record them."""
        try:
            self.meta.partition_shape
        except ValueError:  # the main process
            return nb
        return nb if self._dipoles() else 1

    def get_result_buffers(self):
        nb = n_bins_for(self._sig(), self.params.bin_px)
        bufs = {
            "radial": self.buffer(kind="nav", extra_shape=(nb,), dtype=np.float32),
            # (n, 1, 2) in partitions that start with the centre known: next to nothing to zero or
            # ship (LiberTEM takes an empty buffer for an empty ROI)
            "dipole": self.buffer(kind="nav", extra_shape=(self._dipole_bins(nb), 2), dtype=np.float32),
            "center_used": self.buffer(kind="nav", extra_shape=(2,), dtype=np.float32),
            "recorded": self.buffer(kind="nav", dtype=np.uint8),
        }
        if self.params.images:
            for name in self.params.rings:
                bufs[name] = self.buffer(kind="nav", dtype=np.float32, use="result_only")
        return bufs

    def get_task_data(self):
        return {"matrices": {}}

    def merge(self, dest, src):
        """Nav buffers into place; a partition without dipoles leaves them zero."""
        for k in dest:
            part, whole = getattr(src, k), getattr(dest, k)
            if part.shape == whole.shape:
                whole[:] = part

    def process_tile(self, tile):
        if self.params.center is None and "provisional" not in self.task_data.matrices:
            if self.params.provisional_center is not None:  # one for every partition until the centre is known
                self.task_data.matrices["provisional"] = tuple(round(c * 8) / 8 for c in self.params.provisional_center)
            elif not self._gather_first_frames(tile):
                return  # held back until the partition's first frames are whole
        self._record(np.asarray(tile).reshape(len(tile), -1), tuple(self.meta.sig_slice.get(sig_only=True)),
                     self.results)

    def postprocess(self):
        """Tiles still held at the end of a partition (its first frames never came whole) are
        recorded around what was gathered, so no frame is lost."""
        first = self.task_data.matrices.get("first")
        if first is not None:
            self._provisional_found(first)

    def _gather_first_frames(self, tile) -> bool:
        """Sum the partition's first frames over the signal tiles that cut them into pieces.

        The provisional centre is the bright-disk centroid of the sum of the partition's first
        ``PROVISIONAL_FRAMES`` frames, whatever the tiling (a live stream's whole frames or a
        reader's pieces of 13 rows): a tile that comes before they are whole is held (a float32
        copy and its result views, at most the frames' first depth of tiles) and recorded once
        the centre is known.  True when the centre is known and this tile can be recorded now.
        """
        cache = self.task_data.matrices
        first = cache.get("first")
        nav0 = int(self.meta.slice.origin[0])
        if first is None:  # the partition's first tile starts at its first frame
            n = max(1, min(PROVISIONAL_FRAMES, int(self.meta.partition_shape[0])))
            first = cache["first"] = _FirstFrames(self._sig(), n, nav0)
        sig_part = tuple(self.meta.sig_slice.get(sig_only=True))
        k = min(len(tile), first.n - (nav0 - first.start)) if nav0 >= first.start else 0
        if k > 0:
            piece = np.asarray(tile[:k], np.float64).sum(axis=0)
            first.sum[sig_part] += piece
            first.covered += k * piece.size
        if first.covered >= first.need:
            self._provisional_found(first)
            return True
        views = SimpleNamespace(**{k: getattr(self.results, k) for k in RECORD})  # views into the partition's buffers
        first.held.append((np.array(tile, np.float32).reshape(len(tile), -1), sig_part, views))
        return False

    def _provisional_found(self, first: "_FirstFrames") -> None:
        cache = self.task_data.matrices
        h, w = self._sig()
        center = bright_disk_center(first.sum) if first.covered else ((h - 1) / 2, (w - 1) / 2)
        # to 1/8 px, so partitions share one bin matrix (the recentering corrects the rest)
        cache["provisional"] = tuple(round(c * 8) / 8 for c in center)
        del cache["first"]
        for flat, sig_part, views in first.held:
            self._record(flat, sig_part, views)

    def _record(self, flat: np.ndarray, sig_part: tuple, out) -> None:
        """One tile, frames flattened (n, pixels) in any real dtype, into the result views ``out``."""
        center = self._center()
        dipoles = self._dipoles() and out.dipole.shape[-2] == out.radial.shape[-1]
        nb = out.radial.shape[-1]
        taps = bin_taps(self._sig(), center, self.params.bin_px, nb, sig_part)
        if dipoles:  # sig tiles add up
            radial_profiles(flat, taps, out.radial, out.dipole)
        else:
            radial_profiles(flat, taps, out.radial)
        out.recorded[:] = CENTRED if self.params.center is not None else PROVISIONAL
        out.center_used[:] = center

    def get_results(self):
        out = {k: getattr(self.results, k) for k in RECORD}
        if self.params.images:
            out.update(ring_images(out, self.params.rings, self.scale(), self.params.bin_px,
                                   self.params.true_center or self.params.center))
        return out


def _binned(record: dict, bin_px: float, true_center: tuple[float, float] | None,
            frames: np.ndarray | None) -> tuple[tuple, int, list]:
    """The recorded frames of a VirtualDetectorUDF record as `BinnedFrames`, in two groups:
    recorded around ``true_center`` (read as they are) and around another centre (recentred).
    Returns (leading shape, number of frames asked, [(mask over them, BinnedFrames)])."""
    lead_nd = len(record["recorded"].shape)
    flat = {k: v.reshape(-1, *v.shape[lead_nd:]) for k, v in record.items() if k in RECORD}
    lead = record["recorded"].shape if frames is None else (len(frames),)
    frames = np.arange(len(flat["recorded"])) if frames is None else np.asarray(frames)
    recorded = flat["recorded"][frames] > 0
    groups = []
    if recorded.any():
        idx = frames[recorded]
        shift = np.zeros((len(idx), 2))
        if true_center is not None:
            shift = np.asarray(true_center, np.float64) - flat["center_used"][idx].astype(np.float64)
        moved = np.any(shift != 0, axis=1)
        has_dipoles = flat["dipole"].shape[1] == flat["radial"].shape[1]
        for sel, shifted in ((~moved, False), (moved, True)):
            if not sel.any():
                continue
            mask = np.zeros(len(frames), bool)
            mask[np.flatnonzero(recorded)[sel]] = True
            rad = flat["radial"][idx[sel]]
            dip = flat["dipole"][idx[sel]] if has_dipoles else np.zeros((*rad.shape, 2), np.float32)
            groups.append((mask, BinnedFrames(rad, dip, bin_px, shift[sel] if shifted else None)))
    return lead, len(frames), groups


def ring_images(record: dict, rings: dict, scale: RingScale, bin_px: float,
                true_center: tuple[float, float] | None, frames: np.ndarray | None = None) -> dict[str, np.ndarray]:
    """Ring signals from a VirtualDetectorUDF record (``radial``, ``dipole``, ``center_used``,
    ``recorded``): each ring a sum over the frame's radial bins, recentred to ``true_center``
    (first order, through the dipoles) where a frame was recorded around another centre; NaN
    where the ring scale is not known yet or the frame was not recorded.  All frames, in the
    record's leading shape; or only the flat frame indices ``frames`` (1D result)."""
    lead, n, groups = _binned(record, bin_px, true_center, frames)
    out = {}
    for name, (inner, outer, unit) in rings.items():
        img = np.full(n, np.nan, np.float32)
        try:
            lo, hi = scale.to_px(inner, unit), scale.to_px(outer, unit)
        except ValueError:  # the scale is not known yet: NaN until it is
            lo = hi = None
        if lo is not None:
            for mask, binned in groups:
                img[mask] = binned.ring(lo, hi)
        out[name] = img.reshape(lead)
    return out


def frame_profiles(record: dict, bin_px: float, true_center: tuple[float, float] | None,
                   frames: np.ndarray | None = None) -> np.ndarray:
    """Per-frame radial profiles around ``true_center`` ((..., n_bins) float32, NaN where not
    recorded): as recorded where the frame was binned around it, else recentred (first order)."""
    lead, n, groups = _binned(record, bin_px, true_center, frames)
    out = np.full((n, record["radial"].shape[-1]), np.nan, np.float32)
    for mask, binned in groups:
        out[mask] = binned.profile()
    return out.reshape(*lead, -1)
