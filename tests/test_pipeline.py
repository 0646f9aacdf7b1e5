"""The real two-stage pipeline, small: run folder, clustering, stage 2, results, errors."""

from __future__ import annotations

import csv
import json
import logging
import os
import re
import shlex
import shutil
import warnings

import lightning as L
import pytest
import torch
import torch.nn.functional as F
from omegaconf import OmegaConf

from facecluster.builders import check_trainer
from facecluster.clustering import ClusterAssignment, cluster_identities
from facecluster.config import ConfigError, load_config
from facecluster.evaluation import evaluate_run
from facecluster.pipeline import train
from facecluster.results import machine, source_digest
from facecluster.run import RunFolder
from tests.conftest import DEMO, SMOKE, smoke_overrides

pytestmark = pytest.mark.slow


@pytest.fixture(scope="module")
def finished_run(tmp_path_factory):
    """One smoke run shared by the tests that only read what it wrote."""
    tmp_path = tmp_path_factory.mktemp("run")
    # Two epochs per stage: last.ckpt must follow the final epoch even when it does
    # not improve val/acc. A quarter of the identities in two clusters (clustering.overlap),
    # which evaluation (the ISM test below) also reads.
    overrides = ("logger=csv", "trainer.max_epochs=2", "clustering.overlap=0.25")
    cfg = load_config(SMOKE, smoke_overrides(tmp_path, *overrides))
    return train(cfg)


def test_a_run_folder_of_a_later_format_is_refused_naming_the_release_that_made_it(
    finished_run, tmp_path, capsys
):
    # a run folder that a later facecluster made, read by this one: its new setting was
    # "unknown config key ... did you mean" (a typo, by the hint) and a new record "the
    # run folder is damaged"; and a run split by another split version was said to
    # have been pointed at other data
    from facecluster import __version__, cli
    from facecluster.config import RUN_FORMAT
    from facecluster.data.folder import SPLIT_VERSION

    made = json.loads((finished_run.run_dir / "run.json").read_text())
    assert (made["format"], made["facecluster"]) == (RUN_FORMAT, __version__) == (1, __version__)
    split = json.loads((finished_run.run_dir / "split.json").read_text())
    assert split["split_version"] == SPLIT_VERSION
    run = shutil.copytree(finished_run.run_dir, tmp_path / "run")
    (run / "run.json").write_text(json.dumps({**made, "format": 2, "facecluster": "9.1"}))
    with (run / "config.yaml").open("a") as f:
        f.write("later_setting: 1\n")  # what a later release may write
    said = (
        rf"{run}: a run folder of format 2, made by facecluster 9.1; this facecluster "
        rf"\({re.escape(__version__)}\) reads formats up to 1: read it with facecluster 9.1 "
        "or later"
    )
    for command in (cli.evaluate_main, cli.train_main):
        assert command([f"{'run' if command is cli.evaluate_main else 'resume'}={run}"]) == 2
        assert re.search(said, capsys.readouterr().err)
    assert cli.export_main([str(run), str(tmp_path / "out")]) == 2
    assert re.search(said, capsys.readouterr().err) and not (tmp_path / "out").exists()
    with pytest.raises(ConfigError, match=said):
        RunFolder(run).finished_config()
    with pytest.raises(ConfigError, match=said):  # train(cfg) of a resume, from Python
        RunFolder.for_training(load_config(SMOKE, [f"resume={run}"]))
    # this format, split by another split version: said so, not the data's fault, also
    # where its identities differ too (the open set's are held out by the same rules)
    shutil.rmtree(run)
    run = shutil.copytree(finished_run.run_dir, tmp_path / "run")
    (run / "split.json").write_text(json.dumps({**split, "split_version": 2}))
    names = json.loads((run / "class_names.json").read_text())
    (run / "class_names.json").write_text(json.dumps([*names[1:], names[0]]))
    said = r"split.json: the run's images were split by facecluster's split version 2; "
    with pytest.raises(ConfigError, match=said + "this facecluster splits by version 1"):
        evaluate_run(run)


def test_a_finished_run_refuses_overrides_it_would_not_act_on(finished_run, tmp_path):
    # resume=<finished run> stage2.max_epochs=3 clustering.niter=50 trained nothing, but
    # the run's config.yaml then said its sub-nets had 3 epochs and its clusters 50
    # k-means iterations: the next reader of the run was misled
    run = shutil.copytree(finished_run.run_dir, tmp_path / "run")
    saved = (run / "config.yaml").read_bytes()
    refused = {
        "stage2.max_epochs=9": "9 stage-2 epochs \\(the sub-nets trained 2\\)",
        "clustering.niter=50": "clustering.niter=50 \\(the run's clusters were made with",
        "stage2.epoch_size=mean": "stage2.epoch_size='mean'",
        # what shaped the weights (a first-user review: the batch size, the logger and
        # the rest were written to config.yaml of weights trained otherwise)
        "data.batch_size=4": "data.batch_size=4 \\(the run trained with 8\\)",
        # trainer settings that shaped the training (an audit: recorded, never acted on)
        "trainer.limit_train_batches=0.5": "limit_train_batches=0.5 \\(the run trained with it",
        "trainer.max_steps=10": "trainer.max_steps=10 \\(the run trained with it unset",
        "trainer.gradient_clip_algorithm=value": "algorithm='value' \\(the run trained with 'norm'",
    }
    for override, named in refused.items():
        with pytest.raises(ConfigError, match=f"has done this already .*{named}"):
            RunFolder.config_for_resume(str(run), [override])
    # a head no module registered (a typo): named, not a KeyError from its margin
    with pytest.raises(ConfigError, match=r"head.name: the run has 'arcface', the command li") as e:
        RunFolder.config_for_resume(str(run), ["head.name=arcfce"])
    assert "head.m" not in str(e.value)  # its margin is unknown here, not a change
    # a further argument of the head's class, named in full
    with pytest.raises(ConfigError, match=r"head.kwargs.c: the run has it unset, the comman"):
        RunFolder.config_for_resume(str(run), ["head.kwargs.c=0.1"])
    assert (run / "config.yaml").read_bytes() == saved
    # what writes out a setting's own value is no change (ArcFace's margin, in the
    # head a run keeps fixed)
    RunFolder.config_for_resume(str(run), ["head.m=0.5", "trainer.max_steps=-1"])
    # sub-nets named to train again take new stage-2 settings; each sub-net's record
    # keeps the settings it trained with, config.yaml the last command's (an audit)
    again = ["stage2.subnets=[1]", "stage2.max_epochs=9", "stage2.optim.lr=0.3"]
    assert RunFolder.config_for_resume(str(run), again).stage_epochs(2) == 9
    settings = RunFolder(run).subnet_records()[1]["settings"]
    assert settings["stage2.epochs"] == 2 and settings["data.batch_size"] == 8
    assert settings["stage2.optim"]["lr"] == RunFolder(run).config().stage2.optim.lr
    assert settings["head"]["m"] == 0.5 and settings["trainer.max_steps"] is None
    # some sub-nets finished (a stage-2 job done, another stopped): the others train with
    # the run's settings, not a resume's (they trained otherwise, exit 0: a review)
    (run / "stage2" / "subnets" / "subnet0.json").unlink()
    for override in ("stage2.max_epochs=9", "data.batch_size=4", "stage2.epoch_size=mean"):
        with pytest.raises(
            ConfigError, match=r"has finished sub-nets \[1, 2\] with the run.s.*subnets=\[0\]"
        ):
            RunFolder.config_for_resume(str(run), [override])
    # what it says to do instead is taken: the unfinished ones, named
    RunFolder.config_for_resume(str(run), ["stage2.subnets=[0]", "stage2.max_epochs=9"])
    for k in (1, 2):  # none finished: stage 2 has not trained with them yet
        (run / "stage2" / "subnets" / f"subnet{k}.json").unlink()
    assert RunFolder.config_for_resume(str(run), ["stage2.max_epochs=9"]).stage_epochs(2) == 9


def test_more_ivf_lists_than_identities_are_refused_before_training_and_evaluation(
    finished_run, tmp_path, capsys
):
    # faiss refused them in the evaluation that ends train.py, after both stages had
    # trained, with its own traceback (a review of late errors); export the same
    from facecluster import cli
    from facecluster.deploy import export_run
    from facecluster.evaluation import evaluate_run

    ivf = ["route.index=ivf", "route.ivf_nlist=1000"]
    args = ["-c", str(SMOKE), *smoke_overrides(tmp_path, "logger=none", *ivf)]
    assert cli.train_main(args) == 2
    assert "route.ivf_nlist=1000 lists for route.index=ivf, but the run has " in (
        capsys.readouterr().err
    )
    assert not (tmp_path / "run").exists()  # refused after the scan, before the folder
    identities = len(RunFolder(finished_run.run_dir).class_names())
    with pytest.raises(ConfigError, match=f"route.ivf_nlist <= {identities}"):
        evaluate_run(finished_run.run_dir, ivf)
    run = shutil.copytree(finished_run.run_dir, tmp_path / "copied")  # its config says so
    saved = OmegaConf.load(run / "config.yaml")
    saved.route.index, saved.route.ivf_nlist = "ivf", 1000
    OmegaConf.save(saved, run / "config.yaml")
    with pytest.raises(ConfigError, match="route.ivf_nlist=1000"):
        export_run(run, tmp_path / "export")
    assert not (tmp_path / "export").exists()
    evaluate_run(finished_run.run_dir, ["route.index=ivf", f"route.ivf_nlist={identities}"])


