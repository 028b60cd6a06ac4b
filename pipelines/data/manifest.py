"""Data manifests in MONAI's datalist format: read safely, build from a folder, check, split by patient.

A manifest holds ``training``/``validation``/``test`` lists of cases (``image``, optional ``label``
and descriptive keys), with paths relative to a ``dataset_dir`` given at use time. Paths that are
absolute or climb out of ``dataset_dir`` are refused: a manifest can never point outside its data.
The JSON Schema is ``manifest.schema.json`` beside this module.
"""

from __future__ import annotations

import hashlib
import json
import logging
import os
import random
from collections import defaultdict
from collections.abc import Callable, Iterable, Mapping, Sequence
from dataclasses import dataclass, field
from importlib import resources
from pathlib import Path

from pipelines.io.errors import InputDataError, ManifestError
from pipelines.io.formats import image_stem, is_image_file
from pipelines.io.hashing import content_hash

__all__ = [
    "SECTIONS",
    "CheckReport",
    "build_manifest",
    "bundle_default",
    "check_manifest",
    "image_hash",
    "load_manifest",
    "manifest_schema",
    "read_manifest",
    "resolve_path",
    "split_manifest",
    "write_manifest",
]

logger = logging.getLogger(__name__)

SECTIONS = ("training", "validation", "test")
_PATH_KEYS = ("image", "label", "dicom")


def manifest_schema() -> dict:
    return json.loads(resources.files("pipelines.data").joinpath("manifest.schema.json").read_text())


def read_manifest(path: str | os.PathLike) -> dict:
    """The manifest at ``path``, validated against the schema.

    Raises:
        ManifestError: unreadable JSON or a schema violation; names the file and the offending entry.
    """
    import jsonschema

    path = Path(path)
    try:
        manifest = json.loads(path.read_text())
    except FileNotFoundError as exc:
        raise ManifestError(f"{path}: manifest not found") from exc
    except (OSError, json.JSONDecodeError) as exc:
        raise ManifestError(f"{path}: not a readable JSON manifest ({exc})") from exc
    error = jsonschema.exceptions.best_match(jsonschema.Draft7Validator(manifest_schema()).iter_errors(manifest))
    if error is not None:
        where = "/".join(str(p) for p in error.absolute_path) or "(top level)"
        raise ManifestError(f"{path}: {where}: {error.message}")
    return manifest


def resolve_path(dataset_dir: str | os.PathLike, relative: str, manifest: object = "manifest") -> Path:
    """``dataset_dir / relative``, refusing paths that are absolute or leave ``dataset_dir``."""
    root = os.path.normpath(os.path.abspath(dataset_dir))
    if os.path.isabs(relative):
        raise ManifestError(f"{manifest}: path {relative!r} is absolute; manifest paths are relative to dataset_dir")
    joined = os.path.normpath(os.path.join(root, relative))
    if os.path.commonpath([root, joined]) != root:
        raise ManifestError(f"{manifest}: path {relative!r} leaves dataset_dir {root}")
    return Path(joined)


def load_manifest(
    path: str | os.PathLike, section: str, dataset_dir: str | os.PathLike, image_key: str = "image",
    channels: Sequence[str] | None = None,
) -> list[dict]:
    """One section of a manifest with ``image``/``label`` made absolute under ``dataset_dir``.

    The drop-in for ``monai.data.load_decathlon_datalist`` in bundle configs, with schema validation
    and path-traversal protection. ``image_key`` picks another path key of each case as its
    ``image`` (the demo manifest's ``dicom``: the same case as a DICOM study); a case without it is
    an error naming the manifest and the case. An ``image`` that lists one file per channel (a BraTS
    case) stays a list, each path made absolute.

    ``channels`` (names from the cases' own ``channels`` list, a subset in any order) also gives
    each case one key per channel: its file from the ``image`` list, or, when ``image`` is one path
    (a DICOM study folder), that path for every channel, whose series a bundle's rules pick. A case
    lacking a channel is an error naming the manifest, the case and the channel.
    """
    manifest = read_manifest(path)
    if section not in SECTIONS and not isinstance(manifest.get(section), list):
        others = [k for k, v in manifest.items() if isinstance(v, list) and k not in SECTIONS]
        raise ValueError(f"`section` must be one of {SECTIONS}" + (f" or of this manifest's {others}" if others else "")
                         + f", got {section!r}")
    cases = []
    for index, case in enumerate(manifest.get(section, [])):
        entry = dict(case)
        if image_key not in entry:
            raise ManifestError(f"{path}: {section} case {entry.get('case_id', index)} has no {image_key!r} path")
        for key in {*_PATH_KEYS, image_key}:
            if isinstance(entry.get(key), list):  # one file per channel
                entry[key] = [str(resolve_path(dataset_dir, item, path)) for item in entry[key]]
            elif key in entry:
                entry[key] = str(resolve_path(dataset_dir, entry[key], path))
        entry["image"] = entry[image_key]
        if channels is not None:
            entry.update(_channel_paths(entry, channels, f"{path}: {section} case {entry.get('case_id', index)}"))
        cases.append(entry)
    return cases


