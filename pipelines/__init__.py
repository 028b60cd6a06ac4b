"""U-Net segmentation pipelines built on MONAI: networks, transforms, tiled inference, bundles.

Import the subpackages you need (``pipelines.networks``, ``pipelines.inference``, ...); importing
``pipelines`` itself does no work.
"""

from __future__ import annotations

__version__ = "0.1.0"
__all__ = ["__version__"]
