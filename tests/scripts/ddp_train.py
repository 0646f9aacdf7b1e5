"""Runs one facecluster training in a DDP process and saves what this rank holds.

Lightning's ``ddp`` strategy starts the other ranks by re-running this script, so
each rank executes it whole: ``python ddp_train.py OUT_DIR key=value ...``.
With ``resume=RUN`` among the overrides the run's own config is resumed; with the
environment variable SAVE_AT_START=PATH, stage 1 saves a checkpoint to PATH as its
fit starts (after any resume), for comparison with the checkpoint it resumed from.
With RANK0_FAILS_ALONE=1, at stage 1's first epoch end each rank writes its process
id to OUT_DIR/pid<rank>, then rank 0 raises while the others wait outside any gloo
collective, as ranks blocked in an NCCL collective wait (for its timeout).
With SIGTERM_RANK=r, rank r sends itself SIGTERM at stage 1's first epoch end, and rank
0 takes 12 s to stop (as a logger that finishes its upload): the script ends as
train.py does, 143 on SIGTERM.
"""

import os
import signal
import sys
import time
from pathlib import Path

import lightning as L
import torch

from facecluster.config import load_config
from facecluster.pipeline import train
from facecluster.run import RunFolder


class SaveAtStart(L.Callback):
    def __init__(self, path: str) -> None:
        self.path = path

    def on_train_start(self, trainer, pl_module):
        if pl_module.stage == 1:
            trainer.save_checkpoint(self.path)  # every rank takes part


class Rank0FailsAlone(L.Callback):
    def __init__(self, out: Path) -> None:
        self.out = out

    def on_train_epoch_end(self, trainer, pl_module):
        (self.out / f"pid{trainer.global_rank}").write_text(str(os.getpid()))
        if trainer.global_rank == 0:
            raise RuntimeError("rank 0 fails alone (injected)")
        time.sleep(600)


class SigtermToOneRank(L.Callback):
    def __init__(self, rank: int) -> None:
        self.rank = rank

    def on_train_epoch_end(self, trainer, pl_module):
        if trainer.global_rank == self.rank and trainer.current_epoch == 0:
            os.kill(os.getpid(), signal.SIGTERM)

    def on_exception(self, trainer, pl_module, exception):
        if trainer.global_rank == 0:
            time.sleep(12)  # past two polls of Lightning's child-process observer (5 s)


out, overrides = Path(sys.argv[1]), sys.argv[2:]
resume = [o.split("=", 1)[1] for o in overrides if o.startswith("resume=")]
if resume:
    rest = [o for o in overrides if not o.startswith("resume=")]
    cfg = RunFolder.config_for_resume(resume[0], rest)
else:
    cfg = load_config(Path(__file__).resolve().parents[2] / "configs" / "smoke.yaml", overrides)
start = os.environ.get("SAVE_AT_START")
callbacks = [SaveAtStart(start)] if start else []
if os.environ.get("RANK0_FAILS_ALONE"):
    callbacks.append(Rank0FailsAlone(out))
if os.environ.get("SIGTERM_RANK"):
    callbacks.append(SigtermToOneRank(int(os.environ["SIGTERM_RANK"])))
try:
    result = train(cfg, callbacks=callbacks)
except SystemExit as e:  # Lightning's SIGTERMException, as train.py ends on it
    sys.exit(143 if e.code is None else e.code)
if result.subnets is None:  # stage=1
    sys.exit(0)
rank = torch.distributed.get_rank() if torch.distributed.is_initialized() else 0
torch.save(
    {
        "subnets": result.subnets.state_dict(),
        "backbone": result.backbone.state_dict(),
        "class_means": result.assignment.class_means,
        "assignment": result.assignment.to_dict(),
        "world_size": result.subnets.trainer.world_size,
    },
    out / f"rank{rank}.pt",
)
