"""``export(model, path)``: ONNX with static token counts, checked and verified before it is written."""
from __future__ import annotations

import copy
import logging
from dataclasses import dataclass, field
from pathlib import Path
import json
from typing import Callable, Dict, Optional, Sequence, Union

import onnx
import torch
from torch import nn

from .. import metadata as md
from .._io import staged
from ..errors import VerificationError
from ..models.precision import cast_model, dtype_name, model_dtype, resolve_dtype
from .onnx_export import (
    DEFAULT_OPSET,
    is_large,
    program_proto,
    TENSORRT_TOPK_MAX,
    INPUT_NAME,
    OUTPUT_NAME,
    check_output_path,
    decision_steps,
    drop_decisions,
    export_onnx_program,
    large_topk,
    metadata,
    output_files,
    save_program,
)
from .surgery import LEAN_METHODS, rewrite, rewrite_model
from .intrange import integer_ranges, random_inputs
from .trt_check import Readiness, check_tensorrt
from .verify import VerifyReport, check_onnx, compare_files, forced_share, verify


log = logging.getLogger(__name__)


@dataclass
class ExportResult:
    path: Path
    verification: Optional[VerifyReport]
    #: nodes of each merge step in the written file (block -> count; empty without merging)
    step_nodes: Dict[int, int] = field(default_factory=dict)
    form: str = "native"


