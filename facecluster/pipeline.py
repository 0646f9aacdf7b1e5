"""The two-stage training run that ``train.py`` calls (Ahmadi & Dianat, JSDP 2024).

In the order of the method: open the run folder, build the datamodule, fit stage 1
(a backbone with one margin head over all identities), cluster the identities on
their class-mean embeddings (the ClusteringCallback, at the end of stage 1), fit
stage 2 (one sub-net per cluster, each warm-started from the stage-1 backbone), and
write the held-out results. One ``Trainer.fit`` per stage (see docs/ARCHITECTURE.md
for why). The run folder's layout and resume rules are :mod:`facecluster.run`'s; the
Trainer assembly is :mod:`facecluster.builders`'.

Every process of a DDP run executes this code (Lightning starts the other ranks by
re-running the script); only global rank 0 writes the run folder.
"""

from __future__ import annotations

import contextlib
import os
import shlex
import sys
from collections.abc import Iterator, Sequence
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import lightning as L
import torch
from lightning.pytorch.utilities import rank_zero_info, rank_zero_warn
from lightning.pytorch.utilities.exceptions import SIGTERMException

from facecluster.builders import (
    backbone_parameters,
    build_datamodule,
    build_trainer,
    check_head,
    check_identity_count,
    check_identity_names,
    check_trainer,
    check_trainer_settings,
    check_verification_sets,
    close_process_group,
    detach_started_ranks,
    fit_eval_batches,
    hardware_hints,
    module_args,
    starting_weights,
    stop_started_ranks,
    stopped_run,
    warn_trained_pairs,
)
from facecluster.callbacks import ClusteringCallback, ResumeHint
from facecluster.callbacks.interrupt import forget_sigterm, resume_hint, stopping_together
from facecluster.clustering import ClusterAssignment
from facecluster.config import (
    COMMAND,
    RUN_CONFIG,
    Config,
    ConfigError,
    SlurmConfig,
    invalid,
    naming,
    resume_command,
)
from facecluster.data import FaceDataModule
from facecluster.io import shown_list
from facecluster.launch import (
    balanced_groups,
    check_local_jobs,
    check_queue,
    check_slurm,
    devices_per_job,
    run_local,
    stage2_overrides,
    submit_slurm,
)
from facecluster.loggers import build_logger, check_wandb_server, finish_logger
from facecluster.models.backbone_module import BackboneSystem
from facecluster.models.subnets_module import SubnetSystem
from facecluster.results import (
    provenance,
    result_metrics,
    stage2_summary,
    summarise,
    training_table,
)
from facecluster.run import (
    JOB_ENV,
    RUN_DIR_ENV,
    RunFolder,
    is_global_zero,
    job_name,
    launched_processes,
    rank0_timeout,
    stage2_settings,
)


@dataclass
class RunResult:
    """What a finished run returns (so tests and notebooks can call ``train`` in-process)."""

    run_dir: Path
    results: dict[str, Any] | None
    """None when the run is not finished (stage=1/cluster, a stage-2 job, a submission)."""
    table: str | None
    backbone: BackboneSystem | None = None
    subnets: SubnetSystem | None = None
    assignment: ClusterAssignment | None = None


@dataclass
class _Run:
    """What both stages share: the config, data, folder, logger and extra callbacks."""

    cfg: Config
    dm: FaceDataModule
    folder: RunFolder
    logger: Any
    callbacks: Sequence[L.Callback]
    weights: dict[str, Any] | None = None
    """``model.weights`` read and checked at start, when stage 1 starts from epoch 0."""
    stage1: dict[str, Any] | None = None
    """Stage 1's summary when this process fitted it (other ranks may not see the file
    rank 0 writes yet), else read from the run folder."""
    stage1_held: contextlib.ExitStack = field(default_factory=contextlib.ExitStack)
    """The run's stage-1 lock while this command holds it (:meth:`RunFolder.stage1_lock`),
    let go once this process's stage-2 job holds its own lock (:func:`fit_stage2`)."""

    def stage1_summary(self) -> dict[str, Any]:
        return self.stage1 if self.stage1 is not None else self.folder.stage_summary(1)


