"""Stage 2 as independent jobs: local processes, a SLURM plan (submitit, no cluster
needed), the stages run separately, and a killed job that ``resume`` finishes."""

from __future__ import annotations

import contextlib
import json
import logging
import multiprocessing
import os
import re
import shutil
import signal
import socket
import subprocess
import sys
import threading
import time
import warnings
from pathlib import Path

import lightning as L
import pytest
import torch

from facecluster import cli, evaluation, launch, pipeline
from facecluster.config import ConfigError, load_config, resume_command
from facecluster.evaluation import evaluate_run
from facecluster.io import replacing
from facecluster.launch import balanced_groups, evaluate_command, gpu_slots
from facecluster.loggers import build_logger
from facecluster.pipeline import train
from facecluster.run import JOB_ENV, RUN_DIR_ENV, RunFolder, job_name
from tests.conftest import SMOKE, smoke_overrides

pytestmark = pytest.mark.slow

ROOT = Path(__file__).resolve().parents[1]
TWO_JOBS = "python train.py -c configs/smoke.yaml launcher=local stage2.jobs=2"
EPOCHS = ("trainer.max_epochs=null", "stage1.max_epochs=1", "stage2.max_epochs=3")
# what the accuracy columns of evaluate.py's rows hold (the rest are timings)
ACCURACY = ("top1", "macro_precision", "macro_recall", "macro_f1", "routing_accuracy")


def _job_subnets(job: Path) -> list[int]:
    return json.loads((job / "subnets.json").read_text())


def _env() -> dict[str, str]:
    return {k: v for k, v in os.environ.items() if k not in ("FACECLUSTER_RUN_DIR", JOB_ENV)}


def _subnets(run: Path) -> list[dict[str, torch.Tensor]]:
    return [
        torch.load(p, weights_only=True)
        for p in sorted((run / "stage2" / "subnets").glob("subnet*.pt"))
    ]


def _assert_identical(a: list[dict], b: list[dict]) -> None:
    assert len(a) == len(b) > 0
    for k, (x, y) in enumerate(zip(a, b, strict=True)):
        assert torch.equal(x["head"], y["head"]), f"sub-net {k} head"
        assert x["backbone"].keys() == y["backbone"].keys()
        for name in x["backbone"]:
            assert torch.equal(x["backbone"][name], y["backbone"][name]), f"sub-net {k} {name}"


def _accuracies(run: Path) -> list[tuple]:
    rows = json.loads((run / "eval" / "results.json").read_text())["rows"]
    return [(r["model"], *(r.get(key) for key in ACCURACY)) for r in rows]


def test_job_names_and_balanced_groups():
    assert job_name([5, 0, 1, 2]) == "subnets-0-2_5"
    scattered = job_name(list(range(0, 128, 2)))  # K=128 in 2 jobs: still a short name
    assert len(scattered) < 48 and scattered.startswith("subnets-64-from-0-")
    # the largest cluster first, onto the lightest job
    assert balanced_groups([100, 10, 60, 50], [0, 1, 2, 3], 2) == [[0, 1], [2, 3]]
    assert balanced_groups([100, 10, 60, 50], [0, 1, 2, 3], 3) == [[0], [2], [1, 3]]
    assert balanced_groups([100, 10, 60, 50], [1, 2], 3) == [[2], [1]]
    # local jobs at once on GPUs: disjoint devices, or refused when they do not fit
    assert gpu_slots(["0", "1", "2", "3"], 2, 2) == ["0,1", "2,3"]
    assert gpu_slots([], 4, 1) == [None] * 4
    with pytest.raises(ConfigError, match="need 6 GPUs, 4 are visible"):
        gpu_slots(["0", "1", "2", "3"], 3, 2)
    # what each job takes: none on the CPU (CPU jobs were refused where GPUs are
    # fewer than jobs), the GPUs a list or "0,1" names (each counted as one)
    per_job = [
        ("cpu", "1", 0), ("cpu", "2", 0), ("gpu", "2", 2), ("gpu", "[0,1]", 2),
        ("gpu", "0,1", 2), ("gpu", "1,", 1), ("gpu", "'3'", 3), ("auto", "auto", 1),
        ("gpu", "-1", 1),
    ]  # fmt: skip
    for accelerator, devices, gpus in per_job:
        cfg = load_config(
            SMOKE, [f"trainer.accelerator={accelerator}", f"trainer.devices={devices}"]
        )
        assert launch.devices_per_job(cfg) == gpus, (accelerator, devices)
    assert gpu_slots(["0"], 2, 0) == [None, None]
    # GPUs named by index cannot be shared out: a job beside others sees only its own,
    # renumbered from 0, and Lightning refused the listed indices in every job
    listed = ["trainer.accelerator=gpu", "trainer.devices=[2,3]", "stage2.jobs=2"]
    with pytest.raises(ConfigError, match=r"trainer.devices=\[2, 3\] names GPUs, but jobs"):
        launch.check_local_jobs(load_config(SMOKE, [*listed, "launcher.parallel=2"]))
    launch.check_local_jobs(load_config(SMOKE, listed))  # one at a time: each sees them all


def test_documented_two_local_jobs_give_the_one_job_weights_and_table(tmp_path):
    # docs/TRAINING.md's command as written, in a folder of its own, against the same
    # seed with stage 2 as one job: every sub-net bit-identical, the same table. The one
    # job recomputes its activations (stage2.activation_checkpointing), which must not
    # change a weight either.
    for doc in (ROOT / "docs" / "TRAINING.md", ROOT / "README.md"):
        assert TWO_JOBS in " ".join(doc.read_text().split()).replace(".venv/bin/python", "python")
    for name in ("train.py", "configs"):
        (tmp_path / name).symlink_to(ROOT / name)
    command = [sys.executable, *TWO_JOBS.split()[1:], "logger=csv"]
    proc = subprocess.run(
        command, cwd=tmp_path, env=_env(), capture_output=True, text=True, timeout=480
    )
    assert proc.returncode == 0, proc.stderr[-4000:]
    (two,) = [p for p in (tmp_path / "runs").iterdir() if p.name != ".cache"]
    assert proc.stdout.rstrip().splitlines()[-1] == f"facecluster run folder: {two}"
    jobs = sorted((two / "stage2" / "jobs").iterdir())
    assert len(jobs) == 2 and sorted(k for j in jobs for k in _job_subnets(j)) == [0, 1, 2]
    for job in jobs:
        assert "Restoring" not in (job / "log.txt").read_text()

    one = [f"output_dir={tmp_path / 'one'}", "run_name=one", "stage2.activation_checkpointing=true"]
    one = train(load_config(SMOKE, one)).run_dir
    assert (one / "stage2" / "jobs" / "subnets-0-2").is_dir()
    _assert_identical(_subnets(one), _subnets(two))
    assert cli.evaluate_main([f"run={one}", "eval.timing_batches=1", "eval.plots=false"]) == 0
    assert _accuracies(one) == _accuracies(two)


def _stage1_only(src: Path, dst: Path) -> Path:
    """A copy of a run as it is after stage 1 and the clustering."""
    shutil.copytree(src, dst, ignore=shutil.ignore_patterns("stage2*", "results.*", "eval"))
    return dst


@pytest.mark.faults  # a row of docs/RELIABILITY.md
def test_the_launcher_of_local_jobs_holds_the_run_while_they_train(tmp_path, monkeypatch):
    # The stage-1 lock let go before stage 2 (a change of 2026-12-07, caught by a diff
    # review) left a run of local jobs unheld while they started and between them: a
    # resume then passed its check at start and wrote its overrides to config.yaml,
    # which the launcher's later jobs read. In-process, a stage-2 job's lock holds it.
    seen = []

    def jobs(folder, *args):
        seen.append(folder.training_now())
        with pytest.raises(ConfigError, match="training now"):
            folder.check_not_training()  # a second command's check at start
        raise KeyboardInterrupt  # the jobs never run

    monkeypatch.setattr(pipeline, "run_local", jobs)
    two = smoke_overrides(tmp_path, "launcher=local", "stage2.jobs=2", "logger=none")
    with pytest.raises(KeyboardInterrupt):
        train(load_config(SMOKE, two))
    assert seen and seen[0] is not None and seen[0][0].name == "running.json"
    assert not (tmp_path / "run" / "stage1" / "running.json").exists()  # let go at the end


def test_a_killed_job_is_the_only_one_resume_retrains(tmp_path, monkeypatch):
    reference = train(load_config(SMOKE, smoke_overrides(tmp_path / "ref", *EPOCHS))).run_dir
    run = _stage1_only(reference, tmp_path / "killed" / "run")
    command = [
        sys.executable, "-m", "facecluster.cli", "train", f"resume={run}",
        "stage2.jobs=2", "launcher.parallel=2", "eval.after_training=false",
    ]  # fmt: skip
    parent = subprocess.Popen(
        command, env=_env(), stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True
    )
    deadline = time.monotonic() + 240
    while not (started := list(run.glob("stage2/jobs/*/checkpoints/last.ckpt"))):
        assert parent.poll() is None and time.monotonic() < deadline, "no job checkpointed"
        time.sleep(0.05)
    victim = started[0].parents[1]
    os.kill(json.loads((victim / "job.json").read_text())["pid"], signal.SIGKILL)
    out, err = parent.communicate(timeout=240)
    assert parent.returncode == 1, err[-3000:]
    assert f"{victim.name}: killed by signal 9" in err
    assert f"`facecluster train resume={run}` trains the missing ones" in err  # its command

    lost = _job_subnets(victim)
    folder = RunFolder(run)
    assert folder.missing_subnets(3) == lost
    kept = [k for k in range(3) if k not in lost]
    before = {
        p: (p.stat().st_mtime_ns, p.read_bytes())
        for k in kept
        for p in (folder.subnet_file(k), folder.subnet_file(k, ".json"))
    }
    missing = re.escape(f"sub-nets {lost} of stage 2 are not trained")
    with pytest.raises(ConfigError, match=rf"{missing}.*resume="):
        evaluate_run(run)

    fits = []
    original = L.Trainer.fit

    def spy(self, *args, **kwargs):
        fits.append(kwargs.get("ckpt_path"))
        return original(self, *args, **kwargs)

    monkeypatch.setattr(L.Trainer, "fit", spy)
    resumed = train(folder.config_for_resume(str(run)))
    assert fits == [str(victim / "checkpoints" / "last.ckpt")], "the job continued from it"
    assert resumed.results is not None
    assert sorted(resumed.subnets.subnet_ids) == lost, "only the killed job's sub-nets trained"
    # continued here, the job logs on in its own file, not the run's (whose last test/acc
    # would then be over its sub-nets only)
    rows = (run / "csv" / victim.name / "metrics.csv").read_text().splitlines()
    header, last = rows[0].split(","), rows[-1].split(",")
    assert last[header.index("epoch")] == "3" and last[header.index("test/acc_subnets")] != ""
    for path, (mtime, data) in before.items():
        assert path.stat().st_mtime_ns == mtime and path.read_bytes() == data, path
    _assert_identical(_subnets(reference), _subnets(run))


def _fake_slurm(bin_dir: Path) -> Path:
    """``sbatch`` that records each submission and answers as SLURM does; ``srun``;
    ``squeue``."""
    bin_dir.mkdir()
    calls = bin_dir / "calls"
    (bin_dir / "sbatch").write_text(
        "#!/bin/bash\n"
        f"n=$(( $(ls {calls} 2>/dev/null | wc -l) + 1000 ))\n"
        # bin/fail_at N: the submission that would get job id N fails, as SLURM refuses one
        f'[ -e {bin_dir}/fail_at ] && [ "$n" = "$(cat {bin_dir}/fail_at)" ] && '
        '{ echo "sbatch: error: QOSMaxSubmitJobPerUserLimit" >&2; exit 1; }\n'
        f"mkdir -p {calls}\n"
        f'cp "${{@: -1}}" {calls}/$n.sh\n'
        'echo "Submitted batch job $n"\n'
    )
    (bin_dir / "srun").write_text("#!/bin/bash\nexit 0\n")
    # squeue lists the ids in bin/queue (none: the jobs have ended); bin/down: it fails
    (bin_dir / "squeue").write_text(
        f'#!/bin/bash\n[ -e {bin_dir}/down ] && {{ echo "slurm_load_jobs error" >&2; exit 1; }}\n'
        f"cat {bin_dir}/queue 2>/dev/null; exit 0\n"
    )
    for tool in ("sbatch", "srun", "squeue"):
        (bin_dir / tool).chmod(0o755)
    return calls


