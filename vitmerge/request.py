"""What the user asked for, parsed and validated once: :class:`ModelRef` (which model) and
:class:`MergeRequest` (how to merge it).

Every command, :func:`vitmerge.models.build.build_merged`, :func:`vitmerge.backends.open_runner` and the
profiling workflows take these records instead of re-reading strings:

* ``ModelRef.parse(text)`` knows every way to name a model: a timm name (``vit_small_patch16_224`` or
  ``timm:vit_small_patch16_224``), ``dense:NAME`` (``timm:dense:NAME`` too), a transformers
  ``save_pretrained`` folder, ``MODEL.onnx`` and a TensorRT engine (``.engine``/``.plan``/``.trt``). The rules
  live here only; nothing else looks at the text.
* ``MergeRequest`` holds the method, the per-block r (an int, one per block, or "not given": 16 per block
  without a budget), the schedule, a FLOP or latency budget, proportional attention and the method's options.
  Contradictions (``--r`` next to ``--budget``, a schedule next to a budget, a latency table without a
  budget), negative r, budgets outside (0, 1] and unknown methods or options are refused when it is made,
  before any model is built.

Parsing is torch-free (commands refuse bad input in well under a second); the method registry is imported
only to validate the method and its options.
"""
from __future__ import annotations

import os
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Dict, List, Mapping, Optional, Sequence, Tuple, Union

from .errors import ModelNotFoundError, ScheduleError, UsageError

#: ``timm:NAME``: a timm model (optional prefix; a bare name means the same)
TIMM_PREFIX = "timm:"
#: ``dense:NAME``: the project's dense detector (:mod:`vitmerge.models.dense`) on the timm ViT backbone NAME
DENSE_PREFIX = "dense:"
ONNX_SUFFIXES = (".onnx",)
ENGINE_SUFFIXES = (".engine", ".plan", ".trt")  # serialized TensorRT engines

#: what a model reference is: where it runs unless told otherwise
KINDS = {"timm": "torch", "dense": "torch", "folder": "torch", "onnx": "ort", "engine": "trt"}

#: tokens merged per block when neither r nor a budget is given
DEFAULT_R = 16
DEFAULT_METHOD = "tome"


def _looks_like_path(text: str) -> bool:
    return "/" in text or "\\" in text or text.startswith(("~", "."))


@dataclass(frozen=True)
class ModelRef:
    """A model as the user named it, classified once.

    ``kind``: ``timm`` | ``dense`` | ``folder`` (transformers save_pretrained) | ``onnx`` | ``engine``;
    ``name``: the timm name (the backbone's for ``dense``) or the path (``~`` expanded); ``text``: as typed.
    """

    kind: str
    name: str
    text: str

    def __post_init__(self):
        if self.kind not in KINDS:
            raise ValueError(f"ModelRef kind must be one of {', '.join(KINDS)}, got {self.kind!r}")

    @classmethod
    def parse(cls, text: Union[str, Path, "ModelRef"]) -> "ModelRef":
        """The one reading of a model reference (see the module docstring)."""
        if isinstance(text, ModelRef):
            return text
        raw = str(text).strip()
        if not raw:
            raise ModelNotFoundError("give a model: a timm name (e.g. vit_small_patch16_224), dense:NAME, a "
                                     "transformers model folder, MODEL.onnx or MODEL.engine")
        s = raw[len(TIMM_PREFIX):] if raw.startswith(TIMM_PREFIX) else raw
        if s.startswith(DENSE_PREFIX):
            name = s[len(DENSE_PREFIX):]
            if not name:
                raise ModelNotFoundError("dense: needs a timm backbone name, e.g. dense:vit_small_patch16_224")
            return cls("dense", name, raw)
        if not s:
            raise ModelNotFoundError("timm: needs a model name, e.g. timm:vit_small_patch16_224")
        if raw.startswith(TIMM_PREFIX):
            return cls("timm", s, raw)  # timm: says it is a name, whatever it looks like
        where = os.path.expanduser(s)  # as typed otherwise: ./vit stays a path when read back
        suffix = Path(where).suffix.lower()
        if suffix in ONNX_SUFFIXES:
            return cls("onnx", where, raw)
        if suffix in ENGINE_SUFFIXES:
            return cls("engine", where, raw)
        if Path(where).exists() or _looks_like_path(s):
            return cls("folder", where, raw)
        return cls("timm", s, raw)

    @property
    def runtime(self) -> str:
        """The runtime it runs in unless told otherwise: torch for PyTorch models, ort for .onnx, trt for engines."""
        return KINDS[self.kind]

    @property
    def is_pytorch(self) -> bool:
        """Built in PyTorch from a name or folder (merge options apply), not a file that is already exported."""
        return self.runtime == "torch"

    @property
    def is_file(self) -> bool:
        return self.kind in ("onnx", "engine")

    @property
    def path(self) -> Optional[Path]:
        return Path(self.name) if self.kind in ("folder", "onnx", "engine") else None

    @property
    def spec(self) -> str:
        """The canonical text: ``timm:NAME``, ``dense:NAME`` or the path (what reports and runner specs show)."""
        if self.kind == "timm":
            return TIMM_PREFIX + self.name
        if self.kind == "dense":
            return DENSE_PREFIX + self.name
        return self.name

    @property
    def label(self) -> str:
        """Short name for tables: the timm name, ``dense:NAME`` or the file / folder name."""
        if self.kind == "timm":
            return self.name
        if self.kind == "dense":
            return self.spec
        return Path(self.name).name or self.name

    def require_pytorch(self, what: str) -> "ModelRef":
        """This reference, or a :class:`UsageError` saying ``what`` needs a model built in PyTorch."""
        if not self.is_pytorch:
            raise UsageError(f"{what} needs a model built in PyTorch (a timm name, dense:NAME or a transformers "
                             f"folder); {self.text!r} is {'an ONNX file' if self.kind == 'onnx' else 'a TensorRT engine'}")
        return self

    def __str__(self) -> str:
        return self.text


