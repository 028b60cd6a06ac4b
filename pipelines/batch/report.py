"""Run-level reports from the cases' ``record.json`` files: ``report.csv`` and ``report.html``."""

from __future__ import annotations

import base64
import csv
import html
import io
import json
import os
from pathlib import Path

from PIL import Image

from pipelines.batch.qc import qc_thumbnail
from pipelines.io.writers import atomic_path

__all__ = ["read_records", "write_reports"]


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
    for name, value in (record.get("dice") or {}).items():
        row[f"dice_{name}"] = "" if value is None else value
    for name, scores in (record.get("region_scores") or {}).items():
        for measure in ("dice", "hd95", "lesion_dice", "lesion_hd95"):
            row[f"{name}_{measure}"] = scores.get(measure, "")
    row["seconds"] = (record.get("timings") or {}).get("total_s", "")
    return row


def write_reports(output_dir: str | os.PathLike, title: str = "Segmentation batch report") -> tuple[Path, Path]:
    """Write ``report.csv`` and a self-contained ``report.html`` (QC thumbnails inlined) for every
    case recorded under ``output_dir``; both atomically. Returns their paths."""
    output_dir = Path(output_dir)
    records = read_records(output_dir)
    names = {field: _names(records, field) for field, _ in _MEASURES}
    rows = [_row(r, names) for r in records]
    columns: list[str] = []
    for row in rows:
        columns.extend(k for k in row if k not in columns)
    csv_path, html_path = output_dir / "report.csv", output_dir / "report.html"
    with atomic_path(csv_path) as tmp, open(tmp, "w", newline="") as handle:
        writer = csv.DictWriter(handle, fieldnames=columns or ["case_id", "status"], restval="")
        writer.writeheader()
        writer.writerows(rows)
    with atomic_path(html_path) as tmp:
        tmp.write_text(_html(output_dir, records, rows, columns, title), encoding="utf-8")
    return csv_path, html_path


def _thumbnail(case_dir: Path) -> str | None:
    """The case's QC thumbnail as a data URI: ``qc_thumbnail.png`` as written with the case, else
    made from ``qc.png`` (cases written without one)."""
    try:
        if (case_dir / "qc_thumbnail.png").is_file():
            data = (case_dir / "qc_thumbnail.png").read_bytes()
        elif (case_dir / "qc.png").is_file():
            with Image.open(case_dir / "qc.png") as picture:
                buffer = io.BytesIO()
                qc_thumbnail(picture.convert("RGB")).save(buffer, format="PNG", compress_level=3)
            data = buffer.getvalue()
        else:
            return None
    except OSError:
        return None
    return "data:image/png;base64," + base64.b64encode(data).decode("ascii")


# Sorting (click a column heading; ``#sort=<column>:asc|desc`` in the address sorts on opening, so a
# sorted view can be shared) and a check that every picture shows (``data-loaded`` on each image; a
# picture that does not load is named above the table). Inline: the page stays one file.
_SCRIPT = """
(function () {
  var table = document.getElementById("cases"), body = table.tBodies[0];
  var heads = Array.prototype.slice.call(table.tHead.rows[0].cells).filter(function (h) {
    return h.hasAttribute("data-column");
  });
  function key(row, index) {
    var text = row.cells[index].getAttribute("data-value");
    if (text === null) { text = row.cells[index].textContent; }
    text = text.trim();
    return text === "" ? null : (/^-?\\d+(\\.\\d+)?(e[-+]?\\d+)?$/i.test(text) ? parseFloat(text) : text);
  }
  function sortBy(name, order) {
    var head = heads.find(function (h) { return h.getAttribute("data-column") === name; });
    if (!head) { return; }
    var index = head.cellIndex;
    var rows = Array.prototype.slice.call(body.rows), sign = order === "desc" ? -1 : 1;
    rows.sort(function (a, b) {
      var x = key(a, index), y = key(b, index);
      if (x === y) { return 0; }
      if (x === null) { return 1; }
      if (y === null) { return -1; }
      if (typeof x !== typeof y) { return typeof x === "number" ? -1 : 1; }
      return (x < y ? -1 : 1) * sign;
    });
    rows.forEach(function (row) { body.appendChild(row); });
    heads.forEach(function (h) { h.removeAttribute("aria-sort"); });
    head.setAttribute("aria-sort", order === "desc" ? "descending" : "ascending");
  }
  heads.forEach(function (h) {
    h.addEventListener("click", function () {
      var order = h.getAttribute("aria-sort") === "ascending" ? "desc" : "asc";
      sortBy(h.getAttribute("data-column"), order);
      history.replaceState(null, "", "#sort=" + h.getAttribute("data-column") + ":" + order);
    });
  });
  var wanted = /^#sort=([^:]+):(asc|desc)$/.exec(decodeURIComponent(location.hash));
  if (wanted) { sortBy(wanted[1], wanted[2]); }
  function checked(image) {
    image.setAttribute("data-loaded", image.complete && image.naturalWidth > 0 ? "yes" : "no");
    var broken = document.querySelectorAll("img[data-loaded=no]").length;
    var note = document.getElementById("pictures");
    note.textContent = broken ? broken + " QC picture(s) did not load" : "";
  }
  Array.prototype.forEach.call(document.images, function (image) {
    if (image.complete) { checked(image); }
    else {
      image.addEventListener("load", function () { checked(image); });
      image.addEventListener("error", function () { checked(image); });
    }
  });
})();
"""


