"""``train.py`` (its main, as the command runs it) with a fault in one DDP rank's
evaluation: with EVAL_FAILS_ON_RANK=r, rank r meets an OSError in its first batch of the
test split, as a file of its shard that cannot be read; each rank writes its process id
to the folder PIDS names (``pid<rank>``) as its evaluation starts. The evaluation's
collectives must name their process group (a gloo group of the evaluation's own: under
NCCL, the training's default group, a CPU tensor's all_reduce fails): one that does not
raises.

Lightning's ``ddp`` strategy starts the other ranks by re-running this script, so each
rank patches its own evaluation: ``python train_py_eval_fault.py key=value ...``.
"""

import functools
import os
import sys
from pathlib import Path

import torch.distributed as dist

from facecluster import evaluation
from facecluster.cli import exit_process, train_main

rank = int(os.environ.get("LOCAL_RANK", "0") or 0)  # one machine: the global rank
answers = evaluation.Bench._answers


def failing_answers(bench, loader, *args, **kwargs):
    (Path(os.environ["PIDS"]) / f"pid{rank}").write_text(str(os.getpid()))
    if rank == int(os.environ["EVAL_FAILS_ON_RANK"]):
        raise OSError(f"cannot read faces/x.jpg: injected into rank {rank}")
    yield from answers(bench, loader, *args, **kwargs)


evaluation.Bench._answers = failing_answers


def named_group(op):
    @functools.wraps(op)
    def collective(*args, group=None, **kwargs):
        if evaluating and group is None:
            raise AssertionError(f"{op.__name__} over the default process group")
        return op(*args, group=group, **kwargs)

    return collective


for name in ("all_reduce", "all_gather_object", "broadcast_object_list"):
    setattr(dist, name, named_group(getattr(dist, name)))
evaluating, training_ranks = False, evaluation.training_ranks


def evaluated_ranks(cfg):
    global evaluating
    evaluating = True
    return training_ranks(cfg)


evaluation.training_ranks = evaluated_ranks
exit_process(train_main(sys.argv[1:]))
