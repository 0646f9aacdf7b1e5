"""The ``facecluster`` command: one entry point, one subcommand per job.

    facecluster train -c configs/smoke.yaml            # = python train.py ...
    facecluster evaluate run=runs/<run>                # = python evaluate.py ...
    facecluster pack SRC OUT                           # image folder -> InsightFace .rec
    facecluster export runs/<run> OUT --onnx           # a finished run -> deployable files
    facecluster enroll OUT new_people/                 # add identities, no retraining
    facecluster identify OUT photos/ --out who.csv     # who is in these images
    facecluster ijb OUT IJB_release/IJBC               # IJB-C 1:1 (for 1:N: --protocol 1:N)

``facecluster <command> --help`` shows each command's options and an example.
train.py and evaluate.py call :func:`train_main` and :func:`evaluate_main`.
Everything heavy is imported inside the command that needs it, so ``--help`` is
quick.
"""

from __future__ import annotations

import argparse
import gc
import os
import shlex
import signal
import sys
from collections.abc import Callable
from pathlib import Path
from typing import TYPE_CHECKING, NoReturn

if TYPE_CHECKING:
    from facecluster.config import Config
    from facecluster.pipeline import RunResult

TRAIN_HELP = """Train the two-stage clustered face-identification method.

    python train.py                                   # the bundled demo (configs/default.yaml)
    python train.py -c configs/smoke.yaml             # both stages in about a minute
    python train.py -c configs/experiment/lfw423.yaml -c configs/method/random.yaml
    python train.py data.root=/data/faces clustering.num_clusters=8 stage1.max_epochs=20
    python train.py resume=runs/<run>                 # continue an interrupted run
    python train.py stage2.jobs=4 launcher.parallel=2 # stage 2 as 4 jobs, 2 at a time
    python train.py launcher=slurm stage2.jobs=4 slurm.partition=gpu   # submit to SLURM

Any config key can be overridden as key=value (see docs/CONFIG.md).
"""

EVALUATE_HELP = """Evaluate finished runs on their held-out test split and print one table.

    python evaluate.py run=runs/<run>                          # one run
    python evaluate.py run=runs/a run=runs/b run=runs/c        # the paper's comparison
    python evaluate.py run=runs/<run> data.root=/data/faces route.top_m=2 eval.batch_size=128

Other key=value pairs override the runs' saved configs (docs/EVALUATION.md). The
table, its CSV/JSON and plots are written to <run>/eval/. Started by torchrun
(--nproc_per_node=N), each process scores its shard of the test split, with one
process's figures (docs/EVALUATION.md).
"""

EXPORT_HELP = """Write a finished two-stage run as files to deploy (docs/DEPLOYMENT.md).

    facecluster export runs/<run> exports/demo          # OUT/identifier.pt, OUT/backbone.pth
    facecluster export runs/<run> exports/demo --onnx   # and OUT/onnx/: ONNX models + arrays

OUT/identifier.pt holds plain tensors, numbers and strings only (read back with
torch.load(weights_only=True)); OUT/backbone.pth is the stage-1 backbone's state
dict (arcface_torch's layout for an IResNet). --onnx adds the router backbone and every sub-net
as ONNX models, with the class means, head rows and cluster assignment in
gallery.npz and the rest in identifier.json.
"""

ENROLL_HELP = """Add new identities to an export without retraining (docs/DEPLOYMENT.md).

    facecluster enroll exports/demo new_people/

FOLDER holds one sub-folder of aligned face crops per new identity. Each joins
the router (its stage-1 class mean) and the cluster the router picks for it, whose
sub-net head gains a row (its mean sub-net embedding). identifier.pt and onnx/
(gallery and JSON; the ONNX networks do not change) are rewritten in place; if
another enroll or export changes the folder meanwhile, nothing is written (run
it again).
"""

IDENTIFY_HELP = """Identify the faces in image files or folders; write one CSV row per image.

    facecluster identify exports/demo photos/ --out who.csv
    facecluster identify exports/demo a.jpg b.jpg --runtime onnx --threshold 0.5

Images must be aligned face crops, as in training (any size: they are resized
to the model's input). Columns: path, identity ("unknown" when the similarity is
below --threshold), score, similarity, cluster (the sub-net that answered), top5
(name:score;...), status (known, unknown, unreadable, or failed: an embedding that is
NaN, inf or zero).
"""


EXPORTED = " (a folder written by facecluster export)"

