"""``train.py`` (its main, as the command runs it) with stage 1 on DDP processes and
stage 2 as local jobs, which rank 0 starts. Rank 1 writes ``<MARKS>/rank1`` (its exit
status) once its command has returned; rank 0 waits for that file, up to 30 s, before
it starts the jobs, and fails without it: the other processes of stage 1 must end when
the jobs start, not wait for rank 0 until they are done.

Lightning's ``ddp`` strategy starts the other ranks by re-running this script, so each
rank patches its own code: ``python ddp_then_local_jobs.py -c CONFIG key=value ...``.
"""

import os
import sys
import time
from pathlib import Path

from facecluster import pipeline
from facecluster.cli import exit_process, train_main

rank = int(os.environ.get("LOCAL_RANK", "0") or 0)  # one machine: the global rank
marks = Path(os.environ["MARKS"])
run_local = pipeline.run_local


def after_the_other_rank_ended(*args, **kwargs):
    deadline = time.monotonic() + 30
    while not (marks / "rank1").exists():
        if time.monotonic() > deadline:
            raise RuntimeError("rank 1 had not ended when the stage-2 jobs were to start")
        time.sleep(0.2)
    return run_local(*args, **kwargs)


pipeline.run_local = after_the_other_rank_ended
code = train_main(sys.argv[1:])
if rank:
    (marks / "rank1").write_text(str(code))
exit_process(code)
