"""Evaluation of finished runs on their held-out test split: the paper's comparison.

Every model that can identify faces offers named predictors
(:class:`facecluster.inference.Predictor`); evaluation scores and times each the
same way. For a two-stage run (method=clustered or method=random):

- routed: the router picks ``route.top_m`` clusters, only their sub-nets run, the
  decision unit fuses (the paper's method; for a random partition, the routed
  variant of ISM);
- all sub-nets (ISM, the paper's baseline): every sub-net answers on its own, the
  best score wins, with no router and no class means;
- the stage-1 model (one head over all identities) and nearest class mean on the
  stage-1 backbone: cheap references that separate the effect of the clustering
  from the effect of routing.

For method=single: the single model and nearest class mean. Every row has top-1
accuracy, macro precision/recall/F1 (:class:`MacroScores`), routing accuracy (true
identity inside the chosen clusters), sub-net forwards per image, throughput at
``eval.batch_size`` and latency at batch 1, and the parameter count of the
inference path. The sweeps over top_m and alpha are the same loop over routed
predictors; plots are in :mod:`facecluster.plots`.

Evaluation runs in one process (rank 0 after a DDP training run), or in the processes
that ``torchrun`` starts for ``evaluate.py`` (:class:`Ranks`): each scores its shard of
the test split, their counts are summed, and rank 0 alone fits, times, verifies and
writes.
"""

from __future__ import annotations

import contextlib
import csv
import errno
import json
import logging
import os
import re
import socket
from collections.abc import Callable, Iterable, Iterator, Sequence
from dataclasses import asdict, dataclass, field, replace
from datetime import timedelta
from functools import cached_property, partial
from pathlib import Path
from typing import Any

import torch
from torch import Tensor
from tqdm.auto import tqdm

from facecluster.builders import (
    build_datamodule,
    default_precision,
    verification_sets,
    warn_emulated_bf16,
    warn_trained_pairs,
)
from facecluster.clustering import ClusterAssignment, embedding_class_sums, finalize_class_means
from facecluster.config import COMMAND, Config, ConfigError
from facecluster.data import BadImageError, scored
from facecluster.data.transforms import normalize_images
from facecluster.deploy import TOP, calibrate_run, resolve_device
from facecluster.inference import Predictor, StageOneModel, TwoStageIdentifier
from facecluster.inference.openset import fnir_at_fpir
from facecluster.inference.verification import VerificationResult, verify
from facecluster.io import (
    atomic_torch_save,
    check_can_write,
    file_stamp,
    load_plain,
    replacing_together,
    shown_list,
)
from facecluster.loggers import check_wandb_server, wandb_mode, wandb_run
from facecluster.models.components import load_backbone
from facecluster.plots import alpha_plot, class_means_plot, top_m_plot
from facecluster.results import markdown_table, provenance
from facecluster.run import RunFolder, run_folder
from facecluster.timing import Timing, time_interleaved

logger = logging.getLogger(__name__)

ALPHAS = (0.0, 0.25, 0.5, 0.75, 1.0)
DECISION_KEYS = (
    "decision",
    "alpha",
    "router_temperature",
    "subnet_temperature",
    "generalist_weight",
)
RANK = TOP
"""Identification at rank ``RANK`` (top-5, a point of the CMC curve): the face's
identity among a predictor's ``RANK`` best candidates, those ``facecluster identify``
lists."""
FPIRS = (0.01, 0.001)
"""The false-positive identification rates at which open-set runs report FNIR."""


