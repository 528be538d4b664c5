"""The method registry: one :class:`~.spec.MethodSpec` per merge method, in one table.

A method is one file in this package that defines its plan function and a ``SPEC``; adding a
method means writing that file and naming its module in :data:`_MODULES` below. Everything else
reads the spec: the model adapter (which block form, whether the class-attention row is needed,
which options are valid), the budget solver in :mod:`vitmerge.models.budget` (the matching cost),
graph surgery (whether a per-block ``TokenMerge`` step exists, which hand-written native step stands
for it), the self-test (which options run without files), the CLI (choices and help), and the
property tests in ``tests/test_methods.py`` (which invariances each method promises). No module
outside a method's file and this registry names a method (``tests/test_registry.py`` keeps it so).
"""
from __future__ import annotations

from typing import Dict

from ..errors import ScheduleError
from . import bipartite, evo, hashing, importance, vwt
from .spec import MethodSpec

_MODULES = (bipartite, hashing, importance, evo, vwt)

#: name -> spec, in the order above (tome first: the default and the reference).
METHODS: Dict[str, MethodSpec] = {m.SPEC.name: m.SPEC for m in _MODULES}

#: the method every ``method=`` argument defaults to (the first in the table)
DEFAULT_METHOD: str = next(iter(METHODS))


def available_methods() -> list[str]:
    return list(METHODS)


def method_spec(method: str) -> MethodSpec:
    """The spec of ``method``, or a :class:`ScheduleError` listing the methods there are."""
    try:
        return METHODS[method]
    except (KeyError, TypeError):
        raise ScheduleError(f"unknown merge method {method!r}; available: {', '.join(available_methods())}") from None


__all__ = ["METHODS", "DEFAULT_METHOD", "available_methods", "method_spec"]
