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