def _html(output_dir: Path, records: list[dict], rows: list[dict], columns: list[str], title: str) -> str:
    failed = sum(r.get("status") != "ok" for r in records)
    shown = [c for c in columns if c not in ("case_id", "status", "error", "study_instance_uid", "series_instance_uid")]
    head = "".join(f'<th data-column="{html.escape(c)}" title="sort">{html.escape(label)}</th>'
                   for c, label in [("case_id", "case"), ("status", "status"), *((c, c) for c in shown)])
    head += "<th>QC</th>"
    body = []
    for record, row in zip(records, rows):
        case = str(record.get("case_id", ""))
        status = str(record.get("status", ""))
        thumb = _thumbnail(output_dir / case) if status == "ok" else None
        if thumb:
            full = f"{case}/qc.png" if (output_dir / case / "qc.png").is_file() else None
            image = f'<img alt="QC of {html.escape(case)}" src="{thumb}">'
            qc = f'<a href="{html.escape(full)}" title="the full QC picture">{image}</a>' if full else image
        else:
            qc = html.escape(row["error"])
        cells = "".join(f"<td>{html.escape(str(row.get(c, '')))}</td>" for c in shown)
        body.append(f'<tr class="{html.escape(status)}" id="{html.escape(case)}"><td>{html.escape(case)}</td>'
                    f"<td>{html.escape(status)}</td>{cells}<td>{qc}</td></tr>")
    style = (
        "body{font-family:sans-serif;margin:1em}table{border-collapse:collapse}"
        "td,th{border:1px solid #bbb;padding:4px 6px;vertical-align:top;text-align:right}"
        "th[data-column]{cursor:pointer}th[aria-sort=ascending]::after{content:' \\25B2'}"
        "th[aria-sort=descending]::after{content:' \\25BC'}#pictures{color:#b00}"
        "tr.failed{background:#fde2e2}tr.failed td:last-child{text-align:left;max-width:40em}img{display:block}"
    )
    return (
        f'<!DOCTYPE html>\n<html lang="en"><head><meta charset="utf-8"><title>{html.escape(title)}</title>'
        f"<style>{style}</style></head><body><h1>{html.escape(title)}</h1>"
        f"<p>{len(records)} cases: {len(records) - failed} ok, {failed} failed. Volumes in mL, section areas in "
        f"pixels; QC pictures of volumes are axial | coronal | sagittal through the largest lesion "
        f"(radiological view; a thumbnail opens the full picture). Click a column heading to sort.</p>"
        f'<p id="pictures"></p>'
        f'<table id="cases"><thead><tr>{head}</tr></thead><tbody>{"".join(body)}</tbody></table>'
        f"<script>{_SCRIPT}</script></body></html>\n"
    )
