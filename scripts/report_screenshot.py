"""Regenerate the README's report screenshot (docs/report.png).

Run:  python scripts/report_screenshot.py [--out docs/report.png]

Trains digits-cnn briefly (`qflow quantize`), exports it for ultra96, verifies the
export, writes the run's report (`qflow report RUN EXPORT`) and photographs
report.html in headless Chromium. Needs Chromium (`apt-get install chromium`); takes
about two minutes.
"""

from __future__ import annotations

import argparse
import shutil
import subprocess
import sys
import tempfile
from pathlib import Path

BROWSERS = ("chromium", "chromium-browser", "google-chrome")


def _qflow(*args: str, cwd: Path) -> None:
    print("$ qflow", " ".join(args), flush=True)
    subprocess.run([sys.executable, "-m", "qflow", *args], cwd=cwd, check=True,
                   stdout=subprocess.DEVNULL)


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", type=Path, default=Path("docs/report.png"))
    args = parser.parse_args()
    browser = next((path for name in BROWSERS if (path := shutil.which(name))), None)
    if browser is None:
        print("report_screenshot: no Chromium found (apt-get install chromium)", file=sys.stderr)
        return 2
    out = args.out.resolve()
    with tempfile.TemporaryDirectory() as tmp:
        work = Path(tmp)
        _qflow("quantize", "--model", "digits-cnn", "--epochs", "4", "--qat-epochs", "3",
               "--quiet", "--out", "run", cwd=work)
        _qflow("export", "run", "--target", "ultra96", cwd=work)
        _qflow("verify", "run/export-ultra96", cwd=work)
        _qflow("report", "run", "run/export-ultra96", cwd=work)
        subprocess.run([browser, "--headless", "--no-sandbox", "--disable-gpu",
                        "--disable-dev-shm-usage", "--hide-scrollbars",
                        "--window-size=1100,3000", "--force-device-scale-factor=0.7",
                        f"--screenshot={out}",
                        (work / "run" / "report.html").as_uri()],
                       check=True, capture_output=True, timeout=120)
    print(f"wrote {out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