def train(cfg: Config, callbacks: Sequence[L.Callback] = ()) -> RunResult:
    """Run (or resume) the whole two-stage method and return its held-out results.

    Args:
        cfg: a validated config (``load_config``; ``RunFolder.config_for_resume`` to
            continue a run).
        callbacks: extra Lightning callbacks added to both stages' Trainers, which
            run in this process: refused where stage 2 trains in jobs of their own
            (``launcher=slurm``; ``launcher=local`` with ``stage2.jobs`` > 1).
    """
    with _this_run_only():
        # a config changed after its load (cfg.method = ...) is checked again: such a
        # run trained, and its config.yaml was then refused by evaluate, export, resume
        cfg.validate()
        L.seed_everything(cfg.seed, workers=True, verbose=False)
        if problems := cfg.training_problems():
            raise invalid(problems)
        if cfg.launcher.name == "slurm" or cfg.starts_local_jobs():
            _refuse_callbacks(
                callbacks, "launcher=slurm" if cfg.launcher.name == "slurm" else "stage2.jobs"
            )
        if launched_processes() > 1:
            rank0_timeout()  # a bad FACECLUSTER_RANK0_TIMEOUT: before the data scan
        if cfg.stage != "assemble":  # what Lightning refuses, before the data scan
            if cfg.launcher.name == "local":  # a SLURM job's command is launcher=local
                check_trainer(cfg)
            else:  # the login node: before any submission; a job's GPUs are its own check
                check_trainer_settings(cfg)
        if cfg.launcher.name == "slurm":
            check_slurm(cfg)  # submitit, sbatch and srun here: before the scan and the folder
        elif not cfg.resume and "SLURM_JOB_ID" not in os.environ:  # a job's own: launcher=local
            _warn_slurm_unused(cfg)
        check_wandb_server(cfg)
        # what the run folder and this node decide, before the data scan (minutes for a
        # .rec without identity records): an existing run, a missing stage, a busy run
        folder = RunFolder.for_training(cfg)
        held = frozenset() if cfg.resume else folder.held()  # a new run's, before the scan
        if cfg.launcher.name == "slurm":  # first: the jobs still queued, named as such
            check_queue(folder)  # before the run folder changes
        _check_prerequisites(cfg, folder)
        done = (
            bool(cfg.resume)
            and folder.finished
            and cfg.stage == "all"
            and cfg.stage2.subnets is None
            and not (cfg.two_stage and folder.missing_subnets(cfg.clustering.num_clusters))
        )
        if done:
            try:  # what the evaluation (or the results table) reads: named in one line
                folder.check_weights(cfg.two_stage)
            except (OSError, ValueError) as e:
                raise ConfigError(f"resume={folder.path} is finished, but {e}") from e
            evaluates = cfg.eval.after_training
            rank_zero_info(  # it evaluated again, without a word
                f"{folder.path} is finished: nothing to train; "
                + (
                    f"its test split is evaluated again (`{COMMAND['evaluate']} "
                    f"run={folder.path}` does only that)"
                    if evaluates
                    else f"`{COMMAND['evaluate']} run={folder.path}` evaluates it"
                )
            )
        check_local_jobs(cfg)  # local stage-2 jobs must fit this node
        # read whole: a broken set stops before the data scan and any training (a
        # resume past stage 1 that does not evaluate reads none); its pairs' people are
        # compared with the run's identities once the data is scanned
        stage1_done = bool(cfg.resume) and folder.has_stage_summary(1)
        verification = check_verification_sets(cfg, stage1_done)
        backbone_params = backbone_parameters(cfg)
        check_head(cfg)
        fresh = _stage1_pending(cfg, folder) and folder.stage1_resume_point(cfg.resume) is None
        weights = starting_weights(cfg) if fresh else None  # before the data scan
        dm = build_datamodule(cfg)
        check_identity_count(cfg, dm)
        check_identity_names(cfg, dm)  # before the run folder is made
        warn_trained_pairs(verification, dm.class_names)
        run_id = folder.create(new=not cfg.resume, held=held)  # a resume's: nothing written
        folder.check_free_space(cfg, backbone_params, dm.num_classes)  # on every rank
        folder.keep_data(dm)  # a resume: checked, not rewritten
        # Stage 1 and the clustering are held from here, before this command writes the
        # run's config: a second command on the run, past the check at start while this
        # one scanned the data, is refused here (a SLURM submission: its job holds it)
        fits = cfg.launcher.name == "local" and _stage1_pending(cfg, folder)
        with contextlib.ExitStack() as stage1_held:
            if fits:
                stage1_held.enter_context(folder.stage1_lock())
            elif cfg.launcher.name == "local":  # a lock a killed command left: removed
                folder.drop_stale_stage1_lock()
            if not cfg.resume and launched_processes() == 1:  # created by two at once?
                folder.check_unclaimed(names=(RUN_CONFIG,))  # (class_names.json: ours now)
            folder.save_config(cfg)
            folder.save_unseen_identities({s: dm.unseen_identities(s) for s in ("val", "test")})
            rank_zero_info(f"facecluster run folder: {folder.path}")
            for hint in [] if done else hardware_hints(cfg):  # nothing trains when done
                rank_zero_warn(hint)
            if cfg.resume and not done and cfg.launcher.name == "local":  # where it goes on
                if where := _resumed_from(cfg, folder):
                    rank_zero_info(f"resumed: {where}")
            logger = build_logger(cfg, folder.path, run_id)
            with finish_logger(logger):
                hint = ResumeHint(folder.path, cfg.stage, JOB_ENV)  # Ctrl-C: how to continue
                try:
                    extra = [*callbacks, hint]
                    return _two_stages(
                        _Run(cfg, dm, folder, logger, extra, weights, stage1_held=stage1_held)
                    )
                except Exception as e:  # bad data, a lost peer, a full disk: how to go on
                    stop = stopped_run(e)  # (a stage-2 job: its launcher says how)
                    if stop and not os.environ.get(JOB_ENV):
                        e.add_note(resume_hint(folder.path, cfg.stage, stop.when))
                    raise