IJB_HELP = """IJB-B/C 1:1 verification and 1:N identification of a backbone's embeddings.

The backbone is an export's stage 1, or a backbone's weights file: 1:1 gives the TAR at
each FAR, 1:N the rank-k and the TPIR at each FPIR.

    facecluster ijb exports/r50 /data/IJB_release/IJBC
    facecluster ijb exports/r50 /data/IJB_release/IJBC --protocol 1:1 1:N
    facecluster ijb exports/r50 /data/IJB_release/IJBB --target IJBB --out ijbb.json
    facecluster ijb ms1mv3_arcface_r50/backbone.pth /data/IJB_release/IJBC --backbone r50

The release folder holds meta/ and loose_crop/. Each face is aligned by its five
points, embedded with its mirror image, weighted by its detector score and pooled
into its template; each 1:1 pair is scored by cosine, as arcface_torch's
eval_ijbc.py does, and each 1:N probe searched in the galleries G1 and G2 (IJB-B:
S1, S2), as InsightFace's IJB_evals.py does (docs/EVALUATION.md). Prints the tables
and writes them as JSON (--out).
"""


def at_least(minimum: float, kind: type = int) -> Callable[[str], float]:
    """An argparse ``type``: a number of ``kind`` (int or float) not below ``minimum``,
    refused in argparse's one line otherwise (a count of 0 made a benchmark divide by
    zero or time nothing, and write its figures all the same)."""

    def parse(text: str) -> float:
        try:
            value = kind(text)
        except ValueError:
            what = "a whole number" if kind is int else "a number"
            raise argparse.ArgumentTypeError(f"{text!r} is not {what}") from None
        if not value >= minimum:  # NaN too
            raise argparse.ArgumentTypeError(f"{text} is below {minimum:g}")
        return value

    parse.__name__ = kind.__name__  # argparse names it in "invalid int value"
    return parse


def output_file(text: str) -> str:
    """An argparse ``type`` for a file a command writes at its end: a path whose folder
    can be written (or made), refused in argparse's one line otherwise; a folder under
    a file, or a read-only one, was found after the work. The path as given (a string:
    the scripts keep their arguments in their JSON)."""
    from facecluster.io import check_can_write

    path = Path(text)
    try:
        folder, exists = path.is_dir(), path.exists()
    except OSError as e:  # under a folder this user cannot search
        raise argparse.ArgumentTypeError(f"{text}: cannot look there ({e.strerror})") from None
    if not text.strip() or folder:
        raise argparse.ArgumentTypeError(f"{text!r} is no file name")
    if exists:  # /dev/null, a file of one's own in a read-only folder: itself
        if os.access(path, os.W_OK):
            return text
        raise argparse.ArgumentTypeError(f"{text}: cannot write it (no write permission)")
    try:
        check_can_write(path.parent)
    except OSError as e:
        raise argparse.ArgumentTypeError(
            f"{text}: cannot write there ({e.strerror or e}: {e.filename})"
        ) from None
    return text


def _parser(prog: str, help_text: str) -> argparse.ArgumentParser:
    """A command's parser; the command's output escapes what its encoding cannot hold."""
    from facecluster.config import escape_unencodable_output

    escape_unencodable_output()
    return argparse.ArgumentParser(
        prog=prog,
        description=help_text.split("\n\n")[0],
        epilog=help_text.split("\n\n", 1)[1],
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )


def _interrupted() -> int:
    """Ctrl-C: say so and end with the status a shell gives a process SIGINT ended."""
    print("interrupted", file=sys.stderr)
    return 128 + signal.SIGINT


def _fail(message: object) -> int:
    print(f"error: {message}", file=sys.stderr)
    return 2


