"""A dense detector (ViTDet-style): a plain timm ViT backbone and a small per-cell detection head that
this project defines. Token merging runs in the backbone's blocks; the head needs every patch position
back, so the final tokens are *unmerged* (one Gather by the composed assignment, :mod:`vitmerge.merging`'s
``compose`` / ``unmerge``) before it::

    tokens = backbone.forward_features(images)       # [B, n, D]  (n < N0 when merging)
    tokens = state.unmerge(tokens)                   # [B, N0, D] every position takes its token's value
    grid   = tokens[:, prefix:] -> [B, D, H/p, W/p]  # the patch grid (prefix tokens dropped)
    h      = GELU(Conv3x3(grid))                     # [B, hidden, H/p, W/p]
    logits = Conv1x1(h) -> [B, H/p * W/p, classes]   # per-cell class scores (row-major cells)
    boxes  = Conv1x1(h) -> [B, H/p * W/p, 4]         # per-cell (cx, cy, w, h), normalised to [0, 1]

The box parametrisation is CenterNet / FCOS-like and deliberately simple: a cell at (row, col) predicts
its centre as the cell centre plus an offset of at most one cell (``tanh``), and width / height
directly (``sigmoid``), all in image-normalised coordinates and clipped to [0, 1]. The head reads only
what a dense decoder needs (the feature map); the backbone is any timm ViT with a fixed patch grid.

``vitmerge.apply(detector, ...)`` patches the backbone in place (the detector's adapter family,
:class:`vitmerge.models.family.DenseFamily`, turns on position tracking); ``r=0`` leaves its outputs
those of the unmerged detector. Exported with two named outputs, ``logits`` and ``boxes``.
"""
from __future__ import annotations

from typing import NamedTuple, Optional

import torch
from torch import nn

from ..errors import UnsupportedModelError
from ..metadata import BOXES_NAME  # noqa: F401  (re-exported: the detectors' boxes output)


class Detections(NamedTuple):
    logits: torch.Tensor  # [B, Q, classes]
    boxes: torch.Tensor  # [B, Q, 4]: (cx, cy, w, h) in [0, 1] of the image


class DenseDetector(nn.Module):
    """``DenseDetector(backbone, num_classes)``: timm ViT backbone (its own head unused) + per-cell head."""

    def __init__(self, backbone: nn.Module, num_classes: int, hidden: int = 64):
        super().__init__()
        pe = getattr(backbone, "patch_embed", None)
        if pe is None or not hasattr(backbone, "forward_features") or not hasattr(backbone, "num_prefix_tokens"):
            raise UnsupportedModelError(f"DenseDetector needs a timm VisionTransformer backbone, got "
                                        f"{type(backbone).__name__}")
        if getattr(backbone, "dynamic_img_size", False) or getattr(pe, "grid_size", None) is None:
            raise UnsupportedModelError("DenseDetector needs a backbone with a fixed patch grid (static shapes): "
                                        "create it without dynamic_img_size")
        if isinstance(num_classes, bool) or not isinstance(num_classes, int) or num_classes < 1:
            raise UnsupportedModelError(f"num_classes must be a positive int, got {num_classes!r}")
        self.backbone = backbone
        self.num_classes = int(num_classes)
        self.grid = tuple(int(g) for g in pe.grid_size)  # (H/p, W/p)
        dim = int(backbone.embed_dim)
        self.stem = nn.Sequential(nn.Conv2d(dim, hidden, 3, padding=1), nn.GELU())
        self.cls_head = nn.Conv2d(hidden, self.num_classes, 1)
        self.box_head = nn.Conv2d(hidden, 4, 1)
        gh, gw = self.grid
        rows, cols = torch.meshgrid(torch.arange(gh, dtype=torch.float32), torch.arange(gw, dtype=torch.float32),
                                    indexing="ij")
        centres = torch.stack([(cols + 0.5) / gw, (rows + 0.5) / gh], dim=-1).reshape(1, gh * gw, 2)
        self.register_buffer("centres", centres, persistent=False)  # [1, Q, 2] (cx, cy) of every cell
        self.register_buffer("cell", torch.tensor([1.0 / gw, 1.0 / gh]), persistent=False)

    @property
    def num_queries(self) -> int:
        return self.grid[0] * self.grid[1]

    def features(self, images: torch.Tensor) -> torch.Tensor:
        """The backbone's final tokens at every original position: [B, N0, D]."""
        st = getattr(self.backbone, "_vm_state", None)
        if st is not None:
            st.reset()
        tokens = self.backbone.forward_features(images)  # [B, n, D]
        return tokens if st is None else st.unmerge(tokens)

    def forward(self, images: torch.Tensor) -> Detections:
        tokens = self.features(images)
        B, _, D = tokens.shape
        gh, gw = self.grid
        grid = tokens[:, int(self.backbone.num_prefix_tokens):].transpose(1, 2).reshape(B, D, gh, gw)
        h = self.stem(grid)
        logits = self.cls_head(h).flatten(2).transpose(1, 2)  # [B, Q, classes]
        raw = self.box_head(h).flatten(2).transpose(1, 2)  # [B, Q, 4]
        centre = self.centres + torch.tanh(raw[..., :2]) * self.cell
        boxes = torch.cat([centre, torch.sigmoid(raw[..., 2:])], dim=-1).clamp(0.0, 1.0)
        return Detections(logits, boxes)


def is_dense(model: nn.Module) -> bool:
    return isinstance(model, DenseDetector)


def unsupported_reason(model: nn.Module) -> Optional[str]:
    from .vit import unsupported_reason as vit_reason

    reason = vit_reason(model.backbone)
    return None if reason is None else f"the DenseDetector's backbone: {reason}"


__all__ = ["BOXES_NAME", "DenseDetector", "Detections", "is_dense", "unsupported_reason"]
