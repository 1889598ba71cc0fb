"""What differential privacy on the released round sums costs: FedAvg on the perovskite split in the
in-process simulator (the study path of :mod:`fedmdh.secure.dp`: the same clipping and noise a
deployed node adds, the noise drawn from the seed), for a grid of noise multipliers and clips.

Run:  .venv/bin/python benchmarks/dp_utility.py [--data-dir DIR] [--rounds 400] [--seeds 0,1]
          [--noise 0.5,1,2,4,8] [--clips 0.01,0.05,0.5]

Prints, per setting: epsilon at delta 1e-5 over the rounds (against the coordinator and every reader
of the aggregates; and against n-1 colluding institutions), and the mean over seeds of the
federation's validation MSE (standardised units, what a user would pick a setting on) and of the
test R2 (reported, not chosen on). A run whose training diverges is shown as such.
"""

from __future__ import annotations

import argparse
import shlex
import sys
from pathlib import Path

import numpy as np

from fedmdh.algorithms import make_algorithm
from fedmdh.data.federation import prepare_federation
from fedmdh.data.io import load_institution
from fedmdh.errors import TrainingDiverged
from fedmdh.runtime.simulator import simulate
from fedmdh.secure.dp import DPSettings, report

DEFAULT_DATA = Path(__file__).resolve().parents[2] / "shared" / "datasets" / "fedmdh_perovskite_split"


def _floats(text: str) -> list[float]:
    return [float(v) for v in text.split(",") if v.strip()]


def main(argv: list[str] | None = None) -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--data-dir", type=Path, default=DEFAULT_DATA)
    ap.add_argument("--rounds", type=int, default=400)
    ap.add_argument("--seeds", default="0,1")
    ap.add_argument("--noise", default="0.5,1,2,4,8")
    ap.add_argument("--clips", default="0.01,0.05,0.5")
    args = ap.parse_args(argv)
    print("$ python benchmarks/dp_utility.py " + " ".join(shlex.quote(a) for a in (argv or sys.argv[1:])))
    tables = [load_institution(args.data_dir / f"train_part{i}.csv", "e_form") for i in range(3)]
    test = load_institution(args.data_dir / "test_data1.csv", "e_form", name="test")
    seeds = [int(s) for s in args.seeds.split(",")]
    feds = {s: prepare_federation(tables, test, "e_form", seed=s) for s in seeds}
    algo = make_algorithm("fedavg")

    def score(dp: DPSettings | None) -> tuple[str, str]:
        vals, r2s = [], []
        for s in seeds:
            try:
                res = simulate(feds[s], algo, args.rounds, seed=s, dp=dp)
            except TrainingDiverged as exc:
                return "diverged", f"(round {exc.round})"
            vals.append(min(r.val_mse for r in res.history))
            r2s.append(res.final["r2"])
        return f"{np.mean(vals):.4f}", f"{np.mean(r2s):.4f}"

    print(f"FedAvg, perovskite split, {args.rounds} rounds, seeds {seeds}, delta 1e-5, 3 institutions")
    print(f"{'noise':>6} {'clip':>6} {'epsilon':>10} {'eps n-1 coll.':>14} {'val MSE':>9} {'test R2':>9}")
    val, r2 = score(None)
    print(f"{'off':>6} {'-':>6} {'-':>10} {'-':>14} {val:>9} {r2:>9}", flush=True)
    for clip in _floats(args.clips):
        for sigma in _floats(args.noise):
            dp = DPSettings(sigma, clip)
            rep = report(dp, args.rounds, 3)
            val, r2 = score(dp)
            eps = "-" if rep["epsilon"] is None else f"{rep['epsilon']:.3g}"
            epc = "-" if rep["epsilon_against_n_minus_1_colluding"] is None else \
                f"{rep['epsilon_against_n_minus_1_colluding']:.3g}"
            print(f"{sigma:>6g} {clip:>6g} {eps:>10} {epc:>14} {val:>9} {r2:>9}", flush=True)


if __name__ == "__main__":
    main()
