"""A case's page, ``<output>/<case_id>/index.html``: its images in a viewer with the mask overlaid
(:mod:`pipelines.batch.viewer`, script ``case_page.js``), the measurements beside them, and for a
follow-up the prior study registered onto this one, side by side. One file with its images; the
viewer is the run's copy of NiiVue (``../_viewer/``)."""

from __future__ import annotations

import functools
import html
import json
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from pipelines.batch.comparison import ComparisonFailure, PriorComparison
from pipelines.batch.measures import VolumeMeasures
from pipelines.batch.viewer import PAGE_IMAGE_BYTES, VIEWER_DIR, VIEWER_FILE, PageImages

__all__ = ["PageContent", "render_case_page"]

_SCRIPT = Path(__file__).parent / "case_page.js"


@functools.cache
def _script() -> str:
    return _SCRIPT.read_text()


@dataclass(frozen=True)
class PageContent:
    """What a case page shows.

    Attributes:
        case_id: the case.
        bundle: the bundle's name.
        images: the page's images (:func:`pipelines.batch.viewer.page_images`): the sequences by
            input key, ``labels``, and ``diameters`` and ``prior``/``prior_labels`` where there are.
        sequences: input key -> its name on the page (the first shown first).
        labels: label value -> ``(name, (r, g, b))``.
        affine: the RAS affine of the label map's grid (every voxel); voxels below are of that grid.
        start: the voxel the viewer opens on.
        measures: the case's volumes and lesions.
        comparison: with the prior study, or why not, or None.
        rano: the case's RANO (:class:`pipelines.batch.outputs.rano.RanoResult`), or None.
        goto: RANO lesion number -> the voxel at the middle of its longest diameter.
    """

    case_id: str
    bundle: str
    images: PageImages
    sequences: Mapping[str, str]
    labels: Mapping[int, tuple[str, Sequence[int]]]
    affine: np.ndarray
    start: Sequence[float]
    measures: VolumeMeasures
    comparison: PriorComparison | ComparisonFailure | None = None
    rano: object | None = None
    goto: Mapping[int, Sequence[int]] | None = None


def _e(value) -> str:
    return html.escape(str(value))


def _number(value, digits: int = 2) -> str:
    return "" if value is None else f"{value:.{digits}f}".rstrip("0").rstrip(".") if isinstance(value, float) else str(value)


def _table(caption: str, heads: Sequence[str], rows: Sequence[Sequence], table_id: str) -> str:
    head = "".join(f"<th>{_e(h)}</th>" for h in heads)
    body = "".join("<tr>" + "".join(f"<td>{cell}</td>" for cell in row) + "</tr>" for row in rows)
    return f'<table id="{table_id}"><caption>{_e(caption)}</caption><tr>{head}</tr>{body}</table>'


def _volumes(content: PageContent) -> str:
    changes = content.comparison.volumes_ml if isinstance(content.comparison, PriorComparison) else {}
    region_changes = content.comparison.regions_ml if isinstance(content.comparison, PriorComparison) else {}
    rows = [[_e(name), _number(ml), _change(changes.get(name))] for name, ml in content.measures.volumes_ml.items()]
    rows += [[_e(name) + " (region)", _number(ml), _change(region_changes.get(name))]
             for name, ml in (content.measures.regions_ml or {}).items()]
    heads = ["", "mL"] + (["since prior"] if changes else [])
    return _table("Volumes", heads, [row if changes else row[:2] for row in rows], "volumes")


def _change(change) -> str:
    if change is None:
        return ""
    pct = "" if change.change_pct is None else f" ({change.change_pct:+.0f} %)"
    return _e(f"{change.change_ml:+.2f} mL{pct}")


def _lesions(content: PageContent) -> str:
    matched = {lesion.lesion: lesion for lesion in content.comparison.lesions} \
        if isinstance(content.comparison, PriorComparison) else {}
    rows = []
    for number, lesion in enumerate(content.measures.lesions, start=1):
        link = f'<a href="#" {_goto(lesion.centre_voxel, content.affine)}>{number}</a>'
        status = matched[number].status if number in matched else ""
        rows.append([link, _number(lesion.volume_ml), _number(lesion.diameter_mm, 1), _e(status)])
    heads = ["lesion", "mL", "diameter mm"] + (["vs prior"] if matched else [])
    return _table(f"Lesions ({content.measures.lesion_count}; a number shows it)", heads,
                  [row if matched else row[:3] for row in rows], "lesions")


