"""Speed-related defaults and tools: precision choice, the divergence check's
accelerator path, the overhead benchmark and bench/gpu.sh (dry run)."""

from __future__ import annotations

import argparse
import json
import math
import os
import re
import subprocess
import sys
from datetime import datetime
from pathlib import Path
from types import SimpleNamespace

import pytest
import torch

from facecluster import cli
from facecluster.builders import build_trainer, default_precision, module_args
from facecluster.callbacks.divergence import DivergenceCallback, DivergenceError
from facecluster.config import ConfigError, load_config
from facecluster.models.backbone_module import BackboneSystem
from facecluster.results import machine, machine_name, source_digest
from facecluster.run import RunFolder, _refuse_contradictions
from tests.conftest import SMOKE, load_script, run_script

ROOT = Path(__file__).resolve().parents[1]
SHARED_LFW = ROOT.parent / "shared" / "datasets" / "lfw-112" / "images"


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


def test_a_16_bit_precision_on_a_cpu_without_bf16_is_warned_once(monkeypatch, caplog):
    # bf16-mixed on a CPU without bf16 instructions trained 33x slower than 32-true, and
    # nothing said why
    from facecluster import builders
    from facecluster.builders import check_trainer, warn_emulated_bf16
    from facecluster.evaluation import eval_autocast

    warned = "has no bf16 instructions"
    for supported, precision, said in [
        (False, "bf16-mixed", 1),
        (False, "16-mixed", 1),  # a CPU runs it as bf16
        (False, "32-true", 0),
        (True, "bf16-mixed", 0),
    ]:
        monkeypatch.setattr(
            builders.torch.ops.mkldnn, "_is_mkldnn_bf16_supported", lambda s=supported: s
        )
        warn_emulated_bf16.cache_clear()
        caplog.clear()
        cfg = load_config(SMOKE, [f"trainer.precision={precision}"])
        check_trainer(cfg)  # the training's check says it
        assert sum(warned in r.getMessage() for r in caplog.records) == said, precision
        eval_autocast(cfg, torch.device("cpu"))  # the evaluation after it: no second word
        assert sum(warned in r.getMessage() for r in caplog.records) == said, precision
    # a torch built without oneDNN (some ARM builds) has no such op: nothing to say
    with monkeypatch.context() as m:
        m.setattr(builders.torch, "ops", SimpleNamespace(mkldnn=SimpleNamespace()))
        warn_emulated_bf16.cache_clear()
        caplog.clear()
        warn_emulated_bf16("bf16-mixed")
    assert not caplog.records
    warn_emulated_bf16.cache_clear()


def _stub_trainer(scaler: object | None) -> SimpleNamespace:
    plugin = SimpleNamespace(scaler=scaler)
    return SimpleNamespace(
        precision_plugin=plugin, global_step=0, world_size=1, global_rank=0,
        current_epoch=0, ckpt_path=None,
    )  # fmt: skip


def _feed(callback, trainer, losses) -> None:
    for i, value in enumerate(losses):
        trainer.global_step += 1  # each batch an optimizer step, as the Trainer counts it
        callback.on_train_batch_end(trainer, None, {"loss": torch.tensor(value)}, None, i)


def test_divergence_accelerator_path_defers_reads_and_tolerates_fp16_skips():
    # What a GPU run does: flags stay on the device and are read every n steps; under
    # fp16 loss scaling a few skipped (non-finite) steps are tolerated.
    nan = math.nan
    callback = DivergenceCallback(stage=1, check_every_n_steps=5, fp16_patience=3)
    trainer = _stub_trainer(scaler=object())
    bn = torch.nn.BatchNorm1d(2)
    module = SimpleNamespace(device=torch.device("cpu"), named_buffers=bn.named_buffers)
    callback.on_train_start(trainer, module)
    assert (callback._every, callback._patience) == (5, 3)
    _feed(callback, trainer, [1.0, nan, nan, 1.0, 1.0, 1.0, nan, 1.0, 1.0, 1.0])
    callback.on_train_epoch_end(trainer, None)  # two short streaks: the scaler recovered
    with pytest.raises(DivergenceError, match=r"global step 13 .*3 consecutive steps"):
        _feed(callback, trainer, [nan, nan, nan, nan, 1.0])  # steps 11-14, read at 15
    # a skipped overflow that reached the BatchNorm statistics: the losses recover, the
    # buffer does not (NaN embeddings at evaluation; a save refused on rank 0 alone)
    callback.on_train_start(trainer, module)
    _feed(callback, trainer, [1.0, nan, 1.0])
    bn.running_var[1] = math.inf
    with pytest.raises(DivergenceError, match=r"training state became NaN/Inf in the buffer "):
        callback.on_train_epoch_end(trainer, None)
    # bf16/fp32 (no scaler): the first non-finite loss stops at the next read
    callback = DivergenceCallback(stage=2, check_every_n_steps=5)
    trainer = _stub_trainer(scaler=None)
    callback.on_train_start(trainer, SimpleNamespace(device=torch.device("cpu")))
    _feed(callback, trainer, [1.0, 1.0, nan, 1.0])  # no read yet: no host sync
    with pytest.raises(DivergenceError, match="global step 3"):
        callback.on_train_epoch_end(trainer, None)