@pytest.mark.parametrize(
    ("extra", "then"),
    [
        ((), "The last job assembles the results and evaluates the run: its table in "
         "{run}/eval/results.md"),
        (("eval.after_training=false",), "When the last job is done: python evaluate.py "
         "run={run}"),
        (("stage=1",), "When the last job is done, the run continues with `python train.py "
         "resume={run}`"),
        (("slurm.gpus_per_node=2",), "The last job assembles the results and evaluates the run: "
         "its table in {run}/eval/results.md"),
        (("slurm.gpus_per_node=2", "eval.device=cuda:1"), "The last job assembles the results "
         "and evaluates the run: its table in {run}/eval/results.md"),
        (("slurm.gpus_per_node=2", "eval.device=cpu"), "The last job assembles the results "
         "and evaluates the run: its table in {run}/eval/results.md"),
    ],
    ids=["evaluated", "not-evaluated", "stage-1", "on-2-gpus", "on-gpu-1", "on-cpu"],
)  # fmt: skip
def test_a_slurm_submission_says_what_follows_the_last_job(
    tmp_path, monkeypatch, caplog, extra, then
):
    # the assembly job evaluates the run (eval.after_training): the message told users
    # to evaluate it again once the jobs were done (hours of GPU at scale)
    _fake_slurm(tmp_path / "bin")
    monkeypatch.setenv("PATH", f"{tmp_path / 'bin'}:{os.environ['PATH']}")
    overrides = smoke_overrides(tmp_path, "launcher=slurm", "slurm.gpus_per_node=0", *extra)
    with caplog.at_level(logging.INFO):
        run_dir = train(load_config(SMOKE, overrides)).run_dir
    said = [r.getMessage() for r in caplog.records if "submitted to SLURM" in r.getMessage()]
    assert len(said) == 1 and said[0].endswith(f". {then.format(run=run_dir)}"), said
    last = json.loads((run_dir / "slurm" / "submitted.json").read_text())["jobs"][-1]
    script = sorted((tmp_path / "bin" / "calls").iterdir())[-1].read_text()
    if extra == ("slurm.gpus_per_node=2",):  # the assembly, then the evaluation on both GPUs
        assert last["commands"][0][6:8] == ["stage=assemble", "eval.after_training=false"]
        assert last["commands"][1] == evaluate_command(RunFolder(run_dir), 2)
    elif "stage=1" not in extra:  # the assembly evaluates as it ends (cuda:1 named:
        # torchrun's processes would refuse it after the assembly)
        assert len(last["commands"]) == 1 and last["commands"][0][6] == "stage=assemble"
    if "eval.device=cpu" not in extra and "slurm.gpus_per_node=2" in extra:  # one task,
        # both GPUs and the cores of two tasks
        assert "#SBATCH --gpus-per-node=2" in script and "--ntasks-per-node=1" in script
        assert "#SBATCH --cpus-per-task=16" in script
    if extra == ("stage=1",):  # submitted again once stage 1 is done: nothing to submit
        with monkeypatch.context() as m:
            m.setattr(RunFolder, "has_stage_summary", lambda self, n: True)
            caplog.clear()
            with caplog.at_level(logging.INFO):
                train(RunFolder(run_dir).config_for_resume(str(run_dir), ["stage=1"]))
        said = [r.getMessage() for r in caplog.records if "launcher=slurm" in r.getMessage()]
        assert said == [
            f"launcher=slurm: stage=1 of {run_dir} is done: nothing to submit; "
            f"`python train.py resume={run_dir}` submits the rest of the run"
        ]
    # a GPU the assembly job lacks: refused at submission (it failed once assembled)
    for device, gpus in (("cuda:2", 2), ("cuda", 0)) if not extra else ():
        lacking = smoke_overrides(
            tmp_path / device, "launcher=slurm", f"slurm.gpus_per_node={gpus}",
            f"eval.device={device}",
        )  # fmt: skip
        with pytest.raises(ConfigError, match=f"eval.device={device}: the assembly job"):
            train(load_config(SMOKE, lacking))


def test_slurm_plan_submits_a_chained_array_and_its_jobs_finish_the_run(tmp_path, monkeypatch):
    calls = _fake_slurm(tmp_path / "bin")
    monkeypatch.setenv("PATH", f"{tmp_path / 'bin'}:{os.environ['PATH']}")
    setup = "source /shared/venv/bin/activate"
    overrides = smoke_overrides(
        tmp_path, "launcher=slurm", "stage2.jobs=2", "slurm.partition=debug",
        "slurm.gpus_per_node=0", f"slurm.setup=['{setup}']", "slurm.additional={constraint: a100}",
    )  # fmt: skip
    result = train(load_config(SMOKE, overrides))
    assert result.results is None and not (result.run_dir / "stage1").exists(), "nothing ran"

    scripts = [calls / f"{n}.sh" for n in (1000, 1001, 1002)]
    assert sorted(calls.iterdir()) == scripts
    stage1, array, assemble = (s.read_text() for s in scripts)
    for text in (stage1, array, assemble):
        assert "#SBATCH --partition=debug" in text and "#SBATCH --constraint=a100" in text
        assert setup in text and "submitit.core._submit" in text
    assert "--dependency" not in stage1
    assert "#SBATCH --array=0-1%2" in array and "#SBATCH --dependency=afterok:1000" in array
    assert "#SBATCH --dependency=afterok:1001" in assemble
    assert "#SBATCH --kill-on-invalid-dep=yes" in array and "kill-on-invalid-dep" in assemble

    plan = json.loads((result.run_dir / "slurm" / "submitted.json").read_text())
    first, tasks, last = plan["jobs"]
    assert [job["dependency"] for job in plan["jobs"]] == [None, "afterok:1000", "afterok:1001"]
    assert [c[5:7] for c in first["commands"]] == [
        ["launcher=local", "stage=1"],
        ["launcher=local", "stage=cluster"],
    ]
    assert [c[0][7:10] for c in tasks["array"]] == [
        ["stage2.jobs=2", f"stage2.group={i}", "stage2.subnets=[0,1,2]"] for i in range(2)
    ]
    assert last["commands"][0][6] == "stage=assemble"
    assert all("trainer.accelerator=cpu" in c for c in first["commands"])

    # Submitting again while the chain waits in the queue would train stage 1 twice:
    # refused, naming the jobs, before anything of the run changes.
    before = {p: p.read_bytes() for p in result.run_dir.rglob("*") if p.is_file()}
    (tmp_path / "bin" / "queue").write_text("999\n1000\n1002\n")
    again = RunFolder(result.run_dir).config_for_resume(str(result.run_dir), [])
    with pytest.raises(ConfigError, match=r"jobs 1000, 1002 of this run's last submission"):
        train(again)
    (tmp_path / "bin" / "down").touch()
    with pytest.raises(ConfigError, match=r"cannot ask squeue .*slurm_load_jobs error"):
        train(again)
    assert sorted(calls.iterdir()) == scripts, "nothing was submitted"
    assert {p: p.read_bytes() for p in result.run_dir.rglob("*") if p.is_file()} == before
    for name in ("queue", "down"):
        (tmp_path / "bin" / name).unlink()

    # Run the plan here, in its order, as the jobs would (each its own command line).
    def run_job(name: str, command: list[str]) -> None:
        assert command[1:4] == ["-m", "facecluster.cli", "train"]
        with monkeypatch.context() as m:
            m.setenv(JOB_ENV, name)
            assert cli.train_main(command[4:]) == 0, command

    run = RunFolder(result.run_dir)
    for command in first["commands"]:
        run_job(first["name"], command)
    assert run.has_stage_summary(1) and run.clusters_path.is_file()
    with pytest.raises(ConfigError, match=r"sub-nets \[0, 1, 2\] of stage 2 are not trained"):
        run.finished_config()
    for i, (command,) in enumerate(tasks["array"]):
        run_job(f"stage2-{i}", command)
    assert run.missing_subnets(3) == [] and not run.finished
    # a task run again once its sub-nets are saved (requeued as it ended) trains nothing
    files = sorted(p for p in run.path.rglob("*") if p.is_file())
    stamps = [p.stat().st_mtime_ns for p in files]
    run_job("stage2-0", tasks["array"][0][0])
    assert sorted(p for p in run.path.rglob("*") if p.is_file()) == files
    assert [p.stat().st_mtime_ns for p in files] == stamps
    run_job(last["name"], last["commands"][0])
    assert run.finished and (run.path / "eval" / "results.md").is_file()
    assert "stage: all" in (run.path / "config.yaml").read_text(), "jobs never rewrite it"
    # the evaluation an assembly job on several GPUs runs after it (torchrun, here two
    # processes on the CPU): the run's table again, from both
    env = {**os.environ, JOB_ENV: last["name"], "TMPDIR": str(tmp_path)}
    evaluated = subprocess.run(
        evaluate_command(run, 2), cwd=ROOT, env=env, capture_output=True, text=True, timeout=300
    )
    assert evaluated.returncode == 0, evaluated.stderr[-3000:]
    assert json.loads(run.eval_file("json").read_text())["processes"] == 2

    # Train one named sub-net again, through SLURM: its files and its job's checkpoints
    # go at submission, one task trains it from the stage-1 backbone, the others stay.
    others = {k: run.subnet_file(k).stat().st_mtime_ns for k in (0, 2)}
    weights = _subnets(run.path)
    submitted = train(run.config_for_resume(str(run.path), ["stage=2", "stage2.subnets=[1]"]))
    assert submitted.results is None and not run.finished
    assert run.missing_subnets(3) == [1]
    plan = json.loads((run.slurm_dir / "submitted.json").read_text())
    ((task,),), (assembly,) = plan["jobs"][0]["array"], plan["jobs"][1]["commands"]
    assert task[6:10] == ["stage=2", "stage2.jobs=1", "stage2.group=0", "stage2.subnets=[1]"]
    run_job("again", task)
    run_job("assemble", assembly)
    assert run.finished
    assert {k: run.subnet_file(k).stat().st_mtime_ns for k in (0, 2)} == others
    _assert_identical(weights, _subnets(run.path))  # the same seed, the same sub-net


def test_slurm_takes_the_single_model_to_its_results(tmp_path, monkeypatch):
    # The assembly job's stage=assemble was refused for method=single, so a single
    # model submitted to SLURM trained and never reached its results.
    _fake_slurm(tmp_path / "bin")
    monkeypatch.setenv("PATH", f"{tmp_path / 'bin'}:{os.environ['PATH']}")
    overrides = smoke_overrides(
        tmp_path, "method=single", "launcher=slurm", "slurm.gpus_per_node=0", "eval.plots=false"
    )
    run = RunFolder(train(load_config(SMOKE, overrides)).run_dir)
    plan = json.loads((run.slurm_dir / "submitted.json").read_text())
    assert [len(job["commands"]) for job in plan["jobs"]] == [1, 1]
    with pytest.raises(ConfigError, match=r"stage=assemble: stage 1 of .* is not finished"):
        train(run.config_for_resume(str(run.path), ["stage=assemble", "launcher=local"]))
    for job in plan["jobs"]:  # in order, as the chain runs them
        with monkeypatch.context() as m:
            m.setenv(JOB_ENV, job["name"])
            assert cli.train_main(job["commands"][0][4:]) == 0, job["commands"][0]
    assert run.finished and (run.path / "eval" / "results.md").is_file()


def test_a_chain_that_failed_half_way_is_still_seen_in_the_queue(tmp_path, monkeypatch, capsys):
    # stage 1 was submitted, then SLURM refused the stage-2 array: the queued stage-1
    # job is recorded, so submitting again while it waits is refused
    calls = _fake_slurm(tmp_path / "bin")
    monkeypatch.setenv("PATH", f"{tmp_path / 'bin'}:{os.environ['PATH']}")
    (tmp_path / "bin" / "fail_at").write_text("1001")
    overrides = smoke_overrides(tmp_path, "launcher=slurm", "slurm.gpus_per_node=0")
    with pytest.raises(ConfigError) as refused:  # was submitit's 45-line traceback
        train(load_config(SMOKE, overrides))
    assert re.fullmatch(
        r"launcher=slurm: sbatch refused a job \(.*sbatch: error: QOSMaxSubmitJobPerUserLimit"
        r".*\); the jobs before it \(1000\) are queued: scancel them. Submit again once its "
        r"cause is mended \(a limit of the queue, or a slurm.\* setting: add slurm.<key>=... to "
        rf"the command\): python train.py resume={tmp_path / 'run'}",
        str(refused.value),
    ), str(refused.value)
    assert "QOSMaxSubmitJobPerUserLimit" not in capsys.readouterr().err, "said once, in the error"
    run = RunFolder(tmp_path / "run")
    assert [
        j["job_id"] for j in json.loads((run.slurm_dir / "submitted.json").read_text())["jobs"]
    ] == ["1000"]
    (tmp_path / "bin" / "queue").write_text("1000\n")
    with pytest.raises(ConfigError, match=r"jobs 1000 of this run's last submission"):
        train(run.config_for_resume(str(run.path), []))
    assert sorted(p.name for p in calls.iterdir()) == ["1000.sh"]
    # a damaged record (a full disk, an edit) is named, one line (was a JSONDecodeError's
    # traceback), with what to do
    record = run.slurm_dir / "submitted.json"
    named = r"submitted.json cannot be read \(.*damaged; once squeue"
    for damaged in ('{"jobs": [{"job_id": "1000"', '{"jobs": [{"name": "stage1"}]}'):
        record.write_text(damaged)
        with pytest.raises(ConfigError, match=named):
            train(run.config_for_resume(str(run.path), []))
    assert sorted(p.name for p in calls.iterdir()) == ["1000.sh"]


