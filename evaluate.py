"""Evaluate finished runs on their held-out test split and print one table.

    python evaluate.py run=runs/<run>                          # one run
    python evaluate.py run=runs/a run=runs/b run=runs/c        # the paper's comparison
    python evaluate.py run=runs/<run> data.root=/data/faces route.top_m=2 eval.batch_size=128

Other key=value pairs override the runs' saved configs (docs/EVALUATION.md). The
table, its CSV/JSON and plots are written to <run>/eval/.
"""

from __future__ import annotations

import argparse
import sys

from facecluster.config import ConfigError
from facecluster.evaluation import evaluate_runs


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        description=__doc__.split("\n\n")[0],
        formatter_class=argparse.RawDescriptionHelpFormatter,
        epilog=__doc__.split("\n\n", 1)[1],
    )
    parser.add_argument(
        "args", nargs="+", help="run=<run dir> (repeatable) and key=value overrides"
    )
    args = parser.parse_args(argv)
    runs = [a.split("=", 1)[1] for a in args.args if a.startswith("run=")]
    overrides = [a for a in args.args if not a.startswith("run=")]
    if not runs:
        parser.error("give at least one run=<run dir>")
    try:
        print(evaluate_runs(runs, overrides))
    except ConfigError as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    return 0


if __name__ == "__main__":
    sys.exit(main())