def _channel_paths(entry: Mapping, channels: Sequence[str], where: str) -> dict[str, str]:
    image = entry["image"]
    if not isinstance(image, list):
        return {channel: image for channel in channels}
    named = list(entry.get("channels") or [])
    if len(named) != len(image):
        raise ManifestError(f"{where}: `image` lists {len(image)} files but `channels` names {len(named)} "
                            f"({named}); name each file's channel")
    missing = [c for c in channels if c not in named]
    if missing:
        raise ManifestError(f"{where}: no {', '.join(map(repr, missing))} channel among its {named}")
    return {channel: image[named.index(channel)] for channel in channels}


def image_hash(files: Sequence[str | os.PathLike]) -> str:
    """SHA-256 of a case's image: the file's (or study folder's) content hash, or for one file per
    channel the hash of their hashes in channel order."""
    if len(files) == 1:
        return content_hash(files[0])
    return hashlib.sha256("".join(content_hash(f) for f in files).encode()).hexdigest()


def write_manifest(manifest: Mapping, path: str | os.PathLike) -> Path:
    """Write ``manifest`` (validated) as indented JSON, atomically."""
    import jsonschema

    from pipelines.io.writers import atomic_path

    error = jsonschema.exceptions.best_match(jsonschema.Draft7Validator(manifest_schema()).iter_errors(manifest))
    if error is not None:
        raise ManifestError(f"refusing to write an invalid manifest to {path}: {error.message}")
    path = Path(path)
    with atomic_path(path) as tmp:
        tmp.write_text(json.dumps(manifest, indent=2) + "\n")
    return path


def _cases_in(folder: Path) -> list[Path]:
    """Image files (NIfTI, NRRD, MHA/MHD, PNG, TIFF) and study folders (anything else that is a folder)."""
    if not folder.is_dir():
        raise InputDataError(f"{folder}: not a folder")
    found = [p for p in sorted(folder.iterdir()) if not p.name.startswith(".")]
    return [p for p in found if p.is_dir() or is_image_file(p)]


def _progress(items: list, description: str, show: bool) -> Iterable:
    if not show:
        return items
    from tqdm import tqdm

    return tqdm(items, desc=description, unit="case")


def build_manifest(
    dataset_dir: str | os.PathLike,
    images: str = ".",
    labels: str | None = None,
    progress: bool = False,
    **load_options,
) -> tuple[dict, list[str]]:
    """Scan ``dataset_dir/images`` for cases and describe each; returns ``(manifest, problems)``.

    A case is an image file (NIfTI, NRRD, MHA/MHD) or a folder holding one DICOM study. Its
    ``case_id`` is the file stem or folder name; a label is ``dataset_dir/labels/<case_id>`` with
    any supported suffix. Each entry records ``modality``, ``shape``, ``spacing``, ``sha256`` (of
    the file or of the whole study folder) and ``patient``: a pseudonym (a hash of the DICOM
    PatientID; the case id for other formats) that ``split_manifest`` groups by. Cases that fail
    to load are left out and described in ``problems``. ``load_options`` go to ``load_volume``
    (DICOM series rules).
    """
    from pipelines.io import load_volume

    root = Path(dataset_dir)
    image_dir = resolve_path(root, images, "--images")
    label_files = {}
    if labels is not None:
        label_files = {image_stem(p): p for p in _cases_in(resolve_path(root, labels, "--labels")) if p.is_file()}
    cases, problems = [], []
    for path in _progress(_cases_in(image_dir), "scanning", progress):
        case_id = image_stem(path)
        try:
            volume = load_volume(path, **load_options)
        except (InputDataError, OSError) as exc:
            problems.append(f"{case_id}: {exc}")
            continue
        patient_id = volume.meta["identifiers"]["patient_id"]
        entry = {
            "image": os.path.relpath(path, root),
            "case_id": case_id,
            "patient": "p-" + hashlib.sha256(patient_id.encode()).hexdigest()[:12] if patient_id else case_id,
            "modality": volume.meta["modality"],
            "shape": [int(s) for s in volume.shape[1:]],
            "spacing": [round(float(s), 6) for s in volume.meta["spacing"]],
            "sha256": content_hash(path),
        }
        if case_id in label_files:
            entry["label"] = os.path.relpath(label_files[case_id], root)
        elif labels is not None:
            problems.append(f"{case_id}: no label in {labels}")
        cases.append(entry)
    return {"description": f"built from {images} by unet-pipelines manifest build", "training": cases}, problems


@dataclass
class CheckReport:
    cases: int = 0
    problems: list[str] = field(default_factory=list)

    @property
    def ok(self) -> bool:
        return not self.problems


