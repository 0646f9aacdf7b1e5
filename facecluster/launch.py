"""Where the jobs of a run go: local processes, or SLURM through submitit.

After clustering, each sub-net trains on its own cluster with nothing shared, so
stage 2 splits into ``stage2.jobs`` independent jobs (:func:`balanced_groups`).
A job is one command line, the same under both launchers::

    python -m facecluster.cli train resume=RUN launcher=local stage=2 \\
        stage2.jobs=J stage2.group=i stage2.subnets=[...]

- ``launcher=local`` (:func:`run_local`): the training process runs stage 1 and the
  clustering itself, then the J jobs as child processes, at most
  ``launcher.parallel`` at once, each writing ``stage2/jobs/<job>/log.txt``, and
  assembles the results when they are all done.
- ``launcher=slurm`` (:func:`submit_slurm`): ``train.py`` on the login node
  creates the run folder, submits stage 1 with the clustering as one job, the J
  stage-2 jobs as one job array that starts when it succeeds (``afterok``), and
  an assembly job after the array, then returns. Every job is requeued and
  resumes from the run folder when its time runs out (or SLURM requeues it when
  preempted, where the cluster is set to).

No scheduling of our own: local jobs are plain processes, SLURM does the rest.
"""

from __future__ import annotations

import contextlib
import getpass
import io
import json
import os
import queue
import shutil
import signal
import subprocess
import sys
import threading
import time
from collections.abc import Iterator, Sequence
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from typing import Any

from lightning.pytorch.utilities import rank_zero_info
from lightning.pytorch.utilities.exceptions import SIGTERMException

from facecluster.config import COMMAND, Config, ConfigError, SlurmConfig, resume_command
from facecluster.io import replacing
from facecluster.run import (
    JOB_ENV,
    RUN_DIR_ENV,
    RunFolder,
    job_name,
    launched_processes,
    read_state,
)

# A job is a training run of its own: it must not join the DDP world of the
# process that launched it.
DDP_ENV = (
    "LOCAL_RANK",
    "RANK",
    "WORLD_SIZE",
    "NODE_RANK",
    "GROUP_RANK",
    "LOCAL_WORLD_SIZE",
    "MASTER_ADDR",
    "MASTER_PORT",
    # torchrun's own: Lightning takes a process with TORCHELASTIC_RUN_ID for a torchrun
    # worker and read the LOCAL_RANK dropped above (a KeyError in every local job
    # started under torchrun)
    "TORCHELASTIC_RUN_ID",
    "TORCHELASTIC_RESTART_COUNT",
    "TORCHELASTIC_MAX_RESTARTS",
    "TORCHELASTIC_USE_AGENT_STORE",
    "TORCHELASTIC_ERROR_FILE",
    "GROUP_WORLD_SIZE",
    "ROLE_RANK",
    "ROLE_NAME",
    "ROLE_WORLD_SIZE",
    RUN_DIR_ENV,
)


MAX_REQUEUES = 100
"""Times a SLURM job may reach its time limit and be requeued before it fails."""


class JobsFailed(RuntimeError):
    """Some stage-2 jobs did not finish; the others' sub-nets are kept."""


def balanced_groups(images: Sequence[int], subnets: Sequence[int], jobs: int) -> list[list[int]]:
    """Split ``subnets`` into at most ``jobs`` groups with balanced training images.

    Longest processing time first: the largest remaining cluster goes to the group
    with the fewest images so far (ties: the lower group). Deterministic, so every
    job computes the same groups from the same clustering.

    Args:
        images: training images of every cluster (index = cluster).
        subnets: the sub-nets to split.
        jobs: the number of groups wanted.
    """
    count = max(1, min(jobs, len(subnets)))
    groups: list[list[int]] = [[] for _ in range(count)]
    loads = [0] * count
    for k in sorted(subnets, key=lambda k: (-images[k], k)):
        j = min(range(count), key=lambda j: (loads[j], j))
        groups[j].append(k)
        loads[j] += images[k]
    return [sorted(g) for g in groups]


def train_command(run: RunFolder, *overrides: str) -> list[str]:
    """The command line of one job: this Python, ``facecluster train`` on the run."""
    return [
        sys.executable,
        "-m",
        "facecluster.cli",
        "train",
        f"resume={run.path}",
        "launcher=local",
        *overrides,
    ]


