from __future__ import annotations

import base64
import csv
import io
import json
from html.parser import HTMLParser

import numpy as np
from PIL import Image

from pipelines.batch import read_records, write_reports


class _Page(HTMLParser):
    def __init__(self) -> None:
        super().__init__()
        self.tags: list[tuple[str, dict]] = []
        self.text: list[str] = []

    def handle_starttag(self, tag, attrs):
        self.tags.append((tag, dict(attrs)))

    def handle_data(self, data):
        self.text.append(data)


def _records(tmp_path):
    ok = {"case_id": "case-aaa", "status": "ok", "error": None, "volumes_ml": {"tumor": 12.5, "edema": 3.0},
          "lesion_count": 1, "largest_lesion": {"volume_ml": 15.5, "diameter_mm": 40.2, "centre_voxel": [1, 2, 3]},
          "source": {"series_instance_uid": "1.2.3"}, "timings": {"total_s": 2.0}, "dice": {"tumor": 0.9, "edema": None}}
    failed = {"case_id": "case-bbb", "status": "failed", "error": "study x: 2 DICOM series qualify <b>", "source": {}}
    for record in (ok, failed):
        (tmp_path / record["case_id"]).mkdir()
        (tmp_path / record["case_id"] / "record.json").write_text(json.dumps(record))
    Image.fromarray(np.full((300, 900, 3), 200, np.uint8)).save(tmp_path / "case-aaa" / "qc.png")
    (tmp_path / "case-ccc").mkdir()
    (tmp_path / "case-ccc" / "record.json").write_text("{ half writ")  # not a record: ignored


def test_csv_has_one_row_per_case_with_volumes(tmp_path):
    _records(tmp_path)
    csv_path, _ = write_reports(tmp_path)
    rows = list(csv.DictReader(csv_path.open()))
    assert [r["case_id"] for r in rows] == ["case-aaa", "case-bbb"]
    assert rows[0]["tumor_ml"] == "12.5" and rows[0]["largest_lesion_diameter_mm"] == "40.2"
    assert rows[0]["dice_tumor"] == "0.9" and rows[0]["dice_edema"] == ""
    assert rows[1]["status"] == "failed" and "2 DICOM series qualify" in rows[1]["error"]
    assert [r["case_id"] for r in read_records(tmp_path)] == ["case-aaa", "case-bbb"]


def test_html_is_self_contained_and_shows_every_case(tmp_path):
    _records(tmp_path)
    _, html_path = write_reports(tmp_path, title="Night run")
    page = _Page()
    page.feed(html_path.read_text())
    tags = [t for t, _ in page.tags]
    assert "link" not in tags and all("src" not in a for t, a in page.tags if t == "script")  # one file
    links = [a["href"] for t, a in page.tags if t == "a"]
    assert links == ["case-aaa/qc.png"] and (tmp_path / links[0]).is_file()  # thumbnail -> full picture
    heads = [a.get("data-column") for t, a in page.tags if t == "th"]
    assert heads[:3] == [None, "case_id", "status"] and "tumor_ml" in heads  # the QC picture first, not sortable
    rows = [a for t, a in page.tags if t == "tr" and "id" in a]
    assert [(r["id"], r["class"]) for r in rows] == [("case-aaa", "ok"), ("case-bbb", "failed")]
    images = [a["src"] for t, a in page.tags if t == "img"]
    assert len(images) == 1 and images[0].startswith("data:image/png;base64,")
    with Image.open(io.BytesIO(base64.b64decode(images[0].split(",", 1)[1]))) as thumbnail:
        assert thumbnail.size == (420, 140)
    text = "".join(page.text)
    assert "Night run" in text and "1 ok, 1 failed" in text
    assert "Study x: 2 DICOM series qualify <b>." in text  # the failed row's sentence, escaped: text, not markup
    assert [a for t, a in page.tags if t == "details"][1:] == [{}]  # the full reason under it, folded
    assert not any(p.name.startswith(".") for p in tmp_path.iterdir())  # no temporary files left


def test_thumbnail_written_with_the_case_is_inlined_as_is(tmp_path):
    _records(tmp_path)
    stored = io.BytesIO()
    Image.fromarray(np.full((50, 420, 3), 90, np.uint8)).save(stored, format="PNG")
    (tmp_path / "case-aaa" / "qc_thumbnail.png").write_bytes(stored.getvalue())
    (tmp_path / "case-aaa" / "qc.png").unlink()  # not read when the thumbnail exists
    _, html_path = write_reports(tmp_path)
    page = _Page()
    page.feed(html_path.read_text())
    (image,) = [a["src"] for t, a in page.tags if t == "img"]
    assert base64.b64decode(image.split(",", 1)[1]) == stored.getvalue()