def test_compile_and_channels_last_keep_weights_names_and_outputs():
    cfg = load_config(ROOT / "configs" / "default.yaml").with_overrides(
        ["model.backbone=tiny", "model.embedding_dim=16", "data.image_size=16", "model.kwargs={}"]
    )
    fast_cfg = cfg.with_overrides(["model.compile=true", "model.channels_last=true"])
    torch.manual_seed(0)
    plain = BackboneSystem(num_classes=5, **module_args(cfg, 1))
    torch.manual_seed(0)
    fast = BackboneSystem(num_classes=5, **module_args(fast_cfg, 1))
    fast.configure_model()
    # every backbone is compiled in place (nn.Module.compile sets the call that
    # forward goes through), the plain model's not
    backbones = list(fast.backbones())
    compiled = [backbone._compiled_call_impl for backbone in backbones]
    assert backbones and all(call is not None for call in compiled)
    assert all(backbone._compiled_call_impl is None for backbone in plain.backbones())
    fast.configure_model()  # a second Trainer entry applies nothing twice
    assert [backbone._compiled_call_impl for backbone in backbones] == compiled
    assert list(fast.state_dict()) == list(plain.state_dict())  # checkpoints unchanged
    convs = [p for p in fast.parameters() if p.dim() == 4]
    assert convs and all(p.is_contiguous(memory_format=torch.channels_last) for p in convs)
    x = torch.randn(4, 3, 16, 16)
    plain.eval(), fast.eval()
    with torch.no_grad():
        torch.testing.assert_close(fast(x), plain(x), rtol=1e-4, atol=1e-5)
    # a resume may switch speed options, not the model
    _refuse_contradictions(cfg, fast_cfg, "run")
    with pytest.raises(ConfigError, match="model"):
        _refuse_contradictions(cfg, cfg.with_overrides(["model.embedding_dim=8"]), "run")


def test_gpu_script_dry_run_writes_every_figure(tmp_path):
    # bench/gpu.sh as a GPU machine runs it, every step at toy size on the CPU (the
    # bundled demo set)
    out = tmp_path / "gpu.json"
    done = subprocess.run(  # a relative --out is the caller's (it was the project's)
        ["bash", str(ROOT / "bench" / "gpu.sh"), "--dry-run", "--out", "gpu.json"],
        cwd=tmp_path,
        capture_output=True,
        text=True,
        env={**os.environ, "PY": sys.executable},
        timeout=600,
    )
    assert done.returncode == 0, done.stdout[-3000:] + done.stderr[-3000:]
    figures = json.loads(out.read_text())
    assert figures["dry_run"] is True
    for precision in ("32-true", "bf16-mixed"):
        overhead = figures[f"overhead-{precision}-compile-false"]
        for part in ("stage1", "stage2", "class_means"):
            assert overhead[part]["ratio"] > 0, (precision, part)
    stages = figures["stages"]
    assert stages["stage1"]["images_per_s"] > 0 and stages["stage2"]["images_per_s"] > 0
    names = set(stages["inference"])
    assert {"clustered, routed (top_m=1, moe)", "clustered, all sub-nets (ISM)"} <= names
    assert all(row["images_per_s"] > 0 for row in stages["inference"].values())
    data = figures["data"]
    assert data["rows"][0]["rec"] > 0 and data["rows"][0]["rec_bytes"] > 0
    assert data["device_decode"]["images_per_s"] > 0  # data.decode=device's batched decode
    here = machine()
    for part in ("overhead-32-true-compile-false", "stages", "data"):  # what ran them
        assert figures[part]["machine"]["cpu"] == here["cpu"], part
        assert figures[part]["code"] == source_digest(), part
    bad = subprocess.run(["bash", "bench/gpu.sh", "--bogus"], cwd=ROOT, capture_output=True)
    assert bad.returncode == 2 and b"--bogus" in bad.stderr
    for args in (["--out"], ["--out", "--dry-run"]):  # "$2: unbound"; an option as OUT
        bad = subprocess.run(["bash", "bench/gpu.sh", *args], cwd=ROOT, capture_output=True)
        assert bad.returncode == 2 and b"--out needs a value" in bad.stderr, args
    if not torch.cuda.is_available():  # refused: the parts of the last run stay (emptied)
        done = subprocess.run(
            ["bash", "bench/gpu.sh", "--out", str(out)], cwd=ROOT, capture_output=True
        )
        assert done.returncode == 1 and b"no CUDA device visible" in done.stderr
        assert (tmp_path / "gpu-parts" / "stages.json").is_file()


