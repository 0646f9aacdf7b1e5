"""TwoStageIdentifier: who is this face? (Ahmadi & Dianat, JSDP 2024, test time).

A face's stage-1 embedding goes to the router (the best class mean of each cluster),
which picks the ``top_m`` best clusters; only those clusters' sub-nets run, and
the decision unit (:mod:`facecluster.inference.decision`: a mixture of experts by
default) combines each sub-net's answer with the class-mean similarities into one
predicted identity. With ``all_subnets=True`` every sub-net answers on its own and
the best score wins, with no router and no class means: the paper's ISM baseline.

With ``model.shared_layers`` > 0 the sub-nets' first stages are the stage-1
backbone's, frozen: that trunk runs once per face, then the router's tail and each
candidate sub-net's tail run on its output.

Batched: the images of a batch are grouped by routed cluster, so each sub-net runs
once per batch on exactly the images routed to it; there is no per-image loop.

``from_run`` loads a finished run folder (through :class:`facecluster.run.RunFolder`);
``export`` writes one self-contained file (weights, class means, assignment, names)
that ``load`` reads back with plain torch and the component registry: no Trainer,
no training code. ``predictors`` lists what evaluation scores: routed inference
and all sub-nets (ISM).
"""

from __future__ import annotations

import contextlib
import logging
import math
from collections.abc import Callable, Iterable, Mapping, Sequence
from dataclasses import asdict, dataclass, replace
from functools import partial
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np
import torch
import torch.nn.functional as F
from torch import Tensor, nn

import facecluster
from facecluster.clustering import ClusterAssignment
from facecluster.config import (
    FITTED_ROUTE,
    NAME_RULE,
    ConfigError,
    RouteConfig,
    name_problem,
    newer_format,
    route_problems,
    same_name,
)
from facecluster.inference.decision import (
    Calibration,
    MoeParams,
    evidence,
    fuse,
    keep_top,
    moe_scores,
    similarity,
    sum_shared,
)
from facecluster.inference.predictors import BatchMemo, Predictor, count_parameters
from facecluster.inference.router import NO_CLUSTER, Router, has_direction
from facecluster.io import (
    atomic_torch_save,
    load_plain,
    non_finite_keys,
    shown_list,
    shown_value,
)
from facecluster.models.components import BACKBONES, load_backbone, shareable_stages

if TYPE_CHECKING:
    from facecluster.config import Config
    from facecluster.run import RunFolder, StageWeights

logger = logging.getLogger(__name__)

UNKNOWN = -1
"""The answer for a face whose best candidate's similarity is below the open-set threshold."""
FAILED = -2
"""The answer for a face that got no candidate: its embedding had no direction
(``Identification.failed``)."""
OPEN_SET_SCORE = "similarity"
"""What an export's unknown threshold compares (``Identification.similarity``). Exports
without this mark chose it on the decision score, a log-probability under moe."""

ENROLL_ROUTE_BATCH = 16
"""People :meth:`TwoStageIdentifier.enroll` routes at once (their images held until
then): the router scans every class mean per call, 4 GB at 2M x 512 (computed)."""

EXPORT_FORMAT = "facecluster.two_stage_identifier"
EXPORT_VERSION = 4
"""Version 2: the backbone is described by ``create_backbone``'s keyword arguments.
Version 3 (the same layout): an open-set threshold compares the answer's similarity
(``open_set["score"] == "similarity"``), so that a reader of version 2, which compared
``moe`` log-probabilities, refuses the file instead of misreading the threshold.
Version 4: ``class_names`` is :func:`pack_names`' two tensors, not a list of str (a
reader of version 3 would take the dict's two keys for the names)."""
INDEX_SETTINGS = (
    ("index", "flat"),
    ("ivf_nlist", None),
    ("ivf_nprobe", 16),
    ("ivf_codes", "flat"),
    ("lists_per_cluster", 1),
    ("hnsw_m", 32),
    ("hnsw_ef_search", 256),
)
"""The route settings a router index is built with, and their defaults (older exports
lack some): an export's saved index serves a load with the same ones."""
ROUTER_PARTS = "router_parts"
"""An export's key (``gallery.npz``: prefix) for the plain arrays of its router index
(:func:`~facecluster.inference.router.index_parts`). Exports before 2026-12-06 kept
faiss's serialised bytes under ``router_index``: not read (:func:`older_index_note`)."""


@dataclass
class Identification:
    """Result of ``TwoStageIdentifier.identify`` for a batch of B faces."""

    candidates: Tensor
    """[B, k] the best k global identity ids, best first."""
    candidate_scores: Tensor
    """[B, k] their decision scores (``-inf`` where fewer than k identities were searched;
    log-probabilities with ``route.decision=moe``)."""
    clusters: Tensor
    """[B, m] candidate clusters, best first (all K for ISM)."""
    subnet_forwards: int
    """Images passed through sub-nets (B * m when every candidate ran a sub-net)."""
    candidate_similarities: Tensor
    """[B, k] how close the face is to each candidate, in cosine units: what an open-set
    threshold compares (``moe``: :func:`~facecluster.inference.decision.evidence`;
    ``linear``: the fused score itself)."""
    candidate_clusters: Tensor
    """[B, k] the cluster whose sub-net (or class means) scored each candidate: with
    ``clustering.overlap`` an identity's second cluster may be the one (under ``moe``,
    which sums the two clusters' probabilities, the one that gave the larger share; -1
    where empty)."""
    failed: Tensor
    """[B] faces whose stage-1 embedding, or a searched sub-net's, had no direction (NaN,
    inf or zero: networks whose weights went non-finite, or an input they cannot embed).
    Nothing was compared: their lists are empty (every candidate the id past the last
    identity, scores and similarities ``-inf``, clusters -1; their ``clusters`` row -1 when
    routed) and :meth:`answer` gives :data:`FAILED`."""

    @property
    def identity(self) -> Tensor:
        """[B] predicted global identity ids (a failed face's: the id past the last)."""
        return self.candidates[:, 0]

    @property
    def score(self) -> Tensor:
        """[B] decision score of the prediction (``moe``: its log-probability)."""
        return self.candidate_scores[:, 0]

    @property
    def similarity(self) -> Tensor:
        """[B] the prediction's similarity (``candidate_similarities``)."""
        return self.candidate_similarities[:, 0]

    def answer(self, threshold: float | None) -> Tensor:
        """[B] the predicted identity, or :data:`UNKNOWN` (-1) where its similarity is
        below ``threshold`` (open set; None: always the identity); :data:`FAILED` (-2)
        for a :attr:`failed` face, whatever the threshold."""
        answer = self.identity
        if threshold is not None:
            known = self.similarity >= threshold
            answer = answer.where(known, torch.full_like(answer, UNKNOWN))
        return answer.masked_fill(self.failed, FAILED)


def _check_readable(name: str) -> None:
    """ValueError for an identity name that :func:`name_problem` refuses: a blank name
    answered faces with nothing to read, a line break split the printed table's row (a
    walkthrough)."""
    if why := name_problem(name):
        raise ValueError(f"{name!r}: an identity name that {why}: {NAME_RULE}; rename its folder")