def train_main(argv: list[str] | None = None, prog: str | None = None) -> int:
    from facecluster.config import (
        ConfigError,
        check_data_root,
        default_config,
        load_config,
        resume_path,
    )

    default = default_config()
    # under the console script its examples name it (train.py is not installed)
    text = TRAIN_HELP if prog is None else TRAIN_HELP.replace("python train.py", prog)
    parser = _parser(prog or "train.py", text)
    parser.add_argument(
        "-c",
        "--config",
        action="append",
        help="YAML file, only what differs from the schema; repeat to merge several "
        f"(default: {default.relative_to(default.parents[1])})",
    )
    parser.add_argument(
        "--print-config",
        action="store_true",
        help="print the resolved config this command would train with (YAML) and exit "
        "without training",
    )
    parser.add_argument("overrides", nargs="*", help="key=value overrides")
    # overrides before and after -c alike (parse_args refused those after it, valid or not)
    args = parser.parse_intermixed_args(argv)
    # a new run's config is read before torch is imported: a mistyped key or a wrong value
    # is reported at once (it took 9 s, the imports below; a trainer key that Lightning 2.6
    # lacks imports Lightning to look it up); a resume's path too, its config after them
    # (it needs the run folder's code)
    try:
        # resume=: the overrides apply to the run's own config, never to default.yaml's
        # (whose 4 clusters refused a job's stage2.subnets=[4,5] of an 8-cluster run)
        resume = _resume_override(args.overrides)
        if resume and args.config:
            raise ConfigError(
                f"-c {' -c '.join(args.config)} with resume=: a resumed run keeps the "
                f"config it was started with ({resume}/config.yaml); give changes as "
                "key=value overrides"
            )
        if resume:
            resume_path(resume)  # a mistyped run folder, before the imports' seconds
        else:
            cfg = load_config(args.config or [default], args.overrides)
            if args.print_config:  # Hydra's --cfg job, LightningCLI's --print_config
                print(cfg.to_yaml(), end="")
                return 0
            if cfg.resume:  # -c a file that names a run (resume: ...)
                raise ConfigError(
                    f"-c {' -c '.join(args.config or [str(default)])} sets resume="
                    f"{cfg.resume}: resume a run with resume=<run folder> and key=value "
                    "overrides, which are checked against what it trained on (or add "
                    "resume=null to start a new run from that config)"
                )
            check_data_root(cfg.data.root, run=False)  # before the imports' seconds
    except ConfigError as e:
        return _fail(e)
    except KeyboardInterrupt:  # an unknown trainer key imports Lightning: seconds
        return _interrupted()
    try:  # torch, Lightning, timm: seconds, in which a Ctrl-C is an interrupt too
        from facecluster.builders import close_process_group, stopped_run
        from facecluster.evaluation import eval_device
        from facecluster.launch import JobsFailed
        from facecluster.loggers import exit_code
        from facecluster.pipeline import train
        from facecluster.run import RunFolder
    except KeyboardInterrupt:
        return _interrupted()

    try:
        if resume:
            cfg = RunFolder.config_for_resume(resume, args.overrides)
            if args.print_config:
                print(cfg.to_yaml(), end="")
                return 0
        evaluates = cfg.eval.after_training and cfg.assembles and cfg.launcher.name == "local"
        if evaluates:
            eval_device(cfg)  # a GPU this machine lacks: refused now, not after training
        result = train(cfg)
        if evaluates:  # every DDP rank, each its shard of the test split
            return _evaluate_trained(cfg, result)
    except ConfigError as e:
        return _fail(e)
    except JobsFailed as e:
        print(f"error: {e}", file=sys.stderr)
        return 1
    except KeyboardInterrupt:  # in a fit too: train() raises Lightning's exit(1) as one
        return _interrupted()  # local stage-2 jobs: the hint came first
    except Exception as e:  # a damaged data set, a lost DDP peer, a full disk
        if (stop := stopped_run(e)) is None:
            raise
        print(f"error: {stop.message}", file=sys.stderr)
        for note in getattr(e, "__notes__", ()):  # how to continue the run
            print(note.lstrip("\n"), file=sys.stderr)
        return stop.status
    except SystemExit as e:
        from lightning.pytorch.utilities.exceptions import SIGTERMException

        if not isinstance(e, SIGTERMException):
            raise
        # SIGTERM (scancel, a preemption, kill) ends the fit at its next batch, on every
        # rank (StopTogether), with Lightning's SystemExit of no code. Left as it was, the
        # exit status was 0: a stage-2 job was then counted as finished, and a SLURM job
        # went on to its next command. ResumeHint printed the command that continues.
        print("terminated", file=sys.stderr)
        return exit_code(e)
    finally:
        close_process_group()
    return 0


def _evaluate_trained(cfg: Config, result: RunResult) -> int:
    """``train.py``'s evaluation of the run it trained (when finished), on every one of
    the training's processes (:func:`facecluster.evaluation.training_ranks`); rank 0
    prints the table. An error is said as ``evaluate.py`` says it
    (:func:`said_by_this_rank`), with how to evaluate the run again."""
    import torch
    from lightning.pytorch.utilities import rank_zero_only

    from facecluster.builders import detach_started_ranks, stop_started_ranks
    from facecluster.config import COMMAND
    from facecluster.data import BadImageError
    from facecluster.evaluation import (
        PeerStopped,
        Ranks,
        evaluate_runs,
        training_ranks,
    )
    from facecluster.launch import local_evaluation_gpus

    # Lightning's observer of the ranks this process started kills it (SIGKILL, without
    # a word) when one of them fails: here this process says why, and stops on its own
    detach_started_ranks()
    run_dir = result.run_dir
    again = f"the run has finished training: `{COMMAND['evaluate']} run={run_dir}` evaluates it"
    if result.results is not None and not torch.distributed.is_initialized():
        if gpus := local_evaluation_gpus(cfg):  # stage-2 jobs side by side on these GPUs
            torch.cuda.empty_cache()  # this process's cached blocks, on the first of them
            return _evaluate_on_gpus(run_dir, gpus, again)
    ranks = None
    try:  # rank 0 alone assembled the results (None: sub-nets still to train)
        with training_ranks(cfg, result.results is not None) as ranks:
            if ranks is None:  # not finished, or another process evaluates
                return 0
            try:
                table = evaluate_runs([run_dir], ranks=ranks)  # the heading with it, below
            except (OSError, ValueError, BadImageError, PeerStopped) as e:
                if ranks.lead:  # first stops the ranks it started (below)
                    raise
                # said before leaving the group, as evaluate.py's (it started no ranks)
                return _said_by_rank(e, ranks.rank, ranks.local_rank, then=again)
    except BaseException as e:
        # the ranks this process started wait for it in a collective that its exit
        # alone would end (a process group's destruction does not): they have nothing
        # left to keep, and one that failed first is gone by now
        interrupted = isinstance(e, KeyboardInterrupt)
        stop_started_ranks(grace=2.0, cause="interrupted" if interrupted else "failed")
        who = ranks or Ranks(rank_zero_only.rank)  # the group was not made: the global rank
        if interrupted:  # the training is done: say how to evaluate
            if who.lead:
                print(f"interrupted during the evaluation; {again}", file=sys.stderr)
            return 128 + signal.SIGINT
        if not isinstance(e, (OSError, ValueError, BadImageError, PeerStopped)):
            raise  # its traceback
        return _said_by_rank(e, who.rank, who.local_rank, then=again)  # as evaluate.py
    if ranks.lead:
        print(f"\nEvaluation on the held-out test split (docs/EVALUATION.md):\n{table}")
        print(f"\nfacecluster run folder: {run_dir}", flush=True)
        _say_where(run_dir)
    return 0