def test_a_resume_says_when_started_jobs_keep_it_from_stage2_jobs(tmp_path):
    # stage2.jobs given to a resume was silently not what ran: jobs that had saved a
    # checkpoint continue with their sub-nets, the rest are balanced into what is left
    from types import SimpleNamespace

    folder = RunFolder(tmp_path / "run")
    for age, subnets in enumerate(([0, 1], [2])):  # the furthest (latest saved) first
        job = folder.last_checkpoint(2, job_name(subnets))
        job.parent.mkdir(parents=True)
        job.write_bytes(b"")
        os.utime(job, (1e9 - age, 1e9 - age))
        (job.parents[1] / "subnets.json").write_text(json.dumps(subnets))

    def plan(jobs: int) -> list[list[int]]:
        cfg = load_config(SMOKE, [f"stage2.jobs={jobs}", "clustering.num_clusters=5"])
        dm = SimpleNamespace(cluster_train_images=lambda: [9, 8, 7, 6, 5])
        run = SimpleNamespace(cfg=cfg, folder=folder, dm=dm)
        return pipeline._plan_stage2(run, SimpleNamespace(num_clusters=5))[0]

    with pytest.warns(UserWarning, match=r"stage2.jobs=1, but 2 job\(s\) of the run had started "
                      r"\(subnets-0-1, subnets-2\) .* stage 2 runs as 3 job\(s\)"):  # fmt: skip
        assert plan(1) == [[0, 1], [2], [3, 4]]
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        assert plan(4) == [[0, 1], [2], [3], [4]]  # as asked: no word
    # the count unchanged, one job finished and another stopped: fewer groups, no word
    # (it told a plain resume to retrain from the stage-1 backbone; a review)
    assert balanced_groups([9, 8, 7, 6, 5], range(5), 2) == [[0, 3, 4], [1, 2]]
    shutil.rmtree(folder.stage_dir(2, job_name([0, 1])))
    shutil.rmtree(folder.stage_dir(2, job_name([2])))
    job = folder.last_checkpoint(2, job_name([1, 2]))
    job.parent.mkdir(parents=True)
    job.write_bytes(b"")
    (job.parents[1] / "subnets.json").write_text("[1, 2]")
    for k in (0, 3, 4):  # the other job's sub-nets are finished
        folder.subnet_file(k).parent.mkdir(parents=True, exist_ok=True)
        folder.subnet_file(k).write_bytes(b"weights")
        folder.subnet_file(k, ".json").write_text(json.dumps({"cluster": k}))
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        assert plan(2) == [[1, 2]]


def test_slurm_additional_may_not_replace_what_the_launcher_sets(tmp_path, monkeypatch):
    # {dependency: singleton} replaced the afterok chain in every job: the stage-2 array
    # could start before stage 1 had clustered; time replaced slurm.time_min
    calls = _fake_slurm(tmp_path / "bin")
    monkeypatch.setenv("PATH", f"{tmp_path / 'bin'}:{os.environ['PATH']}")
    slurm = ("launcher=slurm", "slurm.gpus_per_node=0")
    for given, refused in {
        "{dependency: singleton}": r"slurm.additional.dependency: --dependency is the launcher's",
        "{depend: singleton}": r"slurm.additional.depend: --dependency is the launcher's",
        "{time: '2-00:00:00'}": r"--time is the launcher's .* set it with slurm.time_min",
        "{open_mode: truncate}": r"--open-mode is the launcher's to set",
    }.items():
        overrides = smoke_overrides(tmp_path, *slurm, f"slurm.additional={given}")
        with pytest.raises(ConfigError, match=refused):
            train(load_config(SMOKE, overrides))
    mem = smoke_overrides(tmp_path, *slurm, "slurm.mem_gb=64", "slurm.additional={mem: 0}")
    with pytest.raises(ConfigError, match=r"--mem is the launcher's .* slurm.mem_gb"):
        train(load_config(SMOKE, mem))
    assert not calls.exists() and not (tmp_path / "run").exists(), "nothing submitted or written"

    # --mem=0 (all of a node's memory) is the user's where slurm.mem_gb is unset; a key
    # set to null is left out, the one way an override removes a key a run was saved with
    extra = "slurm.additional={mem: 0, dependency: singleton, constraint: a100}"
    overrides = smoke_overrides(tmp_path, *slurm, extra, "slurm.additional.dependency=null")
    train(load_config(SMOKE, overrides))
    script = (calls / "1000.sh").read_text()
    assert "#SBATCH --mem=0" in script and "#SBATCH --constraint=a100" in script
    assert "--dependency" not in script and "None" not in script
    assert "#SBATCH --dependency=afterok:1000" in (calls / "1001.sh").read_text()


def test_no_sbatch_here_names_the_command_the_user_ran(tmp_path, monkeypatch):
    # under `facecluster train` (an installed package, no train.py) it said "run
    # train.py on the cluster's login node"
    from facecluster.config import COMMAND

    monkeypatch.setenv("PATH", str(tmp_path))  # neither sbatch nor srun
    cfg = load_config(SMOKE, smoke_overrides(tmp_path, "launcher=slurm"))
    for command in ("python train.py", "facecluster train"):
        monkeypatch.setitem(COMMAND, "train", command)
        with pytest.raises(ConfigError) as err:
            launch.check_slurm(cfg)
        assert str(err.value) == (
            "launcher=slurm: sbatch and srun not found on PATH, so no SLURM job can be "
            f"submitted from here: run `{command}` on the cluster's login node, or use "
            "launcher=local"
        )


def test_slurm_jobs_get_one_task_per_gpu_on_every_node(tmp_path, monkeypatch):
    calls = _fake_slurm(tmp_path / "bin")
    monkeypatch.setenv("PATH", f"{tmp_path / 'bin'}:{os.environ['PATH']}")
    overrides = smoke_overrides(
        tmp_path, "launcher=slurm", "slurm.nodes=2", "slurm.gpus_per_node=4", "slurm.mem_gb=200"
    )
    result = train(load_config(SMOKE, overrides))
    stage1, array, assemble = ((calls / f"{n}.sh").read_text() for n in (1000, 1001, 1002))
    for line in ("--nodes=2", "--ntasks-per-node=4", "--gpus-per-node=4", "--mem=200GB"):
        assert f"#SBATCH {line}" in stage1 and f"#SBATCH {line}" in array
    assert "--array" not in array, "stage2.jobs=1: one job, not an array"
    # the assembly: one task on one node's 4 GPUs (its evaluation starts a process each)
    assert "#SBATCH --gpus-per-node=4" in assemble and "#SBATCH --nodes=1" in assemble
    assert "#SBATCH --ntasks-per-node=1" in assemble and "#SBATCH --cpus-per-task=32" in assemble
    # one task that fails ends the job's others (they waited in a collective until its
    # timeout, holding their GPUs)
    for script in (stage1, array, assemble):
        [srun] = [line for line in script.splitlines() if line.startswith("srun ")]
        assert "--kill-on-bad-exit=1" in srun.split() and "submitit.core._submit" in srun
    plan = json.loads((result.run_dir / "slurm" / "submitted.json").read_text())
    assert [c[0][6:9] for c in plan["jobs"][1]["array"]] == [
        ["stage=2", "stage2.jobs=1", "stage2.group=0"]
    ]
    command = plan["jobs"][0]["commands"][0]
    assert command[-3:] == ["trainer.accelerator=gpu", "trainer.devices=4", "trainer.num_nodes=2"]


def test_a_trainer_setting_lightning_refuses_is_refused_before_submission(tmp_path, monkeypatch):
    # the login node built no Trainer: a typo was found by the stage-1 job, once it had
    # waited in the queue and started on its node
    calls = _fake_slurm(tmp_path / "bin")
    monkeypatch.setenv("PATH", f"{tmp_path / 'bin'}:{os.environ['PATH']}")
    slurm = ("launcher=slurm", "slurm.gpus_per_node=4", "slurm.nodes=2")
    refused = r"trainer: Lightning refuses .*trainer.strategy=foo.*invalid strategy name"
    with pytest.raises(ConfigError, match=refused) as submitted:
        train(load_config(SMOKE, smoke_overrides(tmp_path, *slurm, "trainer.strategy=foo")))
    with pytest.raises(ConfigError) as local:
        train(load_config(SMOKE, smoke_overrides(tmp_path, "trainer.strategy=foo")))
    assert str(submitted.value) == str(local.value), "the message a local run gives"
    assert not calls.exists() and not (tmp_path / "run").exists(), "nothing submitted or written"
    # what the jobs' nodes decide is theirs to check: GPUs and nodes this machine lacks
    # (the command lines set them from slurm.*), and a world that srun launches
    nodes = ("trainer.accelerator=gpu", "trainer.devices=4", "trainer.num_nodes=2")
    monkeypatch.delenv("MASTER_ADDR", raising=False)
    # submitted from inside an allocation of 4 tasks (an sbatch script around train.py):
    # no job's world either (Lightning's SLURM check refused it with a traceback)
    for name, value in {
        "SLURM_NTASKS": "4",
        "SLURM_JOB_NAME": "driver",
        "SLURM_JOB_ID": "7",
    }.items():
        monkeypatch.setenv(name, value)
    train(load_config(SMOKE, smoke_overrides(tmp_path, *slurm, *nodes, "trainer.strategy=ddp")))
    assert len(list(calls.iterdir())) == 3


def test_stage_2_of_some_sub_nets_trains_them_and_the_last_one_assembles(tmp_path, caplog):
    # sub-nets trained a few at a time (stage=2 stage2.subnets=[...], by hand on several
    # machines): each command names those still to train and writes no results; the
    # one that trains the last assembles, leaving the finished sub-nets' files alone
    cfg = load_config(SMOKE, smoke_overrides(tmp_path, "stage=1"))
    run = RunFolder(train(cfg).run_dir)
    train(run.config_for_resume(str(run.path), ["stage=cluster"]))
    with caplog.at_level(logging.INFO):
        some = train(run.config_for_resume(str(run.path), ["stage=2", "stage2.subnets=[1]"]))
    assert some.results is None and not (run.path / "results.json").exists()
    assert run.missing_subnets(3) == [0, 2]
    still = "sub-nets [0, 2] are still to train; the results come when they are"
    assert f"{still} (`{resume_command(run.path)}`)" in caplog.text
    one = run.subnet_file(1)
    made = (one.read_bytes(), one.stat().st_mtime_ns)
    rest = train(run.config_for_resume(str(run.path), ["stage=2"]))
    assert rest.results is not None and (run.path / "results.json").is_file()
    assert run.missing_subnets(3) == [] and (one.read_bytes(), one.stat().st_mtime_ns) == made


