"""The project's console script, ``unet-pipelines`` (also ``python -m pipelines``).

Heavy modules (torch, MONAI) are imported inside the subcommands, so ``--help`` is instant.
"""

from __future__ import annotations

import argparse
import ast
import logging
import sys
from collections.abc import Sequence

__all__ = ["BATCH_EXIT_CODES", "main"]

BATCH_EXIT_CODES = {
    0: "every case segmented or complete from an earlier run; some may have failed (see `report.csv`)",
    1: "every case failed; with `--fail-on-error`, any case failed",
    2: "the run cannot start: a usage error, unusable input, an output that is a file, not writable or short of "
       "`--min-free-mb`, in use by another run (without `--wait`), two manifest entries or files mapping to one case "
       "id, a bundle that breaks the contract",
    3: "the output stopped taking writes mid-run: disk full, read-only, permission denied (EACCES, EPERM)",
    130: "stopped by SIGINT (the shell's 128 + signal number): finished cases stay complete; rerun to resume",
    143: "stopped by SIGTERM, as SIGINT",
}


def _shapes(args: argparse.Namespace) -> int:
    from pipelines.networks import UNet

    net = UNet(args.spatial_dims, 1, 1, features=args.features, padding=args.padding)
    dims = args.spatial_dims
    if (args.input_size is None) == (args.output_size is None):
        raise ValueError("give exactly one of --input-size and --output-size")
    if args.output_size is not None:
        wanted = _per_axis(args.output_size, dims, "--output-size")
        size = net.valid_input_shape(wanted)
    else:
        size = _per_axis(args.input_size, dims, "--input-size")
    out = net.output_shape(size)
    context = [(i - o) // 2 for i, o in zip(size, out)]
    print(f"input  {'x'.join(map(str, size))}")
    print(f"output {'x'.join(map(str, out))}")
    print(f"context per side {'x'.join(map(str, context))}; tiles align to multiples of {net.downsample_factor}")
    return 0


def _per_axis(values: Sequence[int], dims: int, flag: str) -> tuple[int, ...]:
    if len(values) == 1:
        return tuple(values) * dims
    if len(values) != dims:
        raise ValueError(f"{flag} must have 1 or {dims} values, got {len(values)}")
    return tuple(values)


def _series_rules(args: argparse.Namespace) -> dict:
    """The DICOM series rules given by the flags of :func:`_add_series_rule_arguments`, by name: the
    overrides a caller applies with ``SeriesRules.of(base, **overrides)`` (``dataclasses.replace``)."""
    from pipelines.io.rules import SeriesRules

    return {name: value for name in SeriesRules.names() if (value := getattr(args, name)) is not None}


def _add_series_rule_arguments(parser: argparse.ArgumentParser) -> None:
    """One flag per DICOM series rule (``--modality``, ..., ``--volume``), as SeriesRules declares them."""
    from dataclasses import fields

    from pipelines.io.rules import SeriesRules

    for rule in fields(SeriesRules):
        how = {k: v for k, v in rule.metadata.items() if k != "help"}
        flag = f"--{rule.name.replace('_', '-')}"
        parser.add_argument(flag, **how, help=f"DICOM series rule: {rule.metadata['help']}")


def _manifest_build(args: argparse.Namespace) -> int:
    from pipelines.data import build_manifest, write_manifest
    from pipelines.io.rules import SeriesRules

    if args.layout is not None:
        from pipelines.data import build_brats_manifest

        manifest, problems = build_brats_manifest(
            args.dataset_dir, images=args.images, channels=args.channels,
            layout=None if args.layout == "brats" else args.layout, progress=not args.quiet,
        )
    else:
        manifest, problems = build_manifest(
            args.dataset_dir, images=args.images, labels=args.labels, progress=not args.quiet,
            rules=SeriesRules.of(**_series_rules(args)),
        )
    write_manifest(manifest, args.output)
    print(f"wrote {args.output}: {len(manifest['training'])} cases")
    for problem in problems:
        print(f"problem: {problem}", file=sys.stderr)
    return 1 if problems else 0


def _manifest_check(args: argparse.Namespace) -> int:
    from pipelines.data import check_manifest

    report = check_manifest(args.manifest, args.dataset_dir, progress=not args.quiet)
    for problem in report.problems:
        print(f"problem: {problem}")
    print(f"{args.manifest}: {report.cases} cases, {len(report.problems)} problems")
    return 0 if report.ok else 1


def _manifest_split(args: argparse.Namespace) -> int:
    from pipelines.data import read_manifest, split_manifest, write_manifest

    manifest = split_manifest(read_manifest(args.manifest), args.folds, args.seed, args.validation_fold)
    write_manifest(manifest, args.output)
    print(f"wrote {args.output}: {len(manifest['training'])} training, {len(manifest['validation'])} validation "
          f"(fold {args.validation_fold} of {args.folds})")
    return 0


def _add_manifest_commands(commands) -> None:
    manifest = commands.add_parser("manifest", help="build, check and split data manifests (MONAI datalists)")
    actions = manifest.add_subparsers(dest="action", required=True)

    build = actions.add_parser("build", help="scan a folder of NIfTI files or DICOM studies into a manifest")
    build.add_argument("dataset_dir", help="the folder manifest paths are relative to")
    build.add_argument("--output", required=True, help="manifest file to write")
    build.add_argument("--images", default=".", help="sub-folder of cases: image files or one folder per DICOM study")
    build.add_argument("--labels", help="sub-folder of label files named after the cases")
    build.add_argument("--layout", choices=("brats", "brats2023", "brats2021"),
                       help="a BraTS download: one folder per case holding its channels and segmentation "
                            "(brats: tell 2023 from 2021 by the folder names)")
    build.add_argument("--channels", nargs="+", default=["t1n", "t1c", "t2w", "t2f"],
                       choices=("t1n", "t1c", "t2w", "t2f"),
                       help="with --layout: the channels that make each case's image, in this order")
    _add_series_rule_arguments(build)
    build.add_argument("--quiet", action="store_true", help="no progress bar")
    build.set_defaults(func=_manifest_build)

    check = actions.add_parser("check", help="every path exists, loads, matches its label's grid; no duplicates")
    check.add_argument("manifest")
    check.add_argument("--dataset-dir", required=True)
    check.add_argument("--quiet", action="store_true", help="no progress bar")
    check.set_defaults(func=_manifest_check)

    split = actions.add_parser("split", help="k folds by patient: no patient in both training and validation")
    split.add_argument("manifest")
    split.add_argument("--folds", type=int, required=True)
    split.add_argument("--seed", type=int, default=0)
    split.add_argument("--validation-fold", type=int, default=0)
    split.add_argument("--output", required=True)
    split.set_defaults(func=_manifest_split)


def _demo_data(args: argparse.Namespace) -> int:
    from pipelines.demo import write_demo_data

    split = dict(zip(("training", "validation", "test"), args.cases))
    if len(args.cases) != 3 or min(args.cases) < 0:
        raise ValueError(f"--cases must be three counts >= 0 (training validation test), got {args.cases}")
    write_demo_data(args.out, args.manifest or None, split=split, seed=args.seed, dicom=not args.no_dicom,
                    progress=lambda line: print(line, flush=True))
    print(f"wrote {sum(split.values())} cases to {args.out}" + (f", manifest {args.manifest}" if args.manifest else ""))
    return 0


def _add_demo_command(commands, name: str, summary: str, description: str, out: str, manifest: str,
                      cases: list[int], seed: int, func) -> argparse.ArgumentParser:
    """A demo data set's subcommand with the options every one takes."""
    demo = commands.add_parser(name, help=summary, description=description)
    demo.add_argument("--out", default=out, help=f"data set folder (default: {out})")
    demo.add_argument("--manifest", default=manifest, help="manifest to write ('' for none)")
    demo.add_argument("--cases", type=int, nargs=3, default=cases, metavar=("TRAIN", "VAL", "TEST"))
    demo.add_argument("--seed", type=int, default=seed)
    demo.set_defaults(func=func)
    return demo


def _demo_brain(args: argparse.Namespace) -> int:
    from pipelines.demo.brain_dataset import write_brain_demo

    if len(args.cases) != 3 or min(args.cases) < 0:
        raise ValueError(f"--cases must be three counts >= 0 (training validation test), got {args.cases}")
    split = dict(zip(("training", "validation", "test"), args.cases))
    write_brain_demo(args.out, args.manifest or None, split=split, seed=args.seed, workers=args.workers,
                     progress=lambda line: print(line, flush=True))
    print(f"wrote {sum(split.values())} studies to {args.out}" + (f", manifest {args.manifest}" if args.manifest else ""))
    return 0


def _batch(args: argparse.Namespace) -> int:
    import logging

    logging.basicConfig(level=logging.WARNING, format="%(asctime)s %(levelname)s %(message)s")
    package_logger = logging.getLogger("pipelines")
    level = package_logger.level
    package_logger.setLevel(logging.WARNING if args.quiet else logging.INFO)
    try:  # called in-process (tests, notebooks), a run leaves the package's log level as it found it
        return _run_batch(args)
    finally:
        package_logger.setLevel(level)


def _run_batch(args: argparse.Namespace) -> int:
    from tqdm.contrib.logging import logging_redirect_tqdm

    from pipelines.batch import BatchAbortedError, BatchInterrupted, run_batch
    from pipelines.batch.cases import RemoteQuery
    from pipelines.batch.remote.retry import RetryPolicy

    rules = _series_rules(args)
    with logging_redirect_tqdm():
        try:
            summary = run_batch(
                args.bundle, args.input, args.output, workers=args.workers, device=args.device, tta=args.tta,
                probabilities=args.probabilities, rtstruct=args.rtstruct, case_pages=not args.no_case_pages, runtime=args.runtime,
                rules=rules, section=args.section, dataset_dir=args.dataset_dir,
                image_key=args.image_key, push=args.push,
                query=RemoteQuery(tuple(args.study_uid or ()), args.study_date, args.calling_aet),
                retry=RetryPolicy(retries=args.retries, wait=args.retry_wait),
                prior=args.prior or (), fail_on_error=args.fail_on_error,
                min_free_mb=args.min_free_mb, progress=not args.quiet, overrides=args.overrides, wait=args.wait,
            )
        except BatchAbortedError as exc:  # disk full, read-only or permission denied mid-run
            print(f"unet-pipelines batch: stopped: {exc.strerror}", file=sys.stderr)
            return 3
        except BatchInterrupted as stop:  # SIGINT, SIGTERM: the shell's 128 + signal number
            print(f"unet-pipelines batch: {stop}", file=sys.stderr)
            return 128 + stop.signum
    print(f"{summary.cases} cases: {summary.done} segmented, {summary.skipped} already complete, "
          f"{len(summary.failed)} failed" + (f" ({', '.join(summary.failed)})" if summary.failed else ""))
    for report in summary.reports:
        print(f"report: {report}")
    return summary.exit_code


def _add_batch_command(commands) -> None:
    batch = commands.add_parser(
        "batch",
        help="segment many studies with a bundle: masks, DICOM SEG, volumes, QC pictures, reports",
        description="Run a bundle over a folder tree of DICOM studies and/or NIfTI files, a manifest, or a "
        "DICOMweb server. Writes <output>/<case_id>/{mask.nii.gz,seg.dcm,sr.dcm,qc.png,qc_thumbnail.png,record.json} and "
        "<output>/report.{csv,html}; a study with a PatientID and StudyDate also anatomy.nii.gz, and the change since "
        "the patient's prior study in this run or in --prior folders. Rerunning skips complete cases. Other --id value pairs are "
        "bundle overrides, as python -m monai.bundle run takes them (e.g. --channels \"['t2f', 't1c']\" for weights "
        "trained on FLAIR and T1c). A bundle's configs run Python code: use bundles you trust.",
        epilog="exit codes: " + "; ".join(f"{code} {why}" for code, why in BATCH_EXIT_CODES.items()).replace("`", ""),
    )
    batch.add_argument("--bundle", required=True, help="bundle folder (configs/inference.json, models/model.pt)")
    batch.add_argument("--input", required=True,
                       help="folder, manifest .json, DICOMweb URL (http://.../dicom-web) or DICOM peer (dicom://AET@host:port)")
    batch.add_argument("--output", required=True, help="output folder")
    batch.add_argument("--workers", type=int, default=1, help="processes loading the next cases (0: none)")
    batch.add_argument("--device", default="cpu", help="cpu, cuda or cuda:N")
    batch.add_argument("--tta", action="store_true", help="mirroring test-time augmentation")
    batch.add_argument("--probabilities", action="store_true", help="also write prob.nii.gz")
    batch.add_argument("--runtime", choices=("torch", "openvino", "openvino-int8"),
                       help="where the network runs on the CPU (default: the bundle's `runtime` config id, else torch)")
    batch.add_argument("--no-case-pages", action="store_true",
                       help="no index.html per study (a case page holds its images: up to about 10 MB each)")
    batch.add_argument("--rtstruct", action="store_true",
                       help="also write rtstruct.dcm, an RT Structure Set for treatment planning (DICOM input)")
    batch.add_argument("--push", nargs="?", const=True, default=False, metavar="DESTINATION",
                       help="store each case's DICOM SEG, SR (and RTSTRUCT): alone, back to the input server (STOW-RS "
                            "or C-STORE); or to DESTINATION, a DICOMweb URL or dicom://AET@host:port")
    batch.add_argument("--study-uid", action="append", metavar="UID",
                       help="server input: this study (repeatable); a DICOM peer needs it or --study-date")
    batch.add_argument("--study-date", metavar="DATES", help="server input: studies of YYYYMMDD or YYYYMMDD-YYYYMMDD")
    batch.add_argument("--calling-aet", default="UNETPIPELINES",
                       help="AE title this job calls DICOM peers with (default: UNETPIPELINES)")
    batch.add_argument("--retries", type=int, default=7, metavar="N",
                       help="server input and --push: try a transient failure (connection refused or reset, timeout, "
                            "HTTP 429/502/503/504, association aborted, out of resources) again up to N times (default: 7)")
    batch.add_argument("--retry-wait", type=float, default=2.0, metavar="SECONDS",
                       help="longest wait before the first retry, doubled for each next one up to 60 s; the wait is "
                            "drawn at random below it (default: 2)")
    batch.add_argument("--prior", action="append", metavar="FOLDER",
                       help="output folder of an earlier run holding prior studies of these patients (repeatable): "
                            "each study is compared with the patient's latest earlier one, there or in this run")
    batch.add_argument("--fail-on-error", action="store_true", help="exit code 1 when any case failed")
    batch.add_argument("--section", default="test", help="manifest section (default: test)")
    batch.add_argument("--dataset-dir", help="folder the manifest's paths are relative to (default: the manifest's)")
    batch.add_argument("--image-key", help="manifest key of the image (default: dicom when every case has it)")
    batch.add_argument("--min-free-mb", type=float, default=100.0, help="refuse to start with less free space")
    batch.add_argument("--wait", action="store_true",
                       help="when another run is using the output folder, wait for it to end (default: exit with 2)")
    _add_series_rule_arguments(batch)
    batch.add_argument("--quiet", action="store_true", help="no progress bar, warnings only")
    batch.set_defaults(func=_batch)


def _quantize(args: argparse.Namespace) -> int:
    from pipelines.batch.quantize import QuantizationRefused, bundle_cases, quantize_bundle

    logging.basicConfig(level=logging.INFO, format="%(message)s")
    source, dataset_dir = (args.input, args.dataset_dir) if args.input else bundle_cases(args.bundle)
    try:
        path, calibration = quantize_bundle(
            args.bundle, source, section=args.section, dataset_dir=args.dataset_dir or dataset_dir,
            image_key=args.image_key, max_windows=args.max_windows, seed=args.seed, min_dice=args.min_dice,
            max_volume_difference=args.max_volume_difference)
    except QuantizationRefused as exc:
        print(f"unet-pipelines quantize: {exc}", file=sys.stderr)
        return 1
    print(f"{path}: {calibration.recipe['name']}, calibrated on {len(calibration.sample)} windows of "
          f"{'x'.join(map(str, calibration.window))} from {len(calibration.cases)} cases; against the float "
          "network: " + ", ".join(f"{name} Dice {f['dice']:.4f}, volume {100 * f['volume_difference']:+.2f} %"
                                  for name, f in calibration.gate["labels"].items()))
    return 0


def _add_quantize_command(commands) -> None:
    quantize = commands.add_parser(
        "quantize", help="an OpenVINO int8 model of a bundle's network, calibrated and checked (--runtime openvino-int8)",
        description="Calibrate an int8 model on the windows the bundle's inferer cuts from validation cases "
        "(NNCF post-training quantisation), check it segments those cases as the float network does, and write "
        "it next to the weights (models/model_int8.xml, its record model_int8.json) with the check's figures in "
        "the metadata. Nothing is written when the check fails. Needs the openvino extra.",
    )
    quantize.add_argument("--bundle", required=True, help="bundle folder")
    quantize.add_argument("--input", help="the cases, as the batch job takes them (default: the bundle's `manifest`)")
    quantize.add_argument("--section", default="validation", help="manifest section (default: validation)")
    quantize.add_argument("--dataset-dir", help="base folder of the manifest's paths (default: the bundle's `dataset_dir`)")
    quantize.add_argument("--image-key", help="manifest key of each entry's image (as the batch job's)")
    quantize.add_argument("--max-windows", type=int, default=64, help="windows to calibrate on, at most")
    quantize.add_argument("--seed", type=int, default=0, help="seed of the windows drawn")
    quantize.add_argument("--min-dice", type=float, default=0.99, help="gate: Dice against the float network, per label")
    quantize.add_argument("--max-volume-difference", type=float, default=0.01,
                          help="gate: relative volume difference per label (0.01: 1 %%)")
    quantize.set_defaults(func=_quantize)


def _label_server(args: argparse.Namespace) -> int:
    import importlib.util
    import json
    import os

    from pipelines.label import prepare_app, server_command

    remote = args.studies.startswith(("http://", "https://"))
    if not remote and not os.path.isdir(args.studies):
        raise ValueError(f"--studies must be a folder of images or a DICOMweb URL, got {args.studies}")
    if importlib.util.find_spec("monailabel") is None:
        raise ValueError(
            "MONAI Label is not installed in this Python environment: `make label-server` creates and uses "
            ".venv-label (MONAI Label 0.8.5 needs pydicom 2, so it cannot share the project's .venv)"
        )
    served = prepare_app(args.app_dir, args.bundles_dir, args.bundle, refresh=args.refresh_bundles)
    if remote and args.dicomweb_modality:
        os.environ.setdefault("MONAI_LABEL_DICOMWEB_SEARCH_FILTER", json.dumps({"Modality": args.dicomweb_modality}))
    command = server_command(args.app_dir, args.studies, args.port, [p.name for p in served], host=args.host,
                             runtime=args.runtime)
    print(f"MONAI Label on http://{args.host}:{args.port}: {', '.join(p.name for p in served)} "
          f"(copies in {os.path.join(args.app_dir, 'model')})", flush=True)
    os.execv(command[0], command)  # the server runs in the foreground, in this process


def _add_label_command(commands) -> None:
    label = commands.add_parser(
        "label-server",
        help="serve the bundles from a MONAI Label server (run in .venv-label: make label-server)",
        description="Copy the bundles into a MONAI Label app folder (once: weights retrained from annotations "
        "stay there, the repository's are never changed) and start MONAI Label on 127.0.0.1 in the foreground. "
        "Point 3D Slicer's MONAI Label module or OHIF at http://127.0.0.1:PORT.",
    )
    label.add_argument("--studies", required=True, help="folder of images (NIfTI) or a DICOMweb URL")
    label.add_argument("--port", type=int, default=8000)
    label.add_argument("--host", default="127.0.0.1", help="address to listen on (default: loopback only)")
    label.add_argument("--app-dir", default="label_app", help="app folder: main.py, bundle copies, logs")
    label.add_argument("--bundles-dir", default="bundles", help="folder of the bundles to serve")
    label.add_argument("--bundle", nargs="+", help="bundle folder names to serve (default: all)")
    label.add_argument("--refresh-bundles", action="store_true", help="copy the bundles again (drops retrained weights)")
    label.add_argument("--runtime", choices=("torch", "openvino", "openvino-int8"),
                       help="where the networks run on the CPU (default: each bundle's `runtime` config id, else torch); "
                       "openvino-int8 needs each served bundle's int8 model (unet-pipelines quantize)")
    label.add_argument("--dicomweb-modality", default="MR", help="modality the DICOMweb study list shows ('' for all)")
    label.set_defaults(func=_label_server)


def _parser() -> argparse.ArgumentParser:
    from pipelines import __version__

    parser = argparse.ArgumentParser(prog="unet-pipelines", description=__doc__.splitlines()[0])
    parser.add_argument("--version", action="version", version=f"%(prog)s {__version__}")
    commands = parser.add_subparsers(dest="command", required=True)

    shapes = commands.add_parser(
        "shapes",
        help="input and output sizes of a U-Net (valid networks take only some sizes)",
        description="Print the input/output sizes of pipelines.networks.UNet for a requested output "
        "(the smallest valid input covering it) or for a given input.",
    )
    shapes.add_argument("--spatial-dims", type=int, choices=(2, 3), default=2)
    shapes.add_argument("--features", type=int, nargs="+", default=[64, 128, 256, 512, 1024])
    shapes.add_argument("--padding", choices=("valid", "same"), default="valid")
    shapes.add_argument("--output-size", type=int, nargs="+", help="wanted output size (1 value or one per axis)")
    shapes.add_argument("--input-size", type=int, nargs="+", help="input size to check (1 value or one per axis)")
    shapes.set_defaults(func=_shapes)
    _add_manifest_commands(commands)
    _add_batch_command(commands)
    _add_label_command(commands)
    _add_quantize_command(commands)
    demo = _add_demo_command(
        commands, "demo-data", "write the synthetic tumor data set (NIfTI, DICOM studies, manifest)",
        "Synthetic brain-tumor MR cases on the MNI152 anatomy shipped in nilearn: deterministic, no download. "
        "Replaces --out.", "demo_data", "data_manifests/demo_tumor.json", [24, 8, 8], 0, _demo_data)
    demo.add_argument("--no-dicom", action="store_true", help="NIfTI only")
    brain = _add_demo_command(
        commands, "demo-brain",
        "write the synthetic multi-parametric brain tumor data set (DICOM studies, BraTS layout, manifest)",
        "T1, T1c, T2 and FLAIR studies on the MNI152 anatomy shipped in nilearn, each series on its own grid, "
        "BraTS 2023 labels: deterministic, no download. Replaces --out.", "demo_brain",
        "data_manifests/demo_brain.json", [16, 3, 3], 1000, _demo_brain)
    brain.add_argument("--workers", type=int, default=None, help="processes rendering cases (default: CPUs, 4 at most)")
    return parser


def _bundle_overrides(parser: argparse.ArgumentParser, words: Sequence[str]) -> dict[str, object]:
    """``--id value`` pairs left over by the batch options: bundle overrides in the form of
    ``python -m monai.bundle run`` (``--channels "['t2f', 't1c']"``); a value reads as a Python
    literal where it is one, else as the string given."""
    overrides: dict[str, object] = {}
    words = list(words)
    while words:
        flag = words.pop(0)
        key, equals, value = flag[2:].partition("=") if flag.startswith("--") else ("", "", "")
        if not key:
            parser.error(f"unrecognized arguments: {flag} (bundle overrides are --id value pairs)")
        if not equals:
            if not words or words[0].startswith("--"):
                parser.error(f"bundle override {flag} needs a value")
            value = words.pop(0)
        try:
            overrides[key] = ast.literal_eval(value)
        except (ValueError, SyntaxError):
            overrides[key] = value
    return overrides


def main(argv: Sequence[str] | None = None) -> int:
    """Run the command line; returns the exit code (2 for a usage or input error)."""
    parser = _parser()
    args, extra = parser.parse_known_args(argv)
    if getattr(args, "command", None) == "batch":
        args.overrides = _bundle_overrides(parser, extra)
    elif extra:
        parser.error(f"unrecognized arguments: {' '.join(extra)}")
    try:
        return args.func(args)
    except (ValueError, OSError) as exc:  # input errors (pipelines.io errors are ValueErrors) and paths
        print(f"unet-pipelines {args.command}: error: {exc}", file=sys.stderr)
        return 2
