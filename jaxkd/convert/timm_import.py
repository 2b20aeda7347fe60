"""Imports timm (an optional extra) on CPU-only torch builds.

timm pulls in torchvision, whose compiled extension registers `torchvision::nms` only on the
torch build it was made for; on the CPU torch wheel that registration fails and `import timm`
dies with `operator torchvision::nms does not exist`. Declaring the two operator schemas first
is enough: jaxkd never calls them.
"""

from __future__ import annotations


def import_timm():
    try:
        import torch
    except ImportError as e:
        raise ImportError("timm conversion needs the 'timm' extra: pip install 'jaxkd[timm]'") from e
    try:
        torch.ops.torchvision.nms  # noqa: B018  (already registered: nothing to do)
    except (AttributeError, RuntimeError):
        lib = torch.library.Library("torchvision", "DEF")
        lib.define("nms(Tensor dets, Tensor scores, float iou_threshold) -> Tensor")
        lib.define("qnms(Tensor qdets, Tensor scores, float iou_threshold) -> Tensor")
        import_timm._lib = lib  # the schemas live as long as the Library object
    import timm

    return timm
