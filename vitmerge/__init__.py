"""vitmerge: training-free token merging for timm ViTs, made fast where they are deployed.

    import timm, vitmerge
    model = timm.create_model("vit_small_patch16_224")
    vitmerge.apply(model, method="tome", r=16)       # in place; model.vitmerge holds the schedule
    vitmerge.export(model, "vit_s_r16.onnx")          # static token counts, dynamic batch, verified
"""
import logging

from ._version import __version__
from .request import MergeRequest, ModelRef  # torch-free records of what a user asks for

logging.getLogger(__name__).addHandler(logging.NullHandler())  # the CLI's -v/-q configure it; libraries stay quiet


def apply(model, method: str = "tome", r=16, **kwargs):
    """Patch ``model`` in place to merge tokens (see :func:`vitmerge.models.apply`)."""
    from .models import apply as _apply  # imported on use: `import vitmerge` (and the CLI) stays light

    return _apply(model, method=method, r=r, **kwargs)


def remove(model):
    """Undo :func:`apply` (see :func:`vitmerge.models.remove`)."""
    from .models import remove as _remove

    return _remove(model)


def merge(model, method: str = "tome", schedule=16, **kwargs):
    """Alias of :func:`apply` with the architecture's naming (schedule = r spec)."""
    return apply(model, method=method, r=schedule, **kwargs)


def export(model, output, **kwargs):
    """Export ``model`` to ONNX with static token counts, verified in ONNX Runtime (see :func:`vitmerge.exporter.export`)."""
    from .exporter import export as _export

    return _export(model, output, **kwargs)


__all__ = ["apply", "remove", "merge", "export", "ModelRef", "MergeRequest", "__version__"]
