"""Network definitions (PyTorch; imported only by training and export, never by the live core).

Plain convolutions, max-pooling, linear layers and ReLU only, so the ONNX graph maps onto
TensorRT layers one to one.  Inputs are (N, 1, 64, 64): the aligned PACBED resampled so the
zero disk has a fixed radius (models/canonical.py), square-root intensity, standardised.
"""
from __future__ import annotations

import torch
from torch import nn


def _block(c_in: int, c_out: int) -> nn.Sequential:
    return nn.Sequential(
        nn.Conv2d(c_in, c_out, 3, padding=1), nn.BatchNorm2d(c_out), nn.ReLU(inplace=True),
        nn.Conv2d(c_out, c_out, 3, padding=1), nn.BatchNorm2d(c_out), nn.ReLU(inplace=True),
        nn.MaxPool2d(2),
    )


class PacbedThicknessTiltNet(nn.Module):
    """Thickness and signed tilt, each with an uncertainty, plus the uniform background.

    Outputs (per pattern): ``thickness_nm``, ``thickness_sigma_nm``, ``tilt_mrad`` (2),
    ``tilt_sigma_mrad`` (2), ``background`` (in units of the pattern's mean intensity).
    σ comes from a Gaussian negative log-likelihood head (softplus, floor 1e-3).
    """

    output_names = ("thickness_nm", "thickness_sigma_nm", "tilt_mrad", "tilt_sigma_mrad", "background")

    def __init__(self, width: int = 16, thickness_scale: float = 100.0, tilt_scale: float = 4.0):
        super().__init__()
        w = width
        self.stem = nn.Sequential(nn.Conv2d(1, w, 5, stride=2, padding=2), nn.BatchNorm2d(w), nn.ReLU(inplace=True))
        self.features = nn.Sequential(_block(w, 2 * w), _block(2 * w, 4 * w), _block(4 * w, 8 * w))  # 32->4
        self.head = nn.Sequential(nn.Flatten(), nn.Linear(8 * w * 16, 256), nn.ReLU(inplace=True),
                                  nn.Linear(256, 7))
        self.thickness_scale = thickness_scale
        self.tilt_scale = tilt_scale

    def forward(self, x: torch.Tensor):
        z = self.head(self.features(self.stem(x)))
        t = z[:, 0:1] * self.thickness_scale
        t_sig = (nn.functional.softplus(z[:, 1:2]) + 1e-3) * self.thickness_scale * 0.05
        tilt = z[:, 2:4] * self.tilt_scale
        tilt_sig = (nn.functional.softplus(z[:, 4:6]) + 1e-3) * self.tilt_scale * 0.05
        bg = z[:, 6:7]
        return t, t_sig, tilt, tilt_sig, bg


class PacbedAlignNet(nn.Module):
    """Where the zero disk really is in a crop made from the current estimate.

    Input: the canonical crop (current centre, radius, rotation). Outputs: ``center_offset_px``
    (the true centre in the crop, canonical px from the centre pixel), ``log_radius_ratio``
    (true radius over the canonical one) and ``rotation_4`` = (cos 4θ, sin 4θ), the residual
    pattern rotation modulo the zone's 90° symmetry.  Applied iteratively (seed Fig. 2).
    """

    output_names = ("center_offset_px", "log_radius_ratio", "rotation_4")

    def __init__(self, width: int = 8):
        super().__init__()
        w = width
        self.stem = nn.Sequential(nn.Conv2d(1, w, 5, stride=2, padding=2), nn.BatchNorm2d(w), nn.ReLU(inplace=True))
        self.features = nn.Sequential(_block(w, 2 * w), _block(2 * w, 4 * w), _block(4 * w, 8 * w))
        self.head = nn.Sequential(nn.Flatten(), nn.Linear(8 * w * 16, 128), nn.ReLU(inplace=True), nn.Linear(128, 5))

    def forward(self, x: torch.Tensor):
        z = self.head(self.features(self.stem(x)))
        return z[:, 0:2] * 4.0, z[:, 2:3] * 0.2, z[:, 3:5]
