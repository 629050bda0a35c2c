"""Exceptions raised by qlorafit.

Every error says what was wrong, where (file, key, line) and what to do about it, so the
command line can print the message as it is and a library user can catch one base class.
"""


import errno


class QlorafitError(Exception):
    """Base class of every error qlorafit raises on bad input."""


class WriteError(QlorafitError, OSError):
    """A file or folder that cannot be written: no permission, a full disk, a file in the way."""


_REASONS = {errno.ENOSPC: "the disk is full", errno.EDQUOT: "the disk quota is exhausted",
            errno.EACCES: "permission denied", errno.EPERM: "operation not permitted",
            errno.EROFS: "read-only file system", errno.ENOTDIR: "a file is in the way of a folder",
            errno.EISDIR: "it is a folder", errno.ENOENT: "no such folder, and it cannot be made"}


def cannot_write(path, exc: OSError, advice: str = "choose a place you can write to, with enough free space") -> WriteError:
    """A WriteError naming `path`, why writing it failed (from `exc`), and `advice`."""
    if isinstance(exc, WriteError):
        return exc
    reason = _REASONS.get(exc.errno, exc.strerror or str(exc))
    return WriteError(f"{path}: cannot be written ({reason}); {advice}")


class QuantizationError(QlorafitError, ValueError):
    """An invalid quantization setting or a quantized tensor that does not fit its state."""


class ModelLoadError(QlorafitError):
    """A model path that is missing, corrupt or of an unsupported kind."""


class AdapterError(QlorafitError):
    """A LoRA adapter that cannot be built, saved or loaded onto this model."""


class TargetError(AdapterError):
    """LoRA targets that match no layer of the model."""


class DataError(QlorafitError):
    """Training data that cannot be read or used: names the file and line."""


class GenerationError(QlorafitError, ValueError):
    """Generation settings or a prompt that cannot be generated from."""


class TrainingError(QlorafitError):
    """A run that had to stop: too many non-finite steps, a full disk, an interruption."""


class TrainingInterrupted(TrainingError):
    """SIGINT or SIGTERM: a checkpoint was saved and the run can be resumed."""

    def __init__(self, message: str, signum: int) -> None:
        super().__init__(message)
        self.signum = signum


class ExportError(QlorafitError):
    """A model or adapter that cannot be written in the requested format (GGUF, Ollama)."""
