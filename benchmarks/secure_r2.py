"""Test R2 of an algorithm with --secure against plain, over seeds, on the perovskite split (``fedmdh run`` defaults).

Run:  .venv/bin/python benchmarks/secure_r2.py [--algorithm fedavg] [--data-dir DIR] [--seeds 0,1,2] [--rounds 400]

Per seed, three runs of the simulator from the same configuration as ``fedmdh run --algorithm A``:
``plain`` (the algorithm's own ``aggregate``), ``reordered`` (the secure rule,
:func:`fedmdh.runtime.round.aggregate` with ``Aggregation(secure=True)``, through a float64 sum without encryption:
for FedAvg the same mean computed as ``sum_i n_i w_i / sum_i n_i``, which shows how far a change
in the last bits alone moves a 400-round run; for FedMDH also the rule's one barycenter step a
round where the plain algorithm takes three) and ``secure``
(setup statistics and every round's sums under threshold CKKS). Prints each R2 and the differences.
"""

from __future__ import annotations

import argparse
import shlex
import sys
import time
from pathlib import Path

import numpy as np

from fedmdh.config import ExperimentConfig
from fedmdh.experiment.runner import load_tables, prepare
from fedmdh.runtime.simulator import simulate
from fedmdh.secure.threshold import ThresholdGroup

DEFAULT_DATA = Path(__file__).resolve().parents[2] / "shared" / "datasets" / "fedmdh_perovskite_split"


def plain_sum(vectors):
    return np.sum([vectors[n] for n in sorted(vectors)], axis=0)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--algorithm", default="fedavg")
    ap.add_argument("--data-dir", type=Path, default=DEFAULT_DATA)
    ap.add_argument("--seeds", default="0,1,2")
    ap.add_argument("--rounds", type=int, default=400)
    ap.add_argument("--no-secure", action="store_true", help="the plain and reordered runs only")
    args = ap.parse_args()
    print("command:", shlex.join([Path(sys.executable).name, *sys.argv]), flush=True)
    d = args.data_dir
    cfg = ExperimentConfig(institutions=tuple(str(d / f"train_part{i}.csv") for i in range(3)),
                           test=str(d / "test_data1.csv"), target="e_form", algorithms=(args.algorithm,),
                           rounds=args.rounds)
    tables = load_tables(cfg)
    rows = []
    for seed in [int(s) for s in args.seeds.split(",")]:
        algo = cfg.build_algorithm(args.algorithm)
        t0 = time.perf_counter()
        plain = simulate(prepare(cfg, tables, seed), algo, cfg.rounds, seed=seed, selection=cfg.selection)
        t1 = time.perf_counter()
        reord = simulate(prepare(cfg, tables, seed, secure_sum=plain_sum), algo, cfg.rounds, seed=seed,
                         selection=cfg.selection, secure=plain_sum)
        t2 = time.perf_counter()
        sec_r2 = float("nan")
        if not args.no_secure:
            with ThresholdGroup([t.name for t in tables.institutions]) as g:
                sec_r2 = simulate(prepare(cfg, tables, seed, secure_sum=g), algo, cfg.rounds, seed=seed,
                                  selection=cfg.selection, secure=g).final["r2"]
        t3 = time.perf_counter()
        r = (seed, plain.final["r2"], reord.final["r2"], sec_r2)
        rows.append(r)
        print(f"{args.algorithm} seed {seed}: plain {r[1]:.4f}  reordered {r[2]:.4f} ({r[2] - r[1]:+.4f})  "
              f"secure {r[3]:.4f} ({r[3] - r[1]:+.4f})  [{t1 - t0:.0f} s, {t2 - t1:.0f} s, {t3 - t2:.0f} s]",
              flush=True)
    a = np.array(rows)
    print(f"mean over {len(rows)} seeds: plain {a[:, 1].mean():.4f}  reordered {a[:, 2].mean():.4f}  "
          f"secure {a[:, 3].mean():.4f}  secure - plain {a[:, 3].mean() - a[:, 1].mean():+.4f}")


if __name__ == "__main__":
    main()
