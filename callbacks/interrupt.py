"""Say how to continue a run stopped by Ctrl-C.

Lightning catches the KeyboardInterrupt, prints "Detected KeyboardInterrupt,
attempting graceful shutdown ..." and ends the process with exit status 1, naming
neither the run folder nor the command that continues it. Its callbacks see the
interrupt first (``on_exception``): :class:`ResumeHint` prints that command, once,
from the process that started the run (not from a stage-2 job it launched, nor from
the other DDP ranks).
"""

from __future__ import annotations

import os
import sys
from pathlib import Path
from typing import Any

import lightning as L


class ResumeHint(L.Callback):
    """On Ctrl-C, print ``interrupted: continue with python train.py resume=<run>``."""

    def __init__(self, run_dir: str | Path, job_env: str) -> None:
        self.run_dir = Path(run_dir)
        self.job_env = job_env

    def on_exception(
        self, trainer: L.Trainer, pl_module: L.LightningModule, exception: Any
    ) -> None:
        if not isinstance(exception, KeyboardInterrupt) or not trainer.is_global_zero:
            return
        if os.environ.get(self.job_env):  # a stage-2 job: the command that started it says it
            return
        print(
            f"\ninterrupted: the run's last finished epoch is kept; continue it with\n"
            f"  python train.py resume={self.run_dir}",
            file=sys.stderr,
        )
