"""Simulator overhead: 100 FedAvg rounds vs pooled training of the same network, same passes.

Run:  .venv/bin/python benchmarks/simulator_overhead.py [--data-dir DIR] [--rounds 100] [--repeats 5]

FedAvg in the simulator: 3 institutions x 5 local steps of batch 64 per round, with everything the
simulator does per round (parameter copies out and in, deterministic float64 aggregation,
validation and test evaluation of every institution's model). The reference is a bare torch
loop over the pooled rows of the same network: rounds x 15 steps of batch 64 (the same rows
processed), no evaluation. Both run in this process, interleaved, on the same data; the figure
reported is the ratio of medians (goal: at most 1.5x). The machine is shared, so only the ratio
measured in one run means anything.
"""

from __future__ import annotations

import argparse
import statistics
import time
from pathlib import Path

import numpy as np
import torch

from fedmdh.algorithms import LocalTraining, make_algorithm
from fedmdh.data.federation import prepare_federation
from fedmdh.data.io import load_institution
from fedmdh.nn.mlp import make_mlp, make_optimizer, train_steps
from fedmdh.runtime.simulator import _simulation_threads as _threads
from fedmdh.runtime.simulator import merge_institutions, simulate
from fedmdh.seeding import rng_for

DEFAULT_DATA = Path(__file__).resolve().parents[2] / "shared" / "datasets" / "fedmdh_perovskite_split"


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--data-dir", type=Path, default=DEFAULT_DATA)
    ap.add_argument("--rounds", type=int, default=100)
    ap.add_argument("--repeats", type=int, default=5)
    args = ap.parse_args()

    tables = [load_institution(args.data_dir / f"train_part{i}.csv", "e_form") for i in range(3)]
    test = load_institution(args.data_dir / "test_data1.csv", "e_form", name="test")
    fed = prepare_federation(tables, test, "e_form", seed=0)
    training = LocalTraining()
    steps = args.rounds * training.local_steps * len(fed.institutions)
    pooled = merge_institutions(fed)

    def run_simulator() -> float:
        t = time.perf_counter()
        simulate(fed, make_algorithm("fedavg", training), args.rounds, seed=0)
        return time.perf_counter() - t

    def run_pooled() -> float:
        model = make_mlp(fed.n_features, training.hidden, 0)
        opt = make_optimizer(model.parameters(), training.optimizer, training.lr)
        t = time.perf_counter()
        train_steps(model, opt, pooled.X, pooled.y, steps, training.batch_size, rng_for(0, "pooled"))
        return time.perf_counter() - t

    run_simulator(), run_pooled()  # warm-up
    sim, ref = [], []
    for _ in range(args.repeats):
        sim.append(run_simulator())
        ref.append(run_pooled())
    s, r = statistics.median(sim), statistics.median(ref)
    print(f"command: python benchmarks/simulator_overhead.py --rounds {args.rounds} --repeats {args.repeats}")
    print(f"torch {torch.__version__}, numpy {np.__version__}; the simulator runs torch with "
          f"{_threads()} thread(s) ($FEDMDH_TORCH_THREADS), the reference loop with {torch.get_num_threads()}")
    print(f"FedAvg simulator, {args.rounds} rounds x 3 institutions x {training.local_steps} steps: "
          f"median {s:.3f} s (runs: {', '.join(f'{x:.3f}' for x in sim)})")
    print(f"pooled torch loop, {steps} steps of batch {training.batch_size}:          "
          f"median {r:.3f} s (runs: {', '.join(f'{x:.3f}' for x in ref)})")
    print(f"ratio simulator / pooled: {s / r:.2f}x (goal <= 1.5x: {'met' if s / r <= 1.5 else 'NOT met'})")


if __name__ == "__main__":
    main()
