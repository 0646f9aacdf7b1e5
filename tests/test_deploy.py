"""Deployment: the `facecluster` command, export (torch and ONNX), identify's CSV and
the open-set protocol (unseen identities, unknown threshold, FNIR@FPIR), on a real
tiny run with identities held out of training."""

from __future__ import annotations

import contextlib
import csv
import io
import json
import logging
import os
import re
import shutil
import subprocess
import sys
from dataclasses import asdict
from pathlib import Path
from unittest import mock

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from PIL import Image

import facecluster
from facecluster import cli, deploy
from facecluster import io as fio
from facecluster.builders import build_datamodule
from facecluster.config import ConfigError, load_config
from facecluster.data.images import decode_image
from facecluster.data.transforms import normalize_images
from facecluster.deploy import enroll_folder, export_run, identify_files, load_export
from facecluster.evaluation import Bench, Ranks, evaluate_run
from facecluster.inference import TwoStageIdentifier
from facecluster.inference.identifier import pack_names, unpack_names
from facecluster.inference.openset import fnir_at_fpir, threshold_at_fpir
from facecluster.models.components import create_backbone
from facecluster.pipeline import train
from facecluster.run import RunFolder
from tests.conftest import DEMO, ROOT, SMOKE, make_ijb, run_script, smoke_overrides

EXPORT = "facecluster export runs/<run> exports/demo --onnx"
ENROLL = "facecluster enroll exports/demo new_people/"
IDENTIFY = "facecluster identify exports/demo datasets/lfw-demo/images/<identity> --out who.csv"
IJB = "facecluster ijb exports/demo IJB_release/IJBC"
IJB_1N = "facecluster ijb exports/demo IJB_release/IJBC --protocol 1:1 1:N --out both.json"
IJB_WEIGHTS = "facecluster ijb ms1mv3_arcface_mbf/backbone.pth IJB_release/IJBC --backbone mbf"


def test_the_console_script_lists_its_commands(tmp_path):
    # README's and DEPLOYMENT.md's first command, as written, through the installed script
    proc = _facecluster("facecluster --help".split(), tmp_path)
    for command in cli.COMMANDS:
        assert re.search(rf"^\s+{command}\s", proc.stdout, re.M), (command, proc.stdout)


def test_a_path_that_does_not_exist_or_is_no_run_is_named_before_torch_is_imported(tmp_path):
    # evaluate, export, identify (its model and its images) and enroll imported torch
    # and Lightning (5 s here) before they found that a path they were given does not
    # exist, and evaluate and export before they found a folder that is not a run's
    code = (
        "import sys; from facecluster import cli; "
        "print([cli.main(a) for a in sys.argv[1:]], 'torch' in sys.modules)"
    )
    gone, here = tmp_path / "gone", tmp_path
    calls = [
        f"['evaluate', 'run={here}', 'run={gone}']",
        f"['export', '{gone}', '{tmp_path}/out']",
        f"['identify', '{gone}', '{here}']",
        f"['identify', '{here}', '{here}', '{gone}/face.jpg']",
        f"['enroll', '{gone}', '{here}']",
        f"['enroll', '{here}', '{gone}/new_people']",
        # a folder that is not a run's (an export's, most likely): said as early
        f"['evaluate', 'run={here}']",
        f"['export', '{here}', '{tmp_path}/out']",
    ]
    code = code.replace("sys.argv[1:]", "[" + ", ".join(calls) + "]")
    done = subprocess.run(
        [sys.executable, "-c", code], cwd=ROOT, capture_output=True, text=True, timeout=60
    )
    assert done.stdout.split() == ["[2,", *["2,"] * 6, "2]", "False"], done.stderr
    errors = done.stderr.splitlines()
    assert errors == [
        f"error: run={gone}: {gone} does not exist",
        f"error: {gone}: {gone} does not exist (a finished run folder)",
        f"error: {gone}: {gone} does not exist (a folder written by facecluster export)",
        f"error: {gone}/face.jpg: {gone}/face.jpg does not exist (an image or a folder of images)",
        f"error: {gone}: {gone} does not exist (a folder written by facecluster export)",
        f"error: {gone}/new_people: {gone}/new_people does not exist (give the folder that "
        "holds one sub-folder per new identity)",
        *[
            f"error: {here}: not a facecluster run folder (no config.yaml): evaluation and "
            "export take the folder that training made (runs/<run>); an export's folder is for "
            "`facecluster identify` and `facecluster enroll`"
        ]
        * 2,
    ]
    assert not (tmp_path / "out").exists()
    # the Python API names it as evaluate_run does (it said "no config.yaml")
    with pytest.raises(ConfigError, match=f"run={gone}: {gone} does not exist"):
        export_run(gone, tmp_path / "out")


@pytest.mark.parametrize("command", sorted(cli.COMMANDS))
def test_every_command_has_help_with_an_example(command, capsys):
    with pytest.raises(SystemExit) as exit_:
        cli.main([command, "--help"])
    out = capsys.readouterr().out
    assert exit_.value.code == 0 and f"usage: facecluster {command}" in out
    # an example line, indented, after the options: the command with an argument, as
    # the console script is typed (train.py and evaluate.py are not installed with it)
    example = rf"^ +(\.venv/bin/)?facecluster {command} \S"
    assert re.search(example, out.split("options:")[-1], re.M), out
    assert f"python {command}.py" not in out, out
    # `facecluster --help` (to stdout) lists every command; a wrong one is an error
    assert cli.main(["--help"]) == 0
    listing = capsys.readouterr().out
    assert re.search(rf"^  {command} +\S", listing, re.M) and "usage: facecluster {" in listing
    # its line there is a whole sentence (the first line of its help), and the overview
    # above the list shows it in an example
    assert re.search(rf"^  {command} +\S.*\.$", listing, re.M), listing
    assert re.search(rf"^    facecluster {command} \S", listing, re.M), listing
    assert cli.main(["nonsense"]) == 2
    assert "unknown command 'nonsense'" in capsys.readouterr().err


def test_an_unknown_threshold_with_no_decodable_unseen_face_says_so():
    # every unseen validation face broken (nothing replaces one: label IGNORED) left
    # torch.cat an empty list: "expected a non-empty list of Tensors"
    from types import SimpleNamespace

    from facecluster.data.images import IGNORED

    images = torch.zeros(2, 112, 112, 3, dtype=torch.uint8)
    unseen = [(images, torch.full((2,), IGNORED))] * 2
    with pytest.raises(ValueError, match="none of the run's unseen validation faces could be"):
        deploy.unknown_threshold(SimpleNamespace(device="cpu"), unseen, 0.01)


def test_threshold_at_fpir_lets_at_most_that_fraction_pass():
    nonmated = torch.arange(200, dtype=torch.float32) / 200  # 0.000 .. 0.995
    t = threshold_at_fpir(nonmated, 0.01)  # 2 of 200 may pass: 0.99 and 0.995
    assert (nonmated >= t).sum() == 2 and 0.985 < t <= 0.99
    assert (nonmated >= threshold_at_fpir(nonmated, 0.0)).sum() == 0
    ties = torch.tensor([0.5] * 10)  # tied scores are kept out together
    assert (ties >= threshold_at_fpir(ties, 0.5)).sum() == 0
    with pytest.raises(ValueError, match="fpir must be in"):
        threshold_at_fpir(nonmated, 1.0)
    correct = torch.tensor([True, True, False, True])
    scores = torch.tensor([0.999, 0.5, 0.999, 0.995])
    fnir, threshold = fnir_at_fpir(correct, scores, nonmated, 0.01)
    assert threshold == t and fnir == 0.5  # 0.5 is below it, the third is wrong
    assert fnir_at_fpir(correct, scores, nonmated[:50], 0.01) is None  # 50 < 1 / 1%


@pytest.fixture(scope="module")
def open_run(tmp_path_factory):
    """A finished two-stage run of 12 identities, 3 of them never trained on; 2 of the 9
    in a second cluster (clustering.overlap), and sub-nets with a "not mine" class
    (stage2.negatives), which the export and enrolment keep."""
    tmp = tmp_path_factory.mktemp("open")
    overrides = (
        "logger=csv",
        "data.unseen_fraction=0.25",
        "clustering.overlap=0.25",
        "stage2.negatives=0.5",
    )
    cfg = load_config(SMOKE, smoke_overrides(tmp, *overrides))
    return train(cfg).run_dir


def test_each_process_of_an_evaluation_scores_a_shard_of_the_unseen_faces(open_run):
    # torchrun's processes split the unseen test faces (FNIR's non-mated searches) as
    # they split the test split: each face once
    cfg = RunFolder(open_run).finished_config()
    whole = Bench(cfg, "run", None).unseen
    positions = [set(Bench(cfg, "run", None, Ranks(rank, 2)).unseen.sampler) for rank in (0, 1)]
    faces = len(whole.dataset)
    assert faces > 2 and not positions[0] & positions[1]
    assert {p for shard in positions for p in shard if p < faces} == set(range(faces))


@pytest.fixture(scope="module")
def exported(open_run, tmp_path_factory):
    """The export command of docs/DEPLOYMENT.md and the README as written (paths made
    this test's)."""
    for doc in (ROOT / "docs" / "DEPLOYMENT.md", ROOT / "README.md"):
        assert EXPORT in doc.read_text() and IDENTIFY in doc.read_text(), doc
    cwd = tmp_path_factory.mktemp("deploy")
    command = EXPORT.replace("runs/<run>", str(open_run)).split()
    _facecluster(command, cwd)
    return cwd / "exports" / "demo"


def _facecluster(command: list[str], cwd: Path) -> subprocess.CompletedProcess:
    script = Path(sys.executable).parent / command[0]
    env = {k: v for k, v in os.environ.items() if k != "FACECLUSTER_RUN_DIR"}
    proc = subprocess.run(
        [str(script), *command[1:]], cwd=cwd, env=env, capture_output=True, text=True, timeout=300
    )
    assert proc.returncode == 0, proc.stderr[-3000:]
    return proc


@pytest.mark.slow
def test_open_set_run_holds_identities_out_and_reports_fnir(open_run, monkeypatch):
    from facecluster import evaluation

    unseen = json.loads((open_run / "unseen_identities.json").read_text())
    names = RunFolder(open_run).class_names()
    assert len(names) == 9 and len(unseen["val"]) == 2 and len(unseen["test"]) == 1
    assert not set(names) & set(unseen["val"] + unseen["test"])
    # this run's unseen test faces are too few for 1% (fewer than 100): an FPIR of 20%
    # is measured too, so that a number comes out of the open-set pass
    monkeypatch.setattr(evaluation, "FPIRS", (0.2, *evaluation.FPIRS))
    report = evaluate_run(open_run, ["eval.plots=false", "eval.timing_batches=1"])
    assert len(report.rows) == 4  # routed, ISM, stage-1 head, nearest class mean
    table = (open_run / "eval" / "results.md").read_text()
    for row in report.rows:
        assert set(row.fnir) == {"20%", "1%", "0.1%"}
        assert row.fnir["1%"] is None and row.fnir["0.1%"] is None  # too few faces
        assert isinstance(row.fnir["20%"], float) and 0.0 <= row.fnir["20%"] <= 1.0
        assert f"{row.fnir['20%']:.2%}" in table
    assert "FNIR@FPIR=20%" in table and "FNIR@FPIR=1%" in table and "n/a" in table
    # the routed row's FNIR as lone identify calls give it: its mated searches over the
    # test split, its non-mated ones over the unseen test faces (the evaluation scores
    # both in one pass each, every predictor answering each batch in turn)
    cfg = RunFolder(open_run).finished_config()
    dm = build_datamodule(cfg, eval_batch_size=cfg.eval.batch_size)
    ident = TwoStageIdentifier.from_run(open_run).eval()
    correct, mated, nonmated = [], [], []
    with torch.no_grad():
        for images, labels in dm.test_dataloader():
            found = ident.identify(normalize_images(images))
            correct.append(found.answer(None) == labels)
            mated.append(found.similarity)
        for images, _ in dm.unseen_dataloader("test"):
            nonmated.append(ident.identify(normalize_images(images)).similarity)
    fnir, _ = fnir_at_fpir(torch.cat(correct), torch.cat(mated), torch.cat(nonmated), 0.2)
    assert report.rows[0].model.startswith("clustered, routed")
    assert report.rows[0].fnir["20%"] == pytest.approx(fnir, abs=1e-12)


@pytest.mark.slow
def test_documented_identify_answers_unknown_for_unseen_identities(open_run, exported):
    torch_export = torch.load(exported / "identifier.pt", weights_only=True)
    open_set = torch_export["open_set"]
    assert open_set["fpir"] == 0.01 and open_set["probes"] > 0
    # the share of the unseen validation faces it lets pass: none, when they are too
    # few to measure 1% (the export warns then)
    assert open_set["measured_fpir"] <= 0.01
    assert open_set["probes"] >= 100 or open_set["measured_fpir"] == 0.0
    unseen = json.loads((open_run / "unseen_identities.json").read_text())["test"][0]
    command = IDENTIFY.replace("datasets/lfw-demo/images/<identity>", str(DEMO / unseen))
    _facecluster(command.split(), exported.parents[1])
    with open(exported.parents[1] / "who.csv") as f:
        rows = list(csv.DictReader(f))
    assert list(rows[0]) == ["path", "identity", "score", "similarity", "cluster", "top5", "status"]
    assert open_set["score"] == "similarity"
    assert len(rows) == len(list((DEMO / unseen).glob("*.jpg")))
    names = set(RunFolder(open_run).class_names())
    assignment = RunFolder(open_run).assignment()
    assert len(assignment.overlap) == 2
    listed = RunFolder(open_run).class_names()
    clusters = [{listed[i] for i in assignment.classes_of(k).tolist()} for k in range(3)]
    for row in rows:
        assert row["identity"] == "unknown" or row["identity"] in names
        known = float(row["similarity"]) >= open_set["threshold"]
        assert (row["identity"] == "unknown") != known
        assert row["status"] == ("known" if known else "unknown")
        assert float(row["score"]) <= 0  # moe: a log-probability
        top = row["top5"].split(";")  # top_m=1: the routed cluster's identities, up to 5
        shown = {pair.split(":")[0] for pair in top}
        assert any(shown <= c and len(top) == min(5, len(c)) for c in clusters), row
        assert row["identity"] in (top[0].split(":")[0], "unknown")
    # the export's threshold let at most 1% of the unseen validation faces through
    # (0 of fewer than 100); on unseen test faces it answers unknown for most
    unknown = sum(row["identity"] == "unknown" for row in rows) / len(rows)
    assert unknown >= 0.5


