"""Build a timm model by name and load a local checkpoint, or load a transformers model folder written by
``save_pretrained`` (never a hub download); read a model.json description; build and merge in one call
(what ``vitmerge export`` and ``eval`` do with their options)."""
from __future__ import annotations

import copy
import difflib
import json
import sys
import warnings
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Dict, Optional, Union

import torch
from torch import nn

from ..errors import CheckpointError, ModelNotFoundError, UsageError
from ..request import DENSE_PREFIX, MergeRequest, ModelRef
from . import hf
from .apply import apply
from .budget import schedule_for
from .mobilevit import is_mobilevit

CHECKPOINT_SUFFIXES = (".pth", ".pt", ".bin", ".safetensors")


def _suggest(name: str, choices: list[str], n: int = 5) -> list[str]:
    close = difflib.get_close_matches(name, choices, n=n, cutoff=0.6)
    if len(close) < n:
        stem = name.split("_")[0]
        close += [c for c in choices if c.startswith(stem) and c not in close][: n - len(close)]
    return close


def check_model_name(name: str) -> None:
    import timm

    if timm.is_model(name):
        return
    hint = _suggest(name, timm.list_models())
    msg = f"unknown timm model {name!r}."
    if hint:
        msg += " Did you mean: " + ", ".join(hint) + "?"
    msg += " List models with: python -c \"import timm; print(timm.list_models('vit_*'))\""
    raise ModelNotFoundError(msg)


def load_state_dict(path: Union[str, Path]) -> Dict[str, torch.Tensor]:
    """Read a .pth/.pt/.bin (torch) or .safetensors checkpoint: a state dict, or one under
    'model' / 'state_dict' / 'model_ema'. Only tensors are loaded (weights_only, no pickled code)."""
    p = Path(path)
    if not p.is_file():
        raise CheckpointError(f"checkpoint {str(p)!r} does not exist (give a local file with --checkpoint)")
    if p.suffix not in CHECKPOINT_SUFFIXES:
        raise CheckpointError(
            f"checkpoint {p.name!r} has an unknown extension; expected one of {', '.join(CHECKPOINT_SUFFIXES)}"
        )
    try:
        if p.suffix == ".safetensors":
            from safetensors.torch import load_file

            obj = load_file(str(p), device="cpu")
        else:
            obj = torch.load(str(p), map_location="cpu", weights_only=True)
    except Exception as e:  # corrupt, truncated, or not a checkpoint at all
        raise CheckpointError(
            f"could not read checkpoint {str(p)!r} ({type(e).__name__}: {str(e).splitlines()[0][:200]}). "
            "Is the file complete and a PyTorch/safetensors state dict?"
        ) from None
    if isinstance(obj, dict):
        for key in ("model", "state_dict", "model_ema", "module"):
            if key in obj and isinstance(obj[key], dict):
                obj = obj[key]
                break
    if not isinstance(obj, dict) or not obj or not all(isinstance(v, torch.Tensor) for v in obj.values()):
        raise CheckpointError(
            f"checkpoint {str(p)!r} holds no state dict of tensors (found {type(obj).__name__}); "
            "save it with torch.save(model.state_dict(), path) or as {'model': state_dict}"
        )
    return {k.removeprefix("module."): v for k, v in obj.items()}


def _head_classes(sd: Dict[str, torch.Tensor]) -> Optional[int]:
    w = sd.get("head.weight")
    return int(w.shape[0]) if w is not None and w.dim() == 2 else None


#: random weights (no checkpoint) are drawn from this seed unless told otherwise: two exports of one model
#: without a checkpoint are then the same model, and `vitmerge check` compares forms, not two random draws
DEFAULT_SEED = 0