def test_stage_rules_name_what_is_missing(tmp_path, monkeypatch):
    cfg = load_config(SMOKE, smoke_overrides(tmp_path, "stage=1"))
    first = train(cfg)
    run = RunFolder(first.run_dir)
    assert first.results is None and run.has_stage_summary(1)
    assert not run.clusters_path.exists(), "stage=1 is stage 1 alone"
    saved = (run.path / "config.yaml").read_bytes()
    with pytest.raises(ConfigError, match="stage=2: .*clusters.pt is missing.*stage=cluster"):
        train(run.config_for_resume(str(run.path), ["stage=2"]))
    # nor submitted to SLURM, where the jobs could only fail; the run is left as it was
    _fake_slurm(tmp_path / "bin")
    monkeypatch.setenv("PATH", f"{tmp_path / 'bin'}:{os.environ['PATH']}")
    slurm = ["launcher=slurm", "slurm.gpus_per_node=0"]
    for stage in ("stage=2", "stage=assemble"):
        with pytest.raises(ConfigError, match=f"{stage}: .*clusters.pt is missing"):
            train(run.config_for_resume(str(run.path), [stage, *slurm]))
    assert not run.slurm_dir.exists() and (run.path / "config.yaml").read_bytes() == saved
    monkeypatch.undo()
    train(run.config_for_resume(str(run.path), ["stage=cluster"]))
    assert run.clusters_path.is_file() and not run.path.joinpath("stage2").exists()
    # a retrain refused while a job trains leaves the config as it was: the next
    # resume would continue that job with the refused learning rate
    saved = (run.path / "config.yaml").read_bytes()
    with run.job_lock("subnets-0-2", [0, 1, 2]):
        with pytest.raises(ConfigError, match="job subnets-0-2 is training now"):
            retrain = ["stage=2", "stage2.subnets=[1]", "stage2.optim.lr=0.5"]
            train(run.config_for_resume(str(run.path), retrain))
    assert (run.path / "config.yaml").read_bytes() == saved
    # so is any resume while a command trains the run: it wrote its overrides before a
    # lock refused it, and the training command's printed resume then took them up
    with run.job_lock("subnets-0-2", [0, 1, 2]):
        with pytest.raises(ConfigError, match=r"resume=.*: the run is training now \(host"):
            train(run.config_for_resume(str(run.path), ["stage2.max_epochs=7"]))
    assert (run.path / "config.yaml").read_bytes() == saved
    # a job that has trained 4 epochs: fewer for stage 2 are refused before any write
    # (Lightning refused its checkpoint at the fit, and at every later resume)
    run.save_job([0, 1, 2])
    last = run.last_checkpoint(2, "subnets-0-2")
    last.parent.mkdir(parents=True)
    torch.save({**torch.load(run.last_checkpoint(1), weights_only=False), "epoch": 3}, last)
    fewer = r"has trained 4 epochs \(stage2/jobs/subnets-0-2/checkpoints/last.ckpt\); 2 "
    with pytest.raises(ConfigError, match=r"stage 2 of .* " + fewer + r"\(stage2.max_epochs\)"):
        run.config_for_resume(str(run.path), ["stage2.max_epochs=2"])
    run.config_for_resume(str(run.path), ["stage2.max_epochs=4"])
    shutil.rmtree(run.stage_dir(2, "subnets-0-2"))
    with pytest.raises(ConfigError, match=r"sub-nets \[0, 1, 2\] .* are not trained"):
        train(run.config_for_resume(str(run.path), ["stage=assemble"]))
    with pytest.raises(ConfigError, match="stage=cluster: method=single"):
        load_config(SMOKE, ["method=single", "stage=cluster"])
    # without resume=, the advice named a new run folder that its own command refused
    for stage in ("stage=cluster", "stage=2", "stage=assemble"):
        new = load_config(SMOKE, [f"output_dir={tmp_path / 'new'}", stage])
        with pytest.raises(ConfigError, match=f"{stage} continues a run: give resume="):
            train(new)
    assert not (tmp_path / "new").exists()
    with pytest.raises(ConfigError, match="stage2.jobs=4 is more than clustering.num_clusters=3"):
        load_config(SMOKE, ["clustering.num_clusters=3", "stage2.jobs=4"])


def test_each_job_logs_to_its_own_wandb_run_in_the_run_group(tmp_path):
    cfg = load_config(SMOKE, ["logger=wandb", "wandb.mode=offline"])
    main = build_logger(cfg, tmp_path / "myrun", "abc123")
    job = build_logger(cfg, tmp_path / "myrun", "abc123", "subnets-0-2")
    assert main.version == "abc123" and job.version == "abc123-subnets-0-2"
    # group and name have no public accessor before W&B starts the run
    assert main._wandb_init["group"] == job._wandb_init["group"] == "myrun"
    assert job._wandb_init["name"] == "myrun/subnets-0-2"


TORCHRUN = (
    "torchrun --standalone --nproc_per_node=2 train.py -c configs/smoke.yaml run_name=torchrun "
    "stage=1 trainer.accelerator=cpu trainer.devices=2 trainer.strategy=ddp"
)


@pytest.mark.ddp
def test_a_local_job_started_under_torchrun_is_not_a_torchrun_worker(monkeypatch):
    # train.py under torchrun starting local stage-2 jobs: each job is a run of its own,
    # but with torchrun's TORCHELASTIC_RUN_ID left in its environment Lightning took it
    # for a torchrun worker and read the LOCAL_RANK the job no longer has (KeyError)
    from unittest import mock

    from lightning.fabric.plugins.environments import TorchElasticEnvironment

    from facecluster.launch import job_environment

    torchrun = {
        "RANK": "0", "LOCAL_RANK": "0", "WORLD_SIZE": "1", "GROUP_RANK": "0",
        "LOCAL_WORLD_SIZE": "1", "GROUP_WORLD_SIZE": "1", "ROLE_RANK": "0",
        "ROLE_NAME": "default", "ROLE_WORLD_SIZE": "1", "MASTER_ADDR": "127.0.0.1",
        "MASTER_PORT": "29500", "TORCHELASTIC_RUN_ID": "none",
        "TORCHELASTIC_RESTART_COUNT": "0", "TORCHELASTIC_MAX_RESTARTS": "0",
        "TORCHELASTIC_USE_AGENT_STORE": "True", "TORCHELASTIC_ERROR_FILE": "/tmp/x.json",
    }  # fmt: skip
    for key, value in torchrun.items():
        monkeypatch.setenv(key, value)
    assert TorchElasticEnvironment.detect()
    env = job_environment("subnets-0-1", local=True)
    assert not set(torchrun) & set(env)
    with mock.patch.dict(os.environ, env, clear=True):
        assert not TorchElasticEnvironment.detect()


def test_documented_torchrun_stage1_writes_one_run_folder(tmp_path):
    # docs/TRAINING.md's torchrun form as written: 2 gloo processes that torchrun
    # starts together (Lightning starts none), one run folder, stage 1 alone.
    assert TORCHRUN in " ".join((ROOT / "docs" / "TRAINING.md").read_text().split())
    for name in ("train.py", "configs"):
        (tmp_path / name).symlink_to(ROOT / name)
    command = [str(Path(sys.executable).parent / "torchrun"), *TORCHRUN.split()[1:]]
    proc = subprocess.run(
        command, cwd=tmp_path, env=_env(), capture_output=True, text=True, timeout=480
    )
    assert proc.returncode == 0, proc.stderr[-4000:]
    assert sorted(p.name for p in (tmp_path / "runs").iterdir()) == [".cache", "torchrun"]
    run = RunFolder(tmp_path / "runs" / "torchrun")
    assert run.has_stage_summary(1) and not run.clusters_path.exists()
    assert "stage=1 done" in proc.stdout + proc.stderr


def test_documented_two_node_torchrun_form_trains_one_run_on_one_machine(tmp_path):
    # docs/TRAINING.md's torchrun across nodes (--nnodes=2, one command per node), here
    # two torchrun agents on this machine, one process each: node 1's process joins
    # node 0's world (trainer.num_nodes=2 is neither refused nor a second run) and
    # node 0 alone writes the run folder and its last line
    documented = " ".join((ROOT / "docs" / "TRAINING.md").read_text().split())
    assert "torchrun --nnodes=2 --nproc_per_node=8 --node_rank=$NODE_RANK" in documented
    for name in ("train.py", "configs"):
        (tmp_path / name).symlink_to(ROOT / name)
    with socket.socket() as s:  # a free port for node 0's rendezvous
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    command = [
        str(Path(sys.executable).parent / "torchrun"), "--nnodes=2", "--nproc_per_node=1",
        "--master_addr=127.0.0.1", f"--master_port={port}", "train.py", "-c",
        "configs/smoke.yaml", "run_name=nodes", "stage=1", "trainer.devices=1",
        "trainer.num_nodes=2", "trainer.strategy=ddp",
    ]  # fmt: skip
    nodes = [
        subprocess.Popen(
            [*command[:3], f"--node_rank={rank}", *command[3:]],
            cwd=tmp_path,
            env=_env(),
            stdout=subprocess.PIPE,
            stderr=subprocess.STDOUT,
            text=True,
        )
        for rank in (0, 1)
    ]
    said = [node.communicate(timeout=480)[0] for node in nodes]
    assert [node.returncode for node in nodes] == [0, 0], said[0][-3000:] + said[1][-3000:]
    assert sorted(p.name for p in (tmp_path / "runs").iterdir()) == [".cache", "nodes"]
    run = RunFolder(tmp_path / "runs" / "nodes")
    assert run.has_stage_summary(1) and not run.clusters_path.exists()
    assert "MEMBER: 2/2" in said[1] and "stage=1 done" not in said[1]
    assert said[0].rstrip().endswith("stage=1 done; run folder: " + str(run.path))


def test_callbacks_given_to_train_are_refused_where_stage_2_trains_in_jobs(tmp_path):
    # train(cfg, callbacks=[...]) added them to this process's Trainers alone: stage 2's
    # local or SLURM jobs ran without them, without a word (a review)
    for jobs, said in (
        (["launcher=local", "stage2.jobs=2"], "stage2.jobs"),
        (["launcher=slurm"], "launcher=slurm"),
    ):
        cfg = load_config(SMOKE, smoke_overrides(tmp_path, *jobs))
        with pytest.raises(
            ConfigError, match=rf"train\(callbacks=\[Callback\]\): {said} trains in"
        ):
            train(cfg, callbacks=[L.Callback()])
    assert not (tmp_path / "run").exists()  # before any work


def test_a_job_that_is_training_is_not_trained_twice(tmp_path, monkeypatch):
    # A second process for the same stage-2 job (a second submission, a resume while
    # jobs still run) is refused; a lock left by a process that is gone is taken over.
    run = RunFolder(tmp_path / "run")
    with run.job_lock("subnets-0-2"):
        lock = run.stage_dir(2, "subnets-0-2") / "running.json"
        assert json.loads(lock.read_text())["pid"] == os.getpid()
        with pytest.raises(ConfigError, match=r"subnets-0-2 is already training .*pid"):
            with run.job_lock("subnets-0-2"):
                pass
    assert not lock.exists()
    gone = subprocess.run([sys.executable, "-c", "import os; print(os.getpid())"],
                          capture_output=True, text=True, check=True)  # fmt: skip
    lock.write_text(json.dumps({"host": os.uname().nodename, "pid": int(gone.stdout)}))
    with run.job_lock("subnets-0-2"):  # its process has ended: taken over
        assert json.loads(lock.read_text())["pid"] == os.getpid()
    lock.write_text(json.dumps({"host": "elsewhere", "pid": 1, "slurm_job": "77"}))
    monkeypatch.setenv("SLURM_JOB_ID", "77")
    monkeypatch.setenv("SLURM_RESTART_COUNT", "1")
    with run.job_lock("subnets-0-2"):  # the same SLURM job, requeued: taken over
        pass
    # the same SLURM job and restart, a live process (two commands under one salloc)
    here = {"host": os.uname().nodename, "pid": os.getpid(), "slurm_job": "77"}
    lock.write_text(json.dumps({**here, "slurm_restart": "1"}))
    with pytest.raises(ConfigError, match=r"already training .*SLURM job 77"):
        with run.job_lock("subnets-0-2"):
            pass
    # a lock whose owner failed while writing it (a full disk): none is left now, and
    # an empty one an earlier version left is waited for briefly, then taken over (every
    # later run of the job, and restart_subnets, waited or refused forever)
    lock.unlink()
    monkeypatch.setattr(Path, "write_text", _full_disk)
    with pytest.raises(OSError, match="No space left"):
        with run.job_lock("subnets-0-2"):
            pass
    monkeypatch.undo()
    assert list(lock.parent.iterdir()) == []
    lock.write_text("")
    old = time.time() - 60
    os.utime(lock, (old, old))
    with run.job_lock("subnets-0-2"):
        assert json.loads(lock.read_text())["pid"] == os.getpid()
    lock.write_text("")
    os.utime(lock, (old, old))
    run.restart_subnets([[0, 1]])

    # a filesystem without hard links (an object-store mount): created exclusively
    def no_links(*args):
        raise PermissionError(1, "Operation not permitted")

    monkeypatch.setattr(os, "link", no_links)
    with run.job_lock("subnets-0-2"):
        assert json.loads(lock.read_text())["pid"] == os.getpid()
        with pytest.raises(ConfigError, match="already training"):
            with run.job_lock("subnets-0-2"):
                pass


def test_a_lock_taken_over_while_its_holder_ends_is_left_to_the_new_holder(tmp_path, monkeypatch):
    # A requeued SLURM job takes over the lock of its earlier run (another restart
    # count) while that run's process may still be ending; the ending process then
    # removed the new holder's lock on its way out, and a third command trained beside it.
    run = RunFolder(tmp_path / "run")
    successor = {"host": "node-b", "pid": 7, "slurm_job": "77", "slurm_restart": "1"}
    for lock_of in (run.stage1_lock, lambda: run.job_lock("subnets-0", [0])):
        with lock_of():
            lock = next((tmp_path / "run").rglob("running.json"))
            lock.write_text(json.dumps(successor))  # taken over meanwhile
        assert json.loads(lock.read_text()) == successor, "the new holder's lock is kept"
        lock.unlink()
        with lock_of():
            pass
        assert not lock.exists(), "its own lock is let go"


