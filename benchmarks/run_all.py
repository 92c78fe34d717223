"""Runs every benchmark in this folder and prints one table of ratios against the peers.

Each ``bench_*.py`` module exposes ``main(argv) -> list[dict]`` (see ``_common.row``).
Usage: ``python benchmarks/run_all.py [--quick] [--only core,metrics] [--json out.json]``.
"""

from __future__ import annotations

import argparse
import datetime
import importlib
import json
import os
import sys
import traceback

HERE = os.path.dirname(os.path.abspath(__file__))
sys.path.insert(0, HERE)

from _common import machine, print_table  # noqa: E402


def discover():
    return sorted(f[len("bench_") : -3] for f in os.listdir(HERE) if f.startswith("bench_") and f.endswith(".py"))


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true", help="pass --quick to every benchmark")
    parser.add_argument("--only", default="", help="comma-separated names, e.g. core,metrics")
    parser.add_argument("--json", default="", help="also write the rows to this JSON file")
    args = parser.parse_args(argv)
    names = [n for n in args.only.split(",") if n] or discover()
    rows, failed = [], []
    for name in names:
        module = importlib.import_module(f"bench_{name}")
        print(f"running bench_{name} ...", file=sys.stderr, flush=True)
        try:
            rows += module.main(["--quick"] if args.quick else [])
        except Exception:  # keep going: one broken benchmark must not hide the others
            traceback.print_exc()
            failed.append(name)
    stamp = datetime.date.today().isoformat()
    print(f"# benchmarks on {machine()}, {stamp}")
    print_table(rows)
    if args.json:
        with open(args.json, "w") as f:
            json.dump({"machine": machine(), "date": stamp, "rows": rows}, f, indent=2)
    if failed:
        print(f"failed: {', '.join(failed)}", file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
