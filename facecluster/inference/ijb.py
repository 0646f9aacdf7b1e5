"""IJB-B / IJB-C 1:1 verification (TAR at FAR, as arcface_torch's ``eval_ijbc.py``)
and 1:N identification (rank-k and TPIR at FPIR, as InsightFace's ``IJB_evals.py``).

Their default test mode (N1 D1 F2), step by step:

1. each face (aligned, :mod:`facecluster.data.ijb`) is embedded with its mirror image
   and the two embeddings added (F2), not normalised (N1: the norm stays, a weight
   that is low for a poor face), and scaled by its detector score (D1);
2. a template's faces of one media (the frames of a video, or one photo) are averaged,
   and its medias' averages added; each template's sum is L2-normalised;
3. a pair's score is the cosine of its two templates;
4. the ROC is scikit-learn's ``roc_curve(labels, scores)`` (its default
   ``drop_intermediate=True``: points inside a straight run of the curve are dropped),
   and the TAR reported at a FAR ``x`` is that of the curve's point whose FAR is
   nearest to ``x`` (the lower threshold among equals), which may lie a little above
   ``x``: each result also gives the FAR of the point taken (``far_reached``).

1:N (:func:`search`) shares steps 1 and 2: each probe template is searched in each of
the two galleries (G1 and G2; IJB-B's S1 and S2, of different subjects) by cosine.
A probe whose subject is in the gallery is mated there, else non-mated. Rank-k: the
share of mated probes whose gallery template is among the k most similar; a tie with
another template counts against it. TPIR at an FPIR ``x``: the threshold is the
``ceil(x * n)``-th highest of the ``n`` non-mated probes' best scores, and a mated
probe counts when its gallery template is first and scores above that threshold
(strictly: ``ceil(x * n) - 1`` non-mated probes pass it). Each gallery has its row;
the mean row's rank-k pools the two galleries' mated probes, its TPIR is the mean
of the two, as ``IJB_evals.py``'s.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, field

import numpy as np
import torch
import torch.nn.functional as F
from torch import Tensor
from tqdm import tqdm

from facecluster.data.datamodule import FaceDataLoader, worker_kwargs
from facecluster.data.ijb import IJBFaces, IJBSet
from facecluster.data.transforms import normalize_images

FARS = (1e-6, 1e-5, 1e-4, 1e-3, 1e-2, 1e-1)
"""The FARs of arcface_torch's table."""

FPIRS = tuple(float(10**x) for x in np.arange(-4, 0, 4 / 100)[::25])
"""The FPIRs of the 1:N table: ``IJB_evals.py``'s 1e-4, 1e-3, 1e-2 and 1e-1, the values
it computes them as (``10 ** np.arange(-4, 0, 0.04)``: 0.001000000000000002 and so on),
which pick another threshold where the non-mated probes times the FPIR is a whole
number (1,000 probes at 1e-2: the 11th highest score, not the 10th)."""

RANKS = (1, 5, 10)


@torch.inference_mode()
def face_features(
    embed: Callable[[Tensor], Tensor],
    protocol: IJBSet,
    image_size: int,
    batch_size: int = 128,
    workers: int = 0,
    device: torch.device | str = "cpu",
) -> np.ndarray:
    """``float32[N, d]``: each face's embedding plus its mirror image's (step 1, F2)."""
    # the training loaders' workers: a Ctrl-C while they start is not dropped
    loader = FaceDataLoader(
        IJBFaces(protocol, image_size),
        batch_size=batch_size,
        num_workers=workers,
        pin_memory=torch.device(device).type == "cuda",
        **worker_kwargs(workers),
    )
    out = []
    try:
        for images in tqdm(loader, desc=f"{protocol.target} faces", unit="batch"):
            x = normalize_images(images.to(device, non_blocking=True))
            out.append((embed(x).float() + embed(x.flip(-1)).float()).cpu())
    except ValueError as e:  # an image that cannot be decoded, named: its line alone (a
        # worker's comes with the worker's traceback)
        said = str(e).strip().splitlines()[-1]
        raise ValueError(said.removeprefix("ValueError: ")) from None
    features = torch.cat(out).numpy()
    if not (finite := np.isfinite(features).all(axis=1)).all():  # a NaN table, silently
        first = protocol.image_dir / protocol.images[int(np.argmin(finite))]
        raise ValueError(
            f"the embeddings of {int((~finite).sum()):,} faces are not finite (NaN or inf), "
            f"the first {first}'s: the export's backbone holds weights that do not embed "
            "(a run that diverged?)"
        )
    return features


