"""Run-level reports from the cases' ``record.json`` files: ``report.csv`` and ``report.html``.

``report.html`` holds the cases' QC thumbnails while they come to at most
:data:`INLINE_THUMBNAIL_BYTES` together: one file, to mail or move. A larger run's page links each
case's thumbnail in the case folders beside it, loaded as it is scrolled to: thousands of cases
inlined make a page of hundreds of MB that no browser opens quickly (docs/benchmarks.md, "The batch
job at scale").
"""

from __future__ import annotations

import base64
import csv
import functools
import html
import io
import json
import os
from pathlib import Path
from urllib.parse import quote

from PIL import Image

from pipelines.batch.errors import headline
from pipelines.batch.outputs.page import PAGE_FILE
from pipelines.batch.qc import THUMBNAIL_WIDTH, qc_thumbnail
from pipelines.batch.timelines import plot as volume_plot
from pipelines.batch.timelines import timelines as patient_timelines
from pipelines.io.writers import atomic_path

__all__ = ["INLINE_THUMBNAIL_BYTES", "key_columns", "read_records", "write_reports"]

INLINE_THUMBNAIL_BYTES = 32 * 2**20  # the most QC picture bytes report.html holds; beyond, it links them


def read_records(output_dir: str | os.PathLike) -> list[dict]:
    """Every ``<output_dir>/<case>/record.json``, sorted by case id (unreadable ones are skipped)."""
    records = []
    for path in sorted(Path(output_dir).glob("*/record.json")):
        try:
            records.append(json.loads(path.read_text()))
        except (OSError, ValueError):
            continue  # a record is written atomically; an unreadable one is not ours
    return sorted(records, key=lambda r: str(r.get("case_id")))


def _names(records: list[dict], field: str) -> list[str]:
    """The names under ``field`` (a per-label or per-region mapping) over all records, in order met."""
    names: list[str] = []
    for record in records:
        for name in record.get(field) or {}:
            if name not in names:
                names.append(name)
    return names


# per-name measures a record may hold (volumes for 3D volumes, areas and objects for 2D sections)
_MEASURES = (("volumes_ml", "{}_ml"), ("regions_ml", "{}_ml"), ("areas_px", "{}_px"),
             ("area_fractions", "{}_fraction"), ("objects", "{}_objects"))


def _row(record: dict, names: dict[str, list[str]]) -> dict:
    row = {
        "case_id": record.get("case_id", ""),
        "status": record.get("status", ""),
        "error": record.get("error") or "",
        "study_instance_uid": (record.get("source") or {}).get("study_instance_uid", ""),
        "series_instance_uid": (record.get("source") or {}).get("series_instance_uid", ""),
    }
    for field, column in _MEASURES:
        for name in names[field]:
            value = (record.get(field) or {}).get(name)
            row[column.format(name)] = "" if value is None else value
    if names["volumes_ml"]:  # lesions are measured in volumes
        largest = record.get("largest_lesion") or {}
        row["lesion_count"] = record.get("lesion_count", "")
        row["largest_lesion_ml"] = largest.get("volume_ml", "")
        row["largest_lesion_diameter_mm"] = largest.get("diameter_mm", "")
    comparison = record.get("comparison")
    if comparison:  # the change since the prior study (pipelines.batch.priors)
        row["prior_case"] = comparison.get("prior_case", "")
        row["interval_days"] = comparison.get("interval_days", "")
        if "error" in comparison:  # the prior's files could not be compared
            row["comparison_error"] = comparison["error"]
        for field in ("volumes_ml", "regions_ml"):
            for name, change in (comparison.get(field) or {}).items():
                row[f"{name}_change_ml"] = change.get("change_ml", "")
                row[f"{name}_change_pct"] = "" if change.get("change_pct") is None else change["change_pct"]
        row["new_lesions"] = (comparison.get("lesion_count") or {}).get("new", "")
        row["gone_lesions"] = (comparison.get("lesion_count") or {}).get("gone", "")
    rano = record.get("rano")
    if rano:  # RANO's sum of products and, against earlier studies, the category (pipelines.metrics.rano)
        response = rano.get("response") or {}
        row["rano_sum_mm2"] = rano.get("sum_mm2", "")
        row["rano_category"] = response.get("category", "")
        row["rano_rule"] = response.get("rule", "")
        row["rano_volumetric_category"] = (response.get("volumetric") or {}).get("category", "")
        if rano.get("non_enhancing"):  # RANO-LGG style, the FLAIR/T2 hyperintensity
            row["rano_non_enhancing_sum_mm2"] = rano["non_enhancing"].get("sum_mm2", "")
            row["rano_non_enhancing_category"] = (rano["non_enhancing"].get("response") or {}).get("category", "")
    for name, value in (record.get("dice") or {}).items():
        row[f"dice_{name}"] = "" if value is None else value
    for name, scores in (record.get("region_scores") or {}).items():
        for measure in ("dice", "hd95", "lesion_dice", "lesion_hd95"):
            row[f"{name}_{measure}"] = scores.get(measure, "")
    row["seconds"] = (record.get("timings") or {}).get("total_s", "")
    return row


