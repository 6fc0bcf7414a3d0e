"""The error hierarchy. Every anticipated failure is an `LlmctlError`.

The CLI host turns one into a single line on stderr and the class's exit code:
2 for usage and configuration mistakes, 1 for failures at run time.
"""


class LlmctlError(Exception):
    """A failure the user can act on; printed as one line, exit code 1."""

    exit_code = 1


class UsageError(LlmctlError):
    """Wrong flags, arguments or combinations of them (exit 2)."""

    exit_code = 2


class ConfigError(UsageError):
    """A configuration file or override is invalid (exit 2)."""


class OutputExistsError(UsageError):
    """An output path exists and `--force` was not given (exit 2)."""


class OutputLocked(LlmctlError):
    """Another process is writing the same output (exit 1)."""


class CheckpointError(LlmctlError):
    """A checkpoint directory is missing, incomplete or corrupt (exit 1)."""


class DataError(LlmctlError):
    """Input data is missing, empty or malformed (exit 1)."""
