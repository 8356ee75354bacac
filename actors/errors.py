"""The project's errors. ``ConfigError``: a user's input mistake, found before training
(one line, exit code 2). The others: what a node's process raises while training (the
launchers turn them into a failed run naming the node)."""


class BatchMismatchError(RuntimeError):
    """A node holds a different batch than node 0 (a drifted node): the run stops."""


class NonFiniteLossError(RuntimeError):
    """A node's training loss became NaN or inf: the group stops (the trial fails)."""


class ConfigError(ValueError):
    """Bad user input, found before training starts (by the config's validation or by
    the preflight). The message names the field and the allowed values; the launchers
    print it as one line and exit with code 2."""
