"""The contract every merge method declares: :class:`MethodSpec` (see :mod:`.registry`)."""
from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any, Callable, Dict, Mapping, Optional

from ..errors import ScheduleError
from .base import MergePlan

PlanFn = Callable[..., MergePlan]

#: Block forms a method can take in the model adapter.
#: ``block``: between attention and MLP of a block, (x, metric, size) -> (x', size'), N -> N - r;
#: ``slow_fast``: the block runs on a plan's slots and the result spreads back to all N tokens (evo);
#: ``pre_encoder``: one grouping of the patch tokens before block 0 (vwt).
FORMS = ("block", "slow_fast", "pre_encoder")

#: What the property tests may permute without changing the merged multiset of tokens:
#: ``any``: any permutation of the unprotected tokens (with distinct scores / hash codes);
#: ``alternating``: permutations within the even and within the odd positions (ToMe's A/B sets);
#: ``none``: no promise (the method reads positions).
INVARIANCES = ("any", "alternating", "none")

def clamp(r: int, cap: int) -> int:
    """``r`` limited to ``[0, cap]``: what one step removes when asked for ``r``."""
    return max(min(int(r), int(cap)), 0)


MatchFlops = Callable[..., int]  # (n, protected, metric_dim, r=..., **options) -> FLOPs of one matching step


@dataclass
class SetupContext:
    """What the model adapter knows when it sets a method up for one model (see :attr:`MethodSpec.setup`).

    Filled by :func:`vitmerge.models.apply`; merging/ never imports models/, so the model itself is not
    here: what a hook may need of it is a plain value, or a resource loaded by ``load``.
    """

    method: str
    r: Any  # what the user asked for (pre_encoder: one int, already checked against max_r)
    protected: int  # leading tokens that never merge
    n_tokens: int  # tokens entering the first merge step
    patch_size: Optional[tuple] = None  # pre_encoder: (ph, pw) of the plain patch embedding
    #: ``load(option name, value, **context)`` -> the object the value names, loaded and checked against this
    #: model by the models layer's loader for the option's kind (``MethodSpec.resources``); others as given
    load: Callable[..., Any] = lambda name, value, **context: value


@dataclass
class Setup:
    """What a method's ``setup`` hook hands the model adapter."""

    plan_options: Dict[str, Any]  # keyword arguments of every plan call (per-block steps)
    info: Dict[str, Any]  # the options ``model.vitmerge`` reports (and exports record)
    step_options: Dict[str, Any] = field(default_factory=dict)  # keyword arguments of the form's block-side hooks
    buffers: Dict[str, Any] = field(default_factory=dict)  # tensors the step keeps as non-persistent buffers


def default_setup(options: Mapping[str, Any], ctx: SetupContext) -> Setup:
    """A method without set-up of its own: the options as given go to every plan call."""
    return Setup(plan_options=dict(options), info=dict(options))


@dataclass(frozen=True)
class LeanStep:
    """A hand-written native merge step (:mod:`vitmerge.exporter.lean`) that stands for a method's step.

    ``kind`` names the step by what it computes, not by the method: ``bipartite`` (ToMe's alternating
    A/B matching on the metric) or ``class_attention`` (top-k by the class token's attention, merged by
    similarity); ``params`` are its constants (``class_attention``: ``min_weight``).
    """

    kind: str
    params: Mapping[str, Any] = field(default_factory=dict)


