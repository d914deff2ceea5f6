"""Make sure PostgreSQL's server binaries are on this machine (the tests and `make up` run
their own cluster). As root on Debian it installs the `postgresql` package; otherwise it
says what to install."""

import os
import shutil
import subprocess
import sys

from deploy.local.infra import pg_bindir


def main() -> int:
    try:
        print(f"PostgreSQL binaries: {pg_bindir()}")
        return 0
    except RuntimeError:
        pass
    if os.geteuid() != 0 or not shutil.which("apt-get"):
        print("PostgreSQL server binaries are missing: install them (Debian: apt-get install -y postgresql)",
              file=sys.stderr)
        return 1
    env = {**os.environ, "DEBIAN_FRONTEND": "noninteractive"}
    subprocess.run(["apt-get", "update", "-q"], check=True, env=env)
    subprocess.run(["apt-get", "install", "-y", "-q", "--no-install-recommends", "postgresql"], check=True, env=env)
    # Debian's package starts a system cluster on 5432; we never use it.
    subprocess.run(["service", "postgresql", "stop"], env=env, check=False)
    print(f"PostgreSQL binaries: {pg_bindir()}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
