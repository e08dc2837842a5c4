"""`VirtualDetectorUDF`: BF/ABF/ADF/HAADF images, with rings that may be chosen after calibration.

Two ways of recording a frame:

* *bins*: radial bins (and their dipoles) around the current centre -- any ring can be read
  from them later, and frames binned around a provisional centre are corrected to the
  calibrated one to first order (see `radial_bins`).  Used while the disk centre or size is
  not known yet, or always with ``mode="bins"``.
* *rings*: once centre and ring radii are known, each frame is multiplied with the ring masks
  (sub-pixel weights, one dense matrix product) -- a single pass over the frame, so the live
  path keeps up with the detector.

The live engine passes the centre and disk radius found on the first analysed block with
LiberTEM's ``update_parameters_experimental``; frames already recorded as bins are not lost.
"""
from __future__ import annotations

import numpy as np
from libertem.udf.base import UDF

from .radial_bins import (DEFAULT_RINGS, BinnedFrames, RingScale, bin_frames, bin_matrix, bright_disk_center,
                          n_bins_for, ring_masks)

PROVISIONAL_FRAMES = 8
BINS, RINGS = 1, 2  # values of the per-frame ``recorded`` result


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
        "auto": rings directly once ``center`` and the ring radii are known, bins before;
        "bins": always bins (rings can still be changed after the run).
    images
        Compute the ring images in ``get_results`` (off in the live engine, which does it itself).

    Results
    -------
    One image per ring; per frame ``radial`` (n_bins), ``dipole`` (n_bins, 2), ``center_used``
    (2), ``ring_values`` (n_rings) and ``recorded`` (1 bins, 2 rings, 0 not yet).

    Examples
    --------
    >>> udf = VirtualDetectorUDF(center=(31.5, 31.5), alpha_mrad=13.6, mrad_per_px=1.3)
    >>> res = ctx.run_udf(dataset=ds, udf=udf)  # doctest: +SKIP
    >>> haadf = res["haadf"].data  # doctest: +SKIP
    """

    def __init__(self, center: tuple[float, float] | None = None, radius_px: float | None = None,
                 alpha_mrad: float | None = None, mrad_per_px: float | None = None,
                 rings: dict | None = None, bin_px: float = 0.5, true_center: tuple[float, float] | None = None,
                 mode: str = "auto", images: bool = True):
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
                         mode=mode, images=images)

    def _sig(self) -> tuple[int, int]:
        sig = tuple(self.meta.dataset_shape.sig)
        if len(sig) != 2:
            raise ValueError(f"VirtualDetectorUDF needs 2D frames, got signal shape {sig}")
        return sig

    def _center(self) -> tuple[float, float]:
        """The given centre; else a provisional one per partition (bright-disk centroid of its first tile)."""
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

    def get_result_buffers(self):
        nb = n_bins_for(self._sig(), self.params.bin_px)
        bufs = {
            "radial": self.buffer(kind="nav", extra_shape=(nb,), dtype=np.float32),
            "dipole": self.buffer(kind="nav", extra_shape=(nb, 2), dtype=np.float32),
            "center_used": self.buffer(kind="nav", extra_shape=(2,), dtype=np.float32),
            "ring_values": self.buffer(kind="nav", extra_shape=(max(1, len(self.params.rings)),), dtype=np.float32),
            "recorded": self.buffer(kind="nav", dtype=np.uint8),
        }
        if self.params.images:
            for name in self.params.rings:
                bufs[name] = self.buffer(kind="nav", dtype=np.float32, use="result_only")
        return bufs

    def get_task_data(self):
        return {"matrices": {}}

    def process_tile(self, tile):
        cache = self.task_data.matrices
        if self.params.center is None and "provisional" not in cache:
            if tuple(tile.shape[1:]) == self._sig():  # full frames: locate the disk once per partition
                # from the partition's first frames only, so any tiling gives the same centre
                first = np.asarray(tile[:PROVISIONAL_FRAMES], np.float64).sum(axis=0)
                # to 1/8 px, so partitions share one bin matrix (the recentering corrects the rest)
                cache["provisional"] = tuple(round(c * 8) / 8 for c in bright_disk_center(first))
        center = self._center()
        sig_part = tuple(self.meta.sig_slice.get(sig_only=True))
        radii = self.rings_px() if (self.params.mode == "auto" and self.params.center is not None) else None
        key = (center, tuple(radii) if radii else None, tuple((s.start, s.stop) for s in sig_part))
        if key not in cache:
            for k in [k for k in cache if k != "provisional"]:
                del cache[k]  # a new centre or scale: the old matrices are not needed again
            cache[key] = (ring_masks(self._sig(), center, radii, self.params.bin_px, sig_part) if radii else
                          bin_matrix(self._sig(), center, self.params.bin_px, self.results.radial.shape[-1], sig_part))
        flat = np.asarray(tile, np.float32).reshape(len(tile), -1)
        if radii:
            self.results.ring_values[:] += flat @ cache[key]  # sig tiles add up
            self.results.recorded[:] = RINGS
        else:
            radial, dipole = bin_frames(flat, cache[key])
            self.results.radial[:] += radial
            self.results.dipole[:] += dipole
            self.results.recorded[:] = BINS
        self.results.center_used[:] = center

    def get_results(self):
        out = {k: getattr(self.results, k) for k in ("radial", "dipole", "center_used", "ring_values", "recorded")}
        if self.params.images:
            out.update(ring_images(out, self.params.rings, self.scale(), self.params.bin_px,
                                   self.params.true_center or self.params.center))
        return out


def ring_images(record: dict, rings: dict, scale: RingScale, bin_px: float,
                true_center: tuple[float, float] | None, frames: np.ndarray | None = None) -> dict[str, np.ndarray]:
    """Ring signals from a VirtualDetectorUDF record (``radial``, ``dipole``, ``center_used``,
    ``ring_values``, ``recorded``); NaN where the ring scale is not known yet or the frame was not
    recorded.  All frames, in the record's leading shape; or only the flat frame indices
    ``frames`` (1D result) -- the bins are then gathered for the binned ones alone."""
    flat = {k: v.reshape(-1, *v.shape[len(record["recorded"].shape):]) for k, v in record.items()}
    lead = record["recorded"].shape if frames is None else (len(frames),)
    frames = np.arange(len(flat["recorded"])) if frames is None else np.asarray(frames)
    recorded = flat["recorded"][frames]
    direct, binned = recorded == RINGS, recorded == BINS
    ring_values = flat["ring_values"][frames[direct]]
    binned_frames = None
    if binned.any():
        idx = frames[binned]
        shift = None
        if true_center is not None:
            shift = np.asarray(true_center, np.float64) - flat["center_used"][idx].astype(np.float64)
        binned_frames = BinnedFrames(flat["radial"][idx], flat["dipole"][idx], bin_px, shift)
    out = {}
    for i, (name, (inner, outer, unit)) in enumerate(rings.items()):
        img = np.full(len(frames), np.nan, np.float32)
        img[direct] = ring_values[:, i]
        if binned_frames is not None:
            try:
                lo, hi = scale.to_px(inner, unit), scale.to_px(outer, unit)
            except ValueError:  # the scale is not known yet: NaN until it is
                lo = hi = None
            if lo is not None:
                img[binned] = binned_frames.ring(lo, hi)
        out[name] = img.reshape(lead)
    return out
