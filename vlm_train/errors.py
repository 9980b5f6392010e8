"""Errors that are the user's to fix: the CLI prints them as one line and exits non-zero."""

import sys


class UserError(Exception):
    """A mistake in the config, the data or the launch; the message says what and how to fix it."""

    exit_code = 2
    same_on_every_rank = False  # raised identically by every rank of a job: only rank 0 reports it


class ConfigError(UserError):
    """A bad override, an unknown key or option, or a value out of range."""


class DataError(UserError):
    """Shards that cannot be found or read as the config says."""


class LayoutError(UserError):
    """A parallel layout that does not fit the world size or the model."""


class TrainingDiverged(UserError):
    """More steps had a non-finite loss than `train.max_bad_steps` allows; the last checkpoint is kept."""

    exit_code = 3


def report(program: str, err: UserError) -> int:
    """Print a user's mistake as the CLI's one line on stderr; return the exit code to leave with."""
    print(f"{program}: error: {err}", file=sys.stderr, flush=True)
    return err.exit_code