def test_an_evaluation_refuses_a_precision_it_would_not_run(finished_run):
    # trainer.precision=bogus or bf16-true ran fp32, and results.json named the value
    from facecluster.evaluation import evaluate_run

    for value in ("bogus", "bf16-true", "16-true"):
        with pytest.raises(ConfigError, match=f"trainer.precision={value}: an evaluation runs"):
            evaluate_run(finished_run.run_dir, [f"trainer.precision={value}"])
    report = evaluate_run(finished_run.run_dir, ["trainer.precision=32", "eval.plots=false"])
    assert report.rows


def test_an_evaluation_under_the_linear_decision_unit_sweeps_alpha(finished_run, tmp_path):
    # route.decision=linear at evaluation (the moe default's alternative): its rows say
    # alpha, its sweep runs from the sub-net cosine alone (alpha 0, the routed row at the
    # default alpha) to the class-mean similarity alone, which at top_m=1 is the nearest
    # class mean over every identity (routing picks the cluster of the nearest mean)
    from facecluster.evaluation import evaluate_run

    run = shutil.copytree(finished_run.run_dir, tmp_path / "run")
    report = evaluate_run(run, ["route.decision=linear", "eval.timing_batches=1"])
    rows = {row.model: row.top1 for row in report.rows}
    sweep = {point["alpha"]: point["top1"] for point in report.alpha_sweep}
    assert list(sweep) == [0.0, 0.25, 0.5, 0.75, 1.0]
    assert sweep[0.0] == rows["clustered, routed (top_m=1, alpha=0)"]
    assert sweep[1.0] == rows["nearest class mean (stage-1 backbone)"]
    assert json.loads((run / "eval" / "results.json").read_text())["decision"]["decision"] == (
        "linear"
    )
    assert (run / "eval" / "alpha.png").stat().st_size > 0


def test_print_config_of_a_resume_shows_the_run_with_its_overrides_and_writes_nothing(
    finished_run, tmp_path, capsys
):
    # docs/CONFIG.md: with resume=<run> and overrides, --print-config prints the
    # resumed run's config; the run folder is not touched (its config.yaml is rewritten
    # by a resume that trains, not by one that prints)
    from facecluster import cli

    run = finished_run.run_dir
    files = {p: (p.read_bytes(), p.stat().st_mtime_ns) for p in run.rglob("*") if p.is_file()}
    capsys.readouterr()
    assert cli.train_main([f"resume={run}", "eval.batch_size=8", "--print-config"]) == 0
    printed = tmp_path / "printed.yaml"
    printed.write_text(capsys.readouterr().out)
    shown = load_config(printed)
    saved = load_config(run / "config.yaml")
    assert shown.eval.batch_size == 8 != saved.eval.batch_size
    assert (shown.resume, shown.run_name, shown.data, shown.model) == (
        str(run),
        run.name,
        saved.data,
        saved.model,
    )
    after = {p: (p.read_bytes(), p.stat().st_mtime_ns) for p in run.rglob("*") if p.is_file()}
    assert after == files


def test_resuming_a_finished_run_says_it_trains_nothing_and_evaluates(
    finished_run, tmp_path, caplog
):
    # it evaluated the run again without a word, as if it had trained on
    run = shutil.copytree(finished_run.run_dir, tmp_path / "run")
    weights = {p: p.read_bytes() for p in (run / "stage2" / "subnets").glob("*.pt")}
    with caplog.at_level(logging.INFO):
        result = train(RunFolder.config_for_resume(str(run)))
    assert f"{run} is finished: nothing to train" in caplog.text
    assert "resumed:" not in caplog.text  # nothing goes on
    assert f"python evaluate.py run={run}" in caplog.text
    assert result.results is not None and result.backbone is result.subnets is None
    assert {p: p.read_bytes() for p in weights} == weights


def test_run_folder_holds_config_checkpoints_clusters_and_results(finished_run):
    run = finished_run.run_dir
    assert (run / "stage1" / "checkpoints" / "last.ckpt").is_file()
    # stage 2 in one job (stage2.jobs=1): its checkpoints, then each sub-net's files
    assert (run / "stage2" / "jobs" / "subnets-0-2" / "checkpoints" / "last.ckpt").is_file()
    for k in range(3):
        assert (run / "stage2" / "subnets" / f"subnet{k}.pt").is_file()
        record = json.loads((run / "stage2" / "subnets" / f"subnet{k}.json").read_text())
        assert record["cluster"] == k
    assert load_config(run / "config.yaml").data.max_classes == 12
    results = json.loads((run / "results.json").read_text())
    assert results["identities"] == 12 and len(results["subnets"]) == 3
    # what made the numbers, each stage's (the same seed trains other weights on other
    # kernels): stage 1 and the sub-nets trained in this process
    [made] = results["trained_by"]
    assert made == {"code": source_digest(), "machine": machine()}
    assert made["machine"]["cpu_capability"] == torch.backends.cpu.get_cpu_capability()
    # the thread count too: CPU reductions over another count train other weights
    assert made["machine"]["threads"] == torch.get_num_threads()
    assert made["machine"]["packages"]["torch"] == torch.__version__
    assert json.loads((run / "stage1.json").read_text())["machine"] == machine()
    assert record["machine"] == machine() and record["code"] == source_digest()
    assert "sub-net 2, on its own cluster" in (run / "results.md").read_text()


def test_last_ckpt_holds_the_final_epoch_of_each_stage(finished_run, tmp_path):
    run = RunFolder(finished_run.run_dir)
    for last in (run.last_checkpoint(1), run.last_checkpoint(2, "subnets-0-2")):
        assert torch.load(last, map_location="cpu", weights_only=False)["epoch"] == 1
    final = {k: v for k, v in finished_run.subnets.state_dict().items()}
    saved = torch.load(
        run.last_checkpoint(2, "subnets-0-2"), map_location="cpu", weights_only=False
    )["state_dict"]
    for key, value in final.items():
        assert torch.equal(saved[key], value), key
    # what evaluation and export read: the sub-nets' final files, the same weights
    for k, weights in enumerate(run.subnet_weights()):
        assert torch.equal(weights.head, final[f"heads.{k}.weight"])
        for name, value in weights.backbone.items():
            assert torch.equal(value, final[f"subnets.{k}.{name}"]), name
    # what evaluation and export run on: the identifier built from the run, each sub-net
    # k with sub-net k's own network and head rows (a sub-net wired to another's
    # weights still answered, only worse), the router with stage 1's backbone
    from facecluster.builders import build_datamodule
    from facecluster.data.transforms import normalize_images
    from facecluster.inference import TwoStageIdentifier

    ident = TwoStageIdentifier.from_run(run).eval()
    trained, stage1 = finished_run.subnets.eval(), finished_run.backbone.eval()
    images, _ = next(iter(build_datamodule(run.finished_config()).test_dataloader()))
    x = normalize_images(images)
    assert ident.shared_layers == 0 and ident.num_clusters == 3
    with torch.no_grad():
        assert torch.allclose(ident.router_backbone(x), stage1(x), rtol=0, atol=1e-6)
        for k in range(3):
            mine = trained.subnets[str(k)](x)
            assert torch.allclose(ident.subnets[k](x), mine, rtol=0, atol=1e-6), k
            rows = F.normalize(trained.heads[str(k)].weight.detach().float(), dim=1)
            assert ident.head_rows(k).shape == rows.shape, k
            assert torch.allclose(ident.head_rows(k), rows, rtol=0, atol=1e-6), k


def test_every_checkpoint_carries_the_resolved_config(finished_run):
    run = finished_run.run_dir
    ckpts = [*run.glob("stage1/checkpoints/*.ckpt"), *run.glob("stage2/jobs/*/checkpoints/*")]
    assert [c.name for c in ckpts] == ["last.ckpt", "last.ckpt"], ckpts  # each stage's
    for ckpt in ckpts:
        meta = torch.load(ckpt, map_location="cpu", weights_only=False)["facecluster"]
        assert meta["stage"] in (1, 2)
        assert meta["config"]["data"]["max_classes"] == 12


def test_assignment_with_overlap_reaches_stage_two(finished_run):
    assignment = ClusterAssignment.load(finished_run.run_dir / "clusters.pt")
    assert assignment.num_classes == 12 and assignment.num_clusters == 3
    assert len(assignment.overlap) == 3  # round(0.25 x 12) identities in a second cluster
    assert int(assignment.cluster_sizes().sum()) == 12 + 3
    assert sorted(assignment.cluster_sizes().tolist()) == sorted(
        s["identities"] for s in finished_run.results["subnets"]
    )
    subnets = finished_run.subnets
    assert torch.equal(subnets.class_to_cluster, assignment.class_to_cluster)
    for k in range(3):
        assert subnets.heads[str(k)].weight.shape[0] == int(assignment.cluster_sizes()[k])


def test_subnets_start_from_the_stage1_backbone_and_train_apart(finished_run):
    # Warm start then independent training: every sub-net moved away from the
    # stage-1 backbone, and no two sub-nets are equal.
    stage1 = finished_run.backbone.backbone.state_dict()
    nets = [s.state_dict() for s in finished_run.subnets.subnets.values()]
    key = next(k for k, v in stage1.items() if v.is_floating_point() and v.ndim > 1)
    assert all(not torch.equal(net[key], stage1[key]) for net in nets)
    assert not torch.equal(nets[0][key], nets[1][key])
    assert all(net[key].shape == stage1[key].shape for net in nets)


