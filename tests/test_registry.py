"""The registry is the one place a method is named: no module outside a method's own file
(``merging/<method>.py``) and ``merging/registry.py`` branches on a method's name, and a method that
only the registry knows goes through ``apply``, the forward pass, the schedule and the export checks.

Read from the source (AST), like tests/test_layers.py: a comparison with a method name (``method ==
"tome"``, ``method in ("tome", "importance")``, ``x in NAMES`` where NAMES is a literal list of method
names), a table keyed by a method name (dict literal keys), or a lookup by one (``METHODS["vwt"]``,
``.get("vwt")``). Default argument values (``method="tome"``) are not branches and are allowed.
"""
from __future__ import annotations

import ast
import importlib
import sys
from pathlib import Path

import pytest
import timm
import torch

import vitmerge
from vitmerge.errors import ScheduleError
from vitmerge.merging import METHODS, MergePlan, MethodSpec, Setup, method_spec, registry
from vitmerge.merging.spec import clamp

ROOT = Path(__file__).resolve().parents[1] / "vitmerge"
NAMES = frozenset(METHODS)
#: files allowed to name methods: each method's own file and the registry
OWN = {Path(sys.modules[s.plan.__module__].__file__).resolve() for s in METHODS.values()} | {
    Path(registry.__file__).resolve()}
#: string constants that equal a method name by coincidence: (file relative to vitmerge/, name, why)
COINCIDENCES = {("data/synthetic.py", "hash"): "the DTMF key '#' of the synthetic audio data, not the method"}


def _names_in(node) -> set:
    """Method names held by a string constant or a literal tuple / list / set of them."""
    if isinstance(node, ast.Constant) and isinstance(node.value, str) and node.value in NAMES:
        return {node.value}
    if isinstance(node, (ast.Tuple, ast.List, ast.Set)):
        return set().union(*(_names_in(e) for e in node.elts)) if node.elts else set()
    return set()


def branches_on_names(path: Path) -> list:
    """(line, what) for every place ``path`` branches on or looks up a method by its name."""
    tree = ast.parse(path.read_text(), str(path))
    rel = path.relative_to(ROOT).as_posix()
    # module-level NAME = ("tome", ...): a literal list of methods that a later ``x in NAME`` tests against
    lists = {}
    for node in tree.body:
        if isinstance(node, (ast.Assign, ast.AnnAssign)) and node.value is not None:
            targets = node.targets if isinstance(node, ast.Assign) else [node.target]
            held = _names_in(node.value)
            for t in targets:
                if isinstance(t, ast.Name) and held:
                    lists[t.id] = held
    found = []

    def hit(node, names, what):
        for n in sorted(names):
            if (rel, n) not in COINCIDENCES:
                found.append((node.lineno, f"{what} {n!r}"))

    for node in ast.walk(tree):
        if isinstance(node, ast.Compare):
            for operand in [node.left, *node.comparators]:
                hit(node, _names_in(operand), "compares with")
                if isinstance(operand, ast.Name) and operand.id in lists:
                    hit(node, lists[operand.id], f"tests membership in {operand.id}, which lists")
        elif isinstance(node, ast.Dict):
            for k in node.keys:
                if k is not None:
                    hit(node, _names_in(k) if isinstance(k, ast.Constant) else set(), "keys a table by")
        elif isinstance(node, ast.Subscript):
            hit(node, _names_in(node.slice) if isinstance(node.slice, ast.Constant) else set(), "looks up")
        elif (isinstance(node, ast.Call) and isinstance(node.func, ast.Attribute) and node.func.attr == "get"
              and node.args and isinstance(node.args[0], ast.Constant)):
            hit(node, _names_in(node.args[0]), "looks up")
    return found


def test_no_module_outside_a_method_file_branches_on_a_method_name():
    offenders = []
    for path in sorted(ROOT.rglob("*.py")):
        if path.resolve() in OWN:
            continue
        for line, what in branches_on_names(path):
            offenders.append(f"{path.relative_to(ROOT.parent)}:{line}: {what}")
    assert not offenders, ("method-specific behaviour belongs in the method's MethodSpec (merging/spec.py), "
                           "not in a branch on its name:\n" + "\n".join(offenders))


