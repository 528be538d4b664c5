"""vitmerge: training-free token merging for timm ViTs, made fast where they are deployed.

    import timm, vitmerge
    model = timm.create_model("vit_small_patch16_224")
    vitmerge.apply(model, method="tome", r=16)       # in place; model.vitmerge holds the schedule
    vitmerge.export(model, "vit_s_r16.onnx")          # static token counts, dynamic batch, verified
"""
from ._version import __version__
from .models import apply, remove


def merge(model, method: str = "tome", schedule=16, **kwargs):
    """Alias of :func:`apply` with the architecture's naming (schedule = r spec)."""
    return apply(model, method=method, r=schedule, **kwargs)


def export(model, output, **kwargs):
    """Export ``model`` to ONNX with static token counts, verified in ONNX Runtime (see :func:`vitmerge.exporter.export`)."""
    from .exporter import export as _export  # the exporter pulls in onnx/onnxruntime: only when exporting

    return _export(model, output, **kwargs)


__all__ = ["apply", "remove", "merge", "export", "__version__"]
