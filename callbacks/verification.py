"""Verification accuracy of the stage-1 backbone during training (``data.verification``)."""

from __future__ import annotations

import lightning as L
from lightning.pytorch.utilities import rank_zero_info

from facecluster.data.verification import VerificationPairs
from facecluster.inference.verification import verify


class VerificationCallback(L.Callback):
    """Every ``every_n_epochs`` stage-1 epochs, the 10-fold verification accuracy of the
    backbone on each set, logged as ``val/<set>_acc`` (W&B, CSV) and printed.

    Runs in global rank 0 only (the other ranks would compute the same figure), after
    the epoch's validation, under the trainer's precision, in eval mode.

    Args:
        sets: name -> pairs (:func:`facecluster.data.verification.load_pairs`).
        every_n_epochs: how often; the last epoch is always measured.
        image_size: the network input size.
        batch_size: images per forward pass.
    """

    def __init__(
        self,
        sets: dict[str, VerificationPairs],
        every_n_epochs: int,
        image_size: int,
        batch_size: int,
    ) -> None:
        if every_n_epochs < 1:
            raise ValueError(f"every_n_epochs must be >= 1, got {every_n_epochs}")
        self.sets, self.every = sets, every_n_epochs
        self.image_size, self.batch_size = image_size, batch_size

    def on_validation_epoch_end(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        epoch = trainer.current_epoch
        last = epoch + 1 >= (trainer.max_epochs or 0)
        if trainer.sanity_checking or not ((epoch + 1) % self.every == 0 or last):
            return
        if not trainer.is_global_zero:
            return
        backbone = pl_module.backbone
        training = backbone.training
        backbone.eval()
        try:
            with trainer.precision_plugin.forward_context():
                for name, pairs in self.sets.items():
                    result = verify(
                        backbone, pairs, self.image_size, self.batch_size, pl_module.device
                    )
                    pl_module.log(f"val/{name}_acc", result.accuracy, rank_zero_only=True)
                    rank_zero_info(
                        f"epoch {epoch}: {name} verification {result.accuracy:.2%} "
                        f"± {result.std:.2%} ({result.pairs} pairs, 10 folds)"
                    )
        finally:
            backbone.train(training)