def _check_prerequisites(cfg: Config, folder: RunFolder) -> None:
    """Refuse ``stage=`` before the run folder changes, here or at submission, when what
    it needs is missing: stage=cluster a finished stage 1, stage=2 and a two-stage
    assembly the clustering, a single model's assembly its finished stage 1 (a SLURM
    submission queued jobs that could only fail). Every stage but 1 continues a run, so
    it needs ``resume=`` (a new folder's name in the advice was refused by that advice)."""
    if cfg.stage in ("cluster", "2", "assemble") and not cfg.resume:
        raise ConfigError(
            f"stage={cfg.stage} continues a run: give resume=<run folder> (a new run starts "
            "with stage=1, or stage=all, the default)"
        )
    if cfg.stage == "cluster" and not folder.has_stage_summary(1):
        raise ConfigError(
            f"stage=cluster: stage 1 of {folder.path} is not finished; train it first with "
            f"`{resume_command(folder.path, 'stage=1')}`"
        )
    if _stage1_pending(cfg, folder):  # another command fitting them: before any write
        folder.check_stage1_free()
        _check_clusters_kept(cfg, folder)
    if cfg.two_stage and cfg.resume and folder.clusters_path.is_file():
        # damaged, or not the config's K (config.yaml edited): before the resume's
        # overrides reach config.yaml (memory-mapped: the class means are not read)
        folder.assignment(cfg.clustering.num_clusters)
    if cfg.stage in ("2", "assemble") and cfg.two_stage and not folder.clusters_path.is_file():
        raise ConfigError(
            f"stage={cfg.stage}: {folder.clusters_path} is missing: the run has no clustering "
            "yet (stage=cluster)"
        )
    if cfg.stage in ("2", "assemble") and cfg.two_stage and not folder.has_stage_summary(1):
        # clusters.pt is saved at the end of stage 1's fit, before its test: a stop in
        # between left it alone (stage 2 then trained every sub-net and failed at the end)
        raise ConfigError(
            f"stage={cfg.stage}: stage 1 of {folder.path} is not finished (it was stopped "
            f"before its test); finish it with `{resume_command(folder.path, 'stage=1')}`"
        )
    if cfg.stage == "assemble" and not cfg.two_stage and not folder.has_stage_summary(1):
        raise ConfigError(
            f"stage=assemble: stage 1 of {folder.path} is not finished; train it first with "
            f"`{resume_command(folder.path)}`"
        )
    if cfg.stage == "assemble" and cfg.two_stage:
        _refuse_missing(folder, folder.missing_subnets(cfg.clustering.num_clusters))
    if cfg.two_stage and cfg.stage in ("all", "2") and cfg.stage2.subnets is not None:
        if cfg.stage2.group is None:  # a retrain (a job of one resumes its own group)
            folder.check_no_job_training()
    if cfg.resume and cfg.stage2.group is None and not os.environ.get(JOB_ENV):
        folder.check_not_training()  # a launcher's jobs run beside each other
    if cfg.two_stage and cfg.stage == "all" and cfg.stage2.subnets is not None:
        # stage=all ends by assembling every sub-net: the others must be trained already
        # (a new run trained stage 1, the clustering and the named ones, then stopped)
        named = cfg.stage2.subnets
        others = [k for k in folder.missing_subnets(cfg.clustering.num_clusters) if k not in named]
        if others:
            subnets = "[" + ",".join(map(str, named)) + "]"
            again = ("stage=2", f"stage2.subnets={subnets}")
            command = (
                resume_command(folder.path, *again)
                if cfg.resume
                else f"{COMMAND['train']} resume=<run> {shlex.join(again)}"
            )
            raise ConfigError(
                f"stage2.subnets={subnets} with stage=all: sub-nets {others} of "
                f"{folder.path if cfg.resume else 'a new run'} are not trained yet, and "
                "stage=all ends by assembling every sub-net. Train "
                "the run first (without stage2.subnets); to train named sub-nets again after "
                f"that: `{command}`"
            )