def test_eval_device_is_checked_before_training():
    base = ROOT / "configs" / "default.yaml"
    for ok in ("auto", "cpu", "cuda", "cuda:1"):
        assert load_config(base, [f"eval.device={ok}"]).eval.device == ok
    with pytest.raises(ConfigError, match=r"eval.device='gpu'.*cuda"):
        load_config(base, ["eval.device=gpu"])


@pytest.mark.skipif(torch.cuda.is_available(), reason="needs a machine without a GPU")
def test_an_evaluation_gpu_this_machine_lacks_is_refused_before_training(tmp_path, capsys):
    # train.py evaluates after training: eval.device=cuda on a machine without a GPU
    # is refused before any work, not after the run has trained.
    args = [
        "-c",
        str(ROOT / "configs" / "smoke.yaml"),
        "eval.device=cuda",
        f"output_dir={tmp_path}",
    ]
    assert cli.train_main(args) == 2
    assert "eval.device=" in capsys.readouterr().err
    assert list(tmp_path.iterdir()) == [], "no run folder"


def test_scale_benchmark_runs_small_and_writes_its_page(tmp_path):
    # bench/scale.py (docs/SCALE.md) at toy size: head memory and step time (the larger
    # head computed from the smaller), the clustering timings, routing through the
    # cluster lists equal to exact search once every cluster is probed, and the page.
    # no --doc: the page goes beside --out (the project's docs/SCALE.md and its plot
    # were rewritten by a trial of one's own)
    out, doc = tmp_path / "scale.json", tmp_path / "scale.md"
    project = {
        p: p.read_bytes() for p in (ROOT / "docs" / "SCALE.md", ROOT / "docs" / "scale_heads.png")
    }
    command = [
        sys.executable, "bench/scale.py", "--part", "heads", "clustering", "routing",
        "--classes", "3000", "--dim", "32", "--clusters", "8", "--topics", "64",
        "--queries", "256", "--nprobe", "1", "8", "--ivf-nprobe", "4", "--hnsw-ef", "16", "64",
        "--head-classes", "800", "4000", "--repeats", "1", "--measure-limit-gib", "0.001",
        "--peak-rows", "2000",
        "--lists-per-cluster", "4", "--split-nprobe", "32", "--fine-nlist", "64",
        "--fine-nprobe", "8",
        "--out", str(out),
    ]  # fmt: skip
    subprocess.run(command, cwd=ROOT, check=True, capture_output=True, timeout=300)
    assert all(path.read_bytes() == data for path, data in project.items())
    result = json.loads(out.read_text())
    clustering = result["clustering"]
    assert clustering["bare faiss.Kmeans"]["vs_bare"] == 1.0
    balanced = clustering["facecluster balanced"]
    assert balanced["sizes_max"] - balanced["sizes_min"] <= 1
    routing = result["routing"]
    assert routing["clusters, ivf_nprobe=8"]["agreement"] == 1.0
    assert 0.0 < routing["clusters, ivf_nprobe=1"]["agreement"] <= 1.0
    assert {"ivf, ivf_nprobe=4", "hnsw, hnsw_ef_search=64", "flat (exact)"} <= routing.keys()
    assert "ivf, ivf_nlist=64, ivf_codes=sq8, ivf_nprobe=8" in routing
    split = routing["clusters, lists_per_cluster=4, ivf_codes=sq8, ivf_nprobe=32"]
    assert split["agreement"] >= 0.99  # every list probed: only the 8-bit codes differ
    heads = {(r["classes"], r["head"], r["shards"]): r for r in result["heads"]["rows"]}
    assert len(heads) == 2 * 9
    small, large = heads[(800, "whole head", 1)], heads[(4000, "whole head", 1)]
    assert small["step"] == "measured" and large["step"].startswith("computed")
    assert large["memory_parts_gib"]["parameters"] == round(4000 * 32 * 4 / 2**30, 3)
    checks = result["heads"]["peak_check"]  # the memory count against a measured step
    assert [(c["rows"], c["shards"], c["sample_rate"]) for c in checks] == [
        (2000, 1, 1.0), (2000, 1, 0.1), (400, 8, 1.0), (400, 8, 0.1),
    ]  # fmt: skip
    assert all(c["measured_mib"] >= 0 and c["model_mib"] > 0 for c in checks)
    sampled = heads[(4000, "Partial FC r=0.1", 8)]
    assert (
        sampled["rows"] == 500
        and sampled["memory_gib"] < heads[(4000, "whole head", 8)]["memory_gib"]
    )
    page = doc.read_text()
    assert "| 4,000 | Partial FC r=0.2 | 8 |" in page and "## Routing" in page
    # where each part ran, named on the page (the machines here change from day to day)
    assert {by["machine"]["cpu"] for by in result["measured_by"].values()} == {machine()["cpu"]}
    assert f"this machine ({machine_name(machine())}, " in page
    assert (tmp_path / "scale_heads.png").is_file()