def write_reports(output_dir: str | os.PathLike, title: str = "Segmentation batch report",
                  columns: list[str] | None = None) -> tuple[Path, Path]:
    """Write ``report.csv`` and a self-contained ``report.html`` (QC thumbnails inlined) for every
    case recorded under ``output_dir``; both atomically. ``columns``: those each row of the page shows
    (:func:`key_columns`). Returns their paths."""
    output_dir = Path(output_dir)
    records = read_records(output_dir)
    names = {field: _names(records, field) for field, _ in _MEASURES}
    rows = [_row(r, names) for r in records]
    wanted, columns = columns, []
    for row in rows:
        columns.extend(k for k in row if k not in columns)
    csv_path, html_path = output_dir / "report.csv", output_dir / "report.html"
    with atomic_path(csv_path) as tmp, open(tmp, "w", newline="") as handle:
        writer = csv.DictWriter(handle, fieldnames=columns or ["case_id", "status"], restval="")
        writer.writeheader()
        writer.writerows(rows)
    with atomic_path(html_path) as tmp:
        shown = key_columns(names, columns, wanted)
        tmp.write_text(_html(output_dir, records, rows, columns, title, shown), encoding="utf-8")
    return csv_path, html_path


def _picture(case_dir: Path) -> Path | None:
    """The case's picture for the report: ``qc_thumbnail.png``, else ``qc.png`` (cases written
    without a thumbnail), else None."""
    for name in ("qc_thumbnail.png", "qc.png"):
        if (case_dir / name).is_file():
            return case_dir / name
    return None


def _thumbnail(picture: Path) -> str | None:
    """A case's :func:`_picture` as a data URI: ``qc_thumbnail.png`` as written with the case, or a
    thumbnail made from ``qc.png`` (None when it cannot be read)."""
    try:
        if picture.name == "qc_thumbnail.png":
            data = picture.read_bytes()
        else:
            with Image.open(picture) as opened:
                buffer = io.BytesIO()
                qc_thumbnail(opened.convert("RGB")).save(buffer, format="PNG", compress_level=3)
            data = buffer.getvalue()
    except OSError:
        return None
    return "data:image/png;base64," + base64.b64encode(data).decode("ascii")


