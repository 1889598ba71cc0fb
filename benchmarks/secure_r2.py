"""Test R2 of FedAvg with --secure against plain, over seeds, on the perovskite split (``fedmdh run`` defaults).

Run:  .venv/bin/python benchmarks/secure_r2.py [--data-dir DIR] [--seeds 0,1,2] [--rounds 400]

Per seed, three runs of the simulator from the same configuration as ``fedmdh run --algorithm fedavg``:
``plain`` (the float64 weighted mean), ``reordered`` (the same mean computed as
``sum_i n_i w_i / sum_i n_i`` in float64, the arithmetic of the secure path without encryption:
it shows how far a change in the last bits alone moves a 400-round run) and ``secure``
(setup statistics and every round's sums under threshold CKKS). Prints each R2 and the differences.
"""

from __future__ import annotations

import argparse
import shlex
import sys
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
    ap.add_argument("--data-dir", type=Path, default=DEFAULT_DATA)
    ap.add_argument("--seeds", default="0,1,2")
    ap.add_argument("--rounds", type=int, default=400)
    args = ap.parse_args()
    print("command:", shlex.join([Path(sys.executable).name, *sys.argv]), flush=True)
    d = args.data_dir
    cfg = ExperimentConfig(institutions=tuple(str(d / f"train_part{i}.csv") for i in range(3)),
                           test=str(d / "test_data1.csv"), target="e_form", algorithms=("fedavg",),
                           rounds=args.rounds)
    tables = load_tables(cfg)
    rows = []
    for seed in [int(s) for s in args.seeds.split(",")]:
        algo = cfg.build_algorithm("fedavg")
        plain = simulate(prepare(cfg, tables, seed), algo, cfg.rounds, seed=seed, selection=cfg.selection)
        reord = simulate(prepare(cfg, tables, seed, secure_sum=plain_sum), algo, cfg.rounds, seed=seed,
                         selection=cfg.selection, secure=plain_sum)
        with ThresholdGroup([t.name for t in tables.institutions]) as g:
            sec = simulate(prepare(cfg, tables, seed, secure_sum=g), algo, cfg.rounds, seed=seed,
                           selection=cfg.selection, secure=g)
        r = (seed, plain.final["r2"], reord.final["r2"], sec.final["r2"])
        rows.append(r)
        print(f"seed {seed}: plain {r[1]:.4f}  reordered {r[2]:.4f} ({r[2] - r[1]:+.4f})  "
              f"secure {r[3]:.4f} ({r[3] - r[1]:+.4f})", flush=True)
    a = np.array(rows)
    print(f"mean over {len(rows)} seeds: plain {a[:, 1].mean():.4f}  reordered {a[:, 2].mean():.4f}  "
          f"secure {a[:, 3].mean():.4f}  secure - plain {a[:, 3].mean() - a[:, 1].mean():+.4f}")


if __name__ == "__main__":
    main()
