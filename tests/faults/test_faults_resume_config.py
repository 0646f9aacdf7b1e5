"""Fault injection: resuming with overrides that contradict the run's checkpoints."""

from __future__ import annotations

import re
import shutil

import pytest

from facecluster.config import ConfigError, load_config
from facecluster.pipeline import _check_prerequisites, train
from facecluster.run import RunFolder
from tests.conftest import DEMO, SMOKE, smoke_overrides

pytestmark = pytest.mark.faults


@pytest.fixture
def run_dir(tmp_path):
    """A run folder with its config.yaml (what resume reads), no training needed."""
    cfg = load_config(SMOKE, smoke_overrides(tmp_path))
    run = RunFolder.for_training(cfg)
    run.create()
    run.save_config(cfg)
    return tmp_path / "run"


def test_contradicting_overrides_are_refused_with_every_difference(run_dir):
    with pytest.raises(ConfigError) as info:
        RunFolder.config_for_resume(
            str(run_dir),
            [
                "data.max_classes=20",
                "model.backbone=iresnet18",
                "clustering.num_clusters=4",
                "data.min_images_per_class=12",
                "method=random",
                "clustering.method=random",
            ],
        )
    message = str(info.value)
    assert "contradict the run's checkpoints" in message
    for expected in (
        "data.max_classes: the run has 12, the command line 20",
        "data.min_images_per_class: the run has 10, the command line 12",
        "clustering.num_clusters: the run has 3, the command line 4",
        "clustering.method: the run has 'kmeans', the command line 'random'",
        "method: the run has 'clustered', the command line 'random'",
        "model.backbone: the run has 'tiny', the command line 'iresnet18'",
    ):
        assert expected in message
    # what k-means grouped decides the sub-nets' identities too
    with pytest.raises(ConfigError, match="clustering.features: the run has 'means', the com"):
        RunFolder.config_for_resume(str(run_dir), ["clustering.features=head"])
    with pytest.raises(ConfigError, match="clustering.overlap: the run has 0.0, the command"):
        RunFolder.config_for_resume(str(run_dir), ["clustering.overlap=0.1"])
    with pytest.raises(ConfigError, match="stage2.negatives: the run has 0.0, the command"):
        RunFolder.config_for_resume(str(run_dir), ["stage2.negatives=0.5"])


def test_harmless_overrides_and_same_root_written_differently_are_accepted(run_dir):
    cfg = RunFolder.config_for_resume(
        str(run_dir),
        ["trainer.max_epochs=5", "logger=none", "stage2.max_epochs=2", f"data.root={DEMO}"],
    )
    assert cfg.trainer["max_epochs"] == 5 and cfg.logger == "none"


def test_a_run_without_a_recorded_split_keeps_its_data_root(run_dir, tmp_path):
    # a run made before split.json has only its identity names to check data against:
    # a --shuffle pack of its folder (the same names, another split) would pass, so
    # another data.root is refused there, as it was (a re-review); the same data
    # written otherwise (a .rec named by itself or by its folder) is no change
    from facecluster.data.pack import main as pack_main

    assert not (run_dir / "split.json").exists()
    other = tmp_path / "other"
    other.mkdir()
    with pytest.raises(ConfigError, match=r"data.root: the run has .*lfw-demo"):
        RunFolder.config_for_resume(str(run_dir), [f"data.root={other}"])
    RunFolder.config_for_resume(str(run_dir), [f"data.root={DEMO}/."])
    assert pack_main([str(DEMO), str(tmp_path / "rec")]) == 0
    config = run_dir / "config.yaml"
    config.write_text(config.read_text().replace(str(DEMO), str(tmp_path / "rec")))
    for form in (tmp_path / "rec" / "train.rec", f"{tmp_path}/./rec/"):
        RunFolder.config_for_resume(str(run_dir), [f"data.root={form}"])


