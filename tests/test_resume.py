"""Resume: interrupt a seeded CPU run at an epoch boundary in each stage, continue it,
and end with exactly the weights of an uninterrupted run."""

from __future__ import annotations

import logging
import os
import shutil
import warnings
from pathlib import Path

import lightning as L
import pytest
import torch

from facecluster.callbacks import ClusteringCallback
from facecluster.checkpoint_io import AtomicCheckpointIO
from facecluster.config import ConfigError, load_config
from facecluster.pipeline import train
from facecluster.run import RunFolder
from tests.conftest import DEMO, SMOKE, smoke_overrides

pytestmark = pytest.mark.slow

EPOCHS = ("trainer.max_epochs=2", "data.num_workers=1")


class Interrupted(Exception):
    """Stands for a killed process (the run stops with its checkpoints on disk)."""


class StopAtEpochStart(L.Callback):
    """Raise when ``stage`` starts epoch ``epoch``: the previous epoch is checkpointed."""

    def __init__(self, stage: int, epoch: int) -> None:
        self.stage, self.epoch = stage, epoch

    def on_train_epoch_start(self, trainer, pl_module):
        if pl_module.stage == self.stage and trainer.current_epoch == self.epoch:
            raise Interrupted(f"stage {self.stage}, epoch {self.epoch}")


def _params(module) -> dict[str, torch.Tensor]:
    return {k: v.detach().clone() for k, v in module.state_dict().items()}


@pytest.mark.parametrize("cap", [(), ("trainer.max_steps=100000",)], ids=["", "max_steps"])
def test_interrupted_twice_and_resumed_equals_uninterrupted(tmp_path, cap, caplog):
    # cap: a trainer.max_steps that does not bind; Lightning read a resume's epoch-end
    # checkpoint under it as one saved inside that epoch, and counted the next epoch
    # without training it (stage 1 one epoch short, the record saying it was not: a review)
    reference = train(load_config(SMOKE, smoke_overrides(tmp_path / "a", *EPOCHS, *cap)))

    cfg = load_config(SMOKE, smoke_overrides(tmp_path / "b", *EPOCHS, *cap))
    with pytest.raises(Interrupted, match="stage 1"):
        train(cfg, callbacks=[StopAtEpochStart(stage=1, epoch=1)])
    run_dir = tmp_path / "b" / "run"
    assert (run_dir / "stage1" / "checkpoints" / "last.ckpt").is_file()
    assert not (run_dir / "clusters.pt").exists()

    # each resume says where the run goes on (a stage 1 begun again said nothing)
    from facecluster.pipeline import _resumed_from

    assert _resumed_from(cfg, RunFolder(tmp_path / "none")) == (
        "stage 1 starts again from its first epoch (it had saved no checkpoint)"
    )
    with caplog.at_level(logging.INFO), pytest.raises(Interrupted, match="stage 2"):
        train(
            RunFolder.config_for_resume(str(run_dir)),
            callbacks=[StopAtEpochStart(stage=2, epoch=1)],
        )
    assert f"resumed: stage 1 goes on from {run_dir}/stage1/checkpoints/last.ckpt" in caplog.text
    assert (run_dir / "clusters.pt").is_file()
    stage2_last = RunFolder(run_dir).last_checkpoint(2, "subnets-0-2")
    assert torch.load(stage2_last, weights_only=False)["epoch"] == 0

    caplog.clear()
    with caplog.at_level(logging.INFO):
        resumed = train(RunFolder.config_for_resume(str(run_dir)))
    assert "resumed: stage 1 is done; stage 2 goes on" in caplog.text
    for stage in ("1", "cluster", "assemble"):  # none of them trains anything of it now
        again = RunFolder.config_for_resume(str(run_dir), [f"stage={stage}"])
        assert _resumed_from(again, RunFolder(run_dir)) is None, stage

    assert resumed.assignment == reference.assignment
    expected, got = _params(reference.subnets), _params(resumed.subnets)
    assert expected.keys() == got.keys()
    for key in expected:
        torch.testing.assert_close(got[key], expected[key], rtol=0, atol=0, msg=key)
    assert resumed.results["stage2_steps"] == reference.results["stage2_steps"]
    assert resumed.results["stage1"] == reference.results["stage1"]

    # a stage's (a job's) last.ckpt alone, as uninterrupted, and no temporary file
    def kept(run: Path) -> list[str]:
        return sorted(str(p.relative_to(run)) for p in run.rglob("checkpoints/*"))

    assert kept(run_dir) == kept(tmp_path / "a" / "run")
    assert [Path(name).name for name in kept(run_dir)] == ["last.ckpt", "last.ckpt"]


BEST_STATE = (
    "ModelCheckpoint{'monitor': 'val/acc', 'mode': 'max', 'every_n_train_steps': 0, "
    "'every_n_epochs': 1, 'train_time_interval': None}"
)


def test_a_run_saved_with_a_best_checkpoint_resumes_without_asking_for_its_callback(tmp_path):
    # until 2026-12-07 each stage kept a best-epochNNN.ckpt by val/acc beside last.ckpt
    # (read by nothing), whose callback's state last.ckpt holds: at a resume of such a
    # run Lightning warned "Please add the following callbacks: [ModelCheckpoint...]"
    cfg = load_config(SMOKE, smoke_overrides(tmp_path, "stage=1", "logger=none", *EPOCHS))
    with pytest.raises(Interrupted, match="stage 1"):
        train(cfg, callbacks=[StopAtEpochStart(stage=1, epoch=1)])
    run = RunFolder(tmp_path / "run")
    last = run.last_checkpoint(1)
    checkpoint = torch.load(last, weights_only=True)
    (state,) = checkpoint["callbacks"].values()
    best = {
        **state,
        "monitor": "val/acc",
        "best_model_path": str(last.parent / "best-epoch000.ckpt"),
    }
    # a user's own ModelCheckpoint of that monitor (train(cfg, callbacks=[...])) keeps its state
    mine = {**best, "best_model_path": str(tmp_path / "mine" / "epoch=0-step=5.ckpt")}
    copy = tmp_path / "mine.ckpt"
    torch.save({**checkpoint, "callbacks": {BEST_STATE: mine}}, copy)
    assert BEST_STATE in AtomicCheckpointIO().load_checkpoint(copy)["callbacks"]
    checkpoint["callbacks"] = {BEST_STATE: best, **checkpoint["callbacks"]}
    torch.save(checkpoint, last)
    with warnings.catch_warnings(record=True) as said:
        warnings.simplefilter("always")
        train(run.config_for_resume(str(run.path), ["stage=1"]))
    assert run.has_stage_summary(1)
    assert not [w for w in said if "add the following callbacks" in str(w.message)]
    assert BEST_STATE not in torch.load(last, weights_only=True)["callbacks"]  # saved anew


