"""Errors that end a run with one line and a chosen exit status."""


class AuditorError(Exception):
    """Something about the host or the environment: exit status 1."""

    exit_status = 1


class UsageError(AuditorError):
    """Bad command-line input: exit status 2."""

    exit_status = 2