def _check_clusters_kept(cfg: Config, folder: RunFolder) -> None:
    """Refuse to train stage 1 again under the run's clusters (its last.ckpt lost after
    the clustering), or to cluster again under sub-nets trained on the run's clusters: a
    ``clusters.pt`` deleted while finished (or started) sub-nets remain was made anew,
    and the sub-nets were assembled over groups they never trained on (k-means on
    another machine, thread count or faiss version need not give the same groups).
    Named sub-nets (``stage2.subnets``) count too: their files stay until stage 2
    retrains them, and a ``stage=cluster``, a stop before stage 2 or a SLURM job that
    does not carry the names left them to be assembled over the new clusters."""
    last = folder.last_checkpoint(1)
    if folder.clusters_path.is_file() and not folder.has_stage_summary(1) and not last.is_file():
        # stopped in stage 1's test, then last.ckpt lost: stage 1 trained again from epoch
        # 0 under the clusters of the backbone it replaced (a review)
        raise ConfigError(
            f"{last} is missing, but stage 1 of {folder.path} has been clustered "
            f"({folder.clusters_path.name}): training stage 1 again would give the sub-nets "
            "another backbone than the clusters were made from. Restore last.ckpt from a "
            f"copy of the run; or delete {folder.clusters_path} and {folder.path / 'stage2'} "
            f"and resume, which trains stage 1 again and clusters it: "
            f"`{resume_command(folder.path)}`"
        )
    if not cfg.two_stage or cfg.stage == "1" or folder.clusters_path.is_file():
        return
    kept = sorted(set(folder.subnet_records()) | {k for g in folder.started_jobs() for k in g})
    if kept:
        raise ConfigError(
            f"{folder.clusters_path} is missing, but sub-nets {kept} of {folder.path} were "
            "trained on its clusters: clustering again need not give the same groups. "
            "Restore clusters.pt from a copy of the run; or delete "
            f"{folder.path / 'stage2'} (the sub-nets and jobs of the lost clusters) and "
            "resume, which clusters again and trains every sub-net: "
            f"`{resume_command(folder.path)}`"
        )


def _refuse_missing(folder: RunFolder, missing: list[int]) -> None:
    if missing:
        raise ConfigError(
            f"stage=assemble: sub-nets {missing} of {folder.path} are not trained; "
            f"train them with `{resume_command(folder.path)}`"
        )


def _two_stages(run: _Run) -> RunResult:
    cfg, folder = run.cfg, run.folder
    clustering = _clustering_unit(run) if cfg.two_stage else None
    if cfg.launcher.name == "slurm":
        return _submit(run, clustering)
    backbone = subnets = None
    if cfg.stage in ("all", "1", "cluster"):
        backbone = _stage1_and_clustering(run, clustering)
    if clustering is not None and cfg.stage in ("all", "2"):
        subnets = _stage2(run, clustering)
    results = table = None
    if cfg.assembles and is_global_zero():  # the other ranks' work is on disk by now
        results, table = _assemble(run, clustering, required=cfg.stage != "2")
    elif not cfg.assembles:
        rank_zero_info(f"stage={cfg.stage} done; run folder: {folder.path}")
    assignment = clustering.assignment if clustering is not None else None
    return RunResult(folder.path, results, table, backbone, subnets, assignment)


def _refuse_callbacks(callbacks: Sequence[L.Callback], jobs: str) -> None:
    """ConfigError for callbacks given to :func:`train` (its own ``ResumeHint`` aside)
    where stage 2 trains in jobs of their own, as ``jobs`` names them: they were left out
    of the jobs without a word (a review)."""
    if given := [c for c in callbacks if not isinstance(c, ResumeHint)]:
        names = ", ".join(type(c).__name__ for c in given)
        raise ConfigError(
            f"train(callbacks=[{names}]): {jobs} trains in processes of their own, which "
            "callbacks given here cannot reach: train with launcher=local stage2.jobs=1 "
            "(every stage in this process)"
        )


def _clustering_unit(run: _Run) -> ClusteringCallback:
    c = run.cfg.clustering
    return ClusteringCallback(
        run.dm,
        c.num_clusters,
        c.method,
        run.cfg.seed,
        run.folder.clusters_path,
        niter=c.niter,
        nredo=c.nredo,
        features=c.features,
        overlap=c.overlap,
    )


def _stage1_and_clustering(
    run: _Run, clustering: ClusteringCallback | None
) -> BackboneSystem | None:
    """Stage 1 and the clustering unit, whichever of them ``stage=`` asks for and the
    run folder lacks (under the run's stage-1 lock, which ``train`` took: decided now,
    a command that held it before may have finished them; fitted again, a finished
    stage 1 would cluster again, replacing clusters.pt). Returns the stage-1 model
    when it was fitted here."""
    cfg, folder = run.cfg, run.folder
    unit = clustering if cfg.stage != "1" else None
    if _stage1_pending(cfg, folder):
        # clusters.pt is written once, at the end of stage 1's fit: a run stopped after it
        # (in stage 1's test) keeps it, never clustered again under finished sub-nets
        settled = unit is not None and folder.clusters_path.is_file()
        resume = folder.stage1_resume_point(cfg.resume)
        if cfg.resume and resume is None:
            _warn_starting_over(folder.last_checkpoint(1), "stage 1")
        backbone, run.stage1 = fit_stage1(run, resume, unit, settled)
        return backbone
    if unit is not None:
        unit.restore()
    return None


def _warn_slurm_unused(cfg: Config) -> None:
    """A new run given ``slurm.*`` settings with ``launcher=local`` trains on this
    machine (a login node, say), where the settings change nothing: said, naming them
    (it trained here without a word)."""
    default = asdict(SlurmConfig())
    given = [f"slurm.{k}={v}" for k, v in asdict(cfg.slurm).items() if v != default[k]]
    if given:
        rank_zero_warn(
            f"{', '.join(given)} set, but launcher=local trains on this machine, where "
            "slurm.* changes nothing: launcher=slurm submits the run to SLURM"
        )