def build_model(
    name: Union[str, ModelRef],
    checkpoint: Optional[Union[str, Path]] = None,
    img_size: Optional[int] = None,
    num_classes: Optional[int] = None,
    frames: Optional[int] = None,
    audio_length: Optional[int] = None,
    seed: int = DEFAULT_SEED,
    **kwargs,
) -> nn.Module:
    """timm.create_model(name) with random init, then the local checkpoint if given; or, when ``name`` is
    a folder written by transformers' ``save_pretrained``, that model with its own weights
    (:func:`vitmerge.models.hf.load_pretrained`: ViT, DeiT, VideoMAE, AST, YOLOS).

    timm: the classifier size follows the checkpoint (a CIFAR-100 or Pets fine-tune loads as is), and
    the position embedding is resampled by timm's own checkpoint filter when ``img_size`` differs.
    transformers folders: ``img_size`` (images, video), ``frames`` (video) and ``audio_length`` (audio
    time frames) set the input size; learned position embeddings are resampled.
    ``dense:NAME``: a :class:`~.dense.DenseDetector` on the timm backbone NAME (checkpoint: the detector's
    state dict, which also gives its classes; without one, ``num_classes`` is required).
    """
    ref = ModelRef.parse(name).require_pytorch("building a model")
    name = ref.name
    if ref.kind == "dense":
        with torch.random.fork_rng(devices=[]):  # the initial weights from `seed`, the caller's RNG untouched
            torch.manual_seed(int(seed))
            return _build_dense(name, checkpoint, img_size, num_classes, frames, audio_length, kwargs, seed)
    if ref.kind == "folder":
        return _build_folder(Path(name), checkpoint, img_size, num_classes, frames, audio_length, kwargs)
    if frames is not None or audio_length is not None:
        what = "--frames" if frames is not None else "--audio-length"
        raise UsageError(f"{what} applies to transformers video/audio model folders; {name!r} is a timm model name")
    import timm

    check_model_name(name)
    sd = load_state_dict(checkpoint) if checkpoint is not None else None
    asked_classes = num_classes
    if num_classes is None and sd is not None:
        num_classes = _head_classes(sd)
    if img_size is not None:
        kwargs["img_size"] = img_size
    if num_classes is not None:
        kwargs["num_classes"] = num_classes
    try:
        with torch.random.fork_rng(devices=[]):  # the initial weights from `seed`, the caller's RNG untouched
            torch.manual_seed(int(seed))
            model = timm.create_model(name, pretrained=False, **kwargs)
    except TypeError as e:
        raise ModelNotFoundError(f"model {name!r} does not accept these options ({e})") from None
    if sd is not None:
        filt = getattr(sys.modules.get(type(model).__module__), "checkpoint_filter_fn", None)
        if filt is not None:
            try:
                sd = filt(sd, model)
            except Exception as e:
                raise CheckpointError(f"checkpoint does not fit {name!r}: {e}") from None
        check_shapes(model, sd, name, asked_classes)
        missing, unexpected = model.load_state_dict(sd, strict=False)
        if missing or unexpected:
            raise CheckpointError(
                f"checkpoint does not match {name!r}: {len(missing)} missing keys "
                f"({', '.join(missing[:5])}{', ...' if len(missing) > 5 else ''}), {len(unexpected)} unexpected keys "
                f"({', '.join(unexpected[:5])}{', ...' if len(unexpected) > 5 else ''}). "
                "Is it a checkpoint of this architecture?"
            )
    else:
        warnings.warn(
            f"no --checkpoint given: {name} has RANDOM weights (seed {seed}; --seed draws others). Shapes, export "
            "and latency are real; accuracy numbers are meaningless.",
            stacklevel=2,
        )
    return model.eval()


def check_shapes(model: nn.Module, sd: Dict[str, torch.Tensor], name: str, asked_classes: Optional[int] = None) -> None:
    """:class:`CheckpointError` (one line: what differs, what to do) when tensors of the checkpoint have other shapes
    than the model's of the same name: a checkpoint of another model size, or another number of classes."""
    own = model.state_dict()
    bad = [(k, tuple(v.shape), tuple(own[k].shape)) for k, v in sd.items()
           if k in own and hasattr(v, "shape") and tuple(v.shape) != tuple(own[k].shape)]
    if not bad:
        return
    shown = "; ".join(f"{k}: checkpoint {list(a)} vs model {list(b)}" for k, a, b in bad[:3])
    more = f" (and {len(bad) - 3} more)" if len(bad) > 3 else ""
    heads = all(k.split(".")[0] in ("head", "fc", "classifier", "cls_head", "box_head") for k, _, _ in bad)
    if heads and asked_classes is not None:
        fix = (f"--num-classes {asked_classes} does not match the checkpoint's head: drop --num-classes (it is read "
               "from the checkpoint) or give the number of classes the checkpoint was trained with")
    elif heads:
        fix = "give --num-classes with the number of classes the checkpoint was trained with"
    else:
        fix = ("the checkpoint is of another model size: give the timm name it was trained as (e.g. "
               "vit_tiny_patch16_224 for a ViT-Ti checkpoint), or --model-kwargs / --img-size as it was built")
    raise CheckpointError(f"checkpoint does not fit {name}: {len(bad)} tensor(s) have other shapes ({shown}{more}); "
                          f"{fix}")


