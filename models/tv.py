"""Import torchvision on a CPU-only torch.

The torchvision 0.28.0 wheel pinned in requirements.txt is a CUDA build. On the CPU build of
torch 2.13.0 its compiled operators do not load, and its import fails while registering fake
kernels for two of them (`RuntimeError: operator torchvision::nms does not exist`). Defining the
two operator schemas first lets the import finish; the models used here (ResNet, DeepLabv3) never
call those operators. Where torchvision loads normally (a matching CPU or CUDA pair), the first
import succeeds and this module does nothing else.
"""
from __future__ import annotations

import sys

import torch

_MISSING_OP_SCHEMAS = (
    "nms(Tensor dets, Tensor scores, float iou_threshold) -> Tensor",
    "qnms(Tensor dets, Tensor scores, float iou_threshold) -> Tensor",
)
_schema_library = None  # kept alive: the schemas vanish when the Library object is collected


def _define_missing_schemas() -> None:
    global _schema_library
    _schema_library = torch.library.Library("torchvision", "DEF")
    for schema in _MISSING_OP_SCHEMAS:
        _schema_library.define(schema)


def _forget_partial_import() -> None:
    for name in [n for n in sys.modules if n == "torchvision" or n.startswith("torchvision.")]:
        del sys.modules[name]


def import_torchvision():
    """torchvision, imported on first use: its import costs about a second (it loads torch._dynamo),
    which commands that refuse their input, or only print a config, never need."""
    if "torchvision.models" in sys.modules:
        return sys.modules["torchvision"]
    try:
        import torchvision
    except RuntimeError as err:
        if "torchvision::" not in str(err):
            raise
        _forget_partial_import()
        _define_missing_schemas()
        import torchvision
    import torchvision.models  # noqa: F401  (loaded with the package; named so the check above holds)
    return torchvision


def resnet101(**kwargs) -> torch.nn.Module:
    """torchvision.models.resnet101(**kwargs)."""
    return import_torchvision().models.resnet101(**kwargs)
