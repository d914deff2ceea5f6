"""Make sure Debian's Chromium is on this machine: the browser tests drive it headless
through playwright (tests/support/browser.py), whose own browser download cannot work
offline. As root on Debian it installs the `chromium` package; otherwise it says what to
install.

Run before the tests, like deploy.local.ensure_postgres: `python -m deploy.local.ensure_chromium`.
"""

import os
import shutil
import subprocess
import sys
from pathlib import Path

CHROMIUM = Path("/usr/bin/chromium")


def main() -> int:
    if CHROMIUM.exists():
        print(f"chromium: {CHROMIUM}")
        return 0
    if os.geteuid() != 0 or not shutil.which("apt-get"):
        print(f"chromium is missing ({CHROMIUM}): install it (Debian: apt-get install -y chromium)", file=sys.stderr)
        return 1
    env = {**os.environ, "DEBIAN_FRONTEND": "noninteractive"}
    subprocess.run(["apt-get", "update", "-q"], check=True, env=env)
    subprocess.run(["apt-get", "install", "-y", "-q", "chromium"], check=True, env=env)
    print(f"chromium: {CHROMIUM}" if CHROMIUM.exists() else f"chromium: still missing at {CHROMIUM}")
    return 0 if CHROMIUM.exists() else 1


if __name__ == "__main__":
    sys.exit(main())
