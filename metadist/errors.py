"""The one base class of every user-facing error: bad config, data, shards, weights, URLs, a
busy run folder, a disk that refuses a checkpoint, a lost rank. `metadist` (`__main__`) prints
such an error as one line and exits 2; every other exception is a bug and keeps its traceback.
This module imports nothing."""

from __future__ import annotations


class MetadistError(Exception):
    """Something the user can fix; the message names the thing and what to do."""

    exit_code = 2


class Preempted(MetadistError):
    """The run was asked to stop (SIGTERM / SIGUSR1), finished its step and wrote a checkpoint;
    launching it again resumes there. Exit status 75 (EX_TEMPFAIL: try again)."""

    exit_code = 75


class WeightsError(MetadistError):
    """A weights file or run folder that cannot be loaded."""
