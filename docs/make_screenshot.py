"""Regenerate the README's dashboard screenshot (``docs/img/run-page.png``).

    python docs/make_screenshot.py [--steps 12] [--out docs/img/run-page.png]

Starts the embedded service, runs the demo's GRPO loop for a few steps against it (no
download, CPU only), then opens the run page in headless Debian Chromium through Playwright
(``apt-get install chromium``; ``pip install playwright``, never ``playwright install``) at
1280x800 and saves a full-page screenshot of the run page and of the last step's page.
"""

from __future__ import annotations

import argparse
import time
from pathlib import Path

from rich.console import Console

from clients.demo import child_service, run_demo

CHROMIUM = "/usr/bin/chromium"
CHROMIUM_ARGS = [
    "--no-sandbox",
    "--disable-gpu",
    "--disable-background-networking",
    "--disable-component-update",
    "--disable-sync",
    "--no-first-run",
]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--steps", type=int, default=12)
    parser.add_argument("--out", type=Path, default=Path(__file__).parent / "img" / "run-page.png")
    args = parser.parse_args()

    from playwright.sync_api import sync_playwright

    args.out.parent.mkdir(parents=True, exist_ok=True)
    run_id = "demo-screenshot"
    with child_service() as url:
        rows = run_demo(
            steps=args.steps, url=url, keep_alive=False, console=Console(), run_id=run_id
        )
        last_step = rows[-1].step
        with sync_playwright() as pw:
            browser = pw.chromium.launch(
                executable_path=CHROMIUM, headless=True, args=CHROMIUM_ARGS
            )
            page = browser.new_page(viewport={"width": 1280, "height": 800})
            for path, out in (
                (f"/#/runs/{run_id}", args.out),
                (f"/#/runs/{run_id}/steps/{last_step}", args.out.with_name("step-page.png")),
            ):
                page.goto(url + path)
                page.wait_for_load_state("networkidle")
                time.sleep(3.0)  # the page polls the analyses of every step; let them land
                page.screenshot(path=str(out), full_page=True)
                print(f"saved {out}")
            browser.close()


if __name__ == "__main__":
    main()
