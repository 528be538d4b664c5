"""``export(model, path)``: ONNX with static token counts, checked and verified before it is written."""
from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Callable, Optional, Sequence, Union

import logging

import onnx
from torch import nn

from .._io import staged
from ..backends.ort import OrtRunner
from ..errors import VerificationError
from .onnx_export import (
    DEFAULT_OPSET,
    TENSORRT_TOPK_MAX,
    INPUT_NAME,
    OUTPUT_NAME,
    check_output_path,
    export_onnx_program,
    large_topk,
    metadata,
    output_files,
    save_program,
)
from .surgery import rewrite
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
    atol: float = 1e-4,
    rtol: float = 1e-3,
    on_step: Optional[Callable[[str], None]] = None,
    merge_op: str = "standard",
) -> ExportResult:
    """Export ``model`` (plain or patched by :func:`vitmerge.apply`) to ``output``.

    The file is written to a private staging folder, run through the ONNX checker and compared
    with PyTorch in ONNX Runtime at every batch size in ``batch_sizes`` (one file, dynamic batch);
    only then is it moved to ``output``. Any failure leaves no output file.

    merge_op: the graph form of every merge step: ``standard`` (as exported), ``native`` (rewritten
    into plugin-free ops runtimes execute well) or ``plugin`` (one ``vitmerge::TokenMerge`` node each).
    """
    def step(what: str) -> None:
        log.info("export %s: %s", Path(output).name, what)
        if on_step is not None:
            on_step(what)

    out = check_output_path(output)
    with staged(*output_files(out)) as stage:
        step("tracing with torch.export and translating to ONNX")
        program = export_onnx_program(model, opset=opset)
        step("writing")
        written = save_program(program, model, stage, out.name)
        big = large_topk(onnx.load(str(written), load_external_data=False))
        if big:
            log.warning("%s: %d TopK node(s) sort more than %d values (k up to %d): ONNX Runtime runs them, "
                        "TensorRT's TopK layer refuses k > %d (fewer tokens, or a method without full sorts, "
                        "keeps the graph TensorRT-ready)", out.name, len(big), TENSORRT_TOPK_MAX, max(big),
                        TENSORRT_TOPK_MAX)
        if merge_op != "standard":
            step(f"graph surgery: merge steps -> {merge_op} form")
            rewrite(written, written, merge_op)
        report = None
        if check:
            step("ONNX checker")
            check_onnx(written)
            step("ONNX Runtime vs PyTorch")
            report = verify(model, written, batch_sizes=batch_sizes, atol=atol, rtol=rtol, runner=OrtRunner(written))
            report.path = str(out)
            if not report.ok:
                bad = [c for c in report.checks if not c.ok]
                raise VerificationError(
                    "ONNX Runtime output differs from PyTorch: "
                    + "; ".join(f"batch {c.batch}: max|diff| {c.max_abs_diff:.3g} > tol {c.tolerance:.3g}" for c in bad)
                    + ". The file was not written."
                )
    return ExportResult(path=out, verification=report)


__all__ = [
    "export", "ExportResult", "verify", "VerifyReport", "check_onnx", "compare_files", "rewrite",
    "export_onnx_program", "metadata", "large_topk", "INPUT_NAME", "OUTPUT_NAME", "DEFAULT_OPSET", "TENSORRT_TOPK_MAX",
]
