"""Fault injection: ``kill -9`` of a real ``train.py`` process, then ``resume=``.

The killed and resumed runs are subprocesses: the final weights of a run killed
after an epoch-end checkpoint and resumed must equal an uninterrupted run's bit for
bit (CPU, same seed; see callbacks/seeding.py). The uninterrupted reference trains
in this process, which gives train.py's weights (test_jobs' two-jobs test compares
the two) without another interpreter start.
"""

from __future__ import annotations

import json
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
    # Lightning's notice, at every resume, that the checkpoint folder is not empty
    assert "exists and is not empty" not in (tmp_path / "resume.log").read_text()

    assert (run_dir / "results.json").is_file()
    expected, got = _state(reference), _state(run_dir)
    assert expected.keys() == got.keys()
    for key in expected:
        torch.testing.assert_close(got[key], expected[key], rtol=0, atol=0, msg=key)


def test_a_stop_between_the_clustering_and_stage1s_test_keeps_the_clustering(tmp_path, reference):
    # clusters.pt is saved at the end of stage 1's fit, stage1.json after its test: a
    # stop in between left the first without the second. stage=2 trained every sub-net
    # and then failed on the missing summary; a resume clustered again, rewriting the
    # "written once" clusters.pt under finished sub-nets (review)
    import shutil

    run_dir = tmp_path / "run"
    shutil.copytree(reference, run_dir)
    (run_dir / "stage1.json").unlink()
    clusters = run_dir / "clusters.pt"
    before = (clusters.read_bytes(), clusters.stat().st_mtime_ns)

    refused = _start(tmp_path / "stage2", f"resume={run_dir}", "stage=2")
    assert refused.wait(timeout=300) == 2
    log = (tmp_path / "stage2.log").read_text()
    assert f"stage=2: stage 1 of {run_dir} is not finished" in log, log[-3000:]
    assert f"python train.py resume={run_dir} stage=1" in log

    _run(tmp_path / "resume", f"resume={run_dir}")
    assert (clusters.read_bytes(), clusters.stat().st_mtime_ns) == before
    summary = json.loads((run_dir / "stage1.json").read_text())
    assert summary == json.loads((reference / "stage1.json").read_text())  # tested again
    expected, got = _state(reference), _state(run_dir)
    for key in expected:  # the sub-nets were finished: not trained again
        torch.testing.assert_close(got[key], expected[key], rtol=0, atol=0, msg=key)


SIGTERM_IN_CLASS_MEANS = """
import os, signal, sys
from facecluster.callbacks import ClusteringCallback
from facecluster.cli import train_main
means = ClusteringCallback.class_means
def terminated(self, trainer, module):  # SIGTERM arrives during the class-means pass
    os.kill(os.getpid(), signal.SIGTERM)
    return means(self, trainer, module)
ClusteringCallback.class_means = terminated
sys.exit(train_main(sys.argv[1:]))
"""


def test_sigterm_during_the_clustering_stops_the_run_before_clusters_pt(tmp_path):
    # Lightning's SIGTERM handler only sets a flag that its loops check, and they have
    # ended when the clustering runs (on_train_end): the kill was lost, the run trained
    # all of stage 2 and exited 0 (review). Now: 143, the resume command, no clustering
    run_dir = tmp_path / "run"
    env = {**os.environ, "WANDB_MODE": "disabled"}
    env.pop("FACECLUSTER_RUN_DIR", None)
    proc = subprocess.run(
        [sys.executable, "-c", SIGTERM_IN_CLASS_MEANS, "-c", str(SMOKE),
         *smoke_overrides(tmp_path, *EXTRA)],
        cwd=ROOT, env=env, capture_output=True, text=True, timeout=300,
    )  # fmt: skip
    assert proc.returncode == 128 + signal.SIGTERM, proc.stderr[-3000:]
    assert f"python train.py resume={run_dir}\n" in proc.stderr  # ResumeHint
    assert not (run_dir / "clusters.pt").exists() and not (run_dir / "stage1.json").exists()
    # the resume clusters outside a fit (stage 1 is done): the same signal there was
    # met by the default action, the process killed without the resume command
    again = subprocess.run(
        [sys.executable, "-c", SIGTERM_IN_CLASS_MEANS, f"resume={run_dir}"],
        cwd=ROOT, env=env, capture_output=True, text=True, timeout=300,
    )  # fmt: skip
    assert again.returncode == 128 + signal.SIGTERM, again.stderr[-3000:]
    assert f"python train.py resume={run_dir}\n" in again.stderr
    assert not (run_dir / "clusters.pt").exists()
    _run(tmp_path / "resume", f"resume={run_dir}")  # clusters, tests, trains stage 2
    assert (run_dir / "clusters.pt").is_file() and (run_dir / "results.json").is_file()