def test_a_job_stopped_while_saving_its_subnets_is_continued_not_trained_again(
    tmp_path, monkeypatch
):
    # A job saves its sub-nets one after another once trained (minutes at K=64): a
    # kill after the first one left the others to a new job, trained again from the
    # stage-1 backbone.
    cfg = load_config(SMOKE, smoke_overrides(tmp_path, "logger=none", "eval.after_training=false"))
    save = RunFolder.save_subnet

    def stopped_after_one(self, k, *args):
        if self.subnet_records():
            raise Interrupted(f"saving sub-net {k}")
        save(self, k, *args)

    monkeypatch.setattr(RunFolder, "save_subnet", stopped_after_one)
    with pytest.raises(Interrupted, match="saving sub-net 1"):
        train(cfg)
    monkeypatch.undo()
    run = RunFolder(tmp_path / "run")
    first = run.subnet_file(0).stat().st_mtime_ns
    checkpoint = run.last_checkpoint(2, "subnets-0-2").read_bytes()
    result = train(RunFolder.config_for_resume(str(run.path)))
    assert result.results is not None
    assert {r["job"] for r in run.subnet_records().values()} == {"subnets-0-2"}
    assert run.last_checkpoint(2, "subnets-0-2").read_bytes() == checkpoint, "not trained"
    assert run.subnet_file(0).stat().st_mtime_ns == first, "a saved sub-net is not touched"


class MappedCheckpoints(L.Callback):
    """Checkpoint files still mapped by this process once replaced, at each stage's end."""

    def __init__(self) -> None:
        self.deleted: list[str] = []

    def on_train_end(self, trainer, pl_module):
        with open("/proc/self/maps") as f:
            self.deleted += [line for line in f if ".ckpt" in line and "(deleted)" in line]


def test_resume_from_a_stage1_checkpoint_file(tmp_path):
    cfg = load_config(
        SMOKE, smoke_overrides(tmp_path, "trainer.max_epochs=2", "stage2.max_epochs=1")
    )
    with pytest.raises(Interrupted):
        train(cfg, callbacks=[StopAtEpochStart(stage=1, epoch=1)])
    ckpt = tmp_path / "run" / "stage1" / "checkpoints" / "last.ckpt"
    steps_per_epoch = torch.load(ckpt, weights_only=False)["global_step"]
    resumed = RunFolder.config_for_resume(str(ckpt), ["stage2.max_epochs=1"])
    assert resumed.data.max_classes == 12, "the run's own config comes back"
    # the run folder's config, not the checkpoint's: a SLURM run's stage-1 job trained
    # with launcher=local (its command), and resumed from its checkpoint ran locally
    settings = tmp_path / "run" / "config.yaml"
    kept = settings.read_text()
    settings.write_text(
        RunFolder(tmp_path / "run").config(["launcher=slurm"]).run_settings().to_yaml()
    )
    assert RunFolder.config_for_resume(str(ckpt), []).launcher.name == "slurm"
    settings.unlink()  # gone: the checkpoint's config was taken here, and the run then
    # refused by train.py as no run folder ("evaluation and export take the folder"): the
    # run folder is damaged, said at once
    with pytest.raises(ConfigError, match="has no config.yaml: the run folder is damaged"):
        RunFolder.config_for_resume(str(ckpt), [])
    settings.write_text(kept)
    # out of its run folder's layout it is refused: its grandparent folder was taken as
    # the run folder, so /home/u/last.ckpt would have written the run into /
    moved = tmp_path / "moved ckpts" / "last.ckpt"
    moved.parent.mkdir()
    shutil.copy(ckpt, moved)
    with pytest.raises(ConfigError, match=r"resumes inside its run folder, as <run>/stage1"):
        RunFolder.config_for_resume(str(moved), [])
    maps = MappedCheckpoints()
    result = train(resumed, callbacks=[maps])
    assert result.results["stage1"]["steps"] == 2 * steps_per_epoch
    # the checkpoint is read memory-mapped; the optimizer's state was left in its pages
    # on the CPU, keeping the replaced last.ckpt's disk blocks for the rest of the run
    assert maps.deleted == [], maps.deleted
    assert (tmp_path / "run" / "results.json").is_file()


def test_adamw_step_counts_are_copied_out_of_the_mapped_checkpoint_on_a_gpu(tmp_path):
    # On a GPU the optimizer moves its moments to the device but leaves AdamW's 0-d
    # `step` tensors where they are: each, a view of the mapped file, held the whole
    # replaced last.ckpt for the rest of the run. Only they are copied there.
    from facecluster.models.base import _own

    weight = torch.nn.Parameter(torch.ones(4, 3))
    optimizer = torch.optim.AdamW([weight])
    weight.grad = torch.ones_like(weight)
    optimizer.step()
    torch.save({"state": optimizer.state_dict()["state"]}, tmp_path / "last.ckpt")
    mapped = torch.load(tmp_path / "last.ckpt", mmap=True, weights_only=True)["state"][0]
    for every, copied in ((False, {"step"}), (True, {"step", "exp_avg", "exp_avg_sq"})):
        own = _own(mapped, every)
        assert {k for k in own if own[k].data_ptr() != mapped[k].data_ptr()} == copied
        assert all(torch.equal(own[k], mapped[k]) for k in mapped)
    # and the module's hook does it on a GPU (every tensor on the CPU)
    from types import SimpleNamespace

    from facecluster.models.base import StageSystem

    for device, copied in (("cuda", {"step"}), ("cpu", {"step", "exp_avg", "exp_avg_sq"})):
        trainer = SimpleNamespace(strategy=SimpleNamespace(root_device=torch.device(device)))
        module = SimpleNamespace(trainer=trainer, _sharded_states=lambda checkpoint: [])
        checkpoint = {"optimizer_states": [{"state": {0: mapped}, "param_groups": []}]}
        StageSystem.on_load_checkpoint(module, checkpoint)
        own = checkpoint["optimizer_states"][0]["state"][0]
        assert {k for k in own if own[k].data_ptr() != mapped[k].data_ptr()} == copied, device


