"""Per-epoch reseeding, so a run resumed at an epoch boundary replays exactly.

Lightning checkpoints do not hold the global RNG state, so after a resume the
DataLoader workers' seeds and the model's own draws (dropout) would differ from an
uninterrupted run. This callback makes each epoch's global randomness a function of
(seed, stage, epoch, rank) alone. The shuffle and the mirrors do not use it: each
stage's sampler draws them from its own generator (``ShuffleSampler``,
``SubnetSampler``; stage 1's drew from it until 2026-12-06, at a moment that
depended on the worker count).

Where the reseed happens matters (lightning 2.6, measured with an RNG probe): an
epoch draws from the global RNG when its DataLoader iterator is created (the
workers' base seed). Later epochs create their iterator after ``on_train_epoch_end`` of the previous
epoch; the first epoch of a resumed fit creates it during ``configure_optimizers``
(``estimated_stepping_batches``), right after the checkpoint is restored. So the
seed of epoch e+1 is set at the end of epoch e, or, when resuming, in
``on_load_checkpoint``: both paths then draw the same number. Evaluation
loaders use their own generator, so the sanity check and validation draw nothing
from the global RNG in between. tests/test_resume.py checks the weights of an
interrupted and resumed run are bit-identical to an uninterrupted one.
"""

from __future__ import annotations

import random
from typing import Any

import lightning as L
import numpy as np
import torch


class EpochSeedCallback(L.Callback):
    """Reseed python, numpy and torch for every training epoch.

    Args:
        seed: the run's seed.
        stage: the training stage (1 or 2), so the stages draw different streams.
    """

    def __init__(self, seed: int, stage: int) -> None:
        self.seed = seed
        self.stage = stage
        self._resumed = False

    def reseed(self, epoch: int, rank: int) -> None:
        # Ranks get different streams (their flips should differ), all repeatable.
        epoch_seed = (self.seed * 1_000_003 + self.stage * 10_007 + epoch * 101 + rank) % 2**32
        random.seed(epoch_seed)
        np.random.seed(epoch_seed)
        torch.manual_seed(epoch_seed)

    def on_fit_start(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        if not self._resumed:  # a resumed fit was reseeded when its checkpoint loaded
            self.reseed(0, trainer.global_rank)

    def on_load_checkpoint(
        self, trainer: L.Trainer, pl_module: L.LightningModule, checkpoint: dict[str, Any]
    ) -> None:
        # facecluster checkpoints are written at epoch ends: the fit goes on with the next.
        self._resumed = True
        self.reseed(checkpoint["epoch"] + 1, trainer.global_rank)

    def on_train_epoch_end(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        self.reseed(trainer.current_epoch + 1, trainer.global_rank)
