"""The contract every merge method declares: :class:`MethodSpec` (see :mod:`.registry`)."""
from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any, Callable, Mapping, Optional

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


@dataclass(frozen=True)
class MethodSpec:
    """Everything the rest of vitmerge needs to know about one merge method."""

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

    def __post_init__(self):
        if self.form not in FORMS:
            raise ValueError(f"{self.name}: form must be one of {FORMS}, got {self.form!r}")
        if self.invariance not in INVARIANCES:
            raise ValueError(f"{self.name}: invariance must be one of {INVARIANCES}, got {self.invariance!r}")

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



__all__ = ["MethodSpec", "PlanFn", "FORMS", "INVARIANCES", "MatchFlops", "clamp"]
