"""Error types every layer may raise; the entry points turn them into one line and exit code 1."""


class MissingHardware(RuntimeError):
    """The config asks for a device or a library this machine does not have (CUDA, flash-attn, FP8)."""