def export(
    model: nn.Module,
    output: Union[str, Path],
    opset: int = DEFAULT_OPSET,
    check: bool = True,
    batch_sizes: Sequence[int] = (1, 4),
    atol: Optional[float] = None,
    rtol: Optional[float] = None,
    on_step: Optional[Callable[[str], None]] = None,
    merge_op: str = "native",
    dtype: Union[str, torch.dtype, None] = None,
) -> ExportResult:
    """Export ``model`` (plain or patched by :func:`vitmerge.apply`) to ``output``.

    The file is written to a private staging folder, run through the ONNX checker and compared
    with PyTorch in ONNX Runtime at every batch size in ``batch_sizes`` (one file, dynamic batch);
    only then is it moved to ``output``. Any failure leaves no output file.

    merge_op: the graph form of every merge step: ``native`` (the default: ToMe and importance steps
    rewritten into the lean hand-written step of :mod:`.lean`, every other step as exported), ``standard``
    (as exported) or ``plugin`` (one ``vitmerge::TokenMerge`` node each). Every form is exported with the
    merged rows added by a one-hot MatMul (no ScatterND with a reduction: TensorRT-ready and deterministic).
    dtype: ``fp32`` / ``fp16`` / ``bf16`` (default: what the model is in). A reduced-precision export
    casts a copy of the model (:func:`vitmerge.models.precision.cast_model`: merge steps stay float32,
    inputs and outputs are float32) and is verified with the decision rule of :mod:`.verify`; the
    float32 model is the reference its agreement is reported against.
    """
    def step(what: str) -> None:
        log.info("export %s: %s", Path(output).name, what)
        if on_step is not None:
            on_step(what)

    out = check_output_path(output)
    reference_fp32 = None
    if dtype is not None and resolve_dtype(dtype) != model_dtype(model):
        if model_dtype(model) == torch.float32:
            reference_fp32 = model
        model = cast_model(copy.deepcopy(model), dtype)
    elif model_dtype(model) != torch.float32:
        reference_fp32 = cast_model(copy.deepcopy(model), torch.float32)
    decisions = check and decision_steps(model) > 0
    if merge_op not in md.MERGE_OPS:
        raise ValueError(f"merge_op must be one of {', '.join(md.MERGE_OPS)}, got {merge_op!r}")
    with staged(*output_files(out)) as stage:
        step("tracing with torch.export and translating to ONNX")
        # every sum of merged rows is a one-hot MatMul, never a ScatterND-add: TensorRT's parser refuses the
        # latter, and ONNX Runtime runs it racing across threads (outputs that change from run to run)
        program = export_onnx_program(model, opset=opset, decisions=decisions, scatter_free=True)
        # The model travels between the steps below in memory (``proto``) and is written once, at the end; a model
        # over protobuf's 2 GB cap is written now and each step reads the file (``proto`` None)
        if is_large(model):
            step("writing")
            written, proto = save_program(program, model, stage, out.name), None
        else:
            written, proto = stage / out.name, program_proto(program, model)
        del program
        big = large_topk(proto if proto is not None else onnx.load(str(written), load_external_data=False))
        if big:
            log.warning("%s: %d TopK node(s) sort more than %d values (k up to %d): ONNX Runtime runs them, "
                        "TensorRT's TopK layer refuses k > %d (fewer tokens, or a method without full sorts, "
                        "keeps the graph TensorRT-ready)", out.name, len(big), TENSORRT_TOPK_MAX, max(big),
                        TENSORRT_TOPK_MAX)
        report = None
        if check:
            step("ONNX checker")
            check_onnx(written, proto)
            step(f"ONNX Runtime vs PyTorch ({dtype_name(model_dtype(model))}, merge decisions compared)"
                 if decisions else f"ONNX Runtime vs PyTorch ({dtype_name(model_dtype(model))})")
            report = verify(model, written, batch_sizes=batch_sizes, atol=atol, rtol=rtol,
                            reference_fp32=reference_fp32, proto=proto)
            _raise_unless_ok(report)
            drop_decisions(written, proto)  # the file computes its outputs (logits, detectors' boxes) and nothing else
        # float16: a surgery form is checked against this verified standard form in ONNX Runtime (the same float16
        # kernels around merge steps that both compute in float32), not against PyTorch again: it has no decision
        # outputs, so a rounding flip between ONNX Runtime and PyTorch could not be told from an error there
        standard = None
        if check and proto is not None and report is not None and report.checks and report.checks[0].rule == "decisions":
            standard = onnx.ModelProto()
            standard.CopyFrom(proto)
        info = getattr(model, "vitmerge", None)
        if merge_op == "native" and (info is None or info.method not in LEAN_METHODS):
            # no hand-written step for this method: its native form is the exporter's own (scatter-free) graph
            if proto is None:
                large = onnx.load(str(written), load_external_data=False)
                md.write(large, {md.MERGE_OP: "native"})
                onnx.save(large, str(written))
            else:
                md.write(proto, {md.MERGE_OP: "native"})
        elif merge_op != "standard":
            step(f"graph surgery: merge steps -> {merge_op} form")
            if proto is None:
                rewrite(written, written, merge_op)  # through the ONNX checker
            else:
                proto, _ = rewrite_model(proto, merge_op, out.name)  # through the ONNX checker
            if check and standard is not None:
                step(f"ONNX Runtime: {merge_op} form vs the verified standard form")
                final = compare_forms(standard, written, proto, batch_sizes, report, atol, rtol)
                _raise_unless_ok(final, f" ({merge_op} form)")
            elif check:
                step(f"ONNX Runtime vs PyTorch, {merge_op} form")
                final = verify(model, written, batch_sizes=batch_sizes, atol=atol, rtol=rtol, proto=proto)
                _raise_unless_ok(final, f" ({merge_op} form)")
        if report is not None:
            step("integer ranges (every integer tensor must stay inside int32)")
            check_integers(report, written, batch_sizes, proto)
            report.path = str(out)
        final_proto = proto if proto is not None else onnx.load(str(written), load_external_data=False)
        md_steps = step_nodes(final_proto)
        if md_steps:
            md.write(final_proto, {md.STEP_NODES: json.dumps(md_steps)})
        if md_steps or proto is not None:
            step("writing")
            onnx.save(final_proto, str(written))  # the one write (in-memory models)
    return ExportResult(path=out, verification=report, step_nodes=md_steps, form=merge_op)