# ----------------------------------------------------------------------------------------------- merging

RValue = Union[int, List[int], Tuple[int, float]]


def parse_r(text: Union[str, int, Sequence[int], None]) -> Optional[RValue]:
    """``'16'`` -> 16, ``'8,8,4'`` -> [8, 8, 4], None -> None; every r >= 0 (one message for all callers)."""
    if text is None:
        return None
    if isinstance(text, bool):
        raise ScheduleError("r must be an int or one int per block, not bool")
    if isinstance(text, int):
        value: RValue = text
    elif isinstance(text, tuple) and len(text) == 2 and isinstance(text[1], float):
        value = (int(text[0]), float(text[1]))  # (r, inflection): ToMe's inflection schedule (Python callers)
    elif isinstance(text, str):
        s = text.replace(" ", "").strip(",")
        try:
            value = [int(v) for v in s.split(",") if v] if "," in s else int(s)
        except ValueError:
            raise ScheduleError(f"--r must be an integer or one integer per block separated by commas (e.g. 16 or "
                                f"8,8,4,4); got {text!r}") from None
        if value == []:
            raise ScheduleError(f"--r is empty; give an integer or one per block, got {text!r}")
    else:
        try:
            value = [int(v) for v in text]
        except (TypeError, ValueError):
            raise ScheduleError(f"r must be an int or a list of ints, got {text!r}") from None
    negative = [v for v in ([value] if isinstance(value, int) else value[:1] if isinstance(value, tuple) else value)
                if v < 0]
    if negative:
        raise ScheduleError(f"r must be >= 0 (tokens merged away per block), got {text!r}")
    return value


def parse_options(pairs: Union[None, Sequence[str], Mapping[str, Any]]) -> Dict[str, Any]:
    """``['vocab=v.pt', 'bits=8']`` -> ``{'vocab': 'v.pt', 'bits': 8}`` (values read as JSON where they parse)."""
    import json

    if pairs is None:
        return {}
    if isinstance(pairs, Mapping):
        return dict(pairs)
    out = {}
    for item in pairs:
        key, sep, value = str(item).partition("=")
        if not sep or not key.strip():
            raise ScheduleError(f"--option takes KEY=VALUE (e.g. -O bits=8), got {item!r}")
        try:
            out[key.strip()] = json.loads(value)
        except json.JSONDecodeError:
            out[key.strip()] = value
    return out


def _fraction(value, what: str) -> Optional[float]:
    if value is None:
        return None
    try:
        f = float(value)
    except (TypeError, ValueError):
        raise ScheduleError(f"{what} must be a number in (0, 1], got {value!r}") from None
    if not 0.0 < f <= 1.0:  # also NaN
        raise ScheduleError(f"{what} must be a fraction of the unmerged model in (0, 1], got {value!r} "
                            "(e.g. 0.5 for half the cost)")
    return f