def test_resume_after_a_finished_stage1_clusters_by_the_same_method(tmp_path, monkeypatch):
    # Stopped after stage 1 finished and before the clustering was saved: the resumed
    # stage-1 fit has nothing left to do (Lightning skips on_train_end), and the
    # ClusteringCallback's own method clusters, exactly as a fresh run does.
    reference = train(load_config(SMOKE, smoke_overrides(tmp_path / "a")))
    cfg = load_config(SMOKE, smoke_overrides(tmp_path / "b"))
    with pytest.raises(Interrupted, match="stage 2"):
        train(cfg, callbacks=[StopAtEpochStart(stage=2, epoch=0)])
    run_dir = tmp_path / "b" / "run"
    assert not list(run_dir.glob("stage2/jobs/*/checkpoints/last.ckpt"))
    (run_dir / "clusters.pt").unlink()  # as if killed while clustering

    calls = []
    original = ClusteringCallback.cluster

    def spy(self, trainer, pl_module):
        calls.append(trainer.state.fn)
        return original(self, trainer, pl_module)

    monkeypatch.setattr(ClusteringCallback, "cluster", spy)
    resumed = train(RunFolder.config_for_resume(str(run_dir)))

    assert calls == ["fit"], "one clustering, after the finished stage-1 fit"
    assert resumed.assignment == reference.assignment
    expected, got = _params(reference.subnets), _params(resumed.subnets)
    for key in expected:
        torch.testing.assert_close(got[key], expected[key], rtol=0, atol=0, msg=key)


def test_a_resume_over_other_identities_is_refused(tmp_path):
    # An identity folder added to data.root after stage 1, whose name sorts first:
    # with data.max_classes the run keeps as many identities, but every label would
    # name another person than the stage-1 head learnt. Refused, naming the first.
    root = tmp_path / "faces"
    root.mkdir()
    identities = sorted(p for p in DEMO.iterdir() if p.is_dir())
    for folder in identities[:13]:
        (root / folder.name).symlink_to(folder)
    overrides = smoke_overrides(tmp_path, f"data.root={root}", "stage=1")
    run_dir = train(load_config(SMOKE, overrides)).run_dir
    names = RunFolder(run_dir).class_names()
    (root / "Aaa_Added_Later").symlink_to(identities[12])
    saved = (run_dir / "config.yaml").read_bytes()
    with pytest.raises(ConfigError, match=r"label 0 is 'Aaa_Added_Later' in the data, "):
        train(RunFolder.config_for_resume(str(run_dir), ["stage=all", "stage2.max_epochs=5"]))
    assert RunFolder(run_dir).class_names() == names, "the run's names are kept"
    # nor its config: the next resume would have taken up the refused command's settings
    assert (run_dir / "config.yaml").read_bytes() == saved
    assert not (run_dir / "clusters.pt").exists()
    # a name that differs only in spacing (or Unicode form: a copy made on macOS) was
    # said as two names that look alike: told apart in ascii() form
    (root / "Aaa_Added_Later").unlink()
    (root / names[0]).rename(root / f"{names[0]} ")
    with pytest.raises(ConfigError) as err:
        train(RunFolder.config_for_resume(str(run_dir), ["stage=all"]))
    assert (
        f"label 0 is '{names[0]} ' in the data, '{names[0]}' in the run (one name in two "
        "Unicode forms or spacings: a copy made on macOS?)"
    ) in str(err.value)


def test_an_earlier_checkpoint_of_a_finished_stage1_is_refused(tmp_path):
    # Stage 1 finished, no clustering yet: resuming from its best (not last)
    # checkpoint would train stage 1 again from there and replace its last.ckpt.
    overrides = smoke_overrides(tmp_path, "stage=1", "trainer.max_epochs=2")
    run_dir = train(load_config(SMOKE, overrides)).run_dir
    last = run_dir / "stage1" / "checkpoints" / "last.ckpt"
    before = last.read_bytes()
    best = last.parent / "best-epoch000.ckpt"  # another checkpoint of it, as runs kept
    shutil.copy(last, best)  # until 2026-12-07
    with pytest.raises(ConfigError, match=r"stage 1 of .* is finished; continuing from"):
        train(RunFolder.config_for_resume(str(best), ["stage=cluster"]))
    assert last.read_bytes() == before and not (run_dir / "clusters.pt").exists()
    # and once the clustering is there too (it was let through then, continuing quietly
    # from last.ckpt, not from the checkpoint named); a stage-2 job's best checkpoint
    # neither (tests/test_pipeline.py)
    # nor other stage-1 epochs: without the clustering they trained stage 1 on from its
    # last.ckpt and left stage1.json as it was
    for more in ("trainer.max_epochs=3", "stage1.max_epochs=3"):
        with pytest.raises(ConfigError, match=r"stage 1 of .* is finished after 2 epochs; 3"):
            RunFolder.config_for_resume(str(run_dir), ["stage=cluster", more])
    cfg = RunFolder.config_for_resume(str(run_dir), ["stage2.max_epochs=3"])  # the sub-nets'
    assert cfg.stage_epochs(1) == 2 and cfg.stage_epochs(2) == 3
    train(RunFolder.config_for_resume(str(run_dir), ["stage=cluster"]))
    with pytest.raises(ConfigError, match=r"stage 1 of .* is finished; continuing from"):
        RunFolder.config_for_resume(str(best))
    with pytest.raises(ConfigError, match=r"stage 1 of .* is finished; continuing from"):
        train(load_config(SMOKE, smoke_overrides(tmp_path, f"resume={best}")))  # in-process
    # stopped in stage 1's test, after the clustering saved clusters.pt: stage 1 trained
    # again from the earlier checkpoint under the clusters of the finished one
    (run_dir / "stage1.json").unlink()
    before = last.read_bytes()
    with pytest.raises(ConfigError, match=r"stage 1 of .* is finished; continuing from"):
        RunFolder.config_for_resume(str(best))
    with pytest.raises(ConfigError, match=r"stage 1 of .* is finished; continuing from"):
        train(load_config(SMOKE, smoke_overrides(tmp_path, f"resume={best}")))
    assert last.read_bytes() == before