class TwoStageIdentifier(nn.Module):
    """Router + sub-nets + decision unit, for inference.

    Args:
        backbone: keyword arguments of ``create_backbone`` (every backbone's recipe).
        router_backbone: the stage-1 backbone (embeds faces for routing).
        subnets: K sub-net backbones.
        head_weights: K tensors [size_k, d], each sub-net's head rows; one more row,
            last, is its "not mine" class (``stage2.negatives``).
        assignment: the run's ClusterAssignment (class means, clusters).
        class_names: identity names, index = global id.
        route: the ``route`` config section as a dict (top_m, decision and its numbers,
            index settings).
        shared_layers: the sub-nets' first stages that are the router backbone's own
            (``model.shared_layers``; checked here).
        router_index: the parts of the router's faiss index as saved by :meth:`export`
            (:meth:`Router.saved_parts`), for these class means and ``route``'s index
            settings; None: built here.
    """

    def __init__(
        self,
        backbone: dict[str, Any],
        router_backbone: nn.Module,
        subnets: list[nn.Module],
        head_weights: list[Tensor],
        assignment: ClusterAssignment,
        class_names: list[str],
        route: dict[str, Any],
        shared_layers: int = 0,
        router_index: dict[str, np.ndarray] | None = None,
    ) -> None:
        super().__init__()
        self.backbone_args = checked_backbone(backbone)
        self.route_config = checked_route(route)
        self.router_backbone = router_backbone
        self.shared_layers = shared_layers
        if shared_layers:
            _check_shared(router_backbone, subnets, shared_layers)
            _tie_trunks(router_backbone, subnets, shared_layers)
        self.subnets = nn.ModuleList(subnets)
        networks = _network_weights(router_backbone.state_dict(), [s.state_dict() for s in subnets])
        check_parts(assignment, len(class_names), len(subnets), head_weights, networks)
        sizes = assignment.cluster_sizes().tolist()
        for k, weight in enumerate(head_weights):
            rows = weight.detach().float()
            # an export's rows are unit already: normalised again at every load, their
            # last bits would drift with each save and load (an enrolment's)
            if not bool((torch.linalg.vector_norm(rows, dim=1) - 1).abs().le(1e-6).all()):
                rows = F.normalize(rows, dim=1)
            members = sizes[k]
            self.register_buffer(f"head{k}", rows[:members])
            self.register_buffer(f"not_mine{k}", rows[members:])  # [0 or 1, d]
        self.register_buffer("class_to_cluster", assignment.class_to_cluster.long())
        for k, members in enumerate(assignment.all_members()):
            self.register_buffer(f"members{k}", members)
        self.assignment = assignment
        self.class_names = list(class_names)
        self.open_set: dict[str, float] | None = None
        """``{"threshold", "fpir", "probes"}``: answer unknown below ``threshold``,
        chosen on ``probes`` unseen faces for that FPIR (set by the export)."""
        self.imports: list[str] = []
        """The run's ``imports`` (the modules that registered a backbone of the user's
        own), kept in the export so that a load without them can name them."""
        self.export_id: str | None = None
        """Which export this is (set by the export, kept by enrolment): its
        ``identifier.pt`` and ``onnx/`` hold the same one (``load_export`` checks)."""
        self.router = self._build_router(router_index)
        self._set_means()
        self._memo = BatchMemo()  # embeddings_once
        self.eval()

    def index_settings(self) -> dict[str, Any]:
        """The route settings the router's index is built with (:data:`INDEX_SETTINGS`)."""
        return {key: self.route_config.get(key, default) for key, default in INDEX_SETTINGS}

    def _build_router(self, prebuilt: dict[str, np.ndarray] | None = None) -> Router:
        return Router(
            self.assignment.class_means,
            self.assignment.class_to_cluster,
            self.assignment.centroids,
            neighbours=self.route_config["neighbours"],
            prebuilt=prebuilt,
            **self.index_settings(),  # older exports lack some: their defaults
        )

    def _set_means(self) -> None:
        """The buffer ``grouped_means``: each cluster's class means in ``members(k)``
        order, one block after another (:meth:`means` slices it), so that the decision
        unit's similarities to a candidate cluster are one matrix product (gathering its
        rows at each call took 91-123 ms at 1M x 512, K=8, against 10-61 ms for the
        product, batch 1 and 64, one-off measurement). Under the flat router and without
        ``clustering.overlap`` it is the router's own blocks while both are on the CPU:
        no copy; otherwise a copy (C x d more, 4 GB at 2M x 512, computed). Not saved in
        ``state_dict`` (it is the assignment's)."""
        members = [self.members(k).cpu() for k in range(self.num_clusters)]
        # the flat router's blocks are in the same order unless overlap adds members
        self._router_order = self.router.kind == "flat" and not len(self.assignment.overlap)
        if self._router_order:
            grouped = self.router.grouped
        else:
            grouped = self.assignment.class_means[torch.cat(members)].float()
        self.register_buffer("grouped_means", grouped.to(self.device), persistent=False)
        if self._router_order:  # on a GPU the router's CPU blocks go: one C x d copy less
            self.router.grouped = self.grouped_means
        self._means_bounds = [0, *np.cumsum([len(m) for m in members]).tolist()]

    def _apply(self, fn: Callable[..., Any], recurse: bool = True) -> TwoStageIdentifier:
        """``to``, ``cuda``, ``float`` and the like, and the flat router's blocks follow
        :attr:`grouped_means` where they are the same (fp32): left behind, the router
        kept its own C x d copy on the CPU beside the moved one (4 GB at 2M x 512,
        computed) only for a shape check."""
        super()._apply(fn, recurse)
        if getattr(self, "_router_order", False):  # routing compares in float32
            means = self.grouped_means
            self.router.grouped = means if means.dtype == torch.float32 else means.float()
        return self

    def _route_blocks(self) -> Tensor | None:
        """The flat router's class-mean blocks where this identifier is (a GPU: the scan
        runs there), when they are :attr:`grouped_means` (no ``clustering.overlap``)."""
        same = self._router_order and self.grouped_means.dtype == torch.float32
        return self.grouped_means if same else None

    @property
    def device(self) -> torch.device:
        """Where the identifier's networks and buffers are."""
        return self.class_to_cluster.device

    @property
    def num_clusters(self) -> int:
        return len(self.subnets)

    def head(self, k: int) -> Tensor:
        return getattr(self, f"head{k}")

    def members(self, k: int) -> Tensor:
        return getattr(self, f"members{k}")

    def means(self, k: int) -> Tensor:
        """``[len(members(k)), d]`` the class means of cluster ``k``'s members, a view."""
        return self.grouped_means[self._means_bounds[k] : self._means_bounds[k + 1]]

    def head_rows(self, k: int) -> Tensor:
        """Sub-net ``k``'s head as trained: its identities' rows, then its "not mine"
        row when it has one (what export writes). The head itself without one: no
        copy of its rows (C x d in all, 4 GB at 2M x 512, computed)."""
        not_mine = getattr(self, f"not_mine{k}")
        return torch.cat([self.head(k), not_mine]) if len(not_mine) else self.head(k)

    def _subnet_cosine(self, k: int, embeddings: Tensor) -> tuple[Tensor, Tensor | None]:
        """Sub-net ``k``'s cosines to its identities ``[n, m]``, and to its "not mine"
        row ``[n, 1]`` (None without one)."""
        not_mine = getattr(self, f"not_mine{k}")
        other = similarity(embeddings, not_mine) if len(not_mine) else None
        return similarity(embeddings, self.head(k)), other

    @torch.no_grad()
    def embed(self, images: Tensor) -> Tensor:
        """L2-normalised stage-1 embeddings [B, d] (what the router compares) of a batch
        of face crops as :meth:`identify` takes them; from image files:
        ``normalize_images(load_faces(paths, backbone_args["image_size"]))``
        (``facecluster.data``). Within :meth:`embeddings_once`, the embeddings
        :meth:`identify` routes the batch by, computed once."""
        self._check_images(images)
        return self._router_embedding(images)

    def _router_embedding(self, images: Tensor) -> Tensor:
        """The router backbone's embeddings of ``images`` (under :meth:`embeddings_once`,
        of the whole batch once, as its trunk's output)."""
        features = self._memo.get(images, "trunk", partial(self._trunk, images))
        embed = partial(self._embed_from, self.router_backbone, features)
        return self._memo.get(images, "router", embed)

    def _trunk(self, images: Tensor) -> Tensor:
        """What every network's tail starts from: the shared trunk's output, or the images."""
        if not self.shared_layers:
            return images
        return self.router_backbone.trunk(images, self.shared_layers)

    def _embed_from(self, net: nn.Module, features: Tensor) -> Tensor:
        """L2-normalised embeddings of ``net`` from ``_trunk``'s output."""
        out = net.tail(features, self.shared_layers) if self.shared_layers else net(features)
        return F.normalize(out.float(), dim=1)

    def embeddings_once(self, images: Tensor) -> contextlib.AbstractContextManager:
        """Within the block, :meth:`identify` on ``images`` (this tensor) runs each
        network once on the whole batch and keeps its embeddings, whichever top_m,
        decision weight or ISM asks: for scoring many predictors on one batch (the
        evaluation's table and sweeps: K + 1 network forwards a face, where a pass each
        ran about 3K + 3 sub-net forwards and a router forward per routed predictor).
        A sub-net embeds every face of the batch the first
        time any face needs it, so this pays only where every sub-net runs anyway (ISM
        does); deployment does not use it. The embeddings equal a lone call's up to
        float rounding (a batch of another size may take other kernels)."""
        return self._memo.batch(images)

    def _subnet_embeddings(self, c: int, images: Tensor, features: Tensor, rows: Tensor) -> Tensor:
        """Sub-net ``c``'s embeddings of the batch's faces ``rows``: of those alone, or
        under :meth:`embeddings_once` of the whole batch once, then indexed."""
        net = self.subnets[c]
        if self._memo.kept(images) is None:
            return self._embed_from(net, features[rows])
        return self._memo.get(images, ("subnet", c), partial(self._embed_from, net, features))[rows]

    @property
    def moe(self) -> MoeParams | None:
        """The fitted numbers of ``route.decision=moe`` (None until calibrated)."""
        values = [self.route_config.get(n) for n in FITTED_ROUTE]
        return None if any(v is None for v in values) else MoeParams(*values)

    @torch.no_grad()
    def calibrate(self, loader: Any, normalize: Any = None) -> MoeParams:
        """Fit ``route.decision=moe``'s temperatures and generalist weight on labelled
        faces (the validation split; see :class:`~facecluster.inference.decision.Calibration`)
        and keep them in ``route_config``. ``normalize`` maps a loader batch's images to
        network input (None: they are already)."""
        calibration = Calibration()
        device = self.device
        ids, _ = self.assignment.memberships()
        # each member's share of its router term: 1/2 for an identity in two clusters
        counts = torch.bincount(ids, minlength=self.assignment.num_classes).to(device)
        every = torch.arange(self.num_clusters)
        for images, labels in loader:
            keep = labels >= 0  # a face no readable one replaced (negative): not scored
            images, labels = images[keep].to(device), labels[keep].to(device)
            if not len(labels):
                continue
            images = normalize(images) if normalize is not None else images
            features = self._trunk(images)
            query = self._embed_from(self.router_backbone, features)
            # a face the stage-1 backbone embeds with no direction (NaN, inf, zero) is
            # routed nowhere (identify fails it): left out, counted, not fitted on
            seen = has_direction(query)
            if not bool(seen.all()):
                calibration.left_out += int((~seen).sum())
                features, query, labels = features[seen], query[seen], labels[seen]
                if not len(labels):
                    continue
            clusters = self.class_to_cluster[labels]
            log_mass, fitted = [], torch.ones(len(labels), dtype=torch.bool)
            # one cluster's [n, members] similarities at a time, never [n, C] (computed: 2.1 GB for
            # a batch of 256 at 2M identities)
            for k in range(self.num_clusters):
                members = self.members(k)
                sims = similarity(query, self.means(k))
                log_mass.append(calibration.cluster_log_mass(sims, counts[members].reciprocal()))
                rows = (clusters == k).nonzero().squeeze(1)
                if not len(rows):
                    continue
                embedded = self._embed_from(self.subnets[k], features[rows])
                fine = has_direction(embedded)  # the sub-net's own NaN: that face fails
                if not bool(fine.all()):  # (its router terms are left out too, below)
                    calibration.left_out += int((~fine).sum())
                    fitted[rows[~fine].cpu()] = False
                    rows, embedded = rows[fine], embedded[fine]
                    if not len(rows):
                        continue
                cosine, other = self._subnet_cosine(k, embedded)
                local = torch.searchsorted(members, labels[rows])
                calibration.update_within(cosine, sims[rows], local, other)
            right = self.assignment.contains(labels.cpu()[:, None], every)
            if bool(fitted.any()):
                kept = fitted.to(device)
                calibration.update_router(torch.stack(log_mass, dim=2)[:, kept], right[fitted])
        params = calibration.fit()
        if calibration.left_out:
            logger.warning(
                "%d validation face(s) embedded with no direction (NaN, inf or zero) were "
                "left out of the decision unit's fit, as identify fails them",
                calibration.left_out,
            )
        self.route_config.update(params.to_route())
        return params

    @torch.no_grad()
    def identify(
        self,
        images: Tensor,
        top_m: int | None = None,
        alpha: float | None = None,
        all_subnets: bool = False,
        k: int = 1,
        generalist_weight: float | None = None,
    ) -> Identification:
        """Identify a batch of faces.

        Args:
            images: [B, 3, S, S] normalised face crops, S the identifier's
                ``backbone_args["image_size"]`` (one face without its batch axis, or a
                4-D batch of another shape: ValueError).
            top_m: clusters to search (default ``route.top_m``).
            alpha: decision-unit weight of the class-mean similarity (default ``route.alpha``).
            all_subnets: ISM, the paper's baseline: every sub-net answers on its own
                and the highest cosine to a head row wins (an identity in two clusters
                keeps the higher), with no router, no class means and no fitted
                numbers, whatever ``route.decision`` (no router backbone forward;
                ``top_m`` and ``alpha`` do not apply). The decision unit over all K
                clusters is ``top_m=K``.
            k: candidates kept per face (the prediction is the first).
            generalist_weight: ``route.decision=moe``'s weight of the class-mean term
                in [0, 1] (default the fitted ``route.generalist_weight``; 1: the class
                means alone decide and no sub-net runs); moe's counterpart of ``alpha``.

        Returns:
            The predicted identities, their scores and the candidate clusters. A face
            whose embedding has no direction (NaN, inf, zero) gets none
            (``Identification.failed``).
        """
        if k < 1:  # it failed in the ranking with a tensor size mismatch
            raise ValueError(f"k={k}: keep at least 1 candidate per face")
        self._check_images(images)
        top_m = self.route_config["top_m"] if top_m is None else top_m
        alpha = self.route_config["alpha"] if alpha is None else alpha
        moe = self.route_config["decision"] == "moe"
        params = self.moe
        if moe and params is None and not all_subnets:  # ISM uses no fitted number
            raise ValueError(
                "route.decision=moe needs route.router_temperature, route.subnet_temperature "
                "and route.generalist_weight: calibrate() on the validation split first"
            )
        if generalist_weight is not None and not 0 <= generalist_weight <= 1:
            raise ValueError(f"generalist_weight={generalist_weight}: a weight in [0, 1]")
        if generalist_weight is not None and params is not None:
            params = replace(params, generalist_weight=generalist_weight)
        use_subnets = all_subnets or self._runs_subnets(alpha, generalist_weight)
        batch = images.shape[0]
        features = self._memo.get(images, "trunk", partial(self._trunk, images))
        if all_subnets:  # ISM: the sub-nets alone, no stage-1 embedding
            query = None
            clusters = torch.arange(self.num_clusters).expand(batch, -1)
        else:
            query = self._router_embedding(images)
            clusters = self.router.route(query, top_m, self._route_blocks())
        clusters = clusters.to(images.device)
        # routed nowhere (a stage-1 embedding with no direction), or a searched sub-net's
        # embedding with none: no candidate (their NaN or 0 similarities ranked someone)
        failed = clusters[:, 0] == NO_CLUSTER
        best_score = torch.full((batch, k), -float("inf"), device=images.device)
        best_id = torch.full((batch, k), self.assignment.num_classes, device=images.device)
        # clustering.overlap: two clusters may score one identity, listed once
        empty_id = self.assignment.num_classes if len(self.assignment.overlap) else None
        best_similarity = torch.full_like(best_score, -float("inf"))
        best_cluster = torch.full_like(best_id, -1)
        forwards = 0
        # each candidate cluster's faces: a cluster is scored for those only
        routed = {
            c: (clusters == c).any(dim=1).nonzero().squeeze(1)
            for c in clusters.unique().tolist()
            if c != NO_CLUSTER
        }
        # moe: an identity in two candidate clusters gets the sum of both (sum_shared):
        # those columns are merged into the lists once every cluster is scored, the
        # others at once (keeping every cluster's whole [rows, members] scores to the end
        # grew ISM's peak memory by 1,118 MB where one [B, C] float32 is 51 MB; 708 MB
        # now: 200K identities, K=8, batch 64, 20% overlap, measured)
        summing = moe and not all_subnets and empty_id is not None
        sims, shares = {}, {}  # moe: cluster c's faces' similarities to its class means
        if moe and not all_subnets:  # each candidate cluster's log-probability, renormalised
            log_mass = torch.empty(clusters.shape, device=images.device)
            for c, rows in routed.items():
                sims[c] = similarity(query[rows], self.means(c))
                logits = sims[c] / params.router_temperature
                if summing:
                    shares[c] = self._class_mean_share(c, clusters[rows])
                    logits = logits if shares[c] is None else logits + shares[c]
                mass = torch.logsumexp(logits, dim=1)
                log_mass[rows] = torch.where(clusters[rows] == c, mass[:, None], log_mass[rows])
            log_weight = torch.log_softmax(log_mass, dim=1)
        parts = []
        for c, rows in routed.items():
            members = self.members(c)
            cosine = other = None
            if use_subnets:  # alpha 1, weight 1: the clustering unit alone, no sub-net runs
                embedded = self._subnet_embeddings(c, images, features, rows)
                failed[rows] |= ~has_direction(embedded)
                cosine, other = self._subnet_cosine(c, embedded)
                forwards += len(rows)
            if all_subnets:  # ISM: the sub-net's own answer, its cosine
                score = close = cosine
            elif moe:
                weight = log_weight.masked_fill(clusters != c, -math.inf).amax(dim=1)[rows]
                means = sims.pop(c)  # [rows, members]: dropped once this cluster is scored
                score = moe_scores(weight, cosine, means, params, other, shares.pop(c, None))
                close = evidence(cosine, means, params)
            else:
                means = similarity(query[rows], self.means(c)) if alpha > 0 else None
                score = close = fuse(cosine, means, alpha)
            close = close.to(best_score.dtype)
            source = torch.tensor(c, device=score.device).expand(score.shape)
            part = (rows, members, score, close, source)
            # the columns of identities in another cluster too wait for sum_shared, found
            # once per cluster (an isin over its members at each batch: 330 ms a cluster
            # at 2M identities, K=8, 20% overlap, as a review measured it)
            found = self._shared_members(c, images.device) if summing else None
            if found is not None:
                columns = found[0]
                own = torch.ones(len(members), dtype=torch.bool, device=members.device)
                own[columns] = False
                keep = own.nonzero().squeeze(1)
                if len(keep):  # (a cluster may hold no identity of its own alone)
                    mine = (rows, members[keep], *(t[:, keep] for t in part[2:]))
                    self._keep(best_score, best_id, best_similarity, best_cluster, mine, empty_id)
                # indexed: copies, sum_shared's to write
                parts.append((rows, members[columns], *(t[:, columns] for t in part[2:])))
                continue
            self._keep(best_score, best_id, best_similarity, best_cluster, part, empty_id)
        if summing:
            sum_shared(parts)
            for part in parts:
                self._keep(best_score, best_id, best_similarity, best_cluster, part, empty_id)
        empty = failed[:, None]
        best_score.masked_fill_(empty, -math.inf)
        best_id.masked_fill_(empty, self.assignment.num_classes)
        best_similarity.masked_fill_(empty, -math.inf)
        best_cluster.masked_fill_(empty, -1)
        return Identification(
            best_id, best_score, clusters, forwards, best_similarity, best_cluster, failed
        )

    def _class_mean_share(self, c: int, candidates: Tensor) -> Tensor | None:
        """``[n, m]`` log of the share of cluster ``c``'s class-mean term that each of its
        m members gets for n faces whose candidate clusters are ``candidates`` (``[n,
        top_m]``): minus the log of how many of them hold the member (0 for most; with
        ``clustering.overlap``, log 2 where both of a member's clusters are searched).
        None when no member of ``c`` is in another cluster. Float ``[n, m]`` tensors
        only (an int64 ``[n, m, top_m]`` key tensor and ``isin`` over it before)."""
        shared = self._shared_members(c, candidates.device)
        if shared is None:
            return None
        columns, at, clusters = shared
        n = len(candidates)
        searched = torch.zeros(n, self.num_clusters, device=candidates.device)
        searched.scatter_(1, candidates, 1.0)
        # how many searched clusters hold each shared member: one count per membership
        # (its own cluster and its overlap rows, which never repeat nor name its own)
        held = torch.zeros(n, len(columns), device=candidates.device)
        held.index_add_(1, at, searched[:, clusters])
        share = torch.zeros(n, len(self.members(c)), device=candidates.device)
        share[:, columns] = -held.log()
        return share

    def _shared_members(self, c: int, device: torch.device) -> tuple[Tensor, ...] | None:
        """Cluster ``c``'s members that are in another cluster too: their columns in
        ``members(c)``, then every membership of theirs as (column, cluster); None when
        there is none. Made once per cluster and device (the assignment is fixed)."""
        cache = getattr(self, "_shared_cache", None)  # (assignment, device, {c: ...})
        if cache is None or cache[0] is not self.assignment or cache[1] != device:
            cache = self._shared_cache = (self.assignment, device, {})
        if c not in cache[2]:
            members = self.members(c).to(device)
            columns = torch.isin(members, self._overlap_on(device)).nonzero().squeeze(1)
            found = None
            if len(columns):
                ids, clusters = (t.to(device) for t in self.assignment.memberships())
                mine = torch.isin(ids, members[columns])
                # members(c) is sorted, so a shared member's column is a binary search
                at = torch.searchsorted(members[columns], ids[mine])
                found = (columns, at, clusters[mine])
            cache[2][c] = found
        return cache[2][c]

    def _overlap_on(self, device: torch.device) -> Tensor:
        """``clustering.overlap``'s identities (those in a second cluster), on
        ``device``: copied there once, not at every batch (the assignment stays on the
        CPU)."""
        cached = getattr(self, "_overlap_cache", None)  # (assignment, ids)
        if cached is None or cached[0] is not self.assignment or cached[1].device != device:
            # enrolment makes a new assignment
            cached = self._overlap_cache = (
                self.assignment,
                self.assignment.overlap[:, 0].to(device),
            )
        return cached[1]

    @staticmethod
    def _keep(
        best_score: Tensor,
        best_id: Tensor,
        best_similarity: Tensor,
        best_cluster: Tensor,
        part: tuple,
        empty_id: int | None,
    ) -> None:
        """Merge one cluster's scores (a ``parts`` entry of :meth:`identify`) into the lists."""
        rows, members, score, close, source = part
        carried = [(best_similarity, close), (best_cluster, source)]
        keep_top(best_score, best_id, rows, score.to(best_score.dtype), members, carried, empty_id)

    def _check_images(self, images: Tensor) -> None:
        """Face crops as the networks take them: a size-agnostic backbone (``tiny``,
        timm CNNs) embedded crops of another size, or channels last, without a word,
        and an IResNet failed with a matrix-size error."""
        size = self.backbone_args["image_size"]
        expected = (3, size, size)
        if images.ndim == 3 or (images.ndim == 4 and tuple(images.shape[1:]) != expected):
            raise ValueError(
                f"images of shape {list(images.shape)}: this identifier takes a batch "
                f"[B, 3, {size}, {size}] of normalised RGB crops (channels first; one face "
                "as images[None]; from files: normalize_images(load_faces(paths, "
                f"{size})), facecluster.data)"
            )
        if not images.is_floating_point():  # load_faces's uint8 pixels, not normalised
            raise ValueError(
                f"images of dtype {images.dtype}: this identifier takes normalised RGB "
                "crops in [-1, 1] (facecluster.data.normalize_images)"
            )

    @torch.no_grad()
    def enroll(
        self, faces: Mapping[str, Tensor] | Iterable[tuple[str, Tensor]], batch_size: int = 64
    ) -> dict[str, int]:
        """Add identities without retraining; returns each new name's cluster.

        For each name, from its face images ``[n, 3, H, W]`` (normalised): its class
        mean (the normalised mean of its normalised stage-1 embeddings, as training
        computes class means) joins the router; it joins the cluster that the router
        picks for that class mean (the gallery before this call decides, so the
        order of ``faces`` does not matter); that cluster's sub-net head gains a row,
        the normalised mean of its normalised sub-net embeddings. Centroids and
        every existing identity stay as they are. The networks take ``batch_size``
        images at a time, however many a person has. ``faces`` may be ``(name,
        images)`` pairs made one at a time: only :data:`ENROLL_ROUTE_BATCH` people's
        images are held at once. Nothing changes until every person is done.

        Raises:
            ValueError: a name that is blank, holds a control character, is enrolled
                already or given twice; no images, images of 3 dimensions or a 4-D
                batch that is not [n, 3, S, S] at the identifier's image size, or
                images whose mean embedding has
                no direction (NaN, inf or zero).
        """
        pairs = faces.items() if isinstance(faces, Mapping) else faces
        names: list[str] = []
        means, clusters, rows = [], [], []
        taken = {same_name(n) for n in self.class_names}
        waiting: list[tuple[str, Tensor]] = []  # people whose class mean awaits the router

        def route_waiting() -> None:
            # routed together, against the gallery before this call: a scan of every
            # class mean per person made 64 people at 1M identities take 22.2 s, 9.9 s
            # routed 16 at a time (docs/DEPLOYMENT.md); their images are kept meanwhile
            mine = torch.cat(means[len(clusters) :])
            for (name, images), k in zip(
                waiting,
                self.router.route(mine, 1, self._route_blocks())[:, 0].tolist(),
                strict=True,
            ):
                row = None if k == NO_CLUSTER else _direction(self.subnets[k], images, batch_size)
                if row is None or not has_direction(row).all():  # one image's NaN: the mean's
                    network = "stage-1 backbone" if row is None else f"sub-net {k}"
                    raise ValueError(
                        f"{name!r}: the {network}'s embedding of its faces is NaN, inf or zero "
                        "(an image it cannot embed, or weights that are not finite): not enrolled"
                    )
                clusters.append(k)
                rows.append(row)
            waiting.clear()

        for name, images in pairs:
            _check_readable(name)
            if same_name(name) in taken:
                self.check_new_names([*names, name])  # raises, naming why
            taken.add(same_name(name))
            if len(images) == 0:
                raise ValueError(f"{name!r}: no face images to enrol")
            try:  # another size: a size-agnostic backbone enrolled it without a word
                self._check_images(images)
            except ValueError as e:
                raise ValueError(f"{name!r}: {e}") from None
            names.append(name)
            means.append(_direction(self.embed, images, batch_size))
            waiting.append((name, images))
            if len(waiting) == ENROLL_ROUTE_BATCH:
                route_waiting()
        if not names:
            return {}
        if waiting:
            route_waiting()
        first = self.assignment.num_classes
        before = (self.assignment, self.class_to_cluster, len(self.class_names), {})
        # the router and its blocks (a C x d copy each) go before the new ones are
        # built: kept, enrolment at 2M identities held one more (4 GB, computed)
        self.router = None
        self.grouped_means = torch.empty(0)
        self._overlap_cache = self._shared_cache = None  # they keep the old assignment
        try:
            self.assignment = self.assignment.extended(torch.cat(means), torch.tensor(clusters))
            for k in sorted(set(clusters)):
                before[3][k] = (self.head(k), self.members(k))
                mine = [i for i, c in enumerate(clusters) if c == k]
                new_rows = torch.cat([rows[i] for i in mine]).to(self.head(k))
                setattr(self, f"head{k}", torch.cat([self.head(k), new_rows]))
                ids = torch.tensor([first + i for i in mine], device=self.members(k).device)
                setattr(self, f"members{k}", torch.cat([self.members(k), ids]))
            self.class_to_cluster = self.assignment.class_to_cluster.to(self.device)
            self.class_names += names
            self.router = self._build_router()
            self._set_means()
        except BaseException:  # out of memory at 2M, Ctrl-C: the identifier as it was
            self.assignment, self.class_to_cluster, count, kept = before
            for k, (head, members) in kept.items():
                setattr(self, f"head{k}", head)
                setattr(self, f"members{k}", members)
            del self.class_names[count:]
            self.router = None  # a half-built one first: its memory
            self.router = self._build_router()
            self._set_means()
            raise
        return dict(zip(names, clusters, strict=True))

    def check_new_names(self, names: Sequence[str]) -> None:
        """ValueError for a name in ``names`` that is blank, holds a control character
        (a line break), or is enrolled already or given twice, the last two compared as
        :func:`same_name` does (a macOS folder's decomposed "José" and a trailing space
        made a second identity that no answer could tell apart)."""
        taken = {same_name(n): n for n in self.class_names}
        seen: dict[str, str] = {}
        for name in names:
            key = same_name(name)
            _check_readable(name)
            for earlier, why in ((taken, "is enrolled already"), (seen, "is given twice")):
                if key in earlier:
                    alike = "" if earlier[key] == name else f" as {earlier[key]!r}"
                    raise ValueError(
                        f"{name!r} {why}{alike} (identity names are unique, compared after "
                        "Unicode normalisation (NFC) and without surrounding spaces)"
                    )
            seen[key] = name

    def decision_name(self, alpha: float | None = None) -> str:
        """How the decision unit is named in table rows: ``moe`` or ``alpha=<alpha>``
        (``0.3``, or every digit where six would name another weight: an evaluation
        scores each name once, and ``route.alpha=0.2500001`` was taken for the alpha
        sweep's 0.25)."""
        if self.route_config["decision"] == "moe":
            return "moe"
        value = float(self.route_config["alpha"] if alpha is None else alpha)
        short = f"{value:g}"
        return f"alpha={short if float(short) == value else repr(value)}"

    def routed(
        self,
        top_m: int,
        alpha: float,
        name: str | None = None,
        generalist_weight: float | None = None,
    ) -> Predictor:
        """Routed inference (the paper's method): only the top_m clusters' sub-nets run
        (``alpha``: the linear decision unit's weight, ignored by moe;
        ``generalist_weight``: moe's, None for the fitted one when it predicts)."""
        label = "clustered" if self.assignment.method != "random" else "random partition"

        def predict(images: Tensor, k: int = 1) -> tuple[Tensor, Tensor, Tensor | None]:
            result = self.identify(images, top_m, alpha, k=k, generalist_weight=generalist_weight)
            return result.candidates, result.similarity, result.clusters

        runs_subnets = self._runs_subnets(alpha, generalist_weight)
        return Predictor(
            name or f"{label}, routed (top_m={top_m}, {self.decision_name(alpha)})",
            predict,
            float(top_m) if runs_subnets else 0.0,
            count_parameters(  # routing ranks the clusters by their class means
                self.router_backbone,
                self.grouped_means,
                *(self._subnet_parts() if runs_subnets else ()),
            ),
        )

    def _runs_subnets(self, alpha: float, generalist_weight: float | None = None) -> bool:
        """Whether a pass runs any sub-net: not at alpha 1 (linear) or a generalist
        weight of 1 (moe, ``generalist_weight`` or the fitted one), where the class
        means alone decide (:meth:`identify`)."""
        moe = self.moe if self.route_config["decision"] == "moe" else None
        if moe is None:
            return alpha < 1
        return (moe.generalist_weight if generalist_weight is None else generalist_weight) < 1

    def all_subnets(self) -> Predictor:
        """ISM, the paper's baseline: every sub-net answers on its own and the best score
        wins; no router, no class means (:meth:`identify` with ``all_subnets=True``)."""
        label = "clustered" if self.assignment.method != "random" else "random partition"
        subnets = self._subnet_parts()
        return Predictor(
            f"{label}, all sub-nets (ISM)",
            self._all_subnets,
            float(self.num_clusters),
            count_parameters(*subnets),
            stage1_backbone=False,
        )

    def _all_subnets(self, images: Tensor, k: int = 1) -> tuple[Tensor, Tensor, None]:
        result = self.identify(images, all_subnets=True, k=k)
        return result.candidates, result.similarity, None

    def predictors(self, top_m: int | None = None, alpha: float | None = None) -> list[Predictor]:
        """What this identifier offers at ``route.top_m`` and ``route.alpha`` (defaults)."""
        top_m = self.route_config["top_m"] if top_m is None else top_m
        alpha = self.route_config["alpha"] if alpha is None else alpha
        return [self.routed(top_m, alpha), self.all_subnets()]

    def _subnet_parts(self) -> list[nn.Module | Tensor]:
        # each head and its "not mine" row apart: head_rows would copy every head (4 GB
        # at 2M x 512 with stage2.negatives, for each predictor built)
        clusters = range(self.num_clusters)
        not_mine = [getattr(self, f"not_mine{k}") for k in clusters]
        return [*self.subnets, *(self.head(k) for k in clusters), *not_mine]

    # ------------------------------------------------------------------ loading, export

    @classmethod
    def from_run(
        cls,
        run: RunFolder | str | Path,
        route: dict[str, Any] | None = None,
        map_location: str | torch.device = "cpu",
        stage1: StageWeights | None = None,
        cfg: Config | None = None,
    ) -> TwoStageIdentifier:
        """Load a finished two-stage run: both stages' final weights and the assignment.

        Args:
            run: the run folder (its training must have finished).
            route: ``route`` settings that replace the run's own.
            map_location: where the weights are loaded.
            stage1: the run's stage-1 weights when the caller has read them already.
            cfg: the run's finished config when the caller has read it already, with
                its overrides (a moved data.root or verification set, which the
                run's own config.yaml would name where they are no longer).
        """
        from facecluster.run import RunFolder  # training-side module: only here

        run = run if isinstance(run, RunFolder) else RunFolder(Path(run))
        cfg = cfg if cfg is not None else run.finished_config()
        args = cfg.model.backbone_args(cfg.data.image_size)
        stage1 = stage1 or run.stage1_weights(map_location)
        subnets = run.subnet_weights(map_location)
        given, stored = route, cfg.to_dict()["route"]
        for key, value in run.calibration().items():  # fitted on the validation split
            stored[key] = value if stored.get(key) is None else stored[key]
        route = {**stored, **(given or {})}
        edited = f"{run.path}'s {{}} (config.yaml's model settings edited since training?)"
        router_backbone = load_backbone(args, stage1.backbone, edited.format("stage-1 weights"))
        networks = [
            load_backbone(args, w.backbone, edited.format(f"sub-net {k}'s weights"))
            for k, w in enumerate(subnets)
        ]
        assignment, names = run.assignment(cfg.clustering.num_clusters), run.class_names()
        try:  # what check_parts finds (a weight that is not finite), named with the run
            identifier = cls(
                args,
                router_backbone,
                networks,
                [w.head for w in subnets],
                assignment,
                names,
                route,
                cfg.model.shared_layers,
            )
        except ValueError as e:
            where = f"run {run.path}" + (f" (route={given})" if refuses(given, stored) else "")
            raise ValueError(f"{where}: {e}") from None
        identifier.imports = list(cfg.imports)
        return identifier

    def export(self, path: str | Path) -> Path:
        """Write one self-contained file (atomic: a crash never leaves half a file).

        Raises:
            ValueError: a weight that is not finite (:func:`check_parts`), named; nothing
                is written.
        """
        path = Path(path)
        payload = {
            "format": EXPORT_FORMAT,
            "version": EXPORT_VERSION,
            "facecluster": facecluster.__version__,  # the release that wrote it
            "backbone": self.backbone_args,
            "route": self.route_config,
            "router_backbone": self.router_backbone.state_dict(),
            "subnets": [s.state_dict() for s in self.subnets],
            "heads": [self.head_rows(k).cpu() for k in range(self.num_clusters)],
            "assignment": self.assignment.to_dict(),
            "class_names": pack_names(self.class_names),
            "open_set": self.open_set,
            "export_id": self.export_id,
            "shared_layers": self.shared_layers,
            "imports": list(self.imports),
        }
        networks = _network_weights(payload["router_backbone"], payload["subnets"])
        try:  # as they are now: checked when built, they may have changed since
            names = len(self.class_names)
            check_parts(self.assignment, names, self.num_clusters, payload["heads"], networks)
        except ValueError as e:
            raise ValueError(f"not writing {path}: {e}") from None
        parts = self.router.saved_parts()
        if parts is not None:  # loads put it together instead of building it again
            payload[ROUTER_PARTS] = {name: torch.from_numpy(a) for name, a in parts.items()}
            payload["router_index_settings"] = self.index_settings()
        atomic_torch_save(payload, path)
        return path

    @classmethod
    def load(
        cls,
        path: str | Path,
        route: dict[str, Any] | None = None,
        map_location: str | torch.device = "cpu",
        mmap: bool = False,
    ) -> TwoStageIdentifier:
        """Read a file written by ``export`` (plain torch + the backbone registry).

        Only plain data is read (``weights_only``): a file holding anything else is
        refused with :class:`~facecluster.io.UnsafeFileError` before any of it runs.
        ``mmap``: map the file instead of reading it; its head rows and class means
        (gigabytes at 2M identities) then stay shared page cache. The file must then
        only be replaced by a rename (as export and enroll do): one copied over it
        while it is mapped ends the process (SIGBUS) or changes the loaded weights.
        """
        payload = load_plain(path, map_location, "exported identifier", mmap=mmap)
        if not isinstance(payload, dict) or payload.get("format") != EXPORT_FORMAT:
            raise ValueError(f"{path} is not an exported facecluster identifier")
        version = payload.get("version")
        if version == 1:  # the config's model section and image_size, not builder arguments
            model = payload.get("model")
            model = model if isinstance(model, dict) else {}  # damaged: checked below
            kwargs = model.get("kwargs")
            args = {
                "name": model.get("backbone"),
                "embedding_dim": model.get("embedding_dim"),
                "image_size": payload.get("image_size"),
                **(kwargs if isinstance(kwargs, dict) else {}),
            }
        elif version in (2, 3, EXPORT_VERSION):
            args = payload.get("backbone")
        elif isinstance(version, int) and version > EXPORT_VERSION:
            writer = payload.get("facecluster")
            raise ValueError(
                newer_format(path, "facecluster export", version, EXPORT_VERSION, writer)
            )
        else:
            raise ValueError(
                f"{path} is an identifier export of version {version}; this facecluster "
                f"reads versions 1 to {EXPORT_VERSION}"
            )
        imports = payload.get("imports") or []  # none: before imports (2026-12-06)
        if not isinstance(imports, list) or not all(isinstance(m, str) for m in imports):
            raise ValueError(
                f"{path}: imports is {shown_value(imports)}, not a list of module names"
            )
        # what every version holds, each of its kind, before any of it is used: a damaged
        # or hand-made file ended in a KeyError, TypeError or AttributeError (each head's
        # tensor: check_parts)
        subnets, names, shared = (
            payload.get(k) for k in ("subnets", "class_names", "shared_layers")
        )
        holds = (
            ("route", isinstance(payload.get("route"), dict), "a mapping of route settings"),
            ("router_backbone", isinstance(payload.get("router_backbone"), dict), "a state dict"),
            (
                "subnets",
                isinstance(subnets, list) and all(isinstance(s, dict) for s in subnets),
                "a list of state dicts",
            ),
            ("heads", isinstance(payload.get("heads"), list), "a list of head-row tensors"),
            ("assignment", isinstance(payload.get("assignment"), dict), "a cluster assignment"),
            (  # version 4's: unpack_names checks them
                "class_names",
                (version == EXPORT_VERSION and names is not None)
                or (isinstance(names, list) and all(isinstance(n, str) for n in names)),
                "a list of names",
            ),
            (
                "shared_layers",
                shared is None or (isinstance(shared, int) and not isinstance(shared, bool)),
                "a number of stages",
            ),
        )
        problems = [
            f"{key} is missing" if key not in payload else f"{key} is not {what}"
            for key, ok, what in holds
            if not ok
        ]
        try:
            checked_backbone(args)
        except ValueError as e:
            problems.insert(0, str(e))
        if problems:
            raise ValueError(
                f"export {path}: {'; '.join(problems)}: the file is damaged; export the run again"
            )
        route_given, route = route, dict(payload["route"], **(route or {}))
        saved = payload.get(ROUTER_PARTS)
        if payload.get("router_index") is not None:  # faiss's bytes: not read
            logger.warning(older_index_note(path))
        saved = reusable_index(saved, payload.get("router_index_settings"), route)
        try:  # what the constructor's check_parts finds, named with the file
            assignment = ClusterAssignment.from_dict(payload["assignment"])
            names = payload["class_names"]
            names = unpack_names(names) if version == EXPORT_VERSION else list(names)
            identifier = cls(
                args,
                load_backbone(args, payload["router_backbone"]),
                [load_backbone(args, state) for state in payload["subnets"]],
                payload["heads"],
                assignment,
                names,
                route,
                payload.get("shared_layers", 0),
                saved,
            )
            identifier.open_set = loaded_open_set(payload.get("open_set"), route)
        except ValueError as e:
            named = f" (route={route_given})" if refuses(route_given, payload["route"]) else ""
            raise ValueError(f"export {path}{named}: {e}{_imports_hint(args, imports)}") from None
        identifier.export_id = payload.get("export_id")  # None: before export ids
        identifier.imports = imports
        return identifier


