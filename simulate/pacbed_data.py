"""Training samples for the PACBED thickness/tilt network, drawn on the fly from a library (torch).

Each sample: a continuous thickness and tilt (linear / bilinear interpolation between library
patterns), a random sign per tilt axis (the mirrors of the zone: flipping pattern axis 0 flips
t0), then what an experiment does to it, in the order it happens:

    residual misalignment (shift, size, rotation, affine distortion; the tilt label follows the
    rotation) -> inelastic background (a thickness-dependent blurred copy) -> uniform background
    -> detector sampling (coarser pixels), point spread and gain non-uniformity -> shot noise at
    4.5e6-1e9 electrons/pattern and a dark offset -> part of the background subtracted
    (the analysis converges this) -> canonical normalisation.

Held-out split by simulation: whole symmetry orbits of simulated tilts (each with its own
phonon seeds) are kept out of training, and a training tilt is interpolated only inside grid
cells whose four corners are training tilts.
"""
from __future__ import annotations

import math
from dataclasses import dataclass

import numpy as np
import torch
import torch.nn.functional as F

from ..models import canonical
from .library import PacbedLibrary


@dataclass
class Augment:
    """Ranges of the augmentations (uniform unless said otherwise)."""

    dose: tuple[float, float] = (4.5e6, 1e9)  # electrons per pattern, log-uniform
    shift_px: float = 1.0  # residual centre error [canonical px]
    scale: float = 0.015  # residual size error (relative)
    rotation_deg: float = 1.5  # residual rotation error
    shear: float = 0.01  # affine distortion of the projector lenses
    inelastic_mfp_nm: tuple[float, float] = (100.0, 300.0)
    inelastic_sigma_mrad: tuple[float, float] = (1.0, 5.0)
    background: tuple[float, float] = (0.0, 0.4)  # uniform, in units of the mean intensity
    detector_factor: tuple[float, ...] = (1.0, 1.0, 1.5, 2.0, 2.8)  # canonical px per detector px
    psf_px: tuple[float, float] = (0.0, 0.8)
    gain_sigma: float = 0.02
    dark_counts: tuple[float, float] = (0.0, 3.0)
    # raw-recording effects (for the alignment network; off for thickness/tilt, which reads
    # linear data): share of samples that are saturated / display-scaled, and hot pixels
    saturate_prob: float = 0.0
    display_prob: float = 0.0  # gamma 0.4-1, 8-bit quantised
    hot_pixels: int = 0
    # frames that show less than the canonical window (longer camera length, disk off centre):
    # share of samples cut by a frame edge, and the field shown to the nearest edge [α]; the
    # off-frame pixels are filled radially as at inference (`canonical.normalise(valid=...)`)
    field_prob: float = 0.0
    field_alpha: tuple[float, float] = (1.4, 2.6)


ALIGN_AUGMENT = Augment(shift_px=5.0, scale=0.2, rotation_deg=45.0, shear=0.02, saturate_prob=0.2,
                        display_prob=0.3, hot_pixels=4)


def _gauss_kernel(sigma: float) -> torch.Tensor:
    r = max(1, int(math.ceil(3 * sigma)))
    x = torch.arange(-r, r + 1, dtype=torch.float32)
    k = torch.exp(-0.5 * (x / max(sigma, 1e-6)) ** 2)
    return k / k.sum()