#: modules outside merging/ that may import a method's module: vwt's visual-word vocabulary is data with a
#: file format (models) and is built from images (calibration); both are vwt's own companions
METHOD_COMPANIONS = {"models/vocabulary.py", "calibration/vocabulary.py"}
METHOD_MODULES = {f"vitmerge.merging.{Path(p).stem}" for p in OWN if Path(p).stem != "registry"}


def test_only_the_registry_imports_a_method_module():
    """The model adapter, exporter and self-test reach a method through its spec, not its module."""
    offenders = []
    for path in sorted(ROOT.rglob("*.py")):
        rel = path.relative_to(ROOT).as_posix()
        if path.resolve() in OWN or rel in METHOD_COMPANIONS or rel.startswith("merging/"):
            continue
        package = ".".join(["vitmerge", *path.relative_to(ROOT).parent.parts])
        for node in ast.walk(ast.parse(path.read_text(), str(path))):
            if isinstance(node, ast.ImportFrom):
                base = package.split(".")[: len(package.split(".")) - (node.level - 1)] if node.level else []
                mod = ".".join(base + ([node.module] if node.module else []))
                targets = [mod] + [f"{mod}.{a.name}" for a in node.names]
            elif isinstance(node, ast.Import):
                targets = [a.name for a in node.names]
            else:
                continue
            offenders += [f"vitmerge/{rel}:{node.lineno}: imports {t}" for t in targets if t in METHOD_MODULES]
    assert METHOD_MODULES and not offenders, "\n".join(offenders)


def test_the_scan_finds_what_it_looks_for(tmp_path):
    """The scan itself: each pattern it is meant to catch is caught (a blind scan would pass anything)."""
    (tmp_path / "vitmerge").mkdir()
    f = tmp_path / "vitmerge" / "leak.py"
    f.write_text('LEAN = ("tome", "importance")\n'
                 'def f(method="tome", info=None):\n'  # a default: allowed
                 '    if method == "tome": pass\n'
                 '    if method in LEAN: pass\n'
                 '    if method not in ("hash", "evo"): pass\n'
                 '    opts = {"vwt": {"mode": "intra"}}\n'
                 '    return METHODS["vwt"], opts.get("evo")\n')
    global ROOT
    root, ROOT = ROOT, tmp_path / "vitmerge"
    try:
        found = branches_on_names(f)
    finally:
        ROOT = root
    assert [line for line, _ in found] == sorted([3, 4, 4, 5, 5, 6, 7, 7]), found


def test_every_lean_step_kind_exists_in_graph_surgery():
    from vitmerge.exporter import surgery

    for name, spec in METHODS.items():
        if spec.lean is not None:
            assert spec.lean.kind in surgery.LEAN_KINDS, name
    assert set(surgery.LEAN_METHODS) == {n for n, s in METHODS.items() if s.lean is not None}


def test_every_resource_kind_has_a_loader():
    apply_mod = importlib.import_module("vitmerge.models.apply")  # (vitmerge.models.apply is also the function)

    for name, spec in METHODS.items():
        for option, kind in spec.resources.items():
            assert kind in apply_mod.RESOURCE_LOADERS, (name, option, kind)


def test_a_form_needs_its_hooks():
    plan = METHODS["tome"].plan
    with pytest.raises(ValueError, match="slow_fast form needs the hook"):
        MethodSpec(name="x", plan=plan, max_r=lambda n, p: 0, summary="", form="slow_fast")
    with pytest.raises(ValueError, match="pre_encoder form needs the hook"):
        MethodSpec(name="x", plan=plan, max_r=lambda n, p: 0, summary="", form="pre_encoder")
    with pytest.raises(ValueError, match="resources"):
        MethodSpec(name="x", plan=plan, max_r=lambda n, p: 0, summary="", resources={"vocab": "vocabulary"})


# ------------------------------------------------------------------------------------------------
# A method only the registry knows
# ------------------------------------------------------------------------------------------------


