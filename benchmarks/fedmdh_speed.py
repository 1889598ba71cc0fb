"""FedMDH's cost: wall time of one run as a ratio to FedAvg, and peak memory, on the perovskite split or any federation.

Run:  .venv/bin/python benchmarks/fedmdh_speed.py [--data-dir DIR] [--federation DIR ...] [--rounds 100] [--repeats 3]
          [--algorithms fedavg,fedmdh,...]

``--federation DIR`` (repeatable): a folder written by ``fedmdh partition`` (``inst*.csv``,
``test.csv``, ``federation.json`` naming the target); without it, the perovskite split
(``--data-dir``). Every federation is timed in the same run, alternating the algorithms. The
timed part is ``simulate`` alone, after torch's one-time imports (torch.optim imports
torch._dynamo on its first optimizer: seconds that both algorithms would otherwise pay once).
With several federations a markdown table closes the output: wall-time ratios (the goal's), and
CPU-time ratios of the child processes beside them (less sensitive to other jobs on the machine).

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
import glob, os
data, name, rounds = sys.argv[1], sys.argv[2], int(sys.argv[3])
if os.path.exists(f"{data}/federation.json"):  # a partitioned federation
    target = json.load(open(f"{data}/federation.json"))["target"]
    files, test = sorted(glob.glob(f"{data}/inst*.csv")), f"{data}/test.csv"
else:  # the perovskite split
    target, files, test = "e_form", [f"{data}/train_part{i}.csv" for i in range(3)], f"{data}/test_data1.csv"
tables = [load_institution(f, target) for f in files]
fed = prepare_federation(tables, load_institution(test, target, name="test"), target)
import torch, torch._dynamo  # one-time imports that torch.optim triggers on its first optimizer (about 3 s): not the run's
t, c = time.perf_counter(), time.process_time()
res = simulate(fed, make_algorithm(name), rounds, seed=0)
print(json.dumps({"seconds": time.perf_counter() - t, "cpu_seconds": time.process_time() - c, "peak_mb": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024,
                  "r2": res.final["r2"], "bytes_up_per_round": res.history[-1].bytes_up,
                  "columns": [len(d.feature_idx) for d in fed.institutions]}))
"""


def run(data: Path, name: str, rounds: int) -> dict:
    out = subprocess.run([sys.executable, "-c", CHILD, str(data), name, str(rounds)], check=True,
                         capture_output=True, text=True)
    return json.loads(out.stdout.strip().splitlines()[-1])


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--data-dir", type=Path, default=DEFAULT_DATA)
    ap.add_argument("--federation", type=Path, action="append", default=[])
    ap.add_argument("--rounds", type=int, default=100)
    ap.add_argument("--repeats", type=int, default=3)
    ap.add_argument("--algorithms", default="fedavg,fedmdh,fedmdh-no-gfam,fedmdh-no-cgan,fedmdh-no-rkd")
    args = ap.parse_args()
    names = args.algorithms.split(",")
    if "fedavg" not in names:
        names.insert(0, "fedavg")
    feds = args.federation or [args.data_dir]
    runs = {(f, n): [] for f in feds for n in names}
    for _ in range(args.repeats):
        for f in feds:
            for n in names:
                runs[(f, n)].append(run(f, n, args.rounds))
    print("command: python benchmarks/fedmdh_speed.py " + " ".join(sys.argv[1:]))
    worst = 0.0
    for f in feds:
        base = statistics.median(r["seconds"] for r in runs[(f, "fedavg")])
        print(f"\n{f} (columns per institution: {runs[(f, 'fedavg')][0]['columns']})")
        print(f"{'algorithm':16s} {'median s':>9s} {'x fedavg':>9s} {'peak MB':>8s} {'KB up/round':>12s}")
        for n in names:
            sec = statistics.median(r["seconds"] for r in runs[(f, n)])
            peak = max(r["peak_mb"] for r in runs[(f, n)])
            kb = runs[(f, n)][0]["bytes_up_per_round"] / 1024
            print(f"{n:16s} {sec:9.2f} {sec / base:9.2f} {peak:8.0f} {kb:12.1f}")
        if "fedmdh" in names:
            ratio = statistics.median(r["seconds"] for r in runs[(f, "fedmdh")]) / base
            worst = max(worst, ratio)
            print(f"fedmdh / fedavg wall time: {ratio:.2f}x (goal <= 3x: {'met' if ratio <= 3 else 'NOT met'})")
    if "fedmdh" in names and len(feds) > 1:
        print(f"\nworst fedmdh / fedavg ratio over the federations: {worst:.2f}x")
        print("\n| federation | columns per institution | fedavg s | fedmdh s | fedmdh / fedavg | goal <= 3x "
              "| CPU-time ratio |\n|---|---|---|---|---|---|---|")
        met = 0
        for f in feds:
            med = {n: statistics.median(r["seconds"] for r in runs[(f, n)]) for n in ("fedavg", "fedmdh")}
            cpu = {n: statistics.median(r["cpu_seconds"] for r in runs[(f, n)]) for n in ("fedavg", "fedmdh")}
            ratio = med["fedmdh"] / med["fedavg"]
            met += ratio <= 3
            label = f.parent.name if f.name == "data" else f.name
            print(f"| {label} | {runs[(f, 'fedavg')][0]['columns']} | {med['fedavg']:.2f} | {med['fedmdh']:.2f} "
                  f"| **{ratio:.2f}x** | {'met' if ratio <= 3 else 'not met'} | {cpu['fedmdh'] / cpu['fedavg']:.2f}x |")
        print(f"\ngoal met on {met} of {len(feds)} federations")


if __name__ == "__main__":
    main()
