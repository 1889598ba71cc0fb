"""Recovery times of a deployed task: seconds from a kill to the next finalized round.

One local deployment on 127.0.0.1 (anvil, a TLS SuperLink with SuperNode authentication, one
``fedmdh node start`` per institution of the perovskite split) runs fedavg tasks of R rounds with
the faults of ``fedmdh deploy local --fault``, one task per fault, and an uninterrupted one first:

- ``coordinator@2``: the SuperLink and its ServerApp killed (-9) before round 2; a new SuperLink
  (new process, new database) starts and a new ServerApp resumes the task;
- ``node:train_part0@2-4``: one node of three killed before round 2, started again before round 4;
  rounds 2-3 close with the two others once the round timeout has passed;
- ``chain@2``: anvil stopped and started again from its state file.

A watcher polls the task contract every 0.1 s and notes when each round is finalized; the figure is
the time from the kill to the first round finalized after it, beside an uninterrupted round.
Run::

    python benchmarks/failover.py --rounds 5 --round-timeout 15
"""

from __future__ import annotations

import argparse
import json
import platform
import sys
import tempfile
import threading
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
DATA = ROOT.parent / "shared" / "datasets" / "fedmdh_perovskite_split"
NAMES = ["train_part0", "train_part1", "train_part2"]


class Watcher(threading.Thread):
    """When each round of the task recorded in ``out`` is finalized on chain (wall clock)."""

    def __init__(self, out: Path, rpc: str, rounds: int) -> None:
        super().__init__(daemon=True)
        self.out, self.rpc, self.rounds = out, rpc, rounds
        self.finalized: dict[int, float] = {}
        self.stop = threading.Event()

    def run(self) -> None:
        from fedmdh.ledger.chain import Chain

        contract = None
        while not self.stop.wait(0.1):
            try:
                if contract is None:
                    task = self.out / "ledger" / "task.json"
                    if not task.is_file():
                        continue
                    contract = Chain.rpc(self.rpc).contract(json.loads(task.read_text())["contract"])
                for r in range(1, self.rounds + 1):
                    if r not in self.finalized and any(contract.functions.finalized_hash(r).call()):
                        self.finalized[r] = time.perf_counter()
            except Exception:  # noqa: BLE001 - the chain node may be restarting
                continue


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--rounds", type=int, default=5)
    ap.add_argument("--round-timeout", type=float, default=15.0)
    ap.add_argument("--data", type=Path, default=DATA)
    args = ap.parse_args()

    from fedmdh.config import ExperimentConfig
    from fedmdh.deploy.local import Fault, run_task, start_local
    from fedmdh.deploy.processes import Services
    from fedmdh.audit import verify
    from fedmdh.runtime.coordinator import DeployTask, experiment_settings

    files = {n: args.data / f"{n}.csv" for n in NAMES}
    test = args.data / "test_data1.csv"
    R = args.rounds
    cfg = ExperimentConfig([str(p) for p in files.values()], str(test), "e_form", algorithms=("fedavg",), seeds=1,
                           rounds=R)
    rows = []
    with tempfile.TemporaryDirectory(prefix="fedmdh-failover-") as tmp, Services(Path(tmp) / "logs") as services:
        dep = start_local(Path(tmp), files, "e_form", test, services, say=lambda s: print("  " + s, flush=True))
        for i, fault in enumerate([None, "coordinator@2", "node:train_part0@2-4", "chain@2"]):
            for name in NAMES:  # every node up at the start of a task
                if name not in dep.nodes:
                    dep.start_node(name)
            out = Path(tmp) / f"run-{i}"
            task = DeployTask(f"failover{i}", experiment_settings(cfg), len(NAMES), dep.chain_url, str(out),
                              keystore=str(Path(tmp) / "keystore"), wait_s=300, round_timeout=args.round_timeout)
            watcher = Watcher(out, dep.chain_url, R)
            watcher.start()
            struck: list[float] = []

            def say(line: str, struck=struck) -> None:
                if line.startswith("fault: killed") or line.startswith("fault: the chain node"):
                    struck.append(time.perf_counter())
                print("  " + line, flush=True)

            t0 = time.perf_counter()
            run_task(dep, task.to_json(), faults=[Fault.parse(fault)] if fault else [], say=say)
            total = time.perf_counter() - t0
            time.sleep(0.3)
            watcher.stop.set()
            fin = watcher.finalized
            gaps = [fin[r] - fin[r - 1] for r in range(3, R + 1) if r in fin and r - 1 in fin]
            recovery = None
            if struck:
                after = sorted(t for t in fin.values() if t > struck[0])
                recovery = after[0] - struck[0] if after else None
            ok = verify(out).ok
            rows.append((fault or "none (uninterrupted)", recovery, min(gaps) if gaps else None, total, ok))
            print(f"{rows[-1][0]}: kill to next finalized round "
                  f"{'-' if recovery is None else f'{recovery:.1f} s'}, task {total:.1f} s, verify {'OK' if ok else 'FAILED'}",
                  flush=True)

    print()
    print(f"fedavg, perovskite split (3 nodes), {R} rounds, round timeout {args.round_timeout:g} s; "
          f"Python {platform.python_version()}, {sys.platform}; the figures include a {3.0:g} s pause before "
          "the fault's round (the rehearsal's, so that the kill lands between rounds)")
    print("| fault | kill to next finalized round (s) | fastest uninterrupted round (s) | task (s) | verify |")
    print("|---|---|---|---|---|")
    for fault, rec, gap, total, ok in rows:
        print(f"| {fault} | {'-' if rec is None else f'{rec:.1f}'} | {'-' if gap is None else f'{gap:.1f}'} | "
              f"{total:.1f} | {'OK' if ok else 'FAILED'} |")
    print(f"\ncommand: python benchmarks/failover.py --rounds {R} --round-timeout {args.round_timeout:g}")


if __name__ == "__main__":
    main()