def test_step_axis_continues_across_the_two_stages(finished_run):
    rows = list(csv.DictReader(open(finished_run.run_dir / "csv" / "metrics.csv")))
    stage1_steps = finished_run.results["stage1"]["steps"]
    stage2 = [int(r["step"]) for r in rows if r.get("train/loss_subnet0")]
    stage1 = [
        int(r["step"]) for r in rows if r.get("train/loss") and not r.get("train/loss_subnet0")
    ]
    assert stage1 and stage2
    assert min(stage2) >= stage1_steps > max(stage1) - 1
    # the assembled results, logged last at the run's last step (they never reached
    # the file: no Trainer followed to save it)
    results = [r for r in rows if r.get("results/stage1_acc")]
    last = stage1_steps + finished_run.results["stage2_steps"]
    assert len(results) == 1 and int(results[0]["step"]) == last > max(stage2)
    assert float(results[0]["results/stage1_acc"]) == finished_run.results["stage1"]["accuracy"]


def test_held_out_accuracy_is_reported_for_stage1_and_every_subnet(finished_run):
    # each figure is what the trained weights score on the test split: the stage-1
    # model on every face, each sub-net on its own cluster's faces, in its local ids
    from facecluster.builders import build_datamodule
    from facecluster.data.transforms import normalize_images

    r = finished_run.results
    stage1, net = finished_run.backbone.eval(), finished_run.subnets.eval()
    hits, correct, total, seen = 0, [0] * 3, [0] * 3, []
    dm = build_datamodule(RunFolder(finished_run.run_dir).finished_config())
    with torch.no_grad():
        for images, labels in dm.test_dataloader():
            x, home = normalize_images(images), net.class_to_cluster[labels]
            seen.append(labels)
            hits += int((stage1.head.predict(stage1(x)) == labels).sum())
            for k in range(3):
                mine = home == k
                predicted = net.heads[str(k)].predict(net.subnets[str(k)](x[mine]))
                correct[k] += int((predicted == net.local_index[labels[mine]]).sum())
                total[k] += int(mine.sum())
    assert r["test_images"] == sum(total)
    assert r["stage1"]["accuracy"] == pytest.approx(hits / sum(total), abs=1e-6)
    for s in r["subnets"]:
        k = s["cluster"]
        assert s["test_images"] == total[k]
        assert s["accuracy"] == pytest.approx(correct[k] / total[k], abs=1e-6), k
    # the sub-nets together: every test face scored once, by its own cluster's sub-net
    # (weighted by images, not a mean of the sub-nets' accuracies)
    assert r["subnets_oracle_accuracy"] == pytest.approx(sum(correct) / sum(total), abs=1e-6)
    # the most-frequent-identity bar: the identity with the most training images (of
    # all, and of each cluster's own), scored on the test faces; it was chosen by the
    # test labels it was scored on
    labels, trained = torch.cat(seen), dm.split_labels("train")
    home, trained_home = net.class_to_cluster[labels], net.class_to_cluster[trained]
    assert r["stage1"]["majority"] == pytest.approx(
        float((labels == torch.bincount(trained).argmax()).float().mean()), abs=1e-7
    )
    for s in r["subnets"]:
        k = s["cluster"]
        most = torch.bincount(trained[trained_home == k]).argmax()
        mine = labels[home == k]
        assert s["majority"] == pytest.approx(float((mine == most).float().mean()), abs=1e-7), k
    # a set where the identity with the most test faces is not the one with the most
    # training faces
    from facecluster.results import _majority

    assert _majority(torch.tensor([0, 0, 1, 1, 1]), torch.tensor([0, 0, 0, 1])) == 0.4
    assert "stage-1 single model" in finished_run.table


def test_an_existing_run_folder_is_not_overwritten(finished_run):
    # refused, and nothing under the output folder is written, added or removed: every
    # file byte for byte, every folder, hidden ones too
    out = finished_run.run_dir.parent
    before = {p: p.read_bytes() if p.is_file() else None for p in out.rglob("*")}
    assert (finished_run.run_dir / "config.yaml") in before
    cfg = load_config(SMOKE, smoke_overrides(out))
    with pytest.raises(ConfigError, match="already exists; pass resume="):
        train(cfg)
    after = {p: p.read_bytes() if p.is_file() else None for p in out.rglob("*")}
    assert after.keys() == before.keys()
    assert [p for p in before if after[p] != before[p]] == []


@pytest.mark.parametrize(
    ("overrides", "message"),
    [
        (["data.root=/no/such/faces"], "/no/such/faces"),
        (["model.backbone=iresnet19"], "iresnet18"),
        (["data.max_classes=4", "clustering.num_clusters=5"], "clustering.num_clusters=5"),
        # Found only when the folder is scanned: the data layer's own words, named by section.
        (["data.min_images_per_class=1000"], r"^data: No identity .* min_images_per_class=1000"),
        # Values only Lightning's Trainer knows to refuse: they stopped the run with a
        # traceback after its folder and logger were made.
        (["trainer.devices=abc"], r"^trainer: .*trainer\.devices=abc.*should be an int > 0"),
        (["trainer.strategy=foo"], r"^trainer: .*invalid strategy name: `strategy='foo'`"),
        # Lightning ends a fit at max_time as if it were done: the stage was recorded
        # finished with 8 of 20 epochs, and no resume could train the rest (review)
        (["trainer.max_time=00:00:00:08"], r"trainer.max_time=00:00:00:08 is not supported"),
        # the check builds the Trainer as the stage builds it: with its checkpoints
        (
            ["trainer.barebones=true", "trainer.enable_model_summary=false"],
            r"^trainer: .*barebones=True, enable_checkpointing=True",
        ),
    ],
)
def test_bad_input_stops_before_training_and_names_the_culprit(tmp_path, overrides, message):
    with pytest.raises(ConfigError, match=message):
        train(load_config(SMOKE, smoke_overrides(tmp_path, *overrides)))
    assert not (tmp_path / "run").exists()


@pytest.mark.parametrize(
    ("override", "said"),
    [
        ("trainer.val_check_interval=20", "it validates at each epoch's end"),
        ("trainer.limit_train_batches=0.06", "it trains one batch per epoch"),
        # both: the interval against the limited epoch, as Lightning counts it
        ("trainer.limit_train_batches=0.5 trainer.val_check_interval=10", "epoch's end"),
        # stage 1's epoch too, here a limit in batches (Lightning refused 15 batches
        # between validations of a 12-batch epoch: a traceback after the data scan)
        (
            "trainer.limit_train_batches=12 trainer.val_check_interval=15",
            "longer than stage 1's epoch of 12 batches: it validates at each epoch's end",
        ),
        # under one batch of the val or test split: Lightning refused the test fraction
        # after the stage had trained (a review)
        ("trainer.limit_val_batches=0.01 trainer.limit_test_batches=0.01", "runs one batch"),
    ],
)
def test_per_batch_trainer_settings_fit_each_stages_epochs(tmp_path, override, said, caplog):
    # a sub-net epoch is about 1/K of a stage-1 epoch (11 batches here against 27):
    # Lightning refused 20 batches between validations, and 0.06 of 11 batches, after
    # stage 1 and the clustering had trained (review); stage 2 now fits them to its epoch
    import logging

    overrides = override.split()
    cfg = load_config(SMOKE, smoke_overrides(tmp_path, *overrides, "eval.after_training=false"))
    with caplog.at_level(logging.INFO):
        result = train(cfg)
    assert RunFolder(result.run_dir).finished
    assert f"{overrides[-1]} " in caplog.text and said in caplog.text


@pytest.mark.parametrize("shown", ["true", "false"])
def test_the_trainer_check_takes_every_setting_the_trainer_takes(tmp_path, shown):
    # the check's own quiet progress bar is the user's to set (it was passed twice)
    check_trainer(
        load_config(SMOKE, smoke_overrides(tmp_path, f"trainer.enable_progress_bar={shown}"))
    )


def test_torchrun_processes_that_the_trainer_does_not_count_are_refused(tmp_path, monkeypatch):
    # torchrun --nproc_per_node=2 with the configs' trainer.devices=1: Lightning checks
    # the count only under ddp, so each process trained alone into one run folder
    torchrun = {
        "TORCHELASTIC_RUN_ID": "none", "WORLD_SIZE": "2", "RANK": "0", "LOCAL_RANK": "0",
        "GROUP_RANK": "0", "LOCAL_WORLD_SIZE": "2", "MASTER_ADDR": "127.0.0.1",
        "MASTER_PORT": "29500",
    }  # fmt: skip
    for key, value in torchrun.items():
        monkeypatch.setenv(key, value)
    alone = load_config(SMOKE, smoke_overrides(tmp_path))
    with pytest.raises(ConfigError, match="2 processes were started by torchrun or srun, but "
                       r"trainer.devices=1 x trainer.num_nodes=1 \(trainer.strategy=auto\) "
                       "makes 1"):  # fmt: skip
        check_trainer(alone)
    ddp = ("trainer.accelerator=cpu", "trainer.devices=2", "trainer.strategy=ddp")
    check_trainer(load_config(SMOKE, smoke_overrides(tmp_path, *ddp)))


