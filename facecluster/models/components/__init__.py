"""Model components in plain torch + timm: backbones and margin heads.

Nothing here imports lightning or the rest of facecluster, so these modules can be used
(and exported, e.g. to ONNX) on their own.
"""

from .backbones import (
    BACKBONES,
    EmbeddingNeck,
    TimmBackbone,
    TinyBackbone,
    available_backbones,
    create_backbone,
    load_backbone,
    register_backbone,
    shareable_stages,
)
from .heads import HEADS, AdaFace, ArcFace, CosFace, MarginHead, create_head, register_head
from .iresnet import IBasicBlock, IResNet
from .mobilefacenet import MobileFaceNet

__all__ = [
    "BACKBONES",
    "HEADS",
    "AdaFace",
    "ArcFace",
    "CosFace",
    "EmbeddingNeck",
    "IBasicBlock",
    "IResNet",
    "MarginHead",
    "MobileFaceNet",
    "TimmBackbone",
    "TinyBackbone",
    "available_backbones",
    "create_backbone",
    "create_head",
    "load_backbone",
    "register_backbone",
    "register_head",
    "shareable_stages",
]