def _evaluate_on_gpus(run_dir: Path, gpus: list[str], again: str) -> int:
    """After stage-2 local jobs side by side on ``gpus``: the run's evaluation on all of
    them, ``facecluster evaluate`` under torchrun (a process each, its shard of the
    test split), which prints the table; this process trained alone and has no process
    group to share. Returns its exit status."""
    from facecluster.launch import run_evaluation
    from facecluster.run import RunFolder

    print(
        f"\nEvaluation on the held-out test split (docs/EVALUATION.md), on GPUs "
        f"{','.join(gpus)}, a torchrun process each:",
        flush=True,
    )
    try:
        code = run_evaluation(RunFolder(run_dir), gpus)
    except BaseException as e:  # a signal passed on to its processes, which have ended
        print(again, file=sys.stderr)
        if isinstance(e, KeyboardInterrupt):  # its rank 0 said "interrupted"
            return 128 + signal.SIGINT
        raise  # SIGTERM: train_main says it (143); SIGHUP: 129
    if code:  # their error is above
        print(again, file=sys.stderr)
        return code if code > 0 else 128 - code  # a signal's status, as a shell gives it
    print(f"\nfacecluster run folder: {run_dir}", flush=True)  # train.py's last line
    return 0


def _resume_override(overrides: list[str]) -> str | None:
    """The run or checkpoint that ``resume=`` names (its last value; None for ``null``)."""
    from facecluster.config import YAML_NULLS, command_line_text

    resume = None
    for override in overrides:
        key, _, value = override.partition("=")
        if key.strip() == "resume":  # a text key's rules (resume='runs/my run' kept quotes)
            resume = None if value in (*YAML_NULLS, "") else command_line_text(value)
    return resume or None


def evaluate_main(argv: list[str] | None = None, prog: str | None = None) -> int:
    text = EVALUATE_HELP if prog is None else EVALUATE_HELP.replace("python evaluate.py", prog)
    parser = _parser(prog or "evaluate.py", text)
    parser.add_argument(
        "args", nargs="+", help="run=<run dir> (repeatable) and key=value overrides"
    )
    args = parser.parse_args(argv)
    runs = [a.split("=", 1)[1] for a in args.args if a.startswith("run=")]
    overrides = [a for a in args.args if not a.startswith("run=")]
    if not runs:
        folders = [a for a in overrides if "=" not in a and os.path.isdir(os.path.expanduser(a))]
        hint = f" (did you mean run={folders[0]}?)" if folders else ""  # as export takes it
        parser.error(f"give at least one run=<run dir>{hint}")
    if not all(r.strip() for r in runs):  # "" is the working dir, read as a run
        parser.error("run= names no folder: give run=<run dir>")
    real = [os.path.realpath(os.path.expanduser(r)) for r in runs]
    if twice := next((r for i, r in enumerate(runs) if real[i] in real[:i]), None):
        # it evaluated the run again and printed its rows twice
        parser.error(f"run={twice} names a run given already: give each run once")
    from facecluster.config import ConfigError, missing_path, not_a_run

    # before torch and Lightning (about 5 s): a mistyped path, or an export's folder,
    # is named at once
    said = [missing_path(run, prefix="run=") for run in runs]
    said += [] if any(said) else [not_a_run(r) for r in runs]  # (~nouser: a traceback)
    if problem := next((p for p in said if p), None):
        return _fail(problem) if _torchrun_rank() == 0 else 2  # the same on every rank
    # OSError, ValueError: a damaged run folder (a checkpoint cut short, missing)
    said_in_one_line: tuple[type[Exception], ...] = (ConfigError, OSError, ValueError)
    try:  # the imports too: torch and Lightning, seconds in which a Ctrl-C is an interrupt
        from facecluster.data import BadImageError

        said_in_one_line += (BadImageError,)  # once imported: a failed import stays itself
        from facecluster.evaluation import PeerStopped, evaluate_runs, torchrun_ranks

        said_in_one_line += (PeerStopped,)
        with torchrun_ranks() as ranks:  # one process, or those torchrun started
            try:
                table = evaluate_runs(runs, overrides, ranks)
            except said_in_one_line as e:
                # said before this process leaves the group: rank 0's collective fails
                # once it has, and rank 0 says the error is above (a test delays the
                # leaving: said after it, the line came second, or never once torchrun
                # ended this process as rank 0 exited)
                return _said_by_rank(e, ranks.rank, ranks.local_rank)
    except KeyboardInterrupt:  # Ctrl-C reaches each of torchrun's processes: one line
        return _interrupted() if _torchrun_rank() == 0 else 128 + signal.SIGINT
    except said_in_one_line as e:
        return _said_by_rank(e, _torchrun_rank(), int(os.environ.get("LOCAL_RANK", "0") or 0))
    if not ranks.lead:  # rank 0 prints the table and writes the results
        return 0
    print(table)
    for run in runs:
        _say_where(Path(run).expanduser())
    return 0


