"""One interface over any web3 provider: the embedded chain (eth-tester + py-evm in process) or a node.

Every transaction is signed locally by the acting institution's own key with an explicit gas limit
(no gas estimation) and a locally tracked nonce, then sent raw. Each signed transaction and its
receipt is appended to a JSON-lines log (``ledger/transactions.jsonl`` of a run), flushed at once, so
an interrupted run keeps everything it did and the embedded chain can be replayed later.
"""

from __future__ import annotations

import json
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from eth_account import Account
from eth_account.signers.local import LocalAccount
from web3 import Web3
from web3.exceptions import ContractLogicError

from fedmdh.ledger.artifacts import load_artifact
from fedmdh.ledger.errors import LedgerError, LedgerRevert

#: explicit gas limits (measured maxima with margin; see docs/ledger.md)
GAS = {
    "deploy": 4_000_000,
    "register": 200_000,
    "commit": 200_000,  # plus GAS_PER_VALUE per vector value
    "attest": 400_000,  # the last attestation closes the round: one loop over the participants
    "attest_model": 120_000,
    "archive": 300_000,
    "transfer": 21_000,
}
GAS_PER_VALUE = 30_000
GAS_PER_PARTICIPANT = 12_000
FUNDING_WEI = 10**20  # 100 ether of a test chain per account


@dataclass
class Sent:
    """A transaction the chain accepted (status 1)."""

    tx_hash: str
    receipt: Any
    record: dict[str, Any]


def _hex(b: Any) -> str:
    if isinstance(b, (bytes, bytearray)):
        return "0x" + bytes(b).hex()
    return str(b)


def receipt_logs(receipt: Any) -> list[dict[str, Any]]:
    return [
        {"address": log["address"], "topics": [_hex(t) for t in log["topics"]], "data": _hex(log["data"])}
        for log in receipt["logs"]
    ]


#: retries of a JSON-RPC request a chain node did not answer, with backoff ``RPC_BACKOFF_S * 2**i`` (about 64 s)
RPC_RETRIES = 8
RPC_BACKOFF_S = 0.25


