"""User-facing errors: each says what was wrong and what to do. The CLI prints them without a traceback.

Pick the class by the problem, not by the module that finds it:

* :class:`ModelNotFoundError`   a model name or model file that is not there
* :class:`ModelFileError`       a file that is there but is not a usable ONNX model / engine / metadata
* :class:`CheckpointError`      weights that cannot be read or do not fit the model
* :class:`UnsupportedModelError` an architecture vitmerge cannot patch
* :class:`ScheduleError`        a bad merge request: method, r, schedule, budget, method options
* :class:`UsageError`           options that do not fit together or are out of range (batch sizes,
                                 runtimes, devices, counts) - anything else the user typed wrong
* :class:`DataError`            a data folder in no supported layout, or with no usable images
* :class:`OutputPathError`      an output path that cannot be written
* :class:`VerificationError`    the work ran, and its result failed a check (exit code 1)
* :class:`SurgeryError`         a graph whose merge steps cannot be found or rewritten
* :class:`EngineBuildError`     TensorRT could not parse or build the model
* :class:`PackagingError`       a Triton model repository that cannot be written as asked
* :class:`RuntimeMissingError`  an optional runtime (TensorRT, CUDA, onnxruntime-gpu, NVML) is absent
"""


class VitmergeError(Exception):
    """An error caused by the user's input or environment, with an actionable message."""


class ModelNotFoundError(VitmergeError):
    pass


class ModelFileError(VitmergeError):
    """A model file (ONNX, engine, engine metadata) that exists but cannot be used as it is."""


class CheckpointError(VitmergeError):
    pass


class OutputPathError(VitmergeError):
    pass


class VerificationError(VitmergeError):
    pass


class ScheduleError(VitmergeError, ValueError):
    """A bad merge request: unknown method, r out of range, wrong per-layer list, bad option."""


class UsageError(VitmergeError, ValueError):
    """Options that are out of range or do not fit together (batch sizes, runtimes, devices, counts)."""


class UnsupportedModelError(VitmergeError, TypeError):
    """The model is not an architecture vitmerge can patch."""


class RuntimeMissingError(VitmergeError):
    """An optional runtime (TensorRT, CUDA, onnxruntime-gpu, NVML) is not available here."""


class DataError(VitmergeError):
    """A data folder that does not match any supported layout, or holds no usable images."""


class SurgeryError(VitmergeError):
    """A graph whose merge steps cannot be found or rewritten."""


class EngineBuildError(VitmergeError):
    """TensorRT could not parse or build the model."""


class PackagingError(VitmergeError):
    """A Triton Inference Server model repository that cannot be written as asked."""
