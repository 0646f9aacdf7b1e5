"""Runs one facecluster training in a DDP process and saves what this rank holds.

Lightning's ``ddp`` strategy starts the other ranks by re-running this script, so
each rank executes it whole: ``python ddp_train.py OUT_DIR key=value ...``.
"""

import sys
from pathlib import Path

import torch

from facecluster.config import load_config
from facecluster.pipeline import train

out, overrides = Path(sys.argv[1]), sys.argv[2:]
cfg = load_config(Path(__file__).resolve().parents[2] / "configs" / "smoke.yaml", overrides)
result = train(cfg)
rank = torch.distributed.get_rank() if torch.distributed.is_initialized() else 0
torch.save(
    {
        "subnets": result.subnets.state_dict(),
        "backbone": result.backbone.state_dict(),
        "class_means": result.assignment.class_means,
        "world_size": result.subnets.trainer.world_size,
    },
    out / f"rank{rank}.pt",
)