def test_a_run_stopped_before_its_config_is_said_to_be_started_again(tmp_path):
    # Ctrl-C in the checks at start (a kill-and-resume fuzz) left run.json alone: resume=
    # said "pass the folder printed at the start of the run", which was never printed
    cfg = load_config(SMOKE, smoke_overrides(tmp_path))
    run = RunFolder.for_training(cfg)
    run.create()  # then stopped, before save_config
    with pytest.raises(ConfigError, match="stopped before it saved its config.yaml .* again"):
        RunFolder.config_for_resume(str(run.path), [])
    (run.path / "stage1").mkdir()  # it trained (config.yaml lost since): damaged
    with pytest.raises(ConfigError, match="has no config.yaml: the run folder is damaged"):
        RunFolder.config_for_resume(str(run.path), [])
    (run.path / "stage1").rmdir()
    cfg = load_config(SMOKE, smoke_overrides(tmp_path))  # the command that made it
    assert RunFolder.for_training(cfg).path == run.path
    run.create()
    run.save_config(cfg)
    assert RunFolder.config_for_resume(str(run.path), []).run_name == run.path.name


def test_a_resume_that_names_another_run_folder_is_refused_not_ignored(tmp_path):
    # run_name and output_dir were replaced by the resumed run's own without a word
    cfg = load_config(SMOKE, smoke_overrides(tmp_path))
    run = RunFolder.for_training(cfg)
    run.create()
    run.save_config(cfg)
    for override in ("run_name=other", f"output_dir={tmp_path / 'elsewhere'}"):
        with pytest.raises(ConfigError, match=rf"{override.split('=')[0]}=.* would move the run"):
            RunFolder.config_for_resume(str(run.path), [override])
    # its own name and place, written another way or behind a link, are no change
    same = [f"run_name={run.path.name}", f"output_dir={tmp_path}/./"]
    assert RunFolder.config_for_resume(str(run.path), same).run_name == run.path.name
    (tmp_path / "latest").symlink_to(run.path)
    same = [f"run_name='{run.path.name}'", f'output_dir="{tmp_path}"']
    assert RunFolder.config_for_resume(str(tmp_path / "latest"), same)


def test_a_config_file_with_resume_is_refused_not_ignored(tmp_path, capsys):
    # the resumed run keeps its saved config; a -c file would silently change nothing
    from facecluster import cli

    assert cli.train_main(["-c", str(SMOKE), f"resume={tmp_path / 'run'}"]) == 2
    err = capsys.readouterr().err
    assert f"-c {SMOKE} with resume=" in err and "key=value overrides" in err
    # a YAML file that names a run (resume: ...) resumed it without the checks of
    # resume= (a changed split went through)
    named = tmp_path / "named.yaml"
    named.write_text(f"resume: {tmp_path / 'run'}\n")
    assert cli.train_main(["-c", str(SMOKE), "-c", str(named), "seed=7"]) == 2
    assert f"sets resume={tmp_path / 'run'}" in capsys.readouterr().err
    # a resumed run's config.yaml does not name it: -c starts a new run from it, as from
    # the config.yaml of a run never resumed (it named the run, and was refused; the
    # folder's name, which a resume records, was refused as an existing run's)
    cfg = load_config(SMOKE, smoke_overrides(tmp_path, f"resume={tmp_path / 'run'}"))
    assert cfg.resume and cfg.run_name == "run"
    assert {k: cfg.run_settings().to_dict()[k] for k in ("resume", "run_name")} == {
        "resume": None,
        "run_name": None,
    }


def test_resume_overrides_apply_to_the_runs_config_not_the_default_one(tmp_path, monkeypatch):
    # train.py validated resume='s overrides against configs/default.yaml first: a job
    # of an 8-cluster run (stage2.subnets=[4, 5], what the launchers pass) was refused
    # as "not sub-nets of clustering.num_clusters=4", and a smoke run's more-epochs
    # resume as contradicting default.yaml's stage epochs
    from facecluster import cli, pipeline

    cfg = load_config(SMOKE, [*smoke_overrides(tmp_path), "clustering.num_clusters=8"])
    run = tmp_path / "run"
    run.mkdir()
    (run / "config.yaml").write_text(cfg.run_settings().to_yaml())
    seen = []
    monkeypatch.setattr(pipeline, "train", lambda c: seen.append(c) or pytest.skip("reached"))
    for overrides in (["stage2.subnets=[4,5]", "stage=2"], ["trainer.max_epochs=3"]):
        with pytest.raises(pytest.skip.Exception):
            cli.train_main([f"resume={run}", *overrides, "eval.after_training=false"])
    assert seen[0].stage2.subnets == [4, 5] and seen[0].clustering.num_clusters == 8
    assert seen[1].trainer["max_epochs"] == 3 and str(seen[1].resume) == str(run)