class Chain:
    """A web3 connection plus local signing, nonces, fees and the transaction log.

    Parameters
    ----------
    w3:
        Any connected :class:`web3.Web3`.
    kind:
        ``"embedded"`` or ``"rpc"`` (recorded with the run).
    url:
        The node's URL for ``"rpc"``.
    funder:
        An account holding ether on this chain, used to fund new institution accounts (the
        embedded chain's genesis account; on a node, ``None`` uses the node's first unlocked
        account if it has one).
    """

    def __init__(self, w3: Web3, kind: str, url: str | None = None, funder: LocalAccount | None = None,
                 tester: Any = None) -> None:
        self.w3 = w3
        self.tester = tester  # the embedded chain's eth-tester (it mines one block per transaction)
        self.kind = kind
        self.url = url
        self.funder = funder
        self.chain_id = int(w3.eth.chain_id)
        self._nonces: dict[str, int] = {}
        self._mined: dict[str, dict[str, Any]] = {}  # receipts of the last embedded batch, until read
        self._node: Any = None  # the embedded chain's own process, when it runs in one
        self._log_fh = None
        self.log_path: Path | None = None
        self.on_record: Callable[[dict[str, Any]], None] | None = None
        block = w3.eth.get_block("latest")
        base = block.get("baseFeePerGas")
        if base is None:
            self._fees: dict[str, int] = {"gasPrice": int(w3.eth.gas_price)}
        else:
            tip = 10**9 if kind == "embedded" else int(w3.eth.max_priority_fee)
            # twice the base fee covers six full blocks of base-fee growth; our blocks are far from full
            self._fees = {"maxFeePerGas": 2 * int(base) + tip + 10**9, "maxPriorityFeePerGas": tip}

    # ------------------------------------------------------------ construction

    @classmethod
    def embedded(cls) -> "Chain":
        """A fresh in-process chain (eth-tester with the py-evm backend), auto-mining one block per tx."""
        from eth_tester import EthereumTester, PyEVMBackend
        from eth_tester.backends.pyevm.main import get_default_account_keys
        from web3 import EthereumTesterProvider

        tester = EthereumTester(PyEVMBackend())
        w3 = Web3(EthereumTesterProvider(tester))
        funder = Account.from_key(get_default_account_keys()[0].to_bytes())
        return cls(w3, "embedded", funder=funder, tester=tester)

    @classmethod
    def embedded_process(cls) -> "Chain":
        """A fresh embedded chain in a process of its own (:mod:`fedmdh.ledger.node`), so that its
        work overlaps the training; stopped by :meth:`close`."""
        from eth_tester.backends.pyevm.main import get_default_account_keys

        from fedmdh.ledger.node import EmbeddedNode

        node = EmbeddedNode()
        try:
            w3 = Web3(Web3.HTTPProvider(node.url, request_kwargs={"timeout": 300}))
            chain = cls(w3, "embedded", url=None, funder=Account.from_key(get_default_account_keys()[0].to_bytes()))
        except BaseException:
            node.stop()
            raise
        chain._node = node
        return chain

    @classmethod
    def rpc(cls, url: str, timeout: float = 30.0) -> "Chain":
        """A JSON-RPC node (http://, https://, or an IPC path)."""
        from fedmdh.errors import InputError

        if url.startswith(("http://", "https://")):
            provider = Web3.HTTPProvider(url, request_kwargs={"timeout": timeout})
        else:
            provider = Web3.IPCProvider(url, timeout=timeout)
        w3 = Web3(provider)
        try:
            w3.eth.chain_id
        except Exception as exc:  # noqa: BLE001 - any transport error means the same to the user
            raise InputError(f"cannot reach the chain node at {url} ({type(exc).__name__}); start it or fix --chain-rpc.") from None
        if isinstance(provider, Web3.HTTPProvider):
            # once reached, ride out a restart of the chain node (about a minute of retries)
            import requests
            from web3.providers.rpc.utils import ExceptionRetryConfiguration

            provider.exception_retry_configuration = ExceptionRetryConfiguration(
                errors=(ConnectionError, requests.ConnectionError, requests.Timeout),
                retries=RPC_RETRIES, backoff_factor=RPC_BACKOFF_S)
        return cls(w3, "rpc", url=url)

    # ------------------------------------------------------------ logging

    def open_log(self, path: str | Path) -> None:
        self.log_path = Path(path)
        self.log_path.parent.mkdir(parents=True, exist_ok=True)
        self._log_fh = self.log_path.open("a", encoding="utf-8")

    def close(self) -> None:
        if self._log_fh is not None:
            self._log_fh.close()
            self._log_fh = None
        if self._node is not None:
            self._node.stop()
            self._node = None

    def _record(self, rec: dict[str, Any]) -> None:
        if self._log_fh is not None:
            self._log_fh.write(json.dumps(rec, sort_keys=True) + "\n")
            self._log_fh.flush()
        if self.on_record is not None:
            self.on_record(rec)

    # ------------------------------------------------------------ transactions

    def contract(self, address: str | None = None):
        art = load_artifact()
        if address is None:
            return self.w3.eth.contract(abi=art["abi"], bytecode=art["bytecode"])
        return self.w3.eth.contract(address=Web3.to_checksum_address(address), abi=art["abi"])

    def deploy_data(self, *args: Any) -> str:
        """The deployment transaction's data: bytecode followed by the ABI-encoded constructor arguments."""
        from eth_abi import encode

        art = load_artifact()
        ctor = next(x for x in art["abi"] if x["type"] == "constructor")
        return art["bytecode"] + encode([i["type"] for i in ctor["inputs"]], list(args)).hex()

    def nonce(self, address: str) -> int:
        if address not in self._nonces:
            self._nonces[address] = int(self.w3.eth.get_transaction_count(address, "pending"))
        return self._nonces[address]

    def sign(self, account: LocalAccount, to: str | None, data: str | bytes, gas: int, value: int = 0) -> tuple[bytes, dict]:
        """Sign a transaction with ``account``'s key (explicit gas, local nonce)."""
        tx: dict[str, Any] = {
            "nonce": self.nonce(account.address),
            "gas": int(gas),
            "value": int(value),
            "data": data,
            "chainId": self.chain_id,
            **self._fees,
        }
        if to is not None:
            tx["to"] = to
        signed = account.sign_transaction(tx)
        self._nonces[account.address] += 1
        return bytes(signed.raw_transaction), tx

    def send_raw(self, raw: bytes) -> str:
        return _hex(self.w3.eth.send_raw_transaction(raw))

    def receipt(self, tx_hash: str) -> Any:
        """The transaction's receipt, waiting for it on a node (keys as web3 names them)."""
        if tx_hash in self._mined:
            return self._mined.pop(tx_hash)
        if self.tester is None:
            return self.w3.eth.wait_for_transaction_receipt(tx_hash, timeout=300, poll_latency=0.02)
        # the embedded chain mined it already; eth-tester's own receipt skips web3's formatting layers
        r = self.tester.get_transaction_receipt(tx_hash)
        return {
            "status": r["status"],
            "gasUsed": r["gas_used"],
            "blockNumber": r["block_number"],
            "contractAddress": r["contract_address"] or None,
            "logs": [{"address": log["address"], "topics": log["topics"], "data": log["data"]} for log in r["logs"]],
        }

    def mine_batch(self, raws: Sequence[bytes]) -> list[tuple[str, str | None]] | None:
        """Embedded chain only: execute ``raws`` in order in as few new blocks as fit; ``None`` when it cannot.

        The in-process chain otherwise mines one block per transaction, and every block recomputes
        the state trie; one block per batch computes it once. A batch whose gas limits add up to more
        than the block gas limit is cut into consecutive blocks. Returns ``(tx hash, revert reason or
        None)`` per transaction mined: all of them, or a prefix when the chain refuses a block as a
        whole (a stale nonce, too little ether; ``None`` when it refuses the first). A refused block
        changes nothing, and the caller sends the rest one by one.
        """
        if self._node is not None:
            reply = self.w3.provider.make_request("fedmdh_mineBatch", [[_hex(r) for r in raws]])
            if "error" in reply:
                raise LedgerError(f"the embedded chain process failed: {reply['error'].get('message')}")
            if reply["result"] is None:
                return None
            self._mined.update({d["hash"]: d["receipt"] for d in reply["result"]})
            return [(d["hash"], d["reason"]) for d in reply["result"]]
        if self.tester is None:
            return None
        from eth.vm.forks.paris import ParisVM
        from eth_tester.backends.pyevm.main import ZERO_ADDRESS

        evm_chain = self.tester.backend.chain
        vm = evm_chain.get_vm()
        try:
            txs = [vm.get_transaction_builder().decode(bytes(r)) for r in raws]
        except Exception:  # noqa: BLE001 - not a transaction py-evm decodes: let the one-by-one path say why
            return None
        blocks: list[list[Any]] = [[]]
        for tx in txs:
            if blocks[-1] and sum(t.gas for t in blocks[-1]) + tx.gas > evm_chain.header.gas_limit:
                blocks.append([])
            blocks[-1].append(tx)
        out: list[tuple[str, str | None]] = []
        for block in blocks:
            done = self._mine_block(block)
            if done is None:
                return out or None
            out += done
        return out

    def _mine_block(self, txs: list[Any]) -> list[tuple[str, str | None]] | None:
        from eth.vm.forks.paris import ParisVM
        from eth_tester.backends.pyevm.main import ZERO_ADDRESS

        evm_chain = self.tester.backend.chain
        vm = evm_chain.get_vm()
        header_before = evm_chain.header
        try:
            kwargs: dict[str, Any] = {"coinbase": ZERO_ADDRESS}
            if isinstance(vm, ParisVM):
                kwargs["mix_hash"] = bytes(32)  # prevrandao; the contract never reads it
            result, receipts, computations = evm_chain.mine_all(txs, **kwargs)
        except Exception:  # noqa: BLE001 - py-evm refused the block before changing the canonical chain
            evm_chain.header = header_before
            return None
        from eth._utils.address import generate_contract_address

        number = int(result.imported_block.header.block_number)
        out, used = [], 0
        for tx, receipt, computation in zip(txs, receipts, computations):
            tx_hash = _hex(tx.hash)
            self._mined[tx_hash] = {  # what eth-tester's receipt says, without its formatting layers
                "status": 1 if computation.is_success else 0,
                "gasUsed": int(receipt.gas_used) - used,
                "blockNumber": number,
                "contractAddress": (Web3.to_checksum_address(generate_contract_address(tx.sender, tx.nonce))
                                    if not tx.to else None),
                "logs": [{"address": Web3.to_checksum_address(log.address),
                          "topics": ["0x" + int(t).to_bytes(32, "big").hex() for t in log.topics],
                          "data": "0x" + bytes(log.data).hex()} for log in receipt.logs],
            }
            used = int(receipt.gas_used)
            out.append((tx_hash, _revert_message(computation)))
        return out

    def submit(self, items: Sequence[tuple[LocalAccount, str, str | None, Any, dict[str, Any]]]) -> list[Sent]:
        """Send several signed transactions, then wait for all receipts (one block time, not n).

        Each item is ``(account, function name, to, data, meta)``; ``meta`` (actor, round, ...) is
        recorded with the transaction. A rejected transaction raises :class:`LedgerRevert` with
        the contract's message, after the others were recorded.
        """
        signed = []
        for account, fn, to, data, meta in items:
            gas = meta.pop("gas")
            raw, tx = self.sign(account, to, data, gas, meta.pop("value", 0))
            rec = {"fn": fn, "from": account.address, "to": to, "raw": _hex(raw), "gas_limit": gas, **meta}
            signed.append((account, rec, raw))
        pending = []
        batch = self.mine_batch([raw for _, _, raw in signed]) if signed else None
        if batch is not None:
            for (_, rec, _), (tx_hash, reason) in zip(signed, batch):
                rec["tx_hash"] = tx_hash
                pending.append((rec, tx_hash, reason))
            signed = signed[len(batch):]
        for account, rec, raw in signed:
            try:
                rec["tx_hash"] = self.send_raw(raw)
            except ContractLogicError as exc:  # the embedded chain executes on send
                self._nonces.pop(account.address, None)  # a rejected tx consumes no nonce on some nodes
                pending.append((rec, None, _reason(exc)))
                continue
            except ValueError as exc:  # the node refused it (nonce, funds, ...)
                self._nonces.pop(account.address, None)
                pending.append((rec, None, _reason(exc)))
                continue
            pending.append((rec, rec["tx_hash"], None))
        out: list[Sent] = []
        error: LedgerRevert | None = None
        for rec, tx_hash, reason in pending:
            if tx_hash is None:
                rec.update(status=0, error=reason)
                self._record(rec)
                error = error or LedgerRevert(rec["fn"], reason)
                continue
            receipt = self.receipt(tx_hash)
            rec.update(
                status=int(receipt["status"]),
                gas_used=int(receipt["gasUsed"]),
                block=int(receipt["blockNumber"]),
                contract_address=receipt.get("contractAddress"),
                logs=receipt_logs(receipt),
            )
            if rec["status"] != 1:
                rec["error"] = reason or self._revert_reason(rec, receipt)
                self._record(rec)
                error = error or LedgerRevert(rec["fn"], rec["error"])
                continue
            self._record(rec)
            out.append(Sent(tx_hash, receipt, rec))
        if error is not None:
            raise error
        return out

    def _revert_reason(self, rec: dict[str, Any], receipt: Any) -> str:
        """Re-run a failed transaction as a call at its block to read the revert message."""
        tx = self.w3.eth.get_transaction(rec["tx_hash"])
        call = {"from": tx["from"], "to": tx.get("to"), "data": tx["input"], "gas": tx["gas"]}
        try:
            self.w3.eth.call(call, int(receipt["blockNumber"]) - 1)
        except Exception as exc:  # noqa: BLE001 - eth-tester raises its own TransactionFailed
            return _reason(exc)
        return "failed (out of gas?)"

    def transact(self, account: LocalAccount, fn: str, to: str | None, data: Any, **meta: Any) -> Sent:
        return self.submit([(account, fn, to, data, meta)])[0]

    def fund(self, addresses: Sequence[str], amount: int = FUNDING_WEI) -> None:
        """Give each address ``amount`` wei unless it already holds at least half of it."""
        needy = [a for a in addresses if int(self.w3.eth.get_balance(a)) < amount // 2]
        if not needy:
            return
        if self.funder is not None:
            self.submit([(self.funder, "transfer", a, b"", {"gas": GAS["transfer"], "value": amount, "actor": "funder"})
                         for a in needy])
            return
        accounts = self.w3.eth.accounts
        if not accounts:
            if all(v == 0 for k, v in self._fees.items() if k != "maxPriorityFeePerGas"):
                return  # a free-gas network
            raise LedgerError(
                f"accounts {', '.join(needy)} hold no ether on the chain at {self.url} and the node has no unlocked "
                "account to fund them; fund them (or run a free-gas network)."
            )
        for a in needy:
            h = self.w3.eth.send_transaction({"from": accounts[0], "to": a, "value": amount})
            self.w3.eth.wait_for_transaction_receipt(h, timeout=300, poll_latency=0.02)


def _revert_message(computation: Any) -> str | None:
    """The revert reason of a failed py-evm computation (``None`` when it succeeded)."""
    if computation.is_success:
        return None
    out = bytes(computation.output or b"")
    if out[:4] == bytes.fromhex("08c379a0"):
        from eth_abi import decode

        try:
            return str(decode(["string"], out[4:])[0])
        except Exception:  # noqa: BLE001
            pass
    err = computation.error
    return f"{type(err).__name__}: {err}" if err is not None else "reverted"


def _reason(exc: Exception) -> str:
    msg = exc.args[0] if exc.args else str(exc)
    if isinstance(msg, dict):
        msg = msg.get("message", str(msg))
    msg = str(msg)
    for prefix in ("execution reverted: ", "execution reverted:"):
        if msg.startswith(prefix):
            return msg[len(prefix):].strip()
    return msg