def _imports_hint(args: Mapping[str, Any], imports: list[str]) -> str:
    """What to do when an export's backbone is one the user registered and this process
    has not imported (never imported by a load: an export is data, not code)."""
    if not imports or args.get("name") in BACKBONES:
        return ""
    modules = " ".join(f"--import {m}" for m in imports)
    return (
        f"; the run registered it by importing {', '.join(imports)}: pass {modules} to "
        "facecluster identify or enroll, or import it before TwoStageIdentifier.load"
    )


def check_parts(
    assignment: ClusterAssignment,
    names: int,
    subnets: int,
    heads: Sequence[Tensor],
    weights: Iterable[tuple[str, Tensor]] = (),
) -> None:
    """ValueError naming every part of an identifier that does not match its cluster
    assignment: ``names`` identity names (one per identity), ``subnets`` sub-nets and
    ``heads`` (one each per cluster), and each head's rows (one per member of its
    cluster, then at most one "not mine" row); and every tensor of ``weights`` (the
    networks', named: :func:`_network_weights`) and of ``heads`` (``heads.<k>``) that
    holds NaN or inf (the class means cannot: :class:`ClusterAssignment` refuses them).
    An export tampered with, or written inconsistent, loaded without a word and failed at
    its first answers (IndexError); one whose weights went NaN answered every face with
    an identity of cluster 0. A head that is no tensor of rows as wide as the class means
    is named alone (a float ended in a TypeError, another width at the first face)."""
    width = assignment.class_means.shape[1]
    other = [
        k
        for k, rows in enumerate(heads)
        if not (isinstance(rows, Tensor) and rows.dim() == 2 and rows.shape[1] == width)
    ]
    if other:
        raise ValueError(
            f"heads {other} are not tensors of head rows as wide as the class means ({width})"
        )
    head_rows = [len(rows) for rows in heads]
    problems = []
    if names != assignment.num_classes:
        problems.append(
            f"assignment maps {assignment.num_classes} identities but class_names holds {names}"
        )
    for count, what in ((subnets, "sub-nets"), (len(head_rows), "heads")):
        if count != assignment.num_clusters:
            problems.append(
                f"assignment has {assignment.num_clusters} clusters but there are {count} {what}"
            )
    sizes = assignment.cluster_sizes().tolist()
    for k, (rows, members) in enumerate(zip(head_rows, sizes, strict=False)):
        if rows not in (members, members + 1):
            problems.append(
                f"sub-net {k}'s head has {rows} rows for its {members} identities (and at "
                "most one more, its not-mine row)"
            )
    bad = non_finite_keys({**dict(weights), **{f"heads.{k}": w for k, w in enumerate(heads)}})
    if bad:
        problems.append(f"{len(bad)} tensor(s) hold NaN or inf ({shown_list(bad)})")
    if problems:
        raise ValueError("; ".join(problems))