def template_features(
    features: np.ndarray, scores: np.ndarray, templates: np.ndarray, medias: np.ndarray
) -> tuple[np.ndarray, np.ndarray]:
    """``(float64[T, d] unit template features, int64[T] their template ids, sorted)``
    from the faces' ``features`` (steps 1 and 2: N1, D1, media averages, their sum)."""
    # float32 as eval_ijbc.py's averages (its faces' features are float32): a float64
    # copy of IJB-C's 469,375 x 512 features alone is 1.9 GB
    weighted = torch.from_numpy(features).float() * torch.from_numpy(scores).float()[:, None]
    keys, media_of = np.unique(np.stack([templates, medias], axis=1), axis=0, return_inverse=True)
    media_of = torch.from_numpy(media_of.reshape(-1))
    counts = torch.bincount(media_of, minlength=len(keys)).float()
    media_sums = torch.zeros(len(keys), features.shape[1])
    media_sums.index_add_(0, media_of, weighted)
    del weighted
    ids, template_of = np.unique(keys[:, 0], return_inverse=True)
    sums = torch.zeros(len(ids), features.shape[1])
    sums.index_add_(0, torch.from_numpy(template_of.reshape(-1)), media_sums / counts[:, None])
    # a zero sum stays zero, as sklearn's normalize leaves it
    return F.normalize(sums.double(), dim=1).numpy(), ids


def pair_scores(
    features: np.ndarray, ids: np.ndarray, pairs: np.ndarray, chunk: int = 100_000
) -> np.ndarray:
    """``float64[P]``: the cosine of each pair's two templates (step 3)."""
    rows = np.searchsorted(ids, pairs)
    out = np.empty(len(pairs))
    for start in range(0, len(pairs), chunk):
        a, b = rows[start : start + chunk].T
        out[start : start + chunk] = np.einsum("ij,ij->i", features[a], features[b])
    return out


def roc(labels: np.ndarray, scores: np.ndarray) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """``(fpr, tpr, thresholds)`` as scikit-learn's ``roc_curve(labels, scores)`` gives
    them (``drop_intermediate=True``), thresholds falling, the first ``inf``."""
    labels, scores = np.asarray(labels, bool), np.asarray(scores, np.float64)
    order = np.argsort(scores, kind="mergesort")[::-1]
    scores, labels = scores[order], labels[order]
    last = np.r_[np.flatnonzero(np.diff(scores)), len(scores) - 1]  # each value's last
    tps = np.cumsum(labels)[last]
    fps = 1 + last - tps
    thresholds = scores[last]
    if len(fps) > 2:  # drop the points inside a straight run
        keep = np.flatnonzero(np.r_[True, np.logical_or(np.diff(fps, 2), np.diff(tps, 2)), True])
        fps, tps, thresholds = fps[keep], tps[keep], thresholds[keep]
    fps, tps = np.r_[0, fps], np.r_[0, tps]
    thresholds = np.r_[np.inf, thresholds]
    return fps / fps[-1], tps / tps[-1], thresholds


def tar_at_far(
    labels: np.ndarray, scores: np.ndarray, fars: tuple[float, ...] = FARS
) -> list[dict[str, float]]:
    """For each FAR: the TAR of the ROC point whose FAR is nearest (step 4), that
    point's FAR and its threshold (None for the point above every score)."""
    fpr, tpr, thresholds = (a[::-1] for a in roc(labels, scores))
    out = []
    for far in fars:
        i = int(np.argmin(np.abs(fpr - far)))  # the first: the lower threshold
        out.append(
            {
                "far": far,
                "tar": float(tpr[i]),
                "far_reached": float(fpr[i]),
                # None: no threshold passes none (the point above every score), which
                # JSON cannot hold as infinity
                "threshold": float(thresholds[i]) if np.isfinite(thresholds[i]) else None,
            }
        )
    return out


