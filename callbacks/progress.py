"""Training progress bars on stderr, where the rest of a run's log goes."""

from __future__ import annotations

import contextlib
import sys

from lightning.pytorch.callbacks import TQDMProgressBar


class StderrProgressBar(TQDMProgressBar):
    """Lightning's progress bars, written to stderr: Lightning writes them to stdout,
    so ``python train.py > results.txt`` kept thousands of bar updates between the
    result tables that are a command's only output on stdout."""

    def init_sanity_tqdm(self):
        with contextlib.redirect_stdout(sys.stderr):  # Lightning passes file=sys.stdout
            return super().init_sanity_tqdm()

    def init_train_tqdm(self):
        with contextlib.redirect_stdout(sys.stderr):
            return super().init_train_tqdm()

    def init_validation_tqdm(self):
        with contextlib.redirect_stdout(sys.stderr):
            return super().init_validation_tqdm()

    def init_test_tqdm(self):
        with contextlib.redirect_stdout(sys.stderr):
            return super().init_test_tqdm()

    def init_predict_tqdm(self):
        with contextlib.redirect_stdout(sys.stderr):
            return super().init_predict_tqdm()

    def on_exception(self, trainer, pl_module, exception: BaseException) -> None:
        # a bar stopped mid-line (tqdm ends none of its updates with a newline): the
        # error that follows, on the same stream now, starts a line of its own
        if self.is_enabled:
            print(file=sys.stderr, flush=True)
