"""Option definitions shared by the commands (one definition each), and the choices as Enums.

Every command that builds a model takes the same model options (``MODEL`` as a :class:`vitmerge.request.ModelRef`,
--checkpoint, --config, --model-kwargs, --num-classes, --img-size, --frames, --audio-length, --seed) and the same
merge options (--method, --r, --schedule, --budget, --budget-latency, -O, --prop-attn), with one name, one help and
one default each, declared here; ``_common.model_source`` / ``_common.merge_request`` turn them into the library's
records. A batch size is ``--batch`` / ``-b`` everywhere (``--batch-size`` is kept as an alias).

Choices are Enums, so ``--help`` lists them and a typo fails before any work starts. Their values are
written out here rather than imported: the lists live in modules that import torch (the method registry,
the precisions, the dataset readers), and the CLI must answer ``--help`` and argument errors in well under a
second. ``tests/test_cli.py`` checks that each list equals the library's own (a method added to the registry
fails that test until it is named here). Commands take ``Method`` etc. and pass ``.value`` on.
"""
from __future__ import annotations

from enum import Enum
from pathlib import Path
from typing import Annotated, Iterable, List, Optional

import typer


from ..metadata import MERGE_OPS

# the library's lists, by value (see the module docstring; tests/test_cli.py keeps them equal)
METHODS = ("tome", "hash", "importance", "evo", "vwt")  # merging.available_methods()
RUNTIMES = ("torch", "ort", "ort-cuda", "trt")  # backends.base.RUNTIMES
DEVICES = ("auto", "cpu", "cuda")  # backends.base.DEVICES
CALIBRATION_METHODS = ("entropy", "minmax", "percentile")  # calibration.CALIBRATION_METHODS
CLASS_MAPS = ("auto", "id", "order", "name")  # data.detection.CLASS_MAPS
CLASS_ORDERS = ("sorted", "devkit")  # data.imagenet.CLASS_ORDERS
SCHEDULES = ("constant", "decreasing")  # merging.schedule.SCHEDULES
DTYPES = ("fp32", "fp16", "bf16")  # models.precision.DTYPES


def choices(name: str, values: Iterable[str]) -> type:
    """A str Enum whose members are ``values`` (typer shows them in --help and rejects anything else)."""
    return Enum(name, {v.replace("-", "_"): v for v in values}, type=str)


Method = choices("Method", METHODS)
MergeOp = choices("MergeOp", MERGE_OPS)
Runtime = choices("Runtime", RUNTIMES)
EvalRuntime = choices("EvalRuntime", ("torch", "ort"))
Schedule = choices("Schedule", SCHEDULES)
Device = choices("Device", DEVICES)
CalibrationMethod = choices("CalibrationMethod", CALIBRATION_METHODS)
InstanceKind = choices("InstanceKind", ("auto", "cpu", "gpu"))
Space = choices("Space", ("pixels", "embeddings"))
ClassOrder = choices("ClassOrder", CLASS_ORDERS)
ClassMap = choices("ClassMap", CLASS_MAPS)
DType = choices("DType", DTYPES)


def value(choice) -> Optional[str]:
    """The plain string of an Enum choice (None stays None)."""
    return None if choice is None else getattr(choice, "value", choice)


# ---------------------------------------------------------------------------------------------- model

MODEL_PANEL = "Model"
MERGE_PANEL = "Token merging"

CheckpointOpt = Annotated[Optional[Path], typer.Option(
    "--checkpoint", "-c", rich_help_panel=MODEL_PANEL,
    help="Local weights (.pth/.pt/.bin/.safetensors: a state dict or {'model': ...}); random weights without it "
         "(said loudly: accuracy is then meaningless)")]
ImgSizeOpt = Annotated[Optional[int], typer.Option(
    "--img-size", rich_help_panel=MODEL_PANEL, help="Input resolution (default: the model's)")]
FramesOpt = Annotated[Optional[int], typer.Option(
    "--frames", rich_help_panel=MODEL_PANEL,
    help="Video models (transformers VideoMAE folder): frames per clip (default: the config's num_frames)")]
AudioLengthOpt = Annotated[Optional[int], typer.Option(
    "--audio-length", rich_help_panel=MODEL_PANEL,
    help="Audio models (transformers AST folder): spectrogram time frames (default: the config's max_length; "
         "the position embedding is resampled)")]
NumClassesOpt = Annotated[Optional[int], typer.Option(
    "--num-classes", rich_help_panel=MODEL_PANEL,
    help="Classifier size (default: from the checkpoint, else the model's)")]
ModelKwargsOpt = Annotated[Optional[str], typer.Option(
    "--model-kwargs", rich_help_panel=MODEL_PANEL,
    help="Extra timm.create_model arguments as JSON, or a .json file, e.g. '{\"depth\": 6}'")]
