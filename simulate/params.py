"""Parameters of a PACBED/CBED library simulation, with the defaults derived from physics."""
from __future__ import annotations

import json
import math
from dataclasses import asdict, dataclass, field

SEED_TILTS_MRAD = (0.0, 0.25, 0.5, 0.75, 1.0, 1.5, 2.0, 2.5, 3.0, 3.5, 4.0)


def wavelength_A(kv: float) -> float:
    """Relativistic electron wavelength [Å] at ``kv`` [kV]."""
    e = kv * 1e3
    return 12.2643 / math.sqrt(e * (1 + 0.97845e-6 * e))


def positions_per_cell(alpha_mrad: float, kv: float, length_A: float) -> int:
    """Smallest N with N > 2α/θ (θ = λ/length): disk-overlap fringes then cancel in the average."""
    theta = wavelength_A(kv) / length_A * 1e3
    return int(math.floor(2 * alpha_mrad / theta)) + 1


@dataclass
class PacbedParams:
    """Everything that determines a library; stored verbatim in the output file."""

    material: str = "SrTiO3"
    zone: str = "[001]"
    kv: float = 200.0  # [kV]
    alpha_mrad: float = 13.6  # convergence semi-angle [mrad]
    thickness_nm: tuple[float, float, float] = (1.0, 120.0, 1.0)  # min, max, step [nm]
    tilt_values_mrad: tuple[float, ...] = SEED_TILTS_MRAD  # along axis 0 and axis 1
    tilt_signed: bool = False  # False: t0, t1 ≥ 0 (other quadrants follow by symmetry)
    max_angle_mrad: float | None = None  # stored half-range [mrad]; None: 3α
    pixels: int | None = None  # stored pattern size (odd); None: native sampling
    positions: tuple[int, int] | None = None  # probe positions per unit cell; None: rule
    cell_extent_A: float = 19.5  # supercell edge [Å]; sets reciprocal sampling λ/extent
    sampling_A: float = 0.0765  # real-space sampling of the potential [Å]
    phonon_passes: int = 2  # passes over the positions, each row a fresh configuration; 0: static
    pool_cells: int = 32  # displaced unit-cell repeats in the slice pool
    keep_positions: bool = False
    use_symmetry: bool = True
    seed: int = 0
    extra: dict = field(default_factory=dict)  # free-form provenance stored verbatim with the library

    def resolved_max_angle(self) -> float:
        return self.max_angle_mrad if self.max_angle_mrad is not None else 3.0 * self.alpha_mrad

    def to_json(self) -> str:
        return json.dumps(asdict(self), sort_keys=True)

    @classmethod
    def from_json(cls, text: str) -> "PacbedParams":
        d = json.loads(text)
        for k in ("thickness_nm", "tilt_values_mrad"):
            d[k] = tuple(d[k])
        if d.get("positions") is not None:
            d["positions"] = tuple(d["positions"])
        return cls(**d)

    def validate(self) -> None:
        tmin, tmax, tstep = self.thickness_nm
        if not (0 < tmin <= tmax and tstep > 0):
            raise ValueError(f"thickness range {self.thickness_nm} must be 0 < min ≤ max with step > 0 [nm]")
        if self.alpha_mrad <= 0 or self.kv <= 0:
            raise ValueError("convergence semi-angle and high tension must be positive")
        if self.pixels is not None and self.pixels % 2 == 0:
            raise ValueError(f"--pixels must be odd (zero beam on the centre pixel), got {self.pixels}")
        if self.phonon_passes < 0 or self.pool_cells < 1:
            raise ValueError("phonon passes must be ≥ 0 and pool cells ≥ 1")
        if any(t < 0 for t in self.tilt_values_mrad) and not self.tilt_signed:
            raise ValueError("negative tilt values need --signed-tilts")
