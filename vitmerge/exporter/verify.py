"""Check an exported file: ONNX checker, then ONNX Runtime vs PyTorch on the same random batches;
and compare two files (two graph forms of one model) in ONNX Runtime.

Two rules, by what the model computes in:

* **float32** (``rule="max"``): max |logit diff| <= ``atol + rtol * max |reference|`` at every batch.
  Merge decisions (which token went to which slot, every step) are compared too and reported.
* **float16** (``rule="decisions"``): tome, hash and importance choose tokens from scores, so a rounding
  difference near a tie can flip a decision and move that image's logits by far more than rounding; in
  float16 a flip is common on random inputs (whose tokens are all about equally alike), and it cascades
  through the image's later steps. So the file's own decisions (its ``merge_decisions.*`` outputs) are
  taken into PyTorch (:func:`~vitmerge.models.vit.forcing`): on every image, max |diff| against PyTorch run
  with the *file's* decisions is within the (wider) tolerance and top-1 agrees, which checks every
  image's arithmetic, flipped or not; and over all images at least :data:`MIN_FORCED_DECISIONS` of the
  decisions are PyTorch's own (rounding flips near-ties; a wrong decision rule scrambles them wholesale).
  Where decisions cannot be forced (a slow-fast split keeps a chosen token per slot) the older rule
  holds: at least ``min_decisions`` identical per batch, and logits compared on the images whose
  decisions all match. The report says which rule ran and with what numbers.

ONNX Runtime's CPU provider has float16 kernels but (almost) no bfloat16 ones, so a bfloat16 file
is run as an *upcast copy*: every bfloat16 tensor, cast and constant made float32, compared with the
model upcast the same way in PyTorch. That proves the graph computes what the model computes; the
bfloat16 numerics themselves are then PyTorch's (reported as the agreement with float32).
"""
from __future__ import annotations

import copy
from dataclasses import dataclass, field
from pathlib import Path
from typing import Dict, List, Optional, Sequence, Tuple, Union

import numpy as np
import onnx
import torch
from onnx import numpy_helper
from torch import nn

from ..backends.ort import OrtRunner
from ..errors import ModelNotFoundError, SurgeryError, VerificationError
from ..models import input_shape
from ..models.precision import cast_model, dtype_name, model_dtype
from ..models.family import forward_outputs
from ..models.vit import forcing, recording
from .onnx_export import DECISIONS

PathLike = Union[str, Path]

#: (atol, rtol) per dtype the file is checked in; bfloat16 files are checked as float32 upcast copies
TOLERANCES = {torch.float32: (1e-4, 1e-3), torch.float16: (1e-2, 2e-2), torch.bfloat16: (1e-4, 1e-3)}
MIN_DECISIONS = 0.99  # reduced precision, decisions not forced: share of merge decisions that must match PyTorch's
#: reduced precision with the file's decisions forced into PyTorch: share of decisions over all images that must match
MIN_FORCED_DECISIONS = 0.9


@dataclass
class BatchCheck:
    batch: int
    max_abs_diff: float  # over all images (rule "max") or the images whose decisions all match ("decisions")
    max_abs_ref: float
    top1_agreement: float  # over all images
    tolerance: float
    decisions_identical: Optional[float] = None  # share of merge decisions equal to the reference's (None: no merging)
    images_compared: Optional[int] = None  # images the max |diff| was taken over
    top1_compared: Optional[float] = None  # top-1 agreement over those images
    rule: str = "max"
    min_decisions: float = MIN_DECISIONS
    #: the graph's other outputs (detectors: ``boxes``): name -> (max |diff|, tolerance), same images and rule
    outputs: Dict[str, Tuple[float, float]] = field(default_factory=dict)
    #: images compared with PyTorch run with the file's own decisions (theirs differed); None: not forced
    forced_images: Optional[int] = None

    @property
    def ok(self) -> bool:
        return passes(self)


def passes(c: BatchCheck) -> bool:
    """Whether one batch passes its rule (the body of :attr:`BatchCheck.ok`, a plain function so that
    mutation testing, which leaves decorated functions alone, reaches it)."""
    close = bool(np.isfinite(c.max_abs_diff)) and c.max_abs_diff <= c.tolerance \
        and all(bool(np.isfinite(d)) and d <= t for d, t in c.outputs.values())
    if c.rule == "max":
        return close
    share_ok = c.forced_images is not None or c.decisions_identical is None or c.decisions_identical >= c.min_decisions
    return share_ok and close and (c.top1_compared is None or c.top1_compared == 1.0)


