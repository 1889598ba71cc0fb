"""``fedmdh ledger show|verify`` and ``fedmdh model get``: reading a run's ledger back."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Annotated, Optional

import typer

from fedmdh.errors import InputError

ledger_app = typer.Typer(name="ledger", help="Inspect and verify a run's blockchain ledger.", no_args_is_help=True)
model_app = typer.Typer(name="model", help="Retrieve archived models.", no_args_is_help=True)

ChainRpcOpt = Annotated[
    Optional[str], typer.Option("--chain-rpc", help="JSON-RPC URL of the node (default: the one recorded).")
]


def _round_range(round_: Optional[int], rounds: Optional[str]) -> tuple[int, int] | None:
    """``--round R`` or ``--rounds A:B`` (either end may be left out) as an inclusive range."""
    if round_ is not None and rounds is not None:
        raise InputError("give --round R or --rounds A:B, not both.")
    if round_ is not None:
        return round_, round_
    if rounds is None:
        return None
    a, sep, b = rounds.partition(":")
    try:
        lo, hi = int(a) if a.strip() else 1, int(b) if b.strip() else 10**12
    except ValueError:
        lo = hi = -1
    if not sep or lo < 1 or hi < lo:
        raise InputError(f"--rounds {rounds!r}: give A:B with 1 <= A <= B (e.g. 3:7, 10: or :5).")
    return lo, hi


def _round_line(r: dict) -> str:
    if r["finalized"]:
        state = f"finalized {r['finalized'][2:14]}"
    else:
        state = "FAILED (no quorum)" if r["failed"] else "not finalized"
    loss = (r["onchain_mean"] or {}).get("metric:loss")
    parts = [state, f"{len(r['commitments'])} commitments", f"{len(r['attestations'])} attestations"]
    if loss is not None:
        parts.append(f"mean loss {loss:.6g}")
    if r["dissent"]:
        parts.append(f"dissent: {', '.join(r['dissent'])}")
    return f"round {r['round']}: {', '.join(parts)}, {r['gas']:,} gas"


@ledger_app.command("show")
def show(
    run_dir: Annotated[Path, typer.Argument(help="Run folder (or its ledger/ folder).")],
    round_: Annotated[Optional[int], typer.Option("--round", help="Show round R in detail.")] = None,
    rounds: Annotated[Optional[str], typer.Option("--rounds", help="Show rounds A:B in detail (A: or :B too).")] = None,
    as_json: Annotated[bool, typer.Option("--json", help="Print all the data as JSON, for machines.")] = False,
) -> None:
    """The task, its participants and one line per round, as logged; --round/--rounds for the detail.

    Nothing is checked here: `fedmdh ledger verify` replays and checks the ledger.
    """
    from fedmdh.audit import show as _show

    span = _round_range(round_, rounds)
    info = _show(run_dir)
    if span is not None:
        chosen = [r for r in info["rounds"] if span[0] <= r["round"] <= span[1]]
        if not chosen:
            have = f"rounds 1-{info['rounds'][-1]['round']}" if info["rounds"] else "no rounds"
            raise InputError(f"{run_dir}: the log holds {have}; nothing in {span[0]}:{span[1]}.")
        info = {**info, "rounds": chosen}
    if as_json:
        print(json.dumps(info, indent=2, default=str))
        return
    t = info["task"]
    print(f"task {t['contract']} on {t['chain']} chain {t['chain_id']}: {t['algorithm']} -> {t['target']}, "
          f"{t['rounds']} rounds, quorum {t['quorum']}; submitter {t['submitter']}")
    print("participants: " + ", ".join(f"{name} {addr}" for name, addr in info["participants"].items()))
    for r in info["rounds"]:
        print(_round_line(r))
        if span is None:
            continue
        for name, c in r["commitments"].items():
            print(f"  commitment {name}: update {c['update_hash']} x {c['num_examples']} examples")
        for k, v in (r["onchain_mean"] or {}).items():
            print(f"  on-chain mean {k} = {v:.12g}")
        for name, h in r["attestations"].items():
            print(f"  attestation {name}: {h}")
    a = info["archive"]
    print(f"archive: {a['model_hash'][2:]} at {a['locator']}" if a else "archive: none")
    print(f"{info['transactions']} transactions, {info['total_gas']:,} gas in all"
          + (f"; rejected: {'; '.join(info['rejected'])}" if info["rejected"] else ""))
    for note in info["notes"]:
        print(note)


@ledger_app.command("verify")
def verify(
    run_dir: Annotated[Path, typer.Argument(help="Run folder (or its ledger/ folder).")],
    chain_rpc: ChainRpcOpt = None,
    partial: Annotated[bool, typer.Option("--partial", help="Accept a run that did not finish (exit 0 when its "
                                                            "finalized rounds verify).")] = False,
) -> None:
    """Replay the chain, check every commitment against its blob and recompute every aggregate.

    Prints OK (exit status 0); "incomplete: ..." for a run that did not finish (exit status 1 unless
    --partial); FAILED with the first round and institution that does not match (exit status 1); or
    "cannot check ..." when the check could not be made, which is no verdict on the run (exit status
    3): the chain node is unreachable, or a secure task's sums need OpenFHE. A `fedmdh deploy local`
    trial whose chain is not running is checked against its chain brought back from
    RUN/deploy/chain-state.json on a free port, stopped afterwards. Exit status 2: bad input (no
    ledger there).
    """
    from fedmdh.audit import EXIT_CANNOT_CHECK
    from fedmdh.audit import verify as _verify

    report = _verify(run_dir, rpc_url=chain_rpc, partial=partial)
    print(str(report))
    if report.status == "unchecked":
        raise typer.Exit(EXIT_CANNOT_CHECK)
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
    """Retrieve the archived model of a task, after the checks of `fedmdh ledger verify` pass on its run folder
    (archived model files missing from the run folder are what it retrieves) and checking every hash.

    Exit status 2 when the run does not verify (nothing is written), 3 when it cannot be checked (as
    `ledger verify`: its chain node unreachable).
    """
    from fedmdh.audit import EXIT_CANNOT_CHECK, CannotCheck, get_model

    if run_dir is None and not (chain_rpc and task):
        raise InputError("give RUN_DIR, or --chain-rpc URL with --task ADDRESS.")
    try:
        info = get_model(out, run_dir=run_dir, rpc_url=chain_rpc, task=task, blobs_dir=blobs)
    except CannotCheck as exc:  # no verdict: its own exit status, as `ledger verify`
        from rich.console import Console
        from rich.text import Text

        Console(stderr=True).print(Text.assemble(("error:", "bold red"), " ", str(exc)), highlight=False, soft_wrap=True)
        raise typer.Exit(EXIT_CANNOT_CHECK) from None
    print(f"model {info['model_hash']} verified; wrote {len(info['files'])} files to {out}")
    for note in info["notes"]:
        print(note)