def _mm(voxel: Sequence[float], affine: np.ndarray) -> list[float]:
    """The voxel's point in RAS mm (the viewer's coordinates: its grid is the page's images')."""
    point = np.asarray(affine, np.float64)[:3, :3] @ np.asarray(voxel, np.float64) + np.asarray(affine)[:3, 3]
    return [round(float(v), 2) for v in point]


def _goto(voxel: Sequence[float], affine: np.ndarray) -> str:
    """A ``data-goto`` attribute: where the page's script moves the viewers."""
    return f'data-goto="{_e(json.dumps(_mm(voxel, affine)))}"'


def _rano(content: PageContent) -> str:
    rano = content.rano
    if rano is None:
        return ""
    out = _rano_table(content, rano, "RANO", "rano")
    if rano.volumetric is not None:
        volumetric = rano.volumetric
        out += (f'<p id="rano-volumetric">RANO 2.0 volumetric: <b>{_e(volumetric.category)}</b>: '
                f"{_e(volumetric.rule)}.</p>")
    if rano.non_enhancing is not None:
        out += _rano_table(content, rano.non_enhancing, "Non-enhancing (FLAIR/T2, RANO-LGG style)", "rano-non-enhancing",
                           draw=False)
    return out + f'<p class="rule">{_e(rano.rule)}</p>'


def _rano_table(content: PageContent, rano, title: str, table_id: str, draw: bool = True) -> str:
    """One RANO measurement (enhancing, or non-enhancing) as a table and its response."""
    rows = []
    for lesion in rano.lesions:
        where = (content.goto or {}).get(lesion.lesion)
        link = f'<a href="#" {_goto(where, content.affine)}>{lesion.lesion}</a>' if where and draw else str(lesion.lesion)
        rows.append([link, _number(lesion.longest_mm, 1), _number(lesion.perpendicular_mm, 1),
                     _number(lesion.product_mm2, 0), "target" if lesion.lesion in rano.targets else
                     ("measurable" if lesion.measurable else _e(lesion.why or "not measurable"))])
    drawn = " (drawn in cyan and white on their slices)" if draw else ""
    table = _table(f"{title}: sum of products {rano.sum_mm2:.0f} mm²{drawn}",
                   ["lesion", "longest mm", "perpendicular mm", "product mm²", ""], rows, table_id)
    if rano.response is None:
        return table
    return table + (f'<p id="{table_id}-response"><b>{_e(rano.response.category)}</b>: {_e(rano.response.rule)}. '
                    f"Baseline {_e(rano.baseline_case)}. <i>Automated, unconfirmed assessment: the clinical criteria "
                    f"and confirmation scans are the clinician's.</i></p>")


def _prior(content: PageContent) -> str:
    comparison = content.comparison
    if isinstance(comparison, ComparisonFailure):
        return f'<p id="prior-note">Prior study {_e(comparison.prior_case)} could not be compared: {_e(comparison.error)}</p>'
    if not isinstance(comparison, PriorComparison):
        return ""
    count = comparison.lesion_count
    return (f'<p id="prior-note">Prior study {_e(comparison.prior_case)}, {comparison.interval_days} days earlier, '
            f"registered onto this one (rotation {comparison.registration.get('rotation_deg', '?')}°, "
            f"shift {comparison.registration.get('translation_mm', '?')} mm); lesions: {count.get('new', 0)} new, "
            f"{count.get('gone', 0)} gone.</p>")


