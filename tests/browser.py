"""Open an HTML file in headless Chromium: a screenshot, the console's errors, and what
the page's images and headings look like once the browser has loaded it."""

from __future__ import annotations

import json
import re
import shutil
import subprocess
from pathlib import Path

CANDIDATES = ("chromium", "chromium-browser", "google-chrome", "google-chrome-stable")
FLAGS = ("--headless", "--no-sandbox", "--disable-gpu", "--disable-dev-shm-usage",
         "--hide-scrollbars", "--no-first-run", "--virtual-time-budget=5000",
         "--enable-logging=stderr", "--v=0")
#: appended to a copy of the page: reports every image's decoded size and every h2,
#: written into the DOM that --dump-dom prints
PROBE = """<script>
document.body.insertAdjacentHTML("beforeend", "<pre id='qflow-probe'></pre>");
document.getElementById("qflow-probe").textContent = JSON.stringify({
  images: Array.from(document.images).map(i => [i.alt, i.complete, i.naturalWidth,
                                                 i.naturalHeight]),
  headings: Array.from(document.querySelectorAll("h2")).map(h => h.textContent)});
</script>"""
CONSOLE_ERROR = re.compile(r"CONSOLE.*|Uncaught .*|Failed to load resource.*")


def find_chromium() -> str | None:
    return next((path for name in CANDIDATES if (path := shutil.which(name))), None)


def _run(browser: str, *args: str, timeout: int = 120) -> subprocess.CompletedProcess:
    return subprocess.run([browser, *FLAGS, *args], capture_output=True, text=True,
                          timeout=timeout)


def inspect_page(page: Path, screenshot: Path, work: Path) -> dict:
    """{"images": [[alt, complete, width, height]], "headings": [...], "console": [lines]}
    for ``page`` opened from disk; its screenshot written to ``screenshot``."""
    browser = find_chromium()
    shot = _run(browser, f"--screenshot={screenshot}", "--window-size=1200,3000",
                page.resolve().as_uri())
    probed = work / f"probe-{page.name}"
    probed.write_text(page.read_text(encoding="utf-8").replace("</body>", PROBE + "</body>"),
                      encoding="utf-8")
    dom = _run(browser, "--dump-dom", probed.resolve().as_uri())
    found = re.search(r"<pre id=\"qflow-probe\">(.*?)</pre>", dom.stdout, re.S)
    if found is None:
        raise AssertionError(f"the probe did not run: {dom.stderr[-2000:]}")
    result = json.loads(found.group(1).replace("&quot;", '"').replace("&amp;", "&")
                        .replace("&lt;", "<").replace("&gt;", ">"))
    # console errors of the page itself (the probe's copy adds a script of its own)
    result["console"] = CONSOLE_ERROR.findall(shot.stderr)
    result["screenshot_returncode"] = shot.returncode
    return result