def test_the_same_subnets_grouped_otherwise_never_train_twice(tmp_path):
    # A lock per job name let a second command with another stage2.jobs train the
    # sub-nets of a job still in its first epoch (no checkpoint yet) under other
    # names; and a retrain of named sub-nets left the job folders of another grouping,
    # whose checkpoints the next resume then continued instead of starting over.
    run = RunFolder(tmp_path / "run")
    with run.job_lock("subnets-0-2", [0, 1, 2]):
        with pytest.raises(
            ConfigError,
            match=r"job subnets-1 would train sub-nets \[1\], which job subnets-0-2 is training",
        ):
            with run.job_lock("subnets-1", [1]):
                pass
        assert not (run.stage_dir(2, "subnets-1") / "running.json").exists()
        with run.job_lock("subnets-3", [3]):  # other sub-nets: beside it
            pass
    # an earlier facecluster's lock names no sub-nets: the job's subnets.json does
    run.save_job([0, 1, 2])
    old = run.stage_dir(2, "subnets-0-2") / "running.json"
    old.write_text(json.dumps({"host": os.uname().nodename, "pid": os.getpid()}))
    with pytest.raises(ConfigError, match=r"sub-nets \[2\], which job subnets-0-2"):
        with run.job_lock("subnets-2_4", [2, 4]):
            pass
    old.unlink()
    (run.stage_dir(2, "subnets-0-2") / "checkpoints").mkdir()
    (run.stage_dir(2, "subnets-0-2") / "checkpoints" / "last.ckpt").write_bytes(b"")
    run.save_job([3])
    run.restart_subnets([[0], [1]])  # sub-nets 0 and 1 start over, whatever grouped them
    assert not run.stage_dir(2, "subnets-0-2").exists() and run.started_jobs() == []
    assert run.stage_dir(2, "subnets-3").is_dir()


def test_a_lock_of_a_pid_now_another_process_is_taken_over(tmp_path):
    # a container restarted runs train.py as pid 1 again: its lock named a live pid (the
    # resuming process itself) and every restart was refused as "already running"
    from facecluster.run import _lock_owner

    run = RunFolder(tmp_path / "run")
    run.save_job([0])
    lock = run.stage_dir(2, "subnets-0") / "running.json"
    me = _lock_owner()
    boot, ticks = me["started"].split()
    lock.write_text(json.dumps({**me, "subnets": [0], "started": f"{boot} {int(ticks) - 1}"}))
    with run.job_lock("subnets-0", [0]):  # the pid's process started later: stale
        assert json.loads(lock.read_text())["started"] == me["started"]
    lock.write_text(json.dumps({**me, "subnets": [0], "launch": "another"}))  # this process
    with pytest.raises(ConfigError, match="already"), run.job_lock("subnets-0", [0]):
        pass
    # where /proc hides other users' processes (hidepid), an unreadable start is no
    # proof of another process: another user's live lock is kept (a re-review)
    from unittest import mock

    from facecluster import run as run_module

    with mock.patch.object(run_module, "_process_start", return_value=None):
        assert not run_module._lock_is_stale({**me, "launch": "another"}, me)


def test_the_other_ranks_of_a_retrain_leave_the_busy_check_to_rank_zero(tmp_path, monkeypatch):
    # Lightning starts the other DDP ranks inside rank 0's job lock: there they took
    # that live lock for another process training, and stage=2 stage2.subnets=[...]
    # under DDP stopped on rank 1.
    from lightning.pytorch.utilities import rank_zero_only

    run = RunFolder(tmp_path / "run")
    run.save_job([0, 1])
    with run.job_lock("subnets-0-1", [0, 1]):  # rank 0, training the retrain
        monkeypatch.setattr(rank_zero_only, "rank", 1)
        run.restart_subnets([[0, 1]])
        assert run.stage_dir(2, "subnets-0-1").is_dir(), "only rank 0 deletes"
        monkeypatch.setattr(rank_zero_only, "rank", 0)
        with pytest.raises(ConfigError, match="job subnets-0-1 is training now"):
            run.restart_subnets([[0, 1]])
    # srun's (or torchrun's) ranks: rank 0 decides alone (a rank on another node cannot
    # tell a lock left there by a process that is gone from a live one)
    for name, value in (("SLURM_STEP_ID", "0"), ("SLURM_NTASKS", "2"), ("SLURM_JOB_ID", "9")):
        monkeypatch.setenv(name, value)
    with run.job_lock("subnets-0-1", [0, 1]):
        monkeypatch.setattr(rank_zero_only, "rank", 1)
        run.check_no_job_training()
        monkeypatch.setattr(rank_zero_only, "rank", 0)
        with pytest.raises(ConfigError, match="job subnets-0-1 is training now"):
            run.check_no_job_training()  # its own launch's lock too: launch ids repeat


def test_the_other_srun_tasks_refuse_an_existing_run_folder_as_rank_0_does(tmp_path, monkeypatch):
    # Only rank 0 refused a run_name that exists: the other tasks went on into DDP
    # setup and waited there for it until the timeout (srun does not stop them).
    from lightning.pytorch.utilities import rank_zero_only

    cfg = load_config(SMOKE, smoke_overrides(tmp_path))
    old = RunFolder.for_training(cfg)
    monkeypatch.setenv(RUN_DIR_ENV, "")  # create() sets it for the ranks Lightning starts
    old.create(new=True)
    old.save_config(cfg)  # an earlier run: its run.json names no launch of srun
    monkeypatch.setenv(RUN_DIR_ENV, "")
    for name, value in (("SLURM_STEP_ID", "0"), ("SLURM_NTASKS", "2"), ("SLURM_JOB_ID", "9")):
        monkeypatch.setenv(name, value)
    for rank in (0, 1):
        monkeypatch.setattr(rank_zero_only, "rank", rank)
        with pytest.raises(ConfigError, match="already exists; pass resume="):
            RunFolder.for_training(cfg)
    # a new run, its folder left by an earlier command refused before its config: rank
    # 0 names this launch in run.json, keeping the W&B id; the other tasks wait for that
    (old.path / "config.yaml").unlink()
    run_id = old.run_id
    monkeypatch.setattr(rank_zero_only, "rank", 0)
    assert RunFolder.for_training(cfg).create(new=True) == run_id
    old.save_config(cfg)  # rank 0 went on: the other tasks come after it
    monkeypatch.setenv(RUN_DIR_ENV, "")
    monkeypatch.setattr(rank_zero_only, "rank", 1)
    assert RunFolder.for_training(cfg).create(new=True) == run_id
    monkeypatch.setenv(RUN_DIR_ENV, "")
    monkeypatch.setenv("SLURM_JOB_ID", "10")  # another launch: an existing run to it
    with pytest.raises(ConfigError, match="already exists; pass resume="):
        RunFolder.for_training(cfg)
    monkeypatch.setattr(rank_zero_only, "rank", 0)


def test_a_job_start_killed_while_recording_its_subnets_leaves_the_record_whole(
    tmp_path, monkeypatch
):
    # Every start of a job (a SLURM requeue too) records its sub-nets again while the
    # other jobs' resumes read the records (started_jobs): written in place, a start
    # killed mid-write left a half file that stopped every later resume.
    run = RunFolder(tmp_path / "run")
    run.save_job([0, 1])
    (run.stage_dir(2, "subnets-0-1") / "checkpoints").mkdir()
    (run.stage_dir(2, "subnets-0-1") / "checkpoints" / "last.ckpt").write_bytes(b"")
    write_text = Path.write_text

    def killed(path, text, *args, **kwargs):
        write_text(path, text[:2], *args, **kwargs)
        raise KeyboardInterrupt  # the process dies with half of it written

    monkeypatch.setattr(Path, "write_text", killed)
    with pytest.raises(KeyboardInterrupt):
        run.save_job([0, 1])
    monkeypatch.undo()
    assert run.started_jobs() == [[0, 1]]


def test_a_refusal_reaches_the_other_ranks_and_a_failed_check_leaves_no_lock(tmp_path, monkeypatch):
    # the holder marks its own lock checked after this job read it: the other ranks
    # still take the refusal (they waited out the 300 s timeout)
    from facecluster import run as run_module

    path, refused = tmp_path / "running.json", tmp_path / "refused.json"
    holder = {"host": "h", "pid": 1, "launch": "other", "subnets": [2], "checked": False}
    (tmp_path / "other.json").write_text(json.dumps({**holder, "checked": True}))
    refusal = {"launch": "mine", "error": "refused: shares sub-net 2", "holder": holder}
    refused.write_text(json.dumps({**refusal, "holder_lock": str(tmp_path / "other.json")}))
    # one look (timeout 0): a refusal it did not recognise would end in the timeout's error
    with pytest.raises(ConfigError, match="refused: shares sub-net 2"):
        run_module._wait_for_lock(path, refused, "mine", timeout=0)
    # the lock is taken, then its check fails (a full disk marking it checked): let go
    run = RunFolder(tmp_path / "run")
    real = run_module.replacing

    def full(target):
        if Path(target).name == "running.json":
            raise OSError(28, "No space left on device")
        return real(target)

    monkeypatch.setattr(run_module, "replacing", full)
    with pytest.raises(OSError, match="No space left"):
        with run.job_lock("subnets-5", [5]):
            pass
    assert not (run.stage_dir(2, "subnets-5") / "running.json").exists()


def _full_disk(self, *args, **kwargs):
    raise OSError(28, "No space left on device")


_SRUN_TASK = """
import os, sys, time
from pathlib import Path
from facecluster.config import ConfigError
from facecluster.run import RunFolder
run = Path(sys.argv[1])
joined = run.parent / "rank1-joined"
try:
    with RunFolder(run).job_lock("subnets-0-2", [0, 1, 2]):
        print("training", flush=True)
        # the ranks train together: rank 0 holds the lock until rank 1 is in, as DDP's
        # setup waits for it (a fixed second let rank 0 end before a rank 1 slowed by
        # a busy machine had seen the lock, which it then waited for: a CI run)
        if os.environ["SLURM_PROCID"] == "1":
            joined.touch()
        else:
            deadline = time.monotonic() + 100
            while not joined.exists() and time.monotonic() < deadline:
                time.sleep(0.05)
            joined.unlink(missing_ok=True)
except ConfigError as e:
    print(e)
    sys.exit(3)
"""


def _srun_step(run: Path, step: int) -> list[subprocess.CompletedProcess]:
    """The two tasks of srun step ``step`` (SLURM_PROCID 0 and 1) reaching the job lock."""
    env = {k: v for k, v in _env().items() if k not in ("RANK", "LOCAL_RANK", "WORLD_SIZE")}
    env.update(SLURM_JOB_ID="900", SLURM_STEP_ID=str(step), SLURM_NTASKS="2")
    tasks = [
        subprocess.Popen(
            [sys.executable, "-c", _SRUN_TASK, str(run)],
            cwd=ROOT,
            text=True,
            env={**env, "SLURM_PROCID": str(rank)},
            stdout=subprocess.PIPE,
        )  # fmt: skip
        for rank in (1, 0)  # rank 1 first: it reaches the lock before rank 0 decides
    ]
    return [
        subprocess.CompletedProcess(t.args, t.wait(timeout=120), t.stdout.read(), None)
        for t in reversed(tasks)
    ]


def test_every_srun_task_of_a_refused_job_stops(tmp_path):
    # A multi-task SLURM job whose job lock is held by a live process: rank 0 is
    # refused, and so is rank 1, which would otherwise enter training and wait for
    # rank 0 in DDP setup until the process-group timeout.
    run = RunFolder(tmp_path / "run")
    lock = run.stage_dir(2, "subnets-0-2") / "running.json"
    lock.parent.mkdir(parents=True)
    lock.write_text(json.dumps({"host": os.uname().nodename, "pid": os.getpid(), "slurm_job": "7"}))
    for task in _srun_step(run.path, 0):
        assert task.returncode == 3, task.stdout
        assert "subnets-0-2 is already training" in task.stdout and "SLURM job 7" in task.stdout
    assert json.loads(lock.read_text())["pid"] == os.getpid()  # the holder's lock is kept
    # the holder has ended: the same launch again (torchrun's static rendezvous repeats
    # its id) must not take the refusal left behind for its own; rank 0 takes the lock
    # over, and both train
    gone = subprocess.run([sys.executable, "-c", "import os; print(os.getpid())"],
                          capture_output=True, text=True, check=True)  # fmt: skip
    lock.write_text(json.dumps({"host": os.uname().nodename, "pid": int(gone.stdout)}))
    for task in _srun_step(run.path, 0):
        assert task.returncode == 0 and task.stdout == "training\n", task.stdout
    assert not lock.exists()
    # another job training one of its sub-nets: rank 0, having taken this job's lock,
    # lets it go and refuses; rank 1 neither trains on the lock nor waits for it
    other = run.stage_dir(2, "subnets-2_4") / "running.json"
    other.parent.mkdir(parents=True)
    here = {"host": os.uname().nodename, "pid": os.getpid(), "subnets": [2, 4]}
    other.write_text(json.dumps(here))
    # (rank 1 waiting for the lock instead would outlast _srun_step's 120 s: an error)
    for task in _srun_step(run.path, 1):
        assert task.returncode == 3, task.stdout
        assert "would train sub-nets [2], which job subnets-2_4 is training" in task.stdout
    assert not lock.exists() and other.is_file()