def check_manifest(path: str | os.PathLike, dataset_dir: str | os.PathLike, progress: bool = False) -> CheckReport:
    """Every path exists, stays inside ``dataset_dir`` and loads; every label matches its image's grid;
    recorded hashes still match; no file, content or patient appears twice across cases or sections."""
    from pipelines.io import load_volume
    from pipelines.io.grid import check_same_grid

    report = CheckReport()
    try:
        manifest = read_manifest(path)
    except ManifestError as exc:
        report.problems.append(str(exc))
        return report
    entries = [(section, i, case) for section in SECTIONS for i, case in enumerate(manifest.get(section, []))]
    report.cases = len(entries)
    seen_paths: dict[Path, str] = {}
    seen_hashes: dict[str, str] = {}
    patients: dict[str, set[str]] = defaultdict(set)
    for section, i, case in _progress(entries, "checking", progress):
        where = f"{section}[{i}]"
        if "patient" in case:
            patients[case["patient"]].add(section)
        loaded = {}
        for key in _PATH_KEYS:
            if key not in case:
                continue
            paths = case[key] if isinstance(case[key], list) else [case[key]]
            try:
                files = [resolve_path(dataset_dir, item, path) for item in paths]
                for item, file in zip(paths, files):
                    if file in seen_paths:
                        report.problems.append(f"{where} {key}: {item} is also {seen_paths[file]}")
                    seen_paths[file] = f"{where} {key}"
                    loaded[f"{key} {item}" if len(paths) > 1 else key] = load_volume(file, allow_nonfinite=False)
            except (InputDataError, OSError) as exc:
                report.problems.append(f"{where} {key}: {exc}")
                continue
            if key == "image":
                digest = image_hash(files)
                if case.get("sha256") not in (None, digest):
                    report.problems.append(f"{where} image: {case[key]} changed since the manifest was built (sha256)")
                if digest in seen_hashes:
                    report.problems.append(f"{where} image: {case[key]} has the same content as {seen_hashes[digest]}")
                seen_hashes.setdefault(digest, f"{where} {case[key]}")
        volumes = [(name, volume) for name, volume in loaded.items() if name.split(" ")[0] in ("image", "label")]
        for name, volume in volumes[1:]:  # every channel and the label on the first image's grid
            try:
                check_same_grid(volumes[0][1], volume, volumes[0][0], name)
            except InputDataError as exc:
                report.problems.append(f"{where} {name}: {exc}")
    for patient, sections in sorted(patients.items()):
        if {"training", "validation"} <= sections or ("test" in sections and len(sections) > 1):
            report.problems.append(f"patient {patient} appears in {sorted(sections)}: data leak between splits")
    return report


def split_manifest(manifest: Mapping, folds: int, seed: int = 0, validation_fold: int = 0) -> dict:
    """``k`` folds of the training and validation cases, grouped by ``patient`` (or ``case_id``,
    or image path) so one patient's cases share a fold; fold ``validation_fold`` becomes
    ``validation`` and the rest ``training``. Each case gets its ``fold``; ``test`` is kept."""
    if not isinstance(folds, int) or folds < 2:
        raise ValueError(f"`folds` must be an integer >= 2, got {folds!r}")
    if not 0 <= validation_fold < folds:
        raise ValueError(f"`validation_fold` must be in [0, {folds}), got {validation_fold!r}")
    cases = [dict(c) for section in ("training", "validation") for c in manifest.get(section, [])]
    key: Callable[[dict], str] = lambda c: str(c.get("patient") or c.get("case_id") or c["image"])
    groups: dict[str, list[dict]] = defaultdict(list)
    for case in cases:
        groups[key(case)].append(case)
    if len(groups) < folds:
        raise ValueError(f"`folds` must not exceed the {len(groups)} patients, got {folds}")
    order = sorted(groups)
    random.Random(seed).shuffle(order)
    order.sort(key=lambda g: -len(groups[g]))  # largest first; the shuffle breaks ties
    sizes = [0] * folds
    for group in order:
        fold = min(range(folds), key=lambda f: (sizes[f], f))
        sizes[fold] += len(groups[group])
        for case in groups[group]:
            case["fold"] = fold
    out = {k: v for k, v in manifest.items() if k not in ("training", "validation")}
    out["training"] = [c for c in cases if c["fold"] != validation_fold]
    out["validation"] = [c for c in cases if c["fold"] == validation_fold]
    return out


def bundle_default(bundle_root: str | os.PathLike, relative: str, config_id: str) -> str:
    """A bundle config's default data path, ``relative`` to ``bundle_root``, when it exists.

    The defaults find the project's data from the bundle's place in the repository
    (``bundles/<name>``); a bundle copied elsewhere has none there, and says which id to set
    rather than failing later on a file it cannot name.

    Raises:
        FileNotFoundError: the path does not exist; the message names ``config_id`` to pass.
    """
    path = Path(bundle_root) / relative
    if not path.exists():
        raise FileNotFoundError(
            f"`{config_id}` defaults to {path}, which does not exist (the default finds the project's data from "
            f"the bundle's place in the repository); pass --{config_id} <path>"
        )
    return str(path)
