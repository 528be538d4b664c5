"""``export(model, path)``: ONNX with static token counts, checked and verified before it is written."""
from __future__ import annotations

import copy
import logging
from dataclasses import dataclass
from pathlib import Path
from typing import Callable, Optional, Sequence, Union

import onnx
import torch
from torch import nn

from .. import metadata as md
from .._io import staged
from ..errors import VerificationError
from ..models.precision import cast_model, dtype_name, model_dtype, resolve_dtype
from .onnx_export import (
    DEFAULT_OPSET,
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
from .surgery import rewrite
from .trt_check import Readiness, check_tensorrt
from .verify import VerifyReport, check_onnx, compare_files, verify


log = logging.getLogger(__name__)


@dataclass
class ExportResult:
    path: Path
    verification: Optional[VerifyReport]


def export(
    model: nn.Module,
    output: Union[str, Path],
    opset: int = DEFAULT_OPSET,
    check: bool = True,
    batch_sizes: Sequence[int] = (1, 4),
    atol: Optional[float] = None,
    rtol: Optional[float] = None,
    on_step: Optional[Callable[[str], None]] = None,
    merge_op: str = "standard",
    dtype: Union[str, torch.dtype, None] = None,
) -> ExportResult:
    """Export ``model`` (plain or patched by :func:`vitmerge.apply`) to ``output``.

    The file is written to a private staging folder, run through the ONNX checker and compared
    with PyTorch in ONNX Runtime at every batch size in ``batch_sizes`` (one file, dynamic batch);
    only then is it moved to ``output``. Any failure leaves no output file.

    merge_op: the graph form of every merge step: ``standard`` (as exported), ``native`` (rewritten
    into plugin-free ops runtimes execute well) or ``plugin`` (one ``vitmerge::TokenMerge`` node each).
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
    info = getattr(model, "vitmerge", None)
    # the native form: tome's is written by graph surgery (one MatMul over the A tokens); every other method
    # is exported with its merged rows added by a one-hot MatMul instead of a ScatterND (TensorRT-ready)
    # (also tome's when the model tracks positions, e.g. YOLOS' mid position embeddings: their sums outside the
    # merge steps need the one-hot form too, which surgery of the merge steps alone would not give)
    state = getattr(model, "_vm_state", None)
    direct_native = merge_op == "native" and info is not None and (
        info.method != "tome" or bool(getattr(state, "track_positions", False)))
    with staged(*output_files(out)) as stage:
        step("tracing with torch.export and translating to ONNX")
        program = export_onnx_program(model, opset=opset, decisions=decisions, scatter_free=direct_native)
        step("writing")
        written = save_program(program, model, stage, out.name)
        big = large_topk(onnx.load(str(written), load_external_data=False))
        if big:
            log.warning("%s: %d TopK node(s) sort more than %d values (k up to %d): ONNX Runtime runs them, "
                        "TensorRT's TopK layer refuses k > %d (fewer tokens, or a method without full sorts, "
                        "keeps the graph TensorRT-ready)", out.name, len(big), TENSORRT_TOPK_MAX, max(big),
                        TENSORRT_TOPK_MAX)
        if direct_native:
            proto = onnx.load(str(written), load_external_data=False)
            md.write(proto, {md.MERGE_OP: "native"})
            onnx.save(proto, str(written))
        report = None
        if check:
            step("ONNX checker")
            check_onnx(written)
            step(f"ONNX Runtime vs PyTorch ({dtype_name(model_dtype(model))}, merge decisions compared)"
                 if decisions else f"ONNX Runtime vs PyTorch ({dtype_name(model_dtype(model))})")
            report = verify(model, written, batch_sizes=batch_sizes, atol=atol, rtol=rtol,
                            reference_fp32=reference_fp32)
            _raise_unless_ok(report)
            drop_decisions(written)  # the file computes its outputs (logits, detectors' boxes) and nothing else
        if merge_op != "standard" and not direct_native:
            step(f"graph surgery: merge steps -> {merge_op} form")
            rewrite(written, written, merge_op)
            if check:
                step(f"ONNX checker and ONNX Runtime vs PyTorch, {merge_op} form")
                check_onnx(written)
                final = verify(model, written, batch_sizes=batch_sizes, atol=atol, rtol=rtol)
                _raise_unless_ok(final, f" ({merge_op} form)")
        if report is not None:
            report.path = str(out)
    return ExportResult(path=out, verification=report)


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
    raise VerificationError(f"ONNX Runtime output differs from PyTorch{what}: " + "; ".join(bad)
                            + f". Rule: {report.describe_rule()}. The file was not written.")


__all__ = [
    "export", "ExportResult", "verify", "VerifyReport", "check_onnx", "compare_files", "rewrite", "check_tensorrt", "Readiness",
    "export_onnx_program", "metadata", "large_topk", "INPUT_NAME", "OUTPUT_NAME", "DEFAULT_OPSET", "TENSORRT_TOPK_MAX",
]
