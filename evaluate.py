"""Evaluate finished runs on their held-out test split and print one table.

    python evaluate.py run=runs/<run>                          # one run
    python evaluate.py run=runs/a run=runs/b run=runs/c        # the paper's comparison

``python evaluate.py --help`` lists more; ``facecluster evaluate`` is the same
command (facecluster/cli.py holds it).
"""

from __future__ import annotations

from facecluster.cli import evaluate_main as main
from facecluster.cli import exit_process

if __name__ == "__main__":
    exit_process(main())