def evaluate_command(run: RunFolder, processes: int) -> list[str]:
    """The command line that evaluates ``run`` on ``processes`` GPUs of one machine:
    ``facecluster evaluate`` under torchrun, each process its shard of the test split
    (docs/EVALUATION.md)."""
    return [
        sys.executable,
        "-m",
        "torch.distributed.run",
        "--standalone",
        f"--nproc_per_node={processes}",
        "-m",
        "facecluster.cli",
        "evaluate",
        f"run={run.path}",
    ]


def local_evaluation_gpus(cfg: Config) -> list[str]:
    """The GPUs that evaluate a run after its stage-2 local jobs, one torchrun process
    each (:func:`evaluate_command`): those the jobs took at once (``launcher.parallel``
    jobs of ``trainer.devices`` GPUs), when they are more than one and the evaluation
    runs on a GPU that ``eval.device`` does not name (``auto`` or ``cuda``); else []:
    the command's own process evaluates, as after any training."""
    if not cfg.starts_local_jobs() or cfg.eval.device not in ("auto", "cuda"):
        return []
    parallel = min(cfg.launcher.parallel, cfg.stage2.jobs)
    slots = gpu_slots(_visible_gpus(), parallel, devices_per_job(cfg))
    gpus = [gpu for slot in slots if slot for gpu in slot.split(",")]
    # MIG instances: a process sees one at most, so torchrun's could not share them
    if len(gpus) < 2 or any(gpu.strip().startswith("MIG-") for gpu in gpus):
        return []
    return gpus


def run_evaluation(run: RunFolder, gpus: list[str]) -> int:
    """:func:`evaluate_command` on ``gpus`` (``CUDA_VISIBLE_DEVICES``), in a session of
    its own, this process's SIGTERM, SIGHUP and SIGINT passed on to it as to local jobs
    (:func:`_passed_on`, which raises once it has ended). Returns its exit status."""
    env = {k: v for k, v in os.environ.items() if k not in DDP_ENV}
    env["CUDA_VISIBLE_DEVICES"] = ",".join(gpus)
    child: subprocess.Popen | None = None
    running: dict[int, subprocess.Popen] = {}
    stopped: list[int] = []
    try:
        with _passed_on(running, stopped):  # its handlers first: no signal is missed
            child = subprocess.Popen(
                evaluate_command(run, len(gpus)), env=env, start_new_session=True
            )
            running[child.pid] = child
            if stopped:  # a signal while it started: passed on now
                _stop([child], stopped[0])
            # waited for in a thread, as the local jobs are: a handler of _passed_on
            # waiting for the child in the thread that waits in Popen.wait deadlocks
            waiter = threading.Thread(target=child.wait, daemon=True)
            waiter.start()
            while waiter.is_alive():
                waiter.join(0.5)
        return child.returncode
    finally:  # never left running: an error here, or a signal passed on ends it
        if child is not None and child.poll() is None:
            _stop([child], signal.SIGTERM)


def stage2_overrides(jobs: int, subnets: list[int]) -> list[list[str]]:
    """The overrides of ``jobs`` stage-2 jobs over ``subnets``: job i trains group i of
    :func:`balanced_groups`, which it computes from the clustering (known or not when
    the job is submitted). ``jobs=1`` names one group exactly."""
    jobs = max(1, min(jobs, len(subnets)))
    named = "[" + ",".join(map(str, subnets)) + "]"
    return [
        ["stage=2", f"stage2.jobs={jobs}", f"stage2.group={i}", f"stage2.subnets={named}"]
        for i in range(jobs)
    ]


# A local job started from inside an srun step must not think it is that step's task.
SLURM_TASK_ENV = ("SLURM_NTASKS", "SLURM_PROCID", "SLURM_LOCALID", "SLURM_NODEID", "SLURM_STEP_ID")


def job_environment(name: str, local: bool) -> dict[str, str]:
    """This process's environment without its DDP settings (and, for a local job, its
    SLURM task settings), marked as job ``name``."""
    drop = DDP_ENV + (SLURM_TASK_ENV if local else ())
    return {**{k: v for k, v in os.environ.items() if k not in drop}, JOB_ENV: name}


