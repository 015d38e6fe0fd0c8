"""Reports you can look at: the viewer page of `probe-cascade serve` (a token stream tinted by
concepts, each token's top concepts with their paths, sparklines, alerts) as one HTML file
that works offline, and reports that render in Jupyter.

    from probe_cascade import viewer
    viewer.to_html("run.html", reports, texts=texts, runtime=rt)   # any list of reports
    mon.to_html("gen.html")                                          # a hf.monitor's generations

The page and its script are the Rust core's (`probe_cascade::viewer`, compiled into the
native module), the same the server and `probe-cascade run --html` give, so every report
looks the same. Reports of an in-process `Runtime` and of a `Client` both work: the page
reads what `Report.to_dict()` gives.
"""

import html as _html
import json
import os
from typing import Any, Dict, List, Mapping, Optional, Sequence, Union

from ._native import viewer_page as _viewer_page

__all__ = ["event", "page", "to_html", "report_html", "iframe"]


def event(report: Any, text: Optional[str] = None) -> Dict[str, Any]:
    """One token as the viewer reads it (the live events' shape, docs/serving.md): from a
    `Report` or `RemoteReport` (or the dict of one), and the token's text if known."""
    d = report if isinstance(report, Mapping) else report.to_dict()
    return {
        "token": d["token"],
        "text": text,
        "ms": d.get("elapsed_us", 0.0) / 1e3,
        "top": d["top"],
        "alerts": d.get("alerts", []),
        "simplex": d.get("simplex", []),
        "scored": d.get("scored", 0),
        "active": d.get("active", 0),
    }


Streams = Union[Sequence[Any], Mapping[str, Sequence[Any]]]


def _streams(reports: Streams, texts: Any) -> List[Dict[str, Any]]:
    """[{id, label, events}] from one list of reports, or {label: reports}; `texts` alike."""
    if isinstance(reports, Mapping):
        named = list(reports.items())
        texts = texts or {}
        if not isinstance(texts, Mapping):
            raise TypeError("with several streams ({label: reports}), texts is {label: [str]} too")
        text_of = [texts.get(label) for label, _ in named]
    else:
        named = [("stream", reports)]
        text_of = [texts]
    out = []
    for i, ((label, reps), txt) in enumerate(zip(named, text_of)):
        reps = list(reps)
        if txt is not None and len(txt) < len(reps):
            raise ValueError(f"stream {label!r}: {len(txt)} texts for {len(reps)} reports")
        out.append(
            {
                "id": i,
                "label": str(label),
                "events": [event(r, None if txt is None else txt[k]) for k, r in enumerate(reps)],
            }
        )
    return out


def page(reports: Streams, *, texts: Any = None, runtime: Any = None, title: str = "probe-cascade report") -> str:
    """The viewer page with `reports` in it: one list of reports (with `texts`, one string
    per report, or None), or {label: reports} for several streams (texts {label: [str]}).
    `runtime`, an in-process Runtime, adds the pack's hierarchy (for the concept picker);
    reports carry their concepts' paths either way."""
    pack = json.loads(runtime._pack_view()) if runtime is not None and hasattr(runtime, "_pack_view") else None
    data = {"pack": pack, "sessions": _streams(reports, texts)}
    return _viewer_page(title, json.dumps(data))


def to_html(
    path: Union[str, "os.PathLike[str]"],
    reports: Streams,
    *,
    texts: Any = None,
    runtime: Any = None,
    title: Optional[str] = None,
) -> str:
    """Writes `page(...)` to `path` (one file, no network needed to open it); returns the path."""
    path = os.fspath(path)
    with open(path, "w", encoding="utf-8") as f:
        f.write(page(reports, texts=texts, runtime=runtime, title=title or os.path.basename(path)))
    return path


def iframe(page_html: str, height: int = 560) -> str:
    """A page as Jupyter can show it inline: in an iframe of its own, so that its script runs
    apart from the notebook's."""
    return (
        f'<iframe srcdoc="{_html.escape(page_html, quote=True)}" '
        f'style="width:100%;height:{int(height)}px;border:1px solid #ddd" sandbox="allow-scripts"></iframe>'
    )


def _hue(name: str) -> int:
    """The viewer's hue for a concept (FNV-1a over code points, as its script computes it)."""
    h = 2166136261
    for c in name:
        h ^= ord(c)
        h = (h * 16777619) & 0xFFFFFFFF
    return h % 360


def report_html(report: Any) -> str:
    """One report as a small HTML table (Jupyter's view of a `Report`): its top concepts tinted
    as the viewer tints them, each with its path, score and logit, then its alerts."""
    d = report if isinstance(report, Mapping) else report.to_dict()
    esc = _html.escape
    rows = []
    for det in d["top"]:
        hue = _hue(det["name"])
        path = " › ".join(det.get("path", [])[:-1])
        width = int(60 * min(1.0, max(0.0, det["prob"])))
        rows.append(
            f'<tr><td><span style="display:inline-block;width:.8em;height:.8em;border-radius:2px;'
            f'background:hsla({hue},70%,50%,.9)"></span> {esc(det["name"])}'
            f'<div style="color:#6b6b70;font-size:.85em">{esc(path)}</div></td>'
            f'<td>{det["prob"]:.3f} <span style="display:inline-block;height:.6em;width:{width}px;'
            f'background:hsla({hue},70%,50%,.9)"></span></td><td>{det["logit"]:.2f}</td></tr>'
        )
    alerts = "".join(
        f'<li style="color:#d0021b">{esc(a["profile"])}: {esc(a["concept"])} (under {esc(a["watched"])}) '
        f'{a["score"]:.3f}</li>'
        for a in d.get("alerts", [])
    )
    return (
        f'<div class="probe-cascade-report"><b>token {d["token"]}</b> · {d.get("scored", 0)} scored · '
        f'{d.get("active", 0)} active<table><tr><th>concept</th><th>score</th><th>logit</th></tr>'
        + "".join(rows)
        + "</table>"
        + (f"<ul>{alerts}</ul>" if alerts else "")
        + "</div>"
    )