def render_case_page(content: PageContent) -> str:
    """The page's HTML (see the module docstring)."""
    images = content.images
    data = {
        "images": images.images,
        "sequences": [{"key": key, "name": name} for key, name in content.sequences.items()],
        "labels": [{"value": int(value), "name": name, "rgb": [int(c) for c in rgb]}
                   for value, (name, rgb) in content.labels.items()],
        "start": _mm(content.start, content.affine),
        "prior": "prior" in images.images,
        "diameters": "diameters" in images.images,
    }
    options = "".join(f'<option value="{_e(key)}">{_e(name)}</option>' for key, name in content.sequences.items())
    toggles = "".join(f'<label><input type="checkbox" checked data-label="{int(value)}">'
                      f'<span class="swatch" style="background:rgb{tuple(int(c) for c in rgb)}"></span>{_e(name)}</label>'
                      for value, (name, rgb) in content.labels.items())
    if data["diameters"]:
        toggles += '<label><input type="checkbox" checked id="diameters">RANO diameters</label>'
    views = "".join(f'<button type="button" data-view="{view}">{name}</button>' for view, name in
                    (("AXIAL", "axial"), ("CORONAL", "coronal"), ("SAGITTAL", "sagittal"), ("MULTIPLANAR", "all three")))
    sampled = ("Every voxel is shown; " if set(images.steps) == {1} else
               f"Voxels shown: every {' x '.join(map(str, images.steps))} along the grid's axes (the page's images "
               f"are kept under {PAGE_IMAGE_BYTES / 2**20:.0f} MB; the outputs hold every voxel); ")
    windows = ", ".join(f"{content.sequences.get(key, key)} {low:.4g} to {high:.4g}"
                        for key, (low, high) in images.windows.items() if key in content.sequences)
    canvases = '<div class="canvas"><div class="box"><canvas id="viewer-now"></canvas></div><p class="label">this study</p></div>'
    if data["prior"]:
        canvases += ('<div class="canvas"><div class="box"><canvas id="viewer-prior"></canvas></div>'
                     '<p class="label">prior study, registered onto this one</p></div>')
    payload = json.dumps(data, separators=(",", ":")).replace("</", "<\\/")
    style = (
        "body{font-family:sans-serif;margin:0.6em;max-width:1380px}h1{font-size:1.3em;margin:0.2em 0}"
        "#layout{display:flex;gap:12px;align-items:flex-start}#viewers{flex:1 1 auto;min-width:0}"
        "#panel{flex:0 0 360px;font-size:0.9em}.canvases{display:flex;gap:6px}.canvas{flex:1 1 0;min-width:0}"
        ".box{height:620px;position:relative}.box canvas{width:100%;height:100%;display:block;background:#000}"
        ".label{margin:2px 0;color:#555}"
        "#controls{display:flex;flex-wrap:wrap;gap:6px 14px;align-items:center;margin:4px 0}"
        ".swatch{display:inline-block;width:0.9em;height:0.9em;margin:0 3px;vertical-align:middle}"
        "input[type=number]{width:6em}table{border-collapse:collapse;margin:6px 0;width:100%}"
        "caption{text-align:left;font-weight:bold}td,th{border:1px solid #bbb;padding:2px 5px;text-align:right}"
        "td:first-child,th:first-child{text-align:left}.rule,.note{color:#555;font-size:0.85em}"
    )
    return (
        f'<!DOCTYPE html>\n<html lang="en"><head><meta charset="utf-8"><title>{_e(content.case_id)}</title>'
        f"<style>{style}</style></head><body>"
        f'<p><a href="../report.html#{_e(content.case_id)}">&larr; report</a></p>'
        f"<h1>{_e(content.case_id)}</h1>"
        f'<div id="layout"><div id="viewers">'
        f'<div id="controls"><label>sequence <select id="sequence">{options}</select></label>{views}'
        f'<label>overlay <input type="range" id="opacity" min="0" max="1" step="0.05" value="0.5"></label>'
        f"{toggles}"
        f'<label>window <input type="number" id="window-low" step="any"> to '
        f'<input type="number" id="window-high" step="any"></label></div>'
        f'<div class="canvases">{canvases}</div><p id="viewer-status">loading the viewer</p>'
        f'<p class="note">Scroll on an image to move through the slices, click to go to a point, drag with the right '
        f"button to change the window. {sampled}intensities at 256 levels between {_e(windows)} (the 0.5th and 99.5th "
        f"percentiles). Segmented by {_e(content.bundle)}.</p>"
        f'</div><div id="panel">{_prior(content)}{_volumes(content)}{_lesions(content)}{_rano(content)}</div></div>'
        f'<script type="application/json" id="case-data">{payload}</script>'
        f'<script src="../{VIEWER_DIR}/{VIEWER_FILE}"></script>'
        f"<script>\n{_script()}</script></body></html>\n"
    )
