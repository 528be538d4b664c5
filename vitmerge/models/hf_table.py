"""The Hugging Face model types vitmerge merges, as data: one :class:`HFType` per config.json ``model_type``.

Everything the transformers adapter (:mod:`.hf`) and the folder loader (:mod:`.hf_load`) need to know
about a model type that cannot be read off its modules is one field of its record: the classes, what an
input sample is, the patch grid, the tokens the embeddings add, the tokens that never merge, the pooling,
the extra outputs and which input-size overrides it takes. The functions of the adapter read the record;
none of them tests a model type by name. A new model type with the same layer layout = one record here.

Every per-config field is a function of the model's config (a transformers ``PretrainedConfig``), so the
table can be read before a model exists. Nothing here imports transformers.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Callable, Dict, NamedTuple, Optional, Tuple

from ..errors import UnsupportedModelError
from ..metadata import BOXES_NAME


def _pair(v) -> Tuple[int, int]:
    return (int(v[0]), int(v[1])) if isinstance(v, (tuple, list)) else (int(v), int(v))


def ast_grid(config) -> Tuple[int, int]:
    """(frequency, time) patches of an AST config (its patch embedding's output size)."""
    f = (config.num_mel_bins - config.patch_size) // config.frequency_stride + 1
    t = (config.max_length - config.patch_size) // config.time_stride + 1
    return int(f), int(t)


def _image_grid(c) -> Tuple[int, int]:
    (h, w), (ph, pw) = _pair(c.image_size), _pair(c.patch_size)
    return h // ph, w // pw


def _image_shape(c) -> tuple:
    return (int(c.num_channels),) + _pair(c.image_size)


def _video_shape(c) -> tuple:
    return (int(c.num_frames), int(c.num_channels)) + _pair(c.image_size)


def _audio_shape(c) -> tuple:
    return (int(c.max_length), int(c.num_mel_bins))


def _none(c) -> int:
    return 0


def _one(c) -> int:
    return 1


def _two(c) -> int:
    return 2


def _yolos_det(c) -> int:
    return int(c.num_detection_tokens)


def _yolos_added(c) -> int:
    return 1 + _yolos_det(c)


def _videomae_protected(c) -> int:
    return 0 if c.use_mean_pooling else 1


def _tubelets(c) -> int:
    return int(c.num_frames) // int(c.tubelet_size)


class Resize(NamedTuple):
    """An input-size override a model type takes (a :func:`~.hf_load.load_pretrained` argument)."""

    option: str  # the load_pretrained argument: img_size, frames or audio_length
    key: str  # the config key it sets
    resample: bool  # True: learned position embedding, resampled after loading; False: positions computed from the config


@dataclass(frozen=True)
class HFType:
    """What differs between the transformers model types vitmerge merges (the layers are read off the modules)."""

    model_type: str
    classes: Tuple[str, ...]  # the classes vitmerge patches (the first is built when config.json names none)
    modality: str  # "image", "video" or "audio": what one input sample is
    input_shape: Callable[[Any], tuple]  # one sample: (C, H, W) image, (T, C, H, W) video, (time frames, mel bins) audio
    grid: Callable[[Any], Tuple[int, int]]  # the patch grid (of one frame / tubelet slice)
    added: Callable[[Any], int]  # tokens the embeddings add to the patches (class, distillation, [DET])
    protected: Callable[[Any], int]  # tokens that never merge (they lead the sequence while merging)
    slices: Callable[[Any], int] = _one  # patch grids along time (VideoMAE: frames // tubelet size)
    detection_tokens: Callable[[Any], int] = _none  # [DET] tokens, which transformers appends at the END (YOLOS)
    class_token: bool = True
    #: "prefix": the head reads the protected tokens; "mean": the head averages the tokens (VideoMAE: weighted by
    #: their size once merged; without use_mean_pooling it reads token 0, which is then protected)
    pooling: str = "prefix"
    mid_positions: bool = False  # the encoder adds position embeddings between layers (YOLOS), to merged tokens too
    extra_outputs: Tuple[Tuple[str, str], ...] = ()  # (graph output, output attribute) after the logits
    sizes: Tuple[Resize, ...] = ()  # the input-size overrides it takes
    no_img_size: Optional[Callable[[Dict[str, Any]], str]] = None  # why --img-size is refused (read off config.json)

    def resize(self, option: str) -> Optional[Resize]:
        return next((s for s in self.sizes if s.option == option), None)


TYPES: Dict[str, HFType] = {k.model_type: k for k in (
    HFType("vit", ("ViTForImageClassification",), "image", _image_shape, _image_grid, added=_one, protected=_one,
           sizes=(Resize("img_size", "image_size", True),)),
    HFType("deit", ("DeiTForImageClassification", "DeiTForImageClassificationWithTeacher"), "image", _image_shape,
           _image_grid, added=_two, protected=_two, sizes=(Resize("img_size", "image_size", True),)),
    HFType("videomae", ("VideoMAEForVideoClassification",), "video", _video_shape, _image_grid, added=_none,
           protected=_videomae_protected, slices=_tubelets, class_token=False, pooling="mean",
           sizes=(Resize("frames", "num_frames", False), Resize("img_size", "image_size", False))),
    HFType("audio-spectrogram-transformer", ("ASTForAudioClassification",), "audio", _audio_shape, ast_grid,
           added=_two, protected=_two, sizes=(Resize("audio_length", "max_length", True),),
           no_img_size=lambda cfg: "set its length with --audio-length (time frames)"),
    HFType("yolos", ("YolosForObjectDetection",), "image", _image_shape, _image_grid, added=_yolos_added,
           protected=_yolos_added, detection_tokens=_yolos_det, mid_positions=True,
           extra_outputs=((BOXES_NAME, "pred_boxes"),),
           no_img_size=lambda cfg: (f"it runs at its config.json image_size {cfg.get('image_size')} (save the model "
                                    "with another image_size to change it)")),
)}


def _unknown(c) -> int:
    raise UnsupportedModelError(f"unknown prefix tokens for model_type {str(getattr(c, 'model_type', '') or '')!r}")


#: what a model of another model_type is read as: an image model whose tokens are unknown
UNKNOWN = HFType("", (), "image", _image_shape, _image_grid, added=_unknown, protected=_unknown)


def hf_type(model_type: str) -> HFType:
    """The record of ``model_type`` (:data:`UNKNOWN` for a type vitmerge does not merge)."""
    return TYPES.get(model_type, UNKNOWN)


def patches(kind: HFType, config) -> int:
    """Patch tokens the embeddings make (tubelets for video)."""
    gh, gw = kind.grid(config)
    return kind.slices(config) * gh * gw


def num_tokens(kind: HFType, config) -> int:
    """Tokens entering the first layer: the patches and the tokens the embeddings add."""
    return patches(kind, config) + kind.added(config)


#: every model type's classes and input kind, for error messages
SUPPORTED = (
    "Hugging Face transformers 5.x classifiers and detectors saved with save_pretrained: "
    + ", ".join(f"{c} (model_type {t!r}, {k.modality})" for t, k in TYPES.items() for c in k.classes)
)

__all__ = ["HFType", "Resize", "TYPES", "UNKNOWN", "hf_type", "patches", "num_tokens", "ast_grid", "SUPPORTED"]