def test_a_finished_single_model_run_refuses_what_would_only_change_its_record(tmp_path):
    # nothing is left to train: a new batch size or margin would be written to the
    # run's config.yaml for weights trained otherwise (a first-user review)
    cfg = load_config(SMOKE, smoke_overrides(tmp_path, "method=single"))
    run = tmp_path / "run"
    (run / "stage1" / "checkpoints").mkdir(parents=True)
    (run / "config.yaml").write_text(cfg.run_settings().to_yaml())
    folder = RunFolder(run)
    # still training: the batch size may change (a resume on fewer devices)
    assert RunFolder.config_for_resume(str(run), ["data.batch_size=4"]).data.batch_size == 4
    folder.save_stage_summary(1, {"global_step": 1})  # finished
    with pytest.raises(ConfigError, match=r"data.batch_size=4 \(the run trained with 8\)"):
        RunFolder.config_for_resume(str(run), ["data.batch_size=4"])
    with pytest.raises(ConfigError, match=r"head.m=0.3 \(the run trained with 0.5\)"):
        RunFolder.config_for_resume(str(run), ["head.m=0.3"])
    # naming sub-nets does not get past it: a single model has none (the refusal
    # advised stage2.subnets=[...]; a review)
    with pytest.raises(ConfigError, match=r"data.batch_size=4 .*for other settings start a new"):
        RunFolder.config_for_resume(str(run), ["data.batch_size=4", "stage2.subnets=[0]"])
    # what it is logged and evaluated with may change; so may a setting written out as
    # the value it had unset (ArcFace's margin, no accumulation)
    kept = ["logger=none", "eval.batch_size=8", "head.m=0.5", "trainer.accumulate_grad_batches=1"]
    assert RunFolder.config_for_resume(str(run), kept).head.m == 0.5


def test_a_trained_stages_optimizer_is_fixed_on_resume(tmp_path):
    # Lightning restores a stage's optimizer and scheduler from its checkpoint: a new
    # lr or weight decay was ignored while a new warm-up applied to the old base rate
    cfg = load_config(SMOKE, smoke_overrides(tmp_path))
    run = tmp_path / "run"
    (run / "stage1" / "checkpoints").mkdir(parents=True)
    (run / "config.yaml").write_text(cfg.run_settings().to_yaml())
    folder = RunFolder(run)
    # stage 1 not started: its optimizer may still change
    assert RunFolder.config_for_resume(str(run), ["stage1.optim.lr=0.01"]).stage1.optim.lr == 0.01
    folder.last_checkpoint(1).write_bytes(b"")  # stage 1 has trained
    with pytest.raises(
        ConfigError,
        match=r"(?s)stage1.optim.lr: the run has 0.05, the command line 0.01\n.*a stage's optim",
    ):
        RunFolder.config_for_resume(str(run), ["stage1.optim.lr=0.01"])
    # nor the margin while a stage is under way (its loss would change mid-training)
    with pytest.raises(ConfigError, match=r"head.m: the run has 0.5, the command line 0.3"):
        RunFolder.config_for_resume(str(run), ["head.m=0.3"])
    folder.save_stage_summary(1, {"global_step": 1})  # stage 1 finished: for the sub-nets
    assert RunFolder.config_for_resume(str(run), ["head.m=0.3"]).head.m == 0.3
    # stage 2 not started yet: its optimizer may change
    assert RunFolder.config_for_resume(str(run), ["stage2.optim.lr=0.5"]).stage2.optim.lr == 0.5
    # a stage-2 job that has a checkpoint resumes it, sub-nets named or not
    job = folder.last_checkpoint(2, "subnets-0-1")
    job.parent.mkdir(parents=True)
    job.write_bytes(b"")
    (job.parents[1] / "subnets.json").write_text("[0, 1]")
    assert folder.started_jobs() == [[0, 1]]
    job_args = ["stage=2", "stage2.jobs=2", "stage2.group=0", "stage2.subnets=[0,1]"]
    with pytest.raises(ConfigError, match=r"stage2.optim.lr: the run has"):
        RunFolder.config_for_resume(str(run), [*job_args, "stage2.optim.lr=0.5"])
    with pytest.raises(
        ConfigError, match=r"head.sample_rate: the run has 1.0, the command line 0.5"
    ):
        RunFolder.config_for_resume(str(run), [*job_args, "head.sample_rate=0.5"])
    # sub-nets named in the main process start over: a new optimizer is theirs
    restart = RunFolder.config_for_resume(str(run), ["stage2.subnets=[1]", "stage2.optim.lr=0.5"])
    assert restart.stage2.optim.lr == 0.5
    # unless another job is under way: the next resume would continue it with them
    other = folder.last_checkpoint(2, "subnets-2")
    other.parent.mkdir(parents=True)
    other.write_bytes(b"")
    (other.parents[1] / "subnets.json").write_text("[2]")
    for change in ("stage2.optim.lr=0.5", "head.m=0.3"):
        with pytest.raises(ConfigError, match=r"(stage2.optim.lr|head.m): the run has"):
            RunFolder.config_for_resume(str(run), ["stage2.subnets=[1]", change])


class StageOneLr(L.Callback):
    """Stage 1's LR before each epoch's second batch (after the epoch's first step)."""

    def __init__(self) -> None:
        self.lrs: dict[int, float] = {}

    def on_train_batch_start(self, trainer, pl_module, batch, batch_idx):
        if pl_module.stage == 1 and batch_idx == 1:
            self.lrs[trainer.current_epoch] = trainer.optimizers[0].param_groups[0]["lr"]


def _as_older_checkpoint(path, schedule_per_epoch: float) -> None:
    """Rewrite a checkpoint as facecluster saved it until 2026-12-06, with
    "steps_per_epoch": the schedule's length per epoch (an epoch's steps unless
    trainer.max_steps bound it)."""
    checkpoint = torch.load(path, weights_only=False)
    checkpoint["facecluster"]["steps_per_epoch"] = schedule_per_epoch
    torch.save(checkpoint, path)


