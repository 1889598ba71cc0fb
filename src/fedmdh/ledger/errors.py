"""Errors of the ledger."""

from __future__ import annotations

from fedmdh.errors import FedmdhError


class LedgerError(FedmdhError):
    """The ledger could not record or check something (the message says what and where)."""


class LedgerRevert(LedgerError):
    """A transaction was rejected by the contract or the node; ``reason`` is the revert message."""

    def __init__(self, function: str, reason: str) -> None:
        super().__init__(f"{function} reverted: {reason}")
        self.function = function
        self.reason = reason