def gpu_slots(visible: list[str], parallel: int, devices: int) -> list[str | None]:
    """``CUDA_VISIBLE_DEVICES`` of each of ``parallel`` local jobs: ``devices`` GPUs each,
    disjoint; [None] * parallel when there is no GPU, the jobs take none (``devices``
    0: on the CPU) or one job runs at a time.

    Raises:
        ConfigError: the jobs at once need more GPUs than are visible.
    """
    if not visible or parallel == 1 or devices == 0:
        return [None] * parallel
    if parallel * devices > len(visible):
        raise ConfigError(
            f"launcher.parallel={parallel} jobs x trainer.devices={devices} need "
            f"{parallel * devices} GPUs, {len(visible)} are visible"
        )
    return [",".join(visible[i * devices : (i + 1) * devices]) for i in range(parallel)]


# ---------------------------------------------------------------------- local


def check_local_jobs(cfg: Config, jobs: int | None = None) -> None:
    """Before any work: stage-2 local jobs this config would start must fit this node.
    ``jobs``: the jobs a resume's plan holds (``stage2.jobs`` when None; jobs that had
    started under another ``stage2.jobs`` continue as they were grouped).

    Raises:
        ConfigError: the run spans nodes (local jobs run here only), or the jobs at
            once need more GPUs than are visible.
    """
    jobs = cfg.stage2.jobs if jobs is None else jobs
    if not cfg.starts_local_jobs(jobs):
        return
    if int(cfg.trainer.get("num_nodes", 1)) > 1:
        raise ConfigError(
            "stage2.jobs: local jobs run on this node only; a run across nodes trains "
            "stage 2 with launcher=slurm (or stage=1 across nodes, then launcher=slurm)"
        )
    if (started := launched_processes()) > 1:
        # one node, but each of torchrun's or srun's processes would start the jobs
        raise ConfigError(
            f"stage2.jobs: local jobs are started by one process, and torchrun or srun "
            f"started {started} here: run this command as one process (each job starts "
            f"its own trainer.devices processes), or stage=1 under torchrun or srun, "
            f"then `{COMMAND['train']} resume=<run folder> stage2.jobs=...` as one process"
        )
    parallel, devices = min(cfg.launcher.parallel, jobs), cfg.trainer.get("devices", 1)
    if _listed_gpus(devices) is not None and parallel > 1 and devices_per_job(cfg):
        # a job running beside others sees only its own GPUs, renumbered from 0: the
        # indices listed would name GPUs it cannot see (Lightning refused them in every job)
        raise ConfigError(
            f"trainer.devices={devices} names GPUs, but jobs running at once "
            f"(launcher.parallel={cfg.launcher.parallel}) take theirs by count: give the "
            "GPUs per job as a number, and the GPUs to use as CUDA_VISIBLE_DEVICES"
        )
    gpu_slots(_visible_gpus(), parallel, devices_per_job(cfg))


def devices_per_job(cfg: Config) -> int:
    """The GPUs each local job takes: none under ``trainer.accelerator=cpu`` (CPU jobs
    were refused on a machine with fewer GPUs than jobs); ``trainer.devices`` when it
    is a count, the number of GPUs it names when it is a list or ``"0,1"`` (counted as
    1 before, so each job got one GPU and asked for two); else (``auto``, -1) 1."""
    if str(cfg.trainer.get("accelerator", "auto")) == "cpu":
        return 0
    devices = cfg.trainer.get("devices", 1)
    listed = _listed_gpus(devices)
    if listed is not None:
        return max(1, len(listed))
    if isinstance(devices, str):
        devices = int(devices) if devices.strip().isdigit() else 1
    return devices if isinstance(devices, int) and devices > 0 else 1


def _listed_gpus(devices: Any) -> list[Any] | None:
    """The GPUs ``trainer.devices`` names, as a list or ``"0,1"``; None for a count."""
    if isinstance(devices, list | tuple):
        return list(devices)
    if isinstance(devices, str) and "," in devices:
        return [d for d in devices.split(",") if d.strip()]
    return None


