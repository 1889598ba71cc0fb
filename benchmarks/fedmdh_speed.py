"""FedMDH's cost: wall time of one run on the perovskite split as a ratio to FedAvg, and peak memory.

Run:  .venv/bin/python benchmarks/fedmdh_speed.py [--data-dir DIR] [--rounds 100] [--repeats 3]

Both algorithms run with the same rounds, local steps, batch and network (the benchmark's
defaults), each in a fresh subprocess (so peak resident memory is the run's own), alternating
FedAvg and FedMDH; the ratio of median wall times is reported (goal: at most 3x). Ablations are
timed too, to show where the time goes. The machine is shared: only ratios from one run count.
"""

from __future__ import annotations

import argparse
import json
import statistics
import subprocess
import sys
from pathlib import Path

DEFAULT_DATA = Path(__file__).resolve().parents[2] / "shared" / "datasets" / "fedmdh_perovskite_split"

CHILD = r"""
import json, resource, sys, time
from fedmdh.algorithms import make_algorithm
from fedmdh.data.federation import prepare_federation
from fedmdh.data.io import load_institution
from fedmdh.runtime.simulator import simulate
data, name, rounds = sys.argv[1], sys.argv[2], int(sys.argv[3])
tables = [load_institution(f"{data}/train_part{i}.csv", "e_form") for i in range(3)]
fed = prepare_federation(tables, load_institution(f"{data}/test_data1.csv", "e_form", name="test"), "e_form")
t = time.perf_counter()
res = simulate(fed, make_algorithm(name), rounds, seed=0)
print(json.dumps({"seconds": time.perf_counter() - t, "peak_mb": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024,
                  "r2": res.final["r2"], "bytes_up_per_round": res.history[-1].bytes_up}))
"""


def run(data: Path, name: str, rounds: int) -> dict:
    out = subprocess.run([sys.executable, "-c", CHILD, str(data), name, str(rounds)], check=True,
                         capture_output=True, text=True)
    return json.loads(out.stdout.strip().splitlines()[-1])


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--data-dir", type=Path, default=DEFAULT_DATA)
    ap.add_argument("--rounds", type=int, default=100)
    ap.add_argument("--repeats", type=int, default=3)
    args = ap.parse_args()
    names = ["fedavg", "fedmdh", "fedmdh-no-gfam", "fedmdh-no-cgan", "fedmdh-no-rkd"]
    runs: dict[str, list[dict]] = {n: [] for n in names}
    for _ in range(args.repeats):
        for n in names:
            runs[n].append(run(args.data_dir, n, args.rounds))
    base = statistics.median(r["seconds"] for r in runs["fedavg"])
    print(f"command: python benchmarks/fedmdh_speed.py --rounds {args.rounds} --repeats {args.repeats}")
    print(f"{'algorithm':16s} {'median s':>9s} {'x fedavg':>9s} {'peak MB':>8s} {'KB up/round':>12s}")
    for n in names:
        sec = statistics.median(r["seconds"] for r in runs[n])
        peak = max(r["peak_mb"] for r in runs[n])
        kb = runs[n][0]["bytes_up_per_round"] / 1024
        print(f"{n:16s} {sec:9.2f} {sec / base:9.2f} {peak:8.0f} {kb:12.1f}")
    ratio = statistics.median(r["seconds"] for r in runs["fedmdh"]) / base
    print(f"fedmdh / fedavg wall time: {ratio:.2f}x (goal <= 3x: {'met' if ratio <= 3 else 'NOT met'})")


if __name__ == "__main__":
    main()