def _warn_starting_over(last: Path, what: str) -> None:
    """A resumed stage whose ``last.ckpt`` is gone while other checkpoints of it are
    there (deleted by hand, a disk clean-up) starts over at epoch 0: said, naming them
    (its trained epochs were lost without a word)."""
    kept = sorted(p.name for p in last.parent.glob("*.ckpt")) if last.parent.is_dir() else []
    if kept:
        shown = shown_list(kept, 3)
        rank_zero_warn(
            f"{what}: {last} is missing, so it starts over at epoch 0, though {shown} "
            f"{'is' if len(kept) == 1 else 'are'} there: to continue from one, stop now and "
            f"copy it to {last.name}"
        )


def _resumed_from(cfg: Config, folder: RunFolder) -> str | None:
    """Where a resumed run goes on, in a few words, or None (this command trains
    nothing of it: ``stage=1`` of a run past stage 1): a run stopped before stage 1
    saved a checkpoint began again without a word (a review of the console output)."""
    if _stage1_pending(cfg, folder):
        if folder.has_stage_summary(1):  # only its clustering is missing
            return "stage 1 is done; its backbone clusters the identities"
        point = folder.stage1_resume_point(cfg.resume)
        if point is None:
            return "stage 1 starts again from its first epoch (it had saved no checkpoint)"
        return f"stage 1 goes on from {point}"
    if cfg.two_stage and cfg.stage in ("all", "2"):
        return "stage 1 is done; stage 2 goes on"
    return None


def _stage1_pending(cfg: Config, folder: RunFolder) -> bool:
    """Whether this command fits stage 1 or the clustering: ``stage=`` asks for what the
    run folder lacks (a SLURM submission: what its jobs will fit)."""
    if cfg.stage not in ("all", "1", "cluster"):
        return False
    clusters = cfg.two_stage and cfg.stage != "1"
    return not folder.has_stage_summary(1) or (clusters and not folder.clusters_path.is_file())


def fit_stage1(
    run: _Run,
    resume: Path | None,
    clustering: ClusteringCallback | None,
    settled: bool = False,
) -> tuple[BackboneSystem, dict[str, Any]]:
    """Stage 1, then the clustering unit (method=single: stage 1 alone, no clustering);
    ``settled``: the run has its ``clusters.pt`` already, which is restored, not made
    again."""
    # Seeded here, not only at start: a resumed run builds the same initial weights.
    torch.manual_seed(run.cfg.seed + 1)
    model = BackboneSystem(run.dm.num_classes, **module_args(run.cfg, 1))
    if resume is None and run.weights is not None:  # model.weights: not a random start
        model.backbone.load_state_dict(run.weights)
    extra = [clustering] if clustering is not None and not settled else []
    trainer = build_trainer(
        run.cfg, 1, run.folder, run.logger, [*extra, *run.callbacks], batches=run.dm.stage1_steps
    )
    fit_eval_batches(trainer, run.dm, 1)
    trainer.fit(
        model, datamodule=run.dm, ckpt_path=str(resume) if resume else None, weights_only=True
    )
    if clustering is not None and settled:
        # logged again: a stop after clusters.pt was saved, before its figures were
        # logged, lost them for good (a stop in stage 1's test logs them twice, alike)
        clustering.restore(trainer)
    elif clustering is not None and clustering.assignment is None:
        # A resumed stage 1 that was already finished skips on_train_end: same method.
        with stopping_together(trainer, model):
            clustering.cluster(trainer, model)
    _drop_optimizer_state(trainer)
    if run.folder.has_stage_summary(1):  # finished and tested before (stage=cluster)
        return model, run.folder.stage_summary(1)
    test = trainer.test(model, datamodule=run.dm, verbose=False)[0]
    summary = {
        "global_step": trainer.global_step,
        "test_acc": test["test/acc"],
        "epochs": trainer.current_epoch,
        # its own: a resume between the stages may give stage 2 another data.batch_size
        "batch_size": run.dm.stage1_batch_size(),
        "world_size": trainer.world_size,
        **provenance(trainer.strategy.root_device),  # where and by which code it trained
    }
    run.folder.save_stage_summary(1, summary)
    return model, summary


def _drop_optimizer_state(trainer: L.Trainer) -> None:
    """Free a finished fit's optimizer state. The model stays (stage 2 and the
    evaluation run while ``train`` keeps it for its RunResult), and its Trainer with it,
    whose teardown moved the state to the CPU instead of freeing it: SGD's momentum is
    as large as the weights (4.2 GB for a head of 2M identities x 512, computed)."""
    trainer.strategy.optimizers = []
    trainer.strategy.lr_scheduler_configs = []