def test_sync_batchnorm_under_ddp_on_the_cpu_is_refused_before_the_data_scan(tmp_path):
    # torch's DDP raised "SyncBatchNorm layers only work with GPU modules" when it wrapped
    # the model, after the data scan and the run folder
    synced = ("trainer.accelerator=cpu", "trainer.strategy=ddp", "trainer.sync_batchnorm=true")
    for devices in ("trainer.devices=2", "trainer.devices=1"):  # ddp's group syncs at 1 too
        cfg = load_config(SMOKE, smoke_overrides(tmp_path, *synced, devices))
        with pytest.raises(ConfigError, match="trainer.sync_batchnorm=true with trainer.strategy="
                           "ddp on the CPU: torch's SyncBatchNorm needs a GPU"):  # fmt: skip
            check_trainer(cfg)
    # one process without a group normalises over its batch, as without the setting
    check_trainer(load_config(SMOKE, smoke_overrides(tmp_path, "trainer.sync_batchnorm=true")))


def test_several_nodes_without_a_launcher_are_refused_instead_of_waiting(tmp_path, monkeypatch):
    # trainer.num_nodes=2 run by hand: Lightning started this node's processes, which
    # waited for the other node's at 127.0.0.1 without end, after the run folder was made
    monkeypatch.delenv("MASTER_ADDR", raising=False)
    nodes = ("trainer.accelerator=cpu", "trainer.strategy=ddp", "trainer.num_nodes=2")
    cfg = load_config(SMOKE, smoke_overrides(tmp_path, *nodes))
    alone = r"trainer.num_nodes=2, but no launcher started this run on several nodes: run it"
    with pytest.raises(ConfigError, match=alone + r" with srun \(SLURM\) or torchrun"):
        check_trainer(cfg)  # train() calls it first: a regression here waits, not fails
    # Lightning's own launch across nodes: the same command on each, told the master
    monkeypatch.setenv("MASTER_ADDR", "10.0.0.1")
    check_trainer(cfg)


def test_a_resume_never_takes_up_fewer_epochs_than_trained_nor_loses_the_clustering_figures(
    tmp_path,
):
    # A resume asking fewer epochs than an unfinished stage 1 had trained was saved, then
    # refused by Lightning with a traceback, at it and at every later resume; and a stop
    # after clusters.pt was saved, before the clustering's figures were logged (a SIGTERM
    # or a kill in k-means' wake), left them out of the run's logs for good
    train(load_config(SMOKE, smoke_overrides(tmp_path, "stage=1", "logger=none",
                                             "stage1.max_epochs=2")))  # fmt: skip
    run = RunFolder(tmp_path / "run")
    summary = run.path / "stage1.json"
    tested = summary.rename(tmp_path / "stage1.json")  # as stopped before stage 1's end
    saved = (run.path / "config.yaml").read_bytes()
    fewer = r"has trained 2 epochs \(stage1/checkpoints/last.ckpt\); 1 \(stage1.max_epochs\)"
    with pytest.raises(ConfigError, match=r"stage 1 of .* " + fewer + " would end it"):
        RunFolder.config_for_resume(str(run.path), ["stage1.max_epochs=1"])
    assert (run.path / "config.yaml").read_bytes() == saved
    tested.rename(summary)
    train(RunFolder.config_for_resume(str(run.path), ["stage=cluster"]))
    summary.unlink()  # clusters.pt saved, then stopped: its figures were not logged
    train(RunFolder.config_for_resume(str(run.path), ["logger=csv"]))
    with open(run.path / "csv" / "metrics.csv") as f:
        assert any(row.get("clustering/within") for row in csv.DictReader(f))


def test_clustering_by_the_stage1_head_rows(tmp_path, monkeypatch):
    # clustering.features=head: the saved assignment is k-means on the trained head's
    # rows (not on the class means, which it keeps for routing)
    head = ("clustering.features=head", "logger=csv")
    train(load_config(SMOKE, smoke_overrides(tmp_path, "stage=1", *head)))
    run = tmp_path / "run"
    tested = (run / "stage1.json").read_text()
    cfg = load_config(SMOKE, smoke_overrides(tmp_path, f"resume={run}", "stage=cluster", *head))
    # stage=cluster does not test the finished stage 1 again (a pass over the test split)
    monkeypatch.setattr(L.Trainer, "test", lambda *a, **k: pytest.fail("stage 1 tested again"))
    result = train(cfg)
    assert (run / "stage1.json").read_text() == tested
    with open(run / "csv" / "metrics.csv") as f:  # the clustering's figures are logged
        assert any(row.get("clustering/within") for row in csv.DictReader(f))
    saved = ClusterAssignment.load(result.run_dir / "clusters.pt")
    rows = result.backbone.head.weight.detach()
    by_head = cluster_identities(saved.class_means, 3, "kmeans", seed=cfg.seed, features=rows)
    by_means = cluster_identities(saved.class_means, 3, "kmeans", seed=cfg.seed)
    assert torch.equal(saved.class_to_cluster, by_head.class_to_cluster)
    assert not torch.equal(by_head.class_to_cluster, by_means.class_to_cluster)


def test_the_ism_baseline_trains_a_random_partition_and_every_subnet_answers(
    finished_run, tmp_path, capsys
):
    # configs/method/random.yaml (the paper's ISM baseline) through the same pipeline:
    # a seeded near-equal random partition, then evaluation runs all K sub-nets; then
    # README's `evaluate.py run=runs/<a> run=runs/<b>`: both runs in one table
    from facecluster import cli

    method = SMOKE.parent / "method" / "random.yaml"
    cfg = load_config([SMOKE, method], smoke_overrides(tmp_path, "run_name=ism"))
    assert cfg.method == cfg.clustering.method == "random"
    run = train(cfg).run_dir
    saved = ClusterAssignment.load(run / "clusters.pt")
    drawn = cluster_identities(saved.class_means, 3, "random", seed=cfg.seed)
    assert saved.method == "random"
    assert torch.equal(saved.class_to_cluster, drawn.class_to_cluster)
    sizes = torch.bincount(saved.class_to_cluster, minlength=3)
    assert int(sizes.max() - sizes.min()) <= 1
    capsys.readouterr()
    runs = [f"run={finished_run.run_dir}", f"run={run}"]
    assert cli.evaluate_main([*runs, "eval.timing_batches=1", "eval.plots=false"]) == 0
    said = capsys.readouterr()
    table = said.out
    # the speed measurement says what it does (12 to 40 s without a word, before)
    timing = r"timing \d+ predictors: 1 pass\(es\) over a batch of 64 and 20 single"
    assert re.search(timing, said.err)
    for evaluated in (finished_run.run_dir, run):  # where each run's results are
        assert f"{evaluated}: tables" in said.err
        assert f" in {evaluated / 'eval'} (results.md, .csv, .json); identify faces" in said.err
    rows = {tuple(c.strip() for c in line.split("|")[1:3]) for line in table.splitlines()}
    assert ("run", "clustered, routed (top_m=1, moe)") in rows
    assert ("ism", "random partition, routed (top_m=1, moe)") in rows
    ism = next(line for line in table.splitlines() if "random partition, all sub-nets" in line)
    assert ism.startswith("| ism |") and "| 3 |" in ism  # every sub-net ran


def test_the_closing_line_offers_export_only_for_a_two_stage_run(tmp_path, capsys):
    # it offered `facecluster export` after a single-model run, which export refuses,
    # said "plots" where eval.plots=false wrote none, and quoted no path with a space
    from facecluster.cli import _say_where

    for method, two_stage in (("single", False), ("clustered", True)):
        run = tmp_path / f"my {method} run"
        (run / "eval").mkdir(parents=True)
        cfg = load_config(SMOKE, [f"method={method}"])
        (run / "config.yaml").write_text(cfg.run_settings().to_yaml())
        _say_where(run)
        said = capsys.readouterr().err
        assert said.startswith(f"{run}: tables in {run / 'eval'} (results.md, .csv, .json)")
        assert ("facecluster export" in said) == two_stage, said
    assert f"`facecluster export '{run}' 'exports/my clustered run'`" in said
    (run / "eval" / "top_m.png").write_bytes(b"png")
    _say_where(run)
    assert f"{run}: tables and plots in" in capsys.readouterr().err


def test_a_config_changed_after_its_load_is_checked_again_before_any_work(tmp_path):
    # cfg.method = "bogus" (a notebook's edit) trained both stages and saved a run that
    # evaluate, export and resume then refused (its config.yaml invalid)
    cfg = load_config(SMOKE, smoke_overrides(tmp_path))
    cfg.method = "bogus"
    with pytest.raises(ConfigError, match="method='bogus' is not one of"):
        train(cfg)
    assert not any(tmp_path.iterdir())  # no run folder


def test_the_single_models_training_table_speaks_of_no_sub_nets():
    from facecluster.results import training_table

    scores = {"accuracy": 0.5, "chance": 0.1, "majority": 0.2}
    single = {"method": "single", "identities": 10, "test_images": 20, "stage1": scores}
    assert "sub-net" not in training_table(single)
    subnet = {"cluster": 0, "identities": 5, "test_images": 10, **scores}
    clustered = {**single, "method": "clustered", "clustering": "kmeans", "num_clusters": 1}
    table = training_table({**clustered, "subnets": [subnet]})
    assert "| sub-net 0, on its own cluster |" in table
    assert "Each sub-net is scored on the test images of the identities its cluster" in table