def _build_dense(name: str, checkpoint, img_size, num_classes, frames, audio_length, kwargs, seed=DEFAULT_SEED) -> nn.Module:
    import timm

    from .dense import DenseDetector

    if frames is not None or audio_length is not None:
        what = "--frames" if frames is not None else "--audio-length"
        raise UsageError(f"{what} applies to transformers video/audio model folders; dense:{name} is an image detector")
    check_model_name(name)
    sd = load_state_dict(checkpoint) if checkpoint is not None else None
    head = sd.get("cls_head.weight") if sd is not None else None
    if num_classes is None and head is not None:
        num_classes = int(head.shape[0])
    if num_classes is None:
        raise UsageError(f"dense:{name} needs its number of classes: give --num-classes N (or a --checkpoint of a "
                         "DenseDetector, which holds them)")
    stem = sd.get("stem.0.weight") if sd is not None else None
    if img_size is not None:
        kwargs["img_size"] = img_size
    try:
        backbone = timm.create_model(name, pretrained=False, **{**kwargs, "num_classes": 0})
    except TypeError as e:
        raise ModelNotFoundError(f"model {name!r} does not accept these options ({e})") from None
    model = DenseDetector(backbone, int(num_classes), **({} if stem is None else {"hidden": int(stem.shape[0])}))
    if sd is None:
        warnings.warn(f"no --checkpoint given: dense:{name} has RANDOM weights (seed {seed}; --seed draws others). "
                      "Shapes, export and latency are real; detections are meaningless.", stacklevel=3)
        return model.eval()
    check_shapes(model, sd, f"dense:{name}", num_classes if head is None else None)
    missing, unexpected = model.load_state_dict(sd, strict=False)
    if missing or unexpected:
        raise CheckpointError(
            f"checkpoint does not match dense:{name}: {len(missing)} missing keys ({', '.join(missing[:5])}), "
            f"{len(unexpected)} unexpected keys ({', '.join(unexpected[:5])}). Is it a DenseDetector state dict "
            "(backbone.*, stem.*, cls_head.*, box_head.*) of this backbone?")
    return model.eval()


def _build_folder(folder: Path, checkpoint, img_size, num_classes, frames, audio_length, kwargs) -> nn.Module:
    if not folder.exists():
        raise ModelNotFoundError(f"model folder {str(folder)!r} does not exist (give a timm model name or a folder "
                                 "written by transformers' save_pretrained)")
    if not folder.is_dir():
        raise ModelNotFoundError(f"{str(folder)!r} is a file: give a timm model name or a transformers model folder "
                                 "(config.json + weights, written by save_pretrained)")
    for what, given in (("--checkpoint", checkpoint), ("--num-classes", num_classes),
                        ("--model-kwargs", kwargs or None)):
        if given is not None:
            raise UsageError(f"{what} applies to timm models; the transformers folder {str(folder)!r} holds its own "
                             "weights and classifier (config.json)")
    return hf.load_pretrained(folder, img_size=img_size, frames=frames, audio_length=audio_length)


# --------------------------------------------------------------------------------------------
# model.json: a model described by name, kwargs, checkpoint (and its data folder)
# --------------------------------------------------------------------------------------------


@dataclass
class ModelConfig:
    """What a ``model.json`` (written by ``vitmerge digits train``) describes."""

    path: Path  # the model.json
    name: str  # timm model name, or a transformers model folder (absolute)
    kwargs: Dict[str, Any]  # timm.create_model arguments (build_model's for a folder)
    checkpoint: Optional[Path]  # None for a transformers folder (it holds its weights)
    data_dir: Optional[Path]  # the labelled images that go with it, when present
    meta: Dict[str, Any] = field(default_factory=dict)  # everything else in the file (metrics, split, ...)

    def build(self) -> nn.Module:
        """The model as a plain (unmerged) timm model in eval mode."""
        return build_model(self.name, self.checkpoint, **copy.deepcopy(self.kwargs))


def load_model_config(config: Union[str, Path]) -> ModelConfig:
    """Read a ``model.json`` (or the folder holding one): keys ``model`` (a timm name, or a transformers
    folder relative to the file), ``kwargs``, ``checkpoint`` (relative to the file; null for a folder),
    optional ``data`` (a folder, relative to the file)."""
    p = Path(config).expanduser()
    if p.is_dir():
        p = p / "model.json"
    try:
        meta = json.loads(p.read_text())
    except (OSError, ValueError) as e:
        raise CheckpointError(f"cannot read model config {str(p)!r}: {e}") from None
    if not isinstance(meta, dict):
        raise CheckpointError(f"{str(p)!r} is not a model config (expected a JSON object)")
    for key in ("model", "kwargs", "checkpoint"):
        if key not in meta:
            raise CheckpointError(f"{str(p)!r} is not a model config: no {key!r} entry "
                                  "(expected the model.json written by `vitmerge digits train`)")
    data = p.parent / meta.get("data", "data")
    name = str(meta["model"])
    if (p.parent / name).is_dir():  # a transformers folder next to the file
        name = str(p.parent / name)
    ckpt = None if meta["checkpoint"] is None else p.parent / meta["checkpoint"]
    return ModelConfig(path=p, name=name, kwargs=dict(meta["kwargs"]), checkpoint=ckpt,
                       data_dir=data if data.is_dir() else None, meta=meta)


