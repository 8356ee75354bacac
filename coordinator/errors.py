"""Errors that the launcher turns into a clean message and a non-zero exit."""


class ConfigError(ValueError):
    """Bad user input, found before training starts. The message names the field and
    the allowed values."""


class BatchMismatchError(RuntimeError):
    """A node holds a different batch than node 0 (a drifted node): the run stops."""


class NonFiniteLossError(RuntimeError):
    """A node's training loss became NaN or inf: the group stops (the trial fails)."""
