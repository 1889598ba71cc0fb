"""What the ledger costs: ms per participant per round, ledger-on / ledger-off, gas; embedded chain and anvil.

    python benchmarks/ledger_cost.py [--rounds 100] [--algorithms fedavg,fedmdh] [--anvil-rounds 20]

For each algorithm it trains the FedMDH paper's perovskite split three times in this process
(same seed): without the ledger, with the ledger on the embedded chain as `fedmdh run` records
(chain work pipelined with the next round's training), and with the ledger unpipelined (each round
waits for its finalization). It prints, per participant per round:

- the wall time the ledger adds per round: (run with ledger - run without - one-off start-up) /
  (rounds x participants), where the start-up is opening the keys, starting the embedded chain's
  process (pipelined) and creating the task (deploy + registrations), reported in its own column;
- the chain work: blobs, signing and both transactions of every institution up to finalization,
  measured on the thread that does it (with pipelining it overlaps training);

plus the wall-time ratio ledger-on / ledger-off of the whole runs (start-up included) and the gas
per round and per participant. With an anvil binary ($FEDMDH_ANVIL or .tools/) it repeats the
pipelined run against anvil on 127.0.0.1. Imports and the first chain's start-up are warmed up
before timing (a once-per-process cost).
"""

from __future__ import annotations

import argparse
import glob
import os
import socket
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
DATA = ROOT.parent / "shared" / "datasets" / "fedmdh_perovskite_split"


def _anvil() -> str | None:
    env = os.environ.get("FEDMDH_ANVIL")
    if env and Path(env).is_file():
        return env
    hits = sorted(glob.glob(str(ROOT / ".tools/node_modules/@foundry-rs/anvil-*/bin/anvil")))
    return hits[0] if hits else None


def _start_anvil(binary: str) -> tuple[subprocess.Popen, str]:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    proc = subprocess.Popen([binary, "--host", "127.0.0.1", "--port", str(port), "--silent"],
                            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    for _ in range(300):
        try:
            socket.create_connection(("127.0.0.1", port), timeout=0.2).close()
            return proc, f"http://127.0.0.1:{port}"
        except OSError:
            time.sleep(0.1)
    proc.kill()
    raise RuntimeError("anvil did not start")


def measure(cfg, tables, name: str, rounds: int, options, workdir: Path) -> dict:
    from fedmdh.experiment.runner import prepare
    from fedmdh.experiment.run_ledger import finish_run_ledger, start_run_ledger
    from fedmdh.runtime.simulator import simulate

    fed = prepare(cfg, tables, 0)
    algo = cfg.build_algorithm(name)
    t0 = time.perf_counter()
    rec = start_run_ledger(options, workdir / "ledger", algo, fed, cfg.target, rounds, 0, workdir / "config.toml")
    start = time.perf_counter() - t0  # keys, and the embedded chain's process when pipelined
    res = simulate(fed, algo, rounds, seed=0, round_hook=rec.round_hook if rec else None)
    finish_run_ledger(rec, None)
    out = {"seconds": time.perf_counter() - t0, "rmse": res.final["rmse"], "participants": len(fed.names),
           "start_seconds": start}
    if rec is not None:
        out.update(rec.summary())
    return out


def _warm_up() -> None:
    """Import the chain stack and start one embedded chain, so the timed runs do not pay for it."""
    from fedmdh.ledger.chain import Chain
    from fedmdh.ledger.recorder import open_ledger  # noqa: F401

    Chain.embedded().close()


def _added_ms(on: dict, off: dict, rounds: int) -> float:
    once = on["start_seconds"] + on["setup_seconds"]
    return 1000 * (on["seconds"] - off["seconds"] - once) / (rounds * on["participants"])


def main(argv: list[str] | None = None) -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--rounds", type=int, default=100)
    ap.add_argument("--algorithms", default="fedavg,fedmdh", help="comma-separated algorithm names, e.g. fedavg,fedmdh")
    ap.add_argument("--anvil-rounds", type=int, default=None, help="rounds of the anvil run [default --rounds]")
    ap.add_argument("--data-dir", type=Path, default=DATA)
    args = ap.parse_args(argv)

    from fedmdh.config import ExperimentConfig
    from fedmdh.experiment.runner import load_tables
    from fedmdh.ledger.options import LedgerOptions

    algorithms = [a.strip() for a in args.algorithms.split(",") if a.strip()]
    cfg = ExperimentConfig(
        institutions=tuple(str(args.data_dir / f"train_part{i}.csv") for i in range(3)),
        test=str(args.data_dir / "test_data1.csv"), target="e_form", algorithms=tuple(algorithms), seeds=1,
        rounds=args.rounds,
    )
    tables = load_tables(cfg)
    print(f"perovskite split, {len(tables.institutions)} institutions, {args.rounds} rounds, seed 0; "
          f"python {sys.version.split()[0]}, {os.cpu_count()} CPUs")
    rows = []
    _warm_up()
    with tempfile.TemporaryDirectory() as tmp:
        for name in algorithms:
            off = measure(cfg, tables, name, args.rounds, LedgerOptions(mode="off"), Path(tmp) / f"{name}-off")
            for label, opts in (("embedded", LedgerOptions(mode="embedded")),
                                ("embedded, unpipelined", LedgerOptions(mode="embedded", pipeline=False))):
                on = measure(cfg, tables, name, args.rounds, opts, Path(tmp) / f"{name}-{len(rows)}")
                rows.append((label, name, args.rounds, on, off))
        binary = _anvil()
        if binary is None:
            print("anvil: not found (set FEDMDH_ANVIL or npm install --prefix .tools @foundry-rs/anvil@1.7.1)")
        else:
            os.environ.setdefault("FEDMDH_KEY_PASSPHRASE", "benchmark")
            os.environ.setdefault("FEDMDH_KEY_KDF", "pbkdf2")
            os.environ.setdefault("FEDMDH_KEY_KDF_ITERATIONS", "1000")
            n = args.anvil_rounds or args.rounds
            proc, url = _start_anvil(binary)
            try:
                for name in algorithms:
                    off = measure(cfg, tables, name, n, LedgerOptions(mode="off"), Path(tmp) / f"{name}-aoff")
                    opts = LedgerOptions(mode="rpc", rpc_url=url, keystore=Path(tmp) / "keys")
                    on = measure(cfg, tables, name, n, opts, Path(tmp) / f"{name}-anvil")
                    rows.append(("anvil", name, n, on, off))
            finally:
                proc.terminate()
                proc.wait(timeout=10)
    print()
    print("| chain | algorithm | rounds | added wall ms / participant / round | chain thread ms / participant / round |"
          " run off (s) | run on (s) | on/off | start-up (s) | gas / round | gas / participant / round | setup gas |")
    print("|---|---|---|---|---|---|---|---|---|---|---|---|")
    for chain, name, n, on, off in rows:
        print(f"| {chain} | {name} | {n} | {_added_ms(on, off, n):.1f} | {on['ms_per_participant_round']:.1f} | "
              f"{off['seconds']:.1f} | {on['seconds']:.1f} | {on['seconds'] / off['seconds']:.2f} | "
              f"{on['start_seconds'] + on['setup_seconds']:.2f} | {on['gas_per_round']:.0f} | {on['gas_per_participant_round']:.0f} | "
              f"{on['setup_gas']} |")
    print(f"\ncommand: python benchmarks/{Path(__file__).name} {' '.join(argv if argv is not None else sys.argv[1:])}")


if __name__ == "__main__":
    main()