def _torchrun_rank() -> int:
    """This process's rank among those ``torchrun`` started (0 without torchrun)."""
    if int(os.environ.get("WORLD_SIZE", "1") or 1) <= 1:
        return 0
    return int(os.environ.get("RANK", "0") or 0)


def _say_where(run: Path) -> None:
    """After a run's evaluation, on stderr: where its results are and, for a two-stage
    run, how to use it (the last lines named the run folder alone, a review of the
    console output)."""
    from facecluster.run import RunFolder

    folder = RunFolder(run.resolve())
    plots = " and plots" if any(folder.eval_dir.glob("*.png")) else ""
    said = f"{run}: tables{plots} in {folder.eval_dir} (results.md, .csv, .json)"
    try:  # a run just evaluated: its config reads; were it not, the hint is left out
        two_stage = folder.config().two_stage
    except (OSError, ValueError):
        two_stage = False
    if two_stage:  # export writes two-stage identifiers
        out = shlex.quote(f"exports/{folder.path.name}")
        said += (
            f"; identify faces with it: `facecluster export {shlex.quote(str(run))} {out}`, "
            f"then `facecluster identify {out} <images>` (docs/DEPLOYMENT.md)"
        )
    print(said, file=sys.stderr)


def _said_by_rank(error: Exception, rank: int, local_rank: int, then: str = "") -> int:
    """An evaluation's error, in one line, said by the process whose it is to say
    (:func:`facecluster.evaluation.said_by_this_rank`): rank 0's as it is (then
    ``then``, a line of its own), another rank's after its rank. Exit status 2."""
    if not rank:
        return _fail(f"{_said(error)}\n{then}" if then else _said(error))
    from facecluster.evaluation import said_by_this_rank

    # what this process met alone (a broken face of its shard); what every process
    # meets, rank 0 says (and the first process of each other machine)
    if said_by_this_rank(error, rank, local_rank):
        return _fail(f"rank {rank}: {_said(error)}")
    return 2


def _said(error: Exception) -> object:
    """An evaluation's or export's error as its one line: a damaged data set's (a
    ``BadImageError`` from a loader, whose text may hold a worker's traceback) as a
    training run says it; any other as it is."""
    from facecluster.builders import stopped_run

    stopped = stopped_run(error)
    return error if stopped is None else stopped.message


