"""Headless Chromium for the tests that check what a person sees (the API docs, the report).

Tests that need it skip when no Chromium is installed (Debian: ``apt-get install chromium``).
Pages load with the network cut off: every host name but 127.0.0.1 fails to resolve and any other
connection goes to a proxy that does not exist, so a page that needs a CDN renders without it.
"""

from __future__ import annotations

import shutil
import subprocess
from pathlib import Path

import pytest

OFFLINE = ["--host-resolver-rules=MAP * ~NOTFOUND, EXCLUDE 127.0.0.1", "--proxy-server=127.0.0.1:9",
           "--proxy-bypass-list=127.0.0.1"]
FLAGS = ["--headless", "--no-sandbox", "--disable-gpu", "--disable-dev-shm-usage", "--no-first-run",
         "--disable-extensions", "--hide-scrollbars", "--virtual-time-budget=15000", *OFFLINE]


def chromium() -> str:
    """The Chromium executable, or skip the test."""
    for name in ("chromium", "chromium-browser", "google-chrome", "chrome"):
        path = shutil.which(name)
        if path:
            return path
    pytest.skip("headless Chromium is not installed (apt-get install chromium)")


def dump_dom(url: str, timeout: float = 120) -> str:
    """The page's DOM after its scripts ran (offline)."""
    done = subprocess.run([chromium(), *FLAGS, "--dump-dom", url], capture_output=True, text=True, timeout=timeout)
    assert done.returncode == 0, done.stderr[-2000:]
    return done.stdout


def screenshot(url: str, path: Path, size: tuple[int, int] = (1280, 1600), timeout: float = 120) -> Path:
    """A PNG of the page (offline) at ``path``."""
    done = subprocess.run([chromium(), *FLAGS, f"--window-size={size[0]},{size[1]}", f"--screenshot={path}", url],
                          capture_output=True, text=True, timeout=timeout)
    assert done.returncode == 0 and Path(path).exists(), done.stderr[-2000:]
    return Path(path)
