"""Say how to continue a run stopped by Ctrl-C.

Lightning catches the KeyboardInterrupt, prints "Detected KeyboardInterrupt,
attempting graceful shutdown ..." and ends the process with exit status 1, naming
neither the run folder nor the command that continues it. Its callbacks see the
interrupt first (``on_exception``): :class:`ResumeHint` prints that command, once,
from the process that started the run (not from a stage-2 job it launched, nor from
the other DDP ranks). Local stage-2 jobs run outside any Trainer of that process: the
pipeline prints :func:`resume_hint` when Ctrl-C stops them.

SIGTERM (scancel, a time limit, a preemption, ``kill``) stops every DDP rank at the
same batch (:class:`StopTogether`), whichever ranks received it.
"""

from __future__ import annotations

import contextlib
import os
import signal
import sys
import threading
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import lightning as L
from lightning.pytorch.utilities.exceptions import SIGTERMException

from facecluster.config import resume_command


def resume_hint(run_dir: str | Path, stage: str = "all", why: str = "interrupted") -> str:
    """What to say when a run stops: the command that continues it (with the ``stage=``
    it ran, which a resume would otherwise take as ``all``)."""
    again = [f"stage={stage}"] if stage != "all" else []
    return (
        f"\n{why}: continue the run (from its last finished epoch, if any) with\n"
        f"  {resume_command(run_dir, *again)}"
    )


class ResumeHint(L.Callback):
    """On Ctrl-C or SIGTERM (which Lightning turns into ``SIGTERMException`` at the next
    batch), print :func:`resume_hint`."""

    def __init__(self, run_dir: str | Path, stage: str, job_env: str) -> None:
        self.run_dir = Path(run_dir)
        self.stage = stage
        self.job_env = job_env

    def on_exception(
        self, trainer: L.Trainer, pl_module: L.LightningModule, exception: Any
    ) -> None:
        stopped = isinstance(exception, KeyboardInterrupt | SIGTERMException)
        if not stopped or not trainer.is_global_zero:
            return
        if os.environ.get(self.job_env):  # a stage-2 job: its parent says it
            return
        print(resume_hint(self.run_dir, self.stage), file=sys.stderr)


_sigterm_received = False
"""Whether this process has received SIGTERM while a Trainer of this run ran
(:class:`StopTogether`); cleared when a run starts (:func:`forget_sigterm`)."""


def _note_sigterm(signum: int, frame: Any) -> None:
    global _sigterm_received
    _sigterm_received = True


def sigterm_received() -> bool:
    """Whether this process has received SIGTERM (not the other ranks: that takes a
    collective, :func:`stop_if_terminated`)."""
    return _sigterm_received


def forget_sigterm() -> None:
    """A new run of this process starts: a SIGTERM noted for an earlier one is not its."""
    global _sigterm_received
    _sigterm_received = False


def stop_if_terminated(trainer: L.Trainer) -> None:
    """Raise ``SIGTERMException`` on every rank if any rank has received SIGTERM. A
    collective: every rank calls it at the same point (one all-reduce of one flag)."""
    if trainer.strategy.reduce_boolean_decision(_sigterm_received, all=False):
        raise SIGTERMException()


class StopTogether(L.Callback):
    """SIGTERM stops every rank at the same batch, whichever ranks received it.

    Lightning 2.6's handler broadcasts from rank 0 *inside the signal handler* and
    passes the signal on only to the processes its own Trainer started. A signal to
    rank 0 alone during stage 2 (whose Trainer started no process: stage 1's did)
    reached no other rank, and the handler's broadcast met the other rank's next
    collective, a gradient all-reduce: every process hung, or failed on a size
    mismatch (exit 1, no resume command). A signal to rank 1 alone hung the run in
    either stage.

    At ``setup`` (before Lightning installs its handler, in every fit and test), this
    callback puts in the place of Lightning's SIGTERM function one that only notes the
    signal (:data:`_sigterm_received`). Lightning installs it for the whole run of the
    Trainer, as its own, and restores the previous handler at teardown. Every rank asks
    at each batch start, training, validation and test, and at the end of the fit and
    of the test, whether any rank has noted one (:func:`stop_if_terminated`, one
    all-reduce of one integer; Lightning already waits for the device at every training
    step for its own broadcast of its flag, which stays unset). All then raise
    ``SIGTERMException`` together, as Lightning's loops would: the fit ends,
    :class:`ResumeHint` prints the command that continues the run, and ``train.py``
    exits with 143. The clustering asks at its own points
    (:class:`facecluster.callbacks.ClusteringCallback`).

    Args:
        on_stop: called in each process as the stop is decided, before any teardown
            (:func:`facecluster.builders.detach_started_ranks`: Lightning's child-process
            observer in rank 0 would take the other ranks' exit 143 for a failure and
            kill rank 0 while it finished, its logger for one).
    """

    def __init__(self, on_stop: Callable[[], object] | None = None) -> None:
        self.on_stop = on_stop

    def setup(self, trainer: L.Trainer, pl_module: L.LightningModule, stage: str) -> None:
        # Lightning's private connector: its registration, which follows, reads this
        trainer._signal_connector._sigterm_notifier_fn = _note_sigterm

    def _check_handler(self) -> None:
        """A Lightning that registers its handler otherwise fails here, loudly, and not
        with the behaviour this callback replaces."""
        if threading.current_thread() is not threading.main_thread():
            return  # Lightning sets no handler outside the main thread (nor can anyone)
        handler = signal.getsignal(signal.SIGTERM)
        if _note_sigterm not in getattr(handler, "signal_handlers", [handler]):
            raise RuntimeError(
                f"SIGTERM's handler is {handler!r}, not facecluster's: this Lightning "
                "registers its own otherwise; facecluster.callbacks.StopTogether needs "
                "updating for it"
            )

    def on_train_start(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        self._check_handler()

    def on_test_start(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        self._check_handler()

    def on_train_batch_start(self, trainer: L.Trainer, *args: Any) -> None:
        stop_if_terminated(trainer)

    def on_validation_batch_start(self, trainer: L.Trainer, *args: Any) -> None:
        stop_if_terminated(trainer)

    def on_test_batch_start(self, trainer: L.Trainer, *args: Any) -> None:
        stop_if_terminated(trainer)

    def on_train_end(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        stop_if_terminated(trainer)  # a signal during the last batch: before the clustering

    def on_test_end(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        stop_if_terminated(trainer)  # a signal during the last batch: not the next stage

    def on_exception(
        self, trainer: L.Trainer, pl_module: L.LightningModule, exception: BaseException
    ) -> None:
        if isinstance(exception, SIGTERMException) and self.on_stop is not None:
            self.on_stop()


@contextlib.contextmanager
def stopping_together(trainer: L.Trainer, pl_module: L.LightningModule) -> Iterator[None]:
    """Around work that every rank does with a Trainer's callbacks outside its run (the
    clustering of a resumed stage 1 whose fit had nothing left to do, which Lightning
    ends before any hook): SIGTERM is noted as during a fit, where the default action
    killed the process that received it alone, without the resume command, and a stop
    decided there (:func:`stop_if_terminated`) is said as Lightning says one, through
    every callback's ``on_exception`` (:class:`ResumeHint`, :class:`StopTogether`)."""
    main = threading.current_thread() is threading.main_thread()  # where handlers are set
    before = signal.signal(signal.SIGTERM, _note_sigterm) if main else None
    try:
        yield
    except SIGTERMException as e:
        for callback in trainer.callbacks:
            callback.on_exception(trainer, pl_module, e)
        raise
    finally:
        if main:
            signal.signal(signal.SIGTERM, before)