def _network_weights(
    router: Mapping[str, Tensor], subnets: Sequence[Mapping[str, Tensor]]
) -> list[tuple[str, Tensor]]:
    """The networks' state dicts as one list, each tensor named as an export holds it:
    ``router_backbone.<key>``, ``subnets.<k>.<key>``."""
    return [
        *((f"router_backbone.{key}", t) for key, t in router.items()),
        *((f"subnets.{k}.{key}", t) for k, state in enumerate(subnets) for key, t in state.items()),
    ]


def pack_names(names: Sequence[str]) -> dict[str, Tensor]:
    """``names`` as two plain tensors, what an export stores: ``utf8``, every name's
    UTF-8 bytes one after another (uint8), and ``offsets`` (int64, one more than the
    names): name i is bytes ``offsets[i]:offsets[i + 1]``. Exact for any str: a
    separator could occur in a name, and a name from a folder whose name is not UTF-8
    (its lone surrogates) keeps them (``surrogatepass``). At 2M names a list of str took
    6.7 s to ``torch.load`` (``weights_only`` unpickles each str), these 0.1 s and 0.5 s
    to decode (one-off measurement, 2 cores)."""
    encoded = [name.encode("utf-8", "surrogatepass") for name in names]
    offsets = torch.zeros(len(encoded) + 1, dtype=torch.int64)
    offsets[1:] = torch.tensor([len(b) for b in encoded], dtype=torch.int64).cumsum(0)
    utf8 = torch.from_numpy(np.frombuffer(b"".join(encoded), dtype=np.uint8).copy())
    return {"utf8": utf8, "offsets": offsets}


