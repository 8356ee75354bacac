"""Errors that the launcher turns into a clean message and a non-zero exit."""


class ConfigError(ValueError):
    """Bad user input, found before training starts. The message names the field and
    the allowed values."""
