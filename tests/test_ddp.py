"""DDP on CPU (2 gloo processes): replicas stay identical and the class means equal a
single-process pass."""

from __future__ import annotations

import os
import subprocess
import sys

import pytest
import torch

from facecluster.builders import build_datamodule
from facecluster.clustering import accumulate_class_sums, finalize_class_means
from facecluster.config import load_config
from facecluster.data.transforms import normalize_images
from facecluster.models.components import load_backbone
from tests.conftest import ROOT, SMOKE, smoke_overrides

pytestmark = [pytest.mark.slow, pytest.mark.ddp]


def test_ddp_two_cpu_processes(tmp_path):
    overrides = smoke_overrides(
        tmp_path,
        "logger=none",
        "trainer.max_epochs=2",
        "trainer.accelerator=cpu",
        "trainer.devices=2",
        "trainer.strategy=ddp",
    )
    env = {k: v for k, v in os.environ.items() if k != "FACECLUSTER_RUN_DIR"}
    env["PYTHONPATH"] = str(ROOT)
    proc = subprocess.run(
        [
            sys.executable,
            str(ROOT / "tests" / "scripts" / "ddp_train.py"),
            str(tmp_path),
            *overrides,
        ],
        cwd=ROOT,
        env=env,
        capture_output=True,
        text=True,
        timeout=480,
    )
    assert proc.returncode == 0, proc.stderr[-4000:]
    ranks = [torch.load(tmp_path / f"rank{r}.pt", weights_only=False) for r in (0, 1)]
    assert all(r["world_size"] == 2 for r in ranks)

    # Every sub-net's (and the stage-1 backbone's) parameters are identical on both ranks.
    for part in ("subnets", "backbone"):
        params = [k for k in ranks[0][part] if "running_" not in k and "num_batches" not in k]
        assert params
        for key in params:
            assert torch.equal(ranks[0][part][key], ranks[1][part][key]), f"{part}.{key} differs"

    # The class means (sums and counts all-reduced over ranks) equal one process's pass.
    cfg = load_config(SMOKE, overrides)
    dm = build_datamodule(cfg)
    backbone = load_backbone(
        cfg.model.backbone_args(cfg.data.image_size),
        {
            k.removeprefix("backbone."): v
            for k, v in ranks[0]["backbone"].items()
            if k.startswith("backbone.")
        },
    )
    sums = torch.zeros(dm.num_classes, cfg.model.embedding_dim, dtype=torch.float64)
    counts = torch.zeros(dm.num_classes, dtype=torch.long)
    with torch.no_grad():
        for images, labels in dm.embedding_dataloader():
            accumulate_class_sums(backbone(normalize_images(images)), labels, sums, counts)
    single = finalize_class_means(sums, counts)
    for r in ranks:
        torch.testing.assert_close(r["class_means"], single, rtol=0, atol=1e-5)


MULTI_DEVICE = (
    "python train.py -c configs/smoke.yaml "
    "trainer.accelerator=cpu trainer.devices=2 trainer.strategy=ddp"
)


def test_documented_multi_device_command_runs_train_py_to_its_last_line(tmp_path):
    # The README's command as written, in a folder of its own: 2 gloo processes through
    # both stages, the results, and the evaluation that rank 0 runs alone.
    readme = (ROOT / "README.md").read_text()
    assert MULTI_DEVICE in " ".join(readme.replace("\\\n", " ").split())
    for name in ("train.py", "configs"):
        (tmp_path / name).symlink_to(ROOT / name)
    env = {k: v for k, v in os.environ.items() if k != "FACECLUSTER_RUN_DIR"}
    command = [sys.executable, *MULTI_DEVICE.split()[1:]]
    proc = subprocess.run(
        command, cwd=tmp_path, env=env, capture_output=True, text=True, timeout=480
    )
    assert proc.returncode == 0, proc.stderr[-4000:]
    out = proc.stdout
    assert out.count("Evaluation on the held-out test split") == 1, out[-4000:]
    assert out.count("clustered, all sub-nets (ISM)") == 1
    run_dir = next((tmp_path / "runs").iterdir())
    assert out.rstrip().splitlines()[-1] == f"facecluster run folder: {run_dir}"
    assert (run_dir / "eval" / "results.md").is_file()
