"""Errors a node's process raises while training (the launchers turn them into a failed
run naming the node). Input errors found before training are ``coordinator.errors.ConfigError``."""


class BatchMismatchError(RuntimeError):
    """A node holds a different batch than node 0 (a drifted node): the run stops."""


class NonFiniteLossError(RuntimeError):
    """A node's training loss became NaN or inf: the group stops (the trial fails)."""