@pytest.mark.parametrize("saved_by", ["", "older"])
def test_a_resume_with_other_steps_per_epoch_keeps_the_schedule_in_epochs(tmp_path, saved_by):
    # On another device count (here: another batch size) an epoch has another number of
    # optimizer steps; the restored step count put the schedule at its end (floor LR).
    common = ("trainer.max_epochs=2", "stage=1")
    ref = StageOneLr()
    train(load_config(SMOKE, smoke_overrides(tmp_path / "ref", *common, "data.batch_size=16")),
          callbacks=[ref])  # fmt: skip
    cfg = load_config(SMOKE, smoke_overrides(tmp_path / "a", *common))  # batch 8
    with pytest.raises(Interrupted):
        train(cfg, callbacks=[StopAtEpochStart(stage=1, epoch=1)])
    resumed = StageOneLr()
    run = tmp_path / "a" / "run"
    if saved_by == "older":  # its key until 2026-12-06: the schedule's length per epoch
        _as_older_checkpoint(run / "stage1" / "checkpoints" / "last.ckpt", 54 / 2)
    train(RunFolder.config_for_resume(str(run), ["data.batch_size=16"]), callbacks=[resumed])
    assert 0.005 < resumed.lrs[1] == pytest.approx(ref.lrs[1], rel=1e-6)


class StepLrs(L.Callback):
    """Stage 1's LR at each optimizer step (before the step)."""

    def __init__(self) -> None:
        self.lrs: list[float] = []

    def on_train_batch_start(self, trainer, pl_module, batch, batch_idx):
        if pl_module.stage == 1:
            self.lrs.append(trainer.optimizers[0].param_groups[0]["lr"])


def test_max_steps_does_not_shorten_a_warm_up_given_in_epochs(tmp_path):
    # trainer.max_steps caps the run, not an epoch: a one-epoch warm-up stays one epoch
    # of optimizer steps (it was warm-up epochs x max_steps / max_epochs)
    common = ("stage=1", "trainer.max_epochs=2", "stage1.optim.warmup_epochs=1")
    full = StepLrs()
    train(load_config(SMOKE, smoke_overrides(tmp_path / "full", *common)), callbacks=[full])
    capped = StepLrs()
    cfg = load_config(SMOKE, smoke_overrides(tmp_path / "capped", *common, "trainer.max_steps=12"))
    train(cfg, callbacks=[capped])
    assert len(capped.lrs) == 12 and len(full.lrs) > 24
    # the same warm-up, step for step, while it lasts
    assert capped.lrs == pytest.approx(full.lrs[:12], rel=1e-6)


@pytest.mark.parametrize("saved_by", ["", "older"])
def test_a_resume_that_lifts_a_binding_max_steps_continues_the_schedule_of_its_epochs(
    tmp_path, saved_by
):
    # The checkpoint kept the schedule's length per epoch (max_steps / epochs when the
    # cap binds) as an epoch's steps: lifted on resume, the count was put ahead by
    # 27/20, and the last epoch trained partly at the floor LR (0): a review
    common = ("stage=1", "trainer.max_epochs=2")
    ref = StepLrs()
    train(load_config(SMOKE, smoke_overrides(tmp_path / "ref", *common)), callbacks=[ref])
    capped = load_config(SMOKE, smoke_overrides(tmp_path / "a", *common, "trainer.max_steps=40"))
    with pytest.raises(Interrupted):
        train(capped, callbacks=[StopAtEpochStart(stage=1, epoch=1)])
    resumed = StepLrs()
    run = tmp_path / "a" / "run"
    if saved_by == "older":  # what a checkpoint held until 2026-12-06: max_steps / epochs
        _as_older_checkpoint(run / "stage1" / "checkpoints" / "last.ckpt", 40 / 2)
    train(RunFolder.config_for_resume(str(run), ["trainer.max_steps=-1"]), callbacks=[resumed])
    assert len(ref.lrs) == 54 and len(resumed.lrs) == 27
    assert resumed.lrs == pytest.approx(ref.lrs[27:], rel=1e-6)


def test_a_max_steps_that_ends_a_stage_within_its_warm_up_is_warned_of(tmp_path):
    # the config refuses a warm-up longer than the stage's epochs; a binding max_steps
    # is often a try-out, so it trains, and says its LR never reaches its peak
    cfg = load_config(
        SMOKE,
        smoke_overrides(
            tmp_path, "stage=1", "trainer.max_epochs=2", "stage1.optim.warmup_epochs=1",
            "trainer.max_steps=9",
        ),
    )  # fmt: skip
    lrs = StepLrs()
    with pytest.warns(UserWarning, match=r"trainer.max_steps=9 ends stage 1 after 9 optimizer "
                      r"steps, within its warm-up of 27 \(stage1.optim.warmup_epochs=1\): its "
                      r"learning rate only ramps up, to 33% of its peak"):  # fmt: skip
        train(cfg, callbacks=[lrs])
    assert len(lrs.lrs) == 9 and lrs.lrs[-1] == pytest.approx(cfg.stage1.optim.lr * 9 / 27)


def test_a_resume_under_a_binding_max_steps_keeps_the_schedule_on_the_global_step(tmp_path):
    # max_steps caps the schedule and the run alike: resumed with another number of steps
    # per epoch (another device count; here another batch size), the schedule's count
    # must stay the global step, not be rescaled as an uncapped run's is
    common = ("stage=1", "trainer.max_epochs=4", "trainer.max_steps=30")
    ref = StepLrs()
    train(load_config(SMOKE, smoke_overrides(tmp_path / "ref", *common)), callbacks=[ref])
    cfg = load_config(SMOKE, smoke_overrides(tmp_path / "a", *common))
    with pytest.raises(Interrupted):
        train(cfg, callbacks=[StopAtEpochStart(stage=1, epoch=1)])
    resumed = StepLrs()
    run = tmp_path / "a" / "run"
    shutil.copytree(run, tmp_path / "a" / "again")  # the interrupted run, resumed twice
    train(RunFolder.config_for_resume(str(run), ["data.batch_size=16"]), callbacks=[resumed])
    assert len(ref.lrs) == 30 and len(resumed.lrs) == 3  # steps 27, 28, 29
    assert resumed.lrs == pytest.approx(ref.lrs[27:], rel=1e-6)
    # more epochs under the same binding max_steps: the schedule is the same 30 steps
    # (the count was rescaled by 4/8, as if the run were half as far)
    again = StepLrs()
    more = RunFolder.config_for_resume(str(tmp_path / "a" / "again"), ["trainer.max_epochs=8"])
    train(more, callbacks=[again])
    assert 0 < len(again.lrs) < 30
    assert again.lrs == pytest.approx(ref.lrs[30 - len(again.lrs) :], rel=1e-6)