def test_an_existing_run_folder_is_refused_before_the_data_scan(tmp_path, monkeypatch):
    # the same command again (a new run named as an existing one) scanned the data first,
    # minutes for a .rec without identity records, then said the folder exists
    import os

    from facecluster import pipeline
    from facecluster.run import RUN_DIR_ENV

    cfg = load_config(SMOKE, smoke_overrides(tmp_path, "stage=1"))
    folder = RunFolder.for_training(cfg)
    folder.create(new=True)  # sets FACECLUSTER_RUN_DIR for its DDP ranks: not ours
    os.environ.pop(RUN_DIR_ENV)
    folder.save_config(cfg)
    monkeypatch.setattr(pipeline, "build_datamodule", lambda cfg: pytest.fail("data scanned"))
    with pytest.raises(ConfigError, match="already exists; pass resume="):
        train(cfg)


@pytest.mark.parametrize("made", ["during the data scan", "after this one's create"])
def test_a_run_folder_another_command_made_meanwhile_is_not_taken_over(tmp_path, monkeypatch, made):
    # two commands started with one run_name (or in one second without one): the second,
    # past the check at start while the first made the folder, found stage 1 done, took
    # no lock, rewrote the first's config.yaml and printed its results as its own
    from facecluster import pipeline

    cfg = load_config(SMOKE, smoke_overrides(tmp_path, "stage1.optim.lr=0.05"))
    other = load_config(SMOKE, smoke_overrides(tmp_path))
    theirs = other.run_settings().to_yaml()
    run = tmp_path / "run"

    def the_other_command_writes():
        (run / "config.yaml").write_text(theirs)

    if made == "during the data scan":
        scan = pipeline.build_datamodule

        def slow_scan(cfg):
            run.mkdir()
            the_other_command_writes()
            return scan(cfg)

        monkeypatch.setattr(pipeline, "build_datamodule", slow_scan)
    else:  # between this command's create and its lock: only its stage-1 lock sees it
        keep = RunFolder.keep_data

        def kept(folder, dm):
            keep(folder, dm)
            the_other_command_writes()

        monkeypatch.setattr(RunFolder, "keep_data", kept)
    with pytest.raises(ConfigError, match="was made by another command while this one read"):
        train(cfg)
    assert (run / "config.yaml").read_text() == theirs
    assert not (run / "stage1" / "checkpoints").exists()


def test_a_folder_left_by_a_command_stopped_before_its_config_is_trained_in(tmp_path, monkeypatch):
    # its class_names.json was there before this command began: not another command's
    # claim (refused, with advice that did not work either: the folder has no config)
    from facecluster.builders import build_datamodule

    cfg = load_config(SMOKE, smoke_overrides(tmp_path, "stage=1"))
    stopped = RunFolder.for_training(cfg)
    stopped.create(new=True)
    monkeypatch.setenv("FACECLUSTER_RUN_DIR", "")  # create() sets it for its DDP ranks
    stopped.keep_data(build_datamodule(cfg))
    assert (stopped.path / "class_names.json").is_file()
    assert not (stopped.path / "config.yaml").exists()
    assert train(cfg).run_dir == stopped.path
    assert stopped.has_stage_summary(1)


def test_slurm_settings_of_a_local_run_are_said_to_change_nothing(tmp_path, monkeypatch):
    # slurm.partition=gpu without launcher=slurm trained on this machine (a login node)
    # without a word; a SLURM job's own command (launcher=local inside it) is not warned
    from facecluster import pipeline

    class Scanned(Exception):
        pass

    def scan(cfg):  # the warning comes before the data scan: stopped there
        raise Scanned

    monkeypatch.setattr(pipeline, "build_datamodule", scan)
    monkeypatch.delenv("SLURM_JOB_ID", raising=False)
    given = ("slurm.partition=gpu", "slurm.nodes=2")
    cfg = load_config(SMOKE, smoke_overrides(tmp_path, *given))
    with pytest.warns(UserWarning, match=r"slurm.partition=gpu, slurm.nodes=2 set, but launch"):
        with pytest.raises(Scanned):
            train(cfg)
    monkeypatch.setenv("SLURM_JOB_ID", "7")
    with warnings.catch_warnings():
        warnings.filterwarnings("error", "slurm.*set, but launcher=local")
        with pytest.raises(Scanned):
            train(load_config(SMOKE, smoke_overrides(tmp_path, *given, "run_name=job")))


def test_fewer_identities_than_clusters_is_refused(tmp_path):
    faces = tmp_path / "faces"
    for name in sorted(p.name for p in DEMO.iterdir())[:2]:
        shutil.copytree(DEMO / name, faces / name)
    cfg = load_config(
        SMOKE, smoke_overrides(tmp_path, f"data.root={faces}", "data.max_classes=null")
    )
    with pytest.raises(ConfigError, match="clustering.num_clusters=3 but only 2 identities train"):
        train(cfg)


def test_resume_refuses_a_file_that_is_not_a_facecluster_checkpoint(tmp_path):
    fake = tmp_path / "model.ckpt"
    torch.save({"state_dict": {}}, fake)
    with pytest.raises(ConfigError, match="not a facecluster checkpoint"):
        RunFolder.config_for_resume(str(fake))
    with pytest.raises(ConfigError, match="not a facecluster run folder"):
        RunFolder.config_for_resume(str(tmp_path))
    # a file that is no torch file at all (resume=README.md): said so, before the
    # unpickler's reason ("Unsupported operand 35")
    text = tmp_path / "README.md"
    text.write_text("# notes\n")
    with pytest.raises(
        ConfigError,
        match=r"resume=.*README.md is not a run folder, and it cannot be read as a checkpoint",
    ):
        RunFolder.config_for_resume(str(text))


def test_evaluate_expands_the_home_folder_and_names_a_run_that_does_not_exist(
    tmp_path, monkeypatch, capsys
):
    # run=~/runs/x was read as <working dir>/~/runs/x (resume= and data.root expand it),
    # and a path that does not exist was "not a facecluster run folder (no config.yaml)"
    from facecluster import cli

    monkeypatch.setenv("HOME", str(tmp_path))
    cfg = load_config(SMOKE, smoke_overrides(tmp_path / "runs"))
    run = RunFolder.for_training(cfg)
    run.create()
    run.save_config(cfg)
    assert cli.evaluate_main(["run=~/runs/run"]) == 2
    assert f"run={run.path}: the run is not finished" in capsys.readouterr().err
    assert cli.evaluate_main(["run=~/runs/gone", "run=~/runs/run"]) == 2
    assert f"run=~/runs/gone: {tmp_path}/runs/gone does not exist" in capsys.readouterr().err
    # a bare folder, as export and identify take it: the fix named
    with pytest.raises(SystemExit):
        cli.evaluate_main([str(run.path)])
    assert f"(did you mean run={run.path}?)" in capsys.readouterr().err
    # an empty run= named the working dir, "not a facecluster run folder"
    monkeypatch.chdir(run.path)
    with pytest.raises(SystemExit) as exit_:
        cli.evaluate_main(["run=", "run=~/runs/run"])
    assert exit_.value.code == 2
    assert "run= names no folder" in capsys.readouterr().err
    # an export's folder for a run's: said what takes which (it said "no config.yaml")
    export = tmp_path / "export"
    (export / "onnx").mkdir(parents=True)
    assert cli.evaluate_main([f"run={export}"]) == 2
    assert "an export's folder is for `facecluster identify`" in capsys.readouterr().err


def test_last_ckpt_follows_the_final_epoch_even_without_improvement(tmp_path):
    # A learning rate too small to change val/acc: no epoch after the first improves
    # the monitor, and last.ckpt must still be the final epoch (resume and evaluation
    # read it).
    cfg = load_config(
        SMOKE,
        smoke_overrides(
            tmp_path,
            "logger=none",
            "trainer.max_epochs=2",
            "stage1.optim.lr=1e-12",
            "stage2.optim.lr=1e-12",
            "eval.after_training=false",
        ),
    )
    result = train(cfg)
    run = RunFolder(result.run_dir)
    for folder in (run.checkpoint_dir(1), run.checkpoint_dir(2, "subnets-0-2")):
        assert torch.load(folder / "last.ckpt", weights_only=False)["epoch"] == 1
        # last.ckpt alone: the best-* files by val/acc kept beside it (until 2026-12-07)
        # were read by nothing, a third copy of each checkpoint at an epoch's end
        assert [p.name for p in folder.iterdir()] == ["last.ckpt"]
    # a job continues from its own last.ckpt: resume= naming another checkpoint of it
    # (a copy of an earlier epoch, a best-* file of a run saved before) is refused
    other = run.checkpoint_dir(2, "subnets-0-2") / "best-epoch000.ckpt"
    shutil.copy(run.checkpoint_dir(2, "subnets-0-2") / "last.ckpt", other)
    with pytest.raises(ConfigError, match=r"a stage-2 job continues from its own last.ckpt"):
        RunFolder.config_for_resume(str(other))
    # the sub-nets were warm-started from the stage-1 backbone: at this learning rate
    # their weights are still its weights (sub-nets trained from scratch would not be)
    stage1 = run.stage1_weights().backbone
    weights = [k for k, v in stage1.items() if v.is_floating_point() and v.ndim > 1]
    assert weights
    for subnet in run.subnet_weights():
        for k in weights:
            torch.testing.assert_close(subnet.backbone[k], stage1[k], rtol=0, atol=1e-6)


