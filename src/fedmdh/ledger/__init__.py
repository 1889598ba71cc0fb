"""The blockchain ledger: contract source, chain backends, blob store, recorder and verifier.

- :mod:`.artifacts`: the Vyper contract, its shipped ABI/bytecode and the compiler that reproduces them.
- :mod:`.codec`: canonical serialization of updates and aggregates, and the fixed point of on-chain vectors.
- :mod:`.blobs`: the off-chain content-addressed store (sha256-named files).
- :mod:`.keys`: one eth-account keystore per institution.
- :mod:`.chain`: one interface over any web3 provider (embedded eth-tester/py-evm or JSON-RPC).
- :mod:`.recorder`: the simulator's round hook that records a run; :mod:`.audit`: show, verify, model get.
"""

from fedmdh.ledger.errors import LedgerError, LedgerRevert

__all__ = ["LedgerError", "LedgerRevert"]