def forced_share(checks: Sequence[BatchCheck]) -> Optional[Tuple[float, float]]:
    """(share of identical decisions over the images of every forced check, its floor), or None when no check
    was forced (their floor is checked over all images together: one image's flip weighs 1 / images, not 1 / B)."""
    forced = [c for c in checks if c.forced_images is not None and c.decisions_identical is not None]
    if not forced:
        return None
    images = sum(c.batch for c in forced)
    return sum(c.decisions_identical * c.batch for c in forced) / images, min(c.min_decisions for c in forced)


@dataclass
class VerifyReport:
    path: str
    checks: List[BatchCheck] = field(default_factory=list)
    dtype: str = "fp32"
    how: str = "ONNX Runtime CPU vs PyTorch"
    vs_fp32: Dict[str, float] = field(default_factory=dict)  # reduced precision: PyTorch at dtype vs float32
    #: the widest integer the file computed on the verification inputs: (max |value|, "op node tensor"); None: not run
    int_extent: Optional[Tuple[int, str]] = None
    #: integer tensors that left the int32 range (exporter.intrange.IntRange), which fails the check
    int_violations: List = field(default_factory=list)

    @property
    def ok(self) -> bool:
        pooled = forced_share(self.checks)
        return all(c.ok for c in self.checks) and not self.int_violations and (pooled is None or pooled[0] >= pooled[1])

    @property
    def max_abs_diff(self) -> float:
        return max(c.max_abs_diff for c in self.checks)

    @property
    def top1_agreement(self) -> float:
        return min(c.top1_agreement for c in self.checks)

    @property
    def output_diffs(self) -> Dict[str, float]:
        """max |diff| of every output beyond the logits (detectors: ``boxes``) over all batches."""
        out: Dict[str, float] = {}
        for c in self.checks:
            for n, (d, _) in c.outputs.items():
                out[n] = max(out.get(n, 0.0), d)
        return out

    @property
    def decisions_identical(self) -> Optional[float]:
        vals = [c.decisions_identical for c in self.checks if c.decisions_identical is not None]
        return min(vals) if vals else None

    def describe_rule(self) -> str:
        """One line saying which check ran, with its tolerance, for the export report."""
        if not self.checks:
            return "not verified"
        c = self.checks[0]
        tol = f"atol + rtol * max|ref| ({c.tolerance:.1e} at batch {c.batch})"
        also = "".join(f", max|{n} diff| <= its own atol + rtol * max|ref|" for n in c.outputs)
        if c.rule == "max":
            return f"{self.dtype}, {self.how}: max|logit diff| <= {tol}{also} at every batch" + (
                "" if c.decisions_identical is None else "; merge decisions compared and reported")
        if c.decisions_identical is None:
            return (f"{self.dtype}, {self.how}: no merge decisions to compare; on every image max|logit diff| <= "
                    f"{tol}{also} and top-1 agrees")
        if c.forced_images is not None:
            return (f"{self.dtype}, {self.how}: >= {c.min_decisions:.0%} of merge decisions identical over all images, "
                    f"and on every image max|logit diff| <= {tol}{also} and top-1 agrees against PyTorch run with the "
                    "file's own merge decisions")
        return (f"{self.dtype}, {self.how}: >= {c.min_decisions:.0%} of merge decisions identical, and on images whose "
                f"decisions all match max|logit diff| <= {tol} and top-1 agrees")


def check_onnx(path: PathLike, proto: Optional[onnx.ModelProto] = None) -> None:
    """The ONNX checker with full shape inference; :class:`VerificationError` when it rejects the file.
    ``proto``: the model of ``path`` in memory (checked instead of reading the file)."""
    try:
        onnx.checker.check_model(str(path) if proto is None else proto, full_check=True)
    except Exception as e:
        raise VerificationError(f"ONNX checker rejected {path}: {e}") from None


def decision_share(ref: Sequence[np.ndarray], out: Sequence[np.ndarray]) -> tuple[float, np.ndarray]:
    """(share of identical entries over all steps, [B] bool: image has every decision identical)."""
    if len(ref) != len(out):
        raise VerificationError(f"{len(out)} merge-decision outputs, but the model has {len(ref)} merge steps")
    if not ref:
        return 1.0, np.ones(0, dtype=bool)
    equal = [np.asarray(r) == np.asarray(o) for r, o in zip(ref, out)]
    total = sum(e.size for e in equal)
    share = float(sum(int(e.sum()) for e in equal) / total)
    per_image = np.logical_and.reduce([e.reshape(e.shape[0], -1).all(axis=1) for e in equal])
    return share, per_image