def check_integers(report: VerifyReport, path: Path, batch_sizes: Sequence[int] = (1, 4),
                   proto: Optional[onnx.ModelProto] = None) -> None:
    """Run ``path`` with every integer tensor exposed (:mod:`.intrange`) on random batches of each size;
    record the widest value in ``report`` and raise :class:`VerificationError` naming every node whose
    integers leave int32 (TensorRT and other runtimes compute INT64 as INT32: they would wrap there).
    ``proto``: the model of ``path`` in memory (the file is then not read)."""
    path = Path(path)
    head = proto if proto is not None else md.load_proto(path)
    if md.read(head).get(md.DTYPE) == "bf16":  # no bfloat16 CPU kernels: its float32 upcast copy, in memory
        from .verify import upcast

        up = upcast(proto if proto is not None else onnx.load(str(path)))
        ranges = integer_ranges(path, random_inputs(path, batch_sizes, proto=up), proto=up)
    else:
        ranges = integer_ranges(path, random_inputs(path, batch_sizes, proto=head), proto=proto)
    if ranges:
        widest = max(ranges, key=lambda r: max(abs(r.lo), abs(r.hi)))
        report.int_extent = (max(abs(widest.lo), abs(widest.hi)), f"{widest.op} {widest.node} ({widest.tensor})")
    report.int_violations = [r for r in ranges if not r.ok]
    if report.int_violations:
        bad = "; ".join(r.describe() for r in report.int_violations[:5])
        more = f" (and {len(report.int_violations) - 5} more)" if len(report.int_violations) > 5 else ""
        raise VerificationError(
            f"integers outside the int32 range: {bad}{more}. ONNX Runtime computes them exactly, but TensorRT (and "
            "other runtimes that run INT64 as INT32) would wrap them and compute something else. The file was not "
            "written; this is a bug in vitmerge's export of this method: please report it")


def step_nodes(proto) -> Dict[int, int]:
    """Nodes per merge step (its name scope ``blocks.N.token_merge``), block -> count; -1 is vwt's grouping step
    before the encoder (``vwt_merge``)."""
    from .surgery import _SCOPE

    count: Dict[int, int] = {}
    for n in proto.graph.node:
        ns = next((p.value for p in n.metadata_props if p.key == "namespace"), "")
        m = _SCOPE.search(ns)
        b = int(m.group(2)) if m else (-1 if "vwt_merge" in ns else None)  # -1: vwt's step before the encoder
        if b is not None:
            count[b] = count.get(b, 0) + 1
    return dict(sorted(count.items()))


def compare_forms(standard: onnx.ModelProto, path: Path, proto: onnx.ModelProto, batch_sizes: Sequence[int],
                  report: VerifyReport, atol: Optional[float], rtol: Optional[float]) -> VerifyReport:
    """The graph-surgery form at ``path`` (``proto``) against the verified ``standard`` form, both in ONNX Runtime
    CPU on the same random images, with the tolerance ``report`` was checked with (its dtype's defaults)."""
    from ..backends.ort import OrtRunner
    from .verify import TOLERANCES, compare_runners

    d_atol, d_rtol = TOLERANCES[resolve_dtype(report.dtype)]
    ref = OrtRunner(path.with_name(f".{path.stem}.standard.onnx"), proto=standard)
    checks = compare_runners(ref, OrtRunner(path, proto=proto), batch_sizes, d_atol if atol is None else atol,
                             d_rtol if rtol is None else rtol)
    return VerifyReport(path=str(path), checks=checks, dtype=report.dtype,
                        how="ONNX Runtime CPU, this form vs the verified standard form")


def _raise_unless_ok(report: VerifyReport, what: str = "") -> None:
    if report.ok:
        return
    bad = []
    for c in report.checks:
        if c.ok:
            continue
        text = f"batch {c.batch}: max|diff| {c.max_abs_diff:.3g} (tol {c.tolerance:.3g})"
        text += "".join(f", {n} max|diff| {d:.3g} (tol {t:.3g})" for n, (d, t) in c.outputs.items())
        if c.decisions_identical is not None:
            text += f", merge decisions identical {c.decisions_identical:.2%}"
        bad.append(text)
    pooled = forced_share(report.checks)
    if pooled is not None and pooled[0] < pooled[1]:
        bad.append(f"merge decisions identical {pooled[0]:.2%} over all {sum(c.batch for c in report.checks)} images "
                   f"(at least {pooled[1]:.0%} needed)")
    raise VerificationError(f"ONNX Runtime output differs from PyTorch{what}: " + "; ".join(bad)
                            + f". Rule: {report.describe_rule()}. The file was not written.")


__all__ = [
    "export", "ExportResult", "step_nodes", "check_integers", "verify", "VerifyReport", "check_onnx", "compare_files", "rewrite", "check_tensorrt", "Readiness",
    "export_onnx_program", "metadata", "large_topk", "INPUT_NAME", "OUTPUT_NAME", "DEFAULT_OPSET", "TENSORRT_TOPK_MAX",
]