def test_local_jobs_that_cannot_fit_are_refused_before_any_work(tmp_path, monkeypatch):
    monkeypatch.setattr(launch, "_visible_gpus", lambda: ["0", "1"])
    # a machine with 2 GPUs: Lightning's own check (no GPU here) would refuse first
    monkeypatch.setattr(pipeline, "check_trainer", lambda cfg: None)
    jobs = ("stage2.jobs=3", "launcher.parallel=3")
    cfg = load_config(SMOKE, smoke_overrides(tmp_path, *jobs, "trainer.accelerator=gpu"))
    with pytest.raises(ConfigError, match=r"parallel=3 jobs x trainer.devices=1 need 3 GPUs"):
        train(cfg)
    launch.check_local_jobs(load_config(SMOKE, smoke_overrides(tmp_path, *jobs)))  # CPU jobs
    # a resume at stage2.jobs=1 continues the jobs an earlier stage2.jobs=3 started: 3
    one = load_config(
        SMOKE, smoke_overrides(tmp_path, "launcher.parallel=3", "trainer.accelerator=gpu")
    )
    launch.check_local_jobs(one)
    with pytest.raises(ConfigError, match=r"parallel=3 jobs x trainer.devices=1 need 3 GPUs"):
        launch.check_local_jobs(one, 3)
    monkeypatch.setenv("TORCHELASTIC_RUN_ID", "x")
    monkeypatch.setenv("WORLD_SIZE", "2")
    with pytest.raises(ConfigError, match="local jobs are started by one process, and "
                       "torchrun or srun started 2 here"):  # fmt: skip
        train(load_config(SMOKE, smoke_overrides(tmp_path, "stage2.jobs=2")))
    assert not (tmp_path / "run").exists(), "refused before the run folder was made"
    monkeypatch.delenv("TORCHELASTIC_RUN_ID")
    across = smoke_overrides(tmp_path, "stage2.jobs=2", "trainer.num_nodes=2")
    with pytest.raises(ConfigError, match="local jobs run on this node only"):
        launch.check_local_jobs(load_config(SMOKE, across))


@pytest.mark.timeout(60)
def test_a_job_that_cannot_start_fails_alone_and_frees_its_slot(tmp_path, monkeypatch):
    """Popen refused (too many open files): that job is reported failed with its log,
    the next job still gets the one slot and runs, and nothing hangs."""
    started = []

    class Started:
        pid = 4242

        def wait(self):
            return 0

    def popen(command, **kwargs):
        if "stage2.subnets=[0]" in command:
            raise OSError(24, "Too many open files")
        started.append(command)
        return Started()

    monkeypatch.setattr(launch.subprocess, "Popen", popen)
    run = RunFolder(tmp_path / "run")
    with pytest.raises(launch.JobsFailed, match=r"1 of 2 stage-2 jobs failed") as failed:
        launch.run_local(run, [[0], [1]], parallel=1)
    assert job_name([0]) in str(failed.value) and "exit code 127" in str(failed.value)
    log = run.job_log(job_name([0])).read_text()
    assert "could not start: [Errno 24] Too many open files" in log
    assert len(started) == 1 and "stage2.subnets=[1]" in started[0]


_LAUNCHER = """
import signal, sys, pathlib
if sys.argv[2:] == ["nohup"]:
    signal.signal(signal.SIGHUP, signal.SIG_IGN)
from facecluster import launch
from facecluster.run import RunFolder
folder = pathlib.Path(sys.argv[1])
# a job with another process in its process group, as Lightning starts a job's rank 1
job = "import os, pathlib, subprocess, sys, time"
job += "; other = subprocess.Popen([sys.executable, '-c', 'import time; time.sleep(120)'])"
job += "; pathlib.Path(sys.argv[1]).write_text(f'{os.getpid()} {other.pid}'); time.sleep(120)"
marker = lambda overrides: str(folder / overrides[-1].replace("=", "-"))
launch.train_command = lambda run, *o: [sys.executable, "-c", job, marker(o)]
launch.run_local(RunFolder(folder / "run"), [[0], [1]], parallel=1)
"""


def _first_stand_in_job(folder: Path) -> tuple[int, int]:
    """The pids of _LAUNCHER's first job (the only one started) and of the other process
    of its group, once it has started."""
    markers = []
    for _ in range(600):
        markers = list(folder.glob("stage2.subnets-*"))
        if markers and len(markers[0].read_text().split()) == 2:  # both written
            break
        time.sleep(0.1)
    assert len(markers) == 1, markers
    job, other = map(int, markers[0].read_text().split())
    return job, other


def _ended(pid: int, wait: float = 10.0) -> bool:
    """Whether process ``pid`` has ended within ``wait`` seconds (gone, or a zombie that
    its new parent has not reaped)."""
    stat = Path(f"/proc/{pid}/stat")
    for _ in range(int(wait * 10)):
        with contextlib.suppress(FileNotFoundError):
            if stat.read_text().rsplit(")", 1)[1].split()[0] not in "ZX":
                time.sleep(0.1)
                continue
        return True
    return False


def test_a_job_that_ends_on_its_own_leaves_no_process_of_its_group(tmp_path, monkeypatch):
    # a DDP job's rank 0 that ended without stopping its other ranks (the OOM killer, a
    # crash) left them waiting for it up to 30 minutes, holding their GPUs (a review): a
    # stand-in job that starts another process in its group and fails at once
    job = "import pathlib, subprocess, sys"
    job += "; other = subprocess.Popen([sys.executable, '-c', 'import time; time.sleep(120)'])"
    job += "; pathlib.Path(sys.argv[1]).write_text(str(other.pid)); sys.exit(3)"
    marker = tmp_path / "other"
    monkeypatch.setattr(
        launch, "train_command", lambda run, *o: [sys.executable, "-c", job, str(marker)]
    )
    with pytest.raises(launch.JobsFailed, match="exit code 3"):
        launch.run_local(RunFolder(tmp_path / "run"), [[0]], parallel=1)
    assert _ended(int(marker.read_text()))


@pytest.mark.timeout(120)
def test_a_stopped_local_launcher_stops_its_jobs(tmp_path):
    # kill, timeout or a scheduler's SIGTERM to the launcher alone left its running job
    # training as an orphan (its lock and GPU held, the next resume refused): the signal
    # now goes to the job, no other job starts, and the launcher ends by that signal
    launcher = subprocess.Popen([sys.executable, "-c", _LAUNCHER, str(tmp_path), "nohup"], cwd=ROOT)
    job, other = _first_stand_in_job(tmp_path)
    # under nohup a hangup stays ignored, by the launcher and its job
    launcher.send_signal(signal.SIGHUP)
    time.sleep(1.0)
    assert launcher.poll() is None
    os.kill(job, 0)
    launcher.send_signal(signal.SIGTERM)
    assert launcher.wait(timeout=60) == 128 + signal.SIGTERM
    with pytest.raises(ProcessLookupError):  # gone, and reaped by the launcher
        os.kill(job, 0)
    # the job ended by the signal's default action (Lightning's handler is installed
    # once its processes have met): the other process of its group, which waited for
    # it (a DDP job's rank 1, 30 minutes), ends with it (a review)
    assert _ended(other)
    assert len(list(tmp_path.glob("stage2.subnets-*"))) == 1  # the second never started


@pytest.mark.timeout(120)
@pytest.mark.parametrize("terminal", [False, True])
def test_ctrl_c_or_sigint_to_the_local_launcher_stops_its_job_once(tmp_path, terminal):
    # kill -INT of the launcher alone left its running job training (the launcher then
    # waited for it); a terminal's Ctrl-C (the whole foreground group) reached the job
    # directly. Now the job is in a session of its own and gets the launcher's SIGINT.
    launcher = subprocess.Popen(
        [sys.executable, "-c", _LAUNCHER, str(tmp_path)], cwd=ROOT, start_new_session=True
    )
    job, _ = _first_stand_in_job(tmp_path)
    assert os.getsid(job) == job != os.getsid(launcher.pid)  # out of the terminal's reach
    if terminal:
        os.killpg(launcher.pid, signal.SIGINT)
    else:
        launcher.send_signal(signal.SIGINT)
    assert launcher.wait(timeout=60) == -signal.SIGINT  # KeyboardInterrupt, uncaught
    with pytest.raises(ProcessLookupError):  # gone, and reaped by the launcher
        os.kill(job, 0)
    assert len(list(tmp_path.glob("stage2.subnets-*"))) == 1  # the second never started


@pytest.mark.faults  # a row of docs/RELIABILITY.md, with a real training job
@pytest.mark.timeout(300)
def test_sigterm_to_the_launcher_stops_its_training_job_lock_released_checkpoint_kept(tmp_path):
    # train.py with two local jobs, SIGTERM once the first job has saved an epoch: the
    # job stops at its next batch (Lightning's SIGTERM handling), letting go of its
    # lock; its last.ckpt is still a whole checkpoint; the second job never starts;
    # train.py ends by the signal.
    command = [
        sys.executable, *TWO_JOBS.split()[1:], "logger=none", "stage2.max_epochs=200",
        f"output_dir={tmp_path}", "run_name=run",
    ]  # fmt: skip
    log = open(tmp_path / "train.log", "wb")  # noqa: SIM115 (closed below)
    launcher = subprocess.Popen(command, cwd=ROOT, env=_env(), stdout=log, stderr=log)
    jobs = tmp_path / "run" / "stage2" / "jobs"
    saved = []
    for _ in range(1200):
        saved = list(jobs.glob("*/checkpoints/last.ckpt")) if jobs.is_dir() else []
        if saved or launcher.poll() is not None:
            break
        time.sleep(0.1)
    assert len(saved) == 1, (saved, launcher.poll(), (tmp_path / "train.log").read_text()[-3000:])
    launcher.send_signal(signal.SIGTERM)
    assert launcher.wait(timeout=120) == 128 + signal.SIGTERM
    log.close()
    assert list(jobs.glob("*/running.json")) == []  # a resume is not refused
    # the launcher unwound: its stage-1 lock let go (the signal's default action ended
    # it at once, leaving the lock), the resume command printed
    assert not (tmp_path / "run" / "stage1" / "running.json").exists()
    job = saved[0].parents[1]
    assert torch.load(saved[0], weights_only=False)["epoch"] >= 0
    (other,) = [p for p in jobs.iterdir() if p != job]  # the second job never started
    assert not (other / "checkpoints").exists()
    assert (
        "could not start: the launcher was stopped by signal 15" in (other / "log.txt").read_text()
    )
    # the console says so: neither job failed (before: "failed with exit code 127" for
    # the one that never started)
    said = (tmp_path / "train.log").read_text()
    assert f"stage 2: job {other.name} not started (SIGTERM)" in said
    assert re.search(rf"stage 2: job {job.name} stopped by SIGTERM \(", said)
    assert "failed with exit code" not in said
    assert f"python train.py resume={tmp_path / 'run'}" in said


def _replace_often(path: Path) -> None:
    for i in range(400):
        with replacing(path) as tmp:
            tmp.write_text(json.dumps(list(range(i, i + 200))))


def test_torchrun_launches_on_two_machines_at_a_loopback_master_differ(monkeypatch):
    # a static rendezvous (--master-port, MASTER_ADDR 127.0.0.1) gave every machine's
    # launch one id: a job lock of one machine's launch passed for another's
    from facecluster import run as run_module

    for name, value in (("TORCHELASTIC_RUN_ID", "none"), ("MASTER_ADDR", "127.0.0.1")):
        monkeypatch.setenv(name, value)
    monkeypatch.setenv("MASTER_PORT", "29500")
    ids = set()
    for host in ("node-a", "node-b"):
        monkeypatch.setattr(run_module.socket, "gethostname", lambda host=host: host)
        ids.add(run_module._launch_id())
    assert len(ids) == 2
    monkeypatch.setenv("MASTER_ADDR", "10.0.0.1")  # a multi-node launch: one id for all
    ids = set()
    for host in ("node-a", "node-b"):
        monkeypatch.setattr(run_module.socket, "gethostname", lambda host=host: host)
        ids.add(run_module._launch_id())
    assert len(ids) == 1


