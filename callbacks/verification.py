"""Verification accuracy of the stage-1 backbone during training (``data.verification``)."""

from __future__ import annotations

from pathlib import Path

import lightning as L
import torch
from lightning.pytorch.utilities import rank_zero_info

from facecluster.callbacks.interrupt import sigterm_received
from facecluster.config import naming
from facecluster.data.verification import VerificationPairs, load_pairs, named_sets
from facecluster.inference.verification import verify


class VerificationCallback(L.Callback):
    """Every ``every_n_epochs`` stage-1 epochs, the 10-fold verification accuracy of the
    backbone on each set, logged as ``val/<set>_acc`` (W&B, CSV) and printed.

    At the end of a training epoch (after its validation, if any), in global rank 0
    only: the other ranks would compute the same figure, and only rank 0 reads the
    sets (on first use). Under the trainer's precision, in eval mode. The last epoch
    is always measured, also when the run stops early.

    The sets were read whole before training (``check_verification_sets``, in
    facecluster/builders.py) and dropped; they are read again, whole, on first use
    (under a second for lfw.bin's 12,000 images here), and a set that fails then
    (changed since) stops the run with the same error: a ``ConfigError`` naming the
    file and, for an image, its index and pair.

    A SIGTERM to rank 0 ends the measurement at its next batch, unlogged: the epoch's
    checkpoint is saved after it, and a SLURM job's grace period (30 s by default) may
    be shorter than a measurement of several sets with a large backbone; the run then
    stops as at any batch (:class:`facecluster.callbacks.StopTogether`).

    Args:
        paths: the sets (``.bin`` files or ``pairs.txt`` with ``images/`` beside).
        every_n_epochs: how often.
        image_size: the network input size.
        batch_size: images per forward pass.
    """

    def __init__(
        self, paths: list[Path], every_n_epochs: int, image_size: int, batch_size: int
    ) -> None:
        if every_n_epochs < 1:
            raise ValueError(f"every_n_epochs must be >= 1, got {every_n_epochs}")
        self.paths, self.every = named_sets(list(paths)), every_n_epochs
        self.image_size, self.batch_size = image_size, batch_size
        self._sets: dict[str, VerificationPairs] | None = None

    def measures(self, trainer: L.Trainer) -> bool:
        """Whether the epoch ending now is measured: every ``every_n_epochs``, and the
        last (stopped early, the last of ``max_epochs``, or ``max_steps`` reached, which
        ends the fit without ``should_stop``)."""
        epoch = trainer.current_epoch
        steps = trainer.max_steps not in (None, -1) and trainer.global_step >= trainer.max_steps
        epochs = (trainer.max_epochs or 0) > 0 and epoch + 1 >= trainer.max_epochs
        return (epoch + 1) % self.every == 0 or trainer.should_stop or steps or epochs

    def on_train_epoch_end(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        epoch = trainer.current_epoch
        if not self.measures(trainer) or not trainer.is_global_zero:
            return
        if self._sets is None:
            with naming("data.verification"):
                self._sets = {name: load_pairs(p) for name, p in self.paths.items()}
        backbone = pl_module.backbone
        training = backbone.training

        def embed(x: torch.Tensor) -> torch.Tensor:
            if sigterm_received():
                raise _Stopped
            return backbone(trainer.precision_plugin.convert_input(x))  # *-true: its dtype

        backbone.eval()
        try:
            with torch.inference_mode(), trainer.precision_plugin.forward_context():
                for name, pairs in self._sets.items():
                    try:
                        result = verify(
                            embed, pairs, self.image_size, self.batch_size, pl_module.device
                        )
                    except _Stopped:
                        rank_zero_info(
                            f"epoch {epoch}: SIGTERM: {name} verification stopped, not "
                            "logged; the epoch is saved, then the run stops"
                        )
                        return
                    pl_module.log(f"val/{name}_acc", result.accuracy, rank_zero_only=True)
                    rank_zero_info(
                        f"epoch {epoch}: {name} verification {result.accuracy:.2%} "
                        f"± {result.std:.2%} ({result.pairs} pairs, 10 folds)"
                    )
        finally:
            backbone.train(training)


class _Stopped(Exception):
    """A SIGTERM ended a verification measurement."""
