"""Report undecodable images found during training (data.on_bad_image=skip)."""

from __future__ import annotations

import logging

import lightning as L

logger = logging.getLogger(__name__)


class BadImageReport(L.Callback):
    """Print the number of undecodable images found so far at every training epoch end.

    Reads :meth:`FaceDataModule.bad_images` of the trainer's datamodule; does nothing
    for other datamodules.
    """

    def __init__(self) -> None:
        self._reported = 0

    def on_train_epoch_end(self, trainer: L.Trainer, pl_module) -> None:
        bad_images = getattr(trainer.datamodule, "bad_images", None)
        if bad_images is None:
            return
        bad = bad_images()
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
