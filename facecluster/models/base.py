"""What both stages' LightningModules share: optimizer, schedule, checkpoint metadata."""

from __future__ import annotations

from collections.abc import Iterable
from typing import Any

import lightning as L
import torch
from torch import nn

from facecluster.models.optim import build_optimizer, build_scheduler, param_groups

CHECKPOINT_KEY = "facecluster"
"""Key under which every facecluster checkpoint stores its stage and resolved config."""


class StageSystem(L.LightningModule):
    """Base of BackboneSystem (stage 1) and SubnetSystem (stage 2).

    Subclasses set ``stage``, save ``optim`` and ``config`` hyper-parameters and
    list the modules they train in ``trained_modules``.
    """

    stage: int

    def trained_modules(self) -> Iterable[nn.Module]:
        raise NotImplementedError

    def backbones(self) -> Iterable[nn.Module]:
        """The networks that embed images (what ``model.compile`` compiles)."""
        raise NotImplementedError

    def configure_model(self) -> None:
        """The ``model`` section's speed options, applied once before the Trainer runs.

        ``model.channels_last``: weights in NHWC memory order (tensor cores' layout;
        convolutions then run channels-last whatever the input's order).
        ``model.compile``: ``torch.compile`` each backbone in place
        (``nn.Module.compile``), so parameter names and checkpoints are unchanged.
        """
        if getattr(self, "_speed_applied", False):
            return
        self._speed_applied = True
        model = (self.hparams.get("config") or {}).get("model", {})
        if model.get("channels_last"):
            self.to(memory_format=torch.channels_last)
        if model.get("compile"):
            for backbone in self.backbones():
                backbone.compile()

    def configure_optimizers(self) -> dict[str, Any]:
        optim = self.hparams.optim
        optimizer = build_optimizer(
            param_groups(self.trained_modules(), optim["weight_decay"]), optim
        )
        # estimated_stepping_batches accounts for devices, accumulation and limits.
        scheduler = build_scheduler(
            optimizer, self.trainer.estimated_stepping_batches, self.trainer.max_epochs, optim
        )
        return {"optimizer": optimizer, "lr_scheduler": scheduler}

    def on_save_checkpoint(self, checkpoint: dict[str, Any]) -> None:
        checkpoint[CHECKPOINT_KEY] = {"stage": self.stage, "config": self.hparams.config}