def _stage2(run: _Run, clustering: ClusteringCallback) -> SubnetSystem | None:
    """The sub-nets ``stage2.subnets`` names, else those not finished: in this process
    (one job, or this process's group), or as local jobs, one per group."""
    cfg, folder = run.cfg, run.folder
    assignment = _assignment(run, clustering)
    if cfg.stage2.group is not None:  # a job: its group, resumed if it had started
        named = cfg.stage2.subnets or range(assignment.num_clusters)
        groups = balanced_groups(run.dm.cluster_train_images(), named, cfg.stage2.jobs)
        if cfg.stage2.group >= len(groups):
            return None  # fewer sub-nets than jobs
        group = groups[cfg.stage2.group]
        if not set(group) & set(folder.missing_subnets(assignment.num_clusters)):
            # run again once it had saved them all (requeued as it ended, or resubmitted)
            rank_zero_info(f"stage 2: sub-nets {group} are trained already: nothing to do")
            return None
        return fit_stage2(run, clustering, group, own_logger=True)
    groups, fresh = _plan_stage2(run, assignment)
    if not groups:
        return None
    if len(groups) > 1:  # before anything changes: a resume may plan more than stage2.jobs
        check_local_jobs(cfg, len(groups))
        _refuse_callbacks(run.callbacks, f"its plan of {len(groups)} stage-2 jobs")
    if fresh:
        folder.restart_subnets(groups)
    folder.clear_training_report()  # the results are stale until assembled again
    if len(groups) == 1:
        # the run's logger continues stage 1 with a stage 2 of one job over every
        # sub-net; a group of some of them (a job among several, continued here after
        # it was killed, or the rest of a stopped run) logs to that job's own run, as a
        # job does, and so does a retrain of named sub-nets: on the run's step axis its
        # steps would be the first training's (a CSV writer drops those rows as redone)
        own = fresh or len(groups[0]) < assignment.num_clusters
        return fit_stage2(run, clustering, groups[0], own_logger=own, fresh=fresh)
    # The other DDP processes of stage 1 (Lightning's launcher started them: local jobs
    # under torchrun or srun are refused) have nothing more to do: every process leaves
    # the training's process group and they end now. Waiting in train.py's evaluation
    # for rank 0, in a collective of that group, they timed out after its 30 minutes
    # while the jobs trained, and Lightning's observer then killed rank 0 with its jobs
    # running; and they held their GPUs. Rank 0 evaluates after the jobs: alone, or on
    # the GPUs the jobs took (cli._evaluate_trained).
    close_process_group()
    if is_global_zero():
        # one that ends in an error now (a Ctrl-C that reached it) must not have the
        # observer kill this process, and the jobs with it unstopped
        detach_started_ranks()
        try:
            run_local(folder, groups, cfg.launcher.parallel, devices_per_job(cfg))
        except (KeyboardInterrupt, SystemExit):  # the launcher stopped: the jobs stay quiet
            print(resume_hint(folder.path, cfg.stage), file=sys.stderr)
            raise
    return None


def _plan_stage2(run: _Run, assignment: ClusterAssignment) -> tuple[list[list[int]], bool]:
    """The groups of sub-nets this command trains, one job each, and whether they start
    over (named by ``stage2.subnets``) rather than finish the run.

    Finishing: jobs that had saved a checkpoint continue with the same sub-nets (each
    sub-net in one job only), also one that had saved some of its sub-nets when it was
    stopped (it saves the others; at K=64 in one job the saves take minutes, and a new
    job would train them again from the stage-1 backbone); the other missing sub-nets
    are balanced into the rest.
    """
    cfg, folder = run.cfg, run.folder
    images = run.dm.cluster_train_images()
    if cfg.stage2.subnets is not None:
        return balanced_groups(images, sorted(cfg.stage2.subnets), cfg.stage2.jobs), True
    todo = folder.missing_subnets(assignment.num_clusters)
    started: list[list[int]] = []
    taken: set[int] = set()
    for group in folder.started_jobs():  # furthest first
        if set(group) & set(todo) and not taken & set(group):
            started.append(group)
            taken |= set(group)
    rest = [k for k in todo if k not in taken]
    groups = started + (
        balanced_groups(images, rest, cfg.stage2.jobs - len(started)) if rest else []
    )
    # a count other than the one the started jobs were grouped by (a job that finished
    # while another was stopped leaves fewer groups: no word for that)
    planned = balanced_groups(images, range(assignment.num_clusters), cfg.stage2.jobs)
    if len(groups) != cfg.stage2.jobs and any(group not in planned for group in started):
        rank_zero_warn(
            f"stage2.jobs={cfg.stage2.jobs}, but {len(started)} job(s) of the run had started "
            f"({', '.join(job_name(g) for g in started)}) and continue from their checkpoints "
            f"with their sub-nets: stage 2 runs as {len(groups)} job(s). To group the "
            "sub-nets anew, retrain them from the stage-1 backbone: stage2.subnets=[...]",
            category=UserWarning,
        )
    return groups, False


