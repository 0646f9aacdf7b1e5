"""What both stages' LightningModules share: optimizer, schedule, checkpoint metadata,
and the margin heads' sharding across DDP processes (Partial FC)."""

from __future__ import annotations

import math
import warnings
from collections.abc import Iterable
from typing import Any

import lightning as L
import torch
import torch.distributed as dist
from lightning.pytorch.utilities import rank_zero_warn
from torch import Tensor, nn

from facecluster.models.components import MarginHead
from facecluster.models.components.partial_fc import gather_to_first
from facecluster.models.optim import (
    build_optimizer,
    build_scheduler,
    check_optim,
    param_groups,
    warmup_steps,
)

CHECKPOINT_KEY = "facecluster"
"""Key under which every facecluster checkpoint stores its stage and resolved config."""


class StageSystem(L.LightningModule):
    """Base of BackboneSystem (stage 1) and SubnetSystem (stage 2).

    Subclasses set ``stage``, save ``optim`` and ``config`` hyper-parameters, list the
    modules they train in ``trained_modules`` and their margin heads in ``margin_heads``.

    Under DDP (more than one process) every margin head is sharded: each process keeps
    its rows and their optimizer state, DDP leaves them alone, and the heads'
    ``loss``/``predict`` communicate (partial_fc.py). Checkpoints always hold the whole
    (logical) head and its optimizer state, gathered on save and split on load, so a
    run resumes, evaluates and exports on any number of processes.
    """

    stage: int

    def trained_modules(self) -> Iterable[nn.Module]:
        raise NotImplementedError

    def backbones(self) -> Iterable[nn.Module]:
        """The networks that embed images (what ``model.compile`` compiles)."""
        raise NotImplementedError

    def margin_heads(self) -> dict[str, MarginHead]:
        """The margin heads, by module name (``head``, ``heads.<k>``)."""
        raise NotImplementedError

    def replicated_buffers(self) -> list[str]:
        """Buffers every process sets alike and training never changes: DDP need not
        broadcast them before each forward (stage 2's cluster maps, two [C] int64)."""
        return []

    def clip_groups(self) -> list[list[nn.Module]]:
        """The sets of modules whose gradients are clipped together (by norm)."""
        return [list(self.trained_modules())]

    def configure_model(self) -> None:
        """Shard the margin heads under DDP, then apply the ``model`` section's speed
        options, once, before the Trainer runs.

        ``model.channels_last``: weights in NHWC memory order (tensor cores' layout;
        convolutions then run channels-last whatever the input's order).
        ``model.compile``: ``torch.compile`` each backbone in place
        (``nn.Module.compile``), so parameter names and checkpoints are unchanged.
        """
        try:
            trainer = self.trainer
        except RuntimeError:  # load_from_checkpoint: no Trainer, the heads stay whole
            trainer = None
        if trainer is not None and trainer.world_size > 1:
            self.shard_heads(trainer.global_rank, trainer.world_size)
        if getattr(self, "_speed_applied", False):
            return
        self._speed_applied = True
        model = (self.hparams.get("config") or {}).get("model", {})
        if model.get("channels_last"):
            self.to(memory_format=torch.channels_last)
        if model.get("compile"):
            for backbone in self.backbones():
                backbone.compile()

    def shard_heads(self, rank: int, world: int) -> None:
        """Keep shard ``rank`` of ``world`` of every margin head (``MarginHead.shard``);
        configure_model calls it under DDP, before the optimizer is built."""
        heads = self.margin_heads()
        for head in heads.values():
            if not head.sharded:
                head.shard(rank, world)
        # A shard differs by process and its gradient is complete without communication:
        # DDP must neither broadcast nor average it.
        self._ddp_params_and_buffers_to_ignore = [
            *(f"{name}.weight" for name in heads),
            *self.replicated_buffers(),
        ]

    def _param_groups(self) -> list[dict[str, Any]]:
        return param_groups(self.trained_modules(), self.hparams.optim["weight_decay"])

    def _sharded_states(
        self, checkpoint: dict[str, Any]
    ) -> list[tuple[MarginHead, dict[str, Any], str]]:
        """(head, dict, key) of each sharded head's tensor in a checkpoint: its weight
        and every optimizer state of the weight's shape (momentum, Adam's moments)."""
        sharded = {name: h for name, h in self.margin_heads().items() if h.sharded}
        if not sharded:
            return []
        order = [id(p) for group in self._param_groups() for p in group["params"]]
        found = []
        for name, head in sharded.items():
            found.append((head, checkpoint["state_dict"], f"{name}.weight"))
            index = order.index(id(head.weight))
            for optimizer in checkpoint.get("optimizer_states", []):
                if index not in optimizer["state"]:
                    continue
                # a copy: Optimizer.state_dict() shares each parameter's live state dict
                state = optimizer["state"][index] = dict(optimizer["state"][index])
                found += [(head, state, key) for key in sorted(state) if _row_state(state[key])]
        return found

    def configure_gradient_clipping(
        self,
        optimizer: torch.optim.Optimizer,
        gradient_clip_val: float | None = None,
        gradient_clip_algorithm: str | None = None,
    ) -> None:
        # Each clip group on its own (stage 2: one exploding sub-net must not shrink the
        # others' steps), and a sharded head's norm summed over its shards: clipping by
        # the local shard alone would scale the backbone differently on each process.
        if not gradient_clip_val:
            return
        for modules in self.clip_groups():
            clip_gradients_(modules, gradient_clip_val, gradient_clip_algorithm)

    def configure_optimizers(self) -> dict[str, Any]:
        optim = self.hparams.optim
        # here, not when the system is built: one built for inference or a memory
        # measurement needs no optimizer settings
        check_optim(optim)
        optimizer = build_optimizer(self._param_groups(), optim)
        # estimated_stepping_batches accounts for devices, accumulation and limits.
        total = self.trainer.estimated_stepping_batches  # also sets num_training_batches
        unit = self._warmup_unit(total)
        scheduler = build_scheduler(optimizer, total, self.trainer.max_epochs, optim, unit)
        warmup = warmup_steps(optim, unit)
        capped = self.trainer.max_steps not in (None, -1)
        if capped and not math.isinf(total) and warmup > total:
            # a binding trainer.max_steps (a warm-up longer than the stage's epochs is
            # refused for a new run by the config): often a try-out; warned of, not refused
            key = f"stage{self.stage}.optim.warmup_epochs"
            rank_zero_warn(
                f"trainer.max_steps={self.trainer.max_steps} ends stage {self.stage} after "
                f"{int(total)} optimizer steps, within its warm-up of {warmup} ({key}="
                f"{optim['warmup_epochs']:g}): its learning rate only ramps up, to "
                f"{total / warmup:.0%} of its peak, and never decays"
            )
        return {"optimizer": optimizer, "lr_scheduler": scheduler}

    def _warmup_unit(self, total: float) -> float:
        """Optimizer steps of one epoch, the unit of ``warmup_epochs``: a binding
        ``trainer.max_steps``, which caps ``total``, does not shorten an epoch."""
        batches = self.trainer.num_training_batches
        if math.isinf(batches) or math.isinf(total):
            return total / max(1, self.trainer.max_epochs)
        return math.ceil(batches / self.trainer.accumulate_grad_batches)

    def on_save_checkpoint(self, checkpoint: dict[str, Any]) -> None:
        checkpoint[CHECKPOINT_KEY] = {
            "stage": self.stage,
            "config": self.hparams.config,
        }
        # Every process takes part; rank 0, which writes the file, gets the whole rows.
        for head, holder, key in self._sharded_states(checkpoint):
            whole = gather_to_first(holder[key], head.num_classes)
            if whole is not None:
                holder[key] = whole

    def on_load_checkpoint(self, checkpoint: dict[str, Any]) -> None:
        # Checkpoints hold whole heads: this process keeps its rows. Lightning calls this
        # after configure_model (heads sharded) and before loading weights and optimizer.
        for head, holder, key in self._sharded_states(checkpoint):
            whole = holder[key]
            if whole.shape[0] != head.num_classes:
                raise ValueError(
                    f"checkpoint {key} has {whole.shape[0]} rows, this head has "
                    f"{head.num_classes} identities"
                )
            holder[key] = whole[head.row_start : head.row_start + len(head.weight)].clone()
        # the file is read memory-mapped: training on the CPU the optimizer would keep
        # its state in the mapped pages, and the replaced last.ckpt's disk blocks stay
        # allocated until the process exits (one checkpoint more for the rest of the
        # run). On a GPU the optimizer copies its state to the device, all but AdamW's
        # 0-d `step` counts (torch and Lightning leave them on the CPU): those are copied
        # here, a few bytes each, or each would hold the whole mapping.
        try:
            on_cpu = self.trainer.strategy.root_device.type == "cpu"
        except RuntimeError:  # no trainer (load_from_checkpoint): no optimizer restored
            on_cpu = False
        if "optimizer_states" in checkpoint:
            checkpoint["optimizer_states"] = [
                {
                    **optimizer,
                    "state": {i: _own(s, on_cpu) for i, s in optimizer["state"].items()},
                }
                for optimizer in checkpoint["optimizer_states"]
            ]

    def on_train_epoch_end(self) -> None:
        self.sync_buffers()

    def sync_buffers(self) -> None:
        """Give every DDP process rank 0's buffers (BatchNorm's running statistics).

        DDP copies rank 0's buffers to the others at the start of each training
        forward, and each process then updates them with its own batch: after the last
        step the other processes' BatchNorm statistics are not those of the model that
        rank 0 saves. A validation pass happens to copy them again; without one (no
        validation at the last epoch, ``data.val_fraction=0``), the class means (each
        process embeds its share of the images) and the stage's test used models that
        were never saved: class means up to 0.03 off the saved backbone's in
        ``tests/test_ddp.py``'s 2-process run. Called at the end of every training epoch, before the
        clustering, the test and the checkpoint; the next training forward would have
        overwritten them anyway, so training does not change.
        """
        if not (dist.is_available() and dist.is_initialized()) or dist.get_world_size() == 1:
            return
        ignored = set(getattr(self, "_ddp_params_and_buffers_to_ignore", ()))
        for name, buffer in self.named_buffers():
            if name not in ignored:  # the same on every process already
                dist.broadcast(buffer, src=0)

    def on_fit_start(self) -> None:
        # the run's resolved config, as config.yaml holds it, is what the logger keeps
        # (the modules' own hyper-parameters are not logged: see save_hyperparameters)
        if self.logger is not None and self.hparams.get("config") is not None:
            self.logger.log_hyperparams({"config": self.hparams.config})
        # A resume under trainer.max_steps: Lightning then counts training in steps and
        # takes any restored loop state for a restart inside an epoch, so an epoch-end
        # checkpoint (every checkpoint facecluster saves) had its next epoch counted as
        # done without a batch (Lightning issue #19617's family; a stage one epoch short,
        # its record not). max_steps is hidden while the loops' state is restored (after
        # this hook), and given back when training starts, before the first step.
        loop = self.trainer.fit_loop.epoch_loop
        if self.trainer.ckpt_path is not None and loop.max_steps != -1:
            self._hidden_max_steps, loop.max_steps = loop.max_steps, -1

    def on_train_start(self) -> None:
        hidden = getattr(self, "_hidden_max_steps", None)
        if hidden is not None:
            self.trainer.fit_loop.epoch_loop.max_steps, self._hidden_max_steps = hidden, None
        # The LR schedule counts optimizer steps. Resumed on another device count (or
        # batch size), an epoch has another number of them, and the restored count would
        # put the schedule elsewhere than this epoch (1 -> 2 devices at mid-run: at its
        # end, the floor LR for the rest). Rescale the count to the same progress.
        trainer = self.trainer
        if trainer.current_epoch == 0:  # a fit from its start: nothing restored
            return
        scheduler = trainer.lr_scheduler_configs[0].scheduler
        # Every checkpoint facecluster saves is an epoch-end one: the epochs done had
        # the count's steps in all. (Checkpoints until 2026-12-06 kept the schedule's
        # length per epoch for it, which a binding trainer.max_steps makes another
        # number: a resume that lifted the cap put the count ahead, and trained the
        # rest at the floor LR, 21 of 66 steps in a review's run.)
        before = scheduler.last_epoch / trainer.current_epoch
        now = self._warmup_unit(trainer.estimated_stepping_batches)
        # binding now: the schedule runs to max_steps on the global step, whatever the
        # epochs, and Lightning stops at that global step: the count is not rescaled
        binding = trainer.max_steps not in (None, -1) and (
            trainer.estimated_stepping_batches >= trainer.max_steps
        )
        if not binding and abs(before - now) > 1e-9:
            scheduler.last_epoch = round(trainer.current_epoch * now)
        # The restored optimizer holds the LR its checkpoint's schedule gave this count;
        # a resume may have changed the schedule's length (more epochs, a lifted
        # max_steps), and its first step took the old LR: this fit's LR at the count.
        scheduler.last_epoch -= 1
        with warnings.catch_warnings():  # no optimizer step yet in this process: known
            warnings.filterwarnings("ignore", "Detected call of `lr_scheduler.step", UserWarning)
            scheduler.step()  # sets the groups' LRs and get_last_lr() at the count


