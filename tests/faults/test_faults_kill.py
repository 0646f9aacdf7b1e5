"""Fault injection: ``kill -9`` of a real ``train.py`` process, then ``resume=``.

The killed and resumed runs are subprocesses: the final weights of a run killed
after an epoch-end checkpoint and resumed must equal an uninterrupted run's bit for
bit (CPU, same seed; see callbacks/seeding.py). The uninterrupted reference trains
in this process, which gives train.py's weights (test_jobs' two-jobs test compares
the two) without another interpreter start.
"""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch

from facecluster.config import load_config
from facecluster.pipeline import train
from tests.conftest import ROOT, SMOKE, smoke_overrides

pytestmark = pytest.mark.faults

# 2 epochs per stage: killed after epoch 0, a whole epoch is still to run (the test
# asserts the process was alive when killed);
# no evaluation after training: it costs time and is not what is checked here.
EXTRA = ("trainer.max_epochs=2", "eval.after_training=false")
# stage 2 as one job (stage2.jobs=1): its checkpoints
STAGE2_LAST = Path("stage2", "jobs", "subnets-0-2", "checkpoints", "last.ckpt")


def _start(out: Path, *args: str) -> subprocess.Popen:
    env = {**os.environ, "WANDB_MODE": "disabled", "PYTHONUNBUFFERED": "1"}
    env.pop("FACECLUSTER_RUN_DIR", None)
    log = open(out.with_suffix(".log"), "wb")  # noqa: SIM115 (closed with the process)
    return subprocess.Popen(
        [sys.executable, str(ROOT / "train.py"), *args],
        cwd=ROOT,
        env=env,
        stdout=log,
        stderr=subprocess.STDOUT,
    )


def _run(out: Path, *args: str) -> None:
    proc = _start(out, *args)
    rc = proc.wait(timeout=300)
    assert rc == 0, out.with_suffix(".log").read_text()[-3000:]


def _state(run_dir: Path) -> dict[str, torch.Tensor]:
    return torch.load(run_dir / STAGE2_LAST, weights_only=False)["state_dict"]


@pytest.fixture(scope="module")
def reference(tmp_path_factory) -> Path:
    """An uninterrupted run (shared by both kill tests)."""
    base = tmp_path_factory.mktemp("reference")
    return train(load_config(SMOKE, smoke_overrides(base, *EXTRA))).run_dir


def _kill_when(path: Path, proc: subprocess.Popen, log: Path) -> None:
    """SIGKILL ``proc`` as soon as ``path`` exists (polled; no timing assumed)."""
    deadline = time.monotonic() + 300
    while not path.exists():
        assert proc.poll() is None, (
            f"train.py ended before {path} appeared:\n" + log.read_text()[-3000:]
        )
        assert time.monotonic() < deadline, f"{path} never appeared"
        time.sleep(0.02)
    assert proc.poll() is None, "the run finished before it could be killed"
    proc.send_signal(signal.SIGKILL)
    assert proc.wait(timeout=60) == -signal.SIGKILL


@pytest.mark.parametrize("stage", [1, 2])
def test_kill_9_after_an_epoch_checkpoint_then_resume_equals_uninterrupted(
    tmp_path, reference, stage
):
    run_dir = tmp_path / "run"
    proc = _start(run_dir, "-c", str(SMOKE), *smoke_overrides(tmp_path, *EXTRA))
    last = Path("stage1", "checkpoints", "last.ckpt") if stage == 1 else STAGE2_LAST
    _kill_when(run_dir / last, proc, run_dir.with_suffix(".log"))
    assert not (run_dir / "results.json").exists()

    _run(tmp_path / "resume", f"resume={run_dir}")

    assert (run_dir / "results.json").is_file()
    expected, got = _state(reference), _state(run_dir)
    assert expected.keys() == got.keys()
    for key in expected:
        torch.testing.assert_close(got[key], expected[key], rtol=0, atol=0, msg=key)
