"""``train.py`` (its main, as the command runs it) with a fault after a DDP training,
chosen by the environment variable FAULT:

- ``rank1``: rank 1 meets an OSError in its first batch of the test split, as a file of
  its shard that cannot be read;
- ``rank0``: rank 0 meets a RuntimeError there (one no command foresees: its traceback);
- ``assemble``: rank 0 alone, writing the run's results before the evaluation, finds
  its disk full.

Each rank writes its process id to the folder PIDS names (``pid<rank>``) when its
training ends. The evaluation's collectives must name their process group (a gloo
group of the evaluation's own: under NCCL, the training's default group, a CPU tensor's
all_reduce fails): one that does not raises.

Lightning's ``ddp`` strategy starts the other ranks by re-running this script, so each
rank patches its own code: ``python train_py_eval_fault.py -c CONFIG key=value ...``.
"""

import errno
import functools
import os
import sys
from pathlib import Path

import torch.distributed as dist

from facecluster import evaluation, pipeline
from facecluster.cli import exit_process, train_main

rank = int(os.environ.get("LOCAL_RANK", "0") or 0)  # one machine: the global rank
fault = os.environ["FAULT"]
answers, assemble, evaluate_runs = (
    evaluation.Bench._answers,
    pipeline._assemble,
    evaluation.evaluate_runs,
)
evaluating = False


def failing_answers(bench, loader, *args, **kwargs):
    if fault == f"rank{rank}":
        error = OSError if rank else RuntimeError
        raise error(f"cannot read faces/x.jpg: injected into rank {rank}")
    yield from answers(bench, loader, *args, **kwargs)


def failing_assemble(run, *args, **kwargs):
    if fault == "assemble":
        raise OSError(errno.ENOSPC, "No space left on device", str(run.folder.path))
    return assemble(run, *args, **kwargs)


def named_group(op):
    @functools.wraps(op)
    def collective(*args, group=None, **kwargs):
        if evaluating and group is None:
            raise AssertionError(f"{op.__name__} over the default process group")
        return op(*args, group=group, **kwargs)

    return collective


def evaluated_runs(*args, **kwargs):
    global evaluating
    evaluating = True
    return evaluate_runs(*args, **kwargs)


def trained(*args, **kwargs):
    result = train(*args, **kwargs)
    (Path(os.environ["PIDS"]) / f"pid{rank}").write_text(str(os.getpid()))
    return result


for name in ("all_reduce", "all_gather_object", "broadcast_object_list"):
    setattr(dist, name, named_group(getattr(dist, name)))
evaluation.Bench._answers = failing_answers
evaluation.evaluate_runs = evaluated_runs
pipeline._assemble = failing_assemble
train, pipeline.train = pipeline.train, trained
exit_process(train_main(sys.argv[1:]))
