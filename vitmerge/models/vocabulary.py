"""The visual-word vocabulary of the ``vwt`` method: the data (centroids + what they were built
for), its file format, and the check that a vocabulary fits a model.

Building one from images is calibration work (:mod:`vitmerge.calibration.vocabulary`); the
matching itself is tensor code (:mod:`vitmerge.merging.vwt`).
"""
from __future__ import annotations

import hashlib
import warnings
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Dict, Optional, Union

import torch
import torch.nn.functional as F
from torch import nn

from .._io import staged
from ..errors import DataError
from ..merging import vwt

VOCAB_FORMAT = "vitmerge-vwt-vocabulary"
VOCAB_VERSION = 1


@dataclass
class Vocabulary:
    """Visual words: unit-norm centroids [V, F] in a feature space, with what they were built for."""

    centroids: torch.Tensor
    space: str = "pixels"
    meta: Dict[str, Any] = field(default_factory=dict)  # model, embed_dim, img_size, patch_size, ...

    @property
    def num_words(self) -> int:
        return int(self.centroids.shape[0])

    @property
    def feature_dim(self) -> int:
        return int(self.centroids.shape[1])

    def to_dict(self) -> Dict[str, Any]:
        return {"format": VOCAB_FORMAT, "version": VOCAB_VERSION, "space": self.space,
                "centroids": self.centroids.detach().float().cpu().contiguous(), **self.meta}


def save_vocabulary(vocab: Vocabulary, path: Union[str, Path]) -> Path:
    """Write ``vocab`` to ``path`` (staged: complete or not at all)."""
    out = Path(path)
    with staged(out) as stage:
        torch.save(vocab.to_dict(), stage / out.name)
    return out


def load_vocabulary(path: Union[str, Path]) -> Vocabulary:
    p = Path(path)
    hint = "build one with: vitmerge vocab build MODEL_NAME --data DATA_DIR -o vocab.pt"
    if not p.is_file():
        raise DataError(f"vocabulary file {str(p)!r} does not exist; {hint}")
    try:
        obj = torch.load(str(p), map_location="cpu", weights_only=True)
    except Exception as e:
        raise DataError(f"could not read vocabulary {str(p)!r} ({type(e).__name__}); {hint}") from None
    if not isinstance(obj, dict) or obj.get("format") != VOCAB_FORMAT:
        raise DataError(f"{str(p)!r} is not a vitmerge VWT vocabulary; {hint}")
    if obj.get("version") != VOCAB_VERSION:
        raise DataError(f"vocabulary {str(p)!r} has version {obj.get('version')}, this vitmerge reads {VOCAB_VERSION}; rebuild it")
    c = obj.get("centroids")
    if not isinstance(c, torch.Tensor) or c.dim() != 2 or c.shape[0] < 1:
        raise DataError(f"vocabulary {str(p)!r} has no [words, features] centroid tensor; rebuild it")
    meta = {k: v for k, v in obj.items() if k not in ("format", "version", "space", "centroids")}
    return Vocabulary(centroids=F.normalize(c.float(), dim=-1), space=str(obj.get("space", "pixels")), meta=meta)


def model_name(model: nn.Module) -> str:
    cfg = getattr(model, "pretrained_cfg", None) or {}
    return str(cfg.get("architecture") or type(model).__name__)


def patch_embed_fingerprint(model: nn.Module) -> str:
    """Short hash of the patch-embedding weights: an embedding-space vocabulary only fits these."""
    h = hashlib.sha256()
    for t in (model.patch_embed.proj.weight, model.patch_embed.proj.bias):
        if t is not None:
            h.update(t.detach().float().cpu().contiguous().numpy().tobytes())
    return h.hexdigest()[:16]


def check_vocabulary(model: nn.Module, voc, space: Optional[str] = None) -> None:
    """Raise DataError when the vocabulary was built for something else than this model."""
    rebuild = f"rebuild it with `vitmerge vocab build {model_name(model)} --data DATA_DIR -o vocab.pt`"
    if voc.space not in vwt.SPACES:
        raise DataError(f"vocabulary space {voc.space!r} is unknown; {rebuild}")
    if space is not None and space != voc.space:
        raise DataError(f"space={space!r} was asked but the vocabulary holds {voc.space} words; {rebuild} --space {space}")
    pe = model.patch_embed
    patch = [int(v) for v in pe.patch_size]
    if voc.space == "pixels":
        want = int(pe.proj.in_channels) * patch[0] * patch[1]
        if list(voc.meta.get("patch_size", patch)) != patch or voc.feature_dim != want:
            raise DataError(
                f"vocabulary words are {voc.feature_dim}-value pixel patches of size {voc.meta.get('patch_size')}, "
                f"but this model cuts {patch[0]}x{patch[1]} patches of {pe.proj.in_channels} channels ({want} values); {rebuild}"
            )
    else:
        if voc.feature_dim != int(model.embed_dim):
            raise DataError(
                f"vocabulary words have {voc.feature_dim} features but {model_name(model)} embeds patches in "
                f"{int(model.embed_dim)}; {rebuild} --space embeddings"
            )
        if voc.meta.get("model") not in (None, model_name(model)):
            raise DataError(f"vocabulary was built for {voc.meta.get('model')!r}, not {model_name(model)!r}; {rebuild} --space embeddings")
        fp = voc.meta.get("weights")
        if fp is not None and fp != patch_embed_fingerprint(model):
            raise DataError(
                "vocabulary was built with other patch-embedding weights (another --checkpoint?): embedding-space "
                f"words only fit the weights they came from; {rebuild} --space embeddings --checkpoint YOUR_WEIGHTS"
            )
    img = voc.meta.get("img_size")
    if img is not None and [int(v) for v in img] != [int(v) for v in pe.img_size]:
        warnings.warn(f"vocabulary was built at image size {list(img)}, the model runs at {list(pe.img_size)}: "
                      "patches see the scene at another scale, so words may match less well", stacklevel=3)


__all__ = ["Vocabulary", "save_vocabulary", "load_vocabulary", "check_vocabulary", "model_name",
           "patch_embed_fingerprint", "VOCAB_FORMAT", "VOCAB_VERSION"]