def test_a_lock_of_a_slurm_job_that_left_the_queue_is_taken_over(tmp_path, monkeypatch):
    # a stage-1 SLURM job killed on its node (an OOM kill, a node failure) left its lock,
    # which names another host: every resubmission was refused until it was deleted by
    # hand. squeue, asked about that job, says whether it still runs.
    import json
    import socket
    import subprocess

    from facecluster import run as run_module

    monkeypatch.setattr(run_module, "_SQUEUE_FAILED", [-float("inf")])  # asked afresh
    for name in ("SLURM_JOB_ID", "SLURM_RESTART_COUNT", "SLURM_CLUSTER_NAME"):
        monkeypatch.delenv(name, raising=False)  # the tests run inside a SLURM job
    run = RunFolder(tmp_path / "run")
    lock = run.path / "stage1" / "running.json"
    lock.parent.mkdir(parents=True)
    bin_dir = tmp_path / "bin"
    bin_dir.mkdir()
    squeue = bin_dir / "squeue"
    monkeypatch.setenv("PATH", f"{bin_dir}:{os.environ['PATH']}")
    held = {"host": "node17", "pid": 4242, "slurm_job": "77", "slurm_restart": "0"}
    squeue.write_text("#!/bin/sh\necho 77\n")  # still running
    squeue.chmod(0o755)
    lock.write_text(json.dumps(held))
    with pytest.raises(ConfigError, match=r"already running \(host node17, pid 4242, SLURM job 77"):
        run.check_stage1_free()
    squeue.write_text("#!/bin/sh\nexit 0\n")  # gone from the queue
    run.check_stage1_free()
    with run.stage1_lock():
        assert json.loads(lock.read_text())["pid"] == os.getpid()
    assert not lock.exists()
    # a job of another cluster (multi-cluster SLURM): the default cluster, asked from
    # here, does not know its id, which counted as gone; it is asked on its own cluster
    lock.write_text(json.dumps({**held, "slurm_cluster": "gpu-a"}))
    squeue.write_text(
        '#!/bin/sh\ncase "$*" in *--clusters=gpu-a*) printf "CLUSTER: gpu-a\\n%s\\n" $JOB;; '
        '*) echo "slurm_load_jobs error: Invalid job id specified" >&2; exit 1;; esac\n'
    )
    monkeypatch.setenv("JOB", "77")  # still running there
    with pytest.raises(ConfigError, match=r"already running \(host node17, pid 4242, SLURM job 77"):
        run.check_stage1_free()
    monkeypatch.setenv("JOB", "")  # gone: squeue prints only the cluster's line
    with run.stage1_lock():
        assert json.loads(lock.read_text())["pid"] == os.getpid()
    # a job of this machine's cluster is asked about as before, without --clusters, which
    # goes through slurmdbd: a site without accounting refused every takeover
    monkeypatch.setenv("SLURM_CLUSTER_NAME", "gpu-a")
    lock.write_text(json.dumps({**held, "slurm_cluster": "gpu-a"}))
    squeue.write_text(
        '#!/bin/sh\ncase "$*" in *--clusters=*) echo "No cluster \'gpu-a\' known by '
        'database" >&2; exit 1;; *) [ -n "$JOB" ] && echo $JOB; exit 0;; esac\n'
    )
    monkeypatch.setenv("JOB", "77")
    with pytest.raises(ConfigError, match=r"already running \(host node17, pid 4242, SLURM job 77"):
        run.check_stage1_free()
    monkeypatch.setenv("JOB", "")
    run.check_stage1_free()
    # a lock written before the cluster was recorded, by this job's run before a requeue
    # (another SLURM_RESTART_COUNT), is stale whatever squeue says
    monkeypatch.setenv("SLURM_JOB_ID", "77")
    monkeypatch.setenv("SLURM_RESTART_COUNT", "1")
    monkeypatch.setenv("JOB", "77")
    lock.write_text(json.dumps(held))
    run.check_stage1_free()
    monkeypatch.delenv("SLURM_JOB_ID")
    monkeypatch.delenv("SLURM_RESTART_COUNT")
    monkeypatch.delenv("SLURM_CLUSTER_NAME")
    # on this host the pid decides: a live process whose environment still names an
    # allocation that has ended (a tmux session started under salloc) keeps its lock
    holder = subprocess.Popen(["sleep", "60"])
    try:
        lock.write_text(json.dumps({**held, "host": socket.gethostname(), "pid": holder.pid}))
        with pytest.raises(ConfigError, match=rf"already running \(host .*, pid {holder.pid}"):
            run.check_stage1_free()
    finally:
        holder.kill()
        holder.wait()


