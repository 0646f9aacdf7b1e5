"""LFW-style 10-fold verification: the protocol on known embeddings, the pair sets
(pairs.txt beside images/, .bin), the stage-1 callback and the evaluate.py column."""

from __future__ import annotations

import csv
import io
import json
import logging
import os
import pickle
import re
import shutil
import struct
from pathlib import Path
from types import SimpleNamespace

import numpy as np
import pytest
import torch
import torch.nn.functional as F

from facecluster.callbacks import VerificationCallback
from facecluster.config import ConfigError, load_config
from facecluster.data.transforms import load_faces, normalize_images
from facecluster.data.verification import (
    VerificationPairs,
    load_pairs,
    read_bin,
    read_pairs_txt,
    set_name,
    trained_pairs_warning,
    write_bin,
)
from facecluster.evaluation import evaluate_run
from facecluster.inference.verification import pair_embeddings, ten_fold_accuracy
from facecluster.pipeline import train
from facecluster.run import RunFolder
from tests.conftest import SHARED_LFW, SMOKE, smoke_overrides

PAIRS = SHARED_LFW.parent / "pairs.txt"
needs_lfw = pytest.mark.skipif(not PAIRS.is_file(), reason=f"{PAIRS} is not beside this checkout")


def test_ten_fold_accuracy_separates_known_pairs():
    torch.manual_seed(0)
    anchors = F.normalize(torch.randn(100, 16), dim=1)
    same = [i % 2 == 0 for i in range(100)]
    others = F.normalize(torch.randn(100, 16), dim=1)
    second = torch.where(torch.tensor(same)[:, None], anchors + 0.01 * others, others)
    pairs = torch.stack([anchors, second], dim=1).reshape(200, 16)
    result = ten_fold_accuracy(pairs, same)
    assert result.accuracy == 1.0 and result.std == 0.0 and result.pairs == 100
    assert 0.0 < result.threshold < 2.0  # between the same (~0) and random (~2) distances
    # one wrong pair in fold 0 costs that fold 1 of its 10 pairs
    flipped = list(same)
    flipped[0] = not flipped[0]
    assert ten_fold_accuracy(pairs, flipped).accuracy == pytest.approx(0.99)
    noise = ten_fold_accuracy(torch.randn(200, 16), same)
    assert 0.3 < noise.accuracy < 0.7
    with pytest.raises(ValueError, match="expected 2 each"):
        ten_fold_accuracy(pairs[:-2], same)
    # 13 pairs: InsightFace's folds (scikit-learn's KFold) are 2, 2, 2, 1, ... pairs, so
    # pair 3 is one of fold 1's two (these folds were 2, 1, 1, 2, ...: fold 2 alone)
    flipped = list(same[:13])
    flipped[3] = not flipped[3]
    assert ten_fold_accuracy(pairs[:26], flipped).accuracy == pytest.approx(0.95)


@needs_lfw
def test_the_lfw_pairs_list_and_its_bin_file_give_the_same_pairs(tmp_path):
    pairs = load_pairs(PAIRS)
    assert len(pairs) == 6000 and sum(pairs.issame) == 3000 and set_name(PAIRS) == "lfw-112"
    assert pairs.issame[:300] == [True] * 300 and pairs.issame[300:600] == [False] * 300
    binary = load_pairs(write_bin(SHARED_LFW, PAIRS, tmp_path / "lfw.bin"))
    assert binary.images == pairs.images and set_name(tmp_path / "lfw.bin") == "lfw"


@needs_lfw
def test_pair_embeddings_embed_each_distinct_image_once_with_its_mirror():
    # LFW's pairs repeat images: each distinct one is embedded once, and every pair
    # still gets its own two embeddings, image plus mirror, as if embedded one by one
    pairs = load_pairs(PAIRS)
    sub = type(pairs)(pairs.images[:60], pairs.issame[:30])
    torch.manual_seed(0)
    net = torch.nn.Sequential(torch.nn.Conv2d(3, 4, 5, stride=4), torch.nn.Flatten())
    seen = []

    def embed(x):
        seen.append(len(x))
        return net(x)

    got = pair_embeddings(embed, sub, 32, batch_size=16)
    distinct = len(set(sub.images))
    assert distinct < 60 and sum(seen) == 2 * distinct  # image and mirror, once each
    for i in (0, 1, 17, 59):
        x = normalize_images(load_faces([sub.images[i]], 32))
        mirror = normalize_images(load_faces([sub.images[i]], 32), torch.tensor([True]))
        torch.testing.assert_close(got[i], (net(x) + net(mirror))[0])


def test_the_last_epoch_is_measured_however_the_fit_ends(tmp_path):
    # every 5 epochs, and the last: a fit that max_steps ends (without should_stop) had
    # its final weights unmeasured
    pairs = tmp_path / "lfw.bin"
    pairs.write_bytes(b"")  # named, not read: the sets are read on first use
    callback = VerificationCallback([pairs], every_n_epochs=5, image_size=64, batch_size=8)

    def ending(epoch, step=0, max_steps=-1, max_epochs=10, should_stop=False):
        return SimpleNamespace(current_epoch=epoch, global_step=step, max_steps=max_steps,
                               max_epochs=max_epochs, should_stop=should_stop)  # fmt: skip

    assert [e for e in range(10) if callback.measures(ending(e))] == [4, 9]
    assert callback.measures(ending(1, should_stop=True))
    assert callback.measures(ending(1, step=20, max_steps=20))
    assert not callback.measures(ending(1, step=19, max_steps=20))


def test_verification_sets_are_checked_at_config_time(tmp_path):
    (tmp_path / "pairs.txt").write_text("10\t300\n")
    with pytest.raises(ConfigError, match="no images/ folder beside it"):
        load_config(SMOKE, [f"data.verification=[{tmp_path / 'pairs.txt'}]"])
    with pytest.raises(ConfigError, match="missing.bin does not exist"):
        load_config(SMOKE, [f"data.verification=[{tmp_path / 'missing.bin'}]"])


