"""The batch job at scale: thousands of small DICOM studies through the real command line.

Small studies (32 x 32 x 16 voxels at 2.5 mm, one MR series each, a patient each) and a tiny network
(the tumor bundle's configs with ``--features "[4, 8, 16, 32]" --patch_size "[32, 32, 16]"`` and
random weights of that shape) make inference cheap, so that what the job itself spends per case
shows. The job runs as a subprocess (``python -m pipelines batch``), watched from here:

- **Overhead per case** outside inference: the cases in the order their ``record.json`` files were
  written (mtime); a case's wall time is the time from the previous record to its own (the job's
  period, loading, preprocessing and writing included as far as they are not hidden behind the
  network), its overhead that wall time minus its record's ``timings.inference_s`` (the network's
  sliding-window pass and the bundle's postprocessing, on the main thread). Median and p99 over the
  first and the last ``--window`` cases (the first case, which follows the model's loading, left
  out), with the medians of the record's own stage timings beside them. Wall time follows whatever
  else the machine runs; the CPU time per case of the job and its loader process (from
  ``/proc/<pid>/stat``, over the same windows) much less so.
- **Memory**: ``VmRSS`` of the batch process and the sum of its child processes' (the loader), read
  from ``/proc`` every ``--sample-s`` seconds, keyed by the number of records written by then; the
  largest sample while the first window's last 10 records were being written, and the last 10 of all
  (before the reports), and ``VmHWM`` (the process's peak).
- **Reports**: ``write_reports`` on the finished folder, timed here, and report.html's size.
- **report.html at ``--report-rows`` rows** (3,000): the run's records and QC thumbnails repeated to
  that many cases, the report written and opened in headless Chromium (the flags of
  ``tests/batch/test_report.py``) through a page that frames it and notes, when the frame's load
  event fires, the milliseconds since navigation and the time a forced layout of the frame takes.
- **Resume**: a second run into a fresh folder is killed with SIGKILL once half the records exist
  (the batch process alone, as the out-of-memory killer would: its loader process is counted if it
  is still running 10 s later, then ended), then run again; its time to finish, and whether any
  record that existed at the kill was written again (its inode and mtime compared): a finished case
  must not be redone.

Goals (issue 29): overhead at the end within 10 % of the start, memory growth under 10 %, the report
of 3,000 rows open in under 3 s, no finished case redone on resume. Figures: docs/benchmarks.md.
"""

from __future__ import annotations

import argparse
import itertools
import json
import os
import re
import shutil
import signal
import statistics
import subprocess
import sys
import tempfile
import threading
import time
from concurrent.futures import ProcessPoolExecutor
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import torch
from monai.bundle import ConfigParser

from pipelines.batch import write_reports
from pipelines.batch.cases import pseudonym
from pipelines.demo.dataset import write_dicom_series

ROOT = Path(__file__).resolve().parents[1]
SHAPE = (32, 32, 16)
SPACING_MM = 2.5
OVERRIDES = {"features": "[4, 8, 16, 32]", "patch_size": "[32, 32, 16]"}
_CLOCK_TICKS = os.sysconf("SC_CLK_TCK")
CHROMIUM_FLAGS = ("--headless=new", "--no-sandbox", "--disable-gpu", "--disable-dev-shm-usage")


def _study(task: tuple[int, Path]) -> None:
    """One study: a bright ellipsoid (the head) with a brighter sphere in it, and noise (real MR has
    some: QC thumbnails compress as a scan's do), written by the demo's DICOM writer."""
    index, folder = task
    rng = np.random.default_rng(index)
    x, y, z = np.meshgrid(*(np.arange(n) - (n - 1) / 2 for n in SHAPE), indexing="ij")
    head = (x / 14) ** 2 + (y / 12) ** 2 + (z / 7) ** 2 < 1
    lesion = (x - 4) ** 2 + (y + 3) ** 2 + (z * 2) ** 2 < 25
    image = 60 + 900 * head + 700 * lesion + rng.normal(0, 40, SHAPE)
    write_dicom_series(np.clip(image, 0, 4095).astype(np.uint16), np.diag([SPACING_MM] * 3 + [1.0]), folder,
                       patient_id=f"SCALE{index:06d}", study_key=f"batch-scale-{index}")


