"""INT8 calibration as one library call: :func:`calibrate_files` quantizes a merged FP32 file (and, given, its
unmerged baseline) from real images and scores FP32 vs INT8 on held-out images of the same folder, with the
same scoring function as ``vitmerge eval`` (:func:`vitmerge.profiling.accuracy.evaluate`). ``vitmerge calibrate``
only parses options and prints what this returns."""
from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable, Dict, List, Optional, Union

from .. import metadata as md
from ..errors import DataError, UsageError
from .quantize import QuantizeResult, calibration_and_eval_sets, check_output, is_merged, quantize


def default_baseline_output(output: Path, baseline: Path) -> Path:
    """Where the baseline's INT8 file goes unless told: next to ``output``, ``NAME.int8.onnx``."""
    stem = baseline.name[: -len(".onnx")] if baseline.name.endswith(".onnx") else baseline.stem
    return output.parent / f"{stem}.int8.onnx"


@dataclass
class CalibrationRun:
    """What :func:`calibrate_files` did: the INT8 files, the preprocessing, and FP32 vs INT8 accuracy."""

    data_config: Dict[str, Any]
    data: Path
    calibration_set: Any
    eval_set: Any
    source: str = ""  # the dataset the calibration images come from, as it describes itself
    quantized: Dict[str, QuantizeResult] = field(default_factory=dict)
    accuracy: Any = None  # EvalResult, or None (--no-eval, or no images left)
    asked: int = 0  # calibration images asked for
    warnings: List[str] = field(default_factory=list)

    def to_dict(self, model: Path, baseline: Optional[Path]) -> Dict[str, Any]:
        return {"model": str(model), "baseline": str(baseline) if baseline else None, "data": str(self.data),
                "data_config": self.data_config, "quantized": {k: v.to_dict() for k, v in self.quantized.items()},
                "accuracy": self.accuracy.to_dict() if self.accuracy else None}


def plan_outputs(model: Path, output: Path, baseline: Optional[Path] = None,
                 baseline_output: Optional[Path] = None) -> List[tuple]:
    """The (source, INT8 file) pairs, every path checked before any work; four different files."""
    md.load_proto(model)
    check_output(output, model)
    jobs = [(Path(model), Path(output))]
    if baseline is not None:
        md.load_proto(baseline)
        base_out = baseline_output or default_baseline_output(Path(output), Path(baseline))
        check_output(base_out, baseline)
        if len({p.resolve() for p in (Path(model), Path(baseline), Path(output), Path(base_out))}) != 4:
            raise UsageError("MODEL, --baseline, --output and --baseline-output must be four different "
                             "files (the FP32 files are kept for the comparison)")
        jobs.append((Path(baseline), Path(base_out)))
    return jobs


def calibrate_files(jobs: List[tuple], data: Optional[Union[str, Path]], *, source=None, num: int = 256,
                    calibrator: str = "entropy", labels: Optional[Path] = None, eval_limit: Optional[int] = None,
                    evaluate_accuracy: bool = True, batch_size: int = 16, per_channel: bool = True,
                    keep_merge_float: bool = True, on_sets: Optional[Callable[["CalibrationRun"], None]] = None,
                    progress: Optional[Callable[[str, int], Callable[[int], None]]] = None,
                    on_file: Optional[Callable[[QuantizeResult], None]] = None) -> CalibrationRun:
    """Quantize every (FP32 source, INT8 output) of ``jobs`` (from :func:`plan_outputs`; the first is the model,
    the second, if any, its unmerged baseline) from the images of ``data``, then score FP32 and INT8 of each on
    held-out images. ``source``: a :class:`~vitmerge.models.build.ModelSource` naming the model the file came from,
    for its preprocessing when the file does not record it (its model.json also gives the default data folder).
    ``progress(description, total)`` returns a per-batch advance callback."""
    from ..backends import OrtRunner
    from ..data import CALIBRATION_SPLITS, EVAL_SPLITS, data_config_for_onnx, eval_transform, open_dataset
    from ..data.transforms import data_config_for_name
    from ..profiling.accuracy import evaluate

    if batch_size < 1:
        raise UsageError(f"--batch must be at least 1, got {batch_size}")
    model = jobs[0][0]
    proto = md.load_proto(model)
    given = None
    if source is not None:  # the preprocessing of the model the file came from
        given = data_config_for_name(source.ref.name, **{k: v for k, v in source.kwargs.items()
                                                         if k not in ("frames", "audio_length")})
    cfg, warn = data_config_for_onnx(proto, given)
    data = data or (source.data_dir if source is not None else None)
    if data is None:
        raise DataError("give calibration images with --data DIR")
    tf = eval_transform(cfg)
    calib_all = open_dataset(data, labels=labels, transform=tf, prefer=CALIBRATION_SPLITS)
    eval_all = open_dataset(data, labels=labels, transform=tf, prefer=EVAL_SPLITS) if evaluate_accuracy else None
    same = eval_all is None or (eval_all.root.resolve() == calib_all.root.resolve()
                                and eval_all.layout == calib_all.layout)  # CIFAR/Pets: split in layout
    calib, ev = calibration_and_eval_sets(calib_all, None if same else eval_all, num, eval_limit)
    run = CalibrationRun(data_config=cfg, data=Path(data), calibration_set=calib, source=calib_all.describe(),
                         eval_set=ev if evaluate_accuracy else None, asked=num, warnings=[warn] if warn else [])
    if on_sets is not None:
        on_sets(run)
    for src, dst in jobs:
        advance = progress(f"calibrating {Path(src).name} ({calibrator})", len(calib)) if progress else None
        res = quantize(src, dst, calib, method=calibrator, per_channel=per_channel, exclude_merge=keep_merge_float,
                       batch_size=batch_size, on_batch=advance)
        run.quantized[str(src)] = res
        if on_file is not None:
            on_file(res)
    if run.eval_set is not None and len(run.eval_set):
        runners = {}
        tag = ""
        if len(jobs) > 1:
            runners["unmerged FP32"] = OrtRunner(jobs[1][0])
            runners["unmerged INT8"] = OrtRunner(jobs[1][1])
            tag = "merged " if is_merged(proto) else "model "
        runners[f"{tag}FP32"] = OrtRunner(jobs[0][0])
        runners[f"{tag}INT8"] = OrtRunner(jobs[0][1])
        run.accuracy = evaluate(runners, run.eval_set, batch_size=max(batch_size, 32),
                                description="scoring FP32 vs INT8")
    return run


__all__ = ["CalibrationRun", "calibrate_files", "plan_outputs", "default_baseline_output"]