SeedOpt = Annotated[int, typer.Option(
    "--seed", rich_help_panel=MODEL_PANEL,
    help="Seed of the random weights when no --checkpoint is given (the same seed, the same model: two runs compare "
         "as two forms of one model)")]
ConfigOpt = Annotated[Optional[Path], typer.Option(
    "--config", rich_help_panel=MODEL_PANEL,
    help="model.json from `vitmerge digits train` (model name, kwargs, checkpoint, data folder)")]

# ---------------------------------------------------------------------------------------------- merging

MethodOpt = Annotated[Method, typer.Option(
    "--method", "-m", rich_help_panel=MERGE_PANEL, case_sensitive=False,
    help="Merge method (docs/methods/); tome is faithful ToMe")]
OptionOpt = Annotated[Optional[List[str]], typer.Option(
    "--option", "-O", rich_help_panel=MERGE_PANEL,
    help="Method option KEY=VALUE, repeatable (e.g. -O bits=8, -O mode=intra, -O vocab=vocab.pt)")]
ROpt = Annotated[Optional[str], typer.Option(
    "--r", rich_help_panel=MERGE_PANEL,
    help="Tokens merged per block: one int, or one per block comma-separated; 0 = the plain model "
         "(default 16; not with --budget, which solves r per block)")]
BudgetLatencyOpt = Annotated[Optional[Path], typer.Option(
    "--budget-latency", rich_help_panel=MERGE_PANEL,
    help="With --budget: meet it in measured latency, from a JSON table {token count: ms per block}")]
ScheduleOpt = Annotated[Schedule, typer.Option(
    "--schedule", rich_help_panel=MERGE_PANEL, case_sensitive=False,
    help="How --r spreads over blocks: constant, or decreasing (ToMe's inflection schedule, mean r per block)")]
BudgetOpt = Annotated[Optional[float], typer.Option(
    "--budget", rich_help_panel=MERGE_PANEL,
    help="Target FLOP fraction of the unmerged model (e.g. 0.5): solves the per-block r")]
PropAttnOpt = Annotated[bool, typer.Option(
    "--prop-attn/--no-prop-attn", rich_help_panel=MERGE_PANEL,
    help="Proportional attention (log token size added to the attention logits)")]

# ---------------------------------------------------------------------------------------------- data / output

DataOpt = Annotated[Optional[Path], typer.Option(
    "--data", "-d", help="Labelled image folder: ImageFolder, ImageNet val, CIFAR-100 pickles or Oxford-IIIT Pet; "
                         "video (.npy) or audio (.wav) clips in class folders (see docs/data.md)")]
LabelsOpt = Annotated[Optional[Path], typer.Option(
    "--labels", help="Labels file for a flat folder of images (val.txt or LOC_val_solution.csv)")]
#: the model argument of the commands that score a model (eval, tune): classifiers and detectors
ScoredModelArg = Annotated[Optional[str], typer.Argument(
    metavar="[MODEL]", help="timm model name (or timm:NAME), transformers model folder (YOLOS too) or dense:NAME "
                            "(optional with --config)")]
ScoredLabelsOpt = Annotated[Optional[Path], typer.Option(
    "--labels", help="Labels file for a flat folder of images (val.txt or LOC_val_solution.csv), or the ImageNet "
                     "devkit (ILSVRC2012_devkit_t12.tar.gz or its folder); detectors: the COCO annotations JSON "
                     "(default: DATA/annotations.json)")]
ClassOrderOpt = Annotated[ClassOrder, typer.Option(
    "--class-order", case_sensitive=False,
    help="ImageNet class indices: sorted (sorted WordNet ids, as timm/torchvision checkpoints) or devkit "
         "(ILSVRC2012_ID order; needs the devkit)")]
ClassMapOpt = Annotated[ClassMap, typer.Option(
    "--class-map", case_sensitive=False,
    help="Detectors: COCO category -> model class. auto: by name when the model names its classes, else id when "
         "the ids fit, else order; id: category id = class (COCO-trained YOLOS); order: 0..K-1 in id order; name: by "
         "class name")]
NormalizeOpt = Annotated[bool, typer.Option(
    "--normalize/--no-normalize",
    help="Detectors: normalise pixels with the model's mean/std (YOLOS: preprocessor_config.json; dense: the "
         "backbone's), or feed them in [0, 1] (--no-normalize: vitmerge's demo detectors)")]
ReportDirOpt = Annotated[Optional[Path], typer.Option(
    "--report-dir", help="Write report.json and report.md (and plots) into this folder")]
DTypeOpt = Annotated[DType, typer.Option(
    "--dtype", case_sensitive=False, rich_help_panel=MODEL_PANEL,
    help="What the model computes in: fp32, fp16 or bf16 (merge steps stay float32; inputs/outputs float32)")]