def fit_stage2(
    run: _Run,
    clustering: ClusteringCallback,
    subnets: list[int],
    own_logger: bool,
    fresh: bool = False,
) -> SubnetSystem:
    """One stage-2 job: a fit over ``subnets``, each warm-started from the stage-1
    backbone; each finished sub-net's weights and record are saved in the run folder.

    Args:
        own_logger: log to this job's own W&B run or CSV file (a job among several),
            else continue the run's logger after stage 1's steps.
        fresh: start from the stage-1 backbone even if the job has a checkpoint (decided
            before any rank could see rank 0 delete it).
    """
    job = job_name(subnets)
    with run.folder.job_lock(job, subnets):  # from choosing the checkpoint to the saved sub-nets
        # this job's lock holds the run now: the stage-1 lock goes (held through stage 2,
        # a kill there left it in the run once a resume had finished it, where another
        # machine's command cannot tell it is stale). Local jobs' launcher keeps it.
        run.stage1_held.close()
        return _fit_job(run, clustering, subnets, job, own_logger, fresh)


def _fit_job(
    run: _Run,
    clustering: ClusteringCallback,
    subnets: list[int],
    job: str,
    own_logger: bool,
    fresh: bool,
) -> SubnetSystem:
    cfg, folder = run.cfg, run.folder
    assignment = clustering.assignment
    assert assignment is not None
    clustering.connect(subnets)
    sizes = assignment.cluster_sizes().tolist()
    model = SubnetSystem(
        run.dm.num_classes,
        sizes,
        **module_args(cfg, 2),
        subnet_ids=subnets,
        seed=cfg.seed,
        shared_layers=cfg.model.shared_layers,
        not_mine=cfg.stage2.negatives > 0,
        activation_checkpointing=cfg.stage2.activation_checkpointing,
    )
    model.set_assignment(assignment)
    folder.save_job(subnets)
    resume = folder.last_checkpoint(2, job)
    if fresh or not resume.is_file():
        if not fresh:
            _warn_starting_over(resume, f"stage-2 job {job}")
        resume = None
        stage1 = folder.stage1_weights()
        model.warm_start(stage1.backbone, cfg.head.init_from_class_means, stage1.head_state)
    logger = run.logger
    if own_logger:
        logger = build_logger(cfg, folder.path, folder.run_id, job)
    if logger is not None:  # one continuous step axis over both stages
        logger.step_offset = run.stage1_summary()["global_step"]
    rank_zero_info(f"stage 2: job {job} trains sub-nets {subnets}")
    with finish_logger(logger if own_logger else None):
        trainer = build_trainer(
            cfg, 2, folder, logger, run.callbacks, job=job, batches=run.dm.subnet_steps
        )
        fit_eval_batches(trainer, run.dm, 2)
        trainer.fit(
            model, datamodule=run.dm, ckpt_path=str(resume) if resume else None, weights_only=True
        )
        test = trainer.test(model, datamodule=run.dm, verbose=False)[0]
    _drop_optimizer_state(trainer)
    # a job continued after a kill while it saved: the sub-nets it saved stay untouched
    saved = folder.subnet_records() if is_global_zero() else {}
    # a stage-2 job may run on another machine than stage 1
    made = provenance(trainer.strategy.root_device)
    for k in subnets:
        backbone, head = model.subnet_state(k)  # every rank: it gathers a sharded head
        if k in saved:
            continue
        correct, total = model.counts[k]
        record = {
            "cluster": k,
            "job": job,
            "identities": sizes[k],
            "epochs": trainer.current_epoch,
            "global_step": trainer.global_step,
            # its images per step: global_step x batch_size x world_size went through
            # its backbone (bench/results.py's training compute)
            "batch_size": run.dm.subnet_batch_size(k),
            "world_size": trainer.world_size,
            "settings": stage2_settings(run.cfg),  # config.yaml: the last command's
            "test_acc": float(test[f"test/acc_subnet{k}"]),
            "test_correct": correct,
            "test_images": total,
            **made,
        }
        folder.save_subnet(k, backbone, head, record)
    trainer.strategy.barrier("sub-nets saved")  # every rank may assemble next
    return model


def _assemble(
    run: _Run, clustering: ClusteringCallback | None, required: bool = True
) -> tuple[dict[str, Any] | None, str | None]:
    """Stage 1 and every finished sub-net into the run's results (written and logged
    by rank 0). Sub-nets still missing: an error naming them when ``required``, else
    a message and (None, None) (stage=2 over some of the sub-nets)."""
    cfg, folder = run.cfg, run.folder
    stage2 = assignment = None
    if clustering is not None:
        assignment = _assignment(run, clustering)
        records = folder.subnet_records()
        missing = [k for k in range(assignment.num_clusters) if k not in records]
        if missing and not required:
            rank_zero_info(
                f"sub-nets {missing} are still to train; the results come when they are "
                f"(`{resume_command(folder.path)}`)"
            )
            return None, None
        _refuse_missing(folder, missing)
        stage2 = stage2_summary(records)
        folder.save_stage_summary(2, stage2)
    results = summarise(cfg.method, run.dm, assignment, run.stage1_summary(), stage2)
    table = training_table(results)
    folder.save_training_report(results, table)
    if run.logger is not None and is_global_zero():
        # at the run's last step (with no step a CSV row got len(rows) as its step), and
        # written now: no Trainer follows whose end would save the CSV
        last = run.stage1_summary()["global_step"] + (stage2["global_step"] if stage2 else 0)
        run.logger.step_offset = 0
        run.logger.log_metrics(result_metrics(results), step=last)
        run.logger.save()
    if is_global_zero():  # a result, on stdout as the evaluation's table (a log: stderr)
        print(f"\n{table}\n\nfacecluster run folder: {folder.path}", flush=True)
    return results, table


