"""How a run records to the ledger (no chain imports: cheap to import)."""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

from fedmdh.errors import InputError

MODES = ("embedded", "rpc", "off")


@dataclass(frozen=True)
class LedgerOptions:
    """How a run records to the ledger.

    Attributes
    ----------
    mode:
        ``"embedded"`` (an in-process chain, the default of ``fedmdh run``), ``"rpc"`` (a node at
        ``rpc_url``) or ``"off"``.
    rpc_url:
        JSON-RPC URL of the node for ``"rpc"``.
    keystore:
        Folder of the institutions' keystore files. Default: ``$FEDMDH_KEYSTORE``, else
        ``$FEDMDH_HOME/keystore``, else ``~/.fedmdh/keystore`` on a node, and its ``embedded/``
        subfolder for the embedded chain's throwaway accounts (never the run folder).
    quorum:
        Attestations that finalize a round; default a majority of the participants.
    pipeline:
        Overlap each round's chain work with the next round's training (default). The next round
        starts from the aggregate computed locally; one round later the recorder checks that the
        chain finalized exactly that aggregate and stops the run otherwise. ``False`` waits for
        every round's finalization and continues from the finalized aggregate.
    """

    mode: str = "embedded"
    rpc_url: str | None = None
    keystore: Path | None = None
    quorum: int | None = None
    pipeline: bool = True

    def __post_init__(self) -> None:
        if self.mode not in MODES:
            raise InputError(f"--ledger must be one of {', '.join(MODES)}, got {self.mode!r}.")
        if self.mode == "rpc" and not self.rpc_url:
            raise InputError("--ledger rpc needs --chain-rpc URL (e.g. http://127.0.0.1:8545).")
        if self.mode != "rpc" and self.rpc_url:
            object.__setattr__(self, "mode", "rpc")

    @classmethod
    def parse(cls, mode: str | None, rpc_url: str | None, default: str = "embedded") -> "LedgerOptions":
        """From the CLI: ``--chain-rpc`` alone implies ``--ledger rpc``."""
        return cls(mode=mode or ("rpc" if rpc_url else default), rpc_url=rpc_url)