@dataclass(frozen=True)
class MethodSpec:
    """Everything the rest of vitmerge needs to know about one merge method.

    The registry's rule: no module outside a method's own file (``merging/<method>.py``) and the
    registry names a method or branches on its name. What differs between methods is a fact or a hook
    here, and the rest of vitmerge reads it:

    * the model adapter (:mod:`vitmerge.models.apply`, :mod:`vitmerge.models.vit`) is written per
      ``form`` and calls the method only through ``plan``, ``setup`` and the form's block-side hooks
      (``slow_fast``: ``evolve`` and ``spread``; ``pre_encoder``: ``group``);
    * options that name a file or object the models layer reads (vwt's vocabulary) are declared in
      ``resources`` by kind; the models layer keeps one loader per kind (never per method) and ``setup``
      reaches it through ``SetupContext.load``;
    * graph surgery reads ``plugin`` (a ``vitmerge::TokenMerge`` node can stand for the step) and
      ``lean`` (which hand-written native step, if any, stands for it);
    * the self-test runs every method with ``selftest_options`` (options that need no files).

    A new method is its file with a ``SPEC`` plus one line in :mod:`.registry`; no other module changes.
    """

    name: str
    plan: PlanFn  # (metric [B, N, C], r, protected, **options) -> MergePlan with exactly N - r slots
    max_r: Callable[[int, int], int]  # (n_tokens, protected) -> most tokens one step can remove
    summary: str  # one line for --help and the docs
    form: str = "block"
    needs_cls_attn: bool = False  # the plan reads the class token's attention row (cls_attn [B, N])
    #: options a user may pass (-O KEY=VALUE) with their defaults; None = required / no default
    options: Mapping[str, Any] = field(default_factory=dict)
    #: extra validation of option values (names are checked against ``options`` first)
    validate: Optional[Callable[..., None]] = None
    #: FLOPs of one matching step, for budgets solved from the analytic block model; None: budgets
    #: for this method are found by counting the real model's FLOPs instead
    match_flops: Optional[MatchFlops] = None
    invariance: str = "none"
    #: (user's options, :class:`SetupContext`) -> :class:`Setup`: checks that need the model and what the
    #: form's step is built with; None: the options as given go to every plan call
    setup: Optional[Callable[[Mapping[str, Any], SetupContext], Setup]] = None
    #: option name -> resource kind the models layer loads for it (``vocabulary``: a vwt vocabulary)
    resources: Mapping[str, str] = field(default_factory=dict)
    #: ``slow_fast``: (global class attention g, the block's class attention over its slots, the plan's
    #: kept tokens, protected, **step_options) -> the next g
    evolve: Optional[Callable[..., Any]] = None
    #: ``slow_fast``: (x, x_slow, y_slow, assign) -> all N tokens after the block
    spread: Optional[Callable[..., Any]] = None
    #: ``pre_encoder``: (images [B, C, H, W], patch embeddings [B, P, D], r, protected, **step_options,
    #: **buffers) -> MergePlan over protected + P tokens
    group: Optional[Callable[..., MergePlan]] = None
    #: the hand-written native step graph surgery writes for this method (None: the exporter's own graph)
    lean: Optional[LeanStep] = None
    #: options the self-test merges with (they must need no files or data)
    selftest_options: Mapping[str, Any] = field(default_factory=dict)

    def __post_init__(self):
        if self.form not in FORMS:
            raise ValueError(f"{self.name}: form must be one of {FORMS}, got {self.form!r}")
        need = {"slow_fast": ("evolve", "spread"), "pre_encoder": ("group",)}.get(self.form, ())
        missing = [h for h in need if getattr(self, h) is None]
        if missing:
            raise ValueError(f"{self.name}: the {self.form} form needs the hook(s) {', '.join(missing)}")
        unknown = sorted(set(self.resources) - set(self.options))
        if unknown:
            raise ValueError(f"{self.name}: resources {unknown} are not options of the method")
        if self.invariance not in INVARIANCES:
            raise ValueError(f"{self.name}: invariance must be one of {INVARIANCES}, got {self.invariance!r}")

    @property
    def plugin(self) -> bool:
        """Whether its merge step is one (x, metric, size) -> (x', size') step per block: the step a
        ``vitmerge::TokenMerge`` node (plugin form, Triton kernel) stands for."""
        return self.form == "block"

    def configure(self, options: Mapping[str, Any], ctx: SetupContext) -> Setup:
        """The method set up for one model (``setup``, or the options as given)."""
        return (self.setup or default_setup)(options, ctx)

    def clamp_r(self, n_tokens: int, r: int, protected: int) -> int:
        """How many tokens one step really removes from ``n_tokens`` when asked for ``r``."""
        return clamp(r, self.max_r(n_tokens, protected))

    def check_options(self, **options) -> None:
        """Raise :class:`ScheduleError` for option names or values this method cannot use."""
        unknown = sorted(set(options) - set(self.options))
        if unknown:
            takes = ", ".join(self.options) if self.options else "no options"
            raise ScheduleError(f"method {self.name!r} got unknown option(s) {', '.join(unknown)}; it takes {takes} "
                                f"(see docs/methods/{self.name}.md)")
        if self.validate is not None:
            self.validate(**options)



__all__ = ["MethodSpec", "PlanFn", "FORMS", "INVARIANCES", "MatchFlops", "clamp", "Setup", "SetupContext", "LeanStep",
           "default_setup"]
