"""Train the two-stage clustered face-identification method.

    python train.py                                   # the bundled demo (configs/default.yaml)
    python train.py -c configs/smoke.yaml             # both stages in about a minute
    python train.py resume=runs/<run>                 # continue an interrupted run

``python train.py --help`` lists more; ``facecluster train`` is the same command
(facecluster/cli.py holds it).
"""

from __future__ import annotations

from facecluster.cli import exit_process
from facecluster.cli import train_main as main

if __name__ == "__main__":
    exit_process(main())