def unpack_names(packed: Any) -> list[str]:
    """The names :func:`pack_names` stored.

    Raises:
        ValueError: ``packed`` is not what it writes (a damaged or tampered export).
    """
    utf8 = packed.get("utf8") if isinstance(packed, Mapping) else None
    offsets = packed.get("offsets") if isinstance(packed, Mapping) else None
    if not (isinstance(utf8, Tensor) and isinstance(offsets, Tensor)):
        raise ValueError("class_names is not the utf8 and offsets tensors of pack_names")
    utf8, offsets = utf8.cpu(), offsets.cpu()
    if (
        utf8.dim() != 1
        or utf8.dtype != torch.uint8
        or offsets.dim() != 1
        or offsets.dtype != torch.int64
        or not len(offsets)
        or offsets[0] != 0
        or offsets[-1] != len(utf8)
        or bool((offsets[1:] < offsets[:-1]).any())
    ):
        raise ValueError(
            "class_names' offsets do not cut its utf8 bytes into names (int64, from 0 to "
            "their length, never decreasing)"
        )
    data, bounds = utf8.numpy().tobytes(), offsets.tolist()
    cuts = zip(bounds, bounds[1:], strict=False)
    try:
        return [data[a:b].decode("utf-8", "surrogatepass") for a, b in cuts]
    except UnicodeDecodeError as e:
        raise ValueError(f"class_names is not UTF-8 ({e})") from None


