"""Model knowledge: adapters that patch timm ViTs in place, model building and checkpoints, input
and token shapes, FLOP counting and the budget solver that reads block structure, and the vwt
vocabulary that has to fit a model.

    from vitmerge.models import apply, remove       # the in-place patch (vitmerge.apply)
    from vitmerge.models.build import build_model   # timm name + local checkpoint
    from vitmerge.models.budget import solve_budget # per-block r for a FLOP fraction
"""
from .apply import SUPPORTED, MergeInfo, apply, last_source, remove
from .shapes import input_shape, num_tokens
from .vocabulary import check_vocabulary, model_name, patch_embed_fingerprint

__all__ = ["apply", "remove", "MergeInfo", "SUPPORTED", "last_source", "input_shape", "num_tokens",
           "check_vocabulary", "model_name", "patch_embed_fingerprint"]