def test_stage1_epochs_stay_once_the_clustering_exists_without_stage1s_summary(run_dir):
    # stopped in stage 1's test: clusters.pt is kept on resume, so more stage-1 epochs
    # would train a backbone the clusters and class means no longer describe
    (run_dir / "clusters.pt").write_bytes(b"")
    with pytest.raises(ConfigError, match="stage 1 of .* is finished after 1 epochs"):
        RunFolder.config_for_resume(str(run_dir), ["trainer.max_epochs=3"])


def test_the_same_data_at_another_path_resumes_and_other_data_is_refused(tmp_path):
    # staging a data set to another path (node-local disk, a new mount, the project
    # moved) is routine: a resume naming it was refused as another data.root, though
    # the data itself decides, identity by identity and by its split's digests
    from facecluster.pipeline import train

    moved, other = tmp_path / "moved", tmp_path / "other"
    shutil.copytree(DEMO, moved)
    shutil.copytree(DEMO, other)
    first = sorted(p for p in other.iterdir() if p.is_dir())[0]
    first.rename(first.with_name("zz_someone_else"))
    train(load_config(SMOKE, smoke_overrides(tmp_path, "stage=1", "logger=none")))
    run = tmp_path / "run"
    with pytest.raises(ConfigError, match="identit"):
        train(load_config(SMOKE, smoke_overrides(tmp_path, f"resume={run}", f"data.root={other}")))
    result = train(
        load_config(SMOKE, smoke_overrides(tmp_path, f"resume={run}", f"data.root={moved}"))
    )
    assert RunFolder(result.run_dir).finished
    assert RunFolder(run).config().data.root == str(moved)  # the next resume reads it
    # a damaged split.json was read as a run made before it: the check was skipped, the
    # evaluation written over with one whose test split held training images
    (run / "split.json").write_text("{junk")
    with pytest.raises(
        ConfigError, match=r"split.json cannot be read \(JSONDecodeError: .*\): the run folder"
    ):
        train(load_config(SMOKE, smoke_overrides(tmp_path, f"resume={run}", f"data.root={moved}")))
    (run / "split.json").write_text("{}")  # JSON, but nothing recorded: damaged too
    with pytest.raises(ConfigError, match=r"split.json cannot be read \(it has no 'val', 'test'"):
        train(load_config(SMOKE, smoke_overrides(tmp_path, f"resume={run}", f"data.root={moved}")))


def test_damaged_state_files_are_named_and_a_subnet_without_weights_is_unfinished(run_dir):
    # a junk stage1.json (or a sub-net's record) ended in a JSONDecodeError traceback; a
    # sub-net whose .pt was deleted counted as finished, and its evaluation failed on it
    run = RunFolder(run_dir)
    run.stage_summary_path(1).parent.mkdir(parents=True, exist_ok=True)
    run.stage_summary_path(1).write_text("")
    with pytest.raises(ConfigError, match=r"stage1.json cannot be read \(JSONDecodeError"):
        run.stage_summary(1)
    for k in (0, 1):
        run.subnet_file(k).parent.mkdir(parents=True, exist_ok=True)
        run.subnet_file(k, ".json").write_text(f'{{"cluster": {k}}}')
    run.subnet_file(0).write_bytes(b"weights")
    assert list(run.subnet_records()) == [0]
    run.subnet_file(1, ".json").write_bytes(b"\xff\xfe")
    with pytest.raises(ConfigError, match=r"subnet1.json cannot be read \(UnicodeDecodeError"):
        run.subnet_records()
    # JSON of another shape ended in a TypeError or KeyError traceback
    run.subnet_file(1, ".json").write_text("[1]")
    with pytest.raises(ConfigError, match=r"subnet1.json .*\(it holds \[1\], not an object"):
        run.subnet_records()
    run.subnet_file(1, ".json").write_text('{"kluster": 1}')
    with pytest.raises(ConfigError, match=r"subnet1.json cannot be read \(it has no 'cluster'\)"):
        run.subnet_records()
    run.stage_summary_path(1).write_text("null")
    with pytest.raises(ConfigError, match=r"stage1.json .*\(it holds null, not an object"):
        run.stage_summary(1)
    # nested past Python's recursion limit, or a name that is no text: a RecursionError,
    # or an AttributeError or TypeError where the names were used (a fuzzing review)
    run.stage_summary_path(1).write_text("[" * 100_000)
    with pytest.raises(ConfigError, match=r"stage1.json cannot be read \(RecursionError: "):
        run.stage_summary(1)
    for entry in ("null", "5", "true", '["a"]'):
        (run_dir / "class_names.json").write_text(f'["a", {entry}, "b"]')
        with pytest.raises(
            ConfigError, match=rf"class_names.json cannot be read \(its entry {re.escape(entry)} "
        ):
            run.class_names()
    (run_dir / "class_names.json").write_text('["a", "b"]')
    assert run.class_names() == ["a", "b"]
    # a file gone (class_names.json: evaluate.py said only "[Errno 2] No such file")
    run.stage_summary_path(1).unlink()
    with pytest.raises(ConfigError, match=r"stage1.json is missing: the run folder is damaged"):
        run.stage_summary(1)