def blur(img: torch.Tensor, sigma: float) -> torch.Tensor:
    """Separable Gaussian blur of (B, 1, H, W), zero outside (wide blurs on a 2x coarser grid)."""
    if sigma <= 0.05:
        return img
    if sigma > 2.0 and img.shape[-1] % 2 == 0:
        small = blur(F.avg_pool2d(img, 2), sigma / 2)
        return F.interpolate(small, size=img.shape[-2:], mode="bilinear", align_corners=False)
    k = _gauss_kernel(sigma)
    n = len(k)
    img = F.conv2d(img, k.view(1, 1, n, 1), padding=(n // 2, 0))
    return F.conv2d(img, k.view(1, 1, 1, n), padding=(0, n // 2))


def normalise_torch(counts: torch.Tensor, background: torch.Tensor,
                    window_alpha: float = canonical.ANALYSIS_WINDOW_ALPHA,
                    valid: torch.Tensor | None = None) -> torch.Tensor:
    """Torch twin of :func:`stemlive.models.canonical.normalise` (``valid``: (B, 1, P, P) real
    pixels; the unit from those, the window's others filled radially, as at inference)."""
    m = torch.from_numpy(canonical.window_mask(window_alpha))
    b = background.view(-1, 1, 1, 1)
    if valid is None:
        mean = counts[..., m].mean(dim=-1)[..., None, None].clamp_min(1e-12)
        return _standardise_torch(counts / mean - b, m)
    use = valid & m
    n_use = use.sum(dim=(-1, -2), keepdim=True).clamp_min(1)
    mean = (torch.where(use, counts, 0).sum(dim=(-1, -2), keepdim=True) / n_use).clamp_min(1e-12)
    return _standardise_torch(fill_radially_torch(counts / mean - b, use), m)


def _standardise_torch(y: torch.Tensor, m: torch.Tensor) -> torch.Tensor:
    x = y.clamp_min(0).sqrt()
    inside = x[..., m]
    mu = inside.mean(dim=-1)[..., None, None]
    sd = inside.std(dim=-1)[..., None, None].clamp_min(1e-6)
    return torch.where(m, (x - mu) / sd, torch.zeros(()))


_RING = torch.from_numpy(canonical._RING)


def fill_radially_torch(y: torch.Tensor, use: torch.Tensor) -> torch.Tensor:
    """Torch twin of :func:`stemlive.models.canonical.fill_radially` on (B, 1, P, P): pixels
    outside ``use`` take the mean of the ``use`` pixels on their 1 px ring (a ring without any:
    the nearest ring inside that has some, else outside)."""
    n, rings = y.shape[0], int(_RING.max()) + 1
    idx = _RING.view(1, -1).expand(n, -1)
    w = use.view(n, -1).to(y.dtype)
    total = torch.zeros(n, rings, dtype=torch.float64).scatter_add_(1, idx, (y.view(n, -1) * w).double())
    count = torch.zeros(n, rings, dtype=torch.float64).scatter_add_(1, idx, w.double())
    prof = torch.where(count > 0, total / count.clamp_min(1), torch.full_like(total, float("nan")))
    for r in range(1, rings):  # nearest ring inside with data
        prof[:, r] = torch.where(torch.isnan(prof[:, r]), prof[:, r - 1], prof[:, r])
    for r in range(rings - 2, -1, -1):  # rings inside every ring with data: the nearest outside
        prof[:, r] = torch.where(torch.isnan(prof[:, r]), prof[:, r + 1], prof[:, r])
    filled = torch.nan_to_num(prof, nan=0.0).to(y.dtype)[:, _RING].view_as(y)
    return torch.where(use, y, filled)


def frame_valid_torch(n: int, g: torch.Generator, aug: "Augment", centre_px: torch.Tensor) -> torch.Tensor:
    """(n, 1, P, P) real-pixel masks: a share ``aug.field_prob`` of the crops is cut by the edges
    of a recorded frame turned by a random angle, the nearest edge ``aug.field_alpha`` from the
    disk centre (``centre_px``: its canonical offset), the others farther (up to 5 α)."""
    P = canonical.PIXELS
    c = (P - 1) / 2
    u = torch.stack(torch.meshgrid(torch.arange(P) - c, torch.arange(P) - c, indexing="ij"), 0).float()
    u = (u.view(1, 2, P, P) - centre_px.view(n, 2, 1, 1)) / canonical.ALPHA_PX  # [α] from the disk centre
    ang = torch.rand(n, generator=g) * (math.pi / 2)
    v0 = torch.cos(ang).view(n, 1, 1) * u[:, 0] + torch.sin(ang).view(n, 1, 1) * u[:, 1]
    v1 = -torch.sin(ang).view(n, 1, 1) * u[:, 0] + torch.cos(ang).view(n, 1, 1) * u[:, 1]
    lo, hi = aug.field_alpha
    near = lo + torch.rand(n, generator=g) * (hi - lo)
    edges = near[:, None] + torch.rand(n, 4, generator=g) * (5.0 - near[:, None])
    edges[torch.arange(n), torch.randint(4, (n,), generator=g)] = near  # one edge at the field shown
    e = edges.view(n, 4, 1, 1)
    valid = (v0 >= -e[:, 0]) & (v0 <= e[:, 1]) & (v1 >= -e[:, 2]) & (v1 <= e[:, 3])
    cut = torch.rand(n, generator=g) < aug.field_prob
    return torch.where(cut.view(n, 1, 1), valid, torch.ones_like(valid)).view(n, 1, P, P)


class PacbedSampler:
    """Draws augmented canonical PACBEDs with labels from a first-quadrant library."""

    def __init__(self, lib: PacbedLibrary, holdout_fraction: float = 0.1, seed: int = 0):
        quadrant = np.flatnonzero((lib.tilt_mrad >= 0).all(axis=1))  # signed libraries: their t ≥ 0 part
        v0, v1 = np.unique(lib.tilt_mrad[quadrant, 0]), np.unique(lib.tilt_mrad[quadrant, 1])
        if len(v0) < 2 or len(v1) < 2 or len(v0) * len(v1) != len(quadrant):
            raise ValueError("training needs a library whose tilts t0, t1 ≥ 0 form a full grid (≥ 2x2)")
        idx = {tuple(lib.tilt_mrad[i]): i for i in quadrant}
        order = [[idx[(a, b)] for b in v1] for a in v0]
        self.patterns = torch.from_numpy(lib.patterns[np.array(order)])  # (n0, n1, nt, K, K)
        self.v0, self.v1 = torch.tensor(v0, dtype=torch.float32), torch.tensor(v1, dtype=torch.float32)
        self.thickness = torch.tensor(lib.thickness_nm, dtype=torch.float32)
        self.lib_alpha_px = lib.alpha_mrad / lib.mrad_per_px
        self.alpha_mrad, self.mrad_per_px = lib.alpha_mrad, lib.mrad_per_px
        k = self.patterns.shape[-1]
        self.k = k
        # held-out orbits (by simulated tilt, i.e. by phonon seed)
        source = lib.tilt_source if lib.tilt_source is not None else np.arange(len(lib.tilt_mrad))
        # held-out orbits come from the interior of the grid: a held-out tilt on the edge would
        # test extrapolation (no training cell can surround it), not generalisation
        edge = (lib.tilt_mrad[:, 0] >= v0[-1]) | (lib.tilt_mrad[:, 1] >= v1[-1])
        all_orbits = np.unique(source)
        candidates = np.setdiff1d(all_orbits, np.unique(source[edge]))
        n_hold = max(1, int(round(holdout_fraction * len(all_orbits)))) if holdout_fraction > 0 else 0
        grid_src = source[np.array(order)]

        def cells(held_set):
            tm = torch.from_numpy(~np.isin(grid_src, list(held_set)))
            return tm, tm[:-1, :-1] & tm[1:, :-1] & tm[:-1, 1:] & tm[1:, 1:]

        held: set = set()
        for orbit in np.random.default_rng(seed).permutation(candidates):  # keep some training cells
            if len(held) >= n_hold:
                break
            if cells(held | {int(orbit)})[1].any():
                held.add(int(orbit))
        if n_hold and not held:
            raise ValueError("no interior tilt can be held out without removing every training cell; "
                             "use a finer tilt grid or holdout_fraction=0")
        self.train_mask, self.train_cells = cells(held)
        self.heldout = [(i, j) for i in range(len(v0)) for j in range(len(v1)) if not self.train_mask[i, j]]
        self.held_orbits = sorted(held)

    # -- label sampling -------------------------------------------------------------------
    def _bracket(self, grid: torch.Tensor, x: torch.Tensor):
        i = torch.clamp(torch.searchsorted(grid, x, right=True) - 1, 0, len(grid) - 2)
        w = ((x - grid[i]) / (grid[i + 1] - grid[i])).clamp(0, 1)
        return i, w

    def _train_labels(self, n: int, g: torch.Generator):
        out_t0, out_t1 = [], []
        got = 0
        while got < n:
            a = torch.rand(2 * n, generator=g) * self.v0[-1]
            b = torch.rand(2 * n, generator=g) * self.v1[-1]
            i, _ = self._bracket(self.v0, a)
            j, _ = self._bracket(self.v1, b)
            ok = self.train_cells[i, j]
            out_t0.append(a[ok])
            out_t1.append(b[ok])
            got += int(ok.sum())
        t0, t1 = torch.cat(out_t0)[:n], torch.cat(out_t1)[:n]
        th = self.thickness[0] + torch.rand(n, generator=g) * (self.thickness[-1] - self.thickness[0])
        return th, t0, t1

    def _heldout_labels(self, n: int, g: torch.Generator):
        if not self.heldout:
            raise ValueError("no held-out tilts (holdout_fraction=0)")
        pick = torch.randint(len(self.heldout), (n,), generator=g)
        t0 = torch.stack([self.v0[self.heldout[p][0]] for p in pick])
        t1 = torch.stack([self.v1[self.heldout[p][1]] for p in pick])
        th = self.thickness[torch.randint(len(self.thickness), (n,), generator=g)]
        return th, t0, t1

    def clean_patterns(self, th: torch.Tensor, t0: torch.Tensor, t1: torch.Tensor) -> torch.Tensor:
        """Noise-free library patterns interpolated at (thickness, t0 ≥ 0, t1 ≥ 0): (B, K, K)."""
        i, wi = self._bracket(self.v0, t0)
        j, wj = self._bracket(self.v1, t1)
        k, wk = self._bracket(self.thickness, th)
        out = 0
        for di, fi in ((0, 1 - wi), (1, wi)):
            for dj, fj in ((0, 1 - wj), (1, wj)):
                for dk, fk in ((0, 1 - wk), (1, wk)):
                    out = out + (fi * fj * fk)[:, None, None] * self.patterns[i + di, j + dj, k + dk]
        return out

    @staticmethod
    def _raw_effects(counts: torch.Tensor, g: torch.Generator, aug: Augment) -> torch.Tensor:
        """Saturation, hot pixels and display scaling (gamma, 8 bit) of raw recordings."""
        n = counts.shape[0]
        if aug.saturate_prob > 0:
            peak = counts.amax(dim=(-1, -2), keepdim=True)
            level = peak * (0.3 + 0.6 * torch.rand(n, 1, 1, 1, generator=g))
            sat = (torch.rand(n, 1, 1, 1, generator=g) < aug.saturate_prob)
            counts = torch.where(sat, torch.minimum(counts, level), counts)
        if aug.hot_pixels > 0:
            flat = counts.view(n, -1)
            idx = torch.randint(flat.shape[1], (n, aug.hot_pixels), generator=g)
            val = flat.amax(dim=1, keepdim=True) * (1 + 4 * torch.rand(n, aug.hot_pixels, generator=g))
            flat.scatter_(1, idx, val)
        if aug.display_prob > 0:
            gamma = 0.4 + 0.6 * torch.rand(n, 1, 1, 1, generator=g)
            peak = counts.amax(dim=(-1, -2), keepdim=True).clamp_min(1e-9)
            shown = torch.round((counts / peak).clamp(0, 1) ** gamma * 255)
            disp = torch.rand(n, 1, 1, 1, generator=g) < aug.display_prob
            counts = torch.where(disp, shown, counts)
        return counts

    # -- the experiment -------------------------------------------------------------------
    def sample(self, n: int, g: torch.Generator, aug: Augment, split: str = "train",
               dose: float | None = None, subtract_background: bool = True,
               window_alpha: float = canonical.ANALYSIS_WINDOW_ALPHA):
        """(x (n, 1, 64, 64), labels dict) for ``split`` in {'train', 'heldout'}; x is seen
        through the network's window (:func:`stemlive.models.canonical.window_mask`)."""
        th, t0, t1 = self._train_labels(n, g) if split == "train" else self._heldout_labels(n, g)
        p = self.clean_patterns(th, t0, t1)
        # mirrors: random signs
        s0 = torch.where(torch.rand(n, generator=g) < 0.5, -1.0, 1.0)
        s1 = torch.where(torch.rand(n, generator=g) < 0.5, -1.0, 1.0)
        p = torch.where((s0 < 0)[:, None, None], p.flip(-2), p)
        p = torch.where((s1 < 0)[:, None, None], p.flip(-1), p)
        tilt = torch.stack([s0 * t0, s1 * t1], dim=1)
        # residual misalignment: canonical u -> library c + M u + shift
        phi = (torch.rand(n, generator=g) * 2 - 1) * math.radians(aug.rotation_deg)
        scale = 1 + (torch.rand(n, generator=g) * 2 - 1) * aug.scale
        shear = (torch.rand(n, 2, generator=g) * 2 - 1) * aug.shear
        cos, sin = torch.cos(phi), torch.sin(phi)
        rot_inv = torch.stack([torch.stack([cos, sin], -1), torch.stack([-sin, cos], -1)], -2)  # R(-phi)
        a = torch.eye(2).repeat(n, 1, 1)
        a[:, 0, 1], a[:, 1, 0] = shear[:, 0], shear[:, 1]
        m = (self.lib_alpha_px / canonical.ALPHA_PX) * scale[:, None, None] * (a @ rot_inv)
        shift = (torch.rand(n, 2, generator=g) * 2 - 1) * aug.shift_px * (self.lib_alpha_px / canonical.ALPHA_PX)
        # tilt seen in the canonical frame: R(phi) A^-1 t
        rot = rot_inv.transpose(1, 2)
        tilt = (rot @ torch.linalg.inv(a) @ tilt[:, :, None])[:, :, 0]
        c = (canonical.PIXELS - 1) / 2
        u = torch.stack(torch.meshgrid(torch.arange(canonical.PIXELS) - c, torch.arange(canonical.PIXELS) - c,
                                       indexing="ij"), 0).float().view(2, -1)
        xy = m @ u + ((self.k - 1) / 2 + shift)[:, :, None]  # (n, 2, P*P) library (row, col)
        grid = (xy / (self.k - 1) * 2 - 1).flip(1).transpose(1, 2).reshape(n, canonical.PIXELS, canonical.PIXELS, 2)
        img = F.grid_sample(p[:, None], grid, mode="bilinear", padding_mode="zeros", align_corners=True)
        img = img * (m.det().abs())[:, None, None, None]  # intensity per canonical pixel
        # inelastic background: thickness-dependent blurred copy (one σ per batch)
        mfp = aug.inelastic_mfp_nm[0] + torch.rand(n, generator=g) * (aug.inelastic_mfp_nm[1] - aug.inelastic_mfp_nm[0])
        f_in = (1 - torch.exp(-th / mfp))[:, None, None, None]
        sig_in = float(aug.inelastic_sigma_mrad[0] + torch.rand(1, generator=g) * np.ptp(aug.inelastic_sigma_mrad))
        sig_px = sig_in / (self.alpha_mrad / canonical.ALPHA_PX)
        img = (1 - f_in) * img + f_in * blur(img, sig_px)
        # uniform background, in units of the mean intensity
        b = aug.background[0] + torch.rand(n, generator=g) * (aug.background[1] - aug.background[0])
        mean = img.mean(dim=(-1, -2), keepdim=True)
        img = img + b[:, None, None, None] * mean
        # detector: coarser pixels, point spread, gain non-uniformity (one factor per batch)
        fac = float(aug.detector_factor[int(torch.randint(len(aug.detector_factor), (1,), generator=g))])
        size = max(8, int(round(canonical.PIXELS / fac)))
        det = F.interpolate(img, size=(size, size), mode="area") if size != canonical.PIXELS else img
        psf = float(aug.psf_px[0] + torch.rand(1, generator=g) * (aug.psf_px[1] - aug.psf_px[0]))
        det = blur(det, psf)
        det = det * (1 + aug.gain_sigma * torch.randn(det.shape, generator=g)).clamp_min(0)
        # shot noise at the dose, plus dark counts
        if dose is None:
            lo, hi = math.log(aug.dose[0]), math.log(aug.dose[1])
            d = torch.exp(lo + torch.rand(n, generator=g) * (hi - lo))
        else:
            d = torch.full((n,), float(dose))
        # det is in fractions of the incident probe per pixel ('area' resampling averages, so scale
        # back to the coarser pixel's share); the dose is electrons per pattern
        expected = det * (canonical.PIXELS / size) ** 2 * d[:, None, None, None]
        counts = torch.poisson(expected, generator=g)
        dark = aug.dark_counts[0] + torch.rand(n, generator=g) * (aug.dark_counts[1] - aug.dark_counts[0])
        counts = counts + dark[:, None, None, None]
        counts = self._raw_effects(counts, g, aug)
        if size != canonical.PIXELS:
            counts = F.interpolate(counts, size=(canonical.PIXELS, canonical.PIXELS), mode="bilinear",
                                   align_corners=False)
        # where the true disk is, as seen in this crop: centre u* = -M^-1 shift [canonical px],
        # radius ALPHA_PX / scale, rotation θ = -φ (DESIGN.md: crop offset d shows R(θ)·d)
        centre = -(torch.linalg.inv(m) @ shift[:, :, None])[:, :, 0]
        valid = frame_valid_torch(n, g, aug, centre) if aug.field_prob > 0 else None
        # the uniform part in units of the final mean inside the window (over its real pixels):
        # what the analysis subtracts
        cm = counts.mean(dim=(-1, -2))[:, 0]
        win = torch.from_numpy(canonical.window_mask(window_alpha))
        if valid is None:
            cw = counts[..., win].mean(dim=-1)[:, 0]
        else:
            cw = (torch.where(valid & win, counts, 0).sum(dim=(-1, -2)) / (valid & win).sum(dim=(-1, -2)))[:, 0]
        b_total = ((b * mean[:, 0, 0, 0] / img.mean(dim=(-1, -2))[:, 0]) * (cm - dark) + dark) / cw
        sub = b_total * torch.rand(n, generator=g) if subtract_background else torch.zeros(n)
        x = normalise_torch(counts, sub, window_alpha, valid)
        theta = torch.rad2deg(-phi)
        labels = {"thickness_nm": th, "tilt_mrad": tilt, "background": b_total - sub, "dose": d,
                  "background_total": b_total, "counts": counts, "center_offset_px": centre,
                  "radius_ratio": 1 / scale, "rotation_deg": theta}
        if valid is not None:
            labels["valid"] = valid
        return x, labels


VALIDATION_CHUNK = 64


def sample_heldout(sampler: PacbedSampler, n: int, seed: int, aug: Augment, **kw) -> tuple[torch.Tensor, dict]:
    """``n`` held-out samples drawn in chunks of 64 (the sampler draws detector binning, PSF and
    inelastic blur once per call, so one big call would give a whole set one value of each).
    The same ``seed`` gives the same patterns at another dose, with other noise."""
    xs, labs = [], []
    for i in range(0, n, VALIDATION_CHUNK):
        g = torch.Generator().manual_seed(seed * 100_003 + i)
        x, lab = sampler.sample(min(VALIDATION_CHUNK, n - i), g, aug, split="heldout", **kw)
        xs.append(x)
        labs.append(lab)
    return torch.cat(xs), {k: torch.cat([b[k] for b in labs]) for k in labs[0]}