def run_local(run: RunFolder, groups: list[list[int]], parallel: int, devices: int = 1) -> None:
    """Run one stage-2 job per group as local processes, at most ``parallel`` at once,
    each on its own GPUs when there are GPUs (``devices`` per job).

    Raises:
        JobsFailed: naming each failed job, its exit status and log, and the command
            that trains what is missing; the finished jobs' sub-nets are kept.
    """
    jobs = [(job_name(g), train_command(run, *stage2_overrides(1, g)[0])) for g in groups]
    rank_zero_info(
        f"stage 2: {len(jobs)} jobs ({', '.join(name for name, _ in jobs)}), "
        f"{min(parallel, len(jobs))} at a time; each logs to {run.job_log('<job>')}"
    )

    slots: queue.Queue[str | None] = queue.Queue()
    for slot in gpu_slots(_visible_gpus(), min(parallel, len(jobs)), devices):
        slots.put(slot)
    running: dict[int, subprocess.Popen] = {}  # the jobs' processes, by pid
    stopped: list[int] = []  # the signal this launcher was stopped by

    def one(job: tuple[str, list[str]]) -> int:
        name, command = job
        log = run.job_log(name)
        log.parent.mkdir(parents=True, exist_ok=True)
        start, launched = time.perf_counter(), False
        env, gpus = job_environment(name, local=True), slots.get()
        try:  # the slot goes back whatever happens, or the jobs waiting for it hang
            if gpus is not None:
                env["CUDA_VISIBLE_DEVICES"] = gpus
            with open(log, "ab") as out:
                try:
                    if stopped:  # the launcher is stopping: no job starts
                        raise OSError(f"the launcher was stopped by signal {stopped[0]}")
                    # a session of its own: a terminal's Ctrl-C reaches the launcher
                    # alone, which passes it on once (a second SIGINT could cut the
                    # job's cleanup short, its lock left behind)
                    process = subprocess.Popen(
                        command,
                        stdout=out,
                        stderr=subprocess.STDOUT,
                        env=env,
                        start_new_session=True,
                    )
                except OSError as e:  # too many open files, no memory: this job fails
                    out.write(f"facecluster: job {name} could not start: {e}\n".encode())
                    code = 127
                else:
                    running[process.pid] = process
                    launched = True
                    if stopped:  # the signal came between the check above and now
                        process.send_signal(stopped[0])
                    try:  # whole or not at all, a full disk named (a full-disk review)
                        with replacing(log.parent / "job.json") as tmp:
                            tmp.write_text(
                                json.dumps({"pid": process.pid, "command": command}, indent=2)
                            )
                    finally:  # never leave a started job unwaited for
                        code = process.wait()
                        running.pop(process.pid, None)
                        # nor a process of its group: a DDP job's other ranks (Lightning's
                        # launcher starts them there) waited up to their process group's
                        # 30-minute timeout, holding their GPUs, for a rank 0 that had
                        # ended without stopping them: by a signal that came before
                        # Lightning's handler was in place (the launcher's, passed on
                        # while the job started), the OOM killer, a crash (a review)
                        with contextlib.suppress(ProcessLookupError, PermissionError):
                            os.killpg(process.pid, signal.SIGKILL)
        finally:
            slots.put(gpus)
        state = "finished" if code == 0 else _exit_status(code)
        if code != 0 and stopped:  # the launcher's signal, passed on: not a failure
            signame = signal.Signals(stopped[0]).name
            ended = f"exit code {code}" if code > 0 else f"signal {-code}"
            state = f"stopped by {signame} ({ended})" if launched else f"not started ({signame})"
        rank_zero_info(f"stage 2: job {name} {state} after {time.perf_counter() - start:.0f} s")
        return code

    with _passed_on(running, stopped), ThreadPoolExecutor(max_workers=parallel) as pool:
        codes = list(pool.map(one, jobs))
    failed = [(name, code) for (name, _), code in zip(jobs, codes, strict=True) if code != 0]
    if failed:
        lines = [f"{name}: {_exit_status(code)}, log {run.job_log(name)}" for name, code in failed]
        raise JobsFailed(
            f"{len(failed)} of {len(jobs)} stage-2 jobs failed:\n  - "
            + "\n  - ".join(lines)
            + f"\nThe other jobs' sub-nets are kept. `{resume_command(run.path)}` "
            "trains the missing ones."
        )


