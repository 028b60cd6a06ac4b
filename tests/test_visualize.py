from __future__ import annotations

import subprocess
import sys

import numpy as np

from pipelines.visualize import overlay_slice


def test_overlay_colours_only_labelled_pixels():
    image = np.tile(np.linspace(0, 100, 8), (6, 1))
    label = np.zeros((6, 8), dtype=int)
    label[2:4, 2:4] = 1
    label[0, 0] = 2
    rgb = overlay_slice(image, label)
    assert rgb.shape == (6, 8, 3) and rgb.dtype == np.uint8
    grey = rgb[label == 0]
    assert (grey[:, 0] == grey[:, 1]).all() and (grey[:, 1] == grey[:, 2]).all()
    assert (rgb[2:4, 2:4, 0] > rgb[2:4, 2:4, 2]).all()  # label 1 is red
    assert not np.array_equal(rgb[0, 0], rgb[2, 2])  # label 2 has another colour


def test_the_batch_job_imports_no_training_engine():
    """Overlays come from this numpy-only module: the batch job pulls in neither Ignite nor the engines."""
    code = ("import sys, pipelines.visualize; print('torch' in sys.modules)\n"
            "import pipelines.batch; print(any(m.split('.')[0] == 'ignite' or m.startswith('pipelines.engines') for m in sys.modules))")
    result = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    assert result.stdout.split() == ["False", "False"]
