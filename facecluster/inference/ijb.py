"""IJB-B / IJB-C 1:1 verification: TAR at FAR, as arcface_torch's ``eval_ijbc.py``.

Its default test mode (N1 D1 F2), step by step:

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


@dataclass
class IJBResult:
    target: str
    faces: int
    templates: int
    genuine: int
    """Pairs of one person."""
    impostor: int
    """Pairs of two people."""
    rows: list[dict[str, float]] = field(default_factory=list)
    """:func:`tar_at_far`'s, one per FAR."""


def evaluate_ijb(
    embed: Callable[[Tensor], Tensor],
    protocol: IJBSet,
    image_size: int,
    batch_size: int = 128,
    workers: int = 0,
    device: torch.device | str = "cpu",
    fars: tuple[float, ...] = FARS,
) -> tuple[IJBResult, np.ndarray]:
    """The protocol above with ``embed`` (normalised images -> embeddings): the result
    and every pair's score (in the pairs list's order)."""
    features = face_features(embed, protocol, image_size, batch_size, workers, device)
    templates, ids = template_features(
        features, protocol.scores, protocol.templates, protocol.medias
    )
    scores = pair_scores(templates, ids, protocol.pairs)
    result = IJBResult(
        protocol.target,
        len(protocol.images),
        len(ids),
        int(protocol.labels.sum()),
        int((~protocol.labels).sum()),
        tar_at_far(protocol.labels, scores, fars),
    )
    return result, scores
