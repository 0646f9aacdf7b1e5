"""The Lightning modules of both stages: ``BackboneSystem`` (stage 1, and the single
model) and ``SubnetSystem`` (stage 2, K sub-nets). Their building blocks (backbones,
margin heads) are in ``facecluster.models.components``, which imports no Lightning;
the names here are imported when first used (PEP 562), so importing that subpackage
does not import these modules (``facecluster.inference`` reads no Lightning)."""

from __future__ import annotations

import importlib
from typing import Any

_MODULES = {"BackboneSystem": "backbone_module", "SubnetSystem": "subnets_module"}

__all__ = list(_MODULES)


def __getattr__(name: str) -> Any:
    module = _MODULES.get(name)
    if module is None:
        raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
    value = getattr(importlib.import_module(f"{__name__}.{module}"), name)
    globals()[name] = value
    return value


def __dir__() -> list[str]:
    return sorted({*globals(), *_MODULES})
