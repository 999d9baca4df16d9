"""The system Chromium the browser tests drive through Playwright, installed when missing.

Playwright's own browser download is not reachable from every machine (this project's CI has the
package registries only), so the tests use Debian's ``chromium`` package: the first test that
needs it installs it with apt-get when running as root, so a fresh CI machine passes too.
"""

import os
import shutil
import subprocess

import pytest

CANDIDATES = ("/usr/bin/chromium", "/usr/bin/chromium-browser", "/usr/bin/google-chrome")


def chromium_path() -> str:
    """The path of a Chromium executable, installing Debian's package if none is found."""
    found = os.environ.get("MMTL_CHROMIUM") or next((p for p in CANDIDATES if os.path.exists(p)), None)
    if found:
        return found
    if os.geteuid() != 0 or not shutil.which("apt-get"):
        pytest.skip("no Chromium, and apt-get cannot install it here (not root, or no apt-get)")
    env = {**os.environ, "DEBIAN_FRONTEND": "noninteractive"}
    subprocess.run(["apt-get", "update", "-qq"], check=True, env=env)
    subprocess.run(["apt-get", "install", "-y", "-qq", "chromium"], check=True, env=env)
    return next(p for p in CANDIDATES if os.path.exists(p))