def _toy_max_r(n_tokens: int, protected: int) -> int:
    return max(n_tokens - protected - 1, 0)


def _toy_plan(metric: torch.Tensor, r: int, protected: int = 1, keep_last: bool = False) -> MergePlan:
    """Merge the last r tokens (or, with keep_last, the r tokens before the last) into the first unprotected one."""
    B, N, _ = metric.shape
    r = clamp(r, _toy_max_r(N, protected))
    order = torch.arange(N)
    if keep_last:
        order = torch.cat([order[: N - r - 1], order[N - 1 :], order[N - r - 1 : N - 1]])
    keep = order[: N - r].expand(B, N - r)
    src = order[N - r :].expand(B, r)
    dst = torch.full((B, r), protected, dtype=torch.long)
    return MergePlan(keep=keep, src=src, dst=dst)


def _toy_setup(options, ctx) -> Setup:
    assert ctx.method == "toy" and ctx.protected == 1 and ctx.n_tokens == 17
    flag = bool(options.get("keep_last", False))
    return Setup(plan_options={"keep_last": flag}, info={"keep_last": flag})


TOY = MethodSpec(name="toy", plan=_toy_plan, max_r=_toy_max_r, summary="test-only: merges the last tokens",
                 options={"keep_last": False}, setup=_toy_setup)


@pytest.fixture
def toy(monkeypatch):
    monkeypatch.setitem(METHODS, "toy", TOY)
    return TOY


def tiny():
    torch.manual_seed(0)
    return timm.create_model("vit_tiny_patch16_224", pretrained=False, img_size=64, depth=2).eval()


@pytest.mark.parametrize("keep_last", [False, True])
def test_a_method_registered_only_in_the_registry_merges(toy, keep_last):
    model = tiny()
    x = torch.randn(2, 3, 64, 64)
    vitmerge.apply(model, "toy", r=[3, 2], keep_last=keep_last)
    info = model.vitmerge
    assert info.method == "toy" and info.tokens == [(17, 3, 14), (14, 2, 12)]
    assert info.options == {"keep_last": keep_last}
    assert model._vm_state.options == {"keep_last": keep_last}
    y = model(x)
    assert y.shape == (2, model.num_classes) and torch.isfinite(y).all()
    # the same forward, written out: attention, the toy plan, MLP
    ref = tiny()
    h = ref.norm_pre(ref._pos_embed(ref.patch_embed(x)))
    size = torch.ones(2, 17, 1)
    from vitmerge.models.vit import attention_with_metric

    for blk, r in zip(ref.blocks, [3, 2]):
        out, metric = attention_with_metric(blk.attn, blk.norm1(h), size)
        h = h + blk.ls1(out)
        h, size = _toy_plan(metric, r, 1, keep_last=keep_last).merge(h, size)
        h = h + blk.ls2(blk.mlp(blk.norm2(h)))
    assert torch.allclose(y, ref.forward_head(ref.norm(h)), atol=1e-5)
    vitmerge.remove(model)
    assert not hasattr(model, "vitmerge")


def test_a_registry_only_method_gets_the_shared_checks(toy):
    with pytest.raises(ScheduleError, match="unknown option"):
        vitmerge.apply(tiny(), "toy", r=2, colour="red")
    with pytest.raises(ScheduleError, match="too large.*one toy step.*r <= 15"):
        vitmerge.apply(tiny(), "toy", r=16)
    with pytest.raises(ScheduleError, match="r must be >= 0"):
        vitmerge.apply(tiny(), "toy", r=-1)
    assert method_spec("toy").plugin and "toy" in vitmerge.merging.available_methods()


def test_a_registry_only_method_plans_and_schedules(toy):
    from vitmerge.merging import effective_r, plan
    from vitmerge.merging.schedule import token_counts

    p = plan("toy", torch.randn(1, 9, 4), 3)
    assert p.keep.shape == (1, 6)
    assert effective_r("toy", 9, 20, 1) == 7
    assert token_counts(9, [3, 3, 3], 1, toy.clamp_r) == [(9, 3, 6), (6, 3, 3), (3, 1, 2)]
