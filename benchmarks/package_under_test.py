"""For the data benchmarks that run today's package beside the new one: every child process must import
the ddpm_fast its PYTHONPATH names. ``python -c``/``-m`` put the current folder first on sys.path, so a child
started inside the repository would import the repository's package whatever PYTHONPATH says: run the
children from a folder outside it, and check."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path


def leave_repo(folder: Path) -> None:
    """Make ``folder`` (outside the repository) the working folder every child inherits."""
    folder.mkdir(parents=True, exist_ok=True)
    os.chdir(folder)


def check(pythonpath: Path) -> None:
    """Exit unless a child with PYTHONPATH=pythonpath imports ddpm_fast from there."""
    env = {**os.environ, "PYTHONPATH": str(pythonpath)}
    got = subprocess.run([sys.executable, "-c", "import ddpm_fast; print(ddpm_fast.__file__)"], env=env,
                         capture_output=True, text=True).stdout.strip()
    if not got.startswith(str(pythonpath.resolve())):
        raise SystemExit(f"a child with PYTHONPATH={pythonpath} imports ddpm_fast from {got}")
