"""Seconds per round of a deployed task against the engine's floor, measured on one local deployment.

One deployment on 127.0.0.1 (anvil, a TLS SuperLink with SuperNode authentication, one
``fedmdh node start`` per institution of the perovskite split) runs, one after the other:

- the engine's floor: Flower moving one array of the size of a FedAvg update to every node and back,
  one message per node per round, with the push/pull loop fedmdh's coordinator uses
  (``benchmarks/flower_floor``), and the same payload through Flower's own FedAvg strategy;
- fedmdh's deployed fedavg and fedmdh (each round: relay of the committed updates, recomputed
  aggregates, attestations and commitments on chain, validation, local training);
- the in-process simulator on the same federation.

Per-round figures leave out round 1 (setup and contract creation ride on it). Run::

    python benchmarks/deploy_overhead.py --rounds 10
"""

from __future__ import annotations

import argparse
import json
import platform
import sys
import tempfile
import time
from pathlib import Path

import numpy as np

ROOT = Path(__file__).resolve().parents[1]
DATA = ROOT.parent / "shared" / "datasets" / "fedmdh_perovskite_split"
NAMES = ["train_part0", "train_part1", "train_part2"]


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--rounds", type=int, default=10)
    ap.add_argument("--data", type=Path, default=DATA)
    args = ap.parse_args()

    from fedmdh.config import ExperimentConfig
    from fedmdh.deploy.flower import submit_app
    from fedmdh.deploy.local import run_task, start_local
    from fedmdh.deploy.processes import Services
    from fedmdh.experiment.runner import load_tables, prepare
    from fedmdh.runtime.coordinator import DeployTask, experiment_settings
    from fedmdh.runtime.simulator import simulate

    files = {n: args.data / f"{n}.csv" for n in NAMES}
    test = args.data / "test_data1.csv"
    R = args.rounds
    rows = {}
    with tempfile.TemporaryDirectory(prefix="fedmdh-bench-") as tmp, Services(Path(tmp) / "logs") as services:
        t0 = time.perf_counter()
        dep = start_local(Path(tmp), files, "e_form", test, services, say=lambda s: print("  " + s, flush=True))
        print(f"deployment up in {time.perf_counter() - t0:.1f} s", flush=True)
        cfgs = {a: ExperimentConfig([str(p) for p in files.values()], str(test), "e_form", algorithms=(a,), seeds=1,
                                    rounds=R) for a in ("fedavg", "fedmdh")}
        fed = prepare(cfgs["fedavg"], load_tables(cfgs["fedavg"]), 0)
        update_floats = {}
        for a, cfg in cfgs.items():
            res = simulate(fed, cfg.build_algorithm(a), 1, seed=0)
            update_floats[a] = res.history[0].bytes_up // 4 // len(NAMES)
        for name, strategy in (("Flower exchange (floor)", "exchange"), ("Flower FedAvg strategy", "fedavg")):
            t0 = time.perf_counter()
            last = {}
            for ev in submit_app(dep.flwr_home, ROOT / "benchmarks" / "flower_floor",
                                 {"rounds": str(R), "floats": str(update_floats["fedavg"]), "strategy": strategy}):
                last = ev
            rows[name] = (float(last["seconds_per_round"]), time.perf_counter() - t0)
            print(f"{name}: {rows[name][0]:.2f} s per round", flush=True)
        for a, cfg in cfgs.items():
            out = Path(tmp) / f"run-{a}"
            task = DeployTask(f"bench{a}", experiment_settings(cfg), len(NAMES), dep.chain_url, str(out),
                              keystore=str(Path(tmp) / "keystore"), wait_s=300)
            t0 = time.perf_counter()
            run_task(dep, task.to_json())
            total = time.perf_counter() - t0
            secs = [json.loads(x)["seconds"] for x in (out / "metrics.jsonl").read_text().splitlines()]
            rows[f"fedmdh deployed {a}"] = (float(np.mean(secs[1:])), total)
            print(f"deployed {a}: {rows[f'fedmdh deployed {a}'][0]:.2f} s per round", flush=True)
    for a, cfg in cfgs.items():
        t0 = time.perf_counter()
        simulate(fed, cfg.build_algorithm(a), R, seed=0)
        total = time.perf_counter() - t0
        rows[f"simulator {a}"] = (total / R, total)

    floor = rows["Flower exchange (floor)"][0]
    print(f"\n`python benchmarks/deploy_overhead.py --rounds {R}` on {platform.node()} "
          f"(Python {platform.python_version()}), 3 institutions on one machine; payload "
          f"{update_floats['fedavg']} float32 per node (a FedAvg update; FedMDH's is {update_floats['fedmdh']})\n")
    print("| what | s per round (rounds 2..R) | total s | x floor |")
    print("|---|---|---|---|")
    for name, (per, total) in rows.items():
        print(f"| {name} | {per:.2f} | {total:.1f} | {per / floor:.2f} |")
    ok = rows["fedmdh deployed fedmdh"][0] <= 1.2 * floor and rows["fedmdh deployed fedavg"][0] <= 1.2 * floor
    print(f"\ngoal: a deployed round at most 1.2x the floor: {'met' if ok else 'NOT met'}")
    sys.exit(0)


if __name__ == "__main__":
    main()
