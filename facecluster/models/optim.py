"""Optimizers and learning-rate schedules shared by both stages.

Plain torch. Schedules are stepped every optimizer step (warm-up then cosine or
polynomial decay, the arcface_torch recipe); the total step count comes from
Lightning's ``estimated_stepping_batches`` so it is right for any dataset size,
device count or accumulation.
"""

from __future__ import annotations

import fnmatch
import math
from collections.abc import Iterable
from typing import Any

import torch
from torch import nn

OPTIM_KEYS = (
    "name",
    "lr",
    "momentum",
    "weight_decay",
    "betas",
    "scheduler",
    "warmup_epochs",
    "min_lr_ratio",
    "poly_power",
)
"""The keys of a ``stageN.optim`` section, every one of which the stages read."""


def check_optim(optim: dict[str, Any]) -> None:
    """Refuse an ``optim`` dict that lacks keys (a partial one, from Python), naming
    them: ``configure_optimizers`` stopped with ``KeyError: 'name'``."""
    missing = [key for key in OPTIM_KEYS if key not in optim]
    if missing:
        raise ValueError(
            f"optim lacks {', '.join(map(repr, missing))}: give a whole stageN.optim "
            "section, e.g. dataclasses.asdict(facecluster.config.OptimConfig(lr=0.05))"
        )


def param_groups(modules: Iterable[nn.Module], weight_decay: float) -> list[dict[str, Any]]:
    """Split parameters into decayed weights and undecayed norms/biases.

    Every parameter of one dimension or none (norm layers, biases, PReLU slopes) is
    exempt: decay only shrinks them toward zero without regularising capacity. So are
    the parameters a timm model names in its ``no_weight_decay()`` (a ViT's position
    embedding and class token). This is timm's optimizer factory's rule; arcface_torch
    (``train_v2.py``) decays every parameter. The margin heads' rows are decayed.
    """
    decay, no_decay = [], []
    for module in modules:
        exempt = _no_weight_decay(module)
        for p in module.parameters():
            if not p.requires_grad:
                continue
            (no_decay if p.ndim <= 1 or id(p) in exempt else decay).append(p)
    return [
        {"params": decay, "weight_decay": weight_decay},
        {"params": no_decay, "weight_decay": 0.0},
    ]


def _no_weight_decay(module: nn.Module) -> set[int]:
    """ids of the parameters that ``module`` or any of its sub-modules lists in its
    ``no_weight_decay()`` (timm's convention: names relative to that sub-module)."""
    exempt: set[int] = set()
    for sub in module.modules():
        names = getattr(sub, "no_weight_decay", None)
        if callable(names):
            patterns = list(names())  # names or wildcards ("pos_embed.*"), as timm matches
            exempt.update(
                id(p)
                for name, p in sub.named_parameters()
                if any(fnmatch.fnmatch(name, pattern) for pattern in patterns)
            )
    return exempt


def build_optimizer(groups: list[dict[str, Any]], optim: dict[str, Any]) -> torch.optim.Optimizer:
    """An SGD or AdamW optimizer from the ``stageN.optim`` section."""
    if optim["name"] == "sgd":
        return torch.optim.SGD(groups, lr=optim["lr"], momentum=optim["momentum"])
    if optim["name"] == "adamw":
        return torch.optim.AdamW(groups, lr=optim["lr"], betas=tuple(optim["betas"]))
    raise ValueError(f"unknown optimizer {optim['name']!r}; valid: sgd, adamw")


def lr_factor(step: int, total_steps: int, warmup_steps: int, optim: dict[str, Any]) -> float:
    """Multiplier of the peak learning rate at optimizer step ``step``."""
    if warmup_steps > 0 and step < warmup_steps:
        return (step + 1) / warmup_steps
    if optim["scheduler"] == "constant":
        return 1.0
    progress = min(1.0, (step - warmup_steps) / max(1, total_steps - warmup_steps))
    floor = optim["min_lr_ratio"]
    if optim["scheduler"] == "cosine":
        return floor + (1.0 - floor) * 0.5 * (1.0 + math.cos(math.pi * progress))
    if optim["scheduler"] == "poly":
        return floor + (1.0 - floor) * (1.0 - progress) ** optim["poly_power"]
    raise ValueError(f"unknown scheduler {optim['scheduler']!r}; valid: cosine, poly, constant")


def warmup_steps(optim: dict[str, Any], steps_per_epoch: float) -> int:
    """Optimizer steps of ``optim``'s warm-up, given in epochs of ``steps_per_epoch``."""
    return int(round(optim["warmup_epochs"] * steps_per_epoch))


def build_scheduler(
    optimizer: torch.optim.Optimizer,
    total_steps: int,
    max_epochs: int,
    optim: dict[str, Any],
    steps_per_epoch: float | None = None,
) -> dict[str, Any]:
    """A per-step LambdaLR in Lightning's ``lr_scheduler`` config format.

    ``steps_per_epoch``: optimizer steps of one epoch, the unit of ``warmup_epochs``
    (None: ``total_steps / max_epochs``, which ``trainer.max_steps`` would shrink)."""
    total_steps = max(1, int(total_steps))
    per_epoch = steps_per_epoch if steps_per_epoch else total_steps / max(1, max_epochs)
    warmup = warmup_steps(optim, per_epoch)
    scheduler = torch.optim.lr_scheduler.LambdaLR(
        optimizer, lambda step: lr_factor(step, total_steps, warmup, optim)
    )
    return {"scheduler": scheduler, "interval": "step", "frequency": 1}