@pytest.mark.faults  # a row of docs/RELIABILITY.md
@pytest.mark.timeout(300)
@pytest.mark.parametrize(
    ("every_process", "sig"),
    [(False, "SIGTERM"), (True, "SIGTERM"), (False, "SIGINT")],
    ids=["main", "group", "ctrl-c"],
)
def test_sigterm_ends_train_py_with_143_and_the_resume_command(tmp_path, every_process, sig):
    # Lightning turns SIGTERM (scancel, a preemption, kill) into a SystemExit of no
    # code: train.py ended with status 0 and no word, a local stage-2 job so stopped
    # was counted as finished, and a SLURM job went on from stage=1 to the clustering.
    # every_process: SIGTERM to the DataLoader workers too, as scancel, a SLURM time
    # limit or systemd send it: the workers died of it and the run ended in exit 1,
    # "DataLoader worker (pid ...) is killed by signal: Terminated", no resume command
    import os
    import signal
    import time

    from tests.conftest import start_train_py

    run = tmp_path / "run"
    args = [
        "-c", "configs/smoke.yaml", "logger=none", "stage=1", "stage1.max_epochs=500",
        f"output_dir={tmp_path}", "run_name=run",
    ]  # fmt: skip
    if every_process:
        args.append("data.num_workers=2")
    proc = start_train_py(*args, own_group=every_process)  # train.py and its workers
    last = run / "stage1" / "checkpoints" / "last.ckpt"
    for _ in range(1800):
        if last.is_file() or proc.poll() is not None:
            break
        time.sleep(0.1)
    assert last.is_file(), proc.communicate(timeout=60)[1][-3000:]
    # SIGINT, a terminal's Ctrl-C, which Lightning ended with exit(1), a failure's status
    signum = getattr(signal, sig)
    if every_process:
        os.killpg(proc.pid, signum)
    else:
        proc.send_signal(signum)
    _, err = proc.communicate(timeout=120)
    assert proc.returncode == 128 + signum, err[-3000:]
    assert f"with\n  python train.py resume={run} stage=1\n" in err  # ResumeHint
    word = "terminated" if signum == signal.SIGTERM else "interrupted"
    assert err.rstrip().endswith(word) and "Traceback" not in err
    assert not RunFolder(run).has_stage_summary(1)  # not taken for a finished stage 1


@pytest.mark.faults
def test_a_ctrl_c_while_a_loader_starts_its_workers_is_raised_after_not_dropped():
    # Ctrl-C in the moment os.fork runs its hooks (a loader starting its workers) was
    # raised inside a hook, where Python drops it ("Exception ignored in: _releaseLock"):
    # the evaluation at the end of a training went on to exit 0, or stopped on the
    # workers the Ctrl-C had ended, exit 1 (a kill-and-resume fuzz). A hook sends it here.
    import os
    import signal

    from facecluster.data.datamodule import FaceDataLoader, WorkerStart

    armed = [True]

    def interrupt():
        if armed:
            armed.clear()
            os.kill(os.getpid(), signal.SIGINT)

    os.register_at_fork(after_in_parent=interrupt)  # (disarmed once it has run)
    before = signal.signal(signal.SIGINT, signal.default_int_handler)
    try:
        loader = FaceDataLoader(
            list(range(8)), batch_size=4, num_workers=1, worker_init_fn=WorkerStart(0)
        )
        with pytest.raises(KeyboardInterrupt):
            list(loader)  # the Ctrl-C dropped: both batches
        assert not armed
        assert [b.tolist() for b in loader] == [[0, 1, 2, 3], [4, 5, 6, 7]]  # workers sound
    finally:
        armed.clear()
        signal.signal(signal.SIGINT, before)


@pytest.mark.faults
def test_loader_workers_drop_a_strangers_sigterm_and_a_script_that_leaves_them_exits():
    # A script that exits with a loader's iterator alive (a failed in-process train(),
    # an abandoned next(iter(loader))) waited forever: multiprocessing ends workers at
    # exit with SIGTERM, which they ignored. They still ignore one from anyone else
    # (scancel, killpg: the training process decides, the test above).
    import os
    import signal
    import subprocess
    import sys
    import time

    from facecluster.config import PROJECT_ROOT

    script = (
        "import multiprocessing, sys\n"
        "from facecluster.data import FaceDataModule\n"
        "dm = FaceDataModule('datasets/lfw-demo/images', batch_size=8, num_workers=2,"
        " max_classes=5)\n"
        "dm.setup()\n"
        "it = iter(dm.train_dataloader())\n"
        "next(it)\n"
        "print(*[p.pid for p in multiprocessing.active_children()\n"
        "        if 'resource_tracker' not in str(p.name)], flush=True)\n"
        "sys.stdin.readline()\n"
    )
    proc = subprocess.Popen(
        [sys.executable, "-c", script], cwd=PROJECT_ROOT, text=True,
        stdin=subprocess.PIPE, stdout=subprocess.PIPE, stderr=subprocess.PIPE,
    )  # fmt: skip
    try:
        workers = [int(pid) for pid in proc.stdout.readline().split()]
        assert len(workers) == 2, proc.stderr.read() if proc.poll() is not None else workers
        os.kill(workers[0], signal.SIGTERM)  # from the test, not the training process
        time.sleep(1)
        os.kill(workers[0], 0)  # alive: ProcessLookupError otherwise
        proc.stdin.write("exit\n")
        proc.stdin.flush()
        assert proc.wait(timeout=60) == 0, proc.stderr.read()[-3000:]
        # ended as torch ends them (exit 0): with 143 its SIGCHLD check said "DataLoader
        # worker ... exited unexpectedly" at exit, in 2 of 6 runs (a review)
        assert "Traceback" not in proc.stderr.read()
    finally:
        proc.kill()


def test_stop_together_stops_a_fit_at_the_next_batch_and_leaves_a_fit_in_a_thread_alone():
    # the handler StopTogether gives Lightning notes SIGTERM, the next batch stops the
    # fit, and the handler before the fit is back after it; Lightning sets no handler
    # outside the main thread, and a fit there runs (the check of the handler refused it)
    import os
    import signal
    import threading

    from lightning.pytorch.demos.boring_classes import BoringModel
    from lightning.pytorch.utilities.exceptions import SIGTERMException

    from facecluster.callbacks import StopTogether
    from facecluster.callbacks.interrupt import forget_sigterm

    class Signal(L.Callback):
        def on_train_batch_end(self, trainer, *args):
            if trainer.global_step == 2:
                os.kill(os.getpid(), signal.SIGTERM)

    def trainer(*callbacks):
        return L.Trainer(
            max_epochs=2, limit_train_batches=4, limit_val_batches=1, logger=False,
            enable_checkpointing=False, enable_progress_bar=False,
            enable_model_summary=False, callbacks=[StopTogether(), *callbacks],
        )  # fmt: skip

    before = signal.getsignal(signal.SIGTERM)
    stopped = trainer(Signal())
    try:
        with pytest.raises(SIGTERMException):
            stopped.fit(BoringModel())
    finally:
        forget_sigterm()  # the next in-process fit of this worker is not stopped
    assert stopped.global_step == 2  # the batch after the signal did not run
    assert signal.getsignal(signal.SIGTERM) is before
    errors, in_thread = [], trainer()
    thread = threading.Thread(target=lambda: _fit_noting(in_thread, errors))
    thread.start()
    thread.join()
    assert errors == [] and in_thread.global_step == 8


def _fit_noting(trainer, errors):
    from lightning.pytorch.demos.boring_classes import BoringModel

    try:
        trainer.fit(BoringModel())
    except Exception as e:  # pragma: no cover - what the test reports
        errors.append(e)


def test_ctrl_c_says_which_command_continues_the_run(tmp_path, capsys, monkeypatch):
    # Lightning ends a Ctrl-C'd fit with exit status 1 after "attempting graceful
    # shutdown", naming neither the run nor how to continue it
    import signal

    from facecluster import pipeline

    class CtrlC(L.Callback):
        def on_train_batch_end(self, trainer, *args):
            if trainer.current_epoch == 1:
                raise KeyboardInterrupt

    hint = "interrupted: continue the run (from its last finished epoch, if any) with\n"
    # a path with a space is quoted (pasted, it was two arguments)
    run, quoted = tmp_path / "my runs" / "run", shlex.quote(f"resume={tmp_path}/my runs/run")
    overrides = smoke_overrides(run.parent, "logger=none", "stage=1", "stage1.max_epochs=2")
    cfg = load_config(SMOKE, overrides)
    handler = signal.getsignal(signal.SIGINT)
    for name in ("PL_GLOBAL_SEED", "PL_SEED_WORKERS"):
        monkeypatch.delenv(name, raising=False)
    try:
        # raised as what it is, as a Ctrl-C outside the Trainer is: Lightning's exit(1)
        # was a SystemExit, which a notebook's `except KeyboardInterrupt` missed
        with pytest.raises(KeyboardInterrupt):
            train(cfg, callbacks=[CtrlC()])
    finally:
        signal.signal(signal.SIGINT, handler)  # Lightning ignores a second Ctrl-C
    # Lightning's seed_everything left its seed for the next run of this process
    assert "PL_GLOBAL_SEED" not in os.environ and "PL_SEED_WORKERS" not in os.environ
    # the stage it ran: a plain resume would go on to stage 2
    assert f"{hint}  python train.py {quoted} stage=1\n" in capsys.readouterr().err
    assert RunFolder(run).last_checkpoint(1).is_file()
    # Ctrl-C while local stage-2 jobs run (outside any Trainer of this process): the
    # same hint, and exit status 130 without a traceback
    from facecluster import cli

    def stopped(*args):
        raise KeyboardInterrupt

    monkeypatch.setattr(pipeline, "run_local", stopped)
    code = cli.train_main(
        [f"resume={run}", "stage=all", "stage2.jobs=2", "eval.after_training=false"]
    )
    err = capsys.readouterr().err
    assert code == 130 and f"{hint}  python train.py {quoted}\n" in err, err[-2000:]
    assert "Traceback" not in err
    # under `facecluster train` the hint names that command: an installed package has
    # no train.py (the hint said `python train.py` whichever command ran)
    from facecluster.config import COMMAND

    for name in COMMAND:  # put back after the test: facecluster's main sets them
        monkeypatch.setitem(COMMAND, name, COMMAND[name])
    code = cli.main(["train", f"resume={run}", "stage2.jobs=2", "eval.after_training=false"])
    err = capsys.readouterr().err
    assert code == 130 and f"{hint}  facecluster train {quoted}\n" in err, err[-2000:]