@contextlib.contextmanager
def _passed_on(running: dict[int, subprocess.Popen], stopped: list[int]) -> Iterator[None]:
    """SIGTERM, SIGHUP and SIGINT of the launcher (``kill``, ``timeout``, a scheduler
    that signals only the main process, Ctrl-C: the jobs are in sessions of their own)
    go to the running jobs, which stop (their locks released, their checkpoints kept);
    no other job starts, and the launcher then raises: SIGINT as KeyboardInterrupt,
    SIGTERM as Lightning's SIGTERMException (exit 143), SIGHUP as SystemExit(129), so
    that the command unwinds (its stage-1 lock let go, its logger's run closed; the
    signal's default action ended it at once, leaving both) and prints the resume
    command. Without it the jobs went on training as orphans, holding their locks and
    GPUs, and the next resume was refused. In the main thread only, where Python takes
    signals."""
    # an ignored signal stays ignored (nohup): the jobs inherit that, as before
    signals = (signal.SIGTERM, signal.SIGHUP, signal.SIGINT)
    caught = [s for s in signals if signal.getsignal(s) != signal.SIG_IGN]
    if threading.current_thread() is not threading.main_thread():
        yield
        return

    def pass_on(signum: int, frame: Any) -> None:
        if stopped:  # a second Ctrl-C while the first is passed on: torchrun's agent
            return  # cut its own stop of its workers short on another signal
        stopped.append(signum)
        _stop(list(running.values()), signum)
        # the launcher ends by the signal once the pool has marked every job that had
        # not started (below): raised here, it could end the process while a pool thread
        # had made a job's folder but not yet written why the job never ran

    before: dict[int, Any] = {}
    try:  # each handler restored below, also when a signal lands between two of them
        for sig in caught:
            before[sig] = signal.signal(sig, pass_on)
        yield
    finally:
        for sig, handler in before.items():
            signal.signal(sig, handler)
    if stopped:
        handler = before[stopped[0]]
        if callable(handler):  # Python's KeyboardInterrupt, or a handler of the caller's
            handler(stopped[0], None)
        code = 128 + stopped[0]  # the status a shell gives a process the signal ended
        raise SIGTERMException(code) if stopped[0] == signal.SIGTERM else SystemExit(code)


def _visible_gpus() -> list[str]:
    import torch

    if not torch.cuda.is_available():
        return []
    listed = os.environ.get("CUDA_VISIBLE_DEVICES")
    return listed.split(",") if listed else [str(i) for i in range(torch.cuda.device_count())]


def _exit_status(code: int) -> str:
    return f"killed by signal {-code}" if code < 0 else f"failed with exit code {code}"


# ---------------------------------------------------------------------- slurm


@dataclass
class TrainJob:
    """A SLURM job: ``facecluster train`` command lines, run in order in every task.

    SLURM starts one task per GPU (``srun``); Lightning's SLURM environment makes
    them one DDP run. (The assembly job on several GPUs is one task, whose evaluation
    starts a process per GPU under torchrun: :func:`evaluate_command`.) Before a
    preemption or the time limit, submitit calls :meth:`checkpoint` and requeues the
    job, which then resumes from the run folder's checkpoints.
    """

    name: str
    commands: list[list[str]]
    cwd: str

    def __call__(self) -> None:
        env = job_environment(self.name, local=False)  # Lightning reads the SLURM task
        for command in self.commands:
            # SLURM's warning signal is for submitit (in this process), which requeues
            child = subprocess.Popen(command, cwd=self.cwd, env=env, preexec_fn=_ignore_usr2)
            try:
                code = child.wait()
            except BaseException:
                # submitit requeues by raising SystemExit here: the training process was
                # then killed at once (subprocess.run's cleanup), its logger unfinished
                # and its lock left behind. SIGTERM stops it at its next batch, with its
                # own cleanup, within SLURM's warning time
                _stop([child], signal.SIGTERM)
                raise
            if code:
                raise subprocess.CalledProcessError(code, command)

    def checkpoint(self) -> Any:
        from submitit.helpers import DelayedSubmission

        return DelayedSubmission(self)


def _ignore_usr2() -> None:
    signal.signal(signal.SIGUSR2, signal.SIG_IGN)


def _stop(children: list[subprocess.Popen], signum: int, grace: float = 60.0) -> None:
    """Send ``signum`` to every child (a training process stops at its next batch,
    letting go of its lock), then SIGKILL any that has not ended ``grace`` seconds
    later (submitit's warning comes 90 s before a SLURM job's time limit)."""
    for child in children:
        child.send_signal(signum)
    for child in children:
        try:
            child.wait(timeout=grace)
        except subprocess.TimeoutExpired:
            child.kill()
            child.wait()