def batch_check(batch: int, ref: np.ndarray, out: np.ndarray, atol: float, rtol: float,
                ref_decisions: Optional[Sequence[np.ndarray]] = None,
                out_decisions: Optional[Sequence[np.ndarray]] = None, rule: str = "max",
                min_decisions: float = MIN_DECISIONS,
                extra: Optional[Dict[str, Tuple[np.ndarray, np.ndarray]]] = None,
                forced: Optional[Dict[str, np.ndarray]] = None) -> BatchCheck:
    """Compare one batch of outputs (and, when given, merge decisions) with the reference.

    ``ref`` / ``out``: the logits; ``extra``: the other outputs, name -> (reference, output), each checked
    with its own tolerance ``atol + rtol * max |reference|`` on the same images. ``forced`` (rule "decisions"):
    the reference model's outputs when run with ``out_decisions`` (``logits`` and every name of ``extra``): the
    images whose decisions differ are compared with them, so every image is compared."""
    if out.shape != ref.shape:
        raise VerificationError(f"output shape {out.shape} != reference {ref.shape} at batch {batch}")
    ref, out = ref.astype(np.float64), out.astype(np.float64)
    scale = float(np.abs(ref).max())
    agree = float((out.argmax(-1) == ref.argmax(-1)).mean())
    share, mask = None, np.ones(ref.shape[0], dtype=bool)
    if ref_decisions is not None and out_decisions is not None:
        share, mask = decision_share(ref_decisions, out_decisions)
        if not ref_decisions:
            share, mask = None, np.ones(ref.shape[0], dtype=bool)
    forced_images = None
    if rule == "max":
        mask = np.ones(ref.shape[0], dtype=bool)
    elif forced is not None and share is not None:
        forced_images = int((~mask).sum())

        def take(own, theirs):  # own rows where the decisions match, the forced run's elsewhere
            own = np.asarray(own, dtype=np.float64)
            return np.where(mask.reshape(-1, *[1] * (own.ndim - 1)), own, np.asarray(theirs, dtype=np.float64))

        ref = take(ref, forced["logits"])
        extra = {n: (take(r_o, forced[n]), o_o) for n, (r_o, o_o) in (extra or {}).items()}
        mask = np.ones(ref.shape[0], dtype=bool)
    diff = float(np.abs(out[mask] - ref[mask]).max()) if mask.any() else 0.0
    top1 = float((out[mask].argmax(-1) == ref[mask].argmax(-1)).mean()) if mask.any() else None
    others = {}
    for name, (r_o, o_o) in (extra or {}).items():
        r_o, o_o = np.asarray(r_o, dtype=np.float64), np.asarray(o_o, dtype=np.float64)
        if r_o.shape != o_o.shape:
            raise VerificationError(f"output {name!r} shape {o_o.shape} != reference {r_o.shape} at batch {batch}")
        d = float(np.abs(o_o[mask] - r_o[mask]).max()) if mask.any() and r_o.size else 0.0
        others[name] = (d, atol + rtol * float(np.abs(r_o).max() if r_o.size else 0.0))
    return BatchCheck(int(batch), diff, scale, agree, atol + rtol * scale, decisions_identical=share,
                      images_compared=int(mask.sum()), top1_compared=top1, rule=rule, min_decisions=min_decisions,
                      outputs=others, forced_images=forced_images)


def upcast_copy(src: PathLike, dst: PathLike) -> Path:
    """Write ``src`` with every bfloat16 tensor, cast, constant and type made float32 to ``dst``."""
    onnx.save(upcast(onnx.load(str(src))), str(dst))
    return Path(dst)


def upcast(model: onnx.ModelProto) -> onnx.ModelProto:
    """A copy of ``model`` with every bfloat16 tensor, cast, constant and type made float32."""
    proto = onnx.ModelProto()
    proto.CopyFrom(model)
    bf16, f32 = onnx.TensorProto.BFLOAT16, onnx.TensorProto.FLOAT

    def fix_tensor(t):
        if t.data_type == bf16:
            arr = numpy_helper.to_array(t).astype(np.float32)
            t.CopyFrom(numpy_helper.from_array(arr, t.name))

    def fix_graph(g):
        for t in g.initializer:
            fix_tensor(t)
        for vi in list(g.input) + list(g.output) + list(g.value_info):
            if vi.type.tensor_type.elem_type == bf16:
                vi.type.tensor_type.elem_type = f32
        for n in g.node:
            for a in n.attribute:
                if n.op_type == "Cast" and a.name == "to" and a.i == bf16:
                    a.i = f32
                elif a.type == onnx.AttributeProto.TENSOR:
                    fix_tensor(a.t)
                elif a.type == onnx.AttributeProto.GRAPH:
                    fix_graph(a.g)

    fix_graph(proto.graph)
    return proto