def test_the_stage1_lock_goes_with_the_clustering_and_a_killed_commands_is_removed(tmp_path):
    # The stage-1 lock was held through stage 2: a kill -9 there left stage1/running.json
    # in the run that a resume then finished (it took no stage-1 lock, stage 1 done),
    # where a command on another machine cannot tell it is stale (a kill-and-resume fuzz)
    import json
    import socket
    import subprocess

    lock = tmp_path / "run" / "stage1" / "running.json"
    seen = {}

    class Look(L.Callback):
        def on_train_epoch_start(self, trainer, pl_module):
            seen[pl_module.stage] = lock.exists()

    cfg = load_config(SMOKE, smoke_overrides(tmp_path, "eval.after_training=false"))
    with pytest.raises(Interrupted, match="stage 2"):
        train(cfg, callbacks=[Look(), StopAtEpochStart(stage=2, epoch=0)])
    assert seen == {1: True, 2: False}, "held in stage 1 alone"
    gone = subprocess.Popen(["true"])
    gone.wait()  # a pid of this host whose process has ended: a kill -9's lock
    lock.write_text(json.dumps({"host": socket.gethostname(), "pid": gone.pid}))
    again = smoke_overrides(tmp_path, f"resume={tmp_path / 'run'}", "eval.after_training=false")
    assert train(load_config(SMOKE, again)).results is not None
    assert not lock.exists()


def test_a_resume_while_another_command_fits_stage1_is_refused_before_it_writes(
    tmp_path, monkeypatch
):
    # Stage 1 and the clustering took no lock: a resume started while the first command
    # still trained stage 1 trained it too, in the same folder, and both clustered and
    # wrote clusters.pt (only stage 2's job lock stopped one of them).
    import json
    import os
    import socket
    import subprocess

    from lightning.pytorch.utilities import rank_zero_only

    from facecluster import run as run_module

    cfg = load_config(SMOKE, smoke_overrides(tmp_path, *EPOCHS))
    with pytest.raises(Interrupted, match="stage 1"):
        train(cfg, callbacks=[StopAtEpochStart(stage=1, epoch=1)])
    run = RunFolder(tmp_path / "run")
    lock = run.path / "stage1" / "running.json"
    assert not lock.exists(), "let go when the fit failed"
    checkpoints = run.checkpoint_dir(1)
    before = {p.name: p.read_bytes() for p in checkpoints.iterdir()}
    saved_config = (run.path / "config.yaml").read_text()
    holder = subprocess.Popen(["sleep", "60"])  # the first command, still training
    try:
        owner = {"host": socket.gethostname(), "pid": holder.pid, "slurm_job": None}
        lock.write_text(json.dumps({**owner, "slurm_restart": "0", "launch": None}))
        for extra in ([], ["stage=1"], ["trainer.max_epochs=3"]):
            with pytest.raises(
                ConfigError,
                match=rf"stage 1 \(or the clustering\) of .* is already running \(host "
                rf".*, pid {holder.pid}\); wait for it to end, or delete .*running.json",
            ):
                train(RunFolder.config_for_resume(str(run.path), extra))
        # nothing trained or written: its checkpoints, its config (the overrides of the
        # refused command), no clustering, and the holder's lock
        assert {p.name: p.read_bytes() for p in checkpoints.iterdir()} == before
        assert (run.path / "config.yaml").read_text() == saved_config
        assert not run.clusters_path.exists() and not run.has_stage_summary(1)
        assert json.loads(lock.read_text())["pid"] == holder.pid
        # a command past the check at start, the other having taken the lock while it
        # scanned the data, is refused at the lock: still before it writes the config
        from facecluster import pipeline

        scan = pipeline.build_datamodule

        def taken_meanwhile(cfg):
            lock.write_text(json.dumps({**owner, "slurm_restart": "0", "launch": None}))
            return scan(cfg)

        lock.unlink()
        monkeypatch.setattr(pipeline, "build_datamodule", taken_meanwhile)
        with pytest.raises(ConfigError, match=r"is already running \(host"):
            train(RunFolder.config_for_resume(str(run.path), ["stage2.max_epochs=5"]))
        monkeypatch.setattr(pipeline, "build_datamodule", scan)
        assert (run.path / "config.yaml").read_text() == saved_config
        assert {p.name: p.read_bytes() for p in checkpoints.iterdir()} == before
    finally:
        holder.kill()
        holder.wait()
    # two commands past the check at start at once: the lock itself refuses the second
    lock.unlink()
    with run.stage1_lock():
        assert json.loads(lock.read_text())["pid"] == os.getpid()
        with pytest.raises(ConfigError, match="is already running"):
            with run.stage1_lock():
                pass
        # the ranks Lightning's launcher starts come up inside rank 0's lock
        monkeypatch.setattr(rank_zero_only, "rank", 1)
        with run.stage1_lock():
            pass
        monkeypatch.setattr(rank_zero_only, "rank", 0)
    assert not lock.exists()
    # srun's other tasks stop at rank 0's refusal instead of waiting in DDP setup
    for name, value in (("SLURM_STEP_ID", "0"), ("SLURM_NTASKS", "2"), ("SLURM_JOB_ID", "9")):
        monkeypatch.setenv(name, value)
    lock.write_text(json.dumps({"host": socket.gethostname(), "pid": os.getpid()}))
    with pytest.raises(ConfigError, match="already running"):
        run.check_stage1_free()
    launch = run_module._lock_owner()["launch"]
    with pytest.raises(ConfigError, match="already running"):
        run_module._wait_for_lock(lock, lock.with_name("refused.json"), launch, timeout=0)
    # the same SLURM job, requeued (another restart count): its own lock, taken over
    lock.write_text(json.dumps({"host": "elsewhere", "pid": 1, "slurm_job": "9"}))
    monkeypatch.setenv("SLURM_RESTART_COUNT", "1")
    with run.stage1_lock():
        assert json.loads(lock.read_text())["slurm_restart"] == "1"
    for name in ("SLURM_STEP_ID", "SLURM_NTASKS", "SLURM_JOB_ID", "SLURM_RESTART_COUNT"):
        monkeypatch.delenv(name)
    # the holder is gone (its pid): the lock is taken over, and let go once done
    lock.write_text(json.dumps({"host": socket.gethostname(), "pid": holder.pid}))
    result = train(RunFolder.config_for_resume(str(run.path), ["stage=1"]))
    assert run.has_stage_summary(1) and not lock.exists()
    assert result.backbone is not None
    assert (checkpoints / "last.ckpt").read_bytes() != before["last.ckpt"]