def export_main(argv: list[str] | None = None, prog: str | None = None) -> int:
    parser = _parser(prog or "facecluster export", EXPORT_HELP)
    parser.add_argument("run", help="a finished two-stage run folder")
    parser.add_argument("out", help="output folder")
    parser.add_argument("--onnx", action="store_true", help="also write ONNX models")
    parser.add_argument(
        "--fpir",
        type=float,
        default=0.01,
        help="open-set runs: the unknown threshold lets this fraction of the validation "
        "split's unseen faces pass as someone enrolled (default: %(default)s)",
    )
    parser.add_argument(
        "--device",
        default="auto",
        help="where the passes over the validation split run: auto (a GPU when there is "
        "one), cpu, cuda",
    )
    parser.add_argument(
        "--data-root",
        help="where the run's data is now, if it moved since training (the run's "
        "data.root is used otherwise)",
    )
    parser.add_argument(
        "--drop-enrolled",
        action="store_true",
        help="replace an OUT that holds identities enrolled into it (refused without it: "
        "the export is made from the run, which does not have them)",
    )
    args = parser.parse_args(argv)
    if not 0.0 <= args.fpir < 1.0:
        parser.error(f"--fpir must be in [0, 1), got {args.fpir}")
    if 0.0 < args.fpir < 1e-12:  # 1/fpir unseen faces: an OverflowError traceback at 1e-320
        parser.error(f"--fpir {args.fpir}: give 0 (no unseen face passes) or at least 1e-12")
    if not args.out.strip():  # "" wrote identifier.pt into the working directory
        parser.error("OUT names no folder: give the folder to write the export in")
    from facecluster.config import ConfigError, missing_path, not_a_run

    if problem := missing_path(args.run, what=" (a finished run folder)") or not_a_run(args.run):
        return _fail(problem)
    from facecluster.data import BadImageError
    from facecluster.deploy import export_run

    try:
        written = export_run(
            args.run,
            args.out,
            onnx=args.onnx,
            fpir=args.fpir,
            device=args.device,
            data_root=args.data_root,
            drop_enrolled=args.drop_enrolled,
        )
    except (ConfigError, OSError, ValueError, ImportError, BadImageError) as e:  # OSError:
        return _fail(_said(e))  # OUT unwritable, or a full disk
    for path in written:
        print(f"wrote {path}")
    out = shlex.quote(str(args.out))  # what to do with it (a review of the console output)
    print(
        f"identify faces with it: `facecluster identify {out} <images>`; add people "
        f"without training: `facecluster enroll {out} <folder of person folders>`",
        file=sys.stderr,
    )
    return 0


def _add_imports(parser: argparse.ArgumentParser) -> None:
    parser.add_argument(
        "--import",
        dest="imports",
        action="append",
        default=[],
        metavar="MODULE",
        help="a module to import first: the one whose register_backbone added the run's "
        "backbone, when the run trained one of yours (its config's imports; repeatable)",
    )


def _imported(imports: list[str]) -> str | None:
    """``--import``'s modules imported; the error's text when one cannot be."""
    from facecluster.config import ConfigError, import_modules

    try:
        import_modules(imports, key="--import")
    except ConfigError as e:
        return str(e)
    return None


def _checked_before_work(
    parser: argparse.ArgumentParser, out: str, imports: list[str], device: str
) -> str | None:
    """What identify and ijb check before their work, or None: ``--out`` can be written
    as a file (a folder under a file, or a blank name, failed after the work; a folder
    is named by the command itself, with the fix), ``--import``, and ``--device``
    (argparse's error)."""
    if not Path(out).is_dir():
        try:
            output_file(out)
        except argparse.ArgumentTypeError as e:
            return f"--out {e}"
    if problem := _imported(imports):
        return problem
    from facecluster.deploy import resolve_device

    try:
        resolve_device(device)
    except (RuntimeError, ValueError) as e:
        parser.error(f"--device {device}: {e}")
    return None


def identify_main(argv: list[str] | None = None, prog: str | None = None) -> int:
    parser = _parser(prog or "facecluster identify", IDENTIFY_HELP)
    parser.add_argument("model", help="a folder written by facecluster export")
    parser.add_argument("images", nargs="+", help="image files or folders (searched recursively)")
    parser.add_argument(
        "--out", default="identities.csv", help="CSV to write (default: %(default)s)"
    )
    parser.add_argument(
        "--runtime",
        choices=("auto", "torch", "onnx"),
        default="auto",
        help="torch: MODEL/identifier.pt; onnx: MODEL/onnx on onnxruntime; auto: torch when "
        "the export has it (default)",
    )
    parser.add_argument(
        "--threshold",
        type=float,
        default=None,
        help="answer unknown below this similarity (default: the export's, chosen "
        "on unseen faces for an open-set run; none for a closed-set run)",
    )
    parser.add_argument(
        "--batch-size", type=int, default=64, help="images per batch (default: %(default)s)"
    )
    parser.add_argument(
        "--device", default="auto", help="auto (a GPU when there is one), cpu, cuda"
    )
    parser.add_argument(
        "--top-m", type=int, default=None, help="clusters searched (default: the run's)"
    )
    _add_imports(parser)
    args = parser.parse_args(argv)
    if args.batch_size < 1:
        parser.error(f"--batch-size must be >= 1, got {args.batch_size}")
    if args.top_m is not None and args.top_m < 1:
        parser.error(f"--top-m must be >= 1, got {args.top_m}")
    if args.threshold is not None and not -1.0 <= args.threshold <= 1.0:
        # nan answered unknown for every face, with exit 0; so did 5, which no cosine
        # similarity reaches
        parser.error(f"--threshold must be a similarity in [-1, 1], got {args.threshold}")
    from facecluster.config import missing_path

    for path, what in (
        (args.model, EXPORTED),
        *((image, " (an image or a folder of images)") for image in args.images),
    ):
        if missing := missing_path(path, what=what):
            return _fail(missing)
    if problem := _checked_before_work(parser, args.out, args.imports, args.device):
        return _fail(problem)
    from tqdm.contrib.logging import logging_redirect_tqdm

    from facecluster.deploy import identify_files

    try:
        with logging_redirect_tqdm():  # a warning on a line of its own, not the bar's
            count = identify_files(
                args.model,
                args.images,
                args.out,
                runtime=args.runtime,
                threshold=args.threshold,
                batch_size=args.batch_size,
                device=args.device,
                top_m=args.top_m,
            )
    except (OSError, ValueError, ImportError) as e:  # OSError: --out unwritable
        return _fail(e)
    # on stderr: --out may be /dev/stdout or a pipe, whose CSV it would end
    print(f"wrote {count} rows to {args.out}", file=sys.stderr)
    return 0


