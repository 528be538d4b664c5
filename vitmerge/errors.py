"""User-facing errors: each says what was wrong and what to do. The CLI prints them without a traceback."""


class VitmergeError(Exception):
    """An error caused by the user's input or environment, with an actionable message."""


class ModelNotFoundError(VitmergeError):
    pass


class CheckpointError(VitmergeError):
    pass


class OutputPathError(VitmergeError):
    pass


class VerificationError(VitmergeError):
    pass


class ScheduleError(VitmergeError, ValueError):
    """A bad merge request: unknown method, r out of range, wrong per-layer list, bad option."""


class UnsupportedModelError(VitmergeError, TypeError):
    """The model is not an architecture vitmerge can patch."""


class RuntimeMissingError(VitmergeError):
    """An optional runtime (TensorRT, CUDA, onnxruntime-gpu, NVML) is not available here."""


class DataError(VitmergeError):
    """A data folder that does not match any supported layout, or holds no usable images."""
