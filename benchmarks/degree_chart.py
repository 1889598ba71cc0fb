"""Grouped bar chart of test RMSE by heterogeneity degree and algorithm, from benchmark folders.

Run:  .venv/bin/python benchmarks/degree_chart.py runs/degree/wolverton_{iid,low,medium,high} --out docs/figures/degree_wolverton.png

Each folder is the output of `fedmdh benchmark` on one federation (made by `fedmdh partition`); bars
show the mean over seeds of the institution-mean test RMSE, whiskers one std, log scale.
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path

import numpy as np
import pandas as pd


def main() -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("folders", nargs="+", type=Path)
    ap.add_argument("--out", type=Path, required=True)
    args = ap.parse_args()
    frames, labels = [], []
    for f in args.folders:
        fed = json.loads((f / "federation.json").read_text())
        labels.append(f"{f.name.split('_')[-1]}\nH {fed['H']:.2f} a {fed['alpha']:.1f} KL {fed['KL_avg']:.2f}")
        frames.append(pd.read_csv(f / "results.csv"))
    algs = list(dict.fromkeys(a for fr in frames for a in fr["algorithm"]))
    width = 0.8 / len(algs)
    fig, ax = plt.subplots(figsize=(8, 4.2), dpi=120)
    x = np.arange(len(frames))
    for j, a in enumerate(algs):
        means = [fr.loc[fr.algorithm == a, "rmse"].mean() for fr in frames]
        stds = [fr.loc[fr.algorithm == a, "rmse"].std(ddof=1) for fr in frames]
        ax.bar(x + (j - (len(algs) - 1) / 2) * width, means, width, yerr=stds, label=a, capsize=2)
    ax.set_xticks(x, labels, fontsize=8)
    ax.set_yscale("log")
    ax.set_ylabel("test RMSE (mean over institutions), log scale")
    ax.legend(frameon=False, ncol=len(algs), fontsize=8)
    ax.grid(True, axis="y", which="both", alpha=0.3)
    fig.tight_layout()
    args.out.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(args.out)
    print(f"wrote {args.out}")


if __name__ == "__main__":
    main()