def enroll_main(argv: list[str] | None = None, prog: str | None = None) -> int:
    parser = _parser(prog or "facecluster enroll", ENROLL_HELP)
    parser.add_argument("model", help="a folder written by facecluster export")
    parser.add_argument("folder", help="one sub-folder of face images per new identity")
    _add_imports(parser)
    args = parser.parse_args(argv)
    from facecluster.config import missing_path

    if missing := missing_path(args.model, what=EXPORTED) or missing_path(
        args.folder, what=" (give the folder that holds one sub-folder per new identity)"
    ):
        return _fail(missing)
    if problem := _imported(args.imports):
        return _fail(problem)
    from tqdm.contrib.logging import logging_redirect_tqdm

    from facecluster.deploy import enroll_folder

    try:
        with logging_redirect_tqdm():  # a warning on a line of its own, not the bar's
            clusters = enroll_folder(args.model, args.folder)
    except (OSError, ValueError, ImportError) as e:  # OSError: a full disk, nothing written
        return _fail(e)
    for name, k in clusters.items():
        print(f"enrolled {name} in cluster {k}")
    return 0


def ijb_main(argv: list[str] | None = None, prog: str | None = None) -> int:
    parser = _parser(prog or "facecluster ijb", IJB_HELP)
    parser.add_argument(
        "model",
        help="a folder written by facecluster export, or a backbone's weights file "
        "(arcface_torch's backbone.pth, a facecluster checkpoint; with --backbone)",
    )
    parser.add_argument("root", help="the release's IJBC (or IJBB) folder: meta/, loose_crop/")
    parser.add_argument("--target", choices=("IJBC", "IJBB"), default="IJBC")
    parser.add_argument(
        "--protocol",
        nargs="+",
        action="extend",  # given twice: both, not the last alone
        choices=("1:1", "1:N"),
        default=None,
        help="1:1 verification, 1:N identification, or both (the faces embedded once; "
        "default: 1:1)",
    )
    parser.add_argument(
        "--out", default=None, help="JSON to write (default: ijbc.json or ijbb.json)"
    )
    parser.add_argument(
        "--backbone",
        default=None,
        help="for a weights file: the backbone they fit, a facecluster name (iresnet50, "
        "mbf) or arcface_torch's network name (r18, r34, r50, r100, r200)",
    )
    parser.add_argument(
        "--embedding-dim",
        type=at_least(1),
        default=512,
        help="for a weights file: its embedding size (default: %(default)s)",
    )
    parser.add_argument(
        "--image-size",
        type=at_least(1),
        default=112,
        help="for a weights file: the face size it takes (default: %(default)s)",
    )
    parser.add_argument("--batch-size", type=at_least(1), default=128, help="faces per batch")
    parser.add_argument(
        "--workers",
        type=at_least(0),
        default=min(8, os.cpu_count() or 1),
        help="processes that decode and align the faces (default: %(default)s)",
    )
    parser.add_argument(
        "--device", default="auto", help="auto (a GPU when there is one), cpu, cuda"
    )
    _add_imports(parser)
    args = parser.parse_args(argv)
    out = args.out or f"{args.target.lower()}.json"
    from facecluster.config import missing_path

    model = " (a folder written by facecluster export, or a backbone's weights file)"
    for path, what in ((args.model, model), (args.root, " (an IJB release's folder)")):
        if missing := missing_path(path, what=what):
            return _fail(missing)
    if problem := _checked_before_work(parser, out, args.imports, args.device):
        return _fail(problem)
    from facecluster.deploy import ijb_export
    from facecluster.results import markdown_table

    try:
        summary = ijb_export(
            args.model,
            args.root,
            args.target,
            out,
            args.batch_size,
            args.workers,
            args.device,
            tuple(dict.fromkeys(args.protocol or ["1:1"])),
            args.backbone,
            args.embedding_dim,
            args.image_size,
        )
    except (OSError, ValueError, ImportError) as e:
        return _fail(e)
    if one := summary["verification"]:
        rows = one["rows"]
        print(
            f"{summary['target']} 1:1 verification: {summary['faces']:,} faces, "
            f"{one['templates']:,} templates, {one['genuine']:,} pairs of one person, "
            f"{one['impostor']:,} of two"
        )
        print(
            markdown_table(
                ["model", *(f"TAR@FAR={r['far']:.0e}" for r in rows)],
                [[args.model, *(f"{r['tar']:.2%}" for r in rows)]],
                "l" + "r" * len(rows),
            )
        )
    if search := summary["identification"]:
        galleries = search["galleries"]
        print(
            f"{summary['target']} 1:N identification of {args.model}: {summary['faces']:,} "
            f"faces, {search['probes']:,} probe templates; "
            + ", ".join(
                f"{g['name']}: {g['templates']:,} templates, {g['mated']:,} probes mated"
                for g in galleries
            )
        )
        fpirs = [r["fpir"] for r in galleries[0]["rows"]]
        rows = [(g["name"], g["rank_rates"], [r["tpir"] for r in g["rows"]]) for g in galleries]
        rows.append(("mean", search["mean"]["rank_rates"], search["mean"]["tpir"]))
        print(
            markdown_table(
                [
                    "gallery",
                    *(f"rank-{k}" for k in search["ranks"]),
                    *(f"TPIR@FPIR={f:.0e}" for f in fpirs),
                ],
                [[name, *(f"{x:.2%}" for x in (*ranks, *tpirs))] for name, ranks, tpirs in rows],
                "l" + "r" * (len(search["ranks"]) + len(fpirs)),
            )
        )
        for g in galleries:  # IJB-C: 19,593 non-mated in all, < 10,000 in one gallery
            if below := [f"{f:.0e}" for f in fpirs if g["nonmated"] * f < 1]:
                print(
                    f"note: {g['name']} has {g['nonmated']:,} non-mated probes, too few for "
                    f"FPIR {', '.join(below)} (none may pass): there the threshold is their "
                    "highest score, as IJB_evals.py takes it",
                    file=sys.stderr,
                )
    print(f"wrote {out}", file=sys.stderr)
    return 0