def loaded_open_set(open_set: dict | None, route: dict[str, Any]) -> dict | None:
    """An export's ``open_set`` as loaded. A ``moe`` threshold that an earlier facecluster
    chose on the log-probability (no ``score`` mark) is kept as
    ``log_probability_threshold``, not ``threshold``: nothing may compare an answer's
    similarity with it (``facecluster identify`` then asks for a new export or a
    ``--threshold``; ``open_set["threshold"]`` is a KeyError, not a wrong answer).

    Raises:
        ValueError: ``open_set`` is no mapping, its threshold no similarity (a finite
            number in [-1, 1], float32's rounding allowed) or its ``top_m`` no count.
    """
    if open_set is None:
        return None
    if not isinstance(open_set, dict):
        raise ValueError(f"open_set must be a mapping, holds {str(open_set)[:40]}")
    stale = route.get("decision") == "moe" and open_set.get("score") != OPEN_SET_SCORE
    if stale and "threshold" in open_set:
        open_set = dict(open_set)
        open_set["log_probability_threshold"] = open_set.pop("threshold")
    threshold = open_set.get("threshold", 0.0)
    # float32 cosines of unit vectors reach 1 + 5e-7, and a threshold is the next float
    # above a score (threshold_at_fpir): an export may hold one just above 1
    if not (_is_number(threshold) and -1.0 - 1e-5 <= threshold <= 1.0 + 1e-5):
        raise ValueError(
            f"open_set's threshold is {shown_value(threshold)}: an unknown threshold compares a "
            "similarity, a number in [-1, 1]"
        )
    top_m = open_set.get("top_m", 1)
    if not (isinstance(top_m, int) and not isinstance(top_m, bool) and top_m > 0):
        raise ValueError(
            f"open_set's top_m is {shown_value(top_m)}, not a number of clusters (> 0)"
        )
    return open_set


