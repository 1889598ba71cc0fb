"""Issue 12's acceptance per federation, from benchmark folders (results.csv).

Run:  .venv/bin/python benchmarks/acceptance_check.py runs/bench/gap_h0 runs/bench/wolverton_h0 ...

For each folder: whether FedMDH's mean test RMSE is the best of the algorithms run or within one
standard deviation (over seeds) of the best, and, per institution, FedMDH's mean R2 minus the
local-only mean R2 (acceptance: >= -0.02). With a second algorithm named by ``--also`` (e.g. a
folder of guarded runs), the same for it.
"""

from __future__ import annotations

import argparse
import csv
from collections import defaultdict
from pathlib import Path

import numpy as np


def load(folder: Path) -> dict[str, list[dict[str, float]]]:
    runs: dict[str, list[dict[str, float]]] = defaultdict(list)
    with (folder / "results.csv").open() as fh:
        for row in csv.DictReader(fh):
            runs[row["algorithm"]].append({k: float(v) for k, v in row.items() if k not in ("algorithm",)})
    return runs


def check(folder: Path, method: str = "fedmdh", local_folder: Path | None = None) -> str:
    runs = load(folder)
    ref = load(local_folder) if local_folder else runs
    rmse = {a: (np.mean([r["rmse"] for r in rs]), np.std([r["rmse"] for r in rs], ddof=1)) for a, rs in {**ref, **runs}.items()}
    best = min(rmse, key=lambda a: rmse[a][0])
    m, s = rmse[method]
    insts = sorted(k[3:-1] for k in runs[method][0] if k.startswith("r2["))
    gaps = {i: np.mean([r[f"r2[{i}]"] for r in runs[method]]) - np.mean([r[f"r2[{i}]"] for r in ref["local"]])
            for i in insts}
    ok_rmse = best == method or m - s <= rmse[best][0]
    worst = min(gaps.values())
    return (f"| {folder.name} | {method} | {m:.3f} ± {s:.3f} | {best} {rmse[best][0]:.3f} | "
            f"{'yes' if ok_rmse else f'no (+{m - rmse[best][0]:.3f} over best, std {s:.3f})'} | "
            + ", ".join(f"{i} {g:+.3f}" for i, g in gaps.items())
            + f" | {'yes' if worst >= -0.02 else f'no ({worst + 0.02:+.3f} short)'} |")


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("folders", nargs="+", type=Path)
    ap.add_argument("--method", default="fedmdh")
    ap.add_argument("--local-from", default=None,
                    help="suffix to strip from a folder's name to find its local runs (e.g. _guard)")
    args = ap.parse_args()
    print("| federation | method | RMSE | best RMSE | best or within 1 std | R2 minus local, per institution | "
          "all >= -0.02 |")
    print("|---|---|---|---|---|---|---|")
    for f in args.folders:
        loc = f.parent / f.name.removesuffix(args.local_from) if args.local_from else None
        print(check(f, args.method, loc))


if __name__ == "__main__":
    main()