def pack_main(argv: list[str] | None = None, prog: str | None = None) -> int:
    from facecluster.data.pack import main

    return main(argv)


COMMANDS: dict[str, tuple[Callable[..., int], str]] = {
    "train": (train_main, TRAIN_HELP),
    "evaluate": (evaluate_main, EVALUATE_HELP),
    "pack": (pack_main, "Pack an image folder into InsightFace RecordIO (train.rec/.idx)."),
    "export": (export_main, EXPORT_HELP),
    "enroll": (enroll_main, ENROLL_HELP),
    "identify": (identify_main, IDENTIFY_HELP),
    "ijb": (ijb_main, IJB_HELP),
}


def exit_process(code: int) -> NoReturn:
    """End a command's process with ``code``, without the interpreter's final garbage
    collection: after torch, Lightning and timm are imported it walks millions of
    objects, 2-2.5 s of every command's exit on 2 cores (measured), to free memory the
    process is about to give back anyway. ``atexit`` handlers, log flushes and W&B's
    finish still run. For processes' ends only (``gc.freeze`` exempts every object
    alive now from later collections)."""
    gc.freeze()
    sys.exit(code)


def console() -> NoReturn:
    """The ``facecluster`` console script."""
    exit_process(main())


def main(argv: list[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else argv
    if not argv or argv[0] not in COMMANDS:
        asked = argv[:1] in (["-h"], ["--help"])  # help to stdout (| less); a mistake to stderr
        lines = [f"  {name:<9} {text.splitlines()[0]}" for name, (_, text) in COMMANDS.items()]
        out = sys.stdout if asked else sys.stderr
        if argv and not asked:
            print(f"facecluster: unknown command {argv[0]!r}\n", file=out)
        print("usage: facecluster {" + ",".join(COMMANDS) + "} ...\n", file=out)
        print(__doc__.split("\n\n")[1], file=out)
        print("\ncommands:\n" + "\n".join(lines), file=out)
        print("\n" + __doc__.split("\n\n")[2].splitlines()[0].replace("``", ""), file=out)
        return 0 if asked else 2
    from facecluster.config import COMMAND

    command, _ = COMMANDS[argv[0]]
    named = dict(COMMAND)
    COMMAND.update(train="facecluster train", evaluate="facecluster evaluate")  # hints
    try:
        return command(argv[1:], prog=f"facecluster {argv[0]}")
    except KeyboardInterrupt:  # export, identify, enroll, pack: a line, not a traceback
        return _interrupted()
    finally:  # as they were, for a caller in the same process
        COMMAND.update(named)


if __name__ == "__main__":
    exit_process(main())
