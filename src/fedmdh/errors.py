"""User-facing errors.

Every problem caused by the user's input (a file, a column, an option) raises :class:`InputError`
with one line that names the place and says what to do. The CLI prints that line and exits
non-zero without a traceback; library callers can catch it.
"""

from __future__ import annotations


class FedmdhError(Exception):
    """Base class of every error fedmdh raises on purpose."""


class InputError(FedmdhError, ValueError):
    """Bad input: the message names the file, column or row and says what to do."""


class TargetUnreachableError(InputError):
    """A requested heterogeneity degree cannot be met with the data given."""