@pytest.mark.slow
def test_documented_ijb_command_reports_tar_at_each_far_of_the_exports_backbone(exported, capsys):
    # docs/EVALUATION.md's command as written, on a release made from LFW faces (the
    # protocol's figures themselves: tests/test_ijb.py)
    cwd = exported.parents[1]
    make_ijb(cwd / "IJB_release" / "IJBC")
    assert IJB in (ROOT / "docs" / "EVALUATION.md").read_text()
    proc = _facecluster(IJB.split(), cwd)
    lines = proc.stdout.splitlines()
    assert lines[0] == (
        "IJBC 1:1 verification: 36 faces, 24 templates, 12 pairs of one person, 36 of two"
    )
    header = ["model", *(f"TAR@FAR=1e-{n:02d}" for n in range(6, 0, -1))]
    assert lines[1] == "| " + " | ".join(header) + " |"
    cells = lines[3].strip("| ").split(" | ")
    assert cells[0] == "exports/demo" and all(re.fullmatch(r"\d+\.\d\d%", c) for c in cells[1:])
    summary = json.loads((cwd / "ijbc.json").read_text())
    assert proc.stderr.splitlines()[-1] == "wrote ijbc.json"
    assert summary["export_id"] == load_export(exported, "torch", "cpu").export_id
    rows = summary["verification"]["rows"]
    assert [f"{row['tar']:.2%}" for row in rows] == cells[1:]
    assert [row["far"] for row in rows] == [1e-6, 1e-5, 1e-4, 1e-3, 1e-2, 1e-1]
    assert summary["identification"] is None
    # both protocols: the same 1:1 table, then 1:N's, a row per gallery and their mean
    assert IJB_1N in (ROOT / "docs" / "EVALUATION.md").read_text()
    proc = _facecluster(IJB_1N.split(), cwd)
    both = proc.stdout.splitlines()
    # 8 non-mated probes a gallery: fewer than 1 / FPIR at each FPIR shown, said
    assert proc.stderr.splitlines()[-3:-1] == [
        f"note: {name} has 8 non-mated probes, too few for FPIR 1e-04, 1e-03, 1e-02, 1e-01 "
        "(none may pass): there the threshold is their highest score, as IJB_evals.py "
        "takes it"
        for name in ("G1", "G2")
    ]
    assert both[:4] == lines[:4]
    assert both[4] == (
        "IJBC 1:N identification of exports/demo: 36 faces, 12 probe templates; "
        "G1: 4 templates, 4 probes mated, G2: 4 templates, 4 probes mated"
    )
    header = ["gallery", "rank-1", "rank-5", "rank-10"]
    header += [f"TPIR@FPIR=1e-{n:02d}" for n in range(4, 0, -1)]
    assert both[5] == "| " + " | ".join(header) + " |"
    table = [line.strip("| ").split(" | ") for line in both[7:]]
    assert [row[0] for row in table] == ["G1", "G2", "mean"]
    search = json.loads((cwd / "both.json").read_text())["identification"]
    assert table[2][1:4] == [f"{x:.2%}" for x in search["mean"]["rank_rates"]]
    assert table[0][4:] == [f"{r['tpir']:.2%}" for r in search["galleries"][0]["rows"]]
    # 4 of 4 mated probes among 4 gallery templates: at rank 5 and 10, each is found
    assert table[2][2:4] == ["100.00%", "100.00%"]
    # the export's backbone.pth named as a weights file: the same backbone, the same
    # figures (in this process: the command's own run is the documented one below)
    args = summary["backbone"]
    again = deploy.ijb_export(
        exported / "backbone.pth",
        cwd / "IJB_release" / "IJBC",
        backbone=args["name"],
        embedding_dim=args["embedding_dim"],
        image_size=args["image_size"],
    )
    assert again["verification"] == summary["verification"] and again["export_id"] is None
    # docs/EVALUATION.md's arcface_torch command as written, on an MobileFaceNet's
    # weights saved as arcface_torch saves them (random: its figures mean nothing)
    assert IJB_WEIGHTS in (ROOT / "docs" / "EVALUATION.md").read_text()
    mbf = create_backbone("mbf", embedding_dim=512, image_size=112)
    (cwd / "ms1mv3_arcface_mbf").mkdir()
    torch.save(mbf.state_dict(), cwd / "ms1mv3_arcface_mbf" / "backbone.pth")
    proc = _facecluster(IJB_WEIGHTS.split(), cwd)
    assert proc.stdout.splitlines()[0] == lines[0]
    assert json.loads((cwd / "ijbc.json").read_text())["backbone"]["name"] == "mbf"
    # weights without --backbone or that do not fit it, an export with one, a folder
    # that is no release: said before any face is read
    weights = [str(cwd / "ms1mv3_arcface_mbf" / "backbone.pth"), str(cwd / "IJB_release/IJBC")]
    out = ["--out", str(cwd / "refused.json")]
    capsys.readouterr()  # the progress bars above
    for given, said in (
        (weights, "backbone.pth is a weights file: name the backbone they fit with --backbone"),
        ([*weights, "--backbone", "r50"], "do not fit the backbone"),
        ([str(exported), weights[1], "--backbone", "r50"], "is an export, whose"),
        ([str(exported), str(exported.parent)], "exports is not an IJB release's IJBC folder"),
    ):
        assert cli.ijb_main([*given, *out]) == 2
        err = capsys.readouterr().err
        assert err.startswith("error: ") and said in err and "IJBC faces" not in err, err
    assert not (cwd / "refused.json").exists()


@pytest.mark.slow
def test_a_name_that_is_not_utf8_is_printed_escaped_under_a_strict_utf8_locale(exported, tmp_path):
    # under en_US.UTF-8 (not C.UTF-8) Python's stdout is strict: enrol of a folder whose
    # name is not UTF-8 ended with a UnicodeEncodeError traceback (exit 1) after it had
    # saved the person, and its second run said the name was enrolled already; pack
    # likewise after writing its output (a review)
    model = tmp_path / "model"
    shutil.copytree(exported, model)
    people = tmp_path / "people"
    shutil.copytree(sorted(DEMO.iterdir())[0], os.fsdecode(bytes(people) + b"/Jos\xe9"))
    env = {**os.environ, "PYTHONIOENCODING": "utf-8:strict"}
    script = str(Path(sys.executable).parent / "facecluster")
    for command, said in (
        (["enroll", str(model), str(people)], "enrolled Jos\\udce9 in cluster "),
        (["pack", str(people), os.fsdecode(bytes(tmp_path) + b"/rec\xff")], "rec\\udcff"),
    ):
        done = subprocess.run([script, *command], env=env, capture_output=True, text=True)
        assert done.returncode == 0 and said in done.stdout, done.stderr[-2000:]
    assert load_export(model, "torch", "cpu").class_names[-1] == os.fsdecode(b"Jos\xe9")


def test_the_export_holds_the_stage1_backbone_as_a_state_dict_model_weights_reads(
    open_run, exported, tmp_path
):
    # arcface_torch's users evaluate a backbone.pth (IJB-B/C scripts); a run kept its
    # stage-1 backbone only inside Lightning checkpoints and identifier.pt
    from facecluster.builders import starting_weights
    from facecluster.models.components import create_backbone

    weights = torch.load(exported / "backbone.pth", weights_only=True, map_location="cpu")
    identifier = load_export(exported, "torch", "cpu")
    backbone = create_backbone(**identifier.backbone_args).eval()
    backbone.load_state_dict(weights)  # strict: the file is that backbone's, key for key
    faces = torch.randn(4, 3, *(2 * [identifier.backbone_args["image_size"]]))
    with torch.inference_mode():
        torch.testing.assert_close(
            backbone(faces), identifier.router_backbone.eval()(faces), rtol=0, atol=0
        )
    # a backbone.pth that is no export's (weights of the user's) is not written over
    mine = tmp_path / "mine"
    mine.mkdir()
    (mine / "backbone.pth").write_bytes(b"arcface_torch's weights")
    with pytest.raises(ValueError, match=r"backbone.pth is not an export's \(no identifier.pt"):
        export_run(open_run, mine)
    assert (mine / "backbone.pth").read_bytes() == b"arcface_torch's weights"
    # and a new run starts from it
    cfg = load_config(SMOKE, smoke_overrides(tmp_path, f"model.weights={exported}/backbone.pth"))
    started = starting_weights(cfg)
    assert started.keys() == weights.keys()
    assert all(torch.equal(started[k], weights[k]) for k in weights)


@pytest.mark.slow
def test_export_fpir_sets_the_share_of_unseen_faces_the_threshold_lets_pass(
    open_run, exported, tmp_path
):
    # --fpir 0.2 (docs/DEPLOYMENT.md's flag): a threshold no higher than the default
    # 1%'s, letting through at most a fifth of the unseen validation faces, measured
    # on them; a value outside [0, 1) is refused before anything is read
    default = torch.load(exported / "identifier.pt", weights_only=True)["open_set"]
    _facecluster(["facecluster", "export", str(open_run), "loose", "--fpir", "0.2"], tmp_path)
    loose = torch.load(tmp_path / "loose" / "identifier.pt", weights_only=True)["open_set"]
    assert loose["fpir"] == 0.2 and loose["probes"] == default["probes"] >= 5
    assert 0 < loose["measured_fpir"] <= 0.2  # >= 5 probes: a fifth of them is measurable
    assert loose["threshold"] < default["threshold"]
    script = Path(sys.executable).parent / "facecluster"
    refused = subprocess.run(
        [str(script), "export", str(open_run), "bad", "--fpir", "1.5"],
        cwd=tmp_path, capture_output=True, text=True, timeout=120,
    )  # fmt: skip
    assert refused.returncode == 2 and "--fpir must be in [0, 1), got 1.5" in refused.stderr
    assert not (tmp_path / "bad").exists()


def _measured(row) -> dict:
    """An evaluation row's numbers that depend on weights and images only (not on the
    run folder's name or the machine's speed)."""
    timings = ("run", "throughput", "latency_ms", "throughput_spread")
    return {key: value for key, value in asdict(row).items() if key not in timings}


@pytest.mark.slow
def test_export_of_a_run_whose_data_moved_reads_it_from_data_root(
    open_run, exported, tmp_path, capsys
):
    # a run folder copied to another machine, where its data is elsewhere: the open-set
    # threshold needs the validation split, so export says where to give its new place
    # (--data-root), then reads it there, checked as the run's data; a --data-root
    # that does not exist is named before any work. The verification set the run
    # trained with is not there either: export does not read it, and evaluate.py is
    # given its new place (here: none) as an override
    copied = tmp_path / "copied"
    shutil.copytree(open_run, copied)
    config = copied / "config.yaml"
    recorded = f"  root: {DEMO}\n"  # resolved at training
    assert recorded in config.read_text() and "  verification: []\n" in config.read_text()
    text = config.read_text().replace(recorded, "  root: /gone/lfw-demo/images\n")
    config.write_text(text.replace("  verification: []\n", "  verification:\n  - /gone/lfw.bin\n"))
    assert cli.export_main([str(copied), str(tmp_path / "a")]) == 2
    error = capsys.readouterr().err
    assert "data.root='/gone/lfw-demo/images' does not exist" in error
    assert "--data-root <new place> to facecluster export" in error
    moved = tmp_path / "elsewhere" / "images"
    shutil.copytree(DEMO, moved)
    assert cli.export_main([str(copied), str(tmp_path / "b"), "--data-root", str(moved)]) == 0
    said = capsys.readouterr()  # the files written, then what to do with them
    assert said.out.startswith(f"wrote {tmp_path / 'b' / 'identifier.pt'}\n")
    assert said.err.endswith(
        f"identify faces with it: `facecluster identify {tmp_path / 'b'} <images>`; add "
        f"people without training: `facecluster enroll {tmp_path / 'b'} <folder of person "
        "folders>`\n"
    )
    made = torch.load(tmp_path / "b" / "identifier.pt", weights_only=True)["open_set"]
    assert made == torch.load(exported / "identifier.pt", weights_only=True)["open_set"]
    assert "  root: /gone/lfw-demo/images\n" in config.read_text()  # the run is left as it was
    overrides = [f"data.root={moved}", "data.verification=[]", "eval.plots=false"]
    report = evaluate_run(copied, [*overrides, "eval.timing_batches=1"])
    # the same weights on the same images: every measured number of every row is the
    # original run's, evaluated where its data was (a copy: the fixture's run is shared)
    original = tmp_path / "original"
    shutil.copytree(open_run, original)
    expected = evaluate_run(original, ["eval.plots=false", "eval.timing_batches=1"])
    assert len(report.rows) == 4 and [_measured(r) for r in report.rows] == [
        _measured(r) for r in expected.rows
    ]
    assert cli.export_main([str(copied), str(tmp_path / "c"), "--data-root", "/nowhere"]) == 2
    assert "--data-root /nowhere: /nowhere does not exist" in capsys.readouterr().err
    assert cli.export_main([str(copied), str(tmp_path / "c"), "--data-root", "faces"]) == 2
    assert f"neither {Path.cwd() / 'faces'} nor {ROOT / 'faces'} exists" in capsys.readouterr().err
    assert not (tmp_path / "a").exists() and not (tmp_path / "c").exists()


@pytest.mark.slow
def test_onnx_identifier_matches_torch_on_the_test_split(open_run, exported, tmp_path):
    torch_ident = load_export(exported, "torch", "cpu")
    onnx_ident = load_export(exported, "onnx", "cpu")
    assert onnx_ident.open_set == torch_ident.open_set
    assert onnx_ident.assignment == torch_ident.assignment  # overlap rows in gallery.npz
    assert len(onnx_ident.assignment.overlap) == 2
    for k in range(3):  # each sub-net's "not mine" row travels with its head
        assert len(torch_ident.head_rows(k)) == len(torch_ident.members(k)) + 1
        assert torch.equal(onnx_ident.head_rows(k), torch_ident.head_rows(k))
    cfg = RunFolder(open_run).finished_config()
    for images, _ in build_datamodule(cfg).test_dataloader():
        x = normalize_images(images)
        assert torch.equal(torch_ident.identify(x).identity, onnx_ident.identify(x).identity)
        pairs = [(torch_ident.router_backbone, onnx_ident.router_backbone)]
        pairs += list(zip(torch_ident.subnets, onnx_ident.subnets, strict=True))
        for ours, theirs in pairs:
            with torch.no_grad():
                expected = F.normalize(ours(x), dim=1)
            assert torch.allclose(F.normalize(theirs(x), dim=1), expected, atol=1e-4, rtol=0)
    # identify on onnxruntime writes the same names and clusters as on torch
    folders = [DEMO / name for name in RunFolder(open_run).class_names()[:2]]
    for runtime in ("torch", "onnx"):
        identify_files(exported, folders, tmp_path / f"{runtime}.csv", runtime=runtime)
    answers = {}
    for runtime in ("torch", "onnx"):
        with open(tmp_path / f"{runtime}.csv") as f:
            answers[runtime] = [(r["path"], r["identity"], r["cluster"]) for r in csv.DictReader(f)]
    assert answers["torch"] == answers["onnx"] and len(answers["torch"]) > 10
    # the --help example's options: onnx runtime, a threshold of one's own
    faces = [str(p) for p in sorted(folders[0].glob("*.jpg"))[:2]]
    out = tmp_path / "own.csv"
    argv = ["identify", str(exported), *faces, "--runtime", "onnx", "--threshold", "0.5"]
    assert cli.main([*argv, "--out", str(out)]) == 0
    with open(out) as f:
        for row in csv.DictReader(f):  # the threshold compares the answer's similarity
            assert -1 <= float(row["similarity"]) <= 1
            assert (row["identity"] == "unknown") == (float(row["similarity"]) < 0.5)
    # the export's threshold was chosen at top_m=1: another top_m needs its own
    assert cli.main(["identify", str(exported), *faces, "--top-m", "2", "--out", str(out)]) == 2
    assert cli.main([*argv, "--top-m", "9", "--out", str(out)]) == 2  # 3 clusters
    # an export whose threshold an earlier facecluster chose on the moe log-probability
    old = tmp_path / "old"
    old.mkdir()
    payload = torch.load(exported / "identifier.pt", weights_only=True)
    del payload["open_set"]["score"]
    torch.save(payload, old / "identifier.pt")
    with pytest.raises(ValueError, match="log-probability .* export the run again"):
        identify_files(old, faces, tmp_path / "old.csv", runtime="torch")
    # loaded through the API, its number is not offered as a similarity threshold
    stale = TwoStageIdentifier.load(old / "identifier.pt").open_set
    assert "threshold" not in stale
    assert stale["log_probability_threshold"] == payload["open_set"]["threshold"]