@dataclass(frozen=True)
class MergeRequest:
    """How to merge: validated when made (see the module docstring)."""

    method: str = DEFAULT_METHOD
    #: an int (every block), one int per block, ``(r, inflection)``, or None: DEFAULT_R without a budget
    r: Optional[RValue] = None
    schedule: str = "constant"
    budget: Optional[float] = None  # FLOP (or, with budget_latency, latency) fraction of the unmerged model
    budget_latency: Optional[str] = None  # JSON table {token count: ms per block} for a latency budget
    prop_attn: bool = True
    options: Mapping[str, Any] = field(default_factory=dict)

    def __post_init__(self):
        # the torch-free checks first (a malformed --r or -O answers before torch is imported), the registry last
        object.__setattr__(self, "method", getattr(self.method, "value", self.method))
        object.__setattr__(self, "r", parse_r(self.r))
        object.__setattr__(self, "options", parse_options(self.options))
        object.__setattr__(self, "budget", _fraction(self.budget, "--budget"))
        if self.budget_latency is not None:
            object.__setattr__(self, "budget_latency", str(self.budget_latency))
        if self.budget_latency is not None and self.budget is None:
            raise ScheduleError("--budget-latency TABLE needs --budget F (the latency fraction to meet)")
        if self.budget is not None:
            if self.r is not None and self.r != 0:  # (0: what Python callers passed for "unset" before None existed)
                raise ScheduleError(f"--r {self.r_text} and --budget {self.budget} contradict each other: the budget "
                                    "solves r per block; give one of them")
            if self.schedule != "constant":
                raise ScheduleError(f"--schedule {self.schedule} applies to --r; with --budget the solver chooses the "
                                    "per-block r itself: drop --schedule (or give --r instead of --budget)")
        if self.schedule == "decreasing" and not isinstance(self.r if self.r is not None else DEFAULT_R, int):
            raise ScheduleError(f"the decreasing schedule needs one integer r (its mean), got {self.r!r}")
        from .merging import method_spec
        from .merging.schedule import SCHEDULES

        if self.schedule not in SCHEDULES:
            raise ScheduleError(f"unknown schedule {self.schedule!r}: choose one of {', '.join(SCHEDULES)}")
        method_spec(self.method).check_options(**self.options)  # unknown methods: one error naming the known ones

    @classmethod
    def unmerged(cls) -> "MergeRequest":
        return cls(r=0)

    @property
    def merges(self) -> bool:
        """False for r = 0 everywhere without a budget: the plain model."""
        if self.budget is not None:
            return True
        r = DEFAULT_R if self.r is None else self.r
        if isinstance(r, tuple):
            return r[0] != 0
        return r != 0 if isinstance(r, int) else any(v != 0 for v in r)

    @property
    def r_value(self) -> RValue:
        """r as given, or DEFAULT_R when not given (meaningless next to a budget)."""
        return DEFAULT_R if self.r is None else self.r

    @property
    def r_text(self) -> str:
        r = self.r_value
        return ",".join(str(v) for v in r) if isinstance(r, list) else str(r)

    def describe(self) -> str:
        """``tome r=16``, ``hash budget=0.5`` or ``unmerged`` (what labels and tables show)."""
        if not self.merges:
            return "unmerged"
        how = f"budget={self.budget:g}" + (" (latency)" if self.budget_latency else "") if self.budget is not None \
            else f"r={self.r_text}" + (f" {self.schedule}" if self.schedule != "constant" else "")
        opts = "".join(f" {k}={v}" for k, v in self.options.items())
        return f"{self.method} {how}{opts}"

    def to_dict(self) -> Dict[str, Any]:
        return {"method": self.method, "r": self.r, "schedule": self.schedule, "budget": self.budget,
                "budget_latency": self.budget_latency, "prop_attn": self.prop_attn,
                "options": {k: str(v) for k, v in self.options.items()}}


__all__ = ["ModelRef", "MergeRequest", "parse_r", "parse_options", "TIMM_PREFIX", "DENSE_PREFIX", "ENGINE_SUFFIXES",
           "ONNX_SUFFIXES", "KINDS", "DEFAULT_R", "DEFAULT_METHOD"]
