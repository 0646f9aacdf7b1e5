"""One timing helper for evaluation and the benchmarks: interleaved repeats, median and spread.

Timing one thing after another on a shared machine ranks them by when they ran:
on one run the same stage-1 model was timed at 457 and 855 images/s in two rows of
one table. :func:`time_interleaved` runs every candidate once per round, in a
rotating order, for several rounds, and reports each one's median and spread.
"""

from __future__ import annotations

import statistics
import time
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from typing import Any

__all__ = ["Timing", "time_interleaved"]


@dataclass(frozen=True)
class Timing:
    """Wall times of one candidate's timed calls, in seconds."""

    seconds: tuple[float, ...]

    @property
    def median(self) -> float:
        return statistics.median(self.seconds)

    @property
    def spread(self) -> float:
        """Half the distance between the fastest and slowest call, relative to the median."""
        return (max(self.seconds) - min(self.seconds)) / 2 / self.median

    def rate(self, units: float) -> float:
        """``units`` per second at the median time (e.g. images/s for a batch of ``units``)."""
        return units / self.median


def time_interleaved(
    candidates: Mapping[str, Callable[[], Any]],
    rounds: int = 5,
    warmup: int = 1,
    sync: Callable[[], Any] = lambda: None,
) -> dict[str, Timing]:
    """Time each callable ``rounds`` times, one call of each per round, order rotating.

    Args:
        candidates: name -> a call doing one unit of work. A call that returns a float
            has measured its own seconds (e.g. a training fit timing its steady state
            without its set-up); otherwise the call's wall time counts.
        rounds: timed calls per candidate.
        warmup: untimed calls per candidate first (allocator, lazy inits, caches).
        sync: waits for queued device work (``torch.cuda.synchronize`` on a GPU), called
            before each clock read.
    """
    names = list(candidates)
    for _ in range(warmup):
        for name in names:
            candidates[name]()
    sync()
    seconds: dict[str, list[float]] = {name: [] for name in names}
    for r in range(rounds):
        for name in names[r % len(names) :] + names[: r % len(names)]:
            start = time.perf_counter()
            measured = candidates[name]()
            sync()
            wall = time.perf_counter() - start
            seconds[name].append(measured if isinstance(measured, float) else wall)
    return {name: Timing(tuple(s)) for name, s in seconds.items()}