def checked_route(route: Mapping[str, Any]) -> dict[str, Any]:
    """``route`` as an identifier keeps it: every setting, those it lacks at their
    defaults (:class:`RouteConfig`'s, but ``decision`` linear: exports before moe lack
    it; a file without ``top_m`` or ``alpha`` failed at the first face with a KeyError),
    checked by the config's rules (:func:`route_problems`).

    Raises:
        ConfigError: ``route`` is no mapping, or every setting that is unknown, of
            another type or out of range.
    """
    if not isinstance(route, Mapping):
        raise ConfigError("; ".join(route_problems(route)))
    # a numpy or torch scalar (a value computed with them) as the number it holds
    plain = {
        k: v.item() if isinstance(v, np.generic | Tensor) and v.ndim == 0 else v
        for k, v in route.items()
    }
    route = {**asdict(RouteConfig()), "decision": "linear", **plain}
    problems = route_problems(route)
    if problems:
        raise ConfigError("; ".join(problems))
    return route


def checked_backbone(args: Any) -> dict[str, Any]:
    """An identifier's backbone arguments (what builds its networks and sizes its
    input), their input size and embedding width checked: a damaged export's was used
    at the first face.

    Raises:
        ValueError: ``args`` is no mapping, its ``name`` no name, or its ``image_size``
            or ``embedding_dim`` is not a positive whole number.
    """
    if not isinstance(args, Mapping):
        raise ValueError(f"backbone is {shown_value(args)}, not the backbone's arguments")
    name = args.get("name")
    if not isinstance(name, str) or not name:  # 2 ended in an AttributeError in timm
        raise ValueError(f"backbone.name is {shown_value(name)}, not a backbone's name")
    for key in ("image_size", "embedding_dim"):
        value = args.get(key)
        if isinstance(value, bool) or not isinstance(value, int) or value < 1:
            raise ValueError(f"backbone.{key} is {shown_value(value)}, not a positive whole number")
    return dict(args)


