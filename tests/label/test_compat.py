"""The CPU stand-in for the two torchvision.utils functions MONAI Label imports."""

from __future__ import annotations

import subprocess
import sys

import numpy as np
import pytest
import torch
from PIL import Image

from pipelines.label.compat import make_grid, save_image


def test_grid_layout_padding_and_channels():
    images = torch.stack([torch.full((1, 3, 4), float(k)) for k in range(5)])  # (B, 1, H, W)
    grid = make_grid(images, nrow=2, padding=1, pad_value=-1.0)
    assert grid.shape == (3, 3 * (3 + 1) + 1, 2 * (4 + 1) + 1)  # 3 rows of 2, one channel repeated to 3
    for k in range(5):
        y, x = divmod(k, 2)
        tile = grid[:, 1 + y * 4 : 1 + y * 4 + 3, 1 + x * 5 : 1 + x * 5 + 4]
        assert torch.all(tile == k)
    assert torch.all(grid[:, 9:12, 6:10] == -1.0)  # the sixth cell is empty padding
    assert torch.all(grid[:, 0, :] == -1.0) and torch.all(grid[:, :, 0] == -1.0)


def test_single_image_and_normalisation():
    image = torch.tensor([[[0.0, 2.0], [4.0, 8.0]]])
    assert torch.equal(make_grid(image), image.repeat(3, 1, 1))  # one image: no padding
    assert torch.allclose(make_grid(image, normalize=True)[0], image[0] / 8.0)
    two = torch.stack([image, image + 8.0])
    each = make_grid(two, normalize=True, scale_each=True, padding=0)
    assert torch.allclose(each[0, :, :2], each[0, :, 2:])  # each image to [0, 1] on its own
    clipped = make_grid(image, normalize=True, value_range=(2.0, 4.0))
    assert torch.equal(clipped[0], torch.tensor([[0.0, 0.0], [1.0, 1.0]]))
    assert torch.equal(image, torch.tensor([[[0.0, 2.0], [4.0, 8.0]]]))  # the input is left alone


def test_bad_shapes_are_refused():
    with pytest.raises(ValueError, match=r"tensor must be \(B, C, H, W\)"):
        make_grid(torch.zeros(1, 1, 1, 2, 2))
    with pytest.raises(TypeError, match="tensor must be a tensor"):
        make_grid(np.zeros((2, 2)))


def test_save_image_writes_8_bit_rgb(tmp_path):
    image = torch.tensor([[[0.0, 0.5], [1.0, 0.25]]])
    save_image(image, tmp_path / "grid.png")
    pixels = np.asarray(Image.open(tmp_path / "grid.png"))
    assert pixels.shape == (2, 2, 3) and pixels.dtype == np.uint8
    assert pixels[..., 0].tolist() == [[0, 128], [255, 64]]


def test_provided_only_when_torchvision_does_not_import():
    """In a fresh interpreter (the stand-in changes sys.modules): the MONAI Label import then works."""
    code = (
        "from pipelines.label.compat import provide_torchvision_utils\n"
        "provided = provide_torchvision_utils()\n"
        "from torchvision.utils import make_grid, save_image\n"
        "print(provided, make_grid.__module__)\n"
        "try:\n"
        "    import torchvision.models\n"
        "except ImportError:\n"
        "    print('models missing')\n"
    )
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True).stdout.split("\n")
    provided, module = out[0].split()
    if provided == "False":
        pytest.skip("a working torchvision is installed here: nothing to provide")
    assert (provided, module) == ("True", "pipelines.label.compat") and out[1] == "models missing"
