"""Training progress bars on stderr, where the rest of a run's log goes."""

from __future__ import annotations

import contextlib
import math
import sys
import time
from collections.abc import Callable

from lightning.pytorch.callbacks import TQDMProgressBar


def _on_stderr(init: Callable) -> Callable:
    """``init``, the maker of one of Lightning's bars, making it write to stderr:
    Lightning passes ``file=sys.stdout``, read when the bar is made."""

    def made_on_stderr(self: TQDMProgressBar):
        with contextlib.redirect_stdout(sys.stderr):
            return init(self)

    return made_on_stderr


NOT_A_TERMINAL_EVERY_S = 30.0
"""Where stderr is not a terminal (a log file, a SLURM job's output), the bars are
written at most once in this many seconds, and when they end."""


class StderrProgressBar(TQDMProgressBar):
    """Lightning's progress bars, written to stderr: Lightning writes them to stdout,
    so ``python train.py > results.txt`` kept thousands of bar updates between the
    result tables that are a command's only output on stdout.

    Into a file (stderr not a terminal) a bar is written at most once every
    :data:`NOT_A_TERMINAL_EVERY_S` seconds, and where it ends (its last batch, or the
    batch a stop or trainer.max_steps ended the epoch at): every batch wrote one, 239
    updates for a one-minute smoke run, and hundreds of thousands for a SLURM job's
    day of training (a console-output review)."""

    def __init__(self, *args, **kwargs) -> None:
        super().__init__(*args, **kwargs)
        self._to_terminal = sys.stderr.isatty()
        self._written = -math.inf  # time.monotonic() of the last write into a file
        self._seen = 0  # training batches of this epoch so far (the bar may lag behind)

    def _should_update(self, current: int, total: int) -> bool:
        if not super()._should_update(current, total):
            return False
        if self._to_terminal or current == total:
            return True
        now = time.monotonic()
        if now - self._written < NOT_A_TERMINAL_EVERY_S:
            return False
        self._written = now
        return True

    init_sanity_tqdm = _on_stderr(TQDMProgressBar.init_sanity_tqdm)
    init_train_tqdm = _on_stderr(TQDMProgressBar.init_train_tqdm)
    init_validation_tqdm = _on_stderr(TQDMProgressBar.init_validation_tqdm)
    init_test_tqdm = _on_stderr(TQDMProgressBar.init_test_tqdm)
    init_predict_tqdm = _on_stderr(TQDMProgressBar.init_predict_tqdm)

    def on_train_epoch_start(self, trainer, *args) -> None:
        super().on_train_epoch_start(trainer, *args)
        self._seen = 0

    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx: int) -> None:
        self._seen = batch_idx + 1
        super().on_train_batch_end(trainer, pl_module, outputs, batch, batch_idx)

    def catch_up(self) -> None:
        """Write the epoch bar at the batch training reached, where the throttle left it
        behind: an epoch that ends before its last batch (trainer.max_steps, a stop)
        showed the count of the last write, up to 30 s old."""
        with contextlib.suppress(TypeError):  # no bar made yet
            bar = self.train_progress_bar
            if not bar.disable and bar.n != self._seen:
                bar.n = self._seen
                bar.refresh()

    def on_train_epoch_end(self, trainer, pl_module) -> None:
        self.catch_up()
        super().on_train_epoch_end(trainer, pl_module)

    def on_train_end(self, trainer, pl_module) -> None:
        self.catch_up()
        super().on_train_end(trainer, pl_module)

    def on_exception(self, trainer, pl_module, exception: BaseException) -> None:
        # the fit ends here, and so do its bars: one left open was written again, stale,
        # when it was collected (after the error, at exit, or in the middle of a later
        # fit's output in a program that goes on). The error that follows, on the same
        # stream, starts a line of its own (tqdm ends none of its updates with a newline).
        if not self.is_enabled:
            return
        for name in ("val_progress_bar", "test_progress_bar", "predict_progress_bar"):
            with contextlib.suppress(TypeError):  # no such bar made
                getattr(self, name).close()  # nested under the epoch bar: its line cleared
        try:
            ends_line = not self.train_progress_bar.disable  # closed, it ends its line
        except TypeError:  # no epoch bar made
            ends_line = False
        close_train_bar(trainer)  # at the batch training reached
        if not ends_line:
            print(file=sys.stderr, flush=True)


def close_train_bar(trainer) -> None:
    """Close ``trainer``'s epoch bar now: Lightning closes it at ``on_train_end`` after
    the callbacks listed before the bar's, so a line those print there (the clustering's
    summary) was written onto the end of the open bar, after tqdm's cursor-up code of
    the class-means bar nested under it. Closing twice is closing once."""
    bar = trainer.progress_bar_callback
    if isinstance(bar, StderrProgressBar):
        bar.catch_up()
    if isinstance(bar, TQDMProgressBar):
        with contextlib.suppress(TypeError):  # no bar made yet (no training batch)
            bar.train_progress_bar.close()
