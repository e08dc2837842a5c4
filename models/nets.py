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
    """Thickness and signed tilt as classifiers over fixed bins, plus the uniform background.

    A classifier (the seed's choice) gives class confidences the user can read (seed Table 3)
    and an honest spread when two thicknesses look alike; the estimate and σ are taken from the
    probabilities by :mod:`stemlive.models.pacbed_estimate`.  Outputs (training): logits over
    ``n_thickness`` thickness bins, over ``n_tilt`` bins per tilt axis, and the residual uniform
    background (units of the pattern's mean intensity).  Export wraps it in
    :class:`PacbedThicknessTiltProbabilities`.
    """

    output_names = ("thickness_logits", "tilt0_logits", "tilt1_logits", "background")

    def __init__(self, width: int = 8, n_thickness: int = 123, n_tilt: int = 33):
        super().__init__()
        w = width
        self.n_thickness, self.n_tilt = n_thickness, n_tilt
        self.stem = nn.Sequential(nn.Conv2d(1, w, 5, stride=2, padding=2), nn.BatchNorm2d(w), nn.ReLU(inplace=True))
        self.features = nn.Sequential(_block(w, 2 * w), _block(2 * w, 4 * w), _block(4 * w, 8 * w))  # 32->4
        self.head = nn.Sequential(nn.Flatten(), nn.Linear(8 * w * 16, 384), nn.ReLU(inplace=True),
                                  nn.Linear(384, n_thickness + 2 * n_tilt + 1))

    def forward(self, x: torch.Tensor):
        z = self.head(self.features(self.stem(x)))
        nt, nb = self.n_thickness, self.n_tilt
        return z[:, :nt], z[:, nt:nt + nb], z[:, nt + nb:nt + 2 * nb], z[:, -1:]


class PacbedThicknessTiltProbabilities(nn.Module):
    """The exported form: class probabilities (softmax) instead of logits."""

    output_names = ("thickness_prob", "tilt0_prob", "tilt1_prob", "background")

    def __init__(self, net: PacbedThicknessTiltNet):
        super().__init__()
        self.net = net

    def forward(self, x: torch.Tensor):
        t, a, b, bg = self.net(x)
        return t.softmax(dim=1), a.softmax(dim=1), b.softmax(dim=1), bg


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


class AtomUNet(nn.Module):
    """A small U-Net: image in, "a column is here" map out (one channel per contrast task).

    Input (N, 1, H, W) with H and W multiples of 2**depth (the finder pads); output ``columns``
    in [0, 1] with a Gaussian peak on every column of the training truth.  Max-pooling down,
    transposed convolutions up, skip connections, BatchNorm + ReLU: all TensorRT layers, no
    resize or antialiasing.
    """

    output_names = ("columns",)

    def __init__(self, width: int = 16, depth: int = 3):
        super().__init__()
        w = [width * 2 ** k for k in range(depth + 1)]
        self.depth = depth
        self.down = nn.ModuleList([self._conv(1 if k == 0 else w[k - 1], w[k]) for k in range(depth)])
        self.pool = nn.MaxPool2d(2)
        self.bottom = self._conv(w[depth - 1], w[depth])
        self.up = nn.ModuleList([nn.ConvTranspose2d(w[k + 1], w[k], 2, stride=2) for k in reversed(range(depth))])
        self.merge = nn.ModuleList([self._conv(2 * w[k], w[k]) for k in reversed(range(depth))])
        self.out = nn.Conv2d(w[0], 1, 1)

    @staticmethod
    def _conv(c_in: int, c_out: int) -> nn.Sequential:
        return nn.Sequential(nn.Conv2d(c_in, c_out, 3, padding=1), nn.BatchNorm2d(c_out), nn.ReLU(inplace=True),
                             nn.Conv2d(c_out, c_out, 3, padding=1), nn.BatchNorm2d(c_out), nn.ReLU(inplace=True))

    def forward(self, x: torch.Tensor):
        skips = []
        for block in self.down:
            x = block(x)
            skips.append(x)
            x = self.pool(x)
        x = self.bottom(x)
        for up, merge, skip in zip(self.up, self.merge, reversed(skips)):
            x = merge(torch.cat([up(x), skip], dim=1))
        return (torch.sigmoid(self.out(x)),)