def _chromium(page, fragment: str = "") -> tuple[str, list[str]]:
    """The page as headless Chromium leaves it after its script ran (the DOM) and its console lines."""
    import shutil
    import subprocess

    import pytest

    browser = shutil.which("chromium")
    if browser is None:
        pytest.skip("chromium not installed (make system-deps)")
    result = subprocess.run([browser, "--headless=new", "--no-sandbox", "--disable-gpu", "--disable-dev-shm-usage",
                             "--enable-logging=stderr", "--v=0", "--virtual-time-budget=5000", "--dump-dom",
                             f"{page.as_uri()}{fragment}"], capture_output=True, text=True, timeout=120, check=False)
    assert result.returncode == 0, result.stderr[-3000:]
    return result.stdout, [line for line in result.stderr.splitlines() if ":CONSOLE" in line]


def _order(dom: str) -> list[str]:
    page = _Page()
    page.feed(dom)
    return [a["id"] for t, a in page.tags if t == "tr" and "id" in a]


def test_the_report_renders_in_chromium_sorted_with_every_picture(tmp_path):
    """Headless Chromium: no console message, every QC picture loaded, rows sorted as the address
    asks (numbers as numbers, empty cells last) and by status."""
    _records(tmp_path)
    (tmp_path / "case-ddd").mkdir()
    (tmp_path / "case-ddd" / "record.json").write_text(json.dumps(
        {"case_id": "case-ddd", "status": "ok", "volumes_ml": {"tumor": 112.5, "edema": 0.9}}))
    Image.fromarray(np.full((300, 900, 3), 60, np.uint8)).save(tmp_path / "case-ddd" / "qc.png")
    _, html_path = write_reports(tmp_path)
    dom, console = _chromium(html_path)
    assert console == []
    assert dom.count('data-loaded="yes"') == 2 and 'data-loaded="no"' not in dom
    assert _order(dom) == ["case-aaa", "case-bbb", "case-ddd"]
    dom, console = _chromium(html_path, "#sort=tumor_ml:desc")
    assert console == [] and _order(dom) == ["case-ddd", "case-aaa", "case-bbb"]  # 112.5 > 12.5 as numbers
    assert 'data-column="tumor_ml" title="sort" aria-sort="descending"' in dom
    dom, _ = _chromium(html_path, "#sort=status:asc")
    assert _order(dom)[0] == "case-bbb"  # failed before ok


def test_a_picture_that_does_not_load_is_named(tmp_path):
    _records(tmp_path)
    (tmp_path / "case-aaa" / "qc_thumbnail.png").write_bytes(b"\x89PNG\r\n\x1a\n not a picture")
    _, html_path = write_reports(tmp_path)
    dom, console = _chromium(html_path)
    assert 'data-loaded="no"' in dom and "1 QC picture(s) did not load" in dom


def test_the_plot_takes_a_prior_study_from_an_earlier_run(tmp_path):
    """A study whose prior was written by an earlier run (``--prior``): the plot still shows both
    points, the prior's volumes from the comparison; a patient with one study gets no plot."""
    case = tmp_path / "case-fff"
    case.mkdir()
    comparison = {"prior_case": "case-old", "interval_days": 30, "lesion_count": {"new": 0, "gone": 1},
                  "volumes_ml": {"tumor": {"prior_ml": 20.0, "now_ml": 10.0, "change_ml": -10.0, "change_pct": -50.0}}}
    (case / "record.json").write_text(json.dumps({"case_id": "case-fff", "status": "ok", "volumes_ml": {"tumor": 10.0},
                                                  "study": {"patient": "p1", "study": "s", "day": 1000},
                                                  "comparison": comparison}))
    (tmp_path / "case-ggg").mkdir()
    (tmp_path / "case-ggg" / "record.json").write_text(json.dumps({
        "case_id": "case-ggg", "status": "ok", "volumes_ml": {"tumor": 5.0},
        "study": {"patient": "p2", "study": "t", "day": 10}, "comparison": None}))
    csv_path, html_path = write_reports(tmp_path)
    page = html_path.read_text()
    assert page.count('<svg class="timeline"') == 1
    assert "tumor: 20.0 mL, day 0 (case-old)" in page and "tumor: 10.0 mL, day 30 (case-fff)" in page
    rows = {row["case_id"]: row for row in csv.DictReader(csv_path.open())}
    assert rows["case-fff"]["tumor_change_pct"] == "-50.0" and rows["case-fff"]["gone_lesions"] == "1"
    assert rows["case-ggg"]["tumor_change_ml"] == ""


