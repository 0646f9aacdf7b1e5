"""Fault injection: a NaN loss stops the run, names where, and keeps the last good checkpoint."""

from __future__ import annotations

import lightning as L
import pytest
import torch

from facecluster.callbacks import DivergenceError
from facecluster.config import ConfigError, load_config
from facecluster.pipeline import train
from facecluster.run import RunFolder
from tests.conftest import SMOKE, smoke_overrides

pytestmark = pytest.mark.faults


class NaNHead(L.Callback):
    """From (stage, epoch, global step) on, make a head's output NaN (a diverging sub-net)."""

    def __init__(self, stage: int, epoch: int, step_in_epoch: int, cluster: int | None = None):
        self.stage, self.epoch, self.step, self.cluster = stage, epoch, step_in_epoch, cluster
        self.handle = None

    def on_train_batch_start(self, trainer, pl_module, batch, batch_idx):
        if pl_module.stage != self.stage or self.handle is not None:
            return
        if trainer.current_epoch == self.epoch and batch_idx == self.step:
            head = pl_module.head if self.cluster is None else pl_module.heads[str(self.cluster)]
            self.handle = head.register_forward_hook(lambda m, i, out: out * float("nan"))
            self.global_step = trainer.global_step + 1  # the optimizer step this batch makes


def _finite(path) -> bool:
    state = torch.load(path, weights_only=False)["state_dict"]
    return all(torch.isfinite(v).all() for v in state.values() if v.is_floating_point())


@pytest.mark.parametrize("accumulate", [1, 2])
def test_nan_in_stage1_stops_and_keeps_last_good_checkpoint(tmp_path, accumulate):
    # under gradient accumulation the step named is the optimizer step, not the batch
    overrides = ("trainer.max_epochs=2", f"trainer.accumulate_grad_batches={accumulate}")
    cfg = load_config(SMOKE, smoke_overrides(tmp_path, *overrides))
    nan = NaNHead(stage=1, epoch=1, step_in_epoch=2)
    last = tmp_path / "run" / "stage1" / "checkpoints" / "last.ckpt"
    with pytest.raises(DivergenceError) as info:
        train(cfg, callbacks=[nan])
    message = str(info.value)
    assert message.startswith("stage 1: the training loss became NaN/Inf")
    assert f"at global step {nan.global_step} (epoch 1)" in message
    assert f"Last good checkpoint: {last}" in message
    assert torch.load(last, weights_only=False)["epoch"] == 0 and _finite(last)
    assert not (tmp_path / "run" / "clusters.pt").exists()
    # the advice is what a resume takes: gradient clipping, not another learning rate
    # (it said to lower stage1.optim.lr, which a resume from that checkpoint refuses)
    assert "resume=<run folder> trainer.gradient_clip_val=<norm>" in message
    assert "a lower learning rate or a warm-up (optim.warmup_epochs) needs a new run" in message
    run = str(tmp_path / "run")
    RunFolder.config_for_resume(run, ["trainer.gradient_clip_val=1.0"])
    with pytest.raises(ConfigError, match="stage1.optim"):
        RunFolder.config_for_resume(run, ["stage1.optim.lr=0.01"])


def test_a_subnet_that_diverged_after_a_checkpoint_is_told_how_to_train_again(tmp_path):
    # once another sub-net has finished, a plain resume keeps the run's settings: the
    # advice names the diverged sub-nets to train again with new ones, which is taken
    cfg = load_config(SMOKE, smoke_overrides(tmp_path, "trainer.max_epochs=2"))
    with pytest.raises(DivergenceError) as info:
        train(cfg, callbacks=[NaNHead(stage=2, epoch=1, step_in_epoch=1, cluster=1)])
    message = str(info.value)
    assert "resume=<run folder> stage2.subnets=[1] trainer.gradient_clip_val=<norm>" in message
    run = str(tmp_path / "run")
    again = ["stage2.subnets=[1]", "trainer.gradient_clip_val=1.0", "stage2.optim.lr=0.01"]
    assert RunFolder.config_for_resume(run, again).stage2.optim.lr == 0.01


def test_nan_in_one_subnet_names_that_cluster(tmp_path):
    cfg = load_config(SMOKE, smoke_overrides(tmp_path))
    nan = NaNHead(stage=2, epoch=0, step_in_epoch=1, cluster=1)
    with pytest.raises(DivergenceError) as info:
        train(cfg, callbacks=[nan])
    message = str(info.value)
    assert message.startswith("stage 2:")
    assert f"in sub-net 1 (cluster 1) at global step {nan.global_step} (epoch 0)" in message
    assert "sub-net 0" not in message and "sub-net 2" not in message
    assert "none of this stage yet" in message
    assert not list((tmp_path / "run").glob("stage2/jobs/*/checkpoints/last.ckpt"))
    assert _finite(tmp_path / "run" / "stage1" / "checkpoints" / "last.ckpt")