def _own(state: dict[str, Any], every: bool = True) -> dict[str, Any]:
    """A parameter's optimizer state with its tensors in memory of their own: every
    one, or (``every=False``) the 0-d ones only."""
    return {
        k: v.clone() if isinstance(v, Tensor) and (every or v.ndim == 0) else v
        for k, v in state.items()
    }


def _row_state(value: Any) -> bool:
    return isinstance(value, Tensor) and value.ndim == 2


def clip_gradients_(modules: list[nn.Module], value: float, algorithm: str | None) -> None:
    """Clip the gradients of ``modules`` by ``value`` (norm, the default, or "value").

    A sharded margin head counts with all its shards: the squared norm of the shards'
    gradients is summed over processes, so every process scales by the same factor.
    """
    params = [p for m in modules for p in m.parameters() if p.grad is not None]
    if not params:  # a group whose fp16 step is skipped (GroupSkipMixedPrecision): on every
        return  # process alike, so the shards' all-reduce below is skipped alike
    if algorithm == "value":
        nn.utils.clip_grad_value_(params, value)
        return
    shards = {
        id(head.weight)
        for m in modules
        for head in m.modules()
        if isinstance(head, MarginHead) and head.sharded
    }
    if not shards:
        nn.utils.clip_grad_norm_(params, value)
        return
    local = [p for p in params if id(p) not in shards]
    shard_norm = nn.utils.get_total_norm([p.grad for p in params if id(p) in shards])
    shard_square = shard_norm.square()
    dist.all_reduce(shard_square)
    local_norm = nn.utils.get_total_norm([p.grad for p in local]).to(shard_square.device)
    total = (local_norm.square() + shard_square).sqrt()
    nn.utils.clip_grads_with_norm_(params, value, total)