def test_routing_benchmark_times_shared_layers_against_the_single_model(tmp_path):
    # bench/routing_throughput.py (docs/EVALUATION.md) at toy size
    out = tmp_path / "routing.json"
    command = [
        sys.executable, "bench/routing_throughput.py", "--width", "4", "--image-size", "32",
        "--embedding-dim", "16", "--clusters", "3", "--identities", "60", "--batch", "8",
        "--repeats", "1", "--shared-layers", "0", "3", "--out", str(out),
    ]  # fmt: skip
    done = subprocess.run(command, cwd=ROOT, capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stderr[-3000:]
    result = json.loads(out.read_text())
    assert [row["shared_layers"] for row in result["shared_layers"]] == [0, 3]
    for row in result["shared_layers"]:
        assert row["routed_images_per_s"] > 0 and row["single_images_per_s"] > 0
    assert "| shared layers |" in done.stdout
    assert result["machine"] == machine() and result["code"] == source_digest()
    assert datetime.fromisoformat(result["measured"]).tzinfo is not None  # UTC


def test_subnet_memory_benchmark_counts_k_subnets_and_their_recomputation(tmp_path):
    # bench/subnet_memory.py (docs/TRAINING.md, stage 2's memory) at toy size: a step
    # keeps K sub-nets' activations, and under stage2.activation_checkpointing only its
    # inputs (a small fraction)
    out = tmp_path / "memory.json"
    command = [
        sys.executable, "bench/subnet_memory.py", "--backbone", "iresnet18", "--width", "32",
        "--image-size", "32", "--batch", "2", "--clusters", "1", "2", "--repeats", "1",
        "--out", str(out),
    ]  # fmt: skip
    done = subprocess.run(command, cwd=ROOT, capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stderr[-3000:]
    result = json.loads(out.read_text())
    assert result["machine"] == machine()
    rows = {(r["subnets"], r["precision"]): r for r in result["rows"]}
    for precision in ("fp32", "bf16"):
        one, two = rows[1, precision], rows[2, precision]
        assert two["kept_mib"] == pytest.approx(2 * one["kept_mib"], rel=0.01)
        assert two["kept_checkpointed_mib"] < two["kept_mib"] / 20
    assert rows[1, "bf16"]["kept_mib"] < rows[1, "fp32"]["kept_mib"]


@pytest.mark.slow
def test_results_harness_trains_evaluates_resumes_and_writes_the_page(tmp_path, capsys):
    # bench/results.py (docs/RESULTS.md) on the smoke config: two methods and a variant,
    # one seed (the statistics over seeds: the test after next, on the kept runs)
    out, page, js = tmp_path / "runs", tmp_path / "RESULTS.md", tmp_path / "r.json"
    command = [
        sys.executable, "bench/results.py", "-c", "configs/smoke.yaml", "--set",
        "data.max_classes=9", "data.batch_size=8", "clustering.num_clusters=2", "logger=csv",
        "eval.plots=false", "eval.timing_batches=1", "--seeds", "1",
        "--methods", "clustered", "single", "--out", str(out), "--json", str(js),
        "--page", str(page), "--variant", "pass:clustered:stage2.epoch_size=mean@1",
    ]  # fmt: skip
    done = subprocess.run(command, cwd=ROOT, capture_output=True, text=True, timeout=600)
    assert done.returncode == 0, done.stdout[-3000:] + done.stderr[-3000:]
    assert "evaluating" not in done.stdout  # train.py evaluated each run it trained
    result = json.loads(js.read_text())
    agg = result["aggregate"]
    assert agg["seeds"] == {"clustered": [1], "single": [1], "pass": [1]}
    paired = agg["paired"]["clustered"]
    assert paired["row"] == "clustered, routed (top_m=1, moe)"
    runs = result["runs"]
    diff = (
        runs["clustered"]["1"]["rows"][paired["row"]]["top1"]
        - runs["single"]["1"]["rows"][paired["vs_single"]["row"]]["top1"]
    )
    assert paired["vs_single"]["top1"]["mean"] == pytest.approx(diff)
    assert paired["vs_single"]["top1"]["low"] is None  # one seed: no interval
    images = result["training_images"]
    assert images["clustered"]["stage2"] >= images["pass"]["stage2"] > 0  # the mean's epoch
    text = page.read_text()
    assert "| clustered | 1 | clustered, routed (top_m=1, moe) |" in text
    assert "| pass | 1 | clustered, routed (top_m=1, moe) |" in text
    assert "- `pass`: clustered, `stage2.epoch_size=mean`" in text
    # the header is this experiment's (it said LFW-423 and its settings for any -c)
    assert text.startswith("# Results: the methods over seeds (smoke)\n")
    assert "LFW" not in text and "K=2 clusters" in text and "`configs/smoke.yaml`" in text
    assert sorted(p.name for p in out.glob("*-s*") if p.is_dir())[0] == "smoke-clustered-s1"
    # where the runs trained: a paired difference across machines includes the machine's
    here, words = machine(), " ".join(text.split())  # the page wraps at 86 characters
    assert f"Trained on: {here['cpu']} ({here['cpu_capability']} kernels" in words
    assert ": 3 runs." in words and "different machines" not in words
    assert result["runs"]["single"]["1"]["trained_on"] == [here]
    result["runs"]["single"]["1"]["trained_on"] = [{**here, "cpu": "Another CPU"}]
    lines = load_script("bench/results.py").machines(result["runs"])
    assert "Another CPU (" in lines[0] and ": 2 runs" in lines[0]
    assert ": 1 run." in lines[0] or ": 1 run;" in lines[0]
    assert lines[1].startswith("Seed 1 has runs trained on different machines")
    # a second call trains nothing and renders the same page (this call and the next
    # in this process: the first ran the script as written)
    page.unlink()
    run_script(*command[1:])
    assert "training" not in capsys.readouterr().out
    assert page.read_text() == text
    # runs kept from when the presets wrote ArcFace's margin out (head.m: 0.5, which
    # unset means): the same training, reused, not refused as trained otherwise
    for run in (p for p in out.glob("smoke-*") if p.is_dir()):
        config = run / "config.yaml"
        assert "\n  m: null\n" in config.read_text()
        config.write_text(config.read_text().replace("\n  m: null\n", "\n  m: 0.5\n", 1))
    run_script(*command[1:])
    assert "training" not in capsys.readouterr().out
    # an evaluation with overrides (evaluate.py ... route.top_m=2) or by other code is
    # not averaged in with the others: the run is evaluated again, as trained (review)
    kept = out / "smoke-pass-s1" / "eval" / "results.json"
    recorded = json.loads(kept.read_text())
    assert recorded["overrides"] == [] and recorded["code"] == source_digest()
    assert recorded["machine"] == machine("cuda" if torch.cuda.is_available() else None)
    kept.write_text(json.dumps({**recorded, "overrides": ["route.top_m=2"]}))
    run_script(*command[1:])
    assert "evaluating smoke-pass-s1" in capsys.readouterr().out
    assert json.loads(kept.read_text())["overrides"] == []
    text = page.read_text()  # that run's throughput, timed again
    # a kept run trained otherwise than asked is refused, not reported under the new name
    changed = [*command[1:-1], "pass:clustered:stage2.epoch_size=largest@1"]
    with pytest.raises(
        SystemExit, match=r"smoke-pass-s1 was trained with stage2\.epoch_size='mean'"
    ):
        run_script(*changed)
    assert "training" not in capsys.readouterr().out
    # so is one trained with a setting this command no longer gives (an override
    # dropped, another -c): every training setting is compared, not only those given
    fewer = [c for c in command[1:] if c != "data.batch_size=8"]
    with pytest.raises(SystemExit, match=r"trained with data.batch_size=8, this command asks for"):
        run_script(*fewer)
    assert "training" not in capsys.readouterr().out
    # the page reports the top_m sweep: a run that would not score it is refused first
    no_sweeps = [*command[1:5], "eval.sweeps=false", *command[5:]]
    with pytest.raises(SystemExit, match=r"clustered: eval.sweeps=false; the page reports"):
        run_script(*no_sweeps)
    assert "training" not in capsys.readouterr().out
    assert page.read_text() == text
    # training images are steps x batch: one process's, one batch a step; a run with
    # accumulation or several processes is refused, not undercounted (review)
    results = load_script("bench/results.py")
    run = out / "smoke-pass-s1"
    assert results._training_images(run)["stage1"] == images["pass"]["stage1"]
    # stage 2: each sub-net's own batch, which its record keeps (a cluster with fewer
    # training images than a batch takes them all; counted as a whole batch, review)
    records = RunFolder(run).subnet_records()
    assert [(r["batch_size"], r["world_size"]) for r in records.values()] == [(8, 1)] * 2
    steps = json.loads((run / "results.json").read_text())["stage2_steps"]
    assert results._training_images(run)["stage2"] == images["pass"]["stage2"] == steps * 16
    record = RunFolder(run).subnet_file(1).with_suffix(".json")
    record.write_text(json.dumps({**json.loads(record.read_text()), "batch_size": 3}))
    assert results._training_images(run)["stage2"] == steps * (8 + 3)
    # stage 1's own batch, which stage1.json keeps: a resume between the stages may give
    # stage 2 another data.batch_size, which config.yaml then holds (an audit)
    summary = json.loads((run / "stage1.json").read_text())
    assert (summary["batch_size"], summary["world_size"]) == (8, 1)
    config = run / "config.yaml"
    config.write_text(config.read_text().replace("batch_size: 8", "batch_size: 4", 1))
    assert results._training_images(run)["stage1"] == images["pass"]["stage1"]
    config.write_text(
        config.read_text().replace("trainer:\n", "trainer:\n  accumulate_grad_batches: 2\n", 1)
    )
    with pytest.raises(ValueError, match="trainer.accumulate_grad_batches=2"):
        results._training_images(run)
    # an evaluation without the run's one network (a hand-edited results.json): said,
    # naming the file, where a bare StopIteration came from the speed column
    kept.write_text(json.dumps({**recorded, "rows": recorded["rows"][:1]}))
    with pytest.raises(SystemExit, match=rf"{kept} has no row of the run's one network"):
        results.run_summary(run)


def test_results_pair_the_top_m_values_every_seed_scored():
    # a run kept from before the top_m sweep doubled has every top_m from 1 to K
    results = load_script("bench/results.py")
    # its page goes beside a --json of one's own, not over docs/RESULTS.md
    assert results.page_path(None, None) == Path("docs/RESULTS.md")
    assert results.page_path("/tmp/trial.json", None) == Path("/tmp/trial.md")
    assert results.page_path("/tmp/trial.json", "p.md") == Path("p.md")
    kept = json.loads((ROOT / "bench" / "results" / "lfw423.json").read_text())
    runs = kept["runs"]
    seed = runs["clustered"]["43"]
    seed["top_m"] = {m: seed["top_m"][m] for m in ("1", "2", "4", "8")}
    top_m = results.aggregate(runs)["paired"]["clustered"]["top_m"]
    assert list(top_m) == ["1", "2", "4", "8"]
    # a variant run on a seed the single model lacks renders without paired cells
    runs["other"] = {"45": runs["clustered"]["42"]}
    result = {**kept, "aggregate": results.aggregate(runs), "runs": runs}
    page = results.render(result, "python bench/results.py ...")
    assert "| other | 0 | clustered, routed (top_m=1, moe) | no common seed |" in page


def test_results_page_is_its_json_rendered_and_one_seed_has_no_spread():
    # docs/RESULTS.md is what bench/results.py renders from the runs kept in its JSON
    # (aggregated again), and the JSON is standard (a one-seed configuration has no
    # standard deviation or interval: null, not 0 and +-Infinity, which JSON lacks)
    results = load_script("bench/results.py")
    result = json.loads((ROOT / "bench" / "results" / "lfw423.json").read_text())
    runs = {name: {int(s): v for s, v in by.items()} for name, by in result["runs"].items()}
    assert results.aggregate(runs) == result["aggregate"]
    json.dumps(result, allow_nan=False)
    # the paired difference against the single model's best row, by hand: per seed,
    # then the mean and its 95% t interval (3 seeds: 2 degrees of freedom, 4.303)
    paired = result["aggregate"]["paired"]["clustered"]
    row, best = paired["row"], paired["vs_single"]["row"]
    assert best == result["aggregate"]["best_single"] and paired["vs_single"]["seeds"] == [
        42,
        43,
        44,
    ]
    diffs = [runs["clustered"][s]["rows"][row]["top1"] - runs["single"][s]["rows"][best]["top1"]
             for s in (42, 43, 44)]  # fmt: skip
    mean, sd = sum(diffs) / 3, (sum((d - sum(diffs) / 3) ** 2 for d in diffs) / 2) ** 0.5
    assert paired["vs_single"]["top1"]["mean"] == pytest.approx(mean)
    assert paired["vs_single"]["top1"]["high"] == pytest.approx(mean + 4.303 * sd / 3**0.5)
    for part in ("intro", "notes"):
        result[part] = (ROOT / "bench" / "results" / f"lfw423_{part}.md").read_text()
    page = results.render(result, result["command"])
    assert page == (ROOT / "docs" / "RESULTS.md").read_text()
    assert "| shared3 | 1 | clustered, routed (top_m=1, moe) | 69.11% (one seed) |" in page
    # img/s of runs timed in their own evaluations do not compare (the same network at
    # 118 and 414 img/s, a review): the speed column divides by the run's own one
    # network, timed in the same evaluation, per seed, then the mean
    routed = runs["clustered"]
    by_hand = [
        routed[s]["rows"][row]["throughput"]
        / routed[s]["rows"]["stage-1 model (one head)"]["throughput"]
        for s in (42, 43, 44)
    ]
    speed = result["aggregate"]["table"]["clustered"][row]["speed"]
    assert speed["mean"] == pytest.approx(sum(by_hand) / 3) and speed["n"] == 3
    single = result["aggregate"]["table"]["single"]["single model (one head)"]["speed"]
    assert single["mean"] == 1.0
    assert f"| 234 | {speed['mean']:.2f}x ± {speed['sd']:.2f} |" in page
    # a variant on some seeds only
    variant = results.parse_variant("pass:clustered:stage2.epoch_size=mean,head.m=0.4@2,5")
    assert variant == ("pass", "clustered", ["stage2.epoch_size=mean", "head.m=0.4"], [2, 5])
    one = results.interval([0.5])
    assert one["sd"] is None and one["low"] is None and one["n"] == 1
    wide = results.interval([0.1, 0.3] * 20)  # 39 degrees of freedom: the table's last, 2.086
    assert wide["high"] - wide["mean"] == pytest.approx(2.086 * wide["sd"] / 40**0.5)


def test_the_scale_page_names_each_parts_machine_when_one_part_is_rerun():
    # parts run apart, on machines that change from day to day: a part measured before
    # the records (the platform's name only) keeps that name beside a re-run part's
    scale = load_script("bench/scale.py")
    here = machine()
    result = {
        "machine": "x86_64, 2 threads",
        "lfw": {},
        "routing": {},
        "measured_by": {"routing": {"machine": here, "threads": 2}},
    }
    assert scale._machine(result) == (
        f"routing on {machine_name(here)}, 2 threads; lfw on x86_64, 2 threads"
    )
    del result["measured_by"]  # a JSON of before the records
    assert scale._machine(result) == "x86_64, 2 threads"


def test_scale_page_is_its_json_rendered():
    # docs/SCALE.md says bench/scale.py writes it: passages written into the page by
    # hand would be lost the next time it is measured
    scale = load_script("bench/scale.py")
    result = json.loads((ROOT / "bench" / "results" / "scale.json").read_text())
    assert scale.render(result) == (ROOT / "docs" / "SCALE.md").read_text()


def test_sample_index_benchmark_measures_setup_and_a_forked_workers_copy(tmp_path, capsys):
    # bench/sample_index.py (docs/DATA.md) at toy size: 3,000 images of 60 identities
    out = tmp_path / "index.json"
    command = [
        sys.executable, "bench/sample_index.py", "--images", "3000", "--identities", "60",
        "--out", str(out),
    ]  # fmt: skip
    subprocess.run(command, cwd=ROOT, check=True, capture_output=True, timeout=300)
    result = json.loads(out.read_text())
    assert result["images"] == 3000 and result["train_samples"] == 60 * 35  # 0.7 of 50 each
    assert result["setup_s"] > 0 and result["rss_bytes_per_image"] > 0
    assert result["setup_cached_s"] > 0  # a second process, reading the kept split
    assert result["worker_private_mb_per_epoch"] > 0  # the worker's reads did copy pages
    assert result["machine"] == machine()
    # im2rec's layout: the second process reads the labels the first one kept (the
    # measuring processes are fresh ones whichever process starts them)
    run_script(*command[1:], "--layout", "im2rec")
    result = json.loads(out.read_text())
    assert result["layout"] == "im2rec" and result["train_samples"] == 60 * 35
    assert result["setup_s"] > 0 and result["setup_cached_s"] > 0
    with pytest.raises(SystemExit) as bad:
        run_script("bench/sample_index.py", "--images", "5", "--identities", "9")
    assert bad.value.code == 2 and "--identities" in capsys.readouterr().err
    # 1 image an identity: the measuring process's scan refused it, and the command
    # said only CalledProcessError's exit status
    with pytest.raises(SystemExit) as bad:
        run_script("bench/sample_index.py", "--images", "10", "--identities", "10")
    assert bad.value.code == 2 and "--images >= 10 x --identities" in capsys.readouterr().err


@pytest.mark.parametrize(
    ("script", "args", "said"),
    [
        ("data_throughput.py", ["--batches", "0"], "argument --batches: 0 is below 1"),
        ("routing_throughput.py", ["--identities", "2", "--clusters", "4"], "cannot fill"),
        ("train_overhead.py", ["--classes", "1"], "argument --classes: 1 is below 2"),
        ("subnet_memory.py", ["--clusters", "0"], "argument --clusters: 0 is below 1"),
        ("stage_speed.py", ["--skip", "-1"], "argument --skip: -1 is below 0"),
        ("open_set.py", ["--run", "r", "--export", "e", "--out", "/dev/null/o.json"], "(not a f"),
    ],
)
def test_a_benchmark_refuses_a_count_that_measures_nothing(script, args, said, capsys):
    # 0 or a negative count ended in a ZeroDivisionError or StatisticsError traceback, or
    # wrote figures of nothing timed (exit 0). In this process (argparse's exit, not an
    # exception, or pytest.raises fails): a fresh interpreter per case cost 6 x 9 s.
    with pytest.raises(SystemExit) as refused:
        run_script(f"bench/{script}", *args)
    err = capsys.readouterr().err
    assert refused.value.code == 2 and said in err, err[-2000:]


def test_the_benchmarks_argument_types_refuse_what_cannot_run(tmp_path, capsys):
    from facecluster.cli import at_least, output_file

    # an --out that cannot be written was found after the work (minutes), a config or
    # data error of stage_speed was a traceback
    assert output_file(str(tmp_path / "new" / "x.json")) == str(tmp_path / "new" / "x.json")
    assert output_file("/dev/null") == "/dev/null"  # a file there: itself, not /dev
    for text, error in (("/dev/null/x.json", "cannot write there (not a folder"), ("", "no file")):
        with pytest.raises(argparse.ArgumentTypeError, match=re.escape(error)):
            output_file(text)
    stage_speed = load_script("bench/stage_speed.py")
    with pytest.raises(SystemExit) as stop:
        stage_speed.main(["-c", str(SMOKE), f"data.root={tmp_path / 'none'}", "--out", "o.json"])
    assert stop.value.code == 2 and f"data.root='{tmp_path / 'none'}' does not exist" in (
        capsys.readouterr().err
    )

    assert at_least(0.01, float)("0.5") == 0.5 and at_least(0)("0") == 0
    for parse, text, error in (
        (at_least(0.01, float), "-1", "-1 is below 0.01"),
        (at_least(0.01, float), "nan", "nan is below 0.01"),
        (at_least(1), "x", "'x' is not a whole number"),
        (at_least(1), "1.5", "'1.5' is not a whole number"),
    ):
        with pytest.raises(argparse.ArgumentTypeError, match=re.escape(error)):
            parse(text)


def test_stage_speed_says_a_stage_it_did_not_time():
    # --skip at least a stage's steps wrote images_per_s: null, exit 0, without a word
    speed = load_script("bench/stage_speed.py").StageSpeed(skip=3)
    module = SimpleNamespace(device=torch.device("cpu"), stage=1)
    batch = (torch.zeros(4, 1), torch.zeros(4))
    trainer = SimpleNamespace(estimated_stepping_batches=3, accumulate_grad_batches=1)
    with pytest.raises(ConfigError, match="stage 1 has 3 steps, all within --skip 3"):
        speed.on_train_start(trainer, module)  # refused before it trains
    trainer.estimated_stepping_batches = 5
    for steps in (3, 5):  # a stage stopped early, and one that ran its steps
        speed.on_train_start(trainer, module)
        for i in range(steps):
            speed.on_train_batch_start(trainer, module, batch, i)
            speed.on_train_batch_end(trainer, module, None, batch, i)
        speed.on_train_end(trainer, module)
        timed = speed.stages["stage1"]
        assert timed["steps"] == steps and timed["timed_steps"] == steps - 3
        if steps == 3:
            assert timed["images_per_s"] is None
            assert speed.unmeasured() == [
                "stage1 ran 3 steps, all within --skip 3: its images_per_s is null; use a "
                "smaller --skip or more steps"
            ]
        else:
            assert timed["images_per_s"] > 0 and speed.unmeasured() == []


def test_the_input_benchmark_refuses_a_set_it_cannot_time(tmp_path, capsys):
    # a set of PNG faces (valid for training) ended in simplejpeg's "Could not determine
    # subsampling level" traceback, --root "" packed the working directory, and the
    # packer's messages named its own SRC=
    from PIL import Image

    for person in ("a", "b"):
        (tmp_path / "png" / person).mkdir(parents=True)
        for i in range(2):
            Image.new("RGB", (16, 16)).save(tmp_path / "png" / person / f"{i}.png")
    out = tmp_path / "out.json"
    for root, said in (
        (tmp_path / "png", f"--root: {tmp_path / 'png' / 'a' / '0.png'} is not a JPEG"),
        ("", "--root names no folder"),
        (tmp_path / "none", f"--root: '{tmp_path / 'none'}' does not exist"),
    ):
        with pytest.raises(SystemExit) as stop:
            run_script("bench/data_throughput.py", "--root", str(root), "--out", str(out))
        assert stop.value.code == 2 and said in capsys.readouterr().err


def test_a_gpu_left_unused_or_unfed_is_said_in_facecluster_settings(monkeypatch):
    # Lightning said "You can set it by doing `Trainer(accelerator='gpu')`" and
    # "increasing ... `num_workers=15` in the `DataLoader`", settings nobody here sets,
    # at each stage, and the second on the CPU too, where workers take training's cores
    from facecluster.builders import hardware_hints

    smoke = load_config(SMOKE)  # trainer.accelerator: cpu, data.num_workers: 0
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    monkeypatch.setattr(torch.backends.mps, "is_available", lambda: False)
    assert hardware_hints(smoke) == []
    assert hardware_hints(smoke.with_overrides(["trainer.accelerator=auto"])) == []
    monkeypatch.setattr(torch.backends.mps, "is_available", lambda: True)  # a Mac's
    (unused,) = hardware_hints(smoke)
    assert unused.startswith("an Apple GPU (MPS) is here, but trainer.accelerator=cpu")
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    (unused,) = hardware_hints(smoke)
    assert unused.startswith("a CUDA GPU is here, but trainer.accelerator=cpu (the demo")
    assert "add trainer.accelerator=gpu" in unused
    for workers in (0, 1):  # default.yaml's 1 too
        given = ["trainer.accelerator=gpu", f"data.num_workers={workers}"]
        (unfed,) = hardware_hints(smoke.with_overrides(given))
        assert unfed.startswith(f"data.num_workers={workers} decodes the images in too few")
    fed = ["trainer.accelerator=gpu", "data.num_workers=4"]
    assert hardware_hints(smoke.with_overrides(fed)) == []
