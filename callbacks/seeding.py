"""Per-epoch reseeding, so a run resumed at an epoch boundary replays exactly.

Lightning checkpoints do not hold the global RNG state, so after a resume the
shuffle order, the flips and the DataLoader workers' seeds would all differ from
an uninterrupted run. Reseeding from (seed, stage, epoch) at the start of every
epoch makes each epoch's randomness a function of its number alone. It runs
before the epoch's DataLoader iterator is created, which is when the sampler and
the workers draw their seeds from the global RNG.
"""

from __future__ import annotations

import random

import lightning as L
import numpy as np
import torch


class EpochSeedCallback(L.Callback):
    """Reseed python, numpy and torch at the start of every training epoch.

    Args:
        seed: the run's seed.
        stage: the training stage (1 or 2), so the stages draw different streams.
    """

    def __init__(self, seed: int, stage: int) -> None:
        self.seed = seed
        self.stage = stage

    def on_train_epoch_start(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        # Ranks get different streams (their flips should differ), all repeatable.
        epoch_seed = (self.seed * 1_000_003 + self.stage * 10_007 + trainer.current_epoch * 101
                      + trainer.global_rank) % (2**32)
        random.seed(epoch_seed)
        np.random.seed(epoch_seed)
        torch.manual_seed(epoch_seed)
