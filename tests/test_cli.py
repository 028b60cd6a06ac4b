from __future__ import annotations

import subprocess
import sys

from pipelines.cli import main


def test_shapes_for_the_paper_network(capsys):
    assert main(["shapes", "--output-size", "388"]) == 0
    out = capsys.readouterr().out
    assert "input  572x572" in out and "output 388x388" in out and "context per side 92x92" in out
    assert "multiples of 16" in out


def test_shapes_3d_input_check(capsys):
    assert main(["shapes", "--spatial-dims", "3", "--features", "32", "64", "128", "256", "--input-size", "132", "132", "116"]) == 0
    assert "output 44x44x28" in capsys.readouterr().out


def test_shapes_reports_invalid_sizes(capsys):
    assert main(["shapes", "--input-size", "570"]) == 2
    assert "nearest valid sizes: 556 or 572" in capsys.readouterr().err
    assert main(["shapes", "--input-size", "572", "572", "572"]) == 2
    assert "--input-size must have 1 or 2 values, got 3" in capsys.readouterr().err


def test_module_entry_point():
    result = subprocess.run([sys.executable, "-m", "pipelines", "--help"], capture_output=True, text=True, check=True)
    assert "shapes" in result.stdout


def test_help_imports_no_heavy_module():
    code = (
        "import sys\nfrom pipelines.cli import main\n"
        "try:\n    main(['shapes', '--help'])\nexcept SystemExit:\n    pass\n"
        "print('torch' in sys.modules, 'monai' in sys.modules)"
    )
    result = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    assert result.stdout.split()[-2:] == ["False", "False"]


def test_importing_the_package_does_no_work():
    code = "import sys, pipelines, pipelines.cli; print('torch' in sys.modules, 'monai' in sys.modules)"
    result = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    assert result.stdout.split() == ["False", "False"]