def test_an_evaluation_may_not_change_what_the_run_trained(run_dir):
    # evaluate.py run=<clustered run> method=single evaluated it as a single model and
    # wrote its eval/results.* over the run's; another clustering.num_clusters ended in
    # "top_m=8 must be in [1, 3]" after the calibration, minutes in
    refused = {
        "method=single": "method: the run has 'clustered', the command line 'single'",
        "clustering.num_clusters=8": "clustering.num_clusters: the run has 3, the command line 8",
        "clustering.niter=5": "clustering.niter: the run has 20, the command line 5",
        "stage2.negatives=0.5": "stage2.negatives: the run has 0.0, the command line 0.5",
        "head.name=cosface": "head.name: the run has 'arcface', the command line 'cosface'",
        "clustering={overlap: 0.2}": "clustering.overlap: the run has 0.0, the command line 0.2",
    }
    for override, named in refused.items():
        with pytest.raises(ConfigError, match=rf"(?s)run=.*{re.escape(named)}.*leave these unset"):
            RunFolder(run_dir).finished_config([override])
    # what it runs at test time may change (the run is not finished: refused for that)
    with pytest.raises(ConfigError, match="the run is not finished"):
        RunFolder(run_dir).finished_config(["route.decision=linear", "eval.batch_size=8"])


def test_the_run_keeps_its_data_paths_absolute_for_resumes_from_anywhere(tmp_path, monkeypatch):
    # a relative data.root was saved as typed: a resume from another working dir read it
    # from the project root (no such folder), and the same folder named absolute was
    # refused as another data root
    start, elsewhere = tmp_path / "start", tmp_path / "elsewhere"
    start.mkdir()
    elsewhere.mkdir()
    (start / "faces").symlink_to(DEMO)
    (start / "lfw.bin").write_bytes(b"")
    monkeypatch.chdir(start)
    cfg = load_config(
        SMOKE, [*smoke_overrides(tmp_path), "data.root=faces", "data.verification=[lfw.bin]"]
    )
    run = RunFolder.for_training(cfg)
    run.create()
    run.save_config(cfg)
    saved = RunFolder(tmp_path / "run").config()
    assert saved.data.root == str(start / "faces")
    assert saved.data.verification == [str(start / "lfw.bin")]
    monkeypatch.chdir(elsewhere)
    for root in (None, str(start / "faces"), "../start/faces"):
        overrides = [] if root is None else [f"data.root={root}"]
        cfg = RunFolder.config_for_resume(str(tmp_path / "run"), overrides)
        assert cfg.data.resolved_root().resolve() == DEMO.resolve()
    monkeypatch.chdir(start)
    RunFolder.config_for_resume(str(tmp_path / "run"), ["data.root=faces"])


def test_a_run_saved_with_a_relative_data_root_still_resumes_from_the_project(
    run_dir, tmp_path, monkeypatch
):
    # runs made before the paths were saved absolute: the project root, as before
    settings = run_dir / "config.yaml"
    settings.write_text(
        re.sub(r"root: .*", "root: datasets/lfw-demo/images", settings.read_text(), count=1)
    )
    monkeypatch.chdir(tmp_path)
    assert RunFolder(run_dir).config().data.root == "datasets/lfw-demo/images"
    cfg = RunFolder.config_for_resume(str(run_dir), [f"data.root={DEMO}"])
    assert cfg.data.resolved_root() == DEMO


