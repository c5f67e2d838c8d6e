"""Error types every layer may raise; the entry points turn them into one line and exit code 1."""


class MissingHardware(RuntimeError):
    """The config asks for a device or a library this machine does not have (CUDA, flash-attn, FP8)."""


# Errors a user can act on: a bad value, a missing or damaged file, a busy directory, a missing device.
USER_ERRORS: tuple[type[BaseException], ...] = (ValueError, OSError, MissingHardware)
