"""Errors whose message is meant for the user: the UI shows it as a warning, the CLI prints it
and exits non-zero. Anything else that escapes is a bug."""


class StudioError(Exception):
    """A problem the user can fix; the message says how."""


class ConfigError(StudioError):
    """A form or command line value is invalid."""


class ModelNotFoundError(StudioError):
    """A model reference resolves to nothing loadable (missing file, offline and not cached)."""


class UnsafeCheckpointError(StudioError):
    """A checkpoint would need unpickling; only safetensors files are accepted."""


class LoraError(StudioError):
    """A LoRA file is missing, corrupt, for another model family, or changes nothing."""


class BusyError(StudioError):
    """The GPU lane is held by another job (for example a training run)."""


class JobStopped(StudioError):
    """The user pressed Stop; work done before the stop is kept."""


class DatasetError(StudioError):
    """A dataset folder, upload or archive cannot be used as asked: an unsafe or oversized zip, a
    caption edit that would corrupt a file, an image that cannot be decoded."""


class WriteError(StudioError, OSError):
    """A file could not be written (disk full, no permission): one clear line for the UI and the
    CLI. It is an OSError too, for callers that handle I/O errors as such."""


def write_error(path, exc: BaseException) -> WriteError | None:
    """`exc` as a WriteError about `path` when it is an I/O failure (an OSError, or safetensors'
    SafetensorError wrapping one); None for anything else (a bug must stay loud)."""
    text = str(exc)
    if isinstance(exc, OSError):
        reason = exc.strerror or text
    elif type(exc).__name__ == "SafetensorError" and ("os error" in text.lower() or "space" in text.lower()):
        reason = text
    else:
        return None
    return WriteError(f"could not write {path}: {reason}. What was saved before is intact; free some disk "
                      "space (or fix the folder's permissions) and try again.")
