"""Static INT8 quantization (explicit Q/DQ) of an exported ViT, calibrated on real images.

The output is an ordinary ONNX file with QuantizeLinear/DequantizeLinear pairs around the
MatMul/Gemm/Conv inputs (weights per output channel, activations per tensor, both symmetric INT8
so the same file feeds ONNX Runtime and TensorRT's explicit-quantization path). The token-merge
subgraphs (every node in a ``blocks.N.token_merge`` name scope) stay in float: their similarity
MatMul decides *which* tokens merge, and rounding it to INT8 would change the decision, not just
the values.

Preprocessing comes from the model's data config: the ``vitmerge.data_config`` metadata entry of the
ONNX file when it has one, else a config the caller gives (e.g. from the timm model), else timm's
ImageNet defaults with a warning.
"""
from __future__ import annotations

import contextlib
import io
import json
import logging
import time
import warnings
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Dict, Iterator, List, Optional, Sequence, Union

import numpy as np
import onnx

from .. import metadata as md
from .._io import check_output_path, staged
from ..backends.ort import session as ort_session
from ..data.datasets import BatchStats, ImageDataset, batches
from ..errors import DataError, ModelFileError, OutputPathError, UsageError, VerificationError, VitmergeError
from . import CALIBRATION_METHODS

DEFAULT_OP_TYPES = ("Conv", "MatMul", "Gemm")
MERGE_SCOPES = ("token_merge", "vwt_merge")  # name scopes of merge steps: per block, and vwt's pre-encoder one


@dataclass
class QuantizeResult:
    path: Path
    method: str
    images: int  # calibration images actually used
    quantized_nodes: int  # nodes fed by a DequantizeLinear (the INT8 compute)
    excluded_nodes: List[str]
    preprocessed: bool
    seconds: float
    notes: List[str] = field(default_factory=list)

    def to_dict(self) -> Dict[str, Any]:
        return {"path": str(self.path), "calibration": self.method, "calibration_images": self.images,
                "quantized_nodes": self.quantized_nodes, "excluded_merge_nodes": len(self.excluded_nodes),
                "quant_pre_process": self.preprocessed, "seconds": round(self.seconds, 2), "notes": self.notes}


# --------------------------------------------------------------------------------------------
# Reading the ONNX file
# --------------------------------------------------------------------------------------------


def merge_nodes(proto) -> List[str]:
    """Names of the nodes a merge step exported (name scope ``blocks.N.token_merge`` or ``vwt_merge``)."""
    out = []
    for n in proto.graph.node:
        scope = " ".join(p.value for p in n.metadata_props if p.key in ("namespace", "pkg.torch.onnx.name_scopes"))
        if any(s in scope or s in n.name for s in MERGE_SCOPES):
            out.append(n.name)
    return out


def _reduces_tokens(proto) -> bool:
    """Whether vitmerge's metadata says the graph merges tokens (any r > 0, or fewer tokens out)."""
    meta = md.read(proto)
    try:
        rs = json.loads(meta.get(md.R, "[]"))
        t_in, t_out = json.loads(meta.get(md.TOKENS_IN, "[]")), json.loads(meta.get(md.TOKENS_OUT, "[]"))
    except ValueError:
        return False
    return any(int(v) > 0 for v in rs) or (bool(t_in) and bool(t_out) and t_out != t_in)


def is_merged(proto) -> bool:
    """Whether the graph merges tokens (merge-step nodes, or vitmerge's metadata says so)."""
    return bool(merge_nodes(proto)) or _reduces_tokens(proto)


def quantized_node_count(proto) -> int:
    dq = {o for n in proto.graph.node if n.op_type == "DequantizeLinear" for o in n.output}
    return sum(1 for n in proto.graph.node if n.op_type != "QuantizeLinear" and any(i in dq for i in n.input))


# --------------------------------------------------------------------------------------------
# Calibration data
# --------------------------------------------------------------------------------------------


