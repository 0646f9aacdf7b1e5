"""TwoStageIdentifier: who is this face? (Ahmadi & Dianat, JSDP 2024, test time).

A face's stage-1 embedding goes to the router (faiss search over class means),
which picks the ``top_m`` best clusters; only those clusters' sub-nets run, and
the decision unit fuses each sub-net's cosines with the class-mean similarities
into one predicted identity. With ``all_subnets=True`` every sub-net runs and the
best score wins: the ISM baseline for random partitions.

Batched: the images of a batch are grouped by routed cluster, so each sub-net runs
once per batch on exactly the images routed to it; there is no per-image loop.

``from_run`` loads a finished run folder; ``export`` writes one self-contained
file (weights, class means, assignment, names) that ``load`` reads back with
plain torch and the component registry: no Trainer, no training code.
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F
from omegaconf import OmegaConf
from torch import Tensor, nn

from facecluster.clustering import ClusterAssignment
from facecluster.inference.decision import fuse, keep_best
from facecluster.inference.router import Router
from facecluster.io import atomic_torch_save
from facecluster.models.components import create_backbone

EXPORT_FORMAT = "facecluster.two_stage_identifier"
EXPORT_VERSION = 1


@dataclass
class Identification:
    """Result of ``TwoStageIdentifier.identify`` for a batch of B faces."""

    identity: Tensor
    """[B] predicted global identity ids."""
    score: Tensor
    """[B] fused score of the prediction."""
    clusters: Tensor
    """[B, m] candidate clusters, best first (all K for ISM)."""
    subnet_forwards: int
    """Images passed through sub-nets (B * m when every candidate ran a sub-net)."""


def _backbone(model: dict[str, Any], image_size: int) -> nn.Module:
    return create_backbone(
        model["backbone"],
        embedding_dim=model["embedding_dim"],
        image_size=image_size,
        dropout=0.0,
        **model.get("kwargs", {}),
    )


class TwoStageIdentifier(nn.Module):
    """Router + sub-nets + decision unit, for inference.

    Args:
        model: the ``model`` config section (backbone name, embedding_dim, kwargs).
        image_size: input side in pixels.
        router_backbone: the stage-1 backbone (embeds faces for routing).
        subnets: K sub-net backbones.
        head_weights: K tensors [size_k, d], each sub-net's head rows.
        assignment: the run's ClusterAssignment (class means, clusters).
        class_names: identity names, index = global id.
        route: the ``route`` config section (top_m, alpha, index settings).
    """

    def __init__(
        self,
        model: dict[str, Any],
        image_size: int,
        router_backbone: nn.Module,
        subnets: list[nn.Module],
        head_weights: list[Tensor],
        assignment: ClusterAssignment,
        class_names: list[str],
        route: dict[str, Any],
    ) -> None:
        super().__init__()
        self.model_config = dict(model)
        self.image_size = image_size
        self.route_config = dict(route)
        self.router_backbone = router_backbone
        self.subnets = nn.ModuleList(subnets)
        for k, weight in enumerate(head_weights):
            self.register_buffer(f"head{k}", F.normalize(weight.detach().float(), dim=1))
        self.register_buffer("class_means", assignment.class_means.float())
        self.register_buffer("class_to_cluster", assignment.class_to_cluster.long())
        for k in range(assignment.num_clusters):
            self.register_buffer(f"members{k}", assignment.classes_of(k))
        self.assignment = assignment
        self.class_names = list(class_names)
        self.router = Router(
            assignment.class_means,
            assignment.class_to_cluster,
            assignment.centroids,
            index=route["index"],
            neighbours=route["neighbours"],
            ivf_nlist=route["ivf_nlist"],
            ivf_nprobe=route["ivf_nprobe"],
            hnsw_m=route["hnsw_m"],
        )
        self.eval()

    @property
    def num_clusters(self) -> int:
        return len(self.subnets)

    def head(self, k: int) -> Tensor:
        return getattr(self, f"head{k}")

    def members(self, k: int) -> Tensor:
        return getattr(self, f"members{k}")

    @torch.no_grad()
    def embed(self, images: Tensor) -> Tensor:
        """L2-normalised stage-1 embeddings [B, d] (what the router compares)."""
        return F.normalize(self.router_backbone(images).float(), dim=1)

    @torch.no_grad()
    def identify(
        self,
        images: Tensor,
        top_m: int | None = None,
        alpha: float | None = None,
        all_subnets: bool = False,
    ) -> Identification:
        """Identify a batch of faces.

        Args:
            images: [B, 3, H, W] normalised face crops.
            top_m: clusters to search (default ``route.top_m``).
            alpha: decision-unit weight of the class-mean similarity (default ``route.alpha``).
            all_subnets: run every sub-net and keep the best score (ISM); no routing
                and, with alpha 0, no router backbone forward.

        Returns:
            The predicted identities, their scores and the candidate clusters.
        """
        top_m = self.route_config["top_m"] if top_m is None else top_m
        alpha = self.route_config["alpha"] if alpha is None else alpha
        batch = images.shape[0]
        need_query = alpha > 0 or not all_subnets
        query = self.embed(images) if need_query else None
        if all_subnets:
            clusters = torch.arange(self.num_clusters).expand(batch, -1)
        else:
            clusters = self.router.route(query, top_m)
        clusters = clusters.to(images.device)
        best_score = torch.full((batch,), -float("inf"), device=images.device)
        best_id = torch.full((batch,), self.assignment.num_classes, device=images.device)
        forwards = 0
        for k in clusters.unique().tolist():
            rows = (clusters == k).any(dim=1).nonzero().squeeze(1)
            members = self.members(k)
            cosine = None
            if alpha < 1.0:  # alpha 1 is the clustering unit alone: no sub-net needed
                embedding = F.normalize(self.subnets[k](images[rows]).float(), dim=1)
                cosine = embedding @ self.head(k).T
                forwards += len(rows)
            similarity = query[rows] @ self.class_means[members].T if alpha > 0 else None
            score = fuse(cosine, similarity, alpha)
            # argmax returns the first maximum: the lowest identity id among ties.
            local = score.argmax(dim=1)
            keep_best(
                best_score,
                best_id,
                rows,
                score.gather(1, local[:, None]).squeeze(1),
                members[local],
            )
        return Identification(best_id, best_score, clusters, forwards)

    # ------------------------------------------------------------------ loading, export

    @classmethod
    def from_run(
        cls,
        run_dir: str | Path,
        route: dict[str, Any] | None = None,
        map_location: str | torch.device = "cpu",
    ) -> TwoStageIdentifier:
        """Load a finished two-stage run folder (stage-1 and stage-2 ``last.ckpt``)."""
        run_dir = Path(run_dir)
        cfg = OmegaConf.to_container(OmegaConf.load(run_dir / "config.yaml"), resolve=True)
        stage1 = _state_dict(run_dir / "stage1" / "checkpoints" / "last.ckpt", map_location)
        stage2 = _state_dict(run_dir / "stage2" / "checkpoints" / "last.ckpt", map_location)
        assignment = ClusterAssignment.load(run_dir / "clusters.pt")
        image_size = cfg["data"]["image_size"]
        router_backbone = _backbone(cfg["model"], image_size)
        router_backbone.load_state_dict(_strip(stage1, "backbone."))
        subnets, heads = [], []
        for k in range(assignment.num_clusters):
            subnet = _backbone(cfg["model"], image_size)
            subnet.load_state_dict(_strip(stage2, f"subnets.{k}."))
            subnets.append(subnet)
            heads.append(stage2[f"heads.{k}.weight"])
        names = json.loads((run_dir / "class_names.json").read_text())
        return cls(
            cfg["model"],
            image_size,
            router_backbone,
            subnets,
            heads,
            assignment,
            names,
            dict(cfg["route"], **(route or {})),
        )

    def export(self, path: str | Path) -> Path:
        """Write one self-contained file (atomic: a crash never leaves half a file)."""
        path = Path(path)
        payload = {
            "format": EXPORT_FORMAT,
            "version": EXPORT_VERSION,
            "model": self.model_config,
            "image_size": self.image_size,
            "route": self.route_config,
            "router_backbone": self.router_backbone.state_dict(),
            "subnets": [s.state_dict() for s in self.subnets],
            "heads": [self.head(k).cpu() for k in range(self.num_clusters)],
            "assignment": self.assignment.to_dict(),
            "class_names": self.class_names,
        }
        atomic_torch_save(payload, path)
        return path

    @classmethod
    def load(
        cls,
        path: str | Path,
        route: dict[str, Any] | None = None,
        map_location: str | torch.device = "cpu",
    ) -> TwoStageIdentifier:
        """Read a file written by ``export`` (plain torch + the backbone registry)."""
        payload = torch.load(path, map_location=map_location, weights_only=False)
        if not isinstance(payload, dict) or payload.get("format") != EXPORT_FORMAT:
            raise ValueError(f"{path} is not an exported facecluster identifier")
        model, image_size = payload["model"], payload["image_size"]
        router_backbone = _backbone(model, image_size)
        router_backbone.load_state_dict(payload["router_backbone"])
        subnets = []
        for state in payload["subnets"]:
            subnet = _backbone(model, image_size)
            subnet.load_state_dict(state)
            subnets.append(subnet)
        return cls(
            model,
            image_size,
            router_backbone,
            subnets,
            payload["heads"],
            ClusterAssignment.from_dict(payload["assignment"]),
            payload["class_names"],
            dict(payload["route"], **(route or {})),
        )


def _state_dict(path: Path, map_location: str | torch.device) -> dict[str, Tensor]:
    if not path.is_file():
        raise FileNotFoundError(f"{path} is missing: is the run finished?")
    return torch.load(path, map_location=map_location, weights_only=False)["state_dict"]


def _strip(state: dict[str, Tensor], prefix: str) -> dict[str, Tensor]:
    return {k[len(prefix) :]: v for k, v in state.items() if k.startswith(prefix)}
