"""Render time of a study's report in headless Chromium (the paper-scale simulated study's, by default).

    python bench/sim_render.py [--html results/paper-en-zh-simulated/report/index.html] [--repeat 3]

Opens the page as the report tests do (Debian's /usr/bin/chromium, headless, networking disabled) and
waits until every figure is drawn (the page's own #render-status, which it writes after the last
figure). Printed: the page's size, its figures and data marks, the errors it reported, and the best of
``--repeat`` wall times against Chromium opening an empty page in the same way (its start-up), with their
difference and ratio.
"""

from __future__ import annotations

import argparse
import html
import json
import re
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path

CHROMIUM = "/usr/bin/chromium"


def open_page(page: Path, timeout: int) -> tuple[float, dict | None]:
    """Wall seconds until Chromium has dumped the page's DOM (after its scripts ran), and the page's
    render status (None when it wrote none)."""
    prof = tempfile.mkdtemp(prefix="chromium-")
    cmd = [CHROMIUM, "--headless", "--no-sandbox", "--disable-gpu", "--no-first-run", "--disable-sync",
           "--disable-background-networking", "--disable-component-update", f"--user-data-dir={prof}",
           "--proxy-server=127.0.0.1:9", "--host-resolver-rules=MAP * ~NOTFOUND",
           "--virtual-time-budget=600000", "--run-all-compositor-stages-before-draw", "--dump-dom", page.as_uri()]
    try:
        t0 = time.perf_counter()
        out = subprocess.run(cmd, capture_output=True, text=True, timeout=timeout)
        wall = time.perf_counter() - t0
    finally:
        shutil.rmtree(prof, ignore_errors=True)
    m = re.search(r'<pre id="render-status"[^>]*>(.*?)</pre>', out.stdout, re.S)
    return wall, json.loads(html.unescape(m.group(1))) if m and m.group(1) else None


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--html", default="results/paper-en-zh-simulated/report/index.html")
    ap.add_argument("--repeat", type=int, default=3)
    ap.add_argument("--timeout", type=int, default=900)
    args = ap.parse_args()
    page = Path(args.html).resolve()
    if not Path(CHROMIUM).exists():
        raise SystemExit(f"{CHROMIUM} is missing (Debian package chromium)")
    if not page.is_file():
        raise SystemExit(f"{page} is missing: build the report first (snakemake ... --configfile "
                         "workflow/studies/paper-simulated.yaml)")
    with tempfile.TemporaryDirectory() as tmp:
        empty = Path(tmp) / "empty.html"
        empty.write_text("<!doctype html><html><body></body></html>")
        base = min(open_page(empty, args.timeout)[0] for _ in range(args.repeat))
    runs = [open_page(page, args.timeout) for _ in range(args.repeat)]
    best = min(w for w, _ in runs)
    status = runs[0][1]
    if status is None:
        raise SystemExit("the page wrote no render status: its scripts did not finish (raise --timeout)")
    figures = len(status["rendered"])
    drawn = sum(1 for n in status["rendered"].values() if n > 0)
    print(f"{page}: {page.stat().st_size / 1e6:.1f} MB, {figures} figures ({drawn} with data marks, "
          f"{sum(status['rendered'].values())} marks), {len(status['errors'])} errors, "
          f"{len(status['requests'])} network requests")
    print(f"render (best of {args.repeat}): {best:.1f} s; Chromium on an empty page: {base:.1f} s; "
          f"page alone {best - base:.1f} s; ratio {best / base:.1f}")
    return 0 if not status["errors"] and drawn == figures else 1


if __name__ == "__main__":
    sys.exit(main())