def search(
    probes: np.ndarray,
    probe_subjects: np.ndarray,
    gallery: np.ndarray,
    gallery_subjects: np.ndarray,
    fpirs: tuple[float, ...] = FPIRS,
    ranks: tuple[int, ...] = RANKS,
    chunk: int = 4096,
) -> dict:
    """One gallery's 1:N search by unit ``probes`` (``[P, d]``) in unit ``gallery``
    templates (``[G, d]``, one per subject): the counts, the rank-k hits and, per FPIR,
    the TPIR, the FPIR reached and the threshold (the module's definitions)."""
    order = np.argsort(gallery_subjects)
    at = np.searchsorted(gallery_subjects[order], probe_subjects).clip(max=len(order) - 1)
    mate = np.where(gallery_subjects[order][at] == probe_subjects, order[at], -1)
    mated = mate >= 0
    rank = np.zeros(len(probes), dtype=np.int64)  # of the mate, ties against it
    mate_score = np.zeros(len(probes))
    best = np.zeros(len(probes))
    for start in range(0, len(probes), chunk):
        sims = probes[start : start + chunk] @ gallery.T
        found = np.flatnonzero(mated[start : start + chunk])
        own = sims[found, mate[start + found]]
        mate_score[start + found] = own
        rank[start + found] = (sims[found] >= own[:, None]).sum(axis=1)
        best[start : start + chunk] = sims.max(axis=1)
    first = rank[mated] == 1
    nonmated = np.sort(best[~mated])[::-1]
    rows = []
    for fpir in fpirs:
        # IJB_evals.py's index (its FPIRS values, see above)
        threshold = nonmated[max(int(np.ceil(len(nonmated) * fpir)), 1) - 1]
        rows.append(
            {
                "fpir": fpir,
                "tpir": float((first & (mate_score[mated] > threshold)).mean()),
                "fpir_reached": float((nonmated > threshold).mean()),
                "threshold": float(threshold),
            }
        )
    return {
        "templates": len(gallery),
        "mated": int(mated.sum()),
        "nonmated": len(nonmated),
        "hits": [int((rank[mated] <= k).sum()) for k in ranks],
        "rows": rows,
    }


@dataclass
class Verification:
    """1:1: the counts and :func:`tar_at_far`'s rows, one per FAR."""

    templates: int
    genuine: int
    """Pairs of one person."""
    impostor: int
    """Pairs of two people."""
    rows: list[dict[str, float]] = field(default_factory=list)


@dataclass
class Identification:
    """1:N: each gallery's :func:`search` (its ``name`` and its ``rank_rates``, the hits
    over its mated probes, added) and the mean of the two."""

    probes: int
    ranks: list[int]
    galleries: list[dict] = field(default_factory=list)
    mean: dict = field(default_factory=dict)
    """``rank_rates`` over both galleries' mated probes; ``tpir``, one per FPIR, the
    galleries' mean."""


@dataclass
class IJBResult:
    target: str
    faces: int
    verification: Verification | None = None
    identification: Identification | None = None


def identification(
    features: np.ndarray,
    ids: np.ndarray,
    protocol: IJBSet,
    fpirs: tuple[float, ...] = FPIRS,
    ranks: tuple[int, ...] = RANKS,
) -> Identification:
    """The 1:N protocol on the unit template ``features`` (rows of template ``ids``)."""
    probes = protocol.probes
    probe_features = features[np.searchsorted(ids, probes.templates)]
    galleries = []
    for gallery in protocol.galleries:
        found = search(
            probe_features,
            probes.subjects,
            features[np.searchsorted(ids, gallery.templates)],
            gallery.subjects,
            fpirs,
            ranks,
        )
        rates = [h / found["mated"] for h in found["hits"]]
        galleries.append({"name": gallery.name, **found, "rank_rates": rates})
    mated = sum(g["mated"] for g in galleries)
    mean = {
        "rank_rates": [sum(g["hits"][i] for g in galleries) / mated for i in range(len(ranks))],
        "tpir": [
            float(np.mean([g["rows"][i]["tpir"] for g in galleries])) for i in range(len(fpirs))
        ],
    }
    return Identification(len(probes.templates), list(ranks), galleries, mean)


def evaluate_ijb(
    embed: Callable[[Tensor], Tensor],
    protocol: IJBSet,
    image_size: int,
    batch_size: int = 128,
    workers: int = 0,
    device: torch.device | str = "cpu",
    fars: tuple[float, ...] = FARS,
    fpirs: tuple[float, ...] = FPIRS,
) -> tuple[IJBResult, np.ndarray | None]:
    """The protocols ``protocol`` holds (1:1, 1:N or both; the faces embedded once) with
    ``embed`` (normalised images -> embeddings): the result and every 1:1 pair's score
    (in the pairs list's order; None without 1:1)."""
    features = face_features(embed, protocol, image_size, batch_size, workers, device)
    templates, ids = template_features(
        features, protocol.scores, protocol.templates, protocol.medias
    )
    result = IJBResult(protocol.target, len(protocol.images))
    scores = None
    if protocol.pairs is not None:
        scores = pair_scores(templates, ids, protocol.pairs)
        result.verification = Verification(
            len(np.unique(protocol.pairs)),
            int(protocol.labels.sum()),
            int((~protocol.labels).sum()),
            tar_at_far(protocol.labels, scores, fars),
        )
    if protocol.probes is not None:
        result.identification = identification(templates, ids, protocol, fpirs)
    return result, scores