def slurm_parameters(
    s: SlurmConfig, name: str, gpus: int, nodes: int, tasks: int | None = None
) -> dict[str, Any]:
    """submitit SlurmExecutor parameters of one job: ``nodes`` x ``gpus`` GPUs, one task
    per GPU (one task per node without GPUs) unless ``tasks`` per node are given; the
    node's cores follow its GPUs (``slurm.cpus_per_task`` per GPU)."""
    tasks = tasks or max(1, gpus)
    params: dict[str, Any] = {
        "job_name": name,
        "time": s.time_min,
        "nodes": nodes,
        "ntasks_per_node": tasks,
        "cpus_per_task": s.cpus_per_task * max(1, gpus) // tasks,
        "array_parallelism": s.array_parallelism,
        "setup": list(s.setup),
        # a key set to null is dropped (the one way an override removes a saved key);
        # submitit wrote it as --key=None
        "additional_parameters": {k: v for k, v in s.additional.items() if v is not None},
        # a task that fails (a crash, a lost node) ends the others at once: under NCCL
        # they waited in their next collective until its timeout (30 min), holding GPUs
        "srun_args": ["--kill-on-bad-exit=1"],
    }
    if gpus:
        params["gpus_per_node"] = gpus
    if s.mem_gb:
        params["mem"] = f"{s.mem_gb}GB"
    for key in ("partition", "account", "qos"):
        if getattr(s, key):
            params[key] = getattr(s, key)
    return params


def _devices(gpus: int, nodes: int) -> list[str]:
    """Trainer overrides that match the job's tasks (one per GPU, on every node)."""
    accelerator = "gpu" if gpus else "cpu"
    return [
        f"trainer.accelerator={accelerator}",
        f"trainer.devices={max(1, gpus)}",
        f"trainer.num_nodes={nodes}",
    ]


def submit_slurm(
    cfg: Config,
    run: RunFolder,
    *,
    stage1: bool,
    cluster: bool,
    stage2: list[list[str]],
    assemble: bool,
) -> dict[str, Any]:
    """Submit what the run still needs as SLURM jobs, chained by ``afterok``.

    Args:
        stage1, cluster: submit stage 1 and/or the clustering (one job).
        stage2: each stage-2 job's overrides (one array task each).
        assemble: submit the assembly (and the evaluation after training) last.

    Returns:
        What was submitted (also written to ``slurm/submitted.json``).
    """
    submitit = _submitit()
    s, cwd = cfg.slurm, os.getcwd()
    run.slurm_dir.mkdir(parents=True, exist_ok=True)
    try:
        # requeued at the time limit as often as it takes (submitit's default is 3)
        executor = submitit.SlurmExecutor(folder=run.slurm_dir / "%j", max_num_timeout=MAX_REQUEUES)
    except RuntimeError as e:  # no srun on this machine
        raise ConfigError(f"launcher=slurm: {e}") from None
    submitted: dict[str, Any] = {"run": str(run.path), "jobs": []}
    after: str | None = None
    train_size = (s.gpus_per_node, s.nodes)  # stage 1 and each stage-2 job
    small = (min(1, s.gpus_per_node), 1)  # the assembly (and the evaluation on one GPU)

    def parameters(name: str, size: tuple[int, ...]) -> dict[str, Any]:
        params = slurm_parameters(s, name, *size)
        if after:  # a job whose dependency failed is cancelled, not left pending
            params["dependency"] = f"afterok:{after}"
            params["additional_parameters"]["kill-on-invalid-dep"] = "yes"
        else:
            params["dependency"] = None
        return params

    def record() -> None:  # after every submission: a later one may fail (check_queue)
        with replacing(run.slurm_dir / "submitted.json") as tmp:  # never half a record
            tmp.write_text(json.dumps(submitted, indent=2))

    def submit(name: str, commands: list[list[str]], size: tuple[int, ...]) -> str:
        params = parameters(name, size)
        executor.update_parameters(**params)
        job = executor.submit(TrainJob(name, commands, cwd))
        entry = {"name": name, "job_id": job.job_id, "dependency": params["dependency"]}
        submitted["jobs"].append({**entry, "commands": commands})
        record()
        return job.job_id

    def submit_all() -> None:
        nonlocal after
        first = [train_command(run, "stage=1", *_devices(*train_size))] if stage1 else []
        if cluster:
            first.append(train_command(run, "stage=cluster", *_devices(*train_size)))
        if first:
            after = submit(f"{run.path.name}-stage1", first, train_size)
        if stage2:
            name = f"{run.path.name}-stage2"
            params = parameters(name, train_size)
            executor.update_parameters(**params)
            commands = [[train_command(run, *o, *_devices(*train_size))] for o in stage2]
            with executor.batch():
                jobs = [
                    executor.submit(TrainJob(f"{name}-{i}", c, cwd)) for i, c in enumerate(commands)
                ]
            after = jobs[0].job_id.split("_")[0]  # the array: afterok waits for every task
            entry = {"name": name, "job_id": after, "dependency": params["dependency"]}
            submitted["jobs"].append({**entry, "array": commands})
            record()
        if assemble:
            name, gpus = f"{run.path.name}-assemble", s.gpus_per_node
            if not (cfg.eval.after_training and gpus > 1 and cfg.eval.device != "cpu"):
                submit(name, [train_command(run, "stage=assemble", *_devices(*small))], small)
            elif cfg.eval.device.startswith("cuda:"):  # the GPU it names, of the job's
                submit(name, [train_command(run, "stage=assemble", *_devices(1, 1))], (gpus, 1, 1))
            else:
                # one task on one node's GPUs: the assembly, then the evaluation on all of
                # them under torchrun (the assembly alone has no process group to share)
                once = ("eval.after_training=false", *_devices(1, 1))
                commands = [
                    train_command(run, "stage=assemble", *once),
                    evaluate_command(run, gpus),
                ]
                submit(name, commands, (gpus, 1, 1))

    said, refused = io.StringIO(), ""  # submitit prints a refusing sbatch's words
    try:
        with contextlib.redirect_stderr(said):
            submit_all()
    except submitit.core.utils.FailedJobError as e:  # a 45-line traceback, no next step
        refused = str(e)
    finally:  # what else was said; sbatch's words go into the message, once
        sys.stderr.write(
            said.getvalue().replace(f"{refused}\n", "", 1) if refused else said.getvalue()
        )
    if refused:
        ids = [job["job_id"] for job in submitted["jobs"]]
        queued = f"; the jobs before it ({', '.join(ids)}) are queued: scancel them" if ids else ""
        raise ConfigError(
            f"launcher=slurm: sbatch refused a job ({' '.join(refused.split())}){queued}. "
            "Submit again once its cause is mended (a limit of the queue, or a slurm.* "
            f"setting: add slurm.<key>=... to the command): "
            f"{resume_command(run.path)}"
        )
    return submitted


