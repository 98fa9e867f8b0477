"""Errors raised while reading checkpoints and engine directories."""


class CheckpointError(Exception):
    """A checkpoint or engine directory that cannot be loaded; the message names the file and the problem."""
