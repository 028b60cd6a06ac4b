from __future__ import annotations

import logging
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


def test_series_rules_reach_the_loader_volume_included(tmp_path, capsys):
    """`--volume` picks a volume of a 4D study; without it the study is reported as ambiguous."""
    import json

    from pydicom.uid import generate_uid

    from tests.io.dicom_factory import SeriesSpec, write_series

    series, study = generate_uid(), generate_uid()
    for t in (1, 2):
        write_series(tmp_path / "data" / "images" / "case1" / f"t{t}",
                     SeriesSpec(modality="MR", temporal_position=t, series_uid=series, study_uid=study))
    build = ["manifest", "build", str(tmp_path / "data"), "--images", "images", "--quiet", "--modality", "MR"]
    main([*build, "--output", str(tmp_path / "all.json")])
    assert "the series holds 2 volumes" in capsys.readouterr().err
    assert main([*build, "--volume", "1", "--output", str(tmp_path / "second.json")]) == 0
    (entry,) = json.loads((tmp_path / "second.json").read_text())["training"]
    assert entry["case_id"] == "case1" and entry["shape"] == [10, 12, 7]


def test_batch_words_it_does_not_know_are_bundle_overrides(monkeypatch):
    """``--id value`` and ``--id=value`` reach the batch job as bundle overrides, a value read as a
    Python literal where it is one; other commands still refuse words they do not know."""
    import pytest

    import pipelines.batch

    seen = {}

    def run_batch(*args, overrides, **kwargs):
        seen.update(overrides)
        raise pipelines.batch.BatchInputError("stop here")

    monkeypatch.setattr(pipelines.batch, "run_batch", run_batch)
    level = logging.getLogger("pipelines").level
    assert main(["batch", "--bundle", "b", "--input", "i", "--output", "o", "--channels", "['t2f', 't1c']",
                 "--spacing=[1.5, 1.5, 1.5]", "--register", "auto", "--max_epochs", "3", "--quiet"]) == 2
    assert seen == {"channels": ["t2f", "t1c"], "spacing": [1.5, 1.5, 1.5], "register": "auto", "max_epochs": 3}
    assert logging.getLogger("pipelines").level == level  # in-process, --quiet does not silence later callers
    for words in (["--channels"], ["--channels", "--quiet"], ["stray"]):
        with pytest.raises(SystemExit):
            main(["batch", "--bundle", "b", "--input", "i", "--output", "o", *words])
    with pytest.raises(SystemExit):
        main(["shapes", "--channels", "['t2f']"])
