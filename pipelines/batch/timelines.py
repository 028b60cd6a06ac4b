"""The report's plot of a patient's volumes over time: an inline SVG per study with priors."""

from __future__ import annotations

import html

__all__ = ["plot", "timelines"]


def timelines(records: list[dict]) -> dict[str, list[tuple[int, str, dict]]]:
    """Per patient (its hash), ``(day, case, volumes_ml)`` of its studies in the report, and of the
    prior studies their comparisons name (an earlier run's), in time order."""
    found: dict[str, dict[int, tuple[int, str, dict]]] = {}
    for record in records:
        study = record.get("study")
        if record.get("status") != "ok" or not study:
            continue
        points = found.setdefault(study["patient"], {})
        points[int(study["day"])] = (int(study["day"]), str(record.get("case_id")), dict(record.get("volumes_ml") or {}))
        comparison = record.get("comparison")
        if comparison and "interval_days" in comparison:
            day = int(study["day"]) - int(comparison["interval_days"])
            volumes = {name: change["prior_ml"] for name, change in (comparison.get("volumes_ml") or {}).items()}
            points.setdefault(day, (day, str(comparison.get("prior_case")), volumes))
    return {patient: [points[day] for day in sorted(points)] for patient, points in found.items()}


_COLOURS = ("#d62728", "#1f77b4", "#2ca02c", "#ff7f0e", "#9467bd", "#8c564b")


def plot(points: list[tuple[int, str, dict]], case: str, width: int = 220, height: int = 110) -> str:
    """A small inline SVG: each label's volume (mL) against days since the first study, a line per
    label, each point titled with its case, day and volume."""
    names = [name for name in points[-1][2] if any(name in p[2] for p in points)]
    first = points[0][0]
    span = max(1, points[-1][0] - first)
    top = max([p[2].get(name, 0.0) for p in points for name in names] + [1e-9])
    left, right, up, down = 34, 8, 8, 22

    def x(day: int) -> float:
        return left + (day - first) / span * (width - left - right)

    def y(volume: float) -> float:
        return up + (1 - volume / top) * (height - up - down)

    parts = [f'<line x1="{left}" y1="{height - down}" x2="{width - right}" y2="{height - down}" stroke="#888"/>',
             f'<line x1="{left}" y1="{up}" x2="{left}" y2="{height - down}" stroke="#888"/>',
             f'<text x="{left - 3}" y="{up + 8}" text-anchor="end" font-size="9">{top:.0f}</text>',
             f'<text x="{left - 3}" y="{height - down}" text-anchor="end" font-size="9">0</text>',
             f'<text x="{width - right}" y="{height - 8}" text-anchor="end" font-size="9">day {span}</text>',
             f'<text x="{left}" y="{height - 8}" font-size="9">day 0 (mL)</text>']
    for index, name in enumerate(names):
        colour = _COLOURS[index % len(_COLOURS)]
        line = [(x(day), y(volumes[name]), day, who, volumes[name]) for day, who, volumes in points if name in volumes]
        parts.append(f'<polyline fill="none" stroke="{colour}" stroke-width="1.5" points="'
                     + " ".join(f"{px:.1f},{py:.1f}" for px, py, *_ in line) + '"/>')
        for px, py, day, who, volume in line:
            label = html.escape(f"{name}: {volume:.1f} mL, day {day - first} ({who})")
            parts.append(f'<circle cx="{px:.1f}" cy="{py:.1f}" r="2.5" fill="{colour}"><title>{label}</title></circle>')
        parts.append(f'<text x="{width - right}" y="{up + 9 + 10 * index}" text-anchor="end" font-size="9" '
                     f'fill="{colour}">{html.escape(name)}</text>')
    return (f'<svg class="timeline" role="img" aria-label="volumes over time up to {html.escape(case)}" '
            f'width="{width}" height="{height}" viewBox="0 0 {width} {height}">{"".join(parts)}</svg>')