@dataclass
class ModelSource:
    """One model as every command names it: the reference, its weights and its build options, resolved once (a
    ``model.json`` read, ``num_classes`` taken from ``--model-kwargs`` or ``--num-classes``, contradictions refused).
    ``build()`` gives the plain model; :func:`build_merged` the merged one."""

    ref: ModelRef
    checkpoint: Optional[Path] = None
    kwargs: Dict[str, Any] = field(default_factory=dict)  # build_model's keyword arguments (img_size, num_classes, ...)
    data_dir: Optional[Path] = None  # the labelled images a model.json names
    seed: int = DEFAULT_SEED

    @property
    def weights(self) -> str:
        """Where the weights come from, for reports: the checkpoint, the folder's own, or random."""
        if self.checkpoint is not None:
            return f"checkpoint {self.checkpoint}"
        return "its folder's weights" if self.ref.kind == "folder" else f"random weights (seed {self.seed})"

    def build(self) -> nn.Module:
        """The plain (unmerged) model in eval mode."""
        return build_model(self.ref, self.checkpoint, seed=self.seed, **copy.deepcopy(self.kwargs))


def resolve_model(model: Union[None, str, ModelRef], checkpoint: Optional[Union[str, Path]] = None,
                  config: Optional[Union[str, Path]] = None, model_kwargs: Optional[Dict[str, Any]] = None, *,
                  img_size: Optional[int] = None, num_classes: Optional[int] = None, frames: Optional[int] = None,
                  audio_length: Optional[int] = None, seed: int = DEFAULT_SEED) -> ModelSource:
    """The one place a model request is put together: a reference and/or a ``model.json`` (what the caller gives
    explicitly wins over the file), ``--model-kwargs`` and the named model options (which win over the same keys
    in the kwargs; ``num_classes`` in both must agree)."""
    kwargs: Dict[str, Any] = {}
    data_dir = None
    if config is not None:
        cfg = load_model_config(config)
        model = model or cfg.name
        checkpoint = checkpoint or cfg.checkpoint
        kwargs.update(copy.deepcopy(cfg.kwargs))
        data_dir = cfg.data_dir
    kwargs.update(model_kwargs or {})
    if not model:
        raise ModelNotFoundError("give a MODEL: a timm name (e.g. vit_small_patch16_224), dense:NAME, a transformers "
                                 "model folder, or --config model.json")
    ref = ModelRef.parse(model).require_pytorch("this command")
    kw_classes = kwargs.pop("num_classes", None)  # the digits model's model_kwargs.json carries it
    if num_classes is not None and kw_classes is not None and int(kw_classes) != int(num_classes):
        raise UsageError(f"--num-classes {num_classes} contradicts num_classes {kw_classes} in --model-kwargs: "
                         "give one of them")
    for key, v in (("img_size", img_size), ("frames", frames), ("audio_length", audio_length),
                   ("num_classes", num_classes if num_classes is not None else kw_classes)):
        if v is not None:
            kwargs[key] = v
    return ModelSource(ref, None if checkpoint is None else Path(checkpoint), kwargs, data_dir, int(seed))


def merge(model: nn.Module, request: Optional[MergeRequest] = None, trace_source: bool = False) -> nn.Module:
    """``model`` merged as ``request`` asks (in place; the per-block r solved for this model when a budget is
    given; ``trace_source``: keep the map of original tokens, for drawings). MobileViT with r = 0 stays the plain
    mobile baseline."""
    request = request or MergeRequest()
    if is_mobilevit(model) and not request.merges:
        return model
    rs = schedule_for(model, request)
    return apply(model, method=request.method, r=rs, prop_attn=request.prop_attn, trace_source=trace_source,
                 **request.options)


def build_merged(model: Union[str, ModelRef, ModelSource], request: Optional[MergeRequest] = None,
                 **model_options) -> nn.Module:
    """Build the model (a :class:`ModelSource`, or a reference plus :func:`resolve_model`'s options: checkpoint,
    img_size, num_classes, model_kwargs, frames, audio_length, seed) and merge it as ``request`` asks (default:
    ToMe, r 16 per block; ``MergeRequest(r=0)``: the plain model)."""
    source = model if isinstance(model, ModelSource) else resolve_model(
        model, model_options.pop("checkpoint", None), model_options.pop("config", None),
        model_options.pop("model_kwargs", None), **model_options)
    return merge(source.build(), request)


__all__ = ["DENSE_PREFIX", "DEFAULT_SEED", "build_model", "load_state_dict", "check_model_name",
           "CHECKPOINT_SUFFIXES", "ModelConfig", "ModelSource", "load_model_config", "resolve_model", "merge",
           "build_merged"]