def write_studies(folder: Path, count: int, workers: int) -> None:
    tasks = [(index, folder / f"study{index:06d}") for index in range(count)]
    with ProcessPoolExecutor(workers) as pool:
        list(pool.map(_study, tasks, chunksize=max(1, count // (8 * workers))))


def tiny_bundle(folder: Path) -> Path:
    """The tumor bundle's configs, with random weights for the network ``OVERRIDES`` make."""
    bundle = folder / "tiny_bundle"
    shutil.copytree(ROOT / "bundles" / "unet3d_tumor" / "configs", bundle / "configs")
    parser = ConfigParser()
    parser.read_config(str(bundle / "configs" / "inference.json"))
    for key, value in OVERRIDES.items():
        parser[key] = json.loads(value)
    torch.manual_seed(0)
    (bundle / "models").mkdir()
    torch.save(parser.get_parsed_content("network_def").state_dict(), bundle / "models" / "model.pt")
    return bundle


def _status_kb(pid: int) -> dict[str, int]:
    try:
        text = Path(f"/proc/{pid}/status").read_text()
    except OSError:
        return {}
    return {m[1]: int(m[2]) for m in re.finditer(r"^(VmRSS|VmHWM):\s+(\d+) kB", text, re.MULTILINE)}


def _cpu_ticks(pid: int) -> int | None:
    """User and system CPU time of a process so far, in clock ticks (None when it is gone)."""
    try:
        fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    except OSError:
        return None
    return int(fields[11]) + int(fields[12])  # utime, stime


def _descendants(pid: int) -> list[int]:
    found, todo = [], [pid]
    while todo:
        parent = todo.pop()
        for task in Path(f"/proc/{parent}/task").glob("*/children") if Path(f"/proc/{parent}").exists() else ():
            try:
                children = [int(c) for c in task.read_text().split()]
            except OSError:
                continue
            found.extend(children)
            todo.extend(children)
    return found


@dataclass
class Sample:
    seconds: float
    records: int
    rss_kb: int
    hwm_kb: int
    children_kb: int
    cpu_s: float  # CPU time so far of the job and every child process it has had


@dataclass
class Run:
    seconds: float
    returncode: int
    stdout: str
    samples: list[Sample] = field(default_factory=list)
    first_record_s: float | None = None  # since the start, the first record this run wrote
    lingering: list[int] = field(default_factory=list)  # after a kill: its children still running 10 s later


class _Watch(threading.Thread):
    """Samples the job's memory and counts its records; kills it with SIGKILL at ``kill_at`` records
    (``children``: its child processes then)."""

    def __init__(self, process: subprocess.Popen, output: Path, interval: float, kill_at: int | None) -> None:
        super().__init__(daemon=True)
        self.process, self.output, self.interval, self.kill_at = process, output, interval, kill_at
        self.start_time = time.perf_counter()
        self.samples: list[Sample] = []
        self.done: set[str] = set()
        self.before = self._count()  # records of an earlier run
        self.first_record_s: float | None = None
        self.children: list[int] = []
        self.ticks: dict[int, int] = {}  # per process, the last CPU time read (kept when it ends)

    def _count(self) -> int:
        try:
            entries = [e for e in os.scandir(self.output) if e.name not in self.done and e.is_dir()]
        except OSError:
            return 0
        for entry in entries:
            if os.path.exists(os.path.join(entry.path, "record.json")):
                self.done.add(entry.name)
        return len(self.done)

    def run(self) -> None:
        pid = self.process.pid
        while self.process.poll() is None:
            records = self._count()
            if records > self.before and self.first_record_s is None:
                self.first_record_s = time.perf_counter() - self.start_time
            main = _status_kb(pid)
            children = _descendants(pid)
            for process in (pid, *children):
                ticks = _cpu_ticks(process)
                if ticks is not None:
                    self.ticks[process] = ticks
            if main:
                self.samples.append(Sample(time.perf_counter() - self.start_time, records, main.get("VmRSS", 0),
                                           main.get("VmHWM", 0), sum(_status_kb(c).get("VmRSS", 0) for c in children),
                                           sum(self.ticks.values()) / _CLOCK_TICKS))
            if self.kill_at is not None and records >= self.kill_at:
                self.children = _descendants(pid)
                os.kill(pid, signal.SIGKILL)
                return
            time.sleep(self.interval)


def _running(pid: int) -> bool:
    try:
        return Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[0] != "Z"
    except OSError:
        return False


def _lingering(pids: list[int], grace_s: float = 10.0) -> list[int]:
    """Those of ``pids`` still running after ``grace_s``; ended here (SIGKILL), so the benchmark goes on."""
    deadline = time.monotonic() + grace_s
    while any(map(_running, pids)) and time.monotonic() < deadline:
        time.sleep(0.2)
    left = [pid for pid in pids if _running(pid)]
    for pid in left:
        os.kill(pid, signal.SIGKILL)
    return left


def run_job(bundle: Path, studies: Path, output: Path, log: Path, interval: float, kill_at: int | None = None) -> Run:
    """The command line's batch job, watched; stdout and stderr go to files (a process it leaves
    behind would hold a pipe open)."""
    command = [sys.executable, "-m", "pipelines", "batch", "--bundle", str(bundle), "--input", str(studies),
               "--output", str(output), *(word for key, value in OVERRIDES.items() for word in (f"--{key}", value))]
    start = time.perf_counter()
    with open(log, "ab") as stderr, tempfile.TemporaryFile("w+") as stdout:
        process = subprocess.Popen(command, stdout=stdout, stderr=stderr, text=True)
        watch = _Watch(process, output, interval, kill_at)
        watch.start()
        process.wait()
        seconds = time.perf_counter() - start
        watch.join()
        stdout.seek(0)
        text = stdout.read()
    return Run(seconds, process.returncode, text, watch.samples, watch.first_record_s, _lingering(watch.children))


def _records(output: Path) -> list[tuple[int, dict]]:
    """``(record.json mtime in ns, record)`` of every case, in the order written."""
    found = []
    for path in output.glob("*/record.json"):
        found.append((path.stat().st_mtime_ns, json.loads(path.read_text())))
    return sorted(found, key=lambda item: item[0])


def _p99(values: list[float]) -> float:
    return float(np.percentile(values, 99))


def overhead_rows(output: Path, window: int) -> list[tuple[str, dict]]:
    """Per window (first, last): the wall time, inference and overhead per case, and the record's
    stage timings (medians; p99 of the overhead)."""
    records = _records(output)
    walls = [(b[0] - a[0]) / 1e9 for a, b in itertools.pairwise(records)]  # case k+1's period
    timings = [r["timings"] for _, r in records[1:]]
    rows = []
    for name, part in (("first", slice(0, window - 1)), ("last", slice(-window, None))):
        wall, stage = walls[part], timings[part]
        overhead = [w - t["inference_s"] for w, t in zip(wall, stage)]
        cases = range(len(records))[1:][part]
        rows.append((f"{name} {cases[0] + 1}-{cases[-1] + 1}", {
            "wall": statistics.median(wall), "inference": statistics.median(t["inference_s"] for t in stage),
            "overhead": statistics.median(overhead), "overhead_p99": _p99(overhead),
            **{key: statistics.median(t.get(f"{key}_s", 0.0) for t in stage) for key in ("load", "preprocess", "write")},
        }))
    return rows


def cpu_per_case(samples: list[Sample], low: int, high: int) -> float | None:
    """CPU seconds per record of the job and its children from the first sample with ``low`` records
    or more to the last with fewer than ``high`` (None without two such samples)."""
    after = [s for s in samples if s.records >= low]
    before = [s for s in samples if s.records < high]
    if not after or not before or before[-1].records <= after[0].records:
        return None
    return (before[-1].cpu_s - after[0].cpu_s) / (before[-1].records - after[0].records)


def memory_at(samples: list[Sample], upto: int, span: int = 10) -> tuple[int, int] | None:
    """The largest ``VmRSS`` of the job, and of its children, in kB, while records ``upto - span + 1 ..
    upto`` were being written (None without a sample then)."""
    near = [s for s in samples if upto - span <= s.records < upto]
    return (max(s.rss_kb for s in near), max(s.children_kb for s in near)) if near else None


def repeat_cases(output: Path, target: Path, rows: int) -> None:
    """``rows`` case folders under ``target``: the run's records (new case ids) with hard links to
    their QC pictures, in turn."""
    sources = sorted(p.parent for p in output.glob("*/record.json"))
    for row in range(rows):
        source = sources[row % len(sources)]
        case_id = pseudonym(f"row {row}")
        (target / case_id).mkdir(parents=True)
        record = json.loads((source / "record.json").read_text())
        (target / case_id / "record.json").write_text(json.dumps({**record, "case_id": case_id}))
        for name in ("qc.png", "qc_thumbnail.png"):
            if (source / name).is_file():
                os.link(source / name, target / case_id / name)


_FRAME = """<!DOCTYPE html><html><head><title>waiting</title></head><body>
<iframe id="report" src="report.html" style="width:1400px;height:900px"></iframe><script>
document.getElementById("report").addEventListener("load", function () {
  var loaded = performance.now(), doc = this.contentDocument, height = doc.body.scrollHeight;
  document.title = JSON.stringify({load_ms: loaded, layout_ms: performance.now() - loaded, height: height,
    rows: doc.querySelectorAll("tr[id]").length, images: doc.images.length,
    shown: doc.querySelectorAll("img[data-loaded=yes]").length});
});
</script></body></html>
"""


def open_in_chromium(folder: Path) -> dict:
    """Opens ``folder``/report.html framed (see the module docstring): the frame's figures, and the
    wall time of the whole Chromium command (its start included)."""
    browser = shutil.which("chromium")
    if browser is None:
        return {}
    page = folder / "frame.html"
    page.write_text(_FRAME)
    start = time.perf_counter()
    result = subprocess.run([browser, *CHROMIUM_FLAGS, "--allow-file-access-from-files", "--window-size=1400,900",
                             "--dump-dom", page.as_uri()], capture_output=True, text=True, timeout=600, check=False)
    wall = time.perf_counter() - start
    title = re.search(r"<title>(.*?)</title>", result.stdout, re.DOTALL)
    if result.returncode != 0 or title is None or not title.group(1).startswith("{"):
        raise RuntimeError(f"chromium did not report the frame's load (exit {result.returncode}): {result.stderr[-2000:]}")
    return {**json.loads(title.group(1).replace("&quot;", '"')), "wall_s": wall}


def _resume(bundle: Path, studies: Path, folder: Path, count: int, interval: float) -> dict:
    """Kill a run at half the records, rerun it; see the module docstring."""
    output = folder / "resume"
    killed = run_job(bundle, studies, output, folder / "resume.log", interval, kill_at=count // 2)
    before = {p.parent.name: (p.stat().st_ino, p.stat().st_mtime_ns) for p in output.glob("*/record.json")}
    rerun = run_job(bundle, studies, output, folder / "resume.log", interval)
    after = {p.parent.name: (p.stat().st_ino, p.stat().st_mtime_ns) for p in output.glob("*/record.json")}
    redone = [case for case, stamp in before.items() if after.get(case) != stamp]
    ok = sum(r.get("status") == "ok" for _, r in _records(output))
    return {"killed_rc": killed.returncode, "at_kill": len(before), "lingering": killed.lingering, "rerun": rerun,
            "redone": redone, "ok": ok}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--cases", type=int, default=2000, help="synthetic studies (default 2,000)")
    parser.add_argument("--window", type=int, default=100, help="cases compared at the start and the end")
    parser.add_argument("--report-rows", type=int, default=3000, help="rows of the report opened in Chromium")
    parser.add_argument("--sample-s", type=float, default=0.25, help="seconds between memory samples")
    parser.add_argument("--workers", type=int, default=os.cpu_count() or 1, help="processes writing the studies")
    parser.add_argument("--keep", type=Path, help="work in this folder and keep it (default: a temporary one)")
    parser.add_argument("--quick", action="store_true",
                        help="a check that the script runs: 6 cases, windows of 2, 10 report rows, no resume")
    parser.add_argument("--no-resume", action="store_true", help="leave out the resume (two more runs)")
    args = parser.parse_args()
    if args.quick:
        args.cases, args.window, args.report_rows = 6, 2, 10
    if args.cases < 2 * args.window:
        parser.error(f"--cases must be at least twice --window ({2 * args.window}), got {args.cases}")
    os.environ.setdefault("UNET_PIPELINES_SALT", "batch-scale benchmark")  # no site salt file written

    with tempfile.TemporaryDirectory(prefix="batch_scale_") as tmp:
        folder = args.keep or Path(tmp)
        folder.mkdir(parents=True, exist_ok=True)
        start = time.perf_counter()
        write_studies(folder / "studies", args.cases, args.workers)
        written = time.perf_counter() - start
        bundle = tiny_bundle(folder)
        run = run_job(bundle, folder / "studies", folder / "out", folder / "run.log", args.sample_s)
        if run.returncode != 0:
            raise RuntimeError(f"the batch job failed (exit {run.returncode}); its log: {folder / 'run.log'}")
        print(f"== batch job at scale: {args.cases} DICOM studies {'x'.join(map(str, SHAPE))}, tiny tumor bundle "
              f"({' '.join(f'--{k} {v!r}' for k, v in OVERRIDES.items())}), --workers 1, {os.cpu_count()} CPUs ==")
        print(f"studies written in {written:.1f} s; the job: {run.seconds:.1f} s, "
              f"{run.seconds / args.cases:.3f} s per case; {_summary(run)}")
        _print_overhead(folder / "out", args.window, run.samples, args.cases)
        _print_memory(run.samples, args.window, args.cases)
        _print_reports(folder, args.cases, args.report_rows)
        if args.quick or args.no_resume:
            print("resume: not measured")
        else:
            _print_resume(bundle, folder, args.cases, args.sample_s)


def _summary(run: Run) -> str:
    lines = run.stdout.strip().splitlines()
    return lines[0] if lines else f"no summary (exit {run.returncode})"


def _print_overhead(output: Path, window: int, samples: list[Sample], cases: int) -> None:
    print(f"{'cases':<14}{'wall s':>9}{'infer s':>9}{'overhead':>10}{'p99':>8}{'load':>8}{'prep':>8}{'write':>8}")
    rows = overhead_rows(output, window)
    for name, row in rows:
        print(f"{name:<14}{row['wall']:9.4f}{row['inference']:9.4f}{row['overhead']:10.4f}{row['overhead_p99']:8.4f}"
              f"{row['load']:8.4f}{row['preprocess']:8.4f}{row['write']:8.4f}")
    growth = rows[1][1]["overhead"] / rows[0][1]["overhead"] - 1
    print(f"overhead growth, median last / first: {growth:+.1%} (goal within 10 %)")
    first, last = cpu_per_case(samples, 1, window), cpu_per_case(samples, cases - window, cases)
    if first and last:
        print(f"CPU per case, the job and its loader: first {first:.4f} s, last {last:.4f} s: {last / first - 1:+.1%}")


def _print_memory(samples: list[Sample], window: int, cases: int) -> None:
    early, late = memory_at(samples, window), memory_at(samples, cases)
    for name, found in ((f"case {window}", early), (f"case {cases}", late)):
        if found:
            print(f"RSS at {name:<11} {found[0] / 1024:7.1f} MB  (loader process {found[1] / 1024:.1f} MB)")
    print(f"peak RSS (VmHWM)     {max(s.hwm_kb for s in samples) / 1024:7.1f} MB")
    if early and late:
        print(f"RSS growth, case {window} to case {cases}: {late[0] / early[0] - 1:+.1%}, with the loader "
              f"{sum(late) / sum(early) - 1:+.1%} (goal under 10 %)")


def _print_reports(folder: Path, cases: int, rows: int) -> None:
    start = time.perf_counter()
    _, html_path = write_reports(folder / "out")
    seconds = time.perf_counter() - start
    print(f"reports of {cases} cases written in {seconds:.2f} s; report.html {html_path.stat().st_size / 2**20:.1f} MB")
    repeat_cases(folder / "out", folder / "rows", rows)
    start = time.perf_counter()
    _, html_path = write_reports(folder / "rows")
    seconds = time.perf_counter() - start
    print(f"report.html of {rows} rows: written in {seconds:.2f} s, {html_path.stat().st_size / 2**20:.1f} MB")
    opened = open_in_chromium(folder / "rows")
    if opened:
        print(f"  in headless Chromium: loaded {opened['load_ms'] / 1000:.2f} s after navigation (a layout forced then: "
              f"{opened['layout_ms'] / 1000:.2f} s more), {opened['rows']} rows, {opened['shown']} of {opened['images']} "
              f"pictures shown by then; the whole Chromium command {opened['wall_s']:.2f} s (goal: open under 3 s)")
    else:
        print("  chromium not installed: not opened")


def _print_resume(bundle: Path, folder: Path, cases: int, interval: float) -> None:
    resumed = _resume(bundle, folder / "studies", folder, cases, interval)
    rerun = resumed["rerun"]
    print(f"resume: killed (exit {resumed['killed_rc']}) with {resumed['at_kill']} records; loader processes "
          f"still running 10 s after the kill: {len(resumed['lingering'])} (ended by this benchmark)")
    print(f"resume: the rerun took {rerun.seconds:.1f} s ({rerun.first_record_s or float('nan'):.1f} s to its first "
          f"record); {_summary(rerun)}")
    print(f"resume: finished cases written again: {len(resumed['redone'])} (goal 0); ok records at the end: "
          f"{resumed['ok']} of {cases}")

if __name__ == "__main__":
    main()