def _image(case: str, picture: Path, inline: bool) -> str | None:
    """A case's ``<img>`` of its :func:`_picture`: inlined, or linked from its folder (relative to
    the page) under ``data-src``, which the page's script fetches as it comes near the view, its size
    given so that the rows keep their height meanwhile (a ``qc.png`` scaled to the thumbnails' width)."""
    alt = f'alt="QC of {html.escape(case)}"'
    if inline:
        thumb = _thumbnail(picture)
        return f'<img {alt} src="{thumb}">' if thumb else None
    size = ""
    try:
        with Image.open(picture) as opened:  # reads the header only
            width, height = opened.size
        if width > THUMBNAIL_WIDTH:
            width, height = THUMBNAIL_WIDTH, max(1, height * THUMBNAIL_WIDTH // width)
        size = f' width="{width}" height="{height}"'
    except OSError:
        pass  # linked all the same: the page names a picture that does not load
    return f'<img {alt} data-src="{html.escape(quote(case))}/{picture.name}"{size}>'


# Sorting (click a column heading; ``#sort=<column>:asc|desc`` in the address sorts on opening, so a
# sorted view can be shared), linked thumbnails (``data-src``) fetched when they come within 1,000 px
# of the view (``loading="lazy"`` alone is not enough: headless browsers fetch every such picture
# before the page counts as loaded), and a check that every picture shown loads (``data-loaded`` on
# each; a picture that does not load is named above the table). Inline: the page stays one file.
_SCRIPT = Path(__file__).parent / "report.js"


@functools.cache
def _script() -> str:
    """The page's script, read once, when a report is first written (not when the module is imported)."""
    return _SCRIPT.read_text()



_LINKED = "; the thumbnails are read from the case folders beside this page, as they are scrolled to"
_IDENTITY = ("case_id", "status", "error", "study_instance_uid", "series_instance_uid")


def key_columns(names: dict[str, list[str]], columns: list[str], wanted: list[str] | None = None) -> list[str]:
    """The columns each row shows (the others are one click away): ``wanted`` (the bundle's
    ``report_columns``) where the records have them; by default the region volumes (else the label
    volumes, or a section's area fractions; 4 at most), their change since the prior in percent, the
    lesion count, new lesions and the RANO category. ``names``: per measure field the names met."""
    if wanted is None:
        volumes = [f"{n}_ml" for n in names["regions_ml"] or names["volumes_ml"]][:4]
        wanted = [*volumes, *(f"{c[:-3]}_change_pct" for c in volumes),
                  *(f"{n}_fraction" for n in names["area_fractions"][:4]), "lesion_count", "new_lesions", "rano_category"]
    return [c for c in wanted if c in columns]


def _cell(row: dict, column: str, hidden: bool) -> str:
    value = html.escape(str(row.get(column, "")))
    return f'<td data-column="{html.escape(column)}"{" hidden" if hidden else ""}>{value}</td>'


def _failure(reason: str) -> str:
    """A failed row's picture cell: the reason in one sentence, the full reason folded under it."""
    return (f'<p class="headline">{html.escape(headline(reason))}</p>'
            f"<details><summary>full reason</summary><pre>{html.escape(reason)}</pre></details>")


def _html(output_dir: Path, records: list[dict], rows: list[dict], columns: list[str], title: str,
          shown: list[str]) -> str:
    failed = sum(r.get("status") != "ok" for r in records)
    measured = [c for c in columns if c not in _IDENTITY]
    more = [c for c in measured if c not in shown]
    order = [*shown, *more]
    head = '<th class="qc">QC</th>' + "".join(
        f'<th data-column="{html.escape(c)}" title="sort"{" hidden" if c in more else ""}>{html.escape(label)}</th>'
        for c, label in [("case_id", "case"), ("status", "status"), *((c, c.replace("_", " ")) for c in order)])
    timelines = patient_timelines(records)
    plots = any(len(points) > 1 for points in timelines.values())
    head += "<th>volumes over time</th>" if plots else ""
    pictures = {str(r.get("case_id", "")): _picture(output_dir / str(r.get("case_id", "")))
                for r in records if r.get("status") == "ok"}
    inline = sum(p.stat().st_size for p in pictures.values() if p is not None) <= INLINE_THUMBNAIL_BYTES
    body = []
    for record, row in zip(records, rows):
        case = str(record.get("case_id", ""))
        status = str(record.get("status", ""))
        page = f"{quote(case)}/{PAGE_FILE}" if PAGE_FILE in (record.get("outputs") or []) else None
        picture = pictures.get(case) if status == "ok" else None
        image = _image(case, picture, inline) if picture is not None else None
        if status != "ok":
            qc = _failure(row["error"])
        elif image:
            full = page or (f"{quote(case)}/qc.png" if (output_dir / case / "qc.png").is_file() else None)
            what = "the case page: scroll the study with the segmentation" if page else "the full QC picture"
            qc = f'<a href="{html.escape(full)}" title="{what}">{image}</a>' if full else image
        else:
            qc = ""
        name = f'<a href="{html.escape(page)}">{html.escape(case)}</a>' if page else html.escape(case)
        cells = "".join(_cell(row, c, c in more) for c in order)
        plot = ""
        if plots:
            points = timelines.get((record.get("study") or {}).get("patient"), [])
            day = (record.get("study") or {}).get("day")
            upto = [p for p in points if day is not None and p[0] <= day]
            plot = f"<td>{volume_plot(upto, case) if len(upto) > 1 else ''}</td>"
        body.append(f'<tr class="{html.escape(status)}" id="{html.escape(case)}"><td class="qc">{qc}</td>'
                    f'<td data-column="case_id">{name}</td><td data-column="status">{html.escape(status)}</td>'
                    f"{cells}{plot}</tr>")
    chooser = "".join(f'<label><input type="checkbox" data-show="{html.escape(c)}">{html.escape(c)}</label>'
                      for c in more)
    style = (
        "body{font-family:sans-serif;margin:0.6em}table{border-collapse:collapse}"
        "td,th{border:1px solid #bbb;padding:3px 5px;vertical-align:top;text-align:right}"
        "th{font-size:0.85em;max-width:7em}th[data-column]{cursor:pointer}"
        "th[aria-sort=ascending]::after{content:' \\25B2'}th[aria-sort=descending]::after{content:' \\25BC'}"
        "#pictures{color:#b00}td.qc{width:420px;text-align:left}td[data-column=case_id]{text-align:left;word-break:break-all}"
        "tr.failed{background:#fde2e2}.headline{margin:0;max-width:420px}pre{white-space:pre-wrap;word-break:break-all;"
        "max-width:420px;font-size:0.8em}img{display:block}#columns label{display:inline-block;margin-right:1em}"
    )
    return (
        f'<!DOCTYPE html>\n<html lang="en"><head><meta charset="utf-8"><title>{html.escape(title)}</title>'
        f"<style>{style}</style></head><body><h1>{html.escape(title)}</h1>"
        f"<p>{len(records)} cases: {len(records) - failed} ok, {failed} failed. Volumes in mL, section areas in "
        f"pixels; QC pictures of volumes are axial | coronal | sagittal through the largest lesion "
        f"(radiological view; a picture or a case name opens the case page, where the study scrolls with the "
        f"segmentation{'' if inline else _LINKED}). Changes are since the patient's prior study; the plot shows the "
        f"patient's volumes up to each study. Click a column heading to sort.</p>"
        f'<details id="columns"><summary>{len(more)} more columns</summary>{chooser}</details>'
        f'<p id="pictures"></p>'
        f'<table id="cases"><thead><tr>{head}</tr></thead><tbody>{"".join(body)}</tbody></table>'
        f"<script>\n{_script()}</script></body></html>\n"
    )