def _torch_outputs(model: nn.Module, x: torch.Tensor, with_decisions: bool):
    """({output name: float32 array}, [decision per merge step] or None) of one forward."""
    dtype = model_dtype(model)
    with recording(model, with_decisions):
        outs = {k: v.float().numpy() for k, v in forward_outputs(model, x.to(dtype)).items()}
        state = getattr(model, "_vm_state", None)
        dec = [d.numpy() for d in state.decisions] if with_decisions and state is not None else None
    return outs, dec


def verify(
    model: nn.Module,
    path: PathLike,
    batch_sizes: Sequence[int] = (1, 4),
    seed: int = 0,
    atol: Optional[float] = None,
    rtol: Optional[float] = None,
    runner: Optional[OrtRunner] = None,
    reference_fp32: Optional[nn.Module] = None,
    proto: Optional[onnx.ModelProto] = None,
) -> VerifyReport:
    """Run the same random images through PyTorch and ONNX Runtime and compare (see the module
    docstring for the two rules). The file's ``merge_decisions.*`` outputs, when it has them, are
    compared with PyTorch's decisions. Tolerance per batch: atol + rtol * max|reference output|
    (defaults by dtype: :data:`TOLERANCES`).

    ``reference_fp32``: for a reduced-precision model, the float32 model it came from; PyTorch at the
    reduced precision is compared with it (top-1 agreement, identical decisions) in ``report.vs_fp32``.
    ``proto``: the model of ``path`` in memory (an export verifies it before writing it); the file is then not read.
    """
    # torch.no_grad as a block, not a decorator: mutation testing leaves decorated functions alone
    with torch.no_grad():
        model = model.eval()
        dtype = model_dtype(model)
        d_atol, d_rtol = TOLERANCES.get(dtype, TOLERANCES[torch.float32])
        atol = d_atol if atol is None else atol
        rtol = d_rtol if rtol is None else rtol
        ref_model, how = model, "ONNX Runtime CPU vs PyTorch"
        run_path, run_proto = Path(path), proto
        if dtype == torch.bfloat16:  # ONNX Runtime's CPU provider has no bfloat16 kernels: run the upcast copy
            run_proto = upcast(onnx.load(str(run_path)) if proto is None else proto)  # in memory, never written
            run_path, runner = run_path.with_name(f".{run_path.stem}.upcast.onnx"), None
            ref_model = cast_model(copy.deepcopy(model), torch.float32)
            how = "float32 upcast copy in ONNX Runtime CPU vs the model upcast in PyTorch (no bfloat16 CPU kernels)"
        run = runner or OrtRunner(run_path, proto=run_proto)
        names = [o.name for o in run.session.get_outputs()]
        dec_names = [n for n in names if n.startswith(DECISIONS)]
        rule = "max" if dtype == torch.float32 or dtype == torch.bfloat16 else "decisions"
        state = getattr(ref_model, "_vm_state", None)
        # the decisions rule takes the file's own decisions into PyTorch where a merge step can run on them
        force = rule == "decisions" and bool(dec_names) and state is not None and state.spec.form != "slow_fast"
        gen = torch.Generator().manual_seed(seed)
        shape = input_shape(model)
        report = VerifyReport(path=str(path), dtype=dtype_name(dtype), how=how)
        agree32, dec32, n32 = 0.0, [], 0
        out_names = [n for n in names if not n.startswith(DECISIONS)]
        for b in batch_sizes:
            x = torch.randn(b, *shape, generator=gen)
            ref_all, ref_dec = _torch_outputs(ref_model, x, bool(dec_names))
            if list(ref_all) != out_names:
                raise VerificationError(f"{path} has outputs {out_names}, but the model gives {list(ref_all)}: "
                                        "export it again from this model")
            outs = run.session.run(None, {run.input_name: x.numpy().astype(run.input_dtype)})
            got = {n: o for n, o in zip(names, outs)}
            out_dec = [got[n] for n in sorted(dec_names, key=lambda n: int(n[len(DECISIONS):]))] if dec_names else None
            ref = ref_all[out_names[0]]
            extra = {n: (ref_all[n], got[n]) for n in out_names[1:]}
            forced = None
            if force and out_dec is not None and len(out_dec) == len(ref_dec or []):
                theirs = ref_all  # every decision PyTorch's own: its run is the run on the file's decisions
                if not decision_share(ref_dec, out_dec)[1].all():
                    with forcing(ref_model, out_dec):
                        theirs, _ = _torch_outputs(ref_model, x, False)
                forced = dict(theirs, logits=theirs[out_names[0]])
            report.checks.append(batch_check(b, ref, np.asarray(got[out_names[0]], dtype=np.float32), atol, rtol,
                                             ref_dec, out_dec, rule=rule, extra=extra, forced=forced,
                                             min_decisions=MIN_FORCED_DECISIONS if forced is not None else MIN_DECISIONS))
            if reference_fp32 is not None and dtype != torch.float32:
                r32, d32 = _torch_outputs(reference_fp32.eval(), x, True)
                # fp16: the reference forward above was this model with its decisions recorded; bf16 ran an upcast copy
                low, dlow = (ref_all, ref_dec) if ref_model is model and dec_names else _torch_outputs(model, x, True)
                r32, low = next(iter(r32.values())), next(iter(low.values()))
                same = low.argmax(-1) == r32.argmax(-1)  # [B] for a classifier, [B, queries] for a detector
                agree32 += float(same.sum())
                n32 += same.size
                if d32:
                    dec32.append(decision_share(d32, dlow)[0])
        if n32:
            report.vs_fp32 = {"top1_agreement": agree32 / n32}
            if dec32:
                report.vs_fp32["decisions_identical"] = float(np.mean(dec32))
        return report


