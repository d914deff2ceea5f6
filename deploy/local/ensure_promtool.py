"""Make sure `promtool` is on this machine: tests/unit/test_compose.py checks the Prometheus
config, the alerting rules and their unit tests with it (and fails, never skips, without
it). As root on Debian it installs the `prometheus` package; otherwise it says what to install.

Run before the tests, like deploy.local.ensure_postgres: `python -m deploy.local.ensure_promtool`.
"""

import os
import shutil
import subprocess
import sys


def main() -> int:
    found = shutil.which("promtool")
    if found:
        print(f"promtool: {found}")
        return 0
    if os.geteuid() != 0 or not shutil.which("apt-get"):
        print("promtool is missing: install it (Debian: apt-get install -y --no-install-recommends prometheus)",
              file=sys.stderr)
        return 1
    env = {**os.environ, "DEBIAN_FRONTEND": "noninteractive"}
    subprocess.run(["apt-get", "update", "-q"], check=True, env=env)
    subprocess.run(["apt-get", "install", "-y", "-q", "--no-install-recommends", "prometheus"], check=True, env=env)
    # Only the promtool binary is wanted: never leave Debian's Prometheus service running.
    subprocess.run(["service", "prometheus", "stop"], env=env, check=False,
                   stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    found = shutil.which("promtool")
    print(f"promtool: {found}")
    return 0 if found else 1


if __name__ == "__main__":
    sys.exit(main())