@dataclass(frozen=True)
class Ranks:
    """The processes evaluating together (``torchrun --nproc_per_node=N evaluate.py``,
    :func:`torchrun_ranks`; a DDP ``train.py``'s after training, :func:`training_ranks`):
    each scores its shard of the test split (and of a single model's training split, for
    its class means), and their counts are summed over the process group, so that every
    rank ends with the figures of the whole split; the work that is the same on every
    rank (fitting the decision unit, timing, verification) runs on rank 0 alone and is
    shared, and rank 0 alone writes. The collectives, a few per predictor, go over gloo
    on CPU tensors: the GPUs' memory is the networks'. ``Ranks()``: one process."""

    rank: int = 0
    world: int = 1
    local_rank: int = 0
    local_world: int = 1
    """The processes on this machine (torchrun's ``LOCAL_WORLD_SIZE``)."""
    group: Any = None
    """The gloo process group of the collectives (None: the default one, torchrun's)."""

    @property
    def lead(self) -> bool:
        """Whether this process writes (rank 0)."""
        return self.rank == 0

    @property
    def shard(self) -> tuple[int, int]:
        """``(rank, world)``: the positions ``rank, rank + world, ...`` of a split."""
        return self.rank, self.world

    def sum(self, tensor: Tensor, chunk_bytes: int = 64 << 20) -> Tensor:
        """``tensor`` summed over the ranks, in place (itself for one process), a
        ``chunk_bytes`` piece at a time: a single model's class sums are 8 GB at 2M
        identities, and a whole copy of them on the CPU per process was 64 GB of a
        machine's memory at 8 processes."""
        if self.world == 1:
            return tensor
        if not tensor.is_contiguous():  # summed into a copy, the caller's left as it was
            raise ValueError("Ranks.sum sums a contiguous tensor in place")
        flat = tensor.view(-1)
        step = max(1, chunk_bytes // tensor.element_size())
        for start in range(0, len(flat), step):
            part = flat[start : start + step]
            summed = part.cpu()  # a copy from a GPU; the piece itself on the CPU
            self._collective(torch.distributed.all_reduce, summed, group=self.group)
            part.copy_(summed)
        return tensor

    def gather(self, value: Any) -> list[Any]:
        """Every rank's ``value``, in rank order."""
        if self.world == 1:
            return [value]
        found: list[Any] = [None] * self.world
        self._collective(torch.distributed.all_gather_object, found, value, group=self.group)
        return found

    def share(self, make: Callable[[], Any]) -> Any:
        """``make()``, called on rank 0 alone, on every rank; the others wait (timing
        on rank 0 is then undisturbed by their work)."""
        value = [make() if self.lead else None]
        if self.world > 1:
            self._collective(
                torch.distributed.broadcast_object_list, value, src=0, group=self.group
            )
        return value[0]

    def share_bad_images(self, dm: Any) -> None:
        """After a pass over sharded splits: every rank's broken faces on every rank,
        and ``data.max_bad_fraction`` checked over the whole split (each rank found only
        those of its shard, and measured them against the whole: a limit N times
        looser), on every rank alike."""
        if self.world > 1:
            with self.alike():
                self._collective(dm.share_bad_images, torch.device("cpu"), self.group)

    @contextlib.contextmanager
    def alike(self) -> Iterator[None]:
        """What every rank meets alike here (a refused setting, a damaged run folder, a
        count over all the shards): rank 0 says it, not every process
        (:func:`said_by_this_rank`); any other error is said by the rank that met it."""
        try:
            yield
        except Exception as e:
            if self.world > 1:
                e.facecluster_alike = True  # type: ignore[attr-defined]
            raise

    def _collective(self, op: Callable[..., Any], *args: Any, **kwargs: Any) -> Any:
        try:
            return op(*args, **kwargs)
        except BadImageError:  # share_bad_images' check, the same on every rank
            raise
        except RuntimeError as e:  # gloo's own errors are plain RuntimeErrors
            if "Timed out" in str(e):  # this rank waited too long: it says so
                raise TimeoutError(
                    f"waited {RANKS_TIMEOUT} for the other processes of this evaluation "
                    "(rank 0 fits the decision unit, times, verifies and writes alone, "
                    f"meanwhile): {str(e).splitlines()[0][:200]}"
                ) from e
            raise PeerStopped(
                "another process of this evaluation stopped (its error is above)"
            ) from e

    def check_device(self, cfg: Config) -> None:
        """Several processes: each evaluates on the GPU of its ``LOCAL_RANK``, so
        ``eval.device`` cannot name one, and the machine must have that many GPUs
        (checked for every process of the machine alike, so that rank 0 says it)."""
        if self.world == 1 or eval_device(cfg).type != "cuda":
            return
        if cfg.eval.device not in ("auto", "cuda"):
            raise ConfigError(
                f"eval.device={cfg.eval.device}: each of torchrun's {self.world} processes "
                "evaluates on the GPU of its LOCAL_RANK; give eval.device=cuda (or auto)"
            )
        if self.local_world > (gpus := torch.cuda.device_count()):
            raise ConfigError(
                f"torchrun started {self.local_world} processes on a machine with {gpus} "
                f"GPU(s): give --nproc_per_node={gpus} at most (or eval.device=cpu)"
            )


RANKS_TIMEOUT = timedelta(hours=2)
"""How long the evaluation's processes wait for each other in a collective: the others wait
while rank 0 fits the decision unit, times, runs the verification sets and writes
(gloo's default, 30 minutes, could end a large run's evaluation there)."""

JOIN_TIMEOUT = timedelta(minutes=10)
"""How long the training's processes wait for each other to make the evaluation's group
(:func:`training_ranks`): they come to it together, from rank 0's word, so a longer wait
is a process that could not join (it says why). Rank 0 waited :data:`RANKS_TIMEOUT`
for it; the group then waits that long in its collectives."""


class PeerStopped(RuntimeError):
    """A collective of the evaluation failed: another process stopped (and said why)."""


def said_by_this_rank(error: BaseException, rank: int, local_rank: int) -> bool:
    """Whether process ``rank`` of an evaluation says ``error``: rank 0 says every
    error; another says what it met alone (a broken face of its shard, a timeout), and
    what every rank meets alike (:meth:`Ranks.alike`) only as the first process of
    another machine (whose data or run folder may not be rank 0's); a lost peer
    (:class:`PeerStopped`) is rank 0's to say."""
    if rank == 0:
        return True
    if isinstance(error, PeerStopped):
        return False
    return local_rank == 0 if getattr(error, "facecluster_alike", False) else True


@contextlib.contextmanager
def torchrun_ranks() -> Iterator[Ranks]:
    """The processes ``torchrun`` started for this evaluation (from its ``RANK``,
    ``LOCAL_RANK``, ``WORLD_SIZE``, ``LOCAL_WORLD_SIZE`` variables; ``Ranks()`` without
    them), their process group joined and left again; each process's GPU is that of its
    ``LOCAL_RANK``."""
    world = int(os.environ.get("WORLD_SIZE", "1") or 1)
    if world <= 1:
        yield Ranks()
        return
    env = {k: int(os.environ.get(k, 0)) for k in ("RANK", "LOCAL_RANK", "LOCAL_WORLD_SIZE")}
    ranks = Ranks(env["RANK"], world, env["LOCAL_RANK"], env["LOCAL_WORLD_SIZE"] or 1)
    if torch.cuda.is_available() and ranks.local_rank < torch.cuda.device_count():
        torch.cuda.set_device(ranks.local_rank)  # "cuda" is this process's GPU
    torch.distributed.init_process_group("gloo", timeout=RANKS_TIMEOUT)
    try:
        with _quiet_unless_lead(ranks):
            yield ranks
    finally:
        torch.distributed.destroy_process_group()


@contextlib.contextmanager
def training_ranks(cfg: Config, finished: bool) -> Iterator[Ranks | None]:
    """After ``train.py`` on several processes (DDP: Lightning's launcher, torchrun or
    srun): the training's processes, which evaluate the run together as torchrun's do
    (:func:`torchrun_ranks`), over a gloo group of their own (the training's may be
    NCCL's, with its 30-minute timeout), each on its GPU (the one it trained on, which
    Lightning made its ``cuda``) or on the CPU. Every process of the training enters
    it; ``finished`` is rank 0's word (it alone assembled the results) that the run is
    finished (the others' is not read). None where this process does not evaluate: on
    every rank for a run not finished; on all but rank 0 where it evaluates alone, for
    ``eval.device=cuda:N`` (that GPU) and for an evaluation on a GPU after a training
    over a process group that is not NCCL's (gloo's: on CPUs, whose processes have no
    GPU each), as rank 0 decides for all.

    Raises:
        PeerStopped: another process stopped before the evaluation (rank 0, whose own
            error is said, failed after the training), or rank 0 could not make the
            evaluation's group.
        ConnectionError: another rank could not make it (said by that rank).
    """
    dist = torch.distributed
    world = dist.get_world_size() if dist.is_available() and dist.is_initialized() else 1
    if world == 1:
        yield Ranks() if finished else None
        return
    alone = cfg.eval.device.startswith("cuda:") or (
        eval_device(cfg).type == "cuda" and "nccl" not in dist.get_backend()
    )
    rank, word, hosts = dist.get_rank(), [finished, alone], [None] * world
    try:  # rank 0's word, over the training's group as it ends (its GPUs may differ)
        dist.broadcast_object_list(word, src=0)
    except RuntimeError as e:  # torch's DistNetworkError among them: rank 0 failed
        raise PeerStopped("another process of this run stopped (its error is above)") from e
    finished, alone = word
    try:
        if finished and not alone:
            group = dist.new_group(backend="gloo", timeout=JOIN_TIMEOUT)
            dist.all_gather_object(hosts, socket.gethostname(), group=group)
            # made: its collectives may wait for rank 0's work (torch's set_timeout is
            # public since 2026, _set_pg_timeout its older, now deprecated, name)
            set_timeout = getattr(dist, "set_timeout", None)
            (set_timeout or dist.distributed_c10d._set_pg_timeout)(RANKS_TIMEOUT, group)
    except RuntimeError as e:
        # a peer gone, or this process's own error (a port it cannot bind): its first
        # line, said by rank 0 and by the rank that met it (the others wait for it)
        first = str(e).strip().partition("\n")[0][:200]
        if rank == 0:
            raise PeerStopped(
                "another process of this run stopped (its error is above), or this one "
                f"could not join it: {first}"
            ) from e
        raise ConnectionError(f"could not join the evaluation's process group: {first}") from e
    if not finished or alone:
        yield Ranks() if finished and rank == 0 else None
        return
    try:  # each machine's processes: its first one speaks for it
        here = [r for r, host in enumerate(hosts) if host == hosts[rank]]
        ranks = Ranks(rank, world, here.index(rank), len(here), group)
        with _quiet_unless_lead(ranks):
            yield ranks
    finally:  # unless a failed rank 0 closed every group, to end the ranks it started
        if dist.is_initialized():
            dist.destroy_process_group(group)


@contextlib.contextmanager
def _quiet_unless_lead(ranks: Ranks) -> Iterator[None]:
    """Ranks other than 0 log errors and the broken faces of their shards only: rank 0
    warns of what they all would."""
    if ranks.lead:
        yield
        return
    loggers = [logging.getLogger(n) for n in ("facecluster", "facecluster.data.images")]
    levels = [logger.level for logger in loggers]
    loggers[0].setLevel(logging.ERROR)
    loggers[1].setLevel(logging.WARNING)  # each broken face: said by the rank that read it
    try:
        yield
    finally:
        for logger, level in zip(loggers, levels, strict=True):
            logger.setLevel(level)


@dataclass
class Row:
    """One line of the evaluation table."""

    run: str
    model: str
    top1: float
    precision: float
    recall: float
    f1: float
    routing_accuracy: float | None
    subnet_forwards: float
    throughput: float
    latency_ms: float
    params: int
    throughput_spread: float | None = 0.0
    """Half the range of the timed batches, relative to the median; None for one timed
    batch (``eval.timing_batches=1``), which has no range to show."""
    verification: dict[str, float] = field(default_factory=dict)
    """10-fold verification accuracy per ``data.verification`` set, of the backbone
    that embeds faces for this row (the stage-1 backbone: router, head, class means)."""
    fnir: dict[str, float | None] = field(default_factory=dict)
    """Open set: FNIR at each FPIR of ``FPIRS`` (key ``"1%"``...), None where the test
    split's unseen faces are too few to measure it; empty for a closed-set run."""
    verification_std: dict[str, float] = field(default_factory=dict)
    """The standard deviation of the 10 fold accuracies behind each of
    :attr:`verification` (population, as InsightFace's ``Accuracy-Flip: mean+-std``)."""
    top5: float | None = None
    """The share of test faces whose identity is among the predictor's 5 best candidates
    (``RANK``; None: a row built without it)."""


@dataclass
class RunEvaluation:
    """Everything ``evaluate_run`` measured for one run."""

    run_dir: Path
    method: str
    rows: list[Row]
    batch_size: int = 256
    top_m_sweep: list[dict[str, float]] = field(default_factory=list)
    alpha_sweep: list[dict[str, float]] = field(default_factory=list)
    """Top-1 at route.top_m against the decision unit's weight: alpha (linear), or the
    generalist weight (moe, fitted temperatures)."""
    plots: list[Path] = field(default_factory=list)
    decision: dict[str, Any] = field(default_factory=dict)
    """The decision unit's settings, the fitted ones included."""


class MacroScores:
    """Macro precision, recall and F1 over ``num_classes`` identities, from three
    per-class counts: hits, predictions and true labels.

    The same numbers as torchmetrics' ``Multiclass{Precision,Recall,F1Score}(average=
    "macro")`` (an identity counts when it was predicted or present; 0/0 is 0), whose
    update builds a ``[C, C]`` confusion matrix at every batch: 69 GB at 93K identities.
    Here memory is three ``[C]`` counts.
    """

    def __init__(self, num_classes: int) -> None:
        self.hits = torch.zeros(num_classes, dtype=torch.long)
        self.predicted = torch.zeros(num_classes, dtype=torch.long)
        self.true = torch.zeros(num_classes, dtype=torch.long)

    def update(self, predicted: Tensor, labels: Tensor) -> None:
        # in place, O(batch): three bincounts of length C took 21 ms per batch of 256
        # at 2M identities here, against 0.05 ms (one-off), hours over millions of faces
        predicted, labels = predicted.cpu().long(), labels.cpu().long()
        one = torch.ones_like(labels)
        hit = predicted == labels
        self.hits.index_add_(0, labels[hit], one[hit])
        # a face that got no identity (Identification.failed: the id past the last) is a
        # miss, no identity's prediction (it stopped the evaluation with an IndexError)
        named = (predicted >= 0) & (predicted < len(self.predicted))
        self.predicted.index_add_(0, predicted[named], one[named])
        self.true.index_add_(0, labels, one)

    def compute(self) -> dict[str, float]:
        hits, predicted, true = self.hits.double(), self.predicted.double(), self.true.double()
        counted = (predicted + true) > 0
        if not bool(counted.any()):
            return {"precision": 0.0, "recall": 0.0, "f1": 0.0}

        def mean(num: Tensor, den: Tensor) -> float:
            ratio = torch.where(den > 0, num / den.clamp_min(1), torch.zeros_like(num))
            return float(ratio[counted].mean())

        return {
            "precision": mean(hits, predicted),
            "recall": mean(hits, true),
            "f1": mean(2 * hits, predicted + true),
        }


class _Tally:
    """One predictor's counts over the test split, batch by batch."""

    def __init__(self, num_classes: int) -> None:
        self.macro = MacroScores(num_classes)
        self.hits: list[Tensor] = []
        self.ranked_hits: list[Tensor] = []
        self.decision: list[Tensor] = []
        """The prediction's score per face (a mated search's, for FNIR)."""
        self.routed, self.routes = 0, False

    def add(
        self,
        ranked: Tensor,
        score: Tensor,
        clusters: Tensor | None,
        labels: Tensor,
        assignment: ClusterAssignment | None,
    ) -> None:
        predicted = ranked[:, 0]
        self.hits.append(predicted == labels)
        self.ranked_hits.append((ranked == labels[:, None]).any(dim=1))
        self.decision.append(score)
        self.macro.update(predicted, labels)
        if clusters is not None and assignment is not None:
            self.routes = True
            found = assignment.contains(labels.cpu()[:, None], clusters.cpu())
            self.routed += int(found.any(dim=1).sum())

    def merge(self, ranks: Ranks) -> None:
        """The counts of every rank's shard of the split, on every rank: the macro
        counts summed, the per-face hits and scores gathered (FNIR ranks them)."""
        if ranks.world == 1:
            return
        for counts in ("hits", "predicted", "true"):
            setattr(self.macro, counts, ranks.sum(getattr(self.macro, counts)))
        faces = [
            (torch.cat(part) if part else torch.empty(0, dtype=dtype))
            for part, dtype in (
                (self.hits, torch.bool),
                (self.ranked_hits, torch.bool),
                (self.decision, torch.float32),
            )
        ]
        shards = ranks.gather((*faces, self.routed, self.routes))
        self.hits, self.ranked_hits, self.decision = (
            [shard[i] for shard in shards if len(shard[i])] for i in range(3)
        )
        self.routed = sum(shard[3] for shard in shards)
        self.routes = any(shard[4] for shard in shards)

    def result(self) -> dict[str, Any]:
        """Top-1, top-5, macro P/R/F1, routing accuracy; ``fnir`` None (not measured)."""
        correct = torch.cat(self.hits)
        scores: dict[str, Any] = self.macro.compute()
        scores["top1"] = correct.double().mean().item()
        scores["top5"] = torch.cat(self.ranked_hits).double().mean().item()
        scores["routing_accuracy"] = self.routed / len(correct) if self.routes else None
        scores["fnir"] = None
        return scores


class Bench:
    """Scores and times predictors on one run's test split; each score is computed once.

    Args:
        cfg: the run's config (``eval.*`` sets batch size, timing and device).
        run_name: the run column of the rows.
        assignment: the clusters, for routing accuracy (None: no routing): a route is
            right when a chosen cluster has the face's identity among its members.
        ranks: the processes evaluating together, each scoring its shard (:class:`Ranks`).
    """

    def __init__(
        self,
        cfg: Config,
        run_name: str,
        assignment: ClusterAssignment | None,
        ranks: Ranks = Ranks(),  # noqa: B008 (frozen: one process)
    ) -> None:
        self.cfg, self.run_name, self.assignment, self.ranks = cfg, run_name, assignment, ranks
        self.device = eval_device(cfg)
        self.autocast = eval_autocast(cfg, self.device)
        self.dm = build_datamodule(cfg, eval_batch_size=cfg.eval.batch_size)
        self.loader = self.dm.test_dataloader(ranks.shard)
        self.unseen = self.dm.unseen_dataloader("test", ranks.shard)
        self._scores: dict[str, dict[str, Any]] = {}

    @cached_property
    def timing_faces(self) -> tuple[Tensor, list[int]]:
        """The timing batch and its labels: test faces drawn across the split (seeded), as
        a deployment sees them; the split's first batch holds a few identities in a row,
        which route to a few sub-nets. Read on first use, after the caller has checked
        the data against the run: read here, other data's broken images were reported
        as damage instead of as not the run's data (a walkthrough)."""
        dataset = self.loader.dataset
        seed = torch.Generator().manual_seed(self.cfg.seed)
        drawn = torch.randperm(len(dataset), generator=seed)
        items = [dataset[i] for i in drawn[: self.cfg.eval.batch_size].sort().values.tolist()]
        return torch.stack([image for image, _ in items]), [int(label) for _, label in items]

    def score(self, predictor: Predictor, open_set: bool = True) -> dict[str, Any]:
        """Top-1, top-5, macro P/R/F1 and routing accuracy over the test split; with
        ``open_set``, also FNIR at ``FPIRS`` over the unseen test faces (open-set runs).
        A predictor that :meth:`score_all` has scored is not run again."""
        self.score_all([predictor], [predictor.name] if open_set else ())
        scores = self._scores[predictor.name]
        return {**scores, "fnir": (scores["fnir"] if open_set else None) or {}}

    @torch.inference_mode()
    def score_all(
        self,
        predictors: Sequence[Predictor],
        open_set: Sequence[str] = (),
        models: Sequence[Any] = (),
    ) -> None:
        """Runs the predictors not scored yet over the test split in one pass: each
        batch is read, decoded and moved to the device once, and all of them answer it
        (a pass each read the split once per predictor, 15 times at K = 64 with the
        sweeps). ``open_set``: the predictors, by name, that the unseen test faces of an
        open-set run go through too, in one pass as well. ``models``: those behind the
        predictors, each batch answered within their ``embeddings_once(images)``, so
        that each network embeds it once (:meth:`TwoStageIdentifier.embeddings_once`).

        Only each predictor's figures are kept, and the per-face scores of the
        open-set ones until their FNIR: a [C] count per predictor at once was 48 MB at
        2M identities, times 15 (computed)."""
        measure_fnir = self.unseen is not None
        todo = {
            p.name: p
            for p in predictors
            if p.name not in self._scores
            or (measure_fnir and p.name in open_set and self._scores[p.name]["fnir"] is None)
        }
        if not todo:
            return
        tallies = {name: _Tally(self.dm.num_classes) for name in todo}
        for labels, answers in self._answers(self.loader, todo.values(), models, RANK):
            for name, (ranked, score, clusters) in answers.items():
                tallies[name].add(ranked, score, clusters, labels, self.assignment)
        self.ranks.share_bad_images(self.dm)
        for tally in tallies.values():  # one at a time: a [C] count each
            tally.merge(self.ranks)
        with self.ranks.alike():  # the counts of every shard
            if any(not tally.hits for tally in tallies.values()):
                raise ValueError(
                    f"{self.run_name}: no face of the test split could be read "
                    "(data.on_bad_image=skip left every one out); repair the data set"
                )
        self._scores.update({name: tally.result() for name, tally in tallies.items()})
        wanted = [p for name, p in todo.items() if measure_fnir and name in open_set]
        if not wanted:
            return
        found: dict[str, list[Tensor]] = {p.name: [] for p in wanted}
        for _, answers in self._answers(self.unseen, wanted, models, 1, "unseen test faces"):
            for name, (_, score, _) in answers.items():
                found[name].append(score)
        self.ranks.share_bad_images(self.dm)
        for name, scores in found.items():
            found[name] = [score for shard in self.ranks.gather(scores) for score in shard]
        with self.ranks.alike():  # the faces of every shard
            if not found[wanted[0].name]:
                raise ValueError(
                    f"{self.run_name}: no unseen face of the test split could be read "
                    "(data.on_bad_image=skip left every one out); repair the data set"
                )
        for name, nonmated in found.items():
            tally, fnir = tallies[name], {}
            correct, mated = torch.cat(tally.hits), torch.cat(tally.decision)
            for fpir in FPIRS:
                measured = fnir_at_fpir(correct, mated, torch.cat(nonmated), fpir)
                fnir[f"{fpir:.1%}".replace(".0%", "%")] = measured and measured[0]
            self._scores[name]["fnir"] = fnir

    def _answers(
        self,
        loader: Any,
        predictors: Iterable[Predictor],
        models: Sequence[Any],
        k: int,
        what: str = "test split",
    ) -> Iterator[tuple[Tensor, dict[str, tuple[Tensor, Tensor, Tensor | None]]]]:
        """Per batch of ``loader``: its scored labels and each predictor's answer (its
        ``k`` best identities, the first's score, its candidate clusters), on the CPU."""
        predictors = list(predictors)
        desc = f"{what}, {len(predictors)} predictor{'s' * (len(predictors) != 1)}"
        for images, labels in tqdm(loader, desc=desc, leave=False, disable=not self.ranks.lead):
            keep = scored(labels)  # a broken face nothing could replace: not scored
            images, labels = images[keep], labels[keep]
            if not len(labels):
                continue
            x = normalize_images(images.to(self.device))
            answers = {}
            with contextlib.ExitStack() as once, self.autocast():
                for model in models:
                    once.enter_context(model.embeddings_once(x))
                for p in predictors:
                    try:
                        ranked, score, clusters = p.predict(x, k)
                    except Exception as e:  # the pass names every predictor, not this one
                        e.add_note(f"(while {p.name!r} answered a batch of the {what})")
                        raise
                    answers[p.name] = (ranked.cpu(), score.float().cpu(), clusters)
            yield labels, answers

    @torch.inference_mode()
    def timings(self, predictors: list[Predictor]) -> dict[str, tuple[Timing, Timing]]:
        """Per predictor: the time of a batch of ``eval.batch_size`` and of one image.

        Interleaved (see :mod:`facecluster.timing`): ``eval.timing_batches`` passes over
        the one timing batch (:attr:`timing_faces`) and 20 calls on one image per
        predictor, the predictors taking turns, from the loader's uint8 images
        (normalisation included). Several processes: rank 0 times while the others
        wait, and shares its figures.
        """
        return self.ranks.share(partial(self._timings, predictors))

    def _timings(self, predictors: list[Predictor]) -> dict[str, tuple[Timing, Timing]]:
        images, size = self.timing_faces[0].to(self.device), self.cfg.eval.batch_size
        batch = images.repeat((size + len(images) - 1) // len(images), 1, 1, 1)[:size]
        cuda = self.device.type == "cuda"
        sync = partial(torch.cuda.synchronize, self.device) if cuda else (lambda: None)
        rounds = self.cfg.eval.timing_batches
        # said while it runs, never updated (no write inside the timed calls): a run's
        # evaluation was silent for 12 to 40 s here (a console-output review)
        n = len(predictors)
        what = (
            f"timing {n} predictor{'s' * (n != 1)}: {rounds} pass(es) over a batch of {size} "
            "and 20 single images each"
        )
        with tqdm(desc=what, bar_format="{desc}", leave=False):
            batches = time_interleaved(
                {p.name: partial(_predict, p, batch, self.autocast) for p in predictors},
                rounds=rounds,
                sync=sync,
            )
            singles = time_interleaved(
                {p.name: partial(_predict, p, images[:1], self.autocast) for p in predictors},
                rounds=20,
                sync=sync,
            )
        return {p.name: (batches[p.name], singles[p.name]) for p in predictors}

    @torch.inference_mode()
    def verification(self, backbone: torch.nn.Module) -> dict[str, VerificationResult]:
        """``data.verification`` results of ``backbone`` (empty when there are none);
        several processes: rank 0's, shared."""
        if not self.cfg.data.verification:
            return {}
        return self.ranks.share(partial(self._verification, backbone))

    def _verification(self, backbone: torch.nn.Module) -> dict[str, VerificationResult]:
        sets = verification_sets(self.cfg)
        warn_trained_pairs(sets.values(), self.dm.class_names)  # beside the table
        with self.autocast():
            return {
                name: verify(
                    backbone, pairs, self.cfg.data.image_size, self.cfg.eval.batch_size, self.device
                )
                for name, pairs in sets.items()
            }

    def rows(
        self,
        predictors: list[Predictor],
        verification: dict[str, VerificationResult] | None = None,
        timings: dict[str, tuple[Timing, Timing]] | None = None,
        models: Sequence[Any] = (),
    ) -> list[Row]:
        """A table row per predictor; ``verification``: the results of the run's
        stage-1 backbone, given on the rows that embed with it (not ISM's); ``timings``:
        theirs from :meth:`timings` (None: timed here); ``models``: as for
        :meth:`score_all`."""
        timings = timings if timings is not None else self.timings(predictors)
        # one pass for them all (a single model's two rows embed with one backbone)
        self.score_all(predictors, [p.name for p in predictors], models)
        verified = (verification or {}).items()
        accuracy = {name: result.accuracy for name, result in verified}
        std = {name: result.std for name, result in verified}
        rows = []
        for p in predictors:
            s, (batch, single) = self.score(p), timings[p.name]
            rows.append(
                Row(
                    self.run_name,
                    p.name,
                    s["top1"],
                    s["precision"],
                    s["recall"],
                    s["f1"],
                    s["routing_accuracy"],
                    p.subnet_forwards,
                    batch.rate(self.cfg.eval.batch_size),
                    single.median * 1000,
                    p.params,
                    batch.spread if len(batch.seconds) > 1 else None,
                    accuracy if p.stage1_backbone else {},
                    s["fnir"],
                    std if p.stage1_backbone else {},
                    s["top5"],
                )
            )
        return rows


def _predict(predictor: Predictor, images: Tensor, autocast: Callable) -> None:
    with autocast():
        predictor.predict(normalize_images(images), 1)  # from uint8, as the loader gives them


PRECISION_ALIASES = {"16": "16-mixed", "bf16": "bf16-mixed", "32": "32-true", "64": "64-true"}
"""Lightning's older names for ``trainer.precision``, which it still trains under."""


EVALUATION_PRECISIONS = ("auto", "32-true", "bf16-mixed", "16-mixed")
"""The ``trainer.precision`` values an evaluation runs (:func:`eval_autocast`): fp32, or
an autocast; a ``*-true`` other than 32 is a training setting."""


def _check_precision(cfg: Config, overrides: list[str] | tuple) -> None:
    """Refuse a ``trainer.precision`` override that the evaluation would not run: it ran
    fp32 for any other value, ``bogus`` too, and its results.json named the value."""
    if not any(o.split("=", 1)[0].strip() == "trainer.precision" for o in overrides):
        return
    given = str(cfg.trainer.get("precision"))
    if PRECISION_ALIASES.get(given, given) not in EVALUATION_PRECISIONS:
        raise ConfigError(
            f"trainer.precision={given}: an evaluation runs {', '.join(EVALUATION_PRECISIONS)} "
            "(fp32 or an autocast of the fp32 weights)"
        )


def eval_autocast(cfg: Config, device: torch.device) -> Callable[[], Any]:
    """The autocast of ``trainer.precision`` on the evaluation device (``auto`` decides
    as for training: mixed on GPUs, fp32 on CPU), as a context factory."""
    precision = str(cfg.trainer.get("precision", "auto"))
    precision = PRECISION_ALIASES.get(precision, precision)  # what Lightning trains
    if precision == "auto":
        precision = default_precision("cuda" if device.type == "cuda" else "cpu")
    if precision not in ("bf16-mixed", "16-mixed"):
        return contextlib.nullcontext
    # fp16 autocast on a CPU is what Lightning runs as bf16 too
    half = precision == "16-mixed" and device.type == "cuda"
    if device.type == "cpu":
        warn_emulated_bf16(str(cfg.trainer.get("precision", "auto")))
    return partial(torch.autocast, device.type, dtype=torch.float16 if half else torch.bfloat16)


def eval_device(cfg: Config) -> torch.device:
    """``eval.device`` (:func:`facecluster.deploy.resolve_device`: auto is the GPU when
    there is one; a GPU this machine lacks is refused)."""
    try:
        return resolve_device(cfg.eval.device)
    except ValueError as e:
        raise ConfigError(f"eval.device={e}") from None


def evaluate_run(
    run_dir: str | Path,
    overrides: list[str] | tuple = (),
    ranks: Ranks = Ranks(),  # noqa: B008 (frozen: one process)
) -> RunEvaluation:
    """Evaluate one finished run on its held-out test split (see the module doc);
    ``ranks``: the processes evaluating it together, each with its shard."""
    with ranks.alike():
        run = run_folder(run_dir)
        cfg = _checked_config(run, overrides, ranks)
        _check_routed([cfg], [run], overrides)
    return _evaluate(run, cfg, overrides, ranks)


def _check_routed(configs: list[Config], runs: list[RunFolder], overrides: Sequence[str]) -> None:
    """Refuse ``route.*`` overrides when no run routes (single-model runs only): they
    were accepted and the table had no routed row. Beside a two-stage run they are its."""
    routed = [o for o in overrides if _routes(o)]
    if routed and not any(cfg.two_stage for cfg in configs):
        raise ConfigError(
            f"{', '.join(routed)}: {', '.join(f'run={r.path}' for r in runs)} "
            f"{'is a single-model run' if len(runs) == 1 else 'are single-model runs'} "
            "(method=single), with no router and no sub-nets: route.* changes nothing there"
        )


def _routes(override: str) -> bool:
    """Whether ``override`` sets a ``route.*`` key (what only a router reads)."""
    return override.split("=", 1)[0].strip().split(".")[0] == "route"


def _checked_config(run: RunFolder, overrides: list[str] | tuple, ranks: Ranks) -> Config:
    """``run``'s finished config under ``overrides``, once everything that can be
    refused without reading weights or data has been checked."""
    cfg = run.finished_config(overrides)
    if cfg.two_stage:  # before any weights are read; a single model has no router
        try:
            cfg.route.check_identities(len(run.class_names()))
        except ConfigError as e:  # which run, in a table of several
            raise ConfigError(f"run={run.path}: {e}") from None
    _check_precision(cfg, overrides)
    ranks.check_device(cfg)
    check_writable(run, cfg.logger == "wandb" and wandb_mode(cfg)[0] in ("offline", "dryrun"))
    check_wandb_server(cfg)  # logger=wandb: what wandb refuses, before the evaluation
    return cfg


def _evaluate(
    run: RunFolder, cfg: Config, overrides: list[str] | tuple, ranks: Ranks
) -> RunEvaluation:
    torch.manual_seed(cfg.seed)
    stamp = run.weights_stamp(cfg.two_stage) if ranks.lead else {}  # before any read
    if cfg.two_stage:
        report = _evaluate_two_stage(run, cfg, ranks, stamp)
    else:
        with ranks.alike():
            bench = Bench(cfg, run.path.name, None, ranks)
            run.check_data(bench.dm)
        model = _single_model(run, cfg, bench)
        verification = bench.verification(model.backbone)
        rows = bench.rows(model.predictors(), verification, models=[model])
        report = RunEvaluation(run.path, cfg.method, rows, cfg.eval.batch_size)
    if not ranks.lead:
        return report
    if not cfg.two_stage:  # a two-stage run's was checked before its plots
        _check_unchanged(run, stamp)
    return _write(report, run, cfg, list(overrides), ranks)


def _check_unchanged(run: RunFolder, stamp: dict[str, Any]) -> None:
    """Refuse to write an evaluation of weights that another command has replaced since
    (``stamp``: :meth:`RunFolder.weights_stamp` before they were read): it wrote the
    old weights' figures over the new ones', without a word."""
    if changed := run.changed_weights(stamp):
        raise ConfigError(
            f"run={run.path}: its {shown_list(changed)} changed while this evaluation ran "
            "(a resume trains them again, or another command wrote them): its figures are "
            f"of the weights before, and were not written. Evaluate it again: "
            f"`{COMMAND['evaluate']} run={run.path}`"
        )


def _warn_other_faces(runs: list[RunFolder]) -> None:
    """Warn where runs evaluated into one table were tested on other faces than the
    first's (other identities, or another test split: another data set, seed or
    data.unseen_fraction): their rows then compare nothing, and one table said nothing."""
    first = runs[0]
    names, test = first.class_names(), first.test_split()
    for run in runs[1:]:
        what = [
            *(["identities"] if run.class_names() != names else []),
            *(["test split"] if run.test_split() != test else []),
        ]
        if what:
            logger.warning(
                "run=%s has another %s than run=%s: their rows are measured on other "
                "faces and do not compare; evaluate runs trained on the same data and seed "
                "together",
                run.path, " and ".join(what), first.path,
            )  # fmt: skip


def check_writable(run: RunFolder, wandb_offline: bool = False) -> None:
    """ConfigError where the evaluation could not write its results into ``<run>/eval``
    (``eval`` a file, or one of its results a folder, a read-only run folder): found when
    the whole evaluation had run, it ended in a traceback and the table was lost. With
    ``wandb_offline``, ``<run>/wandb`` too (or the run folder, where it is made), where
    an offline W&B run goes: W&B otherwise fell back to a temporary folder, where `wandb
    sync <run>/wandb` did not find it (online, it is uploaded all the same)."""
    files = [run.eval_file(kind) for kind in ("table", "csv", "json")]
    folder = run.path / "wandb"
    try:
        if wandb_offline:
            check_can_write(folder)
        folder = run.eval_dir
        check_can_write(folder)
        if found := next((f for f in files if f.is_dir()), None):
            raise IsADirectoryError(errno.EISDIR, "a folder where a result goes", str(found))
    except OSError as e:
        unlogged = " (W&B's files), or pass logger=none" if folder.name == "wandb" else ""
        raise ConfigError(
            f"{e.filename or folder}: the evaluation cannot write its results there "
            f"({e.strerror or e}): make {folder} a writable folder{unlogged}, or evaluate "
            "a copy of the run"
        ) from None


def _single_model(run: RunFolder, cfg: Config, bench: Bench) -> StageOneModel:
    """The single-model baseline, with class means from one pass over its training split."""
    weights = run.stage1_weights()
    args = cfg.model.backbone_args(cfg.data.image_size)
    edited = f"{run.path}'s stage-1 weights (config.yaml's model settings edited since training?)"
    backbone = load_backbone(args, weights.backbone, edited)
    backbone.to(bench.device)
    means = _single_model_means(run, cfg, bench, backbone)
    return StageOneModel(backbone, weights.head, means, single=True).to(bench.device)


def _single_model_means(
    run: RunFolder, cfg: Config, bench: Bench, backbone: torch.nn.Module
) -> torch.Tensor:
    """The single model's class means, from one pass over its training split (at
    Glint360K's size a forward over 17M images), kept in ``eval/class_means.pt`` for
    the next evaluation of the same weights at the same precision, as a two-stage run
    keeps its own in ``clusters.pt``."""
    key = {
        # size and time, not the inode: a copied run (cp -a, rsync) keeps its means
        "checkpoint": list(file_stamp(run.last_checkpoint(1), inode=False)),
        "precision": str(cfg.trainer.get("precision", "auto")),
        "device": bench.device.type,
    }
    dm, path, ranks = bench.dm, run.eval_file("single_means"), bench.ranks
    shape = (dm.num_classes, cfg.model.embedding_dim)
    what = "the single model's class means"

    def kept() -> Tensor | None:
        try:
            found = load_plain(path, what=what)
            if found.get("key") == key and tuple(found["means"].shape) == shape:
                return found["means"]
        except FileNotFoundError:
            pass
        except (ValueError, KeyError, AttributeError) as e:  # damaged: made again
            logger.warning("%s cannot be used (%s); computing the class means again", path, e)
        return None

    # rank 0 decides for all: ranks that decided apart (a file one machine sees and
    # another does not yet) would enter other collectives, and wait for ever
    means = kept() if ranks.lead else None
    if ranks.share(lambda: means is not None):
        if means is None and (means := kept()) is None:  # this rank's: checked again
            raise ValueError(
                f"{path}: rank 0 found the class means of these weights there, this "
                "process other ones or none (is the run folder the same on every machine, "
                "and was no other evaluation writing it?)"
            )
        return means
    with bench.autocast():
        sums, counts = embedding_class_sums(
            lambda images: backbone(normalize_images(images)),
            dm.embedding_dataloader(*ranks.shard),
            dm.num_classes,
            cfg.model.embedding_dim,
            device=bench.device,
            progress=ranks.lead,
        )
    ranks.share_bad_images(dm)
    means = finalize_class_means(ranks.sum(sums), ranks.sum(counts))
    if not ranks.lead:
        return means
    try:
        atomic_torch_save({"key": key, "means": means.cpu()}, path)
    except OSError as e:
        logger.warning("could not keep the class means in %s: %s", path, e)
    return means


def top_m_sweep(clusters: int, top_m: int) -> list[int]:
    """The top_m values the sweep scores: 1, 2, 4, ... doubling up to K, with K and
    ``route.top_m``. A routed predictor at top_m scores top_m clusters' members per test
    face and runs top_m sub-nets per timed face, so every value from 1 to K would cost
    K(K+1)/2 clusters' worth (2,080 at K = 64); doubling costs under 2K (127 at K = 64),
    plus ``route.top_m`` when it is not a power of two."""
    values = {clusters, min(top_m, clusters)}
    m = 1
    while m < clusters:
        values.add(m)
        m *= 2
    return sorted(values)


def _evaluate_two_stage(
    run: RunFolder, cfg: Config, ranks: Ranks, stamp: dict[str, Any]
) -> RunEvaluation:
    with ranks.alike():  # the run's files and data, which every rank reads
        weights = run.stage1_weights()  # read once: the router's backbone, the stage-1 head
        ident = TwoStageIdentifier.from_run(run, stage1=weights, cfg=cfg)  # cfg: its route
        bench = Bench(cfg, run.path.name, ident.assignment, ranks)
        run.check_data(bench.dm)
    ident.to(bench.device)

    def calibrated() -> dict[str, Any]:
        # fp32, as export fits it: calibration.json serves every later evaluation and
        # export of the run, so it must not depend on which of them fitted it first
        calibrate_run(ident, run, cfg, bench.dm)
        return dict(ident.route_config)

    ident.route_config.update(ranks.share(calibrated))  # fitted once, by rank 0
    means = ident.assignment.class_means
    # its rows embed with the router's backbone: one forward a test face for them all
    stage1 = StageOneModel(ident.router_backbone, weights.head, means, embed=ident.embed)
    stage1.to(bench.device)
    predictors = ident.predictors(cfg.route.top_m, cfg.route.alpha) + stage1.predictors()
    # the sweeps: their decision-unit work per face (no network forward: the one pass
    # below) and their timing (docs/EVALUATION.md); eval.sweeps=false leaves them out
    ms = top_m_sweep(ident.num_clusters, cfg.route.top_m) if cfg.eval.sweeps else []
    alphas = ALPHAS if cfg.eval.sweeps else ()
    sweep = [ident.routed(m, cfg.route.alpha) for m in ms]
    if ident.route_config["decision"] == "linear":
        weight_key = "alpha"
        weighted = [ident.routed(cfg.route.top_m, alpha) for alpha in alphas]
    else:  # the generalist's weight, each row with the fitted temperatures
        weight_key = "generalist_weight"
        weighted = [
            ident.routed(cfg.route.top_m, 0.0, f"generalist weight {w:g}", generalist_weight=w)
            for w in alphas
        ]
    # the table's predictors and the sweep's other top_m timed in one interleaved
    # session: timed apart, a drift of this machine's speed between the two bent the
    # sweep's curve (a review's smoke run: 224, 400 and 585 img/s at top_m 1, 2 and 3);
    # the run's own top_m is one predictor, with one figure in the table and top_m.png
    names = {p.name for p in predictors}
    timings = bench.timings(predictors + [p for p in sweep if p.name not in names])
    # every predictor in one pass over the test split, each network embedding each batch
    # once: the sweeps then cost no sub-net forward beyond ISM's K a face (about 3K apart)
    bench.score_all(
        predictors + sweep + weighted,
        open_set=[p.name for p in predictors],
        models=[ident],  # stage1 embeds through it
    )
    rows = bench.rows(predictors, bench.verification(ident.router_backbone), timings)
    report = RunEvaluation(run.path, cfg.method, rows, cfg.eval.batch_size)
    report.decision = {k: ident.route_config.get(k) for k in DECISION_KEYS}
    for m, routed in zip(ms, sweep, strict=True):
        scores = bench.score(routed, open_set=False)
        rate = timings[routed.name][0].rate(cfg.eval.batch_size)
        report.top_m_sweep.append(
            {
                "top_m": m,
                "top1": scores["top1"],
                "throughput": rate,
                "routing_accuracy": scores["routing_accuracy"],
            }
        )
    for weight, routed in zip(alphas, weighted, strict=True):
        scores = bench.score(routed, open_set=False)
        report.alpha_sweep.append({weight_key: weight, "top1": scores["top1"]})
    if not ranks.lead:  # rank 0 writes
        return report
    _check_unchanged(run, stamp)  # before the plots and the tables are written
    if not cfg.eval.sweeps:  # an earlier evaluation's would contradict results.json
        for kind in ("top_m", "alpha"):
            run.eval_file(kind).unlink(missing_ok=True)
    if cfg.eval.plots:
        run.eval_dir.mkdir(exist_ok=True)
        if cfg.eval.sweeps:
            report.plots += [
                top_m_plot(run.eval_file("top_m"), run.path.name, report.top_m_sweep),
                alpha_plot(run.eval_file("alpha"), run.path.name, report.alpha_sweep),
            ]
        report.plots.append(
            class_means_plot(run.eval_file("class_means"), ident.assignment, cfg.seed)
        )
    return report


# --------------------------------------------------------------------------- output


_HEADER = "run|model|top-1|top-5|macro P|macro R|macro F1|routing acc|sub-net fwd/img|img/s @256"
COLUMNS = (*_HEADER.split("|"), "ms @1", "params")


def _keys(rows: list[Row], field: str) -> list[str]:
    """The keys of a dict field (``fnir``, ``verification``) over the rows, in order:
    a column each (none when no row has it)."""
    return list(dict.fromkeys(key for row in rows for key in getattr(row, field)))


def _cells(row: Row, fnir_columns: list[str] = (), verification: list[str] = ()) -> list[str]:
    routing = "" if row.routing_accuracy is None else f"{row.routing_accuracy:.2%}"
    fnir = [row.fnir.get(key, "") for key in fnir_columns]  # "": a closed-set run
    verified = [(row.verification.get(key), row.verification_std.get(key)) for key in verification]
    return [
        row.run,
        row.model,
        f"{row.top1:.2%}",
        "" if row.top5 is None else f"{row.top5:.2%}",
        f"{row.precision:.2%}",
        f"{row.recall:.2%}",
        f"{row.f1:.2%}",
        routing,
        *("n/a" if v is None else v if v == "" else f"{v:.2%}" for v in fnir),
        *(_verified(value, std) for value, std in verified),
        f"{row.subnet_forwards:g}",
        f"{row.throughput:.0f}"
        + ("" if row.throughput_spread is None else f" ±{row.throughput_spread:.0%}"),
        f"{row.latency_ms:.1f}",
        f"{row.params / 1e6:.2f}M",
    ]


def _verified(accuracy: float | None, std: float | None) -> str:
    """A verification cell: the mean ± std of the 10 folds (the std alone absent: a Row
    built without one)."""
    if accuracy is None:
        return ""
    return f"{accuracy:.2%}" + ("" if std is None else f" ±{std:.2%}")


def _header(rows: list[Row], batch_size: int | str) -> list[str]:
    header = [c.replace("@256", f"@{batch_size}") for c in COLUMNS]
    at = header.index("routing acc") + 1
    extra = [f"FNIR@FPIR={key}" for key in _keys(rows, "fnir")]
    extra += [f"{name} verif." for name in _keys(rows, "verification")]
    return header[:at] + extra + header[at:]


def format_table(rows: list[Row], batch_size: int | str = 256) -> str:
    """Rows as a markdown table (open-set runs add FNIR@FPIR columns; n/a: too few
    unseen test faces to measure that FPIR)."""
    columns, verification = _keys(rows, "fnir"), _keys(rows, "verification")
    return markdown_table(
        _header(rows, batch_size), [_cells(r, columns, verification) for r in rows]
    )


def _flat(row: Row) -> dict[str, Any]:
    """A row as CSV fields: ``fnir@fpir=<rate>`` and ``<set>_verification`` fields."""
    fields = asdict(row)
    fnir, verification = fields.pop("fnir"), fields.pop("verification")
    std = fields.pop("verification_std")
    return {
        **fields,
        **{f"fnir@fpir={k}": v for k, v in fnir.items()},
        **{f"{k}_verification": v for k, v in verification.items()},
        **{f"{k}_verification_std": v for k, v in std.items()},
    }


def _scalars(rows: list[Row]) -> dict[str, float]:
    """Each row's top-1, top-5, macro F1, routing accuracy and images/s as numbers, keyed
    ``eval/<row>/<figure>`` (the row's model, lowercased, non-alphanumerics as ``_``):
    W&B's runs table compares runs by scalars (its table of strings shows one run)."""
    found: dict[str, float] = {}
    for row in rows:
        name = re.sub(r"[^a-z0-9]+", "_", row.model.lower()).strip("_")
        figures = {
            "top1": row.top1,
            "top5": row.top5,
            "macro_f1": row.f1,
            "routing_accuracy": row.routing_accuracy,
            "images_per_s": row.throughput,
        }
        found.update({f"eval/{name}/{k}": v for k, v in figures.items() if v is not None})
    return found


def _write(
    report: RunEvaluation, run: RunFolder, cfg: Config, overrides: list[str], ranks: Ranks
) -> RunEvaluation:
    run.eval_dir.mkdir(exist_ok=True)
    flat = [_flat(r) for r in report.rows]
    summary = {
        "rows": [asdict(r) for r in report.rows],
        "top_m_sweep": report.top_m_sweep,
        "alpha_sweep": report.alpha_sweep,
        "decision": report.decision,
        "batch_size": cfg.eval.batch_size,
        # what made these numbers: a table is only comparable with one of the same code,
        # overrides and machine (bench/results.py evaluates again when the first two
        # differ); a single model's leave out route.*, which it has no router to act on
        # (given for the two-stage runs beside it in one table)
        "overrides": overrides if cfg.two_stage else [o for o in overrides if not _routes(o)],
        # the scores' passes split over this many processes (the timings: rank 0's alone)
        "processes": ranks.world,
        **provenance(eval_device(cfg)),
    }
    # all three or none (a full disk, a kill): each through a temporary file, replaced
    # together when the block ends, results.json (what bench/results.py reads) last
    with replacing_together(*(run.eval_file(kind) for kind in ("table", "csv", "json"))) as temps:
        table, table_csv, table_json = temps
        # UTF-8 whatever the locale, as identify's CSV (run names of any script)
        table.write_text(format_table(report.rows, cfg.eval.batch_size) + "\n", "utf-8")
        with open(table_csv, "w", newline="", encoding="utf-8") as f:
            # every row's fields: the ISM row has no verification fields
            writer = csv.DictWriter(f, fieldnames=list(dict.fromkeys(k for r in flat for k in r)))
            writer.writeheader()
            writer.writerows(flat)
        table_json.write_text(json.dumps(summary, indent=2))
    if cfg.logger == "wandb":
        import wandb

        with wandb_run(cfg, run.path, run.run_id) as wb:
            logs: dict[str, Any] = {
                "eval/results": wandb.Table(
                    columns=_header(report.rows, cfg.eval.batch_size),
                    data=[
                        _cells(r, _keys(report.rows, "fnir"), _keys(report.rows, "verification"))
                        for r in report.rows
                    ],
                )
            }
            logs.update({f"eval/{p.stem}": wandb.Image(str(p)) for p in report.plots})
            logs.update(_scalars(report.rows))
            wb.log(logs)
    return report


def evaluate_runs(
    run_dirs: list[str | Path],
    overrides: list[str] | tuple = (),
    ranks: Ranks = Ranks(),  # noqa: B008 (frozen: one process)
) -> str:
    """Evaluate several runs; returns one markdown table of all their rows (on every
    rank of ``ranks``, which evaluate each run together; rank 0 writes).

    Every run is checked (a run folder, finished, the overrides allowed and servable by
    its identities, its weights files whole, W&B) before the first is evaluated, each
    once: a typo in the last ``run=`` was found only after the others' evaluations
    (minutes each), and the table was never printed."""
    with ranks.alike():
        folders = [run_folder(r) for r in run_dirs]
        configs = [_checked_config(folder, overrides, ranks) for folder in folders]
        _check_routed(configs, folders, overrides)
        for folder, cfg in zip(folders, configs, strict=True):
            folder.check_weights(cfg.two_stage)
    _warn_other_faces(folders)
    reports = [
        _evaluate(folder, cfg, overrides, ranks)
        for folder, cfg in zip(folders, configs, strict=True)
    ]
    rows = [row for rep in reports for row in rep.rows]
    sizes = {rep.batch_size for rep in reports}
    if len(sizes) == 1:
        return format_table(rows, reports[0].batch_size)
    # runs timed at other batch sizes (their own eval.batch_size): each row says its own
    rows = [
        replace(row, model=f"{row.model} (img/s @{rep.batch_size})")
        for rep in reports
        for row in rep.rows
    ]
    return format_table(rows, "batch")
