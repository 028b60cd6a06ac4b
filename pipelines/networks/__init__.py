"""Networks: the U-Net of Ronneberger et al. in 2D and 3D, and its CPU inference kernels."""

from __future__ import annotations

from .cpu import cpu_inference, for_cpu_inference
from .unet import UNet

__all__ = ["UNet", "cpu_inference", "for_cpu_inference"]