def refuses(given: Mapping[str, Any] | None, stored: Mapping[str, Any]) -> bool:
    """Whether the route check refuses the settings ``given`` (``route=`` of a load)
    rather than the ``stored`` ones they replace: only then is ``route=`` named in the
    error (a file's own bad number was blamed on an innocent ``route=`` beside it)."""
    if not given:
        return False
    try:
        checked_route(stored)
    except ValueError:
        return False  # the file's own
    try:
        checked_route({**stored, **given})
    except ValueError:
        return True
    return False


def _is_number(value: Any) -> bool:
    """An int or float that is finite (a bool is no number here)."""
    return isinstance(value, int | float) and not isinstance(value, bool) and math.isfinite(value)


def reusable_index(
    saved: dict[str, Tensor | np.ndarray] | None,
    settings: dict[str, Any] | None,
    route: dict[str, Any],
) -> dict[str, np.ndarray] | None:
    """An export's saved router index parts (:meth:`Router.saved_parts`) when it was
    built with ``route``'s index settings (``settings``: those it was built with), else
    None: the router is then built for them."""
    if not isinstance(saved, dict) or not saved:  # none, faiss's bytes, or no parts
        return None
    if settings != {key: route.get(key, d) for key, d in INDEX_SETTINGS}:
        return None
    return {
        str(name): part.cpu().numpy() if isinstance(part, Tensor) else np.asarray(part)
        for name, part in saved.items()
    }


def older_index_note(path: str | Path) -> str:
    """The warning for an export whose router index an earlier facecluster saved as
    faiss's own bytes, which are not read (faiss's reader trusts them)."""
    return (
        f"{path}: its router index was saved by an earlier facecluster as faiss's bytes, "
        "which are not read (a crafted blob can make faiss open files); the index is "
        "built at each load instead: export the run again to keep it"
    )


def _tie_trunks(router: nn.Module, subnets: list[nn.Module], stages: int) -> None:
    """Make every sub-net's trunk modules the router backbone's own (checked equal by
    :func:`_check_shared`): the identifier then holds one trunk, not K + 1 copies."""
    names = {id(m): name for name, m in router.named_modules()}
    for name in (names[id(m)] for m in router.trunk_modules(stages)):
        parent, _, attr = name.rpartition(".")
        for subnet in subnets:
            setattr(subnet.get_submodule(parent), attr, router.get_submodule(name))


def _check_shared(router: nn.Module, subnets: list[nn.Module], stages: int) -> None:
    """Sub-nets that share the router backbone's first ``stages`` stages must hold exactly
    its weights there (stage 2 froze them): otherwise running the trunk once would change
    the sub-nets' answers."""
    if not 0 < stages <= shareable_stages(router):
        raise ValueError(
            f"shared_layers={stages}: this backbone can share 1 to "
            f"{shareable_stages(router)} stages"
        )
    trunk = nn.ModuleList(router.trunk_modules(stages)).state_dict()
    for k, subnet in enumerate(subnets):
        theirs = nn.ModuleList(subnet.trunk_modules(stages)).state_dict()
        if any(not torch.equal(trunk[n], theirs[n]) for n in trunk):
            raise ValueError(
                f"shared_layers={stages}: sub-net {k}'s first {stages} stages differ from "
                "the stage-1 backbone's (they were not trained with these layers frozen)"
            )


def _direction(net: Callable[[Tensor], Tensor], images: Tensor, batch_size: int) -> Tensor:
    """``[1, d]`` the normalised mean of ``net``'s normalised embeddings of ``images``,
    ``batch_size`` images at a time (the normalised sum: the same direction)."""
    total = sum(
        F.normalize(net(images[s : s + batch_size]).float(), dim=1).sum(0)
        for s in range(0, len(images), batch_size)
    )
    return F.normalize(total[None], dim=1)
