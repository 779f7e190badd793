"""Headless-chromium screenshots of the HTML reports (tests that use it skip where chromium is absent)."""

from __future__ import annotations

import subprocess
from pathlib import Path


def screenshot(page: Path, shot: Path, height: int) -> Path:
    """Render `page` in headless chromium, 1200 px wide, into the PNG `shot`; offline, no profile."""
    subprocess.run(
        [
            "chromium",
            "--headless",
            "--no-sandbox",
            "--disable-gpu",
            "--disable-background-networking",
            "--disable-component-update",
            "--disable-sync",
            "--no-first-run",
            f"--screenshot={shot}",
            f"--window-size=1200,{height}",
            page.resolve().as_uri(),
        ],
        check=True,
        capture_output=True,
        timeout=120,
    )
    return shot
