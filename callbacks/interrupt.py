"""Say how to continue a run stopped by Ctrl-C.

Lightning catches the KeyboardInterrupt, prints "Detected KeyboardInterrupt,
attempting graceful shutdown ..." and ends the process with exit status 1, naming
neither the run folder nor the command that continues it. Its callbacks see the
interrupt first (``on_exception``): :class:`ResumeHint` prints that command, once,
from the process that started the run (not from a stage-2 job it launched, nor from
the other DDP ranks). Local stage-2 jobs run outside any Trainer of that process: the
pipeline prints :func:`resume_hint` when Ctrl-C stops them.
"""

from __future__ import annotations

import os
import sys
from pathlib import Path
from typing import Any

import lightning as L
from lightning.pytorch.utilities.exceptions import SIGTERMException


def resume_hint(run_dir: str | Path, stage: str = "all", why: str = "interrupted") -> str:
    """What to say when a run stops: the command that continues it (with the ``stage=``
    it ran, which a resume would otherwise take as ``all``)."""
    again = f" stage={stage}" if stage != "all" else ""
    return (
        f"\n{why}: continue the run (from its last finished epoch, if any) with\n"
        f"  python train.py resume={run_dir}{again}"
    )


class ResumeHint(L.Callback):
    """On Ctrl-C or SIGTERM (which Lightning turns into ``SIGTERMException`` at the next
    batch), print :func:`resume_hint`."""

    def __init__(self, run_dir: str | Path, stage: str, job_env: str) -> None:
        self.run_dir = Path(run_dir)
        self.stage = stage
        self.job_env = job_env

    def on_exception(
        self, trainer: L.Trainer, pl_module: L.LightningModule, exception: Any
    ) -> None:
        stopped = isinstance(exception, KeyboardInterrupt | SIGTERMException)
        if not stopped or not trainer.is_global_zero:
            return
        if os.environ.get(self.job_env):  # a stage-2 job: its parent says it
            return
        print(resume_hint(self.run_dir, self.stage), file=sys.stderr)