def _reader_class():
    from onnxruntime.quantization import CalibrationDataReader

    class ImageReader(CalibrationDataReader):
        """Feeds preprocessed real images, ``batch_size`` at a time, to the calibrator."""

        def __init__(self, dataset: ImageDataset, input_name: str, batch_size: int = 16, on_batch=None):
            self.dataset, self.input_name, self.batch_size = dataset, input_name, batch_size
            self.on_batch = on_batch
            self.used = 0
            self.unreadable: List[str] = []
            self._it: Optional[Iterator] = None

        def _batches(self):
            stats = BatchStats()
            for x, _ in batches(self.dataset, self.batch_size, 0, stats):
                self.unreadable = list(stats.unreadable)
                self.used += len(x)
                if self.on_batch:
                    self.on_batch(len(x))
                yield {self.input_name: np.ascontiguousarray(x.numpy(), dtype=np.float32)}
            self.unreadable = list(stats.unreadable)

        def get_next(self):
            if self._it is None:
                self._it = self._batches()
            return next(self._it, None)

        def rewind(self):
            self._it = None
            self.used = 0

    return ImageReader


# --------------------------------------------------------------------------------------------
# Quantization
# --------------------------------------------------------------------------------------------


@contextlib.contextmanager
def _quiet():
    """ONNX Runtime's quantization tools print progress to stdout and warn through logging."""
    root = logging.getLogger()
    level = root.level
    root.setLevel(logging.ERROR)
    try:
        with contextlib.redirect_stdout(io.StringIO()), warnings.catch_warnings():
            warnings.simplefilter("ignore")
            yield
    finally:
        root.setLevel(level)


def _preprocess(src: Path, stage: Path, must_keep: set, excluded: List[str], notes: List[str]):
    """ONNX Runtime's recommended pre-processing (shape inference + graph optimisation) when it
    works on this graph and keeps every merge-step MatMul by name (so they can still be excluded).

    Returns (model to quantize, pre-processed?, names of nodes to keep in float)."""
    from onnxruntime.quantization.shape_inference import quant_pre_process

    pre = stage / "pre.onnx"
    last = None
    # Symbolic shape inference does not know every pattern the dynamo exporter writes (the merge
    # steps' data-dependent indices); ONNX's own shape inference is the fallback.
    for skip_symbolic in (False, True):
        try:
            with _quiet():
                quant_pre_process(str(src), str(pre), skip_symbolic_shape=skip_symbolic)
        except Exception as e:
            last = f"{type(e).__name__}: {str(e).splitlines()[0][:120] if str(e) else ''}"
            continue
        names = {n.name for n in onnx.load(str(pre), load_external_data=False).graph.node}
        if not must_keep <= names:
            last = "graph optimisation renamed merge-step nodes"
            continue
        return pre, True, [n for n in excluded if n in names]
    notes.append(f"quant_pre_process not applied ({last}); quantizing the exported graph as is")
    return src, False, excluded


def check_output(output: Path, source: Path) -> Path:
    out = check_output_path(output, ".onnx")
    if out.resolve() == Path(source).resolve():
        raise OutputPathError("--output must differ from the input model (the FP32 file is kept for comparison)")
    return out