def weight_difference(a: PathLike, b: PathLike) -> Tuple[int, int, List[str]]:
    """(initializers whose values differ, initializers both files hold under the same name, up to 3 names that
    differ): two forms of one model share every weight; two random draws (exports without a checkpoint and with
    different seeds) share none."""
    import hashlib

    def digests(p):
        proto = onnx.load(str(p))
        return {t.name: hashlib.sha1(numpy_helper.to_array(t).tobytes()).hexdigest() for t in proto.graph.initializer}

    da, db = digests(a), digests(b)
    common = sorted(set(da) & set(db))
    differ = [n for n in common if da[n] != db[n]]
    return len(differ), len(common), differ[:3]


def compare_files(a: PathLike, b: PathLike, batch_sizes: Sequence[int] = (1, 4), atol: float = 1e-4,
                  rtol: float = 1e-3, seed: int = 0, threads: int = 0) -> List[BatchCheck]:
    """Run ``a`` and ``b`` in ONNX Runtime (CPU) on the same random images; ``a`` is the reference.

    Returns one :class:`BatchCheck` per batch size: max |diff|, top-1 agreement and tolerance
    atol + rtol * max |a| of the first output (logits), and the same max |diff| / tolerance of every other
    output (detectors: ``boxes``) in ``outputs``. The merge-decision outputs of a debug export are not
    compared. Graphs with TokenMerge nodes get the custom-op kernel registered.
    """
    for p in (a, b):
        if not Path(p).is_file():
            raise ModelNotFoundError(f"no ONNX file at {str(p)!r}")
    return compare_runners(OrtRunner(a, threads=threads), OrtRunner(b, threads=threads), batch_sizes, atol, rtol, seed)


def compare_runners(ra: OrtRunner, rb: OrtRunner, batch_sizes: Sequence[int] = (1, 4), atol: float = 1e-4,
                    rtol: float = 1e-3, seed: int = 0) -> List[BatchCheck]:
    """:func:`compare_files` of two open files (``ra`` the reference); an export compares its forms in memory."""
    a, b = ra.path, rb.path
    if ra.input_shape != rb.input_shape:
        raise SurgeryError(f"the two graphs take different inputs: {a} {ra.input_shape}, {b} {rb.input_shape}")
    names_a = [n for n in ra.output_names if not n.startswith(DECISIONS)]
    names_b = [n for n in rb.output_names if not n.startswith(DECISIONS)]
    if names_a != names_b:
        raise SurgeryError(f"the two graphs have different outputs: {Path(a).name} {names_a}, {Path(b).name} "
                           f"{names_b}: compare two forms of the same model")
    rng = np.random.default_rng(seed)
    checks = []
    for n in batch_sizes:
        x = rng.standard_normal((int(n), *ra.input_shape), dtype=np.float32)
        oa, ob = ra.outputs(x), rb.outputs(x)
        extra = {k: (oa[k].numpy(), ob[k].numpy()) for k in names_a[1:]}
        checks.append(batch_check(n, oa[names_a[0]].numpy(), ob[names_a[0]].numpy(), atol, rtol, extra=extra))
    return checks


__all__ = ["BatchCheck", "VerifyReport", "batch_check", "verify", "compare_files", "compare_runners", "weight_difference", "check_onnx", "upcast_copy", "upcast",
           "decision_share", "forced_share", "TOLERANCES", "MIN_DECISIONS", "MIN_FORCED_DECISIONS"]
