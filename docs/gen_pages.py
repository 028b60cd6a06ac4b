"""Pages generated when the site is built (mkdocs-gen-files): the command-line reference from the
argparse parsers, the metadata keys from ``bundles/metadata.schema.json``, each bundle's own
``docs/README.md`` and one API page per subpackage. None of them is written by hand, so none can
drift from the code it describes."""

from __future__ import annotations

import argparse
import json
from pathlib import Path

import mkdocs_gen_files

from pipelines import cli

ROOT = Path(__file__).resolve().parent.parent
BUNDLES = ("unet2d_isbi2012", "unet3d_tumor", "unet3d_brain_tumor")
API = {
    "networks": "The U-Net and its CPU inference kernels.",
    "inference": "Overlap-tile and Gaussian sliding-window inferers, test-time augmentation.",
    "io": "Loading DICOM and image files with their geometry; writing NIfTI, DICOM SEG, SR and RTSTRUCT.",
    "transforms": "Dictionary transforms for bundle configs.",
    "losses": "Losses.",
    "metrics": "BraTS scores, the ISBI 2012 measures, metric handlers.",
    "data": "Manifests (MONAI datalists) and BraTS folders.",
    "engines": "Training helpers: resume, tracking, fine-tuning.",
    "runtime": "Process-wide CPU settings.",
    "batch": "The batch job.",
    "label": "The MONAI Label app.",
    "demo": "The synthetic demo data.",
}


def _flags(parser: argparse.ArgumentParser, action: argparse.Action) -> str:
    """The flags as ``--help`` writes them (``--study-uid UID``)."""
    return ", ".join(f"`{part}`" for part in parser._get_formatter()._format_action_invocation(action).split(", "))


def _cell(text: str) -> str:
    return " ".join(text.split()).replace("|", "\\|")


def _command(out, parser: argparse.ArgumentParser, name: str, level: int) -> None:
    out.write(f"{'#' * level} `{name}`\n\n")
    if parser.description:
        out.write(parser.description + "\n\n")
    usage = parser.format_usage().removeprefix("usage: ").strip()
    out.write(f"```text\n{usage}\n```\n\n")
    rows = []
    for action in parser._actions:
        if isinstance(action, (argparse._HelpAction, argparse._SubParsersAction)):
            continue
        default = "" if action.default in (None, False, argparse.SUPPRESS) or action.required else action.default
        help_text = (action.help or "") % {"prog": parser.prog} if action.help else ""
        rows.append(f"| {_flags(parser, action)} | {'yes' if action.required else ''} | {_cell(str(default))} | {_cell(help_text)} |")
    if rows:
        out.write("| option | required | default | what |\n|---|---|---|---|\n" + "\n".join(rows) + "\n\n")
    if name.endswith("batch"):
        out.write("Other `--id value` pairs are bundle overrides (the ids of the bundle's inference config).\n\n")
        out.write(f"{'#' * (level + 1)} Exit codes\n\n| code | when |\n|---|---|\n")
        out.write("\n".join(f"| {code} | {_cell(why)} |" for code, why in cli.BATCH_EXIT_CODES.items()) + "\n\n")
    for action in parser._actions:
        if isinstance(action, argparse._SubParsersAction):
            for sub_name, sub in action.choices.items():
                _command(out, sub, f"{name} {sub_name}", min(level + 1, 4))


def cli_page() -> None:
    parser = cli._parser()
    with mkdocs_gen_files.open("reference/cli.md", "w") as out:
        out.write("# Command line\n\nGenerated from the parsers in `pipelines/cli.py` when the site is built. "
                  "`unet-pipelines` and `python -m pipelines` are the same command; `--help` prints the same text.\n\n")
        _command(out, parser, "unet-pipelines", 2)


def _type(schema: dict) -> str:
    if "$ref" in schema:
        return schema["$ref"].rsplit("/", 1)[-1]
    kind = schema.get("type", "")
    return " or ".join(kind) if isinstance(kind, list) else kind


def metadata_page() -> None:
    schema = json.loads((ROOT / "bundles" / "metadata.schema.json").read_text())
    required = set(schema["required"])
    with mkdocs_gen_files.open("reference/metadata.md", "w") as out:
        out.write("# Metadata keys\n\nThe keys of a bundle's `configs/metadata.json`, generated from "
                  "`bundles/metadata.schema.json`, which the tests validate every bundle against "
                  "(also with `python -m monai.bundle verify_metadata`). MONAI's specification defines the first "
                  "group; the project reads the keys marked *project*. One of `required_packages_version` and "
                  "`optional_packages_version` is required.\n\n")
        out.write("| key | required | type | what |\n|---|---|---|---|\n")
        for key, prop in schema["properties"].items():
            need = "yes" if key in required else ("project" if prop.get("x-project") else "")
            out.write(f"| `{key}` | {need} | {_type(prop)} | {_cell(prop.get('description', ''))} |\n")


def bundle_pages() -> None:
    for name in BUNDLES:
        source = ROOT / "bundles" / name / "docs" / "README.md"
        with mkdocs_gen_files.open(f"bundles/{name}.md", "w") as out:
            out.write(source.read_text())
        mkdocs_gen_files.set_edit_path(f"bundles/{name}.md", f"../bundles/{name}/docs/README.md")


def api_pages() -> None:
    with mkdocs_gen_files.open("reference/api/index.md", "w") as out:
        out.write("# API\n\nGenerated from the docstrings. Each subpackage lists what it exports (`__all__`).\n\n")
        out.write("\n".join(f"- [`pipelines.{pkg}`]({pkg}.md): {what}" for pkg, what in API.items()) + "\n")
    for pkg, what in API.items():
        with mkdocs_gen_files.open(f"reference/api/{pkg}.md", "w") as out:
            out.write(f"# `pipelines.{pkg}`\n\n{what}\n\n::: pipelines.{pkg}\n")


cli_page()
metadata_page()
bundle_pages()
api_pages()
