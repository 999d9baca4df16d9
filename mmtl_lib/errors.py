"""The errors a user can cause, kept apart from bugs.

A :class:`ConfigError` says that a value the user chose is not allowed; a :class:`DataError` that
the data is missing, corrupt or not what a run expects. Both subclass :class:`ValueError`, so a
notebook can catch them like any bad value, and the command line turns exactly these two into one
line on stderr and exit status 2. Any other exception is a bug in the library: the command line
lets it through with its traceback (exit status 1).
"""

from __future__ import annotations


class ConfigError(ValueError):
    """A bad argument or configuration value; the message names it, its value and what is allowed."""


class DataError(ValueError):
    """The data is missing, corrupt, or does not match what a run or checkpoint expects."""
