"""Report undecodable images found during training (data.on_bad_image=skip)."""

from __future__ import annotations

import logging

import lightning as L

logger = logging.getLogger(__name__)


class BadImageReport(L.Callback):
    """Print the number of undecodable images found so far at every training epoch end.

    First :meth:`FaceDataModule.share_bad_images`: under DDP every rank then knows the
    files all ranks found, and more than ``data.max_bad_fraction`` of a split broken
    stops every rank alike. Then reads :meth:`FaceDataModule.bad_images`. Does nothing
    for other datamodules.
    """

    def __init__(self) -> None:
        self._reported = 0

    def on_train_epoch_start(self, trainer: L.Trainer, pl_module) -> None:
        # what is known already (found by stage 1, its test, a sanity check) is not new
        # this epoch: the datamodule's list outlives each stage's Trainer
        datamodule = trainer.datamodule
        if hasattr(datamodule, "bad_images"):
            self._reported = len(datamodule.bad_images())

    def on_train_epoch_end(self, trainer: L.Trainer, pl_module) -> None:
        datamodule = trainer.datamodule
        if not hasattr(datamodule, "share_bad_images"):
            return
        datamodule.share_bad_images(trainer.strategy.root_device)
        bad = datamodule.bad_images()
        if len(bad) > self._reported and trainer.is_global_zero:
            logger.warning(
                "epoch %d: %d undecodable image(s) so far (%d new this epoch) were replaced "
                "by other images of the same identity (data.on_bad_image=skip): %s",
                trainer.current_epoch,
                len(bad),
                len(bad) - self._reported,
                ", ".join(bad[:5]) + (", ..." if len(bad) > 5 else ""),
            )
        self._reported = len(bad)