def test_a_replaced_record_is_on_disk_before_it_takes_the_name(tmp_path, monkeypatch):
    # run records (a sub-net's, the job's, the calibration) were renamed over the old
    # file unflushed: after a power loss the name could hold an empty file, which every
    # later resume failed to parse
    synced, fsync = [], os.fsync

    def recorded(fd):
        synced.append(os.readlink(f"/proc/self/fd/{fd}"))
        fsync(fd)

    monkeypatch.setattr(os, "fsync", recorded)
    with replacing(tmp_path / "x.json") as tmp:
        tmp.write_text("{}")
    assert [Path(p).name.startswith(".x.json.") for p in synced] == [True, False]
    assert synced[1] == str(tmp_path) and (tmp_path / "x.json").read_text() == "{}"


def test_jobs_writing_the_same_file_at_once_do_not_collide(tmp_path):
    # every stage-2 job writes the run's identity lists at start; with one shared
    # temporary name, one job's replace or clean-up removed the other's file
    fork = multiprocessing.get_context("fork")
    writers = [fork.Process(target=_replace_often, args=(tmp_path / "x.json",)) for _ in "ab"]
    for w in writers:
        w.start()
    for w in writers:
        w.join()
    assert [w.exitcode for w in writers] == [0, 0]
    assert [p.name for p in tmp_path.iterdir()] == ["x.json"]
    assert len(json.loads((tmp_path / "x.json").read_text())) == 200


def test_retraining_named_subnets_while_a_job_trains_is_refused(tmp_path):
    # stage2.subnets=[...] deleted the job folders first, a live job's lock included
    run = RunFolder(tmp_path / "run")
    lock = run.stage_dir(2, job_name([0])) / "running.json"
    lock.parent.mkdir(parents=True)
    lock.write_text(json.dumps({"host": os.uname().nodename, "pid": os.getpid()}))
    with pytest.raises(ConfigError, match=rf"job {job_name([0])} is training now"):
        run.restart_subnets([[0]])
    assert lock.is_file()
    gone = subprocess.run([sys.executable, "-c", "import os; print(os.getpid())"],
                          capture_output=True, text=True, check=True)  # fmt: skip
    lock.write_text(json.dumps({"host": os.uname().nodename, "pid": int(gone.stdout)}))
    run.restart_subnets([[0]])  # a lock whose process is gone: the job starts over
    assert not lock.parent.exists()


def test_the_documented_multi_node_commands_fit_together(tmp_path):
    # docs/TRAINING.md's stage 1 across nodes, then "resume=... launcher=slurm
    # stage2.jobs=8": a run started with the default 4 clusters refused 8 jobs. Their
    # arguments as written (the data and the GPU settings aside, neither exists here).
    text = " ".join((ROOT / "docs" / "TRAINING.md").read_text().replace("\\\n", " ").split())
    stage1 = re.search(r"srun --ntasks-per-node=8 python train.py (.*?) #", text).group(1)
    follow = re.search(r"python train.py (resume=/shared/runs/ms1mv3 .*?) ```", text).group(1)
    local = {"data.root": str(load_config(SMOKE).data.root), "output_dir": str(tmp_path)}
    words = stage1.split()
    files = [ROOT / words[i + 1] for i, w in enumerate(words) if w == "-c"]
    assert files, "the multi-node commands start from a preset"
    args = [
        a for a in words if "=" in a and not a.startswith(("data.root", "output_dir", "trainer."))
    ]
    cfg = load_config(files, [*args, *(f"{k}={v}" for k, v in local.items())])
    run = tmp_path / cfg.run_name
    run.mkdir()
    (run / "config.yaml").write_text(cfg.run_settings().to_yaml())
    overrides = [a.replace("/shared/runs/ms1mv3", str(run)) for a in follow.split()]
    resumed = RunFolder.config_for_resume(str(run), overrides)
    assert resumed.stage2.jobs == 8 <= resumed.clustering.num_clusters


@pytest.mark.parametrize("job_name", ["bash", "train"])
def test_srun_tasks_form_one_world_whatever_the_job_name(monkeypatch, tmp_path, job_name):
    # docs/TRAINING.md's srun form inside salloc, whose shell names the job "bash":
    # Lightning does not detect SLURM then, and each task started a DDP world of its own
    # (a review: task 0 trained alone, task 1 found stage 1 "already running")
    from lightning.pytorch.utilities import rank_zero_only

    from facecluster.builders import _trainer_kwargs

    # the Trainer sets Lightning's process-wide rank (1 here): this process's later
    # tests must find it as it was
    monkeypatch.setattr(rank_zero_only, "rank", rank_zero_only.rank)
    srun = {
        "SLURM_STEP_ID": "0", "SLURM_NTASKS": "2", "SLURM_PROCID": "1", "SLURM_LOCALID": "1",
        "SLURM_NODEID": "0", "SLURM_JOB_ID": "999", "SLURM_JOB_NAME": job_name,
        "SLURM_NODELIST": "localhost", "SLURM_NTASKS_PER_NODE": "2",
    }  # fmt: skip
    for key, value in srun.items():
        monkeypatch.setenv(key, value)
    for key in ("TORCHELASTIC_RUN_ID", "WORLD_SIZE", "RANK", "LOCAL_RANK"):
        monkeypatch.delenv(key, raising=False)
    overrides = ["trainer.accelerator=cpu", "trainer.devices=2", "trainer.strategy=ddp"]
    cfg = load_config(SMOKE, smoke_overrides(tmp_path, *overrides))
    trainer = L.Trainer(**_trainer_kwargs(cfg, 1), logger=False)
    assert (trainer.world_size, trainer.global_rank, trainer.local_rank) == (2, 1, 1)


def test_lightnings_slurm_requeue_is_off_in_a_one_task_slurm_job(monkeypatch, tmp_path):
    # requeueing is submitit's: Lightning's own (on SIGUSR1, when a user's sbatch asks
    # for it) saved an hpc_ckpt and requeued a command that, run again, is refused as a
    # run folder that exists (a review; launcher=slurm's one-task jobs had it on)
    from lightning.pytorch.utilities import rank_zero_only

    from facecluster.builders import _trainer_kwargs

    monkeypatch.setattr(rank_zero_only, "rank", rank_zero_only.rank)
    for key, value in {**SLURM_JOB, "SLURM_STEP_ID": "0", "SLURM_NTASKS": "1"}.items():
        monkeypatch.setenv(key, value)
    monkeypatch.delenv("TORCHELASTIC_RUN_ID", raising=False)
    cfg = load_config(SMOKE, smoke_overrides(tmp_path, "trainer.accelerator=cpu"))
    # the cluster environment the Trainer is given, whose auto_requeue Lightning's
    # signal handling reads to install its SIGUSR1 requeue
    [environment] = [
        p for p in _trainer_kwargs(cfg, 1)["plugins"] if type(p).__name__ == "SLURMEnvironment"
    ]
    assert environment.auto_requeue is False


SLURM_JOB = {
    "SLURM_JOB_ID": "77", "SLURM_JOB_NAME": "train", "SLURM_NNODES": "1",
    "SLURM_PROCID": "0", "SLURM_LOCALID": "0", "SLURM_NODEID": "0",
    "SLURM_NODELIST": "localhost",
}  # fmt: skip


@pytest.mark.parametrize(
    ("launch", "refusal"),
    [
        # the batch script runs train.py itself: Lightning took the job's 2 tasks for
        # srun's and waited for the second process without end
        ({"SLURM_NTASKS": "2", "SLURM_NTASKS_PER_NODE": "2"}, "batch script, not under srun"),
        # srun started one task for 2 devices: one process trained, silently
        ({"SLURM_STEP_ID": "0", "SLURM_NTASKS": "1"}, "asks for 2 processes, one per device"),
    ],
    ids=["no-srun", "one-task"],
)
def test_a_slurm_launch_with_other_processes_than_devices_is_refused_before_its_folder(
    monkeypatch, tmp_path, launch, refusal
):
    from lightning.pytorch.utilities import rank_zero_only

    monkeypatch.setattr(rank_zero_only, "rank", rank_zero_only.rank)
    for key, value in {**SLURM_JOB, **launch}.items():
        monkeypatch.setenv(key, value)
    for key in ("SLURM_STEP_ID", "TORCHELASTIC_RUN_ID", "WORLD_SIZE", "RANK", "LOCAL_RANK"):
        if key not in launch:
            monkeypatch.delenv(key, raising=False)
    overrides = ["trainer.accelerator=cpu", "trainer.devices=2", "trainer.strategy=ddp"]
    cfg = load_config(SMOKE, smoke_overrides(tmp_path, *overrides))
    with pytest.raises(ConfigError, match=refusal):
        train(cfg)
    assert not (tmp_path / "run").exists()


@pytest.mark.parametrize("tasks", ["1", "2"])
def test_local_stage2_jobs_started_from_a_slurm_batch_script_are_not_refused(
    monkeypatch, tmp_path, tasks
):
    # the command only starts the jobs, each without SLURM's task variables, whose
    # processes Lightning starts: the batch script's tasks are not its world (a review)
    from lightning.pytorch.utilities import rank_zero_only

    from facecluster.builders import check_trainer

    monkeypatch.setattr(rank_zero_only, "rank", rank_zero_only.rank)
    for key, value in {**SLURM_JOB, "SLURM_NTASKS": tasks, "SLURM_NTASKS_PER_NODE": tasks}.items():
        monkeypatch.setenv(key, value)
    for key in ("SLURM_STEP_ID", "TORCHELASTIC_RUN_ID"):
        monkeypatch.delenv(key, raising=False)
    overrides = ["trainer.accelerator=cpu", "trainer.devices=2", "trainer.strategy=ddp"]
    jobs = ["stage=2", "stage2.jobs=2", "launcher.parallel=2"]
    check_trainer(load_config(SMOKE, smoke_overrides(tmp_path, *overrides, *jobs)))
    with pytest.raises(ConfigError, match="SLURM"):  # stage 1 trains in this process
        check_trainer(load_config(SMOKE, smoke_overrides(tmp_path, *overrides, "stage2.jobs=2")))


def test_torchrun_inside_a_slurm_job_forms_torchruns_world(monkeypatch, tmp_path):
    # a batch script that runs torchrun: Lightning prefers torchrun's ranks to SLURM's,
    # and so must the SLURM environment facecluster hands it in SLURM jobs
    from lightning.pytorch.utilities import rank_zero_only

    from facecluster.builders import _trainer_kwargs

    monkeypatch.setattr(rank_zero_only, "rank", rank_zero_only.rank)
    torchrun = {
        "TORCHELASTIC_RUN_ID": "abc", "WORLD_SIZE": "2", "RANK": "1", "LOCAL_RANK": "1",
        "GROUP_RANK": "0", "LOCAL_WORLD_SIZE": "2", "MASTER_ADDR": "127.0.0.1",
        "MASTER_PORT": "29555", "SLURM_NTASKS": "1",
    }  # fmt: skip
    for key, value in {**SLURM_JOB, **torchrun}.items():
        monkeypatch.setenv(key, value)
    monkeypatch.delenv("SLURM_STEP_ID", raising=False)
    overrides = ["trainer.accelerator=cpu", "trainer.devices=2", "trainer.strategy=ddp"]
    cfg = load_config(SMOKE, smoke_overrides(tmp_path, *overrides))
    trainer = L.Trainer(**_trainer_kwargs(cfg, 1), logger=False)
    assert (trainer.world_size, trainer.global_rank, trainer.local_rank) == (2, 1, 1)


REQUEUED_JOB = """
import signal, sys, time
from facecluster.launch import TrainJob
def requeue(signum, frame):  # what submitit does on SLURM's warning signal
    sys.exit(-1)
signal.signal(signal.SIGUSR2, requeue)
child = (
    "import signal, sys, time, pathlib\\n"
    "def stop(s, f):\\n"
    "    pathlib.Path(sys.argv[1]).write_text('stopped')\\n"
    "    sys.exit(143)\\n"
    "signal.signal(signal.SIGTERM, stop)\\n"
    "print('ready', flush=True)\\n"
    "time.sleep(120)\\n"
)
TrainJob("job", [[sys.executable, "-c", child, sys.argv[1]]], ".")()
"""