def test_a_large_run_links_its_thumbnails_to_load_as_scrolled_to(tmp_path, monkeypatch):
    """Past ``INLINE_THUMBNAIL_BYTES`` of pictures the page links each case's thumbnail in its folder
    (the address escaped) for its script to fetch near the view, with its size (a ``qc.png`` scaled to
    the thumbnails' width), so that a night of thousands of cases opens at once; Chromium loads those
    in view from the links."""
    _records(tmp_path)  # case-aaa: a qc.png of 900 x 300 only
    odd = tmp_path / "case 7#b"  # a manifest's case id
    odd.mkdir()
    (odd / "record.json").write_text(json.dumps({"case_id": "case 7#b", "status": "ok", "volumes_ml": {"tumor": 1.0}}))
    Image.fromarray(np.full((50, 420, 3), 90, np.uint8)).save(odd / "qc_thumbnail.png")
    monkeypatch.setattr("pipelines.batch.report.INLINE_THUMBNAIL_BYTES", 100)
    _, html_path = write_reports(tmp_path)
    page = _Page()
    page.feed(html_path.read_text())
    images = {a["alt"]: a for t, a in page.tags if t == "img"}
    assert images["QC of case-aaa"] == {"alt": "QC of case-aaa", "data-src": "case-aaa/qc.png", "width": "420",
                                        "height": "140"}
    assert images["QC of case 7#b"]["data-src"] == "case%207%23b/qc_thumbnail.png"
    assert (images["QC of case 7#b"]["width"], images["QC of case 7#b"]["height"]) == ("420", "50")
    assert "read from the case folders beside this page" in "".join(page.text)
    dom, console = _chromium(html_path)
    assert console == [] and dom.count('data-loaded="yes"') == 2 and 'data-loaded="no"' not in dom


def _wide_run(tmp_path):
    """Three brain studies' records as the batch job writes them (about 30 columns), one failed with
    the loader's reason for a missing series."""
    labels, regions = ("necrotic core", "edema", "enhancing tumor"), ("WT", "TC", "ET")
    for number, scale in ((1, 1.0), (2, 3.0)):
        record = {"case_id": f"brain-{number}", "status": "ok", "volumes_ml": {k: 1.5 * scale for k in labels},
                  "regions_ml": {k: 4.5 * scale for k in regions}, "lesion_count": number,
                  "largest_lesion": {"volume_ml": 4.0, "diameter_mm": 21.0},
                  "comparison": {"prior_case": "old", "interval_days": 90, "lesion_count": {"new": 1, "gone": 0},
                                 "regions_ml": {k: {"change_ml": scale, "change_pct": 10.0 * scale} for k in regions}},
                  "rano": {"sum_mm2": 429.0, "response": {"category": "PD", "rule": "a new measurable lesion"}},
                  "region_scores": {k: {"dice": 0.9, "hd95": 2.0, "lesion_dice": 0.8, "lesion_hd95": 3.0} for k in regions},
                  "timings": {"total_s": 20.0}, "source": {"study_instance_uid": "1.2." * 20}}
        (tmp_path / record["case_id"]).mkdir()
        (tmp_path / record["case_id"] / "record.json").write_text(json.dumps(record))
        Image.fromarray(np.full((280, 420, 3), 120, np.uint8)).save(tmp_path / record["case_id"] / "qc_thumbnail.png")
    series = "".join(f"\n  - series {n} 't2_{n}' (MR, 40 slices, axial, 231x280, ImageType ORIGINAL/PRIMARY/M/ND, "
                     f"UID 1.2.826.0.1.3680043.8.498.{n * 7919}): description does not match '(?i)t1.*(\\\\+c|post)'"
                     for n in range(1, 6))
    failed = {"case_id": "brain-3", "status": "failed", "error": (
        "input 't1c': study case-eb31 (/archive/2026/BraTS-DEMO-00021-000): no DICOM series matches the "
        f"selection rules:{series}")}
    (tmp_path / "brain-3").mkdir()
    (tmp_path / "brain-3" / "record.json").write_text(json.dumps(failed))