def test_ctrl_c_in_the_evaluation_after_training_names_the_command_that_evaluates(
    capsys, monkeypatch, tmp_path
):
    # the run had finished training; "interrupted" alone left the user to find that
    # out and how to get its table
    from types import SimpleNamespace

    from facecluster import cli, evaluation, pipeline

    run = tmp_path / "runs" / "done"
    finished = SimpleNamespace(run_dir=run, results={"clustered": {}})
    monkeypatch.setattr(pipeline, "train", lambda cfg, **kw: finished)

    def stopped(runs, overrides=(), ranks=None):
        raise KeyboardInterrupt

    monkeypatch.setattr(evaluation, "evaluate_runs", stopped)
    assert cli.train_main(["-c", str(SMOKE), f"output_dir={tmp_path / 'runs'}"]) == 130
    err = capsys.readouterr().err
    assert "interrupted during the evaluation; the run has finished training" in err
    assert f"`python evaluate.py run={run}` evaluates it" in err


def test_ctrl_c_while_train_py_imports_torch_is_an_interrupt(capsys, monkeypatch):
    # Ctrl-C in the seconds train.py imports torch and Lightning printed a traceback
    # of some 100 lines through their imports (a first-user review)
    import sys

    from facecluster import cli

    class CtrlCOnImport:
        def find_spec(self, name, path=None, target=None):
            if name == "facecluster.launch":
                raise KeyboardInterrupt

    monkeypatch.delitem(sys.modules, "facecluster.launch")
    monkeypatch.setattr(sys, "meta_path", [CtrlCOnImport(), *sys.meta_path])
    assert cli.train_main(["-c", str(SMOKE)]) == 130
    assert capsys.readouterr().err == "interrupted\n"


def test_evaluate_refuses_an_eval_folder_it_cannot_write_before_evaluating(
    finished_run, tmp_path, monkeypatch, capsys
):
    # <run>/eval a file (or a result a folder): found when the whole evaluation had run,
    # a traceback and no table. Every run= is checked before the first is evaluated.
    from facecluster import cli, evaluation

    monkeypatch.setattr(evaluation, "_evaluate_two_stage", lambda *a: pytest.fail("evaluated"))
    copy = tmp_path / "copy"
    shutil.copytree(finished_run.run_dir, copy, ignore=shutil.ignore_patterns("eval"))
    (copy / "eval").write_text("not a folder\n")
    assert cli.evaluate_main([f"run={finished_run.run_dir}", f"run={copy}"]) == 2
    err = capsys.readouterr().err
    assert f"{copy}/eval: the evaluation cannot write its results there" in err, err
    (copy / "eval").unlink()
    (copy / "eval" / "results.md").mkdir(parents=True)
    assert cli.evaluate_main([f"run={copy}"]) == 2
    assert f"{copy}/eval/results.md: the evaluation cannot write" in capsys.readouterr().err


def test_evaluate_names_a_damaged_checkpoint_in_one_line(finished_run, tmp_path, capsys):
    # a checkpoint cut short (a copy interrupted) or missing ended in a traceback
    from facecluster import cli

    copy = tmp_path / "copy"
    shutil.copytree(finished_run.run_dir, copy)
    # model settings edited since training: torch's size mismatch, as a traceback
    config = (copy / "config.yaml").read_text()
    edited = re.sub(r"(?m)^  embedding_dim: \d+$", "  embedding_dim: 8", config)
    (copy / "config.yaml").write_text(edited)
    assert edited != config and cli.evaluate_main([f"run={copy}", "eval.plots=false"]) == 2
    err = capsys.readouterr().err
    assert f"error: {copy}'s stage-1 weights (config.yaml's model settings edited" in err, err
    assert "'embedding_dim': 8" in err and "size mismatch" in err and len(err.splitlines()) == 1
    (copy / "config.yaml").write_text(config)
    last = copy / "stage1" / "checkpoints" / "last.ckpt"
    last.write_bytes(last.read_bytes()[:1000])
    assert cli.evaluate_main([f"run={copy}", "eval.plots=false"]) == 2
    assert f"{last} (stage-1 checkpoint) cannot be read" in capsys.readouterr().err
    last.unlink()
    assert cli.evaluate_main([f"run={copy}", "eval.plots=false"]) == 2
    assert f"{last} is missing" in capsys.readouterr().err


def test_a_resume_refuses_a_damaged_or_foreign_checkpoint_of_an_unfinished_stage(tmp_path):
    # a fuzzing review: a last.ckpt cut short, of an unfinished stage 1, was a traceback
    # at resume; another run's last.ckpt copied over it resumed with exit 0 (its head
    # rows other people's) or failed in Lightning's strict load after config.yaml was
    # rewritten; a checkpoint's facecluster entry of another shape was a TypeError
    runs = {}
    for seed in (42, 7):
        given = smoke_overrides(tmp_path / f"seed{seed}", "stage=1", "logger=none", f"seed={seed}")
        runs[seed] = RunFolder(train(load_config(SMOKE, given)).run_dir)
        (runs[seed].path / "stage1.json").unlink()  # stage 1 not finished
    run, last = runs[42], runs[42].last_checkpoint(1)
    RunFolder.config_for_resume(str(run.path), [])  # its own: resumes
    kept = last.read_bytes()
    last.write_bytes(kept[:100_000])
    with pytest.raises(ConfigError, match=r"last.ckpt cannot be read \(.*\): restore it from"):
        RunFolder.config_for_resume(str(run.path), [])
    shutil.copy(runs[7].last_checkpoint(1), last)
    said = r"last.ckpt was not saved by this run \(seed: 7 in the checkpoint, 42 in the run\)"
    with pytest.raises(ConfigError, match=said):
        RunFolder.config_for_resume(str(run.path), [])
    with pytest.raises(ConfigError, match=said):  # named itself
        RunFolder.config_for_resume(str(last), [])
    ckpt = torch.load(runs[7].last_checkpoint(1), weights_only=True)
    ckpt["facecluster"] = {"stage": 7}
    torch.save(ckpt, last)
    with pytest.raises(ConfigError, match="its 'facecluster' entry is not facecluster's"):
        RunFolder.config_for_resume(str(last), [])
    last.write_bytes(kept)
    (run.path / "config.yaml").unlink()  # the docs' fallback was refused by for_training
    with pytest.raises(ConfigError, match="has no config.yaml: the run folder is damaged"):
        RunFolder.config_for_resume(str(last), [])


def test_resuming_a_finished_run_with_damaged_weights_names_the_file_in_one_line(
    finished_run, tmp_path, capsys, caplog, monkeypatch
):
    # resume=<finished run> whose sub-net file was cut short ended in a traceback after
    # "its test split is evaluated again"; without the evaluation it ended in exit 0
    from facecluster import cli

    copy = shutil.copytree(finished_run.run_dir, tmp_path / "copy")
    subnet = copy / "stage2" / "subnets" / "subnet0.pt"
    subnet.write_bytes(subnet.read_bytes()[:500])
    for after in ("true", "false"):
        assert cli.train_main([f"resume={copy}", f"eval.after_training={after}"]) == 2
        err = capsys.readouterr().err
        assert f"error: resume={copy} is finished, but {subnet} (sub-net 0) cannot be" in err
        # and what to do (a review of the diff: this command trains sub-net 0 again)
        assert f'or train it again: `python train.py resume={copy} "stage2.subnets=[0]"`' in err
        assert len(err.strip().splitlines()) == 1, err
    subnet.write_bytes((finished_run.run_dir / "stage2" / "subnets" / "subnet0.pt").read_bytes())
    assert cli.train_main([f"resume={copy}", "eval.after_training=false"]) == 0
    said = f"is finished: nothing to train; `python evaluate.py run={copy}` evaluates it"
    assert said in caplog.text  # not "its test split is evaluated again"
    # the evaluation after training fails on the run's files: one line, and how to go on
    from facecluster import evaluation

    def damaged(runs, *args, **kwargs):
        raise OSError(f"{runs[0]}/eval cannot be read")

    monkeypatch.setattr(evaluation, "evaluate_runs", damaged)
    assert cli.train_main([f"resume={copy}", "eval.after_training=true"]) == 2
    err = capsys.readouterr().err
    assert f"error: {copy}/eval cannot be read\nthe run has finished training: " in err, err
    assert f"`python evaluate.py run={copy}` evaluates it" in err and "Traceback" not in err