def test_a_requeued_slurm_job_stops_its_training_process_with_sigterm(tmp_path):
    # submitit requeues by raising SystemExit in the job's process: subprocess.run then
    # killed the training process at once (no lock let go, no logger finished); it now
    # gets SIGTERM, which Lightning turns into a stop at the next batch
    marker = tmp_path / "stopped"
    job = subprocess.Popen(
        [sys.executable, "-c", REQUEUED_JOB, str(marker)], cwd=ROOT, stdout=subprocess.PIPE,
        text=True,
    )  # fmt: skip
    assert job.stdout.readline().strip() == "ready"
    job.send_signal(signal.SIGUSR2)
    assert job.wait(timeout=60) != 0
    assert marker.read_text() == "stopped"


def test_a_stale_lock_is_taken_over_once_though_two_processes_judged_it_stale(tmp_path):
    # B read the stale lock, A replaced it with its own, then B removed A's fresh lock
    # and linked its own: both held it (review). Only the stale record is removed now
    from facecluster.run import _remove_stale

    lock = tmp_path / "running.json"
    stale = {"host": "h", "pid": 1, "started": "gone"}
    lock.write_text(json.dumps(stale))
    fresh = {"host": "h", "pid": 2, "started": "now"}
    lock.unlink()  # A: takes it over between B's read and B's removal
    lock.write_text(json.dumps(fresh))
    _remove_stale(lock, stale)  # B
    assert json.loads(lock.read_text()) == fresh
    _remove_stale(lock, fresh)  # a stale one is removed, and nothing is left aside
    assert list(tmp_path.iterdir()) == []


def test_a_third_process_cannot_take_a_live_lock_while_another_checks_it(tmp_path, monkeypatch):
    # A took the stale lock over; B, which had judged the same stale record, then
    # looks at the lock again. The version before renamed the lock aside to look, and
    # put it back: C, a third process, linked its own lock into that gap, and A and C
    # both held it (review). B now looks without moving it.
    from facecluster import run as run_module

    lock = tmp_path / "running.json"
    stale = {"host": "h", "pid": 1, "started": "gone"}
    live_a = {"host": "h", "pid": 2, "started": "now"}
    lock.write_text(json.dumps(live_a))
    record_c = tmp_path / ".running.json.3"
    record_c.write_text(json.dumps({"host": "h", "pid": 3, "started": "now"}))
    third = []
    real = run_module._read_json

    def read_while_c_tries(path):
        try:  # C, at the moment B reads
            os.link(record_c, lock)
            third.append("C took the lock")
        except FileExistsError:
            third.append("refused")
        return real(path)

    monkeypatch.setattr(run_module, "_read_json", read_while_c_tries)
    run_module._remove_stale(lock, stale)  # B
    assert third and set(third) == {"refused"}  # at every read of B's
    assert json.loads(lock.read_text()) == live_a
    assert sorted(p.name for p in tmp_path.iterdir()) == [".running.json.3", "running.json"]


def test_one_process_at_a_time_removes_a_stale_lock(tmp_path, monkeypatch):
    # the takeover mark: while one process holds it, another leaves the lock alone and
    # reads it again; a mark left by a process killed while holding it expires
    from facecluster import run as run_module

    lock = tmp_path / "running.json"
    stale = {"host": "h", "pid": 1, "started": "gone"}
    lock.write_text(json.dumps(stale))
    mark = tmp_path / ".running.json.takeover"
    holder = run_module._lock_owner()  # a live process (this one) is removing it
    mark.write_text(json.dumps(holder))
    long_ago = time.time() - 3600
    os.utime(mark, (long_ago, long_ago))  # held up on a slow file system: kept all the same
    run_module._remove_stale(lock, stale)
    assert lock.is_file() and json.loads(mark.read_text()) == holder
    mark.write_text(json.dumps({**holder, "pid": 2**22 + 1}))  # its process is gone
    run_module._remove_stale(lock, stale)  # the mark goes
    assert lock.is_file() and not mark.exists()
    mark.touch()  # being written (no hard links), or left empty long ago
    run_module._remove_stale(lock, stale)
    assert lock.is_file() and mark.exists()
    os.utime(mark, (long_ago, long_ago))
    run_module._remove_stale(lock, stale)
    assert lock.is_file() and not mark.exists()
    run_module._remove_stale(lock, stale)
    assert list(tmp_path.iterdir()) == []
    # an empty lock (an earlier facecluster's, being written) only once it is old
    lock.touch()
    run_module._remove_stale(lock, {})
    assert lock.is_file()
    old = time.time() - run_module.EMPTY_LOCK_AGE - 1
    os.utime(lock, (old, old))
    run_module._remove_stale(lock, {})
    assert list(tmp_path.iterdir()) == []


def test_processes_beside_rank_0_wait_for_it_as_long_as_they_are_told(tmp_path, monkeypatch):
    # every process scans the data before rank 0 opens the run folder: at 42M files
    # rank 0 can come minutes after the others, who gave up after a fixed 300 s
    from facecluster import run as run_module

    monkeypatch.delenv(run_module.RANK0_WAIT_ENV, raising=False)
    assert run_module.rank0_timeout() == 1800.0  # torch.distributed's own default
    monkeypatch.setenv(run_module.RANK0_WAIT_ENV, "0.2")
    started = time.monotonic()
    with pytest.raises(
        ConfigError,
        match=r"run.json did not appear within 0 s: did rank 0 fail\? .*_RANK0_TIMEOUT=<seconds>",
    ):
        run_module._wait_for(tmp_path / "run.json")
    assert time.monotonic() - started < 5
    with pytest.raises(ConfigError, match="did not take the job lock"):
        run_module._wait_for_lock(tmp_path / "running.json", tmp_path / "refused.json", "me")
    # a value that is no number of seconds stops an srun task before its data scan
    monkeypatch.setenv(run_module.RANK0_WAIT_ENV, "half an hour")
    monkeypatch.setenv("SLURM_STEP_ID", "0")
    monkeypatch.setenv("SLURM_NTASKS", "2")
    cfg = load_config(SMOKE, smoke_overrides(tmp_path, "data.root=/nonexistent/faces"))
    with pytest.raises(ConfigError, match=r"FACECLUSTER_RANK0_TIMEOUT='half an hour': give a"):
        train(cfg)


def test_after_local_jobs_side_by_side_on_gpus_the_evaluation_takes_them_all(
    smoke_cfg, tmp_path, monkeypatch, capsys
):
    # stage2.jobs on an 8-GPU machine trains the sub-nets side by side, then evaluated
    # the run on one GPU while the others idled (65 forwards a test face at K=64): the
    # GPUs the jobs took evaluate it, a torchrun process each (GPUs faked here)
    monkeypatch.setattr(launch, "_visible_gpus", lambda: ["3", "5", "6", "7"])
    jobs = ("stage2.jobs=3", "launcher.parallel=2", "trainer.accelerator=gpu")
    assert launch.local_evaluation_gpus(smoke_cfg(*jobs)) == ["3", "5"]
    assert launch.local_evaluation_gpus(smoke_cfg(*jobs, "trainer.devices=2")) == [
        "3", "5", "6", "7",
    ]  # fmt: skip
    # one job at a time, jobs on the CPU, the evaluation on the CPU or on a GPU named:
    # the command's own process evaluates, as after any training
    for other in (
        "launcher.parallel=1", "stage2.jobs=1", "trainer.accelerator=cpu", "eval.device=cpu",
        "eval.device=cuda:1",
    ):  # fmt: skip
        assert launch.local_evaluation_gpus(smoke_cfg(*jobs, other)) == [], other
    # MIG instances: a process sees one at most, none for torchrun's second process
    with monkeypatch.context() as m:
        m.setattr(launch, "_visible_gpus", lambda: ["MIG-4b1c", "MIG-9e2a"])
        assert launch.local_evaluation_gpus(smoke_cfg(*jobs)) == []
    # train.py's evaluation then runs on them: here a stand-in for torchrun's command,
    # which writes its environment and ends as FAKE_MODE says
    out = tmp_path / "child.json"
    script = (
        "import json, os, pathlib, signal, sys, time\n"
        "out = pathlib.Path(os.environ['FAKE_OUT'])\n"
        "def said(signum, frame):\n"
        "    out.with_suffix('.signal').write_text(str(signum)); sys.exit(3)\n"
        "signal.signal(signal.SIGTERM, said); signal.signal(signal.SIGINT, said)\n"
        "out.write_text(json.dumps(dict(os.environ)))\n"
        "mode = os.environ['FAKE_MODE']\n"
        "if mode == 'wait': time.sleep(60)\n"
        "if mode == 'kill': os.kill(os.getpid(), signal.SIGKILL)\n"
        "sys.exit(int(mode))\n"
    )
    made = []

    def command(run, processes):
        made.append((run.path, processes))
        return [sys.executable, "-c", script]

    monkeypatch.setattr(launch, "evaluate_command", command)
    monkeypatch.setenv("FAKE_OUT", str(out))
    for name in ("LOCAL_RANK", "MASTER_PORT", "TORCHELASTIC_RUN_ID", RUN_DIR_ENV):
        monkeypatch.setenv(name, "0")  # torchrun sets its own; not this run's folder
    run_dir = tmp_path / "run"
    finished = pipeline.RunResult(run_dir, {"stage1": {}}, None)

    def evaluated(mode):
        monkeypatch.setenv("FAKE_MODE", mode)
        out.unlink(missing_ok=True)
        return cli._evaluate_trained(smoke_cfg(*jobs), finished)

    assert evaluated("0") == 0 and made == [(run_dir, 2)]
    env = json.loads(out.read_text())
    assert env["CUDA_VISIBLE_DEVICES"] == "3,5" and not set(launch.DDP_ENV) & set(env)
    said = capsys.readouterr().out
    assert "on GPUs 3,5, a torchrun process each" in said
    assert said.rstrip().splitlines()[-1] == f"facecluster run folder: {run_dir}"
    again = f"evaluate.py run={run_dir}` evaluates it"
    # its failure, or its end by a signal: that status, and how to evaluate again
    for mode, status in (("1", 1), ("kill", 128 + signal.SIGKILL)):
        assert evaluated(mode) == status
        assert capsys.readouterr().err.strip().endswith(again)
    # SIGTERM or Ctrl-C to this process goes on to torchrun's (in a session of their
    # own), which end first: 143 (train_main says "terminated"), 130

    def signal_when_started(signum, done):  # never once the evaluation has returned
        deadline = time.monotonic() + 60
        while not out.is_file() and not done.is_set() and time.monotonic() < deadline:
            time.sleep(0.05)
        if out.is_file() and not done.is_set():
            os.kill(os.getpid(), signum)

    for signum in (signal.SIGTERM, signal.SIGINT):
        out.unlink()  # the last child's, before the signal waits for this one's
        out.with_suffix(".signal").unlink(missing_ok=True)
        done = threading.Event()
        sender = threading.Thread(target=signal_when_started, args=(signum, done), daemon=True)
        sender.start()
        try:
            if signum == signal.SIGTERM:
                with pytest.raises(SystemExit) as stopped:
                    evaluated("wait")
                assert stopped.value.code == 128 + signum
            else:
                assert evaluated("wait") == 128 + signum
        finally:
            done.set()
            sender.join()
        assert out.with_suffix(".signal").read_text() == str(int(signum))
        assert capsys.readouterr().err.strip().endswith(again)
    # a run not finished (sub-nets still to train), or a process in a DDP group (its
    # ranks evaluate together, training_ranks): no torchrun of its own
    assert cli._evaluate_trained(smoke_cfg(*jobs), pipeline.RunResult(run_dir, None, None)) == 0
    monkeypatch.setattr(torch.distributed, "is_initialized", lambda: True)

    @contextlib.contextmanager
    def elsewhere(cfg, done):
        yield None  # another process evaluates

    monkeypatch.setattr(evaluation, "training_ranks", elsewhere)
    assert cli._evaluate_trained(smoke_cfg(*jobs), finished) == 0
    assert len(made) == 5


def test_stopping_jobs_kills_one_that_outlives_the_grace_period():
    # a job stuck where no batch starts (a hung collective, a blocked read) ignores
    # SIGTERM in effect: after the grace period it is killed, so the launcher's stop
    # (Ctrl-C, submitit's requeue before the time limit) cannot wait for ever
    ignores = "import signal; signal.signal(signal.SIGTERM, signal.SIG_IGN); "
    waits = "print(flush=True); import time; time.sleep(60)"
    stuck, stops = (
        subprocess.Popen([sys.executable, "-c", code], stdout=subprocess.PIPE)
        for code in (ignores + waits, waits)
    )
    stuck.stdout.readline(), stops.stdout.readline()  # both running, the handler in place
    launch._stop([stuck, stops], signal.SIGTERM, grace=1.0)
    assert (stuck.returncode, stops.returncode) == (-signal.SIGKILL, -signal.SIGTERM)
    stuck.stdout.close(), stops.stdout.close()