def _submitit() -> Any:
    try:
        import submitit
    except ImportError:
        raise ConfigError(
            "launcher=slurm needs submitit: pip install 'facecluster[slurm]'"
        ) from None
    return submitit


LAUNCHER_SBATCH = {
    "time": "slurm.time_min", "nodes": "slurm.nodes", "ntasks-per-node": "slurm.gpus_per_node",
    "cpus-per-task": "slurm.cpus_per_task", "gpus-per-node": "slurm.gpus_per_node",
    "job-name": None, "dependency": None, "kill-on-invalid-dep": None,
    "array": "slurm.array_parallelism", "output": None, "error": None, "open-mode": None,
}  # fmt: skip
"""sbatch options the launcher writes into every job, with the ``slurm.*`` key that
sets each (submitit owns the last four). Not ``signal``: submitit's ``USR2@90`` may be
given more time (``USR2@300`` for a slow checkpoint save)."""

OTHER_SBATCH = ("gpus", "ntasks")
"""sbatch options of their own whose names begin one of :data:`LAUNCHER_SBATCH`."""


def _owned_option(key: str, s: SlurmConfig) -> tuple[str, str | None] | None:
    """The sbatch option, and the ``slurm.*`` key that sets it, of the launcher's (or of a
    ``slurm.*`` key that is set) that a ``slurm.additional`` key names: sbatch takes any
    unambiguous abbreviation (``depend``) and ``_`` for ``-``."""
    name = str(key).lstrip("-").replace("_", "-").lower()
    owned = dict(LAUNCHER_SBATCH)
    owned |= {k: f"slurm.{k}" for k in ("partition", "account", "qos") if getattr(s, k)}
    if s.mem_gb:  # else --mem is the user's (--mem=0: all of a node's memory)
        owned["mem"] = "slurm.mem_gb"
    if name not in owned and len(name) >= 3 and name not in OTHER_SBATCH:
        name = next((o for o in owned if o.startswith(name)), name)
    return (name, owned[name]) if name in owned else None