def test_evaluating_several_runs_checks_every_runs_weights_first(
    finished_run, tmp_path, monkeypatch, capsys
):
    # run=A run=B: a sub-net file of B missing or cut short, or its stage-1 checkpoint
    # gone, was found after A's whole evaluation (minutes at scale)
    from facecluster import cli, evaluation

    for name in ("evaluate_run", "_evaluate"):
        monkeypatch.setattr(evaluation, name, lambda *a: pytest.fail("evaluated"), raising=False)
    copy = tmp_path / "copy"
    shutil.copytree(finished_run.run_dir, copy)
    runs = [f"run={finished_run.run_dir}", f"run={copy}", "eval.plots=false"]
    # route settings B's identities cannot serve (they were checked in B's turn)
    names = json.loads((copy / "class_names.json").read_text())
    (copy / "class_names.json").write_text(json.dumps(names[:-1]))
    ivf = [*runs, "route.index=ivf", f"route.ivf_nlist={len(names)}"]
    assert cli.evaluate_main(ivf) == 2
    assert f"run={copy}: route.ivf_nlist={len(names)} lists" in capsys.readouterr().err
    (copy / "class_names.json").write_text(json.dumps(names))
    subnet = RunFolder(copy).subnet_file(1)
    subnet.write_bytes(subnet.read_bytes()[:-100])
    assert cli.evaluate_main(runs) == 2
    assert f"error: {subnet} (sub-net 1) cannot be read" in capsys.readouterr().err
    subnet.unlink()
    assert cli.evaluate_main(runs) == 2
    assert f"error: {copy}: sub-nets [1] of stage 2 are not trained" in capsys.readouterr().err
    last = copy / "stage1" / "checkpoints" / "last.ckpt"
    last.unlink()
    assert cli.evaluate_main(runs) == 2
    err = capsys.readouterr().err
    assert f"error: {last} is missing: deleted or moved since the run finished?" in err


def test_runs_tested_on_other_faces_are_warned_of_in_one_table(finished_run, tmp_path, caplog):
    # evaluate.py run=A run=B put runs of other data sets or splits in one table unsaid
    from facecluster.evaluation import _warn_other_faces

    copy = tmp_path / "copy"
    shutil.copytree(finished_run.run_dir, copy, ignore=shutil.ignore_patterns("stage*"))
    runs = [RunFolder(finished_run.run_dir), RunFolder(copy)]
    with caplog.at_level(logging.WARNING, "facecluster"):
        _warn_other_faces(runs)
    assert not caplog.records  # the same faces
    split = json.loads((copy / "split.json").read_text())
    split["test"] = split["test"][1:]
    (copy / "split.json").write_text(json.dumps(split))
    with caplog.at_level(logging.WARNING, "facecluster"):
        _warn_other_faces(runs)
    assert f"run={copy} has another test split than run={finished_run.run_dir}" in caplog.text


def test_stage1_starts_from_the_backbone_weights_model_weights_names(tmp_path, capsys, monkeypatch):
    # an arcface_torch backbone.pth (the keys of facecluster's IResNets; saved from a DDP
    # wrapper: a module. prefix) or a finished run's stage 1: stage 1 starts from it
    from facecluster import cli
    from facecluster.builders import starting_weights
    from facecluster.models.components import create_backbone

    torch.manual_seed(123)
    start = create_backbone("tiny", embedding_dim=64).state_dict()
    weights = tmp_path / "backbone.pth"
    torch.save({f"module.{k}": v for k, v in start.items()}, weights)
    out = tmp_path / "runs"
    lr = "stage1.optim.lr=1e-9"  # the weights stay where they started
    monkeypatch.chdir(tmp_path)  # given relative, kept absolute: a resume elsewhere reads it
    train(load_config(SMOKE, smoke_overrides(out, "stage=1", "logger=none", lr,
                                             "model.weights=backbone.pth")))  # fmt: skip
    assert RunFolder(out / "run").config().model.weights == str(weights)
    trained = torch.load(RunFolder(out / "run").last_checkpoint(1), weights_only=True)
    backbone = {k.removeprefix("backbone."): v for k, v in trained["state_dict"].items()}
    for name, value in start.items():
        if "running_" not in name and "num_batches" not in name:  # BN statistics move
            assert torch.allclose(backbone[name], value, atol=1e-5), name
    random = create_backbone("tiny", embedding_dim=64).state_dict()["neck.fc.weight"]
    assert not torch.allclose(start["neck.fc.weight"], random, atol=1e-2)  # a real test
    # a finished run's stage-1 checkpoint is taken too; weights of another backbone are
    # refused before any run folder, naming the first mismatch
    given = RunFolder(out / "run").last_checkpoint(1)
    cfg = load_config(SMOKE, [f"model.weights={given}"])
    assert torch.equal(starting_weights(cfg)["neck.fc.weight"], backbone["neck.fc.weight"])
    subnet = tmp_path / "subnet0.pt"  # a sub-net's file: its backbone and head rows
    torch.save({"backbone": start, "head": torch.zeros(3, 64)}, subnet)
    resumable = tmp_path / "checkpoint_gpu_0.pt"  # arcface_torch's, with save_all_states
    torch.save({"epoch": 3, "state_dict_backbone": start, "state_dict_softmax_fc": {}}, resumable)
    module = tmp_path / "system.pt"  # torch.save(BackboneSystem.state_dict()): head too
    system = {f"backbone.{k}": v for k, v in start.items()}
    torch.save({**system, "head.weight": start["neck.fc.weight"]}, module)
    for file in (subnet, resumable, module):
        cfg = load_config(SMOKE, [f"model.weights={file}"])
        assert torch.equal(starting_weights(cfg)["neck.fc.weight"], start["neck.fc.weight"])
    diverged = tmp_path / "diverged.pt"  # a run's last weights after its loss went NaN
    nan = torch.full_like(start["neck.fc.weight"], torch.nan)
    torch.save({**start, "neck.fc.weight": nan}, diverged)
    with pytest.raises(ConfigError, match=r"holds non-finite values \(NaN, Inf, or past "):
        starting_weights(load_config(SMOKE, [f"model.weights={diverged}"]))
    # a fuzzing review: int8 weights were cast (97% of them 0) and trained on without a
    # word; float64 past float32's range passed the check and diverged at step 1; keys
    # that are no names were an AttributeError traceback
    for name, changed, said in (
        ("int8", {"neck.fc.weight": start["neck.fc.weight"].to(torch.int8)}, "torch.int8 values"),
        ("huge", {"neck.fc.weight": start["neck.fc.weight"].double() * 1e45}, "past float32"),
        ("keys", {0: start["neck.fc.weight"]}, "holds no backbone weights"),
        # a float32 file converted with .half(): a BatchNorm variance past 65,504 is inf
        # there, which "diverged?" misnamed (a review)
        (
            "half",
            {k: (v * 1e5).half() if v.is_floating_point() else v for k, v in start.items()},
            r"holds inf in .*, a float16 tensor: values past float16's range \(65,504\)",
        ),
    ):
        torch.save({**start, **changed}, tmp_path / f"{name}.pt")
        with pytest.raises(ConfigError, match=said):
            starting_weights(load_config(SMOKE, [f"model.weights={tmp_path / name}.pt"]))
    # read into memory: mapped from the file until the fit, one replaced or cut short in
    # the meantime (a data scan) was a SIGBUS
    loaded = starting_weights(load_config(SMOKE, [f"model.weights={weights}"]))
    assert all(v.untyped_storage().filename is None for v in loaded.values())
    stage2 = tmp_path / "stage2.ckpt"  # sub-nets, no backbone.*: the sub-net files are
    torch.save({"state_dict": {"subnets.0.neck.fc.weight": start["neck.fc.weight"]}}, stage2)
    with pytest.raises(ConfigError, match=r"no backbone weights \(a stage-2 checkpoint holds"):
        starting_weights(load_config(SMOKE, [f"model.weights={stage2}"]))
    other = tmp_path / "other.ckpt"  # another project's Lightning checkpoint
    torch.save({"state_dict": {"model.fc.weight": start["neck.fc.weight"]}}, other)
    with pytest.raises(ConfigError, match=r"other.ckpt holds no backbone weights: give a state"):
        starting_weights(load_config(SMOKE, [f"model.weights={other}"]))
    with pytest.raises(ConfigError, match="is a folder: give a file, such as a run's stage1/"):
        starting_weights(load_config(SMOKE, [f"model.weights={out / 'run'}"]))
    # a file moved since: a resume may name it anew while stage 1 has trained nothing
    # (it is read again then); once stage 1 has, the run's config would record another
    # start than its weights had (a review)
    with pytest.raises(ConfigError, match="started from .* and has trained since, so the"):
        RunFolder.config_for_resume(str(out / "run"), [f"model.weights={subnet}"])
    RunFolder.config_for_resume(str(out / "run"), ["model.weights=backbone.pth"])  # the same
    untrained = tmp_path / "untrained"  # stopped before stage 1's first checkpoint
    shutil.copytree(out / "run", untrained, ignore=shutil.ignore_patterns("stage1*"))
    cfg = RunFolder.config_for_resume(str(untrained), [f"model.weights={subnet}"])
    assert cfg.model.weights == str(subnet)
    args = ["-c", str(SMOKE), f"output_dir={tmp_path / 'new'}", f"model.weights={weights}"]
    assert cli.train_main([*args, "model.embedding_dim=32"]) == 2
    err = capsys.readouterr().err
    assert f"error: the weights of model.weights='{weights}' do not fit the backbone" in err
    assert "size mismatch for neck.fc.weight" in err and not (tmp_path / "new").exists()
