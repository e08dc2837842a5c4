"""Training settings (torch-free, so the command line builds without PyTorch installed)."""
from __future__ import annotations

from dataclasses import dataclass


@dataclass
class TrainConfig:
    steps: int = 8000
    batch: int = 128
    lr: float = 2e-3
    weight_decay: float = 1e-4
    width: int = 8
    holdout_fraction: float = 0.1
    val_every: int = 500
    val_samples: int = 1024  # per dose
    background_iterations: int = 3
    seed: int = 0
    threads: int = 2