def test_each_row_shows_the_key_columns_and_the_others_are_one_click_away(tmp_path):
    """The bundle's ``report_columns`` (else the region volumes, their change, lesions and RANO) in
    each row; every other column of report.csv is in the page, hidden, listed in the column chooser."""
    _wide_run(tmp_path)
    csv_path, html_path = write_reports(tmp_path)
    page = _Page()
    page.feed(html_path.read_text())
    heads = [a for t, a in page.tags if t == "th" and "data-column" in a]
    shown = [a["data-column"] for a in heads if "hidden" not in a]
    assert shown == ["case_id", "status", "WT_ml", "TC_ml", "ET_ml", "WT_change_pct", "TC_change_pct",
                     "ET_change_pct", "lesion_count", "new_lesions", "rano_category"]
    columns = next(csv.reader(csv_path.open()))
    hidden = [a["data-column"] for a in heads if "hidden" in a]
    assert set(hidden) == set(columns) - set(shown) - {"error", "study_instance_uid", "series_instance_uid"}
    assert len(hidden) >= 15 and [a["data-show"] for t, a in page.tags if t == "input"] == hidden
    _, html_path = write_reports(tmp_path, columns=["ET_ml", "rano_sum_mm2", "no_such_column"])
    page = _Page()
    page.feed(html_path.read_text())
    assert [a["data-column"] for t, a in page.tags if t == "th" and "data-column" in a and "hidden" not in a] == \
        ["case_id", "status", "ET_ml", "rano_sum_mm2"]


def test_a_failed_study_reads_as_one_sentence_saying_what_to_do():
    from pipelines.batch.errors import headline

    missing = ("study case-1 (/a/b/c), input 't1c' (rules {'min_slices': 20}): no DICOM series matches the selection "
               "rules:\n  - series 1 'x': no\n  - series 2 'y': no")
    assert headline(missing) == ("No t1c series: none of the study's 2 series matches the t1c rule; check that the study "
                                 "holds that series, or widen its rule (the bundle's series_rules, or the batch job's "
                                 "series options).")
    assert headline("/data/site/IM0001: empty file (0 bytes)") == "IM0001: empty file (0 bytes)."
    assert headline("/d/x.dcm: unreadable DICOM file (bad)").endswith("export the study again, or remove the broken files.")
    assert headline("study x: 2 DICOM series qualify; narrow the rules:\n - a") == "Study x: 2 DICOM series qualify; narrow the rules."
    assert headline("") == "Failed, with no reason recorded."


def test_the_report_fits_a_laptop_screen_in_chromium(tmp_path):
    """At 1400 x 1000 pixels: no horizontal scrolling; the failed study's sentence visible and its
    full reason folded until asked for; a column from the chooser appears; sorting on a hidden column
    (``#sort=``) shows it; nothing is fetched from the network."""
    from tests.browser import browse, no_horizontal_scrolling

    _wide_run(tmp_path)
    _, html_path = write_reports(tmp_path)
    with browse(html_path) as browsed:
        page = browsed.page
        assert no_horizontal_scrolling(browsed)
        sentence = page.locator("tr#brain-3 .headline")
        assert sentence.is_visible() and sentence.inner_text().startswith("No t1c series: none of the study's 5 series")
        reason = page.locator("tr#brain-3 pre")
        assert not reason.is_visible()
        page.locator("tr#brain-3 summary").click()
        assert reason.is_visible() and "t2_5" in reason.inner_text()
        assert no_horizontal_scrolling(browsed)  # the reason wraps within its cell
        dice = page.locator('td[data-column="WT_dice"]').first
        assert not dice.is_visible()
        page.locator("#columns summary").click()
        page.locator('input[data-show="WT_dice"]').check()
        assert dice.is_visible() and dice.inner_text() == "0.9"
        assert browsed.errors == [] and browsed.remote == []
    with browse(html_path, "#sort=lesion_count:desc") as browsed:
        assert _order(browsed.page.content()) == ["brain-2", "brain-1", "brain-3"]
        assert browsed.page.locator('td[data-column="lesion_count"]').first.is_visible()
    with browse(html_path, "#sort=seconds:desc") as browsed:  # a hidden column: shown when sorted on
        assert browsed.page.locator('th[data-column="seconds"]').is_visible()
