"""The project's code in the MONAI Label environment (pydicom 2): what the bundles import, and DICOM reading."""

from __future__ import annotations

import json
import subprocess

import numpy as np
import pytest

from pipelines.io import load_volume
from tests.batch.conftest import DEMO, demo_case
from tests.conftest import REPO, shared_data_dir
from tests.label.conftest import label_python

_LOAD = """
import json, sys
import numpy as np
import pydicom
from pipelines.io import load_volume
paths, out = json.loads(sys.argv[1]), sys.argv[2]
arrays = {}
for k, path in enumerate(paths):
    volume = load_volume(path)
    arrays[f"v{k}"], arrays[f"a{k}"] = volume.numpy(), volume.affine.numpy()
np.savez(out, **arrays)
print(pydicom.__version__)
"""


def _bundle_imports() -> list[str]:
    modules = set()
    for config in sorted(REPO.glob("bundles/*/configs/*.json")):
        for line in json.loads(config.read_text()).get("imports", []) if config.name != "metadata.json" else []:
            modules.add(line.removeprefix("$import ").strip())
    return sorted(modules)


def test_bundle_imports_work_with_pydicom_2():
    modules = _bundle_imports()
    assert {"pipelines.networks", "pipelines.transforms", "pipelines.inference"} <= set(modules)
    code = "import importlib, pydicom\n" + "".join(f"importlib.import_module({m!r})\n" for m in modules)
    code += "from pipelines.label.app import UNetPipelinesApp\nprint(pydicom.__version__)\n"
    result = subprocess.run([str(label_python()), "-c", code], capture_output=True, text=True, timeout=300)
    assert result.returncode == 0, result.stderr[-3000:]
    assert result.stdout.split()[-1].startswith("2.")


def test_dicom_reads_the_same_with_pydicom_2(tmp_path):
    """The scan's raw-element reads and the decoder check take pydicom 2 paths there: same voxels, same affine."""
    paths = [DEMO / demo_case("test", 0)["dicom"]]
    syntaxes = shared_data_dir() / "dicom_transfer_syntaxes"
    paths += sorted(syntaxes.glob("*.dcm"))  # seven transfer syntaxes, compressed ones included
    if len(paths) == 1:
        pytest.skip(f"shared DICOM transfer syntax files not found at {syntaxes}")
    out = tmp_path / "volumes.npz"
    result = subprocess.run([str(label_python()), "-c", _LOAD, json.dumps([str(p) for p in paths]), str(out)],
                            capture_output=True, text=True, timeout=300)
    assert result.returncode == 0, result.stderr[-3000:]
    assert result.stdout.strip().startswith("2.")
    there = np.load(out)
    for k, path in enumerate(paths):
        here = load_volume(path)
        assert there[f"v{k}"].dtype == here.numpy().dtype, path
        assert np.array_equal(there[f"v{k}"], here.numpy()), path
        assert np.allclose(there[f"a{k}"], here.affine.numpy()), path