@pytest.mark.slow
def test_exporting_again_without_onnx_leaves_no_stale_onnx_models(
    open_run, exported, tmp_path, caplog
):
    # An export folder re-exported without --onnx: the earlier ONNX networks are not
    # this identifier's, and --runtime onnx must not find them.
    again = tmp_path / "again"
    shutil.copytree(exported, again)
    assert (again / "onnx" / "identifier.json").is_file()
    written = export_run(open_run, again)
    assert written == [again / "identifier.pt", again / "backbone.pth"]
    assert not (again / "onnx").exists()
    with pytest.raises(FileNotFoundError):
        load_export(again, "onnx", "cpu")
    assert load_export(again, "auto", "cpu").num_clusters == 3
    # an export whose identifier.pt is damaged (a copy cut short) is replaced whole,
    # with a warning: the identities enrolled into it cannot be read to be kept
    (again / "identifier.pt").write_bytes(b"cut short")
    with caplog.at_level(logging.WARNING):
        export_run(open_run, again)
    assert f"{again}: its identities could not be read" in caplog.text
    assert (
        load_export(again, "auto", "cpu").class_names
        == load_export(exported, "torch", "cpu").class_names
    )


@pytest.mark.slow
def test_an_onnx_export_without_the_extra_is_refused_before_it_changes_anything(
    open_run, exported, tmp_path, monkeypatch
):
    # --onnx without the onnx extra: refused before the earlier export is touched
    again = tmp_path / "again"
    shutil.copytree(exported, again)
    before = {p: p.read_bytes() for p in again.rglob("*") if p.is_file()}
    import facecluster.inference.onnx as onnx_module

    def missing(module: str):
        raise ImportError(f"the '{module}' package is missing")

    monkeypatch.setattr(onnx_module, "_require", missing)
    with pytest.raises(ImportError, match="'onnx"):
        export_run(open_run, again, onnx=True)
    assert {p: p.read_bytes() for p in again.rglob("*") if p.is_file()} == before


def _contents(folder: Path) -> dict[Path, bytes | None]:
    """Every file's bytes and every folder (None) under ``folder``, hidden ones too."""
    return {p: p.read_bytes() if p.is_file() else None for p in folder.rglob("*")}


@pytest.mark.slow
def test_a_re_export_that_fails_midway_leaves_the_earlier_export(open_run, exported, tmp_path):
    # OUT/onnx was deleted before the new export was written: an ONNX exporter that
    # raised after the first network left an export without its ONNX folder. The new
    # files are written aside and replace the old ones once all are written; a failure
    # removes them and leaves the earlier export, byte for byte, loadable on both runtimes
    again = tmp_path / "again"
    shutil.copytree(exported, again)
    before = _contents(again)
    real, exported_networks = torch.onnx.export, []

    def fails_on_the_second_network(*args, **kwargs):
        exported_networks.append(args[2])
        if len(exported_networks) == 2:
            raise RuntimeError("the exporter failed")
        return real(*args, **kwargs)

    with (
        mock.patch("torch.onnx.export", fails_on_the_second_network),
        pytest.raises(RuntimeError, match="the exporter failed"),
    ):
        export_run(open_run, again, onnx=True, device="cpu")
    assert len(exported_networks) == 2 and _contents(again) == before
    torch_ident, onnx_ident = load_export(again, "torch", "cpu"), load_export(again, "onnx", "cpu")
    assert onnx_ident.class_names == torch_ident.class_names


