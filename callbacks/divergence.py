"""Stop a diverged run (NaN or Inf loss) before it writes NaN weights.

Without this, a run whose loss turned NaN keeps "training" for hours: every
later step is NaN, the stage's last checkpoint is overwritten with NaN weights at
the next epoch end, and the resume point is lost. :class:`DivergenceCallback`
watches what ``training_step`` returns (``loss``, and in stage 2 ``subnet_losses``,
one loss per sub-net) and raises :class:`DivergenceError` naming the stage, the
sub-net, the step and the last good checkpoint, which is left untouched.

When the check runs: every step on CPU, where reading a tensor costs nothing.
On an accelerator, turning a loss into a Python bool waits for the device to
finish the step (a sync that stalls the pipeline every step), so the flags are
accumulated in device tensors with no host transfer and read every
``check_every_n_steps`` steps (default 50) and always at the epoch end, before
ModelCheckpoint saves (Lightning runs checkpoint callbacks after all others). The
steps reported are still exact: the first bad step is recorded on the device.
Under DDP the decision is all-reduced at each check so every rank stops together
(a rank that stopped alone would leave the others waiting in the next all-reduce).

fp16 loss scaling (``trainer.precision=16-mixed`` on a GPU): the GradScaler skips the
step of every sub-net whose gradients are not finite (of the whole network in stage 1;
:class:`facecluster.models.precision.GroupSkipMixedPrecision`) and lowers its scale,
so a non-finite step changes none of its weights and training recovers by itself. The
check then stops only on a non-finite loss that persists for ``fp16_patience``
consecutive steps (default 10); bf16 and fp32 stop on the first one. (On CPU
``16-mixed`` runs as bf16, without a scaler.) A forward that overflowed has already
updated BatchNorm's running statistics, which the skipped step does not undo: under
the scaler each check also reads the module's floating-point buffers, and a non-finite
one stops the run (its NaN would embed every evaluated face as NaN, and the checkpoint
plugin would refuse the epoch's save on rank 0 alone while the other ranks wait).

The checkpoint plugin (:class:`facecluster.checkpoint_io.AtomicCheckpointIO`)
refuses to write NaN weights even if a divergence slipped past this check.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import lightning as L
import torch

__all__ = ["DivergenceCallback", "DivergenceError"]


class DivergenceError(RuntimeError):
    """The training loss became NaN or Inf; the message says where and what is kept."""


class DivergenceCallback(L.Callback):
    """Raise :class:`DivergenceError` on a NaN/Inf training loss.

    Args:
        stage: The training stage (1 or 2), named in the message.
        checkpoint: The stage's last checkpoint, named in the message when it exists.
        check_every_n_steps: Steps between host reads of the device flags; None: 1
            on CPU, 50 on an accelerator (see the module docstring).
        fp16_patience: Consecutive non-finite steps tolerated under fp16 loss scaling.
    """

    def __init__(
        self,
        stage: int,
        checkpoint: Path | None = None,
        check_every_n_steps: int | None = None,
        fp16_patience: int = 10,
    ) -> None:
        self.stage = stage
        self.checkpoint = checkpoint
        self.check_every_n_steps = check_every_n_steps
        self.fp16_patience = fp16_patience
        self._reset()

    def _reset(self) -> None:
        self._every = 1
        self._patience = 1
        self._names: list[str] = []  # "the total loss", "sub-net 0", ...
        self._streak: torch.Tensor | None = None  # consecutive non-finite steps, per loss
        self._first: torch.Tensor | None = None  # global step of the first stop, -1: none
        self._step: torch.Tensor | None = None  # global step counter, kept on the device
        self._since_check = 0
        self._buffers: list[tuple[str, torch.Tensor]] = []  # checked under fp16 scaling

    def on_train_start(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        self._reset()
        device = pl_module.device
        self._every = self.check_every_n_steps or (1 if device.type == "cpu" else 50)
        scaler = getattr(trainer.precision_plugin, "scaler", None)
        self._patience = self.fp16_patience if scaler is not None else 1
        if scaler is not None:  # updated in place: the same tensors all along
            named = pl_module.named_buffers()
            self._buffers = [(n, b) for n, b in named if b.is_floating_point()]
        self._step = torch.tensor(trainer.global_step, device=device)
        self._last_global_step = trainer.global_step

    def _track(self, values: torch.Tensor) -> None:
        vals = values.detach().float()
        device = vals.device
        if self._streak is None or self._streak.numel() != vals.numel():
            self._streak = torch.zeros(vals.numel(), dtype=torch.long, device=device)
            self._first = torch.full((vals.numel(),), -1, dtype=torch.long, device=device)
        bad = ~torch.isfinite(vals)
        # All on the device: no host transfer, so no sync on an accelerator.
        self._streak = (self._streak + 1) * bad
        hit = (self._streak >= self._patience) & (self._first < 0)
        self._first = torch.where(hit, self._step, self._first)

    def on_train_batch_end(
        self,
        trainer: L.Trainer,
        pl_module: L.LightningModule,
        outputs: Any,
        batch: Any,
        batch_idx: int,
    ) -> None:
        loss = outputs.get("loss") if isinstance(outputs, dict) else outputs
        if not isinstance(loss, torch.Tensor):
            return  # a skipped step (training_step returned None)
        assert self._step is not None
        # The optimizer step this batch went into: trainer.global_step when the batch
        # stepped, the next one when it only accumulated (trainer.accumulate_grad_batches)
        stepped = trainer.global_step > self._last_global_step
        self._last_global_step = trainer.global_step
        self._step.fill_(trainer.global_step + (0 if stepped else 1))  # no host sync
        subnets = outputs.get("subnet_losses") if isinstance(outputs, dict) else None
        values = [loss.detach().float().reshape(1)]
        self._names = ["the total loss"]
        if isinstance(subnets, torch.Tensor):
            values.append(subnets.detach().float().reshape(-1).to(loss.device))
            self._names += [f"sub-net {k} (cluster {k})" for k in range(subnets.numel())]
        self._track(torch.cat(values))
        self._since_check += 1
        if self._since_check >= self._every:
            self._check(trainer)

    def on_train_epoch_end(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        # Before ModelCheckpoint's epoch-end save (checkpoint callbacks run last).
        self._check(trainer)

    def _check(self, trainer: L.Trainer) -> None:
        self._since_check = 0
        first = [] if self._first is None else self._first.tolist()  # the one host read
        local = any(step >= 0 for step in first)
        poisoned = None if local else self._poisoned_buffer()
        local = local or poisoned is not None
        if trainer.world_size > 1:
            diverged = trainer.strategy.reduce_boolean_decision(local, all=False)
        else:
            diverged = local
        if diverged:
            raise DivergenceError(self._message(trainer, first, local, poisoned))

    def _poisoned_buffer(self) -> str | None:
        """The first floating-point buffer that is not finite (fp16 scaling only)."""
        if not self._buffers:
            return None
        finite = torch.stack([torch.isfinite(b).all() for _, b in self._buffers])
        if bool(finite.all()):  # one host read
            return None
        return self._buffers[int((~finite).nonzero()[0])][0]

    def _message(
        self, trainer: L.Trainer, first: list[int], local: bool, poisoned: str | None = None
    ) -> str:
        if not local:
            where = f"on another DDP rank (this is rank {trainer.global_rank})"
        elif poisoned is not None:
            where = (
                f"in the buffer {poisoned} by global step {trainer.global_step} (epoch "
                f"{trainer.current_epoch}): an fp16 overflow that the loss scaler skipped "
                "still updated it, and every face would now embed as NaN"
            )
        else:
            culprits = [(s, self._names[i]) for i, s in enumerate(first) if s >= 0]
            # The total is the sum of the sub-nets' losses: name the sub-nets when known.
            named = [(s, n) for s, n in culprits if n != "the total loss"] or culprits
            step = min(s for s, _ in named)
            what = ", ".join(n for s, n in named if s == step)
            persist = (
                f" for {self._patience} consecutive steps (fp16 loss scaling)"
                if self._patience > 1
                else ""
            )
            where = f"in {what} at global step {step} (epoch {trainer.current_epoch}){persist}"
        good = self._last_good(trainer)
        if good is not None and self.stage == 2:
            # a plain resume keeps the run's settings once another sub-net has finished
            # (RunFolder._refuse_settled); named sub-nets train again with new ones
            diverged = [i - 1 for i, s in enumerate(first) if i > 0 and s >= 0] if local else []
            named = ",".join(map(str, diverged)) or "..."
            advice = (
                "Continue with resume=<run folder> trainer.gradient_clip_val=<norm> (gradient "
                "clipping) while no other sub-net has finished; or train the diverged "
                "sub-nets again from the stage-1 backbone with new settings, resume=<run "
                f"folder> stage2.subnets=[{named}] trainer.gradient_clip_val=<norm> or a "
                "lower stage2.optim.lr (each sub-net's record keeps the settings it trained "
                "with)."
            )
        elif good is not None:  # a resume keeps the optimizer its checkpoint has
            advice = (
                "Continue with resume=<run folder> trainer.gradient_clip_val=<norm> (gradient "
                f"clipping); a resume keeps stage{self.stage}.optim once the stage has a "
                "checkpoint, so a lower learning rate or a warm-up (optim.warmup_epochs) "
                "needs a new run."
            )
        else:
            advice = (
                f"Lower stage{self.stage}.optim.lr, add warm-up (optim.warmup_epochs) or "
                "gradient clipping (trainer.gradient_clip_val), then continue with "
                "resume=<run folder>."
            )
        return (
            f"stage {self.stage}: the training {'state' if poisoned else 'loss'} became "
            f"NaN/Inf {where}; the run is "
            f"stopped and no checkpoint with these weights was written. Last good "
            f"checkpoint: {good or 'none of this stage yet (it had not finished an epoch)'}. "
            f"{advice}"
        )

    def _last_good(self, trainer: L.Trainer) -> Path | None:
        candidates = [self.checkpoint] if self.checkpoint is not None else []
        if trainer.ckpt_path:
            candidates.append(Path(trainer.ckpt_path))  # the checkpoint this fit resumed from
        for path in candidates:
            if path.is_file():
                return path
        return None