def test_a_stage_whose_last_checkpoint_is_gone_says_it_starts_over(tmp_path):
    # last.ckpt deleted, another checkpoint left (a copy, or a best-* file of a run saved
    # before 2026-12-07): the resume trained stage 1 again from epoch 0 without a word
    # (a walkthrough)
    from facecluster.pipeline import train

    train(load_config(SMOKE, smoke_overrides(tmp_path, "stage=1", "logger=none")))
    run = RunFolder(tmp_path / "run")
    run.last_checkpoint(1).rename(run.checkpoint_dir(1) / "best-epoch000.ckpt")
    run.stage_summary_path(1).unlink()  # stage 1 unfinished, as stopped mid-way
    resumed = run.config_for_resume(str(run.path), ["stage=1", "logger=none"])
    with pytest.warns(UserWarning) as warned:
        train(resumed)
    said = [str(w.message) for w in warned if "starts over" in str(w.message)]
    assert said == [
        f"stage 1: {run.last_checkpoint(1)} is missing, so it starts over at epoch 0, though "
        "best-epoch000.ckpt is there: to continue from one, stop now and copy it to last.ckpt"
    ]


def test_stage1_is_not_trained_again_under_its_clusters(tmp_path):
    # stopped in stage 1's test (clusters.pt saved, no stage1.json), then last.ckpt lost:
    # the resume trained stage 1 again from epoch 0 and kept the clusters of the backbone
    # it replaced, for the sub-nets to start from the new one (a review)
    from facecluster.pipeline import train

    train(load_config(SMOKE, smoke_overrides(tmp_path, "stage=1", "logger=none")))
    run = RunFolder(tmp_path / "run")
    train(run.config_for_resume(str(run.path), ["stage=cluster", "logger=none"]))
    run.stage_summary_path(1).unlink()
    run.last_checkpoint(1).unlink()
    clusters = run.clusters_path.read_bytes()
    for stage in ("all", "1"):
        with pytest.raises(ConfigError, match=r"last.ckpt is missing, but stage 1 of .* has been"):
            train(run.config_for_resume(str(run.path), [f"stage={stage}", "logger=none"]))
    assert run.clusters_path.read_bytes() == clusters
    assert not run.last_checkpoint(1).exists() and not (run.path / "stage2").exists()


def test_no_new_clustering_under_trained_subnets(run_dir):
    # a clusters.pt deleted under finished sub-nets was made again by k-means, and the
    # sub-nets assembled over groups they need not have trained on
    run = RunFolder(run_dir)
    run.save_stage_summary(1, {"global_step": 1})
    run.subnet_file(1).parent.mkdir(parents=True)
    run.subnet_file(1).write_bytes(b"weights")
    run.subnet_file(1, ".json").write_text('{"cluster": 1}')
    job = run.last_checkpoint(2, "subnets-2")  # a job under way counts too
    job.parent.mkdir(parents=True)
    job.write_bytes(b"")
    (job.parents[1] / "subnets.json").write_text("[2]")
    before = sorted(p for p in run_dir.rglob("*"))
    # named sub-nets count too: stage=cluster (or a stop before stage 2, or a SLURM
    # clustering job) left their files to be assembled over the new clusters
    every = "stage2.subnets=[0,1,2]"
    for given in ([], ["stage=cluster"], [every], ["stage=cluster", every]):
        with pytest.raises(
            ConfigError,
            match=r"clusters.pt is missing, but sub-nets \[1, 2\] of .* were trained on its "
            rf"clusters: .* or delete {run_dir / 'stage2'} .*`python train.py resume=\S+`$",
        ):
            train(RunFolder.config_for_resume(str(run_dir), given))
    assert sorted(p for p in run_dir.rglob("*")) == before, "nothing changed"
    shutil.rmtree(run_dir / "stage2")  # the advice: the resume clusters and trains them all
    _check_prerequisites(RunFolder.config_for_resume(str(run_dir), []), run)
