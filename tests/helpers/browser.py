"""Headless Chromium (Debian's `chromium`, installed by .ci/setup) rendering a local HTML file: a
screenshot, the page's console messages (errors included) and every network request the page made,
from Chromium's own net log."""

from __future__ import annotations

import json
import re
import shutil
import subprocess
from dataclasses import dataclass
from pathlib import Path

CONSOLE = re.compile(r":INFO:CONSOLE[^\]]*\] (.*)")
LOCAL = ("file:", "data:", "about:", "chrome:")


@dataclass
class Rendered:
    png: Path
    console: list[str]  # console messages of the page (uncaught errors included)
    requests: list[str]  # every URL the page requested (not the browser's own service requests)

    @property
    def external(self) -> list[str]:
        return [u for u in self.requests if not u.startswith(LOCAL)]


def chromium() -> str:
    path = shutil.which("chromium")
    if path is None:  # never a skip: CI must render the reports (.ci/setup installs it as root)
        raise RuntimeError("chromium is not installed: run .ci/setup as root, or apt-get install chromium")
    return path


def page_requests(net_log: Path) -> list[str]:
    """URLs of the requests made on behalf of a file:// page: their network isolation key is the
    page's site (the browser's own requests, e.g. to google.com, have another key or none)."""
    text = net_log.read_text().rstrip()
    try:
        data = json.loads(text)
    except json.JSONDecodeError:  # a log cut at exit lacks the end of its event list
        data = json.loads(text.rstrip(",") + "]}")
    types = {v: k for k, v in data["constants"]["logEventTypes"].items()}
    out = []
    for e in data["events"]:
        p = e.get("params") or {}
        if types.get(e["type"]) == "URL_REQUEST_START_JOB" and str(p.get("network_isolation_key", "")).startswith("file://"):
            out.append(p["url"])
    return out


def render(html: Path, work: Path, width: int = 1200, height: int = 1600) -> Rendered:
    work.mkdir(parents=True, exist_ok=True)
    png, net_log = work / f"{html.stem}.png", work / f"{html.stem}.netlog.json"
    cmd = [chromium(), "--headless", "--no-sandbox", "--disable-gpu", "--disable-background-networking",
           "--disable-component-update", "--disable-sync", f"--user-data-dir={work / 'profile'}", f"--log-net-log={net_log}",
           "--enable-logging=stderr", "--v=0", f"--window-size={width},{height}", f"--screenshot={png}", html.resolve().as_uri()]
    proc = subprocess.run(cmd, capture_output=True, text=True, timeout=120)
    if proc.returncode != 0 or not png.is_file():
        raise RuntimeError(f"chromium failed ({proc.returncode}): {proc.stderr[-2000:]}")
    return Rendered(png, CONSOLE.findall(proc.stderr), page_requests(net_log))