def check_slurm(cfg: Config) -> None:
    """Before any work: this machine can submit the run's jobs. submitit imports, and
    SLURM's ``sbatch`` (which submits) and ``srun`` (which submitit's executor asks for,
    and which starts each job's tasks) are on PATH. Without them the run folder was
    made, then the submission failed, and the corrected command found the folder there.

    ``slurm.additional`` may not set what the launcher sets: it replaced it in every
    job (``dependency: singleton`` unchained the stages, ``time`` the requeue limit,
    ``nodes`` the DDP world the command lines ask for); nor may ``eval.device`` name a GPU
    the assembly job, which evaluates, lacks. Checked here, at submission,
    not at every config load: a run saved with such a key is still evaluated, exported
    and resumed locally.

    Raises:
        ConfigError: naming what is missing, the ``slurm.additional`` key, or
            ``eval.device``.
    """
    _submitit()
    for key, value in cfg.slurm.additional.items():
        owned = _owned_option(key, cfg.slurm) if value is not None else None
        if owned:
            option, setting = owned
            use = f"; set it with {setting}" if setting else ""
            raise ConfigError(
                f"slurm.additional.{key}: --{option} is the launcher's to set: it would "
                f"replace the launcher's in every job{use}. Drop it with "
                f"slurm.additional.{key}=null"
            )
    gpus, device = cfg.slurm.gpus_per_node, cfg.eval.device
    if cfg.assembles and cfg.eval.after_training and device.startswith("cuda"):
        # the assembly job evaluates: a GPU it lacks failed it once it had assembled
        if int(device.partition(":")[2] or 0) >= gpus:
            raise ConfigError(
                f"eval.device={device}: the assembly job, which evaluates the run, has "
                f"{gpus} GPU(s) (slurm.gpus_per_node={gpus}): give eval.device=auto, or "
                "eval.after_training=false and evaluate the run once the jobs are done"
            )
    missing = [tool for tool in ("sbatch", "srun") if shutil.which(tool) is None]
    if missing:
        raise ConfigError(
            f"launcher=slurm: {' and '.join(missing)} not found on PATH, so no SLURM job "
            f"can be submitted from here: run `{COMMAND['train']}` on the cluster's login "
            "node, or use launcher=local"
        )


def check_queue(run: RunFolder) -> None:
    """Refuse a submission while the jobs of the run's last one are queued or running.

    A second chain would train stage 1, or a stage-2 job, in the same folder twice
    (``resume=RUN launcher=slurm`` while stage 1 still waits in the queue).

    Raises:
        ConfigError: naming the jobs still in ``squeue``, or why it could not be asked.
    """
    record = run.slurm_dir / "submitted.json"
    if not record.is_file():
        return
    advice = (
        "once squeue shows none of this run's jobs, delete it and submit again (it is "
        "written at each submission)"
    )
    jobs = read_state(record, dict, ("jobs",), advice)["jobs"]
    try:
        ids = {str(job["job_id"]) for job in jobs}
    except (TypeError, KeyError) as e:
        why = f"{type(e).__name__}: {e}"
        raise ConfigError(
            f"{record} cannot be read ({why}): the run folder is damaged; {advice}"
        ) from None
    try:
        # %F: an array's own job id (what submitted.json records), else the job id
        command = ["squeue", "--noheader", "--format=%F", f"--user={getpass.getuser()}"]
        queued = subprocess.run(command, capture_output=True, text=True, check=True, timeout=120)
    except (OSError, KeyError, subprocess.SubprocessError) as e:  # KeyError: no user name
        detail = getattr(e, "stderr", None) or e
        raise ConfigError(
            f"launcher=slurm: cannot ask squeue whether the jobs of the last submission "
            f"({', '.join(sorted(ids))}, {record}) still run: {detail}"
        ) from None
    active = sorted(ids & set(queued.stdout.split()))
    if active:
        raise ConfigError(
            f"launcher=slurm: SLURM jobs {', '.join(active)} of this run's last submission "
            f"({record}) are still queued or running; submitting again would train the same "
            "stages twice. Wait for them to end (or scancel them), then resume"
        )