@pytest.mark.slow
def test_enrolling_new_identities_without_retraining(open_run, exported, tmp_path, caplog, capsys):
    model = tmp_path / "model"
    shutil.copytree(exported, model)
    before = load_export(model, "torch", "cpu")
    unseen = json.loads((open_run / "unseen_identities.json").read_text())["val"]
    people = tmp_path / "new_people"
    held_out = {}
    for name in unseen:
        files = sorted((DEMO / name).glob("*.jpg"))
        (people / name).mkdir(parents=True)
        for path in files[: len(files) // 2]:
            shutil.copy(path, people / name / path.name)
        held_out[name] = files[len(files) // 2 :]
    assert ENROLL in (ROOT / "docs" / "DEPLOYMENT.md").read_text()
    command = ENROLL.replace("exports/demo", str(model)).replace("new_people/", f"{people}/")
    # a disk that fills while the gallery is written: the export is left as it was
    files = {p: p.read_bytes() for p in model.rglob("*") if p.is_file()}
    with mock.patch("numpy.savez", side_effect=OSError(28, "No space left on device")):
        assert cli.main(command.split()[1:]) == 2
    assert {p: p.read_bytes() for p in model.rglob("*") if p.is_file()} == files
    assert cli.main(command.split()[1:]) == 0  # and the enrolment runs again
    torch_ident, onnx_ident = load_export(model, "torch", "cpu"), load_export(model, "onnx", "cpu")
    for ident in (torch_ident, onnx_ident):
        assert ident.class_names == before.class_names + sorted(unseen)
        assert ident.open_set == before.open_set
        assert torch.equal(ident.assignment.overlap, before.assignment.overlap)
        for k in range(3):  # the "not mine" row stays last, after the new identities' rows
            assert torch.equal(ident.head_rows(k)[-1], before.head_rows(k)[-1])
    # the new identity's class mean is its normalised mean stage-1 embedding, its head
    # row the same over its cluster's sub-net; old identities keep theirs
    name, new_id = sorted(unseen)[0], len(before.class_names)
    faces = normalize_images(
        torch.stack([decode_image(str(p)) for p in sorted((people / name).iterdir())])
    )
    mean = F.normalize(torch_ident.embed(faces).mean(0), dim=0)
    assert torch.allclose(torch_ident.assignment.class_means[new_id], mean, atol=1e-5)
    k = int(torch_ident.class_to_cluster[new_id])
    # each new identity joins the cluster the router of the gallery before enrolment
    # picks for its class mean
    for i, person in enumerate(sorted(unseen)):
        joined = int(torch_ident.class_to_cluster[new_id + i])
        mean_i = torch_ident.assignment.class_means[new_id + i]
        assert joined == int(before.router.route(mean_i[None], 1)[0, 0]), person
    # the new identities that joined cluster k come last in its members, in id order
    clusters = torch_ident.class_to_cluster.tolist()
    newcomers = [i for i in range(new_id, len(clusters)) if clusters[i] == k]
    assert torch_ident.members(k)[-len(newcomers) :].tolist() == newcomers
    at = newcomers.index(new_id) - len(newcomers)
    assert torch.allclose(torch_ident.means(k)[at], mean, atol=1e-5)  # the decision unit's
    with torch.no_grad():
        row = F.normalize(F.normalize(torch_ident.subnets[k](faces), dim=1).mean(0), dim=0)
    assert torch.allclose(torch_ident.head(k)[at], row, atol=1e-5)
    assert torch.equal(torch_ident.assignment.class_means[:new_id], before.assignment.class_means)
    # both runtimes answer alike on the new identities' other faces
    images = normalize_images(torch.stack([decode_image(str(p)) for p in held_out[name]]))
    assert torch.equal(torch_ident.identify(images).identity, onnx_ident.identify(images).identity)
    # an enrolled person is identified as themselves. This tiny run's embeddings are
    # too weak for a person's other faces (or even most of their enrolment faces) to
    # be told apart, but a face enrolled alone is its identity's class mean and head
    # row exactly: identify, reading the export from disk, names that person on it,
    # known, on both runtimes
    alone, one_face = tmp_path / "alone", tmp_path / "one_face"
    shutil.copytree(exported, alone)
    for person in unseen:
        (one_face / person).mkdir(parents=True)
        shutil.copy(held_out[person][0], one_face / person / "face.jpg")
    enroll_folder(alone, one_face)
    faces = [one_face / person / "face.jpg" for person in sorted(unseen)]
    for runtime in ("torch", "onnx"):
        identify_files(alone, faces, tmp_path / "alone.csv", runtime=runtime)
        with open(tmp_path / "alone.csv") as f:
            answers = [(row["identity"], row["status"]) for row in csv.DictReader(f)]
        assert answers == [(person, "known") for person in sorted(unseen)], runtime
    # a name that is enrolled already is refused, and nothing is written
    assert cli.main(["enroll", str(model), str(people)]) == 2
    assert load_export(model, "torch", "cpu").class_names == torch_ident.class_names
    # exporting the run again over it would replace the enrolled people: refused, naming
    # them, before any work (it replaced them after a warning, a gallery that lost people;
    # a bad-input review), unless asked for
    kept = (model / "identifier.pt").read_bytes()
    assert cli.main(["export", str(open_run), str(model)]) == 2
    err = capsys.readouterr().err
    assert f"{model} holds {len(unseen)} identities enrolled into it that the run does not" in err
    assert all(name in err for name in unseen) and "pass --drop-enrolled to replace" in err
    assert (model / "identifier.pt").read_bytes() == kept
    with caplog.at_level(logging.WARNING):
        export_run(open_run, model, drop_enrolled=True)
    assert f"{model} held {len(unseen)} identities that the run does not have" in caplog.text
    assert all(name in caplog.text for name in unseen)
    assert f"facecluster enroll {model} <folder>" in caplog.text
    assert load_export(model, "torch", "cpu").class_names == before.class_names


def test_an_identifier_and_onnx_folder_from_two_exports_are_refused(
    open_run, exported, tmp_path, capsys
):
    # an identifier.pt copied from another export: torch and onnx answered differently,
    # and an enrolment wrote the torch gallery into onnx/ beside the other export's
    # networks, silently (a review of the deploy side)
    other = tmp_path / "other"
    export_run(open_run, other)  # torch only: another export, another id
    mixed = shutil.copytree(exported, tmp_path / "mixed")
    shutil.copy(other / "identifier.pt", mixed / "identifier.pt")
    for runtime in ("torch", "onnx"):
        with pytest.raises(ValueError, match="identifier.pt and onnx/ come from different"):
            load_export(mixed, runtime, "cpu")
    # the torch load reads onnx/'s id alone, from gallery.npz: not identifier.json,
    # which holds every name (tens of MB at 2M identities)
    with pytest.MonkeyPatch.context() as patch:
        patch.setattr(json, "loads", lambda *a, **k: pytest.fail("identifier.json parsed"))
        with pytest.raises(ValueError, match="identifier.pt and onnx/ come from different"):
            load_export(mixed, "torch", "cpu")
    files = {p: p.read_bytes() for p in mixed.rglob("*") if p.is_file()}
    people = tmp_path / "people"
    shutil.copytree(DEMO / sorted(p.name for p in DEMO.iterdir())[0], people / "Someone")
    assert cli.main(["enroll", str(mixed), str(people)]) == 2
    assert "come from different exports" in capsys.readouterr().err
    assert {p: p.read_bytes() for p in mixed.rglob("*") if p.is_file()} == files
    # one export's two halves agree, and an enrolment keeps them agreeing
    whole = shutil.copytree(exported, tmp_path / "whole")
    assert cli.main(["enroll", str(whole), str(people)]) == 0
    ids = {load_export(whole, runtime, "cpu").export_id for runtime in ("torch", "onnx")}
    assert len(ids) == 1 and None not in ids


class _Killed(BaseException):
    """A process that dies where this is raised: no error handling of facecluster's
    (``except Exception``) sees it."""


@pytest.mark.slow
@pytest.mark.parametrize("killed_at", ["identifier.pt", "onnx/gallery.npz", "onnx/identifier.json"])
def test_an_enrolment_killed_while_it_replaces_its_files_is_all_or_nothing(
    open_run, exported, tmp_path, monkeypatch, killed_at
):
    # enroll replaced identifier.pt, onnx/gallery.npz and onnx/identifier.json one by
    # one: a process that died between two of them left an ONNX folder that did not load
    # (the new gallery, the old JSON) or torch and ONNX galleries that disagreed (the new
    # identities in one only). It dies here just before each of the three takes its
    # place; the next command on the export finds all three new or all three old.
    model = tmp_path / "model"
    shutil.copytree(exported, model)
    old = load_export(model, "torch", "cpu").class_names
    unseen = json.loads((open_run / "unseen_identities.json").read_text())["val"]
    people = tmp_path / "new_people"
    for name in unseen:
        (people / name).mkdir(parents=True)
        for path in sorted((DEMO / name).glob("*.jpg"))[:2]:
            shutil.copy(path, people / name / path.name)
    real = os.replace

    def dies_before(src, dst, *args, **kwargs):
        if Path(dst) == model / killed_at:
            raise _Killed
        return real(src, dst, *args, **kwargs)

    with monkeypatch.context() as patch:
        patch.setattr(os, "replace", dies_before)
        with pytest.raises(_Killed):
            enroll_folder(model, people)
    torch_names = load_export(model, "torch", "cpu").class_names
    onnx_names = load_export(model, "onnx", "cpu").class_names
    assert torch_names == onnx_names and torch_names in (old, old + sorted(unseen))
    assert not list(model.glob(".facecluster-update*"))  # an update left is put in place


def _old_export(out: Path) -> None:
    """An earlier export's files, each holding "old"."""
    (out / "onnx").mkdir(parents=True)
    for name in ("identifier.json", "gallery.npz", "router.onnx", "subnet0.onnx"):
        (out / "onnx" / name).write_text("old")
    (out / "identifier.pt").write_text("old")


def test_a_re_export_killed_while_its_files_move_never_leaves_onnx_reading_finished(
    tmp_path, monkeypatch
):
    # the earlier onnx/identifier.json (what marks an ONNX folder finished) stayed until
    # the new one replaced it, last: a process killed between two files left new and
    # old networks in a folder that loaded as finished. It goes first now; the next
    # command on the export puts the rest in place.
    out = tmp_path / "export"
    _old_export(out)
    real = os.replace

    def dies_before_the_sub_net(src, dst, *args, **kwargs):
        if Path(dst) == out / "onnx" / "subnet0.onnx":
            raise _Killed
        return real(src, dst, *args, **kwargs)

    monkeypatch.setattr(os, "replace", dies_before_the_sub_net)
    with pytest.raises(_Killed), deploy._updating(out, replace_onnx=True) as new:
        (new / "identifier.pt").write_text("new")
        (new / "onnx").mkdir()
        for name in ("router.onnx", "subnet0.onnx", "gallery.npz", "identifier.json"):
            (new / "onnx" / name).write_text("new")
    monkeypatch.setattr(os, "replace", real)
    assert not (out / "onnx" / "identifier.json").exists()  # reads as unfinished
    deploy.finish_update(out)
    assert {p.name: p.read_text() for p in (out / "onnx").iterdir()} == dict.fromkeys(
        ("router.onnx", "subnet0.onnx", "gallery.npz", "identifier.json"), "new"
    )
    assert (out / "identifier.pt").read_text() == "new"


def test_a_pending_update_that_names_what_no_export_writes_is_refused_untouched(tmp_path):
    # every command on an export acts on its pending plan before reading anything: a
    # folder from elsewhere whose plan named an absolute path removed that folder, and
    # one naming ../x or a file under a linked onnx/ wrote there (site-packages/x.pth
    # ran code at the next python start; a security review)
    import json

    victim = tmp_path / "victim"
    (victim / "keep").mkdir(parents=True)
    elsewhere = tmp_path / "elsewhere"
    elsewhere.mkdir()
    out = tmp_path / "export"
    update = out / deploy.UPDATE
    (update / "onnx").mkdir(parents=True)
    (update / "identifier.pt").write_text("new")
    (update / "onnx" / "router.onnx").write_text("new")
    for path in ("../planted.txt", str(elsewhere / "x.pth"), "onnx/../../planted.txt"):
        (tmp_path / "planted.txt").unlink(missing_ok=True)
        plan = {"remove": [str(victim)], "files": ["identifier.pt", path], "remove_onnx": False}
        (update / deploy.UPDATE_PLAN).write_text(json.dumps(plan))
        with pytest.raises(ValueError, match=r"update\.json names .*which no export or enrolment"):
            deploy.finish_update(out)
        assert (victim / "keep").is_dir() and not (tmp_path / "planted.txt").exists()
        assert not list(elsewhere.iterdir()) and not (out / "identifier.pt").exists()
    (out / "onnx").symlink_to(elsewhere)  # onnx/router.onnx written into elsewhere/
    plan = {"remove": [], "files": ["identifier.pt", "onnx/router.onnx"], "remove_onnx": False}
    (update / deploy.UPDATE_PLAN).write_text(json.dumps(plan))
    with pytest.raises(ValueError, match=r"onnx is a link, which an update would write through"):
        deploy.finish_update(out)
    assert not list(elsewhere.iterdir()) and not (out / "identifier.pt").exists()
    (update / deploy.UPDATE_PLAN).write_text("{not json")
    with pytest.raises(ValueError, match=r"update\.json cannot be read"):
        deploy.finish_update(out)
    (out / "onnx").unlink()  # the plan an export writes is put in place
    (update / deploy.UPDATE_PLAN).write_text(json.dumps(plan))
    deploy.finish_update(out)
    assert (out / "identifier.pt").read_text() == (out / "onnx" / "router.onnx").read_text()
    assert not update.exists()


def test_commands_finishing_one_update_take_turns(tmp_path, monkeypatch):
    # every command on an export finishes a pending update first, so two may at once:
    # they removed each other's new files (the marker, onnx/identifier.json, after the
    # other had put it in place), and one holding an old plan applied it to the next
    # update. One moves the files at a time now, reading the plan once it is its turn.
    import fcntl
    import threading

    out = tmp_path / "export"
    _old_export(out)
    with monkeypatch.context() as patch:  # committed, not yet put in place
        patch.setattr(deploy, "_finish_locked", lambda out: None)
        with deploy._updating(out, replace_onnx=True) as new:
            (new / "identifier.pt").write_text("new")
            (new / "onnx").mkdir()
            for name in ("router.onnx", "subnet0.onnx", "gallery.npz", "identifier.json"):
                (new / "onnx" / name).write_text("new")
    assert (out / deploy.UPDATE).is_dir()
    with open(out / fio.LOCK, "a") as held:  # another command is moving the files
        fcntl.flock(held, fcntl.LOCK_EX)
        waiting = threading.Thread(target=deploy.finish_update, args=(out,))
        waiting.start()
        waiting.join(0.5)
        assert waiting.is_alive() and (out / "onnx" / "identifier.json").read_text() == "old"
        fcntl.flock(held, fcntl.LOCK_UN)
    waiting.join(10)
    assert not waiting.is_alive() and not (out / deploy.UPDATE).exists()
    assert {p.name: p.read_text() for p in (out / "onnx").iterdir()} == dict.fromkeys(
        ("router.onnx", "subnet0.onnx", "gallery.npz", "identifier.json"), "new"
    )
    deploy.finish_update(out)  # nothing pending: nothing to do


def test_an_update_that_cannot_lock_still_lands_and_one_stopped_waiting_leaves_nothing(
    tmp_path, monkeypatch, caplog
):
    # a file system without flock (Lustre -o noflock, some NFS) failed every export and
    # enrolment; a Ctrl-C while waiting for the lock left the written update in OUT
    import errno
    import fcntl

    def no_flock(fd, operation):
        raise OSError(errno.ENOSYS, "Function not implemented")

    out = tmp_path / "export"
    _old_export(out)
    with monkeypatch.context() as patch:
        patch.setattr(fcntl, "flock", no_flock)
        with deploy._updating(out, replace_onnx=False) as new:
            (new / "identifier.pt").write_text("new")
    assert (out / "identifier.pt").read_text() == "new" and "cannot lock" in caplog.text

    # opened read-only (another user's lock file): still unlocked on such a file system,
    # refused on NFS (EBADF: it locks only a file open for writing)
    def nfs(fd, operation):
        raise OSError(errno.EBADF, "Bad file descriptor")

    with monkeypatch.context() as patch:
        patch.setattr(fio, "_read_only", lambda fd: True)
        patch.setattr(fcntl, "flock", no_flock)
        with fio.folder_lock(out, "the export"):
            pass
        patch.setattr(fcntl, "flock", nfs)
        with pytest.raises(PermissionError, match="make it writable"):
            with fio.folder_lock(out, "the export"):
                pass

    def interrupted(fd, operation):
        raise KeyboardInterrupt

    fresh = tmp_path / "fresh"
    with monkeypatch.context() as patch:
        patch.setattr(fcntl, "flock", interrupted)
        with pytest.raises(KeyboardInterrupt), deploy._updating(fresh, replace_onnx=True) as new:
            (new / "identifier.pt").write_text("new")
    assert not fresh.exists()


def test_an_update_keeps_what_other_commands_write_and_hold(tmp_path):
    # an update starting removed every other update folder, the one another command
    # was writing too; and a failed update of a new OUT removed the lock file another
    # command held, so a third could take "the" lock beside it
    import fcntl

    out = tmp_path / "export"
    killed = out / f"{deploy.UPDATE}.1-deadbeef.tmp"  # a container's entrypoint, killed
    killed.mkdir(parents=True)
    with pytest.raises(RuntimeError), deploy._updating(out, replace_onnx=True) as first:
        with deploy._updating(out, replace_onnx=True) as second:
            (second / "identifier.pt").write_text("second")
        assert first.is_dir()  # being written by a live process: kept
        with open(out / fio.LOCK) as held:
            fcntl.flock(held, fcntl.LOCK_EX)  # another command holds the lock
            raise RuntimeError("the first export fails")
    assert (out / fio.LOCK).is_file() and (out / "identifier.pt").read_text() == "second"
    assert not killed.exists()
    if (out.stat().st_mode & 0o020) == 0:  # the lock file is as writable as its folder
        out.chmod(out.stat().st_mode | 0o020)
        (out / fio.LOCK).unlink()
        with fio.folder_lock(out, "the export"):
            assert (out / fio.LOCK).stat().st_mode & 0o020


def test_an_update_lands_on_a_file_system_without_hard_links(tmp_path, monkeypatch):
    # an export's files move into place by hard links; where the file system has none
    # (FAT, exFAT, some network shares: EPERM), they are copied, and the update lands
    import errno

    def no_links(source, target):
        raise OSError(errno.EPERM, "Operation not permitted", str(source))

    monkeypatch.setattr(deploy.os, "link", no_links)
    out = tmp_path / "export"
    with deploy._updating(out, replace_onnx=True) as update:
        (update / "identifier.pt").write_text("first")
        (update / "onnx").mkdir()
        (update / "onnx" / "identifier.json").write_text("{}")
    assert (out / "identifier.pt").read_text() == "first"
    assert (out / "onnx" / "identifier.json").read_text() == "{}"
    assert not list(out.glob(f"{deploy.UPDATE}*")), "the update folder is left behind"


def _small_export(out: Path, names: list[str] | None = None) -> list[str]:
    """A loadable export of 6 identities (``names``, by default id0..id5) in 2 clusters
    (tiny random networks, 16 px), ``identifier.pt`` and the ONNX gallery (``onnx/``:
    what an enrolment rewrites; no networks), made in a moment; returns its identity
    names."""
    import dataclasses

    from facecluster.clustering import ClusterAssignment
    from facecluster.config import RouteConfig
    from facecluster.inference.onnx import write_gallery
    from facecluster.models.components.backbones import create_backbone

    torch.manual_seed(0)
    args = {"name": "tiny", "embedding_dim": 8, "image_size": 16, "width": 2}
    means = F.normalize(torch.randn(6, 8), dim=1)
    assignment = ClusterAssignment.from_labels(torch.tensor([0, 1] * 3), means, "kmeans")
    names = names or [f"id{i}" for i in range(6)]
    identifier = TwoStageIdentifier(
        args,
        create_backbone(**args),
        [create_backbone(**args) for _ in range(2)],
        [means[assignment.classes_of(k)] for k in range(2)],
        assignment,
        names,
        dataclasses.asdict(RouteConfig(decision="linear")),
    )
    identifier.export(out / "identifier.pt")
    write_gallery(identifier, out / "onnx")
    return names


def _enrolled(out: Path) -> tuple[list[str], list[str]]:
    """The identity names of ``out``'s identifier.pt and of its ONNX gallery."""
    gallery = json.loads((out / "onnx" / "identifier.json").read_text())["class_names"]
    return load_export(out, "torch", "cpu").class_names, gallery


def _people(tmp_path: Path, *names: str) -> dict[str, Path]:
    """A folder to enrol per name: one sub-folder, the name's, of two demo faces."""
    folders = {}
    for name, source in zip(names, sorted(DEMO.iterdir()), strict=False):
        folders[name] = tmp_path / name
        (folders[name] / name).mkdir(parents=True)
        for path in sorted(source.glob("*.jpg"))[:2]:
            shutil.copy(path, folders[name] / name / path.name)
    return folders


@pytest.mark.parametrize("meanwhile", ["enroll", "export"])
def test_an_enrolment_never_undoes_what_another_command_wrote_meanwhile(
    tmp_path, monkeypatch, meanwhile
):
    # an enrolment read the export, added its people and committed the whole gallery:
    # made from the export before another command's update (an enrolment, an export)
    # that committed while it ran, it undid that update without a word. It is refused
    # now, nothing written, and runs again on what the other command wrote.
    out = tmp_path / "export"
    base = _small_export(out)
    people = _people(tmp_path, "Ann", "Bob")
    real, other = TwoStageIdentifier.enroll, []

    def another_command_meanwhile(self, faces, batch_size=64):
        clusters = real(self, faces, batch_size)  # Ann's: the export read, embedded
        if not other:  # another command runs, start to end, before Ann's commits
            other.append(meanwhile)
            if meanwhile == "enroll":
                other.append(enroll_folder(out, people["Bob"]))
            else:  # what export_run commits: another identifier, written whole
                with deploy._updating(out, replace_onnx=True) as new:
                    other.append(_small_export(new))
        return clusters

    with monkeypatch.context() as patch:
        patch.setattr(TwoStageIdentifier, "enroll", another_command_meanwhile)
        message = (
            f"{out} was changed by another command (enroll or export) while this one ran: "
            "nothing was written, run it again"
        )
        with pytest.raises(deploy.ExportChangedError, match=re.escape(message)):
            enroll_folder(out, people["Ann"])
    kept = base + ["Bob"] if meanwhile == "enroll" else base  # the other command's
    assert list(other[1]) == (["Bob"] if meanwhile == "enroll" else base)  # it ran through
    assert _enrolled(out) == (kept, kept)
    assert not list(out.glob(f"{deploy.UPDATE}*"))  # Ann's update removed
    assert cli.main(["enroll", str(out), str(people["Ann"])]) == 0  # and run again
    assert _enrolled(out) == (kept + ["Ann"], kept + ["Ann"])


def test_an_update_left_committed_is_completed_not_taken_for_another_commands(
    tmp_path, monkeypatch
):
    # an enrolment killed after its commit: the next one puts it in place and adds its own
    out = tmp_path / "export"
    base = _small_export(out)
    people = _people(tmp_path, "Ann", "Bob")
    with monkeypatch.context() as patch:
        patch.setattr(deploy, "_finish_locked", lambda out: None)
        enroll_folder(out, people["Ann"])
    gallery = json.loads((out / "onnx" / "identifier.json").read_text())["class_names"]
    assert (out / deploy.UPDATE).is_dir() and gallery == base  # not in place yet
    enroll_folder(out, people["Bob"])
    assert _enrolled(out) == (base + ["Ann", "Bob"], base + ["Ann", "Bob"])
    assert not list(out.glob(f"{deploy.UPDATE}*"))


def test_a_file_put_in_onnx_while_the_networks_export_is_kept(tmp_path):
    # onnx/ was checked for files of the user's before the networks exported (minutes
    # at K=64), and its listing taken after: a file that came meanwhile was deleted
    out = tmp_path / "export"
    _old_export(out)
    with pytest.raises(ValueError, match=r"holds files an ONNX export does not write \(NOTES"):
        with deploy._updating(out, replace_onnx=True) as new:
            (new / "onnx").mkdir()
            (new / "onnx" / "identifier.json").write_text("new")
            (out / "onnx" / "NOTES.txt").write_text("mine")
    assert (out / "onnx" / "NOTES.txt").read_text() == "mine"
    assert (out / "onnx" / "identifier.json").read_text() == "old"
    assert not list(out.glob(".facecluster-update*"))


@pytest.mark.slow
def test_open_set_and_enrolment_benchmarks_run(open_run, exported, tmp_path, capsys):
    # docs/DEPLOYMENT.md's and docs/EVALUATION.md's measurement commands, at test size
    # (in this process: their scripts' main(), not a fresh interpreter each)
    out = tmp_path / "open_set.json"
    run_script(
        "bench/open_set.py", "--run", str(open_run), "--export", str(exported), "--out", str(out)
    )
    measured = json.loads(out.read_text())
    assert measured["nonmated_test_faces"] > 0 and 0 <= measured["fpir"] <= 1
    faces = measured["nonmated_test_faces"]  # a count over them, not a float32 mean
    assert measured["fpir"] == round(measured["fpir"] * faces) / faces
    assert measured["named_right"] + measured["named_wrong"] + measured["unknown"] == pytest.approx(
        1
    )
    full = train(
        load_config(SMOKE, smoke_overrides(tmp_path, "logger=csv", "run_name=all"))
    ).run_dir
    out = tmp_path / "enrollment.json"
    run_script(
        "bench/enrollment.py", "--enrolled", str(open_run), "--full", str(full), "--out", str(out)
    )
    measured = json.loads(out.read_text())
    assert measured["identities_enrolled"] == 3 and measured["test_images_enrolled_identities"] > 0
    assert 0 <= measured["top1_enrolled"] <= 1 and 0 <= measured["top1_trained_from_start"] <= 1
    assert 0 <= measured["top1_others_before_enrolment"] <= 1
    # runs that do not belong together, refused in one line before any work: a
    # traceback after the known faces' pass, or figures of nothing (exit 0)
    export_run(full, tmp_path / "full-export")
    for script, args, said in (
        ("open_set", ["--run", full, "--export", exported], "holds no identity out of"),
        ("open_set", ["--run", open_run, "--export", tmp_path / "full-export"], "is not an ex"),
        ("enrollment", ["--enrolled", full, "--full", open_run], "holds no identity out of"),
        ("enrollment", ["--enrolled", open_run, "--full", open_run], "did not train 3 of the"),
    ):
        with pytest.raises(SystemExit) as stop:
            run_script(f"bench/{script}.py", *map(str, args), "--out", str(tmp_path / "no.json"))
        assert stop.value.code == 2 and said in capsys.readouterr().err
    assert not (tmp_path / "no.json").exists()


def test_load_plain_tells_damaged_files_from_unsafe_ones(tmp_path):
    from facecluster.io import UnsafeFileError, load_plain

    (tmp_path / "text.pt").write_text("hello world, not a checkpoint")
    (tmp_path / "noise.pt").write_bytes(bytes(range(7, 107)))
    for name in ("text.pt", "noise.pt"):
        with pytest.raises(ValueError, match=rf"{name} \(export\) cannot be read") as error:
            load_plain(tmp_path / name, what="export")
        assert not isinstance(error.value, UnsafeFileError)
    with pytest.raises(FileNotFoundError, match="missing.pt"):
        load_plain(tmp_path / "missing.pt")
    # evaluate.py's check of every run= first agrees with load_plain: the damaged files
    # refused, torch's legacy (pickle) format passed on to it (a review)
    from facecluster.io import check_archive

    for name in ("text.pt", "noise.pt"):
        with pytest.raises(ValueError, match=rf"{name} \(export\) cannot be read"):
            check_archive(tmp_path / name, "export")
    torch.save({"a": torch.ones(2)}, tmp_path / "old.pt", _use_new_zipfile_serialization=False)
    check_archive(tmp_path / "old.pt")
    assert torch.equal(load_plain(tmp_path / "old.pt")["a"], torch.ones(2))
    torch.save({"weights": torch.ones(2), "name": "a"}, tmp_path / "plain.pt")
    assert load_plain(tmp_path / "plain.pt")["name"] == "a"


def test_the_onnx_runtime_of_an_export_without_onnx_says_how_to_add_it(tmp_path):
    # it said onnx/identifier.json does not exist, "not a finished ONNX export", as if
    # the export were damaged (a review)
    _small_export(tmp_path)
    shutil.rmtree(tmp_path / "onnx")  # as `facecluster export RUN OUT` writes it
    with pytest.raises(FileNotFoundError, match=r"was exported without --onnx \(no onnx/\)"):
        load_export(tmp_path, "onnx", "cpu")
    assert load_export(tmp_path, "auto", "cpu").class_names  # torch's, as before


def test_a_damaged_onnx_export_is_named(tmp_path):
    # a bad identifier.json or gallery.npz ended in a bare JSON error or a traceback
    from facecluster.inference.onnx import ONNX_FORMAT, ONNX_VERSION, load_onnx

    (tmp_path / "identifier.json").write_text("{\n")
    with pytest.raises(ValueError, match=r"identifier.json is not valid JSON"):
        load_onnx(tmp_path)
    (tmp_path / "identifier.json").write_text("[1, 2]")
    with pytest.raises(ValueError, match=r"identifier.json: not a facecluster ONNX export"):
        load_onnx(tmp_path)
    meta = {"format": ONNX_FORMAT, "version": ONNX_VERSION + 1, "facecluster": "9.1"}
    (tmp_path / "identifier.json").write_text(json.dumps(meta))  # a later release's
    with pytest.raises(ValueError, match=r"json: a facecluster ONNX export of format 3, made "
                       r"by facecluster 9.1; .* reads formats up to 2"):  # fmt: skip
        load_onnx(tmp_path)  # "not a facecluster ONNX export", as if another file
    meta = {"format": ONNX_FORMAT, "version": ONNX_VERSION, "num_clusters": 2}
    (tmp_path / "identifier.json").write_text(json.dumps(meta))  # its other keys missing
    with pytest.raises(ValueError, match=r"identifier.json: class_names is not a list of"):
        load_onnx(tmp_path)
    meta |= {"class_names": ["a", "b"], "assignment": {}, "route": {}}
    meta["backbone"] = {"name": "tiny", "image_size": 16, "embedding_dim": 8}
    (tmp_path / "identifier.json").write_text(json.dumps(meta))
    (tmp_path / "gallery.npz").write_bytes(b"PK\x03\x04 cut short")
    with pytest.raises(ValueError, match=r"gallery.npz cannot be read"):
        load_onnx(tmp_path)


def _torch_payload(change):
    """A change to the small export's identifier.pt, through its payload."""

    def damage(out: Path) -> None:
        payload = torch.load(out / "identifier.pt", weights_only=True)
        change(payload)
        torch.save(payload, out / "identifier.pt")

    return damage


def _onnx_meta(change):
    """A change to the small export's onnx/identifier.json (identifier.pt removed: both
    commands then read onnx/)."""

    def damage(out: Path) -> None:
        (out / "identifier.pt").unlink()
        path = out / "onnx" / "identifier.json"
        path.write_text(change(json.loads(path.read_text())))

    return damage


def _onnx_gallery(change):
    """A change to the bytes of the small export's onnx/gallery.npz (identifier.pt
    removed)."""

    def damage(out: Path) -> None:
        (out / "identifier.pt").unlink()
        path = out / "onnx" / "gallery.npz"
        data = bytearray(path.read_bytes())
        change(data)
        path.write_bytes(bytes(data))

    return damage


def _flip_npy_header(data: bytearray) -> None:
    data[data.index(b"{'descr'")] = ord("z")  # a member's .npy header: one byte


def _unknown_compression(data: bytearray) -> None:
    data[data.index(b"PK\x01\x02") + 10] = 77  # a member's compression method field


def _set(key, value):
    return lambda payload: payload.__setitem__(key, value)


def _set_in(key, inner, value):
    return lambda payload: payload[key].__setitem__(inner, value)


DAMAGED_EXPORTS = {  # a fuzzing review's findings, each a traceback before
    "gallery member's header": (
        _onnx_gallery(_flip_npy_header),
        r"onnx/gallery.npz cannot be read \(\w+: .*\): a damaged export\?",  # TokenError
    ),
    "gallery compression method": (
        _onnx_gallery(_unknown_compression),
        r"onnx/gallery.npz cannot be read \(NotImplementedError: That compression method is "
        r"not supported\): a damaged export\?",
    ),
    "num_clusters past the identities": (  # it ran out of memory
        _onnx_meta(lambda meta: json.dumps({**meta, "num_clusters": 10**10})),
        r"onnx/identifier.json: num_clusters is 10000000000, more than its 6 identities: a "
        r"damaged export\?",
    ),
    "JSON nested too deep": (
        _onnx_meta(lambda meta: "[" * 100_000),
        r"onnx/identifier.json is not valid JSON \(maximum recursion depth exceeded.*\): a "
        r"damaged export\?",
    ),
    **{
        f"no {key}": (
            _torch_payload(lambda payload, key=key: payload.pop(key)),
            rf"identifier.pt: {key} is missing: the file is damaged; export the run again",
        )
        for key in ("heads", "route", "subnets", "class_names")
    },
    "no backbone": (
        _torch_payload(lambda payload: payload.pop("backbone")),
        r"identifier.pt: backbone is None, not the backbone's arguments: the file is damaged",
    ),
    "route a number": (
        _torch_payload(_set("route", 5)),
        r"identifier.pt: route is not a mapping of route settings: the file is damaged",
    ),
    "sub-net no state dict": (
        _torch_payload(_set_in("subnets", 0, "x")),
        r"identifier.pt: subnets is not a list of state dicts: the file is damaged",
    ),
    "backbone name a number": (
        _torch_payload(_set_in("backbone", "name", 2)),
        r"identifier.pt: backbone.name is 2, not a backbone's name: the file is damaged",
    ),
    "head a float": (
        _torch_payload(_set_in("heads", 0, 1.5)),
        r"identifier.pt: heads \[0\] are not tensors of head rows as wide as the class means",
    ),
    "head of another width": (  # a traceback at the first face
        _torch_payload(_set_in("heads", 1, torch.zeros(3, 5))),
        r"identifier.pt: heads \[1\] are not tensors of head rows as wide as the class means",
    ),
    "shared_layers text": (
        _torch_payload(_set("shared_layers", "x")),
        r"identifier.pt: shared_layers is not a number of stages: the file is damaged",
    ),
    # one 64 KB text referenced 200 times (the pickle memo): a 131 MB error line at 2,000
    "backbone a huge list": (
        _torch_payload(_set("backbone", ["x" * 65536] * 200)),
        r"identifier.pt: backbone is \['xxx.{1,40}, not the backbone's arguments: the file is",
    ),
}


@pytest.mark.parametrize("command", ["identify", "enroll"])
@pytest.mark.parametrize("case", sorted(DAMAGED_EXPORTS))
def test_a_damaged_export_file_is_named_in_one_line_before_any_output(
    tmp_path, capsys, command, case
):
    # a fuzzing review: each of these ended identify and enroll in a traceback
    damage, named = DAMAGED_EXPORTS[case]
    out = tmp_path / "export"
    out.mkdir()
    _small_export(out)
    damage(out)
    before = _contents(out)
    csv_path = tmp_path / "who.csv"
    if command == "identify":
        face = str(next(DEMO.rglob("*.jpg")))
        args = ["identify", str(out), face, "--out", str(csv_path), "--device", "cpu"]
    else:
        args = ["enroll", str(out), str(_people(tmp_path, "newcomer")["newcomer"])]
    assert cli.main(args) == 2
    err = capsys.readouterr().err
    assert re.fullmatch(rf"error: (export )?{re.escape(str(out))}/{named}.*\n", err), err[:500]
    assert len(err) < 1000 and not csv_path.exists() and _contents(out) == before


@pytest.mark.parametrize("key", ["top_m", "alpha", "neighbours"])
def test_an_exports_route_without_a_setting_takes_its_default(tmp_path, monkeypatch, key):
    # route_problems says missing settings take their defaults, but the identifier kept
    # the route as it was: a KeyError at the first face (top_m, alpha) or at the load
    # (neighbours), in identifier.pt and onnx/identifier.json alike. Every export held
    # them; a file without one is damaged or hand-written, and loads as the docs say
    from facecluster.config import RouteConfig
    from facecluster.inference import onnx as onnx_module
    from facecluster.models.components.backbones import create_backbone

    out = tmp_path / "export"
    out.mkdir()
    _small_export(out)
    default = getattr(RouteConfig(), key)
    payload = torch.load(out / "identifier.pt", weights_only=True)
    del payload["route"][key]
    torch.save(payload, out / "identifier.pt")
    csv_path = tmp_path / "who.csv"
    face = str(next(DEMO.rglob("*.jpg")))
    assert cli.main(["identify", str(out), face, "--out", str(csv_path), "--device", "cpu"]) == 0
    assert len(list(csv.DictReader(csv_path.open()))) == 1
    assert TwoStageIdentifier.load(out / "identifier.pt").route_config[key] == default
    meta_path = out / "onnx" / "identifier.json"
    meta = json.loads(meta_path.read_text())
    del meta["route"][key]
    meta_path.write_text(json.dumps(meta))

    def stand_in(path, device):  # the export's tiny networks, for ONNX sessions
        network = create_backbone(**meta["backbone"]).eval()
        network.image_size = None
        return network

    monkeypatch.setattr(onnx_module, "OnnxBackbone", stand_in)
    loaded = onnx_module.load_onnx(out / "onnx")
    assert loaded.route_config[key] == default
    assert len(loaded.identify(torch.randn(2, 3, 16, 16)).identity) == 2


def _weights_file(name: str, change):
    """A change to a run's weights file ``name`` (sub-net 0's ``{"backbone", "head"}``,
    stage 1's Lightning checkpoint)."""

    def damage(run: Path) -> None:
        path = run / name
        saved = torch.load(path, weights_only=True)
        change(saved)
        torch.save(saved, path)

    return damage


def _subnet_file(change):
    return _weights_file("stage2/subnets/subnet0.pt", change)


def _stage1_file(change):
    return _weights_file("stage1/checkpoints/last.ckpt", change)


DAMAGED_RUN_FILES = {  # a fuzzing review's findings, each a traceback before
    **{
        f"{name} nested too deep": (
            lambda run, name=name: (run / name).write_text("[" * 100_000),
            rf"{name} cannot be read \(RecursionError: maximum recursion depth exceeded.*\): "
            "the run folder is damaged; restore the file from a copy of the run",
        )
        for name in ("class_names.json", "split.json")
    },
    **{
        f"a name that is {entry}": (
            lambda run, entry=entry: (run / "class_names.json").write_text(f'["a", {entry}]'),
            rf"class_names.json cannot be read \(its entry {re.escape(entry)} is not text\): "
            "the run folder is damaged",
        )
        for entry in ("null", "5", "true", '["a"]', '{"a": 1}')
    },
    **{
        f"a sub-net without its {key}": (
            _subnet_file(lambda saved, key=key: saved.pop(key)),
            rf"subnet0.pt \(sub-net 0\) cannot be read \(it has no '{key}'\): the run folder is "
            r"damaged; restore it from a copy of the run, or train it again: `.* resume=.* "
            r'"stage2.subnets=\[0\]"`',
        )
        for key in ("backbone", "head")
    },
    "a sub-net's backbone no state dict": (
        _subnet_file(lambda saved: saved.__setitem__("backbone", "x")),
        r"subnet0.pt \(sub-net 0\) cannot be read \(its 'backbone' is not a state dict\)",
    ),
    "a sub-net's head no tensor": (
        _subnet_file(lambda saved: saved.__setitem__("head", [1.5])),
        r"subnet0.pt \(sub-net 0\) cannot be read \(its 'head' is not a tensor of head rows\)",
    ),
    **{  # stage 1's checkpoint, read but lacking what the stage saves: a KeyError before
        f"a stage-1 checkpoint without {what}": (
            _stage1_file(change),
            rf"last.ckpt \(stage-1 checkpoint\) cannot be read \({said}\): the run folder "
            "is damaged; restore it from a copy of the run",
        )
        for what, change, said in (
            ("its state dict", lambda saved: saved.pop("state_dict"), "it has no state dict"),
            (
                "its head",
                lambda saved: saved["state_dict"].pop("head.weight"),
                "its state dict lacks 'head.weight'",
            ),
        )
    },
}


@pytest.mark.slow
@pytest.mark.parametrize("case", sorted(DAMAGED_RUN_FILES))
def test_a_damaged_run_file_stops_export_and_evaluate_in_one_line(open_run, tmp_path, capsys, case):
    # a fuzzing review: each of these ended `facecluster export` and `evaluate.py run=` in
    # a traceback (RecursionError, AttributeError, TypeError, KeyError)
    damage, named = DAMAGED_RUN_FILES[case]
    run = shutil.copytree(open_run, tmp_path / "run")
    damage(run)
    before = _contents(run)
    out = tmp_path / "export"
    assert cli.main(["export", str(run), str(out)]) == 2
    err = capsys.readouterr().err
    assert re.fullmatch(rf"error: {re.escape(str(run))}/.*{named}.*\n", err), err
    assert not (out / "identifier.pt").exists()
    assert cli.evaluate_main([f"run={run}", "eval.plots=false"]) == 2
    err = capsys.readouterr().err
    assert re.fullmatch(
        rf"error: (run={re.escape(str(run))}: )?{re.escape(str(run))}/.*{named}.*\n", err
    ), err
    assert _contents(run) == before  # no table written


@pytest.mark.parametrize(
    ("args", "said"),
    [  # a fuzzing review of the commands' arguments: each a traceback, or work done
        (["identify", str(DEMO), "~nouser/x", "--out", "o.csv"], "no user 'nouser'"),
        (["enroll", "~nouser/x", "new"], "no user 'nouser'"),
        (["export", "~nouser/x", "out"], "no user 'nouser'"),
        (["pack", "~nouser/x", "out"], "SRC ~nouser/x: this machine has no user 'nouser'"),
        (["evaluate", "run=~nouser/x"], "run=~nouser/x: this machine has no user"),
        (["train", "-c", "~nouser/x"], "-c ~nouser/x: this machine has no user"),
        (["train", "resume=~nouser/x"], "resume=~nouser/x: this machine has no user"),
        # a blank path was the working dir: identified, enrolled or packed into whole
        (["identify", str(DEMO), "", "--out", "o.csv"], "'' names no file or folder"),
        (["enroll", str(DEMO), ""], "'' names no file or folder"),
        (["pack", str(DEMO), ""], "OUT '' names no folder"),
        # found after the scan, or after the work, naming no option
        (["pack", str(DEMO), "afile/sub"], "OUT afile/sub cannot be made: afile is a file"),
        (["identify", str(DEMO), str(DEMO), "--out", "afile/o.csv"], "--out afile/o.csv: cannot"),
        # 1/fpir unseen faces overflowed: a traceback once the passes were done
        (["export", "run", "out", "--fpir", "1e-320"], "give 0 .* or at least 1e-12"),
    ],
)
def test_command_arguments_are_refused_in_one_line_before_any_work(
    tmp_path, monkeypatch, capsys, args, said
):
    monkeypatch.chdir(tmp_path)
    (tmp_path / "afile").write_text("mine")
    try:
        code = cli.main(args)
    except SystemExit as e:  # argparse's own error: --out, --fpir
        code = e.code
    assert code == 2
    err = capsys.readouterr().err
    assert re.search(said, err) and "Traceback" not in err, err
    assert sorted(p.name for p in tmp_path.iterdir()) == ["afile"]  # nothing written


def test_a_device_name_torch_does_not_know_is_refused_naming_it(open_run, tmp_path, capsys):
    # --device of export, identify and enroll: a clear error, not torch's traceback
    from facecluster import cli
    from facecluster.deploy import resolve_device

    with pytest.raises(ValueError, match=r"device 'gpu0': use auto, cpu, cuda or cuda:N"):
        resolve_device("gpu0")
    assert cli.export_main([str(open_run), str(tmp_path / "out"), "--device", "gpu0"]) != 0
    assert "device 'gpu0'" in capsys.readouterr().err
    assert not (tmp_path / "out").exists()  # refused before any work
    with pytest.raises(SystemExit) as exit_:  # "": the working directory, silently
        cli.export_main([str(open_run), " "])
    assert exit_.value.code == 2 and "OUT names no folder" in capsys.readouterr().err


@pytest.mark.parametrize("value", ["nan", "inf", "-inf", "5", "-1.5"])
def test_identify_refuses_a_threshold_that_is_not_a_similarity(
    value, tmp_path, monkeypatch, capsys
):
    # --threshold nan (or 5, above any cosine) answered unknown for every face, with
    # exit 0 (export --fpir nan was refused)
    monkeypatch.setattr(deploy, "identify_files", lambda *a, **k: pytest.fail("identified"))
    with pytest.raises(SystemExit) as exit_:
        cli.identify_main([str(tmp_path), "a.jpg", f"--threshold={value}", "--device", "cpu"])
    assert exit_.value.code == 2
    err = capsys.readouterr().err
    assert f"--threshold must be a similarity in [-1, 1], got {float(value)}" in err


@pytest.mark.slow
def test_identify_on_onnx_without_onnxruntime_is_refused_before_the_export_is_read(
    exported, tmp_path, monkeypatch, capsys
):
    # a missing onnxruntime was found when the first network's session was built, after
    # gallery.npz (gigabytes of arrays at 2M identities) had been read in full
    import numpy as np

    monkeypatch.setitem(sys.modules, "onnxruntime", None)  # `import onnxruntime` fails
    read, real_load = [], np.load
    monkeypatch.setattr(np, "load", lambda *a, **k: read.append(a[0]) or real_load(*a, **k))
    face, out = next(DEMO.rglob("*.jpg")), tmp_path / "who.csv"
    argv = ["identify", str(exported), str(face), "--runtime", "onnx", "--out", str(out)]
    assert cli.main(argv) == 2
    error = capsys.readouterr().err
    assert "the 'onnxruntime' package: pip install 'facecluster[onnx]'" in error
    assert read == [] and not out.exists()  # nothing of the export read, no CSV


@pytest.mark.slow
def test_export_never_deletes_an_onnx_folder_it_did_not_write(open_run, exported, tmp_path):
    # OUT/onnx is replaced by each export: a folder of the user's there, a link (whose
    # networks, another run's, were left beside the new identifier.pt) or OUT being a
    # file are refused before any work, naming them, and nothing is changed
    mine = tmp_path / "mine"
    (mine / "onnx").mkdir(parents=True)
    (mine / "onnx" / "notes.txt").write_text("keep me")
    with pytest.raises(
        ValueError, match=r"onnx holds files an ONNX export does not write \(notes.txt\)"
    ):
        export_run(open_run, mine)
    assert (mine / "onnx" / "notes.txt").read_text() == "keep me" and not (
        mine / "identifier.pt"
    ).exists()
    linked = tmp_path / "linked"
    linked.mkdir()
    (linked / "onnx").symlink_to(exported / "onnx")
    with pytest.raises(ValueError, match=r"onnx is a link"):
        export_run(open_run, linked)
    assert (exported / "onnx" / "identifier.json").is_file()
    (tmp_path / "file").write_text("")
    assert cli.export_main([str(open_run), str(tmp_path / "file")]) == 2
    # a training run's folder (another run's, or its own): identify would then answer
    # with this run's model when given that run
    for run in (open_run, exported.parent / "other-run"):
        if not (run / "config.yaml").is_file():  # the open run's own is left as it is
            run.mkdir()
            (run / "config.yaml").write_text("")
        with pytest.raises(ValueError, match=r"is a training run folder \(it holds config.yaml\)"):
            export_run(open_run, run)
        assert not (run / "identifier.pt").exists()
    # a folder inside the run's data.root: the next scan read it as an identity's
    inside = DEMO / "exports" / "demo"
    try:
        with pytest.raises(ValueError, match=r"is inside the run's data.root \("):
            export_run(open_run, inside)
        assert not (DEMO / "exports").exists()
        (tmp_path / "faces").symlink_to(DEMO)  # the same folder through a link
        with pytest.raises(ValueError, match=r"is inside the run's data.root \("):
            export_run(open_run, tmp_path / "faces" / "exports")
        assert not (DEMO / "exports").exists()
    finally:
        shutil.rmtree(DEMO / "exports", ignore_errors=True)
    # an earlier export of a run (what the folder holds, and its temporary files) is replaced
    again = tmp_path / "again"
    shutil.copytree(exported, again)
    (again / "onnx" / ".gallery.npz.123-abc.tmp.npz").write_bytes(b"")
    assert (
        export_run(open_run, again) == [again / "identifier.pt", again / "backbone.pth"]
        and not (again / "onnx").exists()
    )


def test_enrol_names_the_empty_image_files_it_leaves_out(tmp_path, caplog):
    # a zero-byte photo was left out without a word, where a file it cannot decode is
    # named (identify and training name both)
    _small_export(tmp_path / "export")
    person = tmp_path / "people" / "Zed"
    person.mkdir(parents=True)
    for i in range(2):
        Image.fromarray(np.full((16, 16, 3), 60 * i, np.uint8)).save(person / f"{i}.jpg")
    (person / "zero.jpg").write_bytes(b"")
    with caplog.at_level(logging.WARNING, logger="facecluster.deploy"):
        assert list(enroll_folder(tmp_path / "export", tmp_path / "people")) == ["Zed"]
    warned = [r.getMessage() for r in caplog.records if "zero.jpg" in r.getMessage()]
    assert warned == [f"cannot decode {person / 'zero.jpg'} (an empty file, zero bytes): left out"]
    # a person with nothing but empty files is refused, as one whose files cannot be
    # decoded is (dropped with a warning, the others were enrolled without them)
    (tmp_path / "people" / "Zed").rename(tmp_path / "people" / "Ann")
    (tmp_path / "people" / "Bo").mkdir()
    (tmp_path / "people" / "Bo" / "0.jpg").write_bytes(b"")
    before = (tmp_path / "export" / "identifier.pt").read_bytes()
    caplog.clear()
    with (
        caplog.at_level(logging.WARNING),
        pytest.raises(ValueError, match=r"people/Bo: no decodable .*: its image files are empty"),
    ):
        enroll_folder(tmp_path / "export", tmp_path / "people")
    assert (tmp_path / "export" / "identifier.pt").read_bytes() == before
    # the scan's warning in enrolment's words (it named data.min_images_per_class=1)
    warned = " ".join(r.getMessage() for r in caplog.records)
    assert "Dropped 1 identity made only of zero-byte files: Bo" in warned
    # a person with no image file at all (an empty folder, photos of a type not read)
    # was skipped with a warning while the others were enrolled: a second enroll of the
    # folder, photos added, was then refused as "enrolled already"
    shutil.rmtree(tmp_path / "people" / "Bo")
    for files in ([], ["a.heic", "notes.txt"]):
        (tmp_path / "people" / "Cy").mkdir(exist_ok=True)
        for name in files:
            (tmp_path / "people" / "Cy" / name).write_bytes(b"x")
        with pytest.raises(ValueError, match=r"people/Cy: no decodable .*: no image file \("):
            enroll_folder(tmp_path / "export", tmp_path / "people")
        assert (tmp_path / "export" / "identifier.pt").read_bytes() == before
    # a zip made on macOS: __MACOSX/ of hidden ._* copies is no person (a review of the diff)
    shutil.rmtree(tmp_path / "people" / "Cy")
    (tmp_path / "people" / "__MACOSX" / "Ann").mkdir(parents=True)
    (tmp_path / "people" / "__MACOSX" / "Ann" / "._0.jpg").write_bytes(b"\0\5\26\7")
    assert list(enroll_folder(tmp_path / "export", tmp_path / "people")) == ["Ann"]
    assert "min_images_per_class" not in warned


@pytest.mark.slow
def test_identify_status_tells_an_identity_named_unknown_from_a_rejected_face(
    open_run, exported, tmp_path, capsys
):
    # the identity column's words "unknown" and "unreadable" are also possible names
    photos = tmp_path / "photos"
    shutil.copytree(DEMO / RunFolder(open_run).class_names()[0], photos)
    (photos / "broken.jpg").write_bytes(b"")
    out = tmp_path / "who.csv"
    command = [str(exported), str(photos), "--out", str(out), "--threshold", "-1.0"]
    assert cli.identify_main([*command, "--device", "cpu"]) == 0
    # the warning names the file and what it starts with on a line of its own (it showed
    # PIL's "<_io.BytesIO object at 0x...>", written onto the progress bar's line)
    warned = [line for line in capsys.readouterr().err.splitlines() if "broken.jpg" in line]
    assert len(warned) == 1 and warned[0].startswith("cannot decode "), warned
    assert "not an image format Pillow reads (it starts with b'')" in warned[0]
    assert "BytesIO" not in warned[0]
    answers = [r["identity"] for r in csv.DictReader(out.open(encoding="utf-8"))]
    named = max(set(answers) - {"unreadable"}, key=answers.count)  # its name becomes "unknown"
    renamed = tmp_path / "renamed"
    renamed.mkdir()
    payload = torch.load(exported / "identifier.pt", weights_only=True)
    names = unpack_names(payload["class_names"])
    names[names.index(named)] = "unknown"
    payload["class_names"] = pack_names(names)
    torch.save(payload, renamed / "identifier.pt")
    for threshold, status in ((-2.0, "known"), (2.0, "unknown")):
        identify_files(renamed, [photos], out, threshold=threshold, device="cpu")
        rows = {Path(r["path"]).name: r for r in csv.DictReader(out.open(encoding="utf-8"))}
        assert rows.pop("broken.jpg")["status"] == "unreadable"
        assert {r["status"] for r in rows.values()} == {status}
        assert any(r["identity"] == "unknown" for r in rows.values())


@pytest.mark.slow
def test_identify_searches_top_m_clusters_of_a_closed_set_export(open_run, exported, tmp_path):
    # a closed-set export (the run's, with no unknown threshold) has no threshold tied
    # to a top_m: --top-m 2 searches two clusters, and the API's top_m=2 writes the
    # same CSV. The top5 column shows it: one cluster's identities at top_m=1, five
    # from two clusters at top_m=2, not all from one where the first has fewer than 5
    closed = tmp_path / "closed"
    closed.mkdir()
    payload = torch.load(exported / "identifier.pt", weights_only=True)
    payload["open_set"] = None
    torch.save(payload, closed / "identifier.pt")
    ident = load_export(closed, "torch", "cpu")
    assert ident.open_set is None and ident.route_config["top_m"] == 1
    clusters = [set(ident.members(k).tolist()) for k in range(ident.num_clusters)]
    names = ident.class_names
    # someone whose clusters all hold fewer than 5 identities (faces routed there show
    # a second cluster's at top_m=2)
    person = next(i for i in range(len(names)) if all(len(c) < 5 for c in clusters if i in c))
    folder = DEMO / names[person]
    shown = {}
    for top_m in (1, 2):
        out = tmp_path / f"top{top_m}.csv"
        argv = ["identify", str(closed), str(folder), "--top-m", str(top_m), "--out", str(out)]
        assert cli.main(argv) == 0
        rows = list(csv.DictReader(out.open(encoding="utf-8")))
        assert len(rows) == len(list(folder.glob("*.jpg")))
        assert all(row["status"] == "known" for row in rows)
        shown[top_m] = [
            {names.index(pair.split(":")[0]) for pair in row["top5"].split(";")} for row in rows
        ]
        api = tmp_path / f"api{top_m}.csv"
        assert identify_files(closed, [folder], api, top_m=top_m) == len(rows)
        assert api.read_bytes() == out.read_bytes()
    assert all(any(ids <= c for c in clusters) for ids in shown[1])
    pairs = [a | b for i, a in enumerate(clusters) for b in clusters[i + 1 :]]
    spanned = 0
    for one, two in zip(shown[1], shown[2], strict=True):
        assert len(two) == 5 and any(two <= pair for pair in pairs), (two, clusters)
        if all(len(c) < 5 for c in clusters if one <= c):  # its cluster cannot fill 5
            assert not any(two <= c for c in clusters), (two, clusters)
            spanned += 1
    assert spanned, (shown, clusters)


@pytest.mark.slow
def test_identify_writes_the_same_csv_whatever_its_batch_size(open_run, exported, tmp_path):
    # --batch-size 1 (each image alone, the unreadable one a batch with no image) and
    # the default 64 (all in one batch) write the same rows: in the files' order, the
    # unreadable one in its place, every name and cluster as the default's, every score
    # to its printed 4 decimals' last digit (CPU kernels chosen by batch size round the
    # last bits apart: -1.3884 against -1.3885 once, on a CI machine)
    photos = tmp_path / "photos"
    shutil.copytree(DEMO / RunFolder(open_run).class_names()[0], photos)
    broken = photos / f"{sorted(photos.iterdir())[0].stem}_broken.jpg"  # second
    broken.write_bytes(b"not an image")
    files = sorted(photos.iterdir())
    assert 5 < len(files) < 64 and files.index(broken) == 1
    outs = {}
    for size in (None, 1):
        outs[size] = tmp_path / f"batch{size}.csv"
        extra = [] if size is None else ["--batch-size", str(size)]
        argv = ["identify", str(exported), str(photos), "--out", str(outs[size]), *extra]
        assert cli.main(argv) == 0
    rows = list(csv.DictReader(outs[None].open(encoding="utf-8")))
    assert [Path(row["path"]).name for row in rows] == [p.name for p in files]
    assert [row["status"] for row in rows].count("unreadable") == 1
    alone = list(csv.DictReader(outs[1].open(encoding="utf-8")))
    assert [row.keys() for row in alone] == [row.keys() for row in rows]

    def cells(row):  # text as it is, numbers apart: (texts, numbers)
        top5 = (row["top5"] or "").replace(";", ":").split(":")
        parts = [v for k, v in row.items() if k != "top5"] + top5
        numbers = [p for p in parts if re.fullmatch(r"-?\d+\.\d+", p)]
        return [p for p in parts if p not in numbers], [float(p) for p in numbers]

    for a, b in zip(alone, rows, strict=True):
        (texts_a, numbers_a), (texts_b, numbers_b) = cells(a), cells(b)
        assert texts_a == texts_b
        assert numbers_a == pytest.approx(numbers_b, abs=1.5e-4)  # as many, each close
    # numbers were compared: every readable face's score and similarity at least (its
    # top5 too, where it is known)
    read = [len(cells(row)[1]) for row in rows if row["status"] != "unreadable"]
    assert len(read) == len(rows) - 1 and min(read) >= 2


@pytest.mark.slow
def test_identify_reads_folders_as_training_does_and_names_its_mistakes(
    open_run, exported, tmp_path, capsys, monkeypatch
):
    # linked sub-folders are followed (os.walk did not: their images got no row), hidden
    # files (macOS's ._ copies) are not images; --out a folder, a run folder for an
    # export and a device this build does not serve are refused naming them
    photos = tmp_path / "photos"
    photos.mkdir()
    first, second = sorted(p.name for p in DEMO.iterdir())[:2]
    (photos / "linked").symlink_to(DEMO / first)
    (photos / "loop").symlink_to(photos)  # a link up the tree: each folder once
    shutil.copy(DEMO / second / f"{second}_0001.jpg", photos)
    (photos / f"._{second}_0001.jpg").write_bytes(b"\0\5\26\7 AppleDouble")
    out = tmp_path / "who.csv"
    rows = identify_files(exported, [photos], out, device="cpu")
    listed = [r["path"] for r in csv.DictReader(out.open(encoding="utf-8"))]
    assert rows == len(listed) == len(list((DEMO / first).glob("*.jpg"))) + 1
    assert not any(Path(p).name.startswith(".") for p in listed)
    assert cli.identify_main([str(exported), str(photos), "--out", str(tmp_path)]) == 2
    assert "is a folder: name the CSV file" in capsys.readouterr().err
    assert cli.identify_main([str(open_run), str(photos), "--out", str(out)]) == 2
    assert "is a training run folder, not an export" in capsys.readouterr().err
    # a folder of images as the export: it named onnx/identifier.json, as if the
    # export were half written (a review of the deploy side)
    not_an_export = f"{photos} holds neither identifier.pt nor onnx/: not a folder written"
    assert cli.identify_main([str(photos), str(photos), "--out", str(out)]) == 2
    assert not_an_export in capsys.readouterr().err
    assert cli.enroll_main([str(photos), str(photos)]) == 2
    assert not_an_export in capsys.readouterr().err
    # --out the export's own file, or an image to identify: they were replaced by the
    # CSV, exit 0 (a walkthrough)
    image = photos / f"{second}_0001.jpg"
    kept = {f: f.read_bytes() for f in (exported / "identifier.pt", image)}
    for wrong, why in (
        (exported / "identifier.pt", "is inside the export"),
        (exported / "new.csv", "is inside the export"),
        (image, "is one of the images to identify"),
    ):
        assert cli.identify_main([str(exported), str(photos), "--out", str(wrong)]) == 2
        assert why in capsys.readouterr().err, wrong
    assert all(f.read_bytes() == data for f, data in kept.items())
    assert not (exported / "new.csv").exists()
    with pytest.raises(ValueError, match=r"device 'mps': use auto, cpu, cuda"):
        identify_files(exported, [photos], out, device="mps")
    assert len(out.read_text(encoding="utf-8").splitlines()) == rows + 1  # the CSV as it was
    # --out a link: the file it names is rewritten, the link kept; a device is written
    # as it is (a temporary file beside /dev/null and a rename would replace it)
    link = tmp_path / "latest.csv"
    link.symlink_to(out)
    assert identify_files(exported, [photos / f"{second}_0001.jpg"], link, device="cpu") == 1
    assert link.is_symlink() and len(out.read_text(encoding="utf-8").splitlines()) == 2
    assert identify_files(exported, [photos / f"{second}_0001.jpg"], os.devnull, device="cpu") == 1
    assert Path(os.devnull).is_char_device()
    # the export named with ~, as the commands expand it (the --out check did not: a
    # FileNotFoundError once the model had loaded)
    monkeypatch.setenv("HOME", str(exported.parent))
    assert identify_files(f"~/{exported.name}", [image], out, device="cpu") == 1
    with pytest.raises(ValueError, match="is inside the export"):
        identify_files(f"~/{exported.name}", [image], exported / "new.csv", device="cpu")
    # /dev/stdout into a pipe (| cat): written through, not a temporary file in /proc
    command = ["facecluster", "identify", str(exported), str(photos / f"{second}_0001.jpg")]
    piped = _facecluster([*command, "--out", "/dev/stdout", "--device", "cpu"], tmp_path)
    assert piped.stdout.startswith("path,identity,score,similarity,cluster,top5,status\n")
    # the CSV alone: the status line, on stdout too, was read as a last row
    assert len(list(csv.reader(io.StringIO(piped.stdout)))) == 2, piped.stdout
    assert "wrote 1 rows to /dev/stdout" in piped.stderr


def test_identify_names_the_files_of_a_folder_it_leaves_out(tmp_path, caplog):
    # a folder's .tif, .gif and .jfif files got no row and no word (enroll, and training's
    # scan, warn about the files they leave out): one warning, their count and names
    _small_export(tmp_path / "export")
    photos = tmp_path / "photos"
    (photos / "more").mkdir(parents=True)
    face = next(DEMO.rglob("*.jpg"))
    shutil.copy(face, photos / "face.jpg")
    for name in ("scan.tif", "more/anim.gif", "more/photo.jfif"):
        shutil.copy(face, photos / name)
    out = tmp_path / "who.csv"
    with caplog.at_level("WARNING", logger="facecluster.deploy"):
        assert identify_files(tmp_path / "export", [photos], out, device="cpu") == 1
    warned = [r.getMessage() for r in caplog.records if "non-image" in r.getMessage()]
    assert len(warned) == 1, caplog.text
    assert f"{photos}: 3 non-image file(s) are ignored (images end in .jpg" in warned[0]
    for name in ("scan.tif", "anim.gif", "photo.jfif"):
        assert name in warned[0]
    assert [r["path"] for r in csv.DictReader(out.open(encoding="utf-8"))] == [
        str(photos / "face.jpg")
    ]
    # an image named and found in a folder named too got two rows
    assert identify_files(tmp_path / "export", [photos, photos / "face.jpg"], out) == 1


def test_identify_writes_a_face_the_model_cannot_embed_as_failed_naming_it(
    tmp_path, monkeypatch, caplog
):
    # an embedding of NaN (networks whose weights went non-finite, an input they cannot
    # embed) was routed to cluster 0: without a threshold the CSV named its best identity,
    # status known; here the export's router backbone gives NaN for an all-black image
    _small_export(tmp_path / "export")
    photos = tmp_path / "photos"
    photos.mkdir()
    shutil.copy(next(DEMO.rglob("*.jpg")), photos / "face.jpg")
    Image.new("RGB", (16, 16)).save(photos / "black.png")
    load = deploy.load_export

    def broken(*args, **kwargs):
        identifier = load(*args, **kwargs)
        black = lambda x: (x == -1).flatten(1).all(1)[:, None]  # noqa: E731
        identifier.router_backbone.register_forward_hook(
            lambda module, args, out: out.masked_fill(black(args[0]), float("nan"))
        )
        return identifier

    monkeypatch.setattr(deploy, "load_export", broken)
    out = tmp_path / "who.csv"
    for threshold in (None, -2.0):
        caplog.clear()
        with caplog.at_level("WARNING", logger="facecluster.deploy"):
            identify_files(tmp_path / "export", [photos], out, threshold=threshold, device="cpu")
        rows = {Path(r["path"]).name: r for r in csv.DictReader(out.open(encoding="utf-8"))}
        assert list(rows["black.png"].values())[1:] == ["failed", "", "", "", "", "failed"]
        assert rows["face.jpg"]["status"] == "known" and rows["face.jpg"]["identity"] != "failed"
        warned = [r.getMessage() for r in caplog.records if "status failed" in r.getMessage()]
        assert len(warned) == 1 and warned[0].startswith("1 image(s) got no identity"), warned
        assert "embedding of each is NaN, inf or zero" in warned[0]
        assert warned[0].endswith(f": {photos / 'black.png'}")


def test_an_identifier_whose_weights_are_not_finite_is_neither_written_nor_loaded(tmp_path):
    # such an export loaded without a word and answered every face with an identity of
    # cluster 0; the check is check_parts', which also refuses an export tampered with
    from facecluster.inference.onnx import load_onnx

    _small_export(tmp_path)
    path = tmp_path / "identifier.pt"
    identifier = TwoStageIdentifier.load(path)
    weight = next(n for n, t in identifier.subnets[1].named_parameters() if t.dim() > 1)
    with torch.no_grad():
        identifier.subnets[1].get_parameter(weight)[0] = float("nan")
    with pytest.raises(
        ValueError,
        match=rf"^not writing {re.escape(str(tmp_path))}/again.pt: 1 tensor\(s\) hold NaN or "
        rf"inf \(subnets.1.{re.escape(weight)}\)$",
    ):
        identifier.export(tmp_path / "again.pt")
    assert not (tmp_path / "again.pt").exists()
    payload = torch.load(path, weights_only=True)
    router = dict(payload["router_backbone"])
    key = next(iter(router))
    router[key] = router[key] * float("nan")
    heads = [payload["heads"][0], payload["heads"][1].clone()]
    heads[1][2, 0] = -float("inf")
    means = payload["assignment"]["class_means"].clone()
    means[4, 1] = float("nan")
    for change, named in (
        (
            {"router_backbone": router},
            rf"1 tensor\(s\) hold NaN or inf \(router_backbone.{re.escape(key)}\)",
        ),
        ({"heads": heads}, r"1 tensor\(s\) hold NaN or inf \(heads.1\)"),
        (
            {"assignment": {**payload["assignment"], "class_means": means}},
            r"ClusterAssignment.class_means contains NaN/inf values \(rows \[4\]\)",
        ),
    ):
        torch.save({**payload, **change}, tmp_path / "tampered.pt")
        with pytest.raises(
            ValueError, match=rf"^export {re.escape(str(tmp_path))}/tampered.pt: {named}$"
        ):
            TwoStageIdentifier.load(tmp_path / "tampered.pt")
    # the ONNX gallery's head rows, before any network is read
    with np.load(tmp_path / "onnx" / "gallery.npz") as arrays:
        gallery = dict(arrays)
    gallery["head1"][0, 0] = np.nan
    np.savez(tmp_path / "onnx" / "gallery.npz", **gallery)
    with pytest.raises(
        ValueError,
        match=r"gallery.npz, identifier.json\): 1 tensor\(s\) hold NaN or inf \(heads.1\)$",
    ):
        load_onnx(tmp_path / "onnx")


def test_a_loaded_identifier_is_read_unless_asked_to_map_its_file(tmp_path):
    # A server holds an identifier for long: a file copied over the mapped one (cp, not a
    # rename) ended the process with SIGBUS or swapped its weights. The API reads the
    # file; the commands (identify, enroll: a load per command) map it.
    from facecluster.deploy import load_export

    _small_export(tmp_path)
    path = tmp_path / "identifier.pt"
    read = TwoStageIdentifier.load(path)
    mapped = TwoStageIdentifier.load(path, mmap=True)
    command = load_export(tmp_path, "torch", "cpu")
    before = read.assignment.class_means.clone()
    with open(path, "r+b") as f:  # the same file, overwritten in place, bytes changed
        data = bytearray(f.read())
        f.seek(0)
        f.write(bytes(b ^ 0x55 for b in data))
    assert torch.equal(read.assignment.class_means, before)
    for identifier in (mapped, command):  # what a mapped load shares: the file's pages
        assert not torch.equal(identifier.assignment.class_means, before)


def test_the_onnx_gallery_is_read_unless_asked_to_map_it(exported, tmp_path):
    # as identifier.pt (above): the commands' loads map onnx/gallery.npz, whose head rows
    # and class means were read whole (4 GB each at 2M identities x 512, each process's
    # own); the API reads it
    from facecluster.inference.onnx import load_onnx, read_gallery

    export = shutil.copytree(exported, tmp_path / "export")
    gallery = export / "onnx" / "gallery.npz"
    read, mapped = read_gallery(gallery), read_gallery(gallery, mmap=True)
    assert read.keys() == mapped.keys() and "class_means" in mapped
    for key, array in read.items():
        assert array.dtype == mapped[key].dtype and np.array_equal(array, mapped[key]), key
    assert isinstance(mapped["class_means"], np.memmap)
    loaded = load_onnx(export / "onnx")
    command = load_export(export, "onnx", "cpu")
    before = loaded.assignment.class_means.clone()
    assert torch.equal(command.assignment.class_means, before)
    with open(gallery, "r+b") as f:  # the same file, overwritten in place, bytes changed
        data = bytearray(f.read())
        f.seek(0)
        f.write(bytes(b ^ 0x55 for b in data))
    assert torch.equal(loaded.assignment.class_means, before)
    assert not torch.equal(command.assignment.class_means, before)  # the file's pages
    # a gallery whose arrays were stored compressed (np.savez_compressed) is read
    np.savez_compressed(tmp_path / "compressed.npz", **read)
    again = read_gallery(tmp_path / "compressed.npz", mmap=True)
    assert not any(isinstance(a, np.memmap) for a in again.values())
    assert all(np.array_equal(again[key], array) for key, array in read.items())
    # a shape damaged in a member's header is refused, not given the next member's bytes
    np.savez(tmp_path / "shape.npz", a=np.zeros((3, 4), np.float32), b=np.ones(8, np.float32))
    data = (tmp_path / "shape.npz").read_bytes()
    assert data.count(b"(3, 4)") == 1
    (tmp_path / "shape.npz").write_bytes(data.replace(b"(3, 4)", b"(5, 4)"))
    for mmap in (False, True):  # read: the CRC; mapped: the member's length
        with pytest.raises(ValueError, match=r"shape\.npz cannot be read \(.*\): a damaged"):
            read_gallery(tmp_path / "shape.npz", mmap=mmap)


def test_an_export_keeps_any_names_exactly_and_reads_the_list_of_older_versions(tmp_path):
    # a list of str took 6.6 s to load at 2M identities (weights_only unpickles each):
    # the names are one utf8 tensor and its int64 offsets, whatever characters they hold
    from facecluster.inference.identifier import EXPORT_VERSION

    names = ["a\nb", "semi;colon:x", "Zo\u00eb \U0001f600", "", "not utf-8 \udcff", "id5"]
    _small_export(tmp_path, names)
    payload = torch.load(tmp_path / "identifier.pt", weights_only=True)
    assert payload["version"] == EXPORT_VERSION == 4
    assert payload["facecluster"] == facecluster.__version__
    meta = json.loads((tmp_path / "onnx" / "identifier.json").read_text())
    assert meta["facecluster"] == facecluster.__version__
    newer = {**payload, "version": 5, "facecluster": "9.1"}  # a later release's, to this one
    torch.save(newer, tmp_path / "v5.pt")
    with pytest.raises(ValueError, match=r"v5.pt: a facecluster export of format 5, made by "
                       r"facecluster 9.1; this facecluster \(.*\) reads formats up to 4: read "
                       r"it with facecluster 9.1 or later"):  # fmt: skip
        TwoStageIdentifier.load(tmp_path / "v5.pt")
    packed = payload["class_names"]
    assert packed["utf8"].dtype == torch.uint8 and packed["offsets"].dtype == torch.int64
    assert TwoStageIdentifier.load(tmp_path / "identifier.pt").class_names == names
    payload.update(version=3, class_names=names)  # as version 3 wrote them
    torch.save(payload, tmp_path / "v3.pt")
    assert TwoStageIdentifier.load(tmp_path / "v3.pt").class_names == names
    payload.update(version=4)  # a list under version 4: refused, not read as names
    torch.save(payload, tmp_path / "bad.pt")
    with pytest.raises(ValueError, match=r"bad.pt: class_names is not the utf8 and offsets"):
        TwoStageIdentifier.load(tmp_path / "bad.pt")
    payload["class_names"] = {**packed, "offsets": packed["offsets"].flip(0)}
    torch.save(payload, tmp_path / "bad.pt")
    with pytest.raises(ValueError, match=r"bad.pt: class_names' offsets do not cut"):
        TwoStageIdentifier.load(tmp_path / "bad.pt")


def test_an_export_that_does_not_match_its_assignment_is_refused_naming_it(tmp_path):
    # names, sub-nets or head rows that disagree with the assignment loaded without a
    # word and failed at the first identify (an IndexError)
    from facecluster.inference.onnx import load_onnx

    names = _small_export(tmp_path)
    path = tmp_path / "identifier.pt"
    payload = torch.load(path, weights_only=True)

    def refused(change: dict, message: str) -> None:
        torch.save({**payload, **change}, tmp_path / "tampered.pt")
        with pytest.raises(ValueError, match=message):
            TwoStageIdentifier.load(tmp_path / "tampered.pt")

    refused(
        {"class_names": pack_names(names[:-1])},
        rf"^export {re.escape(str(tmp_path))}/tampered.pt: assignment maps 6 identities "
        r"but class_names holds 5$",
    )
    refused(
        {"subnets": payload["subnets"][:1], "heads": payload["heads"][:1]},
        r"tampered.pt: assignment has 2 clusters but there are 1 sub-nets; assignment has 2 "
        r"clusters but there are 1 heads$",
    )
    refused(
        {"heads": [payload["heads"][0][:-1], payload["heads"][1]]},
        r"tampered.pt: sub-net 0's head has 2 rows for its 3 identities",
    )
    meta_path = tmp_path / "onnx" / "identifier.json"
    meta = json.loads(meta_path.read_text())
    for change, message in (
        (
            {"class_names": [*names, "extra"]},
            "assignment maps 6 identities but class_names holds 7",
        ),
        ({"num_clusters": 1}, "assignment has 2 clusters but there are 1 sub-nets"),
    ):
        meta_path.write_text(json.dumps({**meta, **change}))
        with pytest.raises(
            ValueError, match=rf"^ONNX export {re.escape(str(tmp_path))}/onnx .*: {message}"
        ):
            load_onnx(tmp_path / "onnx")


@pytest.mark.parametrize(
    ("change", "named"),
    [
        ({"route": {"router_temperature": float("nan")}}, r"route.router_temperature must be > 0"),
        ({"route": {"subnet_temperature": -0.1}}, r"route.subnet_temperature must be > 0"),
        ({"route": {"generalist_weight": 7}}, r"route.generalist_weight must be in \[0, 1\]"),
        ({"route": {"router_temperature": "hot"}}, r"route.router_temperature: Value 'hot'"),
        ({"route": {"router_temperature": "0.05"}}, r"route.router_temperature='0.05' is text"),
        ({"route": {"decision": "vote"}}, r"route.decision='vote' is not one of moe, linear"),
        ({"route": {"top_m": 0}}, r"route.top_m must be > 0"),
        ({"open_set": {"threshold": float("nan")}}, r"open_set's threshold is nan"),
        ({"open_set": {"threshold": "0.3"}}, r"open_set's threshold is '0.3'"),
        ({"open_set": {"threshold": 0.3, "top_m": 0}}, r"open_set's top_m is 0"),
        ({"open_set": {"threshold": 1.01}}, r"open_set's threshold is 1.01"),
    ],
)
def test_an_exports_decision_numbers_are_checked_when_it_loads(tmp_path, change, named):
    # a NaN router temperature in an export answered every face wrongly without a word, a
    # negative one ran, a string or generalist_weight=7 failed at the first face
    from facecluster.inference.onnx import load_onnx

    _small_export(tmp_path)
    moe = {"decision": "moe", "router_temperature": 0.05, "subnet_temperature": 0.07}
    moe["generalist_weight"] = 0.5
    payload = torch.load(tmp_path / "identifier.pt", weights_only=True)
    route = {**payload["route"], **moe, **change.get("route", {})}
    open_set = {"score": "similarity", **change["open_set"]} if "open_set" in change else None
    torch.save({**payload, "route": route, "open_set": open_set}, tmp_path / "bad.pt")
    # a route= given beside the file's fault is not named: it was, though innocent
    for given in (None, {"alpha": 0.5}):
        with pytest.raises(
            ValueError, match=rf"^export {re.escape(str(tmp_path))}/bad.pt: {named}"
        ):
            TwoStageIdentifier.load(tmp_path / "bad.pt", route=given)
    meta_path = tmp_path / "onnx" / "identifier.json"
    meta = json.loads(meta_path.read_text())
    meta_path.write_text(json.dumps({**meta, "route": route, "open_set": open_set}))
    for given in (None, {"alpha": 0.5}):
        with pytest.raises(ValueError, match=rf"onnx \(identifier.json\): {named}"):
            load_onnx(tmp_path / "onnx", route=given)  # before its networks are read (none)


def test_route_settings_given_to_the_api_are_checked_by_the_configs_rules(tmp_path):
    _small_export(tmp_path)
    path = tmp_path / "identifier.pt"
    assert TwoStageIdentifier.load(path, route={"top_m": 2}).route_config["top_m"] == 2
    # numpy and torch scalars (values computed with them) were refused by OmegaConf's
    # "not a supported primitive type"
    for top_m, alpha in ((np.int64(2), np.float32(0.5)), (torch.tensor(2), torch.tensor(0.5))):
        route = TwoStageIdentifier.load(path, route={"top_m": top_m, "alpha": alpha}).route_config
        assert (route["top_m"], route["alpha"]) == (2, 0.5) and type(route["top_m"]) is int
    with pytest.raises(ValueError, match=r"route.router_temperture: no such setting; did you "):
        TwoStageIdentifier.load(path, route={"router_temperture": 0.1})
    with pytest.raises(ValueError, match=r"\(route=\{'alpha': 2\}\): route.alpha must be in"):
        TwoStageIdentifier.load(path, route={"alpha": 2})
    # a threshold a float32 cosine just above 1 gave (threshold_at_fpir) loads
    payload = torch.load(path, weights_only=True)
    torch.save({**payload, "open_set": {"threshold": 1.0000001, "top_m": 1}}, path)
    assert TwoStageIdentifier.load(path).open_set["threshold"] == 1.0000001


@pytest.mark.parametrize(
    ("content", "named"),
    [
        ('{"router_temperature": NaN, "subnet_temperature": 0.1, "generalist_weight": 0.5}',
         r"route.router_temperature must be > 0, got nan"),
        ('{"router_temperature": 0.1, "subnet_temperature": 0.1, "generalist_weight": "x"}',
         r"route.generalist_weight: Value 'x'"),
        ('{"router_temperature": 0.1, "subnet_temperature": 0.1}',
         r"cannot be read \(it has no 'generalist_weight'\): the run folder is damaged; "
         r"restore the file from a copy of the run, or delete it"),
        ('{"router_temperature": "0.1", "subnet_temperature": 0.1, "generalist_weight": 0.5}',
         r"route.router_temperature='0.1' is text, not a number"),
        ('{"router_temperature": 0.1, "subnet_temperature": 0.1, "generalist_weight": 0.5, '
         '"alpha": 0.5}', r"it holds more than router_temperature"),
    ],
)  # fmt: skip
def test_a_runs_damaged_calibration_is_named_not_used(tmp_path, content, named):
    # evaluate and export read the run's fitted decision numbers without a check: a NaN
    # temperature gave a wrong table, a string a traceback
    (tmp_path / "calibration.json").write_text(content)
    with pytest.raises(ConfigError, match=rf"calibration.json .*{named}"):
        RunFolder(tmp_path).calibration()
    good = '{"router_temperature": 0.1, "subnet_temperature": 0.2, "generalist_weight": 0.5}'
    (tmp_path / "calibration.json").write_text(good)
    assert RunFolder(tmp_path).calibration()["subnet_temperature"] == 0.2


def test_export_refuses_an_out_it_cannot_write_before_any_pass(
    open_run, exported, tmp_path, monkeypatch, capsys
):
    # an OUT under a file (or on a read-only file system) was found after the threshold
    # and calibration passes, a bare "[Errno 20] Not a directory"
    monkeypatch.setattr(TwoStageIdentifier, "from_run", lambda *a, **k: pytest.fail("loaded"))
    (tmp_path / "afile").write_text("")
    assert cli.export_main([str(open_run), str(tmp_path / "afile" / "out")]) == 2
    err = capsys.readouterr().err
    assert f"{tmp_path / 'afile'}: export cannot write there (not a folder)" in err, err
    # an export's onnx/ as OUT: the export went inside it, and the next export to the
    # export above refused the identifier.pt and onnx/ it found in its onnx/
    (tmp_path / "demo" / "onnx").mkdir(parents=True)
    shutil.copy(exported / "onnx" / "identifier.json", tmp_path / "demo" / "onnx")
    assert cli.export_main([str(open_run), str(tmp_path / "demo" / "onnx"), "--onnx"]) == 2
    err = capsys.readouterr().err
    assert f"{tmp_path / 'demo' / 'onnx'} is an export's onnx folder" in err, err
    assert sorted(p.name for p in (tmp_path / "demo").rglob("*")) == ["identifier.json", "onnx"]


def test_ctrl_c_ends_a_command_with_one_line_and_the_shells_status(tmp_path, monkeypatch, capsys):
    # a KeyboardInterrupt traceback (exit 130 all the same) from evaluate, export, enroll
    # and identify; train said "interrupted" already
    from facecluster import evaluation

    def interrupt(*args, **kwargs):
        raise KeyboardInterrupt

    monkeypatch.setattr(deploy, "export_run", interrupt)
    monkeypatch.setattr(evaluation, "evaluate_runs", interrupt)
    run = tmp_path / "run"
    run.mkdir()
    (run / "config.yaml").write_text("method: clustered\n")
    assert cli.main(["export", str(run), str(tmp_path / "out")]) == 130
    assert capsys.readouterr().err.strip().endswith("interrupted")
    assert cli.evaluate_main([f"run={run}"]) == 130
    assert capsys.readouterr().err.strip().endswith("interrupted")
    # under torchrun Ctrl-C reaches every process: rank 0 says it, the others are quiet
    monkeypatch.setattr(evaluation, "torchrun_ranks", contextlib.nullcontext)
    monkeypatch.setenv("WORLD_SIZE", "2")
    for rank, said in (("1", ""), ("0", "interrupted")):
        monkeypatch.setenv("RANK", rank)
        assert cli.evaluate_main([f"run={run}"]) == 130
        assert capsys.readouterr().err.strip() == said


def test_a_failed_import_in_evaluate_is_raised_as_itself(tmp_path, monkeypatch):
    # a broken install: facecluster.data failing to import was shown behind an
    # UnboundLocalError for BadImageError, raised while matching the except clause
    import sys

    run = tmp_path / "run"
    run.mkdir()
    (run / "config.yaml").write_text("method: clustered\n")
    monkeypatch.setitem(sys.modules, "facecluster.data", None)
    with pytest.raises(ImportError, match="facecluster.data"):
        cli.evaluate_main([f"run={run}"])


def test_an_exports_damaged_backbone_settings_are_named_when_it_loads(exported, tmp_path, capsys):
    # a damaged image size in onnx/identifier.json loaded and failed at the first face
    # with a traceback; one in identifier.pt gave torch's size mismatch or a TypeError
    from facecluster.inference.onnx import load_onnx

    copy = tmp_path / "demo"
    shutil.copytree(exported, copy)
    meta_path = copy / "onnx" / "identifier.json"
    meta = json.loads(meta_path.read_text())
    size = meta["backbone"]["image_size"]
    for change, named in (
        ({"backbone": {**meta["backbone"], "image_size": size + 8}}, rf"takes {size} px images"),
        ({"backbone": {**meta["backbone"], "image_size": "abc"}}, r"image_size is 'abc', not a"),
        ({"backbone": None}, r"backbone is None, not a mapping"),
        ({"num_clusters": "2"}, r"num_clusters is '2', not a number of clusters"),
        ({"class_names": None}, r"class_names is not a list of names"),
    ):
        meta_path.write_text(json.dumps({**meta, **change}))
        with pytest.raises(ValueError, match=rf"onnx.*{named}.*: a damaged export\?$"):
            load_onnx(copy / "onnx")
        assert cli.main(["identify", str(copy), str(DEMO), "--runtime", "onnx"]) == 2
        assert "a damaged export?" in capsys.readouterr().err
    payload = torch.load(copy / "identifier.pt", weights_only=True)
    for size_given in ("abc", 0):  # another whole number: test_backbones (load_backbone)
        backbone = {**payload["backbone"], "image_size": size_given}
        torch.save({**payload, "backbone": backbone}, copy / "identifier.pt")
        named = rf"identifier.pt: backbone.image_size is {size_given!r}, not a positive whole"
        with pytest.raises(ValueError, match=rf"^export {re.escape(str(copy))}/{named}"):
            TwoStageIdentifier.load(copy / "identifier.pt")


def test_identify_refuses_images_the_networks_do_not_take(tmp_path):
    # a size-agnostic backbone embedded crops of another size or channels last without
    # a word (an IResNet failed with a matrix-size error)
    _small_export(tmp_path)
    identifier = TwoStageIdentifier.load(tmp_path / "identifier.pt")
    assert len(identifier.identify(torch.zeros(2, 3, 16, 16)).identity) == 2
    for shape in ((2, 3, 32, 32), (2, 16, 16, 3), (3, 16, 16), (2, 1, 16, 16)):
        for call in (identifier.identify, identifier.embed):  # embed: a conv's size error
            with pytest.raises(ValueError, match=r"takes a batch \[B, 3, 16, 16\] of norm"):
                call(torch.zeros(shape))
    # image files as a user reads them: load_faces's uint8 pixels, channels last, are
    # refused with the call that makes crops of them
    from facecluster.data import load_faces, normalize_images

    files = [str(p) for p in sorted(DEMO.rglob("*.jpg"))[:3]]
    with pytest.raises(ValueError, match=r"normalize_images\(load_faces\(paths, 16\)\)"):
        identifier.embed(load_faces(files, 16))
    with pytest.raises(ValueError, match=r"dtype torch.uint8: .*data.normalize_images\)"):
        identifier.embed(load_faces(files, 16).permute(0, 3, 1, 2))
    embedded = identifier.embed(normalize_images(load_faces(files, 16)))
    assert embedded.shape == (3, identifier.backbone_args["embedding_dim"])
    with pytest.raises(ValueError, match=r"^'zed': images of shape \[2, 3, 32, 32\]: this"):
        identifier.enroll({"zed": torch.zeros(2, 3, 32, 32)})
    # an enrolment builds no autograd graph (its @torch.no_grad() was once displaced)
    identifier.enroll({"zed": torch.randn(2, 3, 16, 16)})
    assert not any(identifier.head_rows(k).requires_grad for k in range(2))


def test_an_enrolment_committed_while_the_run_exports_is_not_replaced(
    open_run, exported, tmp_path, monkeypatch, caplog
):
    # the refusal of an OUT with enrolled people was checked once, before the passes: an
    # enroll that committed during them (most of an export's time) was replaced silently
    from facecluster import deploy

    out = tmp_path / "out"
    shutil.copytree(exported, out)
    person = tmp_path / "people" / "Zed"
    person.mkdir(parents=True)
    shutil.copy(next(DEMO.rglob("*.jpg")), person / "0.jpg")
    calibrate = deploy.calibrate_run

    def enrol_meanwhile(*args, **kwargs):
        enroll_folder(out, tmp_path / "people")
        return calibrate(*args, **kwargs)

    monkeypatch.setattr(deploy, "calibrate_run", enrol_meanwhile)
    with pytest.raises(deploy.ExportChangedError, match="changed by another command"):
        export_run(open_run, out)
    assert load_export(out, "torch", "cpu").class_names[-1] == "Zed"
    # asked to drop them: replaced, the people named
    monkeypatch.setattr(deploy, "calibrate_run", calibrate)
    export_run(open_run, out, drop_enrolled=True)
    assert "Zed" not in load_export(out, "torch", "cpu").class_names
    # an export of another run (here: the same networks under other names) is replaced,
    # with a warning naming them, not refused as enrolled people
    ident = load_export(out, "torch", "cpu")
    ident.class_names = [f"x{name}" for name in ident.class_names]
    ident.export(out / "identifier.pt")
    with caplog.at_level(logging.WARNING, logger="facecluster.deploy"):
        export_run(open_run, out)
    assert "identities that the run does not have (enrolled into it, or another run's)" in (
        caplog.text
    )
    assert load_export(out, "torch", "cpu").class_names[0] == ident.class_names[0][1:]