def _assignment(run: _Run, clustering: ClusteringCallback) -> ClusterAssignment:
    """The run's clustering: this process's, or the saved one."""
    if clustering.assignment is not None:
        return clustering.assignment
    with naming(f"stage={run.cfg.stage}"):
        return clustering.restore()


def _submit(run: _Run, clustering: ClusteringCallback | None) -> RunResult:
    """launcher=slurm: submit what the run lacks, chained; the jobs do the work."""
    cfg, folder = run.cfg, run.folder
    stage1 = cfg.stage in ("all", "1") and not folder.has_stage_summary(1)
    cluster = (
        cfg.two_stage and cfg.stage in ("all", "cluster") and not folder.clusters_path.is_file()
    )
    overrides: list[list[str]] = []
    if clustering is not None and cfg.stage in ("all", "2"):
        if folder.clusters_path.is_file():  # the same groups a local run would train
            groups, fresh = _plan_stage2(run, _assignment(run, clustering))
            if fresh:
                folder.restart_subnets(groups)
            overrides = [stage2_overrides(1, group)[0] for group in groups]
        else:  # each job finds its group in the clustering, once there is one
            named = cfg.stage2.subnets
            todo = sorted(named) if named is not None else list(range(cfg.clustering.num_clusters))
            overrides = stage2_overrides(cfg.stage2.jobs, todo)
        if overrides:
            folder.clear_training_report()
    assemble = cfg.assembles
    if folder.path.resolve().parts[1:2] in (("tmp",), ("dev",)):
        rank_zero_warn(
            f"launcher=slurm: the run folder {folder.path} looks local to this machine; "
            "the jobs' nodes must see it (set output_dir to a shared filesystem)"
        )
    if is_global_zero():
        submitted = submit_slurm(
            cfg, folder, stage1=stage1, cluster=cluster, stage2=overrides, assemble=assemble
        )
        names = ", ".join(f"{j['name']} ({j['job_id']})" for j in submitted["jobs"])
        if not names:  # stage=1 or stage=cluster of a run that has it
            rank_zero_info(
                f"launcher=slurm: stage={cfg.stage} of {folder.path} is done: nothing to "
                f"submit; `{resume_command(folder.path)}` submits the rest of the run"
            )
            return RunResult(folder.path, None, None)
        if assemble and cfg.eval.after_training:  # evaluating it again would do it twice
            then = (
                "The last job assembles the results and evaluates the run: its table in "
                f"{folder.eval_file('table')}"
            )
        elif assemble:
            then = f"When the last job is done: {COMMAND['evaluate']} run={folder.path}"
        else:  # stage=1 or stage=cluster: the run is not finished by these jobs
            then = (
                f"When the last job is done, the run continues with `{resume_command(folder.path)}`"
            )
        rank_zero_info(f"submitted to SLURM: {names}; logs in {folder.slurm_dir}. {then}")
    return RunResult(folder.path, None, None)


SEED_ENV = ("PL_GLOBAL_SEED", "PL_SEED_WORKERS")
"""What ``L.seed_everything(..., workers=True)`` leaves in the environment."""


@contextlib.contextmanager
def _this_run_only() -> Iterator[None]:
    """What this process holds for one run, let go when the run ends: the run folder,
    passed to the DDP ranks in an environment variable (never leaked into the next run
    of the same process), and Lightning's seed (:data:`SEED_ENV`); on an error, the DDP
    ranks that its Trainer started, which would otherwise wait for it
    (:func:`stop_started_ranks`). On SIGTERM every rank
    stops at the same batch (:class:`facecluster.callbacks.StopTogether`, which took
    the ranks this one started out of the sight of Lightning's child-process observer)
    and this one waits for them. (Lightning ends them on Ctrl-C.)"""
    inherited = {name: os.environ.get(name) for name in (RUN_DIR_ENV, *SEED_ENV)}
    forget_sigterm()
    try:
        yield
    except SIGTERMException:
        stop_started_ranks(cause="terminated")
        raise
    except SystemExit as e:
        if e.code == 1 and isinstance(e.__context__, KeyboardInterrupt):
            # Lightning ends a fit stopped by Ctrl-C with exit(1): raised as what it is,
            # as an interrupt outside a Trainer is (a notebook's `except
            # KeyboardInterrupt` caught neither SystemExit nor, in Jupyter, its traceback)
            raise KeyboardInterrupt from e
        raise
    except Exception:
        stop_started_ranks()
        raise
    finally:
        for name, value in inherited.items():  # the next run in this process starts clean
            if value is None:
                os.environ.pop(name, None)
            elif name != RUN_DIR_ENV:
                os.environ[name] = value
