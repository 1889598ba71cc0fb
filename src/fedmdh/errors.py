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


class TrainingDiverged(InputError):
    """Training blew up (a loss or a parameter became NaN, infinite or absurdly large) at ``round``.

    The rounds before it are complete; the message says what to change (the learning rate).
    """

    def __init__(self, round: int, loss: float, detail: str = "", kept: str = "") -> None:
        self.round = int(round)
        self.loss = float(loss)
        self.detail = detail
        what = f"loss {self.loss:.3g}" if detail == "" else detail
        super().__init__(f"training diverged at round {self.round} ({what}); lower the learning rate "
                         f"(lr under [algorithm.NAME] in --config){f'; {kept}' if kept else ''}.")

    def with_kept(self, kept: str) -> "TrainingDiverged":
        """The same error, saying what was kept (e.g. where the rounds before it are)."""
        return TrainingDiverged(self.round, self.loss, self.detail, kept)
