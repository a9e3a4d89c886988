"""``edge-agent report``: the device page as one self-contained HTML file, to attach to a ticket.

The same page as the live one (agent/static: index.html, app.js, the vendored
uPlot) with every script, style sheet and the data inlined, so the file opens
offline, from a mail attachment, years later.  The data is the documents the
live page fetches (meta, series, forecast, events, status) computed once for
the chosen range, downsampled to ``points`` values per series like the page.
"""
from __future__ import annotations

import json
import re
from pathlib import Path
from typing import Any

from agent import webdata
from agent.web import STATIC_DIR, STATIC_FILES


class ReportError(RuntimeError):
    """Nothing to report (no database); the message is for the operator."""


def _inline_script(text: str) -> str:
    # "</script" inside a script element would end it early; "<\/" means the same to JavaScript
    return "<script>\n" + text.replace("</", "<\\/") + "\n</script>"


def _inline_style(text: str) -> str:
    return "<style>\n" + text.replace("</style", "<\\/style") + "\n</style>"


def render_html(data: dict[str, Any]) -> str:
    """index.html with its /static/ references replaced by their contents and the data in front of app.js."""
    page = (STATIC_DIR / "index.html").read_text(encoding="utf-8")

    def asset(name: str) -> str:
        return (STATIC_DIR / STATIC_FILES[name][0]).read_text(encoding="utf-8")

    def css(match: re.Match[str]) -> str:
        return _inline_style(asset(match.group(1)))

    def js(match: re.Match[str]) -> str:
        name = match.group(1)
        if name == "app.js":
            payload = json.dumps(data, separators=(",", ":"), allow_nan=False, default=str)
            return _inline_script("window.EDGE_DATA = " + payload + ";") + "\n" + _inline_script(asset(name))
        return _inline_script(asset(name))

    page = re.sub(r'<link rel="stylesheet" href="/static/([\w.]+)">', css, page)
    page = re.sub(r'<script src="/static/([\w.]+)"></script>', js, page)
    # the licence link must still work offline: point it at the licence text, inlined as a data: URL
    licence = asset("uPlot.LICENSE")
    from urllib.parse import quote

    page = page.replace('href="/static/uPlot.LICENSE"', f'href="data:text/plain;charset=utf-8,{quote(licence)}"')
    if "/static/" in page:
        raise AssertionError("report still references /static/")  # pragma: no cover - template changed
    return page


def build_report(config: Any, now_s: float, since_s: float | None, until_s: float | None,
                 points: int = webdata.MAX_POINTS) -> str:
    conn = webdata.open_readonly(config.db_path)
    if conn is None:
        raise ReportError(f"database {config.db_path} does not exist (has the agent run yet?)")
    try:
        count = conn.execute("SELECT count(*) FROM samples").fetchone()[0] if webdata.has_table(conn, "samples") else 0
        if not count:
            raise ReportError(f"database {config.db_path} holds no samples yet (has the agent run?)")
        data = webdata.bundle(conn, config, now_s, since_s, until_s, webdata.clamp_points(points))
    finally:
        conn.close()
    return render_html(data)


def write_report(config: Any, out: str | Path, now_s: float, since_s: float | None, until_s: float | None,
                 points: int = webdata.MAX_POINTS) -> int:
    """Write the file; returns its size in bytes."""
    html = build_report(config, now_s, since_s, until_s, points)
    path = Path(out)
    tmp = path.with_name(path.name + ".tmp")
    tmp.write_text(html, encoding="utf-8")
    tmp.replace(path)
    return len(html.encode())
