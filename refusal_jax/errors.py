"""Error types. Every user-facing failure is one of these, with a message that names the culprit.

The command-line entry points catch `RefusalJaxError` and exit with status 2 and the message, never a
traceback from deep inside.
"""


class RefusalJaxError(Exception):
    """Base class of all errors raised for bad input."""


class ConfigError(RefusalJaxError):
    """A model config that refusal_jax cannot faithfully implement (unknown architecture, unsupported attribute)."""


class CheckpointError(RefusalJaxError):
    """A checkpoint whose tensors do not fill the expected parameters one-to-one, or a corrupt/truncated file."""


class ChecksumError(RefusalJaxError):
    """A file whose sha256 differs from the expected one."""


class DataError(RefusalJaxError):
    """A missing, empty or malformed dataset, or fewer prompts than asked for."""


class RunError(RefusalJaxError):
    """A run that cannot proceed (changed config on resume, NaN scores, no surviving candidate, ...)."""


class OutputError(CheckpointError):
    """An output path that cannot be written safely (exists, not ours to replace, protected, locked, unwritable).

    A CheckpointError subclass, as "already exists" was one before output safety had its own module."""