BatchOpt = Annotated[int, typer.Option(
    "--batch", "--batch-size", "-b", help="Images per batch")]
ThreadsOpt = Annotated[int, typer.Option(
    "--threads", help="CPU threads for ONNX Runtime / PyTorch (0: the runtime's default)")]
SplitOpt = Annotated[Optional[str], typer.Option(
    "--split", help="Which split of a multi-split folder (default: val, then test)")]
WorkersOpt = Annotated[int, typer.Option("--workers", help="Image decoding processes (0: in the main process)")]

# ---------------------------------------------------------------------------------------------- measurement

MEASURE_PANEL = "Measurement"
ItersOpt = Annotated[int, typer.Option("--iters", rich_help_panel=MEASURE_PANEL,
                                       help="Timed calls per model in each round")]
WarmupOpt = Annotated[int, typer.Option("--warmup", rich_help_panel=MEASURE_PANEL,
                                        help="Untimed calls per model before timing")]


# ---------------------------------------------------------------------------------------------- option groups

#: the model options of every command that builds a model: parameter name -> (option type, default)
MODEL_OPTIONS = {
    "checkpoint": (CheckpointOpt, None), "config": (ConfigOpt, None), "model_kwargs": (ModelKwargsOpt, None),
    "num_classes": (NumClassesOpt, None), "img_size": (ImgSizeOpt, None), "frames": (FramesOpt, None),
    "audio_length": (AudioLengthOpt, None), "seed": (SeedOpt, 0),
}
#: the merge options of every command that merges: parameter name -> (option type, default)
MERGE_OPTIONS = {
    "method": (MethodOpt, "tome"), "r": (ROpt, None), "schedule": (ScheduleOpt, "constant"), "budget": (BudgetOpt, None),
    "budget_latency": (BudgetLatencyOpt, None), "option": (OptionOpt, None), "prop_attn": (PropAttnOpt, True),
}


def with_options(model: bool = True, merge: bool = True, skip: Iterable[str] = ()):
    """Give a command the shared model and/or merge options, declared once here: the command declares a keyword
    parameter ``model_options`` and/or ``merge_options`` (a dict) instead of repeating eight and seven options;
    typer sees the options themselves (same names, help, defaults and panels in every command). ``skip``: names
    of the group that do not apply to this command."""
    import functools
    import inspect

    groups = {}
    if model:
        groups["model_options"] = MODEL_OPTIONS
    if merge:
        groups["merge_options"] = MERGE_OPTIONS
    skip = set(skip)

    def deco(fn):
        import typing

        hints = typing.get_type_hints(fn, include_extras=True)  # resolved in the command's own module
        sig = inspect.signature(fn)
        missing = [g for g in groups if g not in sig.parameters]
        if missing:
            raise TypeError(f"{fn.__name__} must declare {', '.join(missing)} to receive the shared options")
        params = [p.replace(annotation=hints.get(n, p.annotation)) for n, p in sig.parameters.items() if n not in groups]
        annotations = {k: v for k, v in hints.items() if k not in groups and k != "return"}
        for group in groups.values():
            for name, (typ, default) in group.items():
                if name in skip:
                    continue
                params.append(inspect.Parameter(name, inspect.Parameter.KEYWORD_ONLY, default=default, annotation=typ))
                annotations[name] = typ

        @functools.wraps(fn)
        def wrapper(*args, **kwargs):
            for g, group in groups.items():
                kwargs[g] = {name: kwargs.pop(name) for name in group if name in kwargs}
            return fn(*args, **kwargs)

        wrapper.__signature__ = sig.replace(parameters=params)
        wrapper.__annotations__ = annotations
        del wrapper.__wrapped__  # typer reads the signature above, not the function's own
        return wrapper

    return deco


__all__ = [
    "choices", "value", "Method", "MergeOp", "Runtime", "EvalRuntime", "ClassMap", "Schedule", "Device", "CalibrationMethod",
    "InstanceKind", "Space", "ClassOrder", "DType", "DTypeOpt", "CheckpointOpt", "ImgSizeOpt", "FramesOpt", "AudioLengthOpt",
    "NumClassesOpt", "ModelKwargsOpt", "ConfigOpt", "SeedOpt", "BatchOpt", "MODEL_OPTIONS", "MERGE_OPTIONS",
    "with_options",
    "MethodOpt", "OptionOpt", "ROpt", "ScheduleOpt", "BudgetOpt", "BudgetLatencyOpt", "PropAttnOpt", "DataOpt", "LabelsOpt", "ScoredModelArg", "ScoredLabelsOpt", "ClassOrderOpt", "ClassMapOpt",
    "NormalizeOpt", "ReportDirOpt",
    "ThreadsOpt", "SplitOpt", "WorkersOpt", "MEASURE_PANEL", "ItersOpt", "WarmupOpt",
]
