"""Networks: the U-Net of Ronneberger et al. in 2D and 3D."""

from __future__ import annotations

from .unet import UNet

__all__ = ["UNet"]
