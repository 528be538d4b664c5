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