def quantize(
    model: Union[str, Path],
    output: Union[str, Path],
    dataset: ImageDataset,
    method: str = "entropy",
    per_channel: bool = True,
    exclude_merge: bool = True,
    op_types: Sequence[str] = DEFAULT_OP_TYPES,
    preprocess: bool = True,
    batch_size: int = 16,
    on_batch=None,
) -> QuantizeResult:
    """Calibrate on ``dataset`` (already subset to the images to use, with its transform) and write
    an INT8 QDQ model to ``output`` (staged: ONNX checker and an ONNX Runtime load before the rename)."""
    from onnxruntime.quantization import CalibrationMethod, QuantFormat, QuantType, quantize_static

    src = Path(model)
    proto = md.load_proto(src)
    out = check_output(Path(output), src)
    name, _ = md.input_info(proto)
    if method not in CALIBRATION_METHODS:
        raise UsageError(f"unknown calibration method {method!r}; use one of {', '.join(CALIBRATION_METHODS)}")
    if len(dataset) == 0:
        raise DataError("no calibration images")
    if any(o.domain.startswith("vitmerge") for o in proto.opset_import):
        raise ModelFileError("the model holds vitmerge custom TokenMerge nodes (--merge-op plugin); quantize the "
                             "standard or native export instead")
    cm = {"entropy": CalibrationMethod.Entropy, "minmax": CalibrationMethod.MinMax,
          "percentile": CalibrationMethod.Percentile}[method]
    notes: List[str] = []
    t0 = time.perf_counter()
    with staged(out) as stage:  # also the scratch folder of ORT's pre-processing
        merge_ops = [n for n in proto.graph.node if n.name in set(merge_nodes(proto))] if exclude_merge else []
        must_keep = {n.name for n in merge_ops if n.op_type in op_types}
        source, preprocessed, excluded = src, False, [n.name for n in merge_ops]
        if preprocess:
            source, preprocessed, excluded = _preprocess(src, stage, must_keep, excluded, notes)
        if exclude_merge and not merge_ops and _reduces_tokens(proto):
            notes.append("no node carries a token_merge name scope: merge steps could not be kept in float")
        # ORT's histogram calibrators stack the collected activations: every batch must have the same
        # size, so use the largest batch size <= batch_size that divides the number of images.
        n_img = len(dataset)
        batch_size = next(b for b in range(min(batch_size, n_img), 0, -1) if n_img % b == 0)
        reader = _reader_class()(dataset, name, batch_size, on_batch)
        written = stage / out.name
        extra = {
            "ActivationSymmetric": True,  # TensorRT's explicit quantization takes symmetric INT8 only
            "WeightSymmetric": True,
            # Not CalibMaxIntermediateOutputs: in ORT 1.32 MinMax drops (not merges) each chunk it
            # clears, and the histogram methods ignore it. Memory grows with --num: every batch's
            # calibrated activations are held until the histograms are built.
        }
        if cm == CalibrationMethod.Percentile:
            extra["CalibPercentile"] = 99.99
        try:
            with _quiet():
                quantize_static(
                    str(source), str(written), reader,
                    quant_format=QuantFormat.QDQ,
                    op_types_to_quantize=list(op_types),
                    per_channel=per_channel,
                    activation_type=QuantType.QInt8,
                    weight_type=QuantType.QInt8,
                    nodes_to_exclude=excluded,
                    calibrate_method=cm,
                    extra_options=extra,
                )
        except VitmergeError:
            raise
        except Exception as e:
            raise VerificationError(f"ONNX Runtime quantization failed: {type(e).__name__}: {e}") from None
        if reader.used == 0:
            raise DataError(f"none of the {len(dataset)} calibration images could be read")
        if reader.unreadable:
            notes.append(f"{len(reader.unreadable)} calibration images could not be read and were skipped")
        qproto = onnx.load(str(written))
        carried = {k: v for k, v in md.read(proto).items() if k not in md.read(qproto)}  # vitmerge's metadata
        md.write(qproto, {**carried, md.QUANTIZATION: "int8-qdq", md.CALIBRATION: method,
                          md.CALIBRATION_IMAGES: str(reader.used)})
        onnx.save(qproto, str(written))
        try:
            onnx.checker.check_model(str(written))
            ort_session(written)
        except Exception as e:
            raise VerificationError(f"the quantized model does not load: {type(e).__name__}: {e}") from None
        count = quantized_node_count(qproto)
        if count == 0:
            raise VerificationError("quantization produced no INT8 nodes (no MatMul/Gemm/Conv outside merge steps?)")
    return QuantizeResult(path=out, method=method, images=reader.used, quantized_nodes=count,
                          excluded_nodes=excluded, preprocessed=preprocessed, seconds=time.perf_counter() - t0,
                          notes=notes)


def calibration_and_eval_sets(dataset_for_calib: ImageDataset, dataset_for_eval: Optional[ImageDataset],
                              num: int, eval_limit: Optional[int], seed: int = 0):
    """Pick ``num`` calibration images and the evaluation images, never the same ones.

    With a separate evaluation split (e.g. train/ and test/ folders) the two sets come from
    different folders; from one folder, calibration takes the first ``num`` of a fixed shuffled
    order and evaluation draws from the rest.
    """
    if num <= 0:
        raise DataError(f"--num must be a positive number of calibration images, got {num}")
    if dataset_for_eval is None:
        order = dataset_for_calib.order(seed)
        calib = dataset_for_calib.select(np.sort(order[:num]))
        rest = order[num:]
        if eval_limit is not None:
            rest = rest[:eval_limit]
        ev = dataset_for_calib.select(np.sort(rest)) if len(rest) else None
        return calib, ev
    calib = dataset_for_calib.select(np.sort(dataset_for_calib.order(seed)[:num]))
    return calib, dataset_for_eval.subset(eval_limit, seed)


__all__ = ["quantize", "QuantizeResult", "CALIBRATION_METHODS", "merge_nodes", "quantized_node_count",
           "calibration_and_eval_sets", "check_output", "is_merged"]
