"""``fedmdh ledger show|verify`` and ``fedmdh model get``: reading a run's ledger back."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Annotated, Optional

import typer
from rich.console import Console
from rich.table import Table

from fedmdh.errors import InputError

console = Console()

ledger_app = typer.Typer(name="ledger", help="Inspect and verify a run's blockchain ledger.", no_args_is_help=True)
model_app = typer.Typer(name="model", help="Retrieve archived models.", no_args_is_help=True)

ChainRpcOpt = Annotated[
    Optional[str], typer.Option("--chain-rpc", help="JSON-RPC URL of the node (default: the one recorded).")
]


@ledger_app.command("show")
def show(
    run_dir: Annotated[Path, typer.Argument(help="Run folder (or its ledger/ folder).")],
    as_json: Annotated[bool, typer.Option("--json", help="Print JSON for machines.")] = False,
) -> None:
    """List the task, participants, rounds, commitments, on-chain aggregates, attestations and gas."""
    from fedmdh.ledger.audit import show as _show

    info = _show(run_dir)
    if as_json:
        print(json.dumps(info, indent=2, default=str))
        return
    t = info["task"]
    console.print(f"task {t['contract']} on {t['chain']} chain {t['chain_id']}: {t['algorithm']} -> {t['target']}, "
                  f"{t['rounds']} rounds, quorum {t['quorum']}; submitter {t['submitter']}", highlight=False)
    for name, addr in info["participants"].items():
        console.print(f"  participant {name}: {addr}", highlight=False)
    table = Table("round", "commitments (institution: sha256[:12] x n)", "on-chain mean", "attestations", "finalized",
                  "gas")
    for r in info["rounds"]:
        commits = "\n".join(f"{n}: {c['update_hash'][2:14]} x {c['num_examples']}" for n, c in r["commitments"].items())
        mean = ", ".join(f"{k}={v:.6g}" for k, v in list((r["onchain_mean"] or {}).items())[:3])
        if r["onchain_mean"] and len(r["onchain_mean"]) > 3:
            mean += f", ... ({len(r['onchain_mean'])} values)"
        att = f"{len(r['attestations'])}" + (f", dissent: {', '.join(r['dissent'])}" if r["dissent"] else "")
        fin = r["finalized"][2:14] if r["finalized"] else ("FAILED (no quorum)" if r["failed"] else "not finalized")
        table.add_row(str(r["round"]), commits, mean, att, fin, str(r["gas"]))
    console.print(table)
    a = info["archive"]
    console.print(f"archive: {a['model_hash'][2:]} at {a['locator']}" if a else "archive: none", highlight=False)
    console.print(f"{info['transactions']} transactions, {info['total_gas']} gas in all"
                  + (f"; rejected: {'; '.join(info['rejected'])}" if info["rejected"] else ""), highlight=False)


@ledger_app.command("verify")
def verify(
    run_dir: Annotated[Path, typer.Argument(help="Run folder (or its ledger/ folder).")],
    chain_rpc: ChainRpcOpt = None,
) -> None:
    """Replay the chain, check every commitment against its blob and recompute every aggregate.

    Prints OK, or the first round and institution that does not match (exit status 1).
    """
    from fedmdh.ledger.audit import verify as _verify

    report = _verify(run_dir, rpc_url=chain_rpc)
    console.print(str(report), highlight=False)
    if not report.ok:
        raise typer.Exit(1)


@model_app.command("get")
def get(
    out: Annotated[Path, typer.Option("--out", help="Folder to write the model files to.")],
    run_dir: Annotated[Optional[Path], typer.Argument(help="Run folder (or give --chain-rpc and --task).")] = None,
    chain_rpc: ChainRpcOpt = None,
    task: Annotated[Optional[str], typer.Option("--task", help="The task's contract address on the node.")] = None,
    blobs: Annotated[Optional[Path], typer.Option("--blobs", help="Blob folder (default: the archive's locator).")] = None,
) -> None:
    """Retrieve the archived model of a task and verify its hash."""
    from fedmdh.ledger.audit import get_model

    if run_dir is None and not (chain_rpc and task):
        raise InputError("give RUN_DIR, or --chain-rpc URL with --task ADDRESS.")
    info = get_model(out, run_dir=run_dir, rpc_url=chain_rpc, task=task, blobs_dir=blobs)
    console.print(f"model {info['model_hash']} verified; wrote {len(info['files'])} files to {out}", highlight=False)
