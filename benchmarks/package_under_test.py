"""For the data benchmarks that run today's package beside the new one: every child process must import
the ddpm_fast its PYTHONPATH names. ``python -c``/``-m`` put the current folder first on sys.path, so a child
started inside the repository would import the repository's package whatever PYTHONPATH says: run the
children from a folder outside it, and check."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]


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


def parse(p, tmp_default: str):
    """Add --old, --tmp and --out to the argparse parser ``p``, parse, resolve the paths (before leaving the
    repository), make the children run outside it and check both packages. Returns the arguments."""
    p.add_argument("--old", type=Path, required=True,
                   help="today's package: git archive ef18338 ddpm_fast | tar -x -C DIR")
    p.add_argument("--tmp", type=Path, default=Path(tmp_default), help="scratch folder (large files)")
    p.add_argument("--out", type=Path, help="results JSON")
    args = p.parse_args()
    args.old, args.tmp = args.old.resolve(), args.tmp.resolve()
    args.out = args.out.resolve() if args.out else None
    leave_repo(args.tmp.parent)
    check(REPO)
    check(args.old)
    return args
