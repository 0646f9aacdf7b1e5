"""Speed-related defaults and tools: precision choice, the divergence check's
accelerator path, the overhead benchmark and bench/gpu.sh (dry run)."""

from __future__ import annotations

import math
from pathlib import Path
from types import SimpleNamespace

import pytest
import torch

from callbacks.divergence import DivergenceCallback, DivergenceError
from facecluster.builders import build_trainer, default_precision
from facecluster.config import load_config
from facecluster.run import RunFolder

ROOT = Path(__file__).resolve().parents[1]


def test_precision_auto_is_decided_by_the_device(monkeypatch, tmp_path):
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    monkeypatch.setattr(torch.cuda, "is_bf16_supported", lambda *a, **k: True)
    assert default_precision("gpu") == "bf16-mixed" == default_precision("auto")
    monkeypatch.setattr(torch.cuda, "is_bf16_supported", lambda *a, **k: False)
    assert default_precision("cuda") == "16-mixed"  # Volta/Turing: fp16 with loss scaling
    assert default_precision("cpu") == "32-true"
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    assert default_precision("auto") == "32-true"
    # the shipped config asks for auto; on this CPU machine the Trainer runs 32-true
    cfg = load_config(ROOT / "configs" / "default.yaml")
    assert cfg.trainer["precision"] == "auto"
    trainer = build_trainer(cfg, 1, RunFolder(tmp_path / "run"), None, [])
    assert trainer.precision == "32-true"
    explicit = cfg.with_overrides(["trainer.precision=bf16-mixed"])
    assert build_trainer(explicit, 1, RunFolder(tmp_path / "run"), None, []).precision == (
        "bf16-mixed"
    )


def _stub_trainer(scaler: object | None) -> SimpleNamespace:
    plugin = SimpleNamespace(scaler=scaler)
    return SimpleNamespace(
        precision_plugin=plugin, global_step=0, world_size=1, global_rank=0,
        current_epoch=0, ckpt_path=None,
    )  # fmt: skip


def _feed(callback, trainer, losses) -> None:
    for i, value in enumerate(losses):
        callback.on_train_batch_end(trainer, None, {"loss": torch.tensor(value)}, None, i)


def test_divergence_accelerator_path_defers_reads_and_tolerates_fp16_skips():
    # What a GPU run does: flags stay on the device and are read every n steps; under
    # fp16 loss scaling a few skipped (non-finite) steps are tolerated.
    nan = math.nan
    callback = DivergenceCallback(stage=1, check_every_n_steps=5, fp16_patience=3)
    trainer = _stub_trainer(scaler=object())
    callback.on_train_start(trainer, SimpleNamespace(device=torch.device("cpu")))
    assert (callback._every, callback._patience) == (5, 3)
    _feed(callback, trainer, [1.0, nan, nan, 1.0, 1.0, 1.0, nan, 1.0, 1.0, 1.0])
    callback.on_train_epoch_end(trainer, None)  # two short streaks: the scaler recovered
    with pytest.raises(DivergenceError, match=r"global step 13 .*3 consecutive steps"):
        _feed(callback, trainer, [nan, nan, nan, nan, 1.0])  # steps 11-14, read at 15
    # bf16/fp32 (no scaler): the first non-finite loss stops at the next read
    callback = DivergenceCallback(stage=2, check_every_n_steps=5)
    trainer = _stub_trainer(scaler=None)
    callback.on_train_start(trainer, SimpleNamespace(device=torch.device("cpu")))
    _feed(callback, trainer, [1.0, 1.0, nan, 1.0])  # no read yet: no host sync
    with pytest.raises(DivergenceError, match="global step 3"):
        callback.on_train_epoch_end(trainer, None)
