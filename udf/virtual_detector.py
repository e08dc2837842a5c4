"""`VirtualDetectorUDF`: BF/ABF/ADF/HAADF images from per-frame radial bins.

Frames are reduced to radial bins (and their dipoles) around the current disk centre; the
rings are applied afterwards, so they can be chosen -- or the disk size calibrated -- after the
frames have gone.  When the centre is found during the run, the live engine passes it with
LiberTEM's ``update_parameters_experimental``; frames binned around an earlier centre are
corrected to first order from their dipoles (see `radial_bins`).
"""
from __future__ import annotations

import numpy as np
from libertem.udf.base import UDF

from .radial_bins import DEFAULT_RINGS, RingScale, bin_frames, bin_matrix, bright_disk_center, n_bins_for, ring_signal


PROVISIONAL_FRAMES = 8


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
        Width of the recorded radial bins in pixels (0.5: ring edges and the recentering stay
        accurate for small disks, e.g. 4-5 px radius).
    true_center
        Centre to evaluate the rings around, when it differs from the recording centre
        (first-order dipole correction); default: the current ``center``.

    Results
    -------
    One (scan) image per ring, plus ``radial`` (n_bins) and ``dipole`` (n_bins, 2) per frame and
    ``center_used`` (2) per frame, from which any ring can be evaluated later.

    Examples
    --------
    >>> udf = VirtualDetectorUDF(center=(31.5, 31.5), alpha_mrad=13.6, mrad_per_px=1.3)
    >>> res = ctx.run_udf(dataset=ds, udf=udf)  # doctest: +SKIP
    >>> haadf = res["haadf"].data  # doctest: +SKIP
    """

    def __init__(self, center: tuple[float, float] | None = None, radius_px: float | None = None,
                 alpha_mrad: float | None = None, mrad_per_px: float | None = None,
                 rings: dict | None = None, bin_px: float = 0.5, true_center: tuple[float, float] | None = None):
        rings = {k: tuple(v) for k, v in (rings or DEFAULT_RINGS).items()}
        super().__init__(center=None if center is None else tuple(float(c) for c in center),
                         radius_px=radius_px, alpha_mrad=alpha_mrad, mrad_per_px=mrad_per_px,
                         rings=rings, bin_px=float(bin_px),
                         true_center=None if true_center is None else tuple(float(c) for c in true_center))

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

    def get_preferred_input_dtype(self):
        """Frames as they come (e.g. uint16): cast per tile here, and recorders keep the native type."""
        return self.USE_NATIVE_DTYPE

    def get_result_buffers(self):
        nb = n_bins_for(self._sig(), self.params.bin_px)
        bufs = {
            "radial": self.buffer(kind="nav", extra_shape=(nb,), dtype=np.float32),
            "dipole": self.buffer(kind="nav", extra_shape=(nb, 2), dtype=np.float32),
            "center_used": self.buffer(kind="nav", extra_shape=(2,), dtype=np.float32),
        }
        for name in self.params.rings:
            bufs[name] = self.buffer(kind="nav", dtype=np.float32, use="result_only")
        return bufs

    def get_task_data(self):
        return {"matrices": {}}

    def process_tile(self, tile):
        if self.params.center is None and "provisional" not in self.task_data.matrices:
            if tuple(tile.shape[1:]) == self._sig():  # full frames: locate the disk once per partition
                # from the partition's first frames only, so any tiling gives the same centre
                first = np.asarray(tile[:PROVISIONAL_FRAMES], np.float64).sum(axis=0)
                self.task_data.matrices["provisional"] = bright_disk_center(first)
        center = self._center()
        sig_part = tuple(self.meta.sig_slice.get(sig_only=True))
        key = (center, tuple((s.start, s.stop) for s in sig_part))
        cache = self.task_data.matrices
        if key not in cache:
            for k in [k for k in cache if k != "provisional"]:
                del cache[k]  # a new centre: the old matrices are not needed again
            cache[key] = bin_matrix(self._sig(), center, self.params.bin_px,
                                    self.results.radial.shape[-1], sig_part)
        radial, dipole = bin_frames(tile, cache[key])
        self.results.radial[:] += radial
        self.results.dipole[:] += dipole
        self.results.center_used[:] = center

    def get_results(self):
        out = {"radial": self.results.radial, "dipole": self.results.dipole, "center_used": self.results.center_used}
        images = ring_images(out["radial"], out["dipole"], out["center_used"], self.params.rings, self.scale(),
                             self.params.bin_px, self.params.true_center or self.params.center)
        out.update(images)
        return out


def ring_images(radial: np.ndarray, dipole: np.ndarray, center_used: np.ndarray, rings: dict,
                scale: RingScale, bin_px: float, true_center: tuple[float, float] | None) -> dict[str, np.ndarray]:
    """Ring signals for frames of any leading shape; NaN when the ring scale is not known yet."""
    lead = radial.shape[:-1]
    r = radial.reshape(-1, radial.shape[-1])
    d = dipole.reshape(-1, *dipole.shape[-2:])
    shift = None
    if true_center is not None:
        shift = np.asarray(true_center, np.float64) - center_used.reshape(-1, 2).astype(np.float64)
    out = {}
    for name, (inner, outer, unit) in rings.items():
        try:
            lo, hi = scale.to_px(inner, unit), scale.to_px(outer, unit)
        except ValueError:
            out[name] = np.full(lead, np.nan, np.float32)
            continue
        out[name] = ring_signal(r, d, lo, hi, bin_px, shift).astype(np.float32).reshape(lead)
    return out