def _small_lfw(folder: Path, per_fold: int = 20) -> Path:
    """LFW's pairs.txt cut to ``per_fold`` pairs of each official fold (half same,
    half different), its images/ linked: the protocol as is, at test size."""
    lines = PAIRS.read_text().splitlines()[1:]
    kept = []
    for fold in range(10):
        block = lines[600 * fold : 600 * (fold + 1)]
        kept += block[: per_fold // 2] + block[300 : 300 + per_fold // 2]
    folder.mkdir()
    (folder / "images").symlink_to(SHARED_LFW)
    (folder / "pairs.txt").write_text(f"10\t{per_fold // 2}\n" + "\n".join(kept) + "\n")
    return folder / "pairs.txt"


@needs_lfw
@pytest.mark.slow
def test_lfw_verification_during_stage1_and_in_the_evaluation_table(tmp_path, monkeypatch, caplog):
    pairs = _small_lfw(tmp_path / "lfw")
    assert len(load_pairs(pairs)) == 200
    overrides = smoke_overrides(
        tmp_path, "logger=csv", f"data.verification=[{pairs}]", "eval.after_training=false"
    )
    run = train(load_config(SMOKE, overrides)).run_dir
    # the demo's identities are LFW's: pairs of them are no held-out figure, and both the
    # training's start and the evaluation say how many (counted here by hand)
    trained = set(RunFolder(run).class_names())
    lines = [line.split() for line in pairs.read_text().splitlines()[1:]]
    same = sum(len(p) == 3 and p[0] in trained for p in lines)
    other = sum(len(p) == 4 and (p[0] in trained or p[2] in trained) for p in lines)
    assert same and other
    said = f"{same} of its 100 matched pairs and {other} of its 100 mismatched pairs are of"
    assert caplog.text.count(said) == 1
    metrics = (next((run / "csv").rglob("metrics.csv"))).read_text()
    assert "val/lfw_acc" in metrics.splitlines()[0]
    report = evaluate_run(run, ["eval.plots=false", "eval.timing_batches=1"])
    assert caplog.text.count(said) == 2
    by_row = {row.model: row.verification.get("lfw") for row in report.rows}
    # ISM, the sub-nets alone, embeds with no stage-1 backbone: its cell stays empty
    ism = [model for model in by_row if model.endswith("(ISM)")]
    assert ism and all(by_row[model] is None for model in ism), by_row
    accuracies = {v for model, v in by_row.items() if model not in ism}
    assert len(accuracies) == 1  # every other row embeds with the stage-1 backbone
    accuracy = accuracies.pop()
    assert 0.5 < accuracy < 1.0
    # it is the stage-1 backbone's, measured directly on the same pairs, and what the
    # callback logged for the last epoch (the same weights)
    assert accuracy == _stage1_verification(run, pairs)
    logged = [row["val/lfw_acc"] for row in csv.DictReader(io.StringIO(metrics))]
    assert accuracy == pytest.approx(float([v for v in logged if v][-1]), abs=1e-6)
    # mean ± std of the folds, as InsightFace prints them and papers report them
    std = _stage1_verification(run, pairs, std=True)
    assert {r.verification_std.get("lfw") for r in report.rows} == {std, None}
    assert f"| {accuracy:.2%} ±{std:.2%} |" in (run / "eval" / "results.md").read_text()
    assert "lfw_verification_std" in (run / "eval" / "results.csv").read_text()
    # the single-model baseline's rows get it from their own backbone
    single = train(load_config(SMOKE, [*overrides, "method=single", "run_name=single"])).run_dir
    rows = evaluate_run(single, ["eval.plots=false", "eval.timing_batches=1"]).rows
    assert [r.model for r in rows] == ["single model (one head)", "nearest class mean"]
    accuracies = {r.verification["lfw"] for r in rows}
    assert len(accuracies) == 1  # one backbone: its own, measured directly
    accuracy = accuracies.pop()
    # (0.51 here: no bound above chance, which a change of torch could cross)
    assert accuracy == _stage1_verification(single, pairs)
    # its class means are kept: the next evaluation of the same weights makes no pass
    # over the training split (17M images at Glint360K's size); other weights do
    from facecluster import evaluation

    passes = []
    real = evaluation.embedding_class_sums
    monkeypatch.setattr(
        evaluation, "embedding_class_sums", lambda *a, **k: passes.append(1) or real(*a, **k)
    )
    again = evaluate_run(single, ["eval.plots=false", "eval.timing_batches=1"]).rows
    assert not passes and (single / "eval" / "class_means.pt").is_file()
    assert [(r.top1, r.f1) for r in again] == [(r.top1, r.f1) for r in rows]
    checkpoint = single / "stage1" / "checkpoints" / "last.ckpt"
    os.utime(checkpoint, ns=(0, checkpoint.stat().st_mtime_ns + 1))  # a resume's new epoch
    third = evaluate_run(single, ["eval.plots=false", "eval.timing_batches=1"]).rows
    assert passes == [1] and [(r.top1, r.f1) for r in third] == [(r.top1, r.f1) for r in rows]
    # a copy of the run (cp -a, rsync: times kept, other inodes) keeps them too
    copy = shutil.copytree(single, tmp_path / "copy")
    evaluate_run(copy, ["eval.plots=false", "eval.timing_batches=1"])
    assert passes == [1]
    # a damaged one (a disk error, a copy cut short) is made again, with a warning
    (copy / "eval" / "class_means.pt").write_bytes(b"not a torch file")
    caplog.clear()
    with caplog.at_level(logging.WARNING):
        fourth = evaluate_run(copy, ["eval.plots=false", "eval.timing_batches=1"]).rows
    assert passes == [1, 1] and [(r.top1, r.f1) for r in fourth] == [(r.top1, r.f1) for r in rows]
    assert "cannot be used" in caplog.text and "computing the class means again" in caplog.text
    evaluate_run(copy, ["eval.plots=false", "eval.timing_batches=1"])  # kept again
    assert passes == [1, 1]
    # export writes two-stage identifiers: a single-model run is refused, saying so
    # (docs/DEPLOYMENT.md), before anything is written
    from facecluster.deploy import export_run

    with pytest.raises(ValueError, match=r"single-model run \(method=single\)"):
        export_run(single, tmp_path / "export")
    assert not (tmp_path / "export").exists()
    # route.* on a single-model run was accepted, and its table had no routed row
    with pytest.raises(ConfigError, match=r"route.top_m=2: run=.* is a single-model run \(me"):
        evaluate_run(single, ["route.top_m=2"])
    # beside a two-stage run it is that run's (EVALUATION.md's run=A run=B route.top_m=2)
    from facecluster.evaluation import evaluate_runs

    both = evaluate_runs(
        [run, single], ["route.top_m=2", "eval.plots=false", "eval.timing_batches=1"]
    )
    assert "top_m=2" in both and "single model (one head)" in both
    # each run records the overrides it ran under: the single model none of route.*
    # (bench/results.py evaluated it again for them)
    recorded = {r: json.loads((r / "eval" / "results.json").read_text()) for r in (run, single)}
    assert recorded[run]["overrides"][0] == "route.top_m=2"
    assert recorded[single]["overrides"] == ["eval.plots=false", "eval.timing_batches=1"]
    # route settings only a router reads: the single model's identity count refused
    # them, in its own turn (as the two-stage run's, unnamed) or beside a two-stage run
    ivf = ["route.index=ivf", "route.ivf_nlist=1000"]
    with pytest.raises(ConfigError, match=r"route.ivf_nlist=1000: run=.* is a single-model"):
        evaluate_run(single, ivf)
    with pytest.raises(ConfigError, match=rf"^run=.*{run.name}: route.ivf_nlist=1000 lists"):
        evaluate_runs([single, run], ivf)


def _stage1_verification(run_dir: Path, pairs: Path, std: bool = False) -> float:
    """The 10-fold accuracy of ``run_dir``'s stage-1 backbone on ``pairs`` (``std``: the
    folds' standard deviation instead), with the weights read from its checkpoint here."""
    from facecluster.inference.verification import verify
    from facecluster.models.components import create_backbone
    from facecluster.run import RunFolder

    folder = RunFolder(run_dir)
    cfg = folder.finished_config()
    backbone = create_backbone(**cfg.model.backbone_args(cfg.data.image_size)).eval()
    backbone.load_state_dict(folder.stage1_weights().backbone)
    with torch.inference_mode():
        result = verify(backbone, load_pairs(pairs), cfg.data.image_size, 64)
    return result.std if std else result.accuracy


LFW_SET = '"data.verification=[../shared/datasets/lfw-112/pairs.txt]"'
VERIFY_TRAIN = f"python train.py -c configs/smoke.yaml {LFW_SET}"
VERIFY_EVAL = f"python evaluate.py run=runs/<run> {LFW_SET}"


@needs_lfw
@pytest.mark.slow
def test_documented_verification_commands(tmp_path, capsys):
    # docs/EVALUATION.md's two commands as written (runs go to this test's folder)
    import os
    import shlex
    import subprocess
    import sys

    from tests.conftest import ROOT

    docs = (ROOT / "docs" / "EVALUATION.md").read_text()
    assert VERIFY_TRAIN in docs and VERIFY_EVAL in docs
    env = {k: v for k, v in os.environ.items() if k != "FACECLUSTER_RUN_DIR"}

    def run(command: str, *extra: str) -> str:
        argv = [sys.executable, *shlex.split(command)[1:], *extra]
        proc = subprocess.run(argv, cwd=ROOT, env=env, capture_output=True, text=True, timeout=600)
        assert proc.returncode == 0, proc.stderr[-3000:]
        return proc.stdout + proc.stderr

    # evaluated once, by the second command (train.py would evaluate the run too)
    out = run(
        VERIFY_TRAIN,
        f"output_dir={tmp_path}",
        "run_name=v",
        "logger=csv",
        "eval.after_training=false",
    )
    assert "lfw-112 verification" in out and "(6000 pairs, 10 folds)" in out
    # the second in this process (evaluate.py's main, its argv as written, the run's
    # folder filled in): a second interpreter cost about 9 s of imports
    from facecluster import cli

    argv = shlex.split(VERIFY_EVAL.replace("runs/<run>", str(tmp_path / "v")))[2:]
    cwd = os.getcwd()
    os.chdir(ROOT)
    try:
        assert cli.evaluate_main([*argv, "eval.timing_batches=1"]) == 0
    finally:
        os.chdir(cwd)
    assert "lfw-112 verif." in capsys.readouterr().out


def test_a_set_is_named_by_the_path_given_not_a_links_target(tmp_path):
    # a hub or annex cache links lfw.bin to a blob named by its hash: the set was
    # called after the blob's folder, and two such sets were refused as one name
    blobs = tmp_path / "blobs"
    blobs.mkdir()
    (blobs / "3f2a").write_bytes(b"")
    (tmp_path / "lfw.bin").symlink_to(blobs / "3f2a")
    assert set_name(tmp_path / "lfw.bin") == "lfw"
    assert set_name(tmp_path / "sub" / ".." / "lfw.bin") == "lfw"


def test_a_first_pair_named_by_numbers_is_not_taken_for_the_header_and_a_bad_line_is_named(
    tmp_path,
):
    # identities named by numbers (CASIA, MS1M folders): "0001 1 2" is a pair, where
    # LFW's header ("10 300") has two fields
    for name in ("0001", "0002"):
        (tmp_path / name).mkdir()
        for i in (1, 2):
            (tmp_path / name / f"{name}_{i:04d}.jpg").write_bytes(b"x")
    pairs = tmp_path / "pairs.txt"
    pairs.write_text("0001 1 2\n0001 1 0002 2\n")
    assert read_pairs_txt(tmp_path, pairs)[1] == [True, False]
    pairs.write_text("1 2\n0001 1 2\n")
    assert read_pairs_txt(tmp_path, pairs)[1] == [True]
    # a word where an image number goes: int()'s "invalid literal for int()" alone; a
    # number of 4,301 digits: Python's "Exceeds the limit", naming no file
    for line in ("0001 1 x", "0001 one 0002 2", "0001 1 \u00b2", f"0001 1 {'9' * 4301}"):
        pairs.write_text(f"0001 1 2\n{line}\n")
        with pytest.raises(ValueError, match=r"pairs.txt line 2: expected `name i j` ") as err:
            read_pairs_txt(tmp_path, pairs)
        assert repr(line)[:20] in str(err.value) and len(str(err.value)) < 300


def test_a_pairs_list_that_is_no_text_or_names_no_file_is_named(tmp_path):
    # a fuzzing review: a Latin-1 byte said "'utf-8' codec can't decode byte 0xe9" with
    # no file; a name too long for a file stopped train.py with an OSError traceback
    pairs = tmp_path / "pairs.txt"
    pairs.write_bytes("Jos\u00e9 1 2\n".encode("latin-1"))
    with pytest.raises(ValueError, match=r"pairs.txt: not a UTF-8 text file \(invalid contin"):
        read_pairs_txt(tmp_path, pairs)
    pairs.write_text(f"{'a' * 300} 1 2\n")
    with pytest.raises(ValueError, match=r"pairs.txt line 1: .*aaaa_0001.jpg: File name too long"):
        read_pairs_txt(tmp_path, pairs)


def test_a_bin_file_whose_values_are_huge_is_named_in_a_short_line(tmp_path):
    # a 67 KB file made train.py print a 262 MB error line, a 105 KB one asked for
    # gigabytes (the repr of one 64 KB bytes object referenced thousands of times)
    big = b"\x8e" + struct.pack("<Q", 1 << 16) + bytes(1 << 16) + b"\x94"  # memo 0
    many = b"](" + b"h\x00" * 1000 + b"e"  # a list of it, 1,000 times (250 MB of repr)
    # list({0: that list}): refused, naming its argument; a pair's flag that list
    sized = b"\x80\x04" + big + b"0\x8c\x08builtins\x8c\x04list\x93}K\x00" + many + b"s\x85R"
    flag = b"\x80\x04" + big + b"0](h\x00h\x00e]" + many + b"a\x86."
    for name, data in (("sized.bin", sized + b"]\x86."), ("flag.bin", flag)):
        (tmp_path / name).write_bytes(data)
        with pytest.raises(ValueError) as err:
            read_bin(tmp_path / name)
        assert name in str(err.value) and len(str(err.value)) < 400, str(err.value)[:400]


def test_a_bin_file_whose_objects_fail_to_build_is_named(tmp_path):
    # the allowed builders failed on forged arguments with errors that named no file
    bad = {
        # numpy.dtype made by NEWOBJ (no __init__, no type), then given a state
        "newobj_dtype.bin": b"\x80\x04\x8c\x05numpy\x8c\x05dtype\x93)\x81"
        b"(K\x03\x8c\x01<NNNJ\xff\xff\xff\xffJ\xff\xff\xff\xffK\x00tb.",
        # an image of integers past a byte
        "overflow.bin": pickle.dumps(([[300], [1]], [True]), protocol=4),
        # bytes("a", "zlib_codec")
        "codec.bin": b"\x80\x04\x8c\x08builtins\x8c\x05bytes\x93\x8c\x01a\x8c\nzlib_codec\x86R"
        b"\x8c\x01b\x85\x8c\x08builtins\x8c\x04list\x93N\x85R\x86.",
    }
    for name, data in bad.items():
        (tmp_path / name).write_bytes(data)
        with pytest.raises(ValueError, match=f"{name} is not a verification .bin file"):
            read_bin(tmp_path / name)
    # no pickle at all (an unknown first opcode): the reason was the byte alone, "197"
    (tmp_path / "junk.bin").write_bytes(b"\xc5\x01junk")
    with pytest.raises(ValueError, match=r"junk.bin is not .*: unknown pickle opcode 0xc5 \(it "):
        read_bin(tmp_path / "junk.bin")
    # other files that are no pickle said only the unpickler's words ("pop from empty
    # list" for a .npy); what they start with is named, an empty one is said to be
    (tmp_path / "junk.bin").write_bytes(b"\x93NUMPY\x01\x00v\x00{'descr'")
    with pytest.raises(ValueError, match=r"pop from empty list \(it starts with b'\\x93NUMPY"):
        read_bin(tmp_path / "junk.bin")
    (tmp_path / "junk.bin").write_bytes(b"\x80\x04\xc5junk")  # a pickle's start, then junk
    with pytest.raises(ValueError, match=r"unknown pickle opcode 0xc5: a damaged pickle\?$"):
        read_bin(tmp_path / "junk.bin")
    (tmp_path / "junk.bin").write_bytes(b"")
    with pytest.raises(
        ValueError, match=r"junk.bin is not a verification .bin file: the file is empty$"
    ):
        read_bin(tmp_path / "junk.bin")
    # an image made a list of N references to one list of N numbers: 2N bytes of pickle
    # were made N^2 bytes (1.1 GB and 19 s from a 96 KB file, a review measured) before
    # the budget refused it
    n = 2000
    square = b"\x80\x02]q\x00(" + b"K\x01" * n + b"e0]q\x01(" + b"h\x00" * n + b"e0"
    (tmp_path / "square.bin").write_bytes(square + b"](h\x01h\x01e]\x88a\x86.")
    with pytest.raises(ValueError, match="square.bin is not .*: an image is a list: .* bytes or"):
        read_bin(tmp_path / "square.bin")
    # a corrupt length field: CPython allocated its claim first (a MemoryError of no text)
    (tmp_path / "claim.bin").write_bytes(b"\x80\x04\x8e" + (1 << 40).to_bytes(8, "little") + b"x")
    claims = r"claim.bin is not .*: a length field claims 1099511627776 bytes from byte 11, but"
    with pytest.raises(ValueError, match=claims):
        read_bin(tmp_path / "claim.bin")


def test_a_bin_file_whose_memo_index_or_lengths_claim_memory_is_refused_before_it_is_taken(
    tmp_path,
):
    # A 9-byte file naming memo index 2^22 made the C unpickler grow its memo table to
    # 2^23 entries and zero-fill them (64 MiB; 2^25: 512 MiB, 2^32: 64 GiB) before
    # anything of ours ran. Length fields that claim more than the file holds are
    # refused before anything is allocated for them (the C unpickler allocated each
    # claim, untouched; pickle's pure-Python one zero-fills a BYTEARRAY8's).
    import tracemalloc

    g = 1 << 30
    forged = {
        "memo.bin": (b"\x80\x02Nr" + struct.pack("<I", 1 << 22) + b".", "it holds None, not"),
        "binbytes8.bin": (b"\x80\x04\x8e" + struct.pack("<Q", g) + b"x", "claims 1073741824"),
        "binunicode8.bin": (b"\x80\x04\x8d" + struct.pack("<Q", g) + b"x", "claims 1073741824"),
        "bytearray8.bin": (b"\x80\x05\x96" + struct.pack("<Q", g) + b"x", "claims 1073741824"),
        "frame.bin": (b"\x80\x04\x95" + struct.pack("<Q", g) + b"N.", "claims 1073741824"),
        "binbytes.bin": (b"\x80\x03B" + struct.pack("<I", g) + b"x", "claims 1073741824"),
        "long4.bin": (b"\x80\x02\x8b" + struct.pack("<i", g) + b"x", "claims 1073741824"),
        # inside a frame of 10 bytes (the frame's bytes read, the claim never allocated)
        "framed.bin": (
            b"\x80\x05\x95" + struct.pack("<Q", 10) + b"\x96" + struct.pack("<Q", g) + b"x",
            "pickle exhausted before end of frame",
        ),
    }
    for name, (data, said) in forged.items():
        (tmp_path / name).write_bytes(data)
        tracemalloc.start()
        try:
            with pytest.raises(
                ValueError, match=f"{name} is not a verification .bin file: .*{said}"
            ):
                read_bin(tmp_path / name)
            peak = tracemalloc.get_traced_memory()[1]
        finally:
            tracemalloc.stop()
        assert peak < 1 << 20, (name, peak)
    # a pickle that memoizes at indexes that large still reads (the memo is a dict)
    images = [b"\xff\xd8ab", b"\xff\xd8cd"]
    p2 = b"\x80\x02]r" + struct.pack("<I", 1 << 22) + b"(" + b"".join(b"U\x04" + x for x in images)
    p2 += b"e]\x88a\x86r" + struct.pack("<I", 1 << 21) + b"."
    (tmp_path / "far_memo.bin").write_bytes(p2)
    assert read_bin(tmp_path / "far_memo.bin").images == images


def test_one_object_the_bin_file_references_over_and_over_is_built_once(tmp_path):
    # the pickle memo hands one object to the reader any number of times: one array
    # referenced 200 times became 200 copies, bytearray(x) called 200 times too
    image = np.frombuffer(b"\xff\xd8" + bytes(1 << 16), np.uint8)
    (tmp_path / "shared.bin").write_bytes(pickle.dumps(([image] * 200, [True] * 100), 4))
    images = read_bin(tmp_path / "shared.bin").images
    assert len(images) == 200 and len({id(x) for x in images}) == 1
    assert images[0] == image.tobytes()
    data = b"\0" * (1 << 16)
    for kind in ("bytearray", "list", "tuple"):
        forged = b"\x80\x04\x8c\x08builtins\x8c" + bytes([len(kind)]) + kind.encode() + b"\x93\x94"
        forged += b"\x8e" + struct.pack("<Q", len(data)) + data + b"\x94"  # memo 1: the bytes
        forged += b"](" + b"h\x00h\x01\x85R" * 200  # kind(bytes), 200 times
        forged += b"e](" + b"\x88" * 100 + b"e\x86."
        (tmp_path / f"{kind}.bin").write_bytes(forged)
        with pytest.raises(ValueError, match=f"{kind}.bin is not .* builds more than 8 times"):
            read_bin(tmp_path / f"{kind}.bin")
    # files of every protocol still read: numpy array images, the costliest (protocols
    # 0-2 build each twice), 4 MiB of them (far past the 1 MiB allowance)
    rng = np.random.default_rng(0)
    arrays = [rng.integers(0, 128, 1 << 18, dtype=np.uint8) for _ in range(16)]
    for protocol in range(6):
        (tmp_path / "ok.bin").write_bytes(pickle.dumps((arrays, [False] * 8), protocol))
        assert read_bin(tmp_path / "ok.bin").images == [a.tobytes() for a in arrays], protocol


def test_a_bin_file_of_objects_made_from_nothing_is_refused_within_its_budget(tmp_path):
    # a byte of EMPTY_LIST builds a 64-byte list, one of MEMOIZE a memo entry: 2 MiB of
    # them took 56-144 MiB before the file was refused for its missing end; calls to an
    # allowed maker (REDUCE, BUILD: an array wrapper, a view) 36-78 MiB, lookups of its
    # name (a new counting closure each) 119 MiB, a mark's items (the stack and the
    # container both) 32 MiB
    import tracemalloc

    size = 2 << 20
    runs = {"lists": b"]", "marks": b"(", "dicts": b"}", "memo": b"N\x94", "tuples": b"N\x85"}
    runs = {name: (b"", body, b"") for name, body in runs.items()}
    maker = b"\x8c\x15numpy.core.multiarray\x8c\x0c_reconstruct\x93\x94"
    maker += b"\x8c\x05numpy\x8c\x07ndarray\x93\x85\x94"  # memo 0: the maker, 1: its args
    runs |= {
        "calls": (maker, b"h\x00h\x01R", b"."),
        "lookups": (b"\x8c\x08builtins\x94\x8c\x05bytes\x94", b"h\x00h\x01\x93", b"."),
        "items": (b"](", b"N", b"e."),
    }
    for name, (head, body, tail) in runs.items():
        data = head + body * ((size - len(head) - len(tail)) // len(body)) + tail
        (tmp_path / f"{name}.bin").write_bytes(b"\x80\x04" + data)
        tracemalloc.start()
        try:
            with pytest.raises(ValueError, match=f"{name}.bin is not .* builds more than 8 times"):
                read_bin(tmp_path / f"{name}.bin")
            peak = tracemalloc.get_traced_memory()[1]
        finally:
            tracemalloc.stop()
        assert peak < 8 * size + (2 << 20), (name, peak)
    (tmp_path / "set.bin").write_bytes(b"\x80\x04\x8f.")
    with pytest.raises(ValueError, match="set.bin is not .*: a set is not allowed"):
        read_bin(tmp_path / "set.bin")
    # small images pickled as numpy arrays, the most opcodes per byte, still read in every
    # protocol: 1 KB each, 4 MiB of them
    arrays = [np.frombuffer(b"\xff\xd8" + bytes(1022), np.uint8) for _ in range(4096)]
    for protocol in range(6):
        (tmp_path / "small.bin").write_bytes(pickle.dumps((arrays, [True] * 2048), protocol))
        assert len(read_bin(tmp_path / "small.bin").images) == 4096, protocol


def _jpeg(size: tuple[int, int], seed: int) -> bytes:
    """A JPEG of ``size`` (width, height), noise."""
    import io

    from PIL import Image

    pixels = np.random.default_rng(seed).integers(0, 256, (size[1], size[0], 3), np.uint8)
    out = io.BytesIO()
    Image.fromarray(pixels).save(out, format="JPEG")
    return out.getvalue()


def _bin(path: Path, size: tuple[int, int] = (64, 64), pairs: int = 20) -> Path:
    """A verification .bin of ``pairs`` pairs of distinct ``size`` JPEGs."""
    images = [_jpeg(size, i) for i in range(2 * pairs)]
    path.write_bytes(pickle.dumps((images, [p % 2 == 0 for p in range(pairs)]), protocol=4))
    return path


def _epoch_end(callback: VerificationCallback) -> None:
    """The callback at the end of a measured epoch of rank 0 (it reads the sets first)."""
    trainer = SimpleNamespace(current_epoch=0, global_step=1, max_steps=-1, max_epochs=1,
                              should_stop=False, is_global_zero=True)  # fmt: skip
    callback.on_train_epoch_end(trainer, None)


def test_a_bin_file_cut_short_is_refused_before_training(tmp_path, capsys):
    # a truncated .bin was read first at the end of stage 1's first epoch (hours in at
    # MS1MV3 scale); the start-up check only saw that the path existed
    from facecluster.builders import check_verification_sets

    whole = _bin(tmp_path / "whole.bin").read_bytes()
    (tmp_path / "cut.bin").write_bytes(whole[: len(whole) // 2])
    cfg = load_config(
        SMOKE, [f"data.verification=[{tmp_path / 'whole.bin'},{tmp_path / 'cut.bin'}]"]
    )
    refused = r"data.verification: .*cut.bin is not a verification .bin file: .*cut short"
    with pytest.raises(ConfigError, match=refused):
        check_verification_sets(cfg)
    cut = [f"data.verification=[{tmp_path / 'cut.bin'}]"]
    with pytest.raises(ConfigError, match=refused):
        check_verification_sets(load_config(SMOKE, [*cut, "stage=1"]))
    # a command that neither trains stage 1 nor evaluates does not read the sets
    check_verification_sets(load_config(SMOKE, [*cut, "stage=cluster"]))
    check_verification_sets(load_config(SMOKE, [*cut, "eval.after_training=false", "stage=2"]))
    # refused before the data is scanned (minutes for a large folder; its errors first)
    from facecluster import cli

    code = cli.train_main(["-c", str(SMOKE), *cut, f"data.root={tmp_path}"])  # no identity
    assert code == 2 and "data.verification" in capsys.readouterr().err
    # nor a resume past stage 1 that does not evaluate (its stage 1 is finished)
    resumed = load_config(SMOKE, [*cut, "eval.after_training=false"])
    check_verification_sets(resumed, stage1_done=True)
    with pytest.raises(ConfigError, match=refused):
        check_verification_sets(resumed, stage1_done=False)
    # and, should the file be cut after the start, where stage 1 reads it again
    with pytest.raises(ConfigError, match=refused):
        _epoch_end(VerificationCallback([tmp_path / "cut.bin"], 1, 64, 8))


def test_a_set_the_ten_folds_cannot_measure_is_refused_before_training(tmp_path, capsys):
    # a .bin of 2 pairs (or none) passed the start-up check and stopped the run at the
    # end of stage 1's first epoch ("2 pairs cannot make 10 folds"), its folder left
    # behind; flags all alike gave 100%; the flag "no" was read as True
    from facecluster import cli
    from facecluster.builders import check_verification_sets, verification_sets

    images = [_jpeg((64, 64), i) for i in range(40)]
    sets = {
        "two.bin": (
            (images[:4], [True, False]),
            r"2 pairs; the 10-fold protocol needs at least 20, two a fold, one of each kind",
        ),
        "none.bin": (([], []), r"0 pairs; the 10-fold protocol"),
        "same.bin": ((images, [True] * 20), r"all 20 pairs are same-identity pairs"),
        "words.bin": ((images, ["yes", "no"] * 10), r"pair 0's is-same flag is 'yes' \(str\)"),
        "twos.bin": ((images, [2, 0] * 10), r"pair 0's is-same flag is 2 \(int\)"),
        # a pairs list sorted by kind: every fold of one kind, each scored on the others'
        # threshold (a walkthrough's agedb_30.bin of 300 same, then 300 different: 28%)
        "sorted.bin": (
            (images, [True] * 10 + [False] * 10),
            r"fold 1 of 10 \(pairs 1-2 of 20, in file order\) holds same-identity pairs only",
        ),
    }
    for name, (content, said) in sets.items():
        (tmp_path / name).write_bytes(pickle.dumps(content, protocol=4))
        cfg = load_config(SMOKE, [f"data.verification=[{tmp_path / name}]"])
        with pytest.raises(ConfigError, match=rf"^data.verification: \S*{name}.*: {said}"):
            check_verification_sets(cfg)
        with pytest.raises(ConfigError, match=said):  # what evaluate.py reads the sets with
            verification_sets(cfg)
    # numpy flags and 0/1 are InsightFace's own forms, and pass
    mixed = [np.bool_(True), 0, np.int64(1), False] * 5
    (tmp_path / "numpy.bin").write_bytes(pickle.dumps((images, mixed), protocol=4))
    check_verification_sets(load_config(SMOKE, [f"data.verification=[{tmp_path / 'numpy.bin'}]"]))
    # and so do 0 and 1 written as floats (refused); 0.5 is no flag
    (tmp_path / "floats.bin").write_bytes(pickle.dumps((images, [1.0, 0.0] * 10), protocol=4))
    check_verification_sets(load_config(SMOKE, [f"data.verification=[{tmp_path}/floats.bin]"]))
    (tmp_path / "half.bin").write_bytes(pickle.dumps((images, [0.5, 1.0] * 10), protocol=4))
    with pytest.raises(ConfigError, match=r"pair 0's is-same flag is 0.5 \(float\)"):
        check_verification_sets(load_config(SMOKE, [f"data.verification=[{tmp_path}/half.bin]"]))
    # from train.py: one line, before the data scan, and no run folder
    code = cli.train_main(["-c", str(SMOKE), f"data.verification=[{tmp_path / 'two.bin'}]",
                           f"output_dir={tmp_path / 'runs'}"])  # fmt: skip
    err = capsys.readouterr().err
    assert code == 2 and "two.bin: 2 pairs" in err and "Traceback" not in err
    assert not (tmp_path / "runs").exists()
    # a folder named for its set was "does not exist"
    with pytest.raises(ConfigError, match=r"lfw-112 is a folder: name its .bin file or pairs.txt"):
        load_config(SMOKE, [f"data.verification=[{SHARED_LFW.parent}]"])


def test_a_bin_file_with_an_undecodable_image_is_refused_naming_the_image(tmp_path):
    # one broken image stopped the first measurement (after an epoch), and evaluate.py,
    # with PIL's "cannot identify image file <_io.BytesIO object at 0x...>": no file, no pair
    # (now: what the bytes start with)
    from facecluster.builders import check_verification_sets, verification_sets

    images = [_jpeg((64, 64), i) for i in range(40)]
    images[7] = b"<html>404</html>"
    (tmp_path / "broken.bin").write_bytes(
        pickle.dumps((images, [p % 2 == 0 for p in range(20)]), protocol=4)
    )
    cfg = load_config(SMOKE, [f"data.verification=[{tmp_path / 'broken.bin'}]"])
    named = (
        r"data.verification: \S*broken.bin: image 7 \(pair 3, its second image\) cannot be "
        r"decoded \(UnidentifiedImageError: not an image format Pillow reads \(it starts "
        r"with b'<html>40'\)\)$"
    )
    with pytest.raises(ConfigError, match=named):
        check_verification_sets(cfg)
    with pytest.raises(ConfigError, match=named):  # what evaluate.py reads the sets with
        verification_sets(cfg)
    with pytest.raises(ConfigError, match=named):  # stage 1's first measurement
        _epoch_end(VerificationCallback([tmp_path / "broken.bin"], 1, 64, 8))
    # in a pairs list, the image's file is named too
    for name in ("a", "b"):
        (tmp_path / "lfw" / "images" / name).mkdir(parents=True)
        for i in (1, 2):
            (tmp_path / "lfw" / "images" / name / f"{name}_{i:04d}.jpg").write_bytes(
                _jpeg((64, 64), i)
            )
    (tmp_path / "lfw" / "images" / "b" / "b_0002.jpg").write_bytes(b"")
    (tmp_path / "lfw" / "pairs.txt").write_text("a 1 2\na 1 b 2\n" * 10)
    with pytest.raises(
        ConfigError, match=r"pairs.txt: image 3 \(pair 1, its second image, \S*b_0002.jpg\)"
    ):
        check_verification_sets(
            load_config(SMOKE, [f"data.verification=[{tmp_path / 'lfw' / 'pairs.txt'}]"])
        )


def test_a_set_of_another_image_size_is_named_in_a_warning(tmp_path, caplog):
    # 160x160 or 96x112 (not square) images were resized or squashed to data.image_size
    # without a word: a plausible, meaningless accuracy
    import logging

    from facecluster.builders import check_verification_sets

    said = r"its 40 images are {} \(width x height\), not data.image_size=64 square: "
    sets = {
        "square.bin": ((64, 64), None),
        "big.bin": ((160, 160), said.format("160x160") + "verification resizes them to 64x64"),
        "narrow.bin": ((96, 112), said.format("96x112") + "verification squashes them to 64x64"),
    }
    for name, (size, warning) in sets.items():
        _bin(tmp_path / name, size)
        caplog.clear()
        with caplog.at_level(logging.WARNING):
            check_verification_sets(
                load_config(SMOKE, [f"data.verification=[{tmp_path / name}]", "data.image_size=64"])
            )
        warned = [r.getMessage() for r in caplog.records if r.levelno == logging.WARNING]
        if warning is None:
            assert warned == []
        else:
            assert len(warned) == 1 and re.match(
                rf"data.verification: \S*{name}: {warning}", warned[0]
            ), warned


def test_a_sigterm_during_verification_ends_it_at_the_next_batch(tmp_path, caplog):
    # rank 0 measured every set to its end before the epoch's checkpoint was saved: a
    # SIGTERM there waited for it (6 minutes for LFW on CPU in a walkthrough; a SLURM
    # job's grace is 30 s by default), and a kill after the grace lost the epoch
    from lightning.pytorch.plugins.precision import Precision

    from facecluster.callbacks import interrupt

    calls = []

    class Backbone(torch.nn.Module):
        def forward(self, x):
            calls.append(len(x))
            if len(calls) == 2:  # the first batch's mirror images: a SIGTERM arrives
                interrupt._note_sigterm(15, None)
            return x.flatten(1)[:, :8]

    logged = []
    module = SimpleNamespace(
        backbone=Backbone(), device=torch.device("cpu"), log=lambda *a, **k: logged.append(a)
    )
    trainer = SimpleNamespace(current_epoch=0, global_step=1, max_steps=-1, max_epochs=1,
                              should_stop=False, is_global_zero=True,
                              precision_plugin=Precision())  # fmt: skip
    sets = [_bin(tmp_path / "a.bin", pairs=40), _bin(tmp_path / "b.bin")]
    callback = VerificationCallback(sets, 1, 64, 16)  # 80 images: 5 batches, 10 calls
    try:
        with caplog.at_level(logging.INFO):
            callback.on_train_epoch_end(trainer, module)
    finally:
        interrupt.forget_sigterm()
    assert len(calls) == 2 and logged == []
    assert module.backbone.training, "back in training mode"
    assert "epoch 0: SIGTERM: a verification stopped, not logged; the epoch is saved" in (
        caplog.text
    )
    # without one, both sets are measured
    callback.on_train_epoch_end(trainer, module)
    assert [name for name, *_ in logged] == ["val/a_acc", "val/b_acc"]


def test_lightnings_sync_dist_advice_is_not_printed_for_rank_zeros_verification_logs():
    # rank 0 alone measures and logs val/<set>_acc: under DDP Lightning advised
    # sync_dist=True at every epoch (which would wait for the ranks that log nothing).
    # In a process of its own: pytest replaces the warning filters a module sets
    import subprocess
    import sys

    advice = (
        "It is recommended to use `self.log({!r}, ..., sync_dist=True)` when logging on epoch "
        "level in distributed setting to accumulate the metric across devices."
    )
    code = (
        "import warnings, facecluster.builders\n"
        "from lightning.pytorch.utilities.warnings import PossibleUserWarning\n"
        "for name in ('val/lfw_acc', 'val/cfp_fp_acc', 'train/loss'):\n"
        f"    warnings.warn({advice!r}.format(name), PossibleUserWarning)\n"
    )
    proc = subprocess.run(
        [sys.executable, "-c", code], capture_output=True, text=True, timeout=120, check=True
    )
    assert "'val/lfw_acc'" not in proc.stderr and "'val/cfp_fp_acc'" not in proc.stderr
    assert advice.format("train/loss") in proc.stderr  # other names are still advised


def test_lightnings_advice_that_does_not_apply_is_not_printed(tmp_path):
    # each stage printed Lightning's advice to prepend `srun` on any machine that has
    # it (every SLURM login node), a shared-layers stage 2 that modules are in eval mode
    # (the frozen trunk), a resume of a moved run that its checkpoint folder changed. In
    # a process of its own: pytest replaces the warning filters a module sets
    import subprocess
    import sys

    (tmp_path / "srun").write_text("#!/bin/sh\n")
    (tmp_path / "srun").chmod(0o755)
    code = (
        "import warnings, facecluster.builders\n"
        "from lightning.fabric.plugins.environments import SLURMEnvironment\n"
        "from lightning.pytorch.callbacks import ModelCheckpoint\n"
        "import lightning.pytorch as pl, torch\n"
        "SLURMEnvironment.detect()\n"  # srun on PATH, no SLURM job: the advice
        "checkpoint = ModelCheckpoint(dirpath='new')\n"
        "checkpoint.load_state_dict({'dirpath': 'old', 'best_model_path': ''})\n"
        "from lightning.pytorch.utilities.warnings import PossibleUserWarning\n"
        "warnings.warn('Found 18 module(s) in eval mode at the start of training. This may "
        "lead to unexpected behavior during training.', PossibleUserWarning)\n"
        "warnings.warn('The number of training batches (3) is smaller than the logging "
        "interval', PossibleUserWarning)\n"
    )
    env = {**os.environ, "PATH": f"{tmp_path}:{os.environ['PATH']}"}
    env = {k: v for k, v in env.items() if not k.startswith("SLURM_")}
    proc = subprocess.run(
        [sys.executable, "-c", code], capture_output=True, text=True, timeout=120, env=env
    )
    assert proc.returncode == 0, proc.stderr[-2000:]
    for advice in ("srun` command is available", "dirpath has changed", "in eval mode"):
        assert advice not in proc.stderr, proc.stderr
    assert "smaller than the logging interval" in proc.stderr  # other advice still shows


def test_the_trained_pairs_warning_counts_pairs_that_name_a_trained_identity():
    # a mismatched pair counts when either of its people trained; a .bin names no one
    pairs = VerificationPairs(
        [b""] * 8, [True, True, False, False], "p.txt", identities=list("aabbacde")
    )
    said = trained_pairs_warning(pairs, ["a", "e"])
    assert said.startswith("p.txt: 1 of its 2 matched pairs and 2 of its 2 mismatched pairs")
    assert trained_pairs_warning(pairs, ["z"]) is None
    assert trained_pairs_warning(VerificationPairs([b""] * 8, [True] * 4, "lfw.bin"), ["a"]) is None
