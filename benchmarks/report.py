#!/usr/bin/env python3
"""Benchmark JSON -> Markdown: ``python benchmarks/report.py RESULT.json [MORE.json ...] [-o OUT.md]``.

Each file is checked against the result schema (``ddpm_fast.bench.validate_result``) and rendered with
the same tables ``ddpm-fast bench`` writes beside its JSON: impl, batch, images/s, ms/step, MFU and the
ratios against diffusers and diffusers-compiled measured in the same run.
"""

import argparse
import json
import sys
from pathlib import Path

from ddpm_fast.bench import markdown_report, validate_result


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(prog="report.py", description=__doc__.split("\n\n")[0])
    parser.add_argument("results", nargs="+", type=Path, help="benchmark JSON files")
    parser.add_argument("-o", "--out", type=Path, default=None, help="write Markdown here (default: stdout)")
    args = parser.parse_args(argv)
    parts = []
    for path in args.results:
        try:
            result = json.loads(path.read_text(encoding="utf-8"))
            validate_result(result)
        except (OSError, ValueError) as exc:  # json.JSONDecodeError is a ValueError
            print(f"report.py: error: {path}: {exc}", file=sys.stderr)
            return 2
        parts.append(markdown_report(result))
    text = "\n".join(parts)
    if args.out:
        args.out.write_text(text, encoding="utf-8")
    else:
        sys.stdout.write(text)
    return 0


if __name__ == "__main__":
    sys.exit(main())
