"""Markdown tables of docs/results.md from benchmark folders (results.csv + federation.json).

    python benchmarks/results_tables.py degree runs/degree/wolverton_{iid,low,medium,high}
    python benchmarks/results_tables.py overview --degree runs/degree --extra runs/degree_b4

``degree``: per federation, a header line (degree, H, alpha, KL_avg, sizes, union width) and the test
RMSE and R2 (mean over institutions, then mean ± sample std over seeds) with R2 per institution.
``overview``: mean test R2 of every algorithm on every federation (folders under --degree, plus the
same federation names under --extra for further algorithms).
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path

import numpy as np
import pandas as pd


def _num(x: float) -> str:
    return f"{x:.3f}" if abs(x) < 1e3 else f"{x:.2g}"


def _pm(values: pd.Series) -> str:
    v = values.to_numpy(dtype=float)
    std = float(v.std(ddof=1)) if v.size > 1 else 0.0
    return f"{_num(float(v.mean()))} ± {_num(std)}"


def degree_table(folder: Path) -> str:
    fed = json.loads((folder / "federation.json").read_text())
    res = pd.read_csv(folder / "results.csv")
    insts = [c[3:-1] for c in res.columns if c.startswith("r2[")]
    sizes = [i.get("n_rows", i.get("rows")) for i in fed.get("institutions", [])]
    head = (f"**{folder.name.split('_')[-1]}** (H {fed['H']:.3f}, alpha {fed['alpha']:.2f}, KL_avg "
            f"{fed['KL_avg']:.3f}; sizes {sizes}; {fed.get('union_features', '?')} features in the union)")
    lines = [head, "", "| algorithm | RMSE | R2 | " + " | ".join(f"R2 {i}" for i in insts) + " |",
             "|---|---|---|" + "---|" * len(insts)]
    for alg, g in res.groupby("algorithm", sort=False):
        cells = [_pm(g["rmse"]), _pm(g["r2"])] + [_pm(g[f"r2[{i}]"]) for i in insts]
        lines.append(f"| {alg} | " + " | ".join(cells) + " |")
    return "\n".join(lines)


def overview(degree: Path, extra: Path | None) -> str:
    rows, algs = [], []
    for ds in ("wolverton", "steels", "gap"):
        for d in ("iid", "low", "medium", "high"):
            name = f"{ds}_{d}"
            frames = [pd.read_csv(degree / name / "results.csv")]
            if extra is not None and (extra / name / "results.csv").exists():
                frames.append(pd.read_csv(extra / name / "results.csv"))
            res = pd.concat(frames)
            means = res.groupby("algorithm", sort=False)["r2"].mean()
            algs += [a for a in means.index if a not in algs]
            rows.append((name, means))
    out = ["| federation | " + " | ".join(algs) + " |", "|---|" + "---|" * len(algs)]
    for name, means in rows:
        out.append(f"| {name} | " + " | ".join(_num(means[a]) if a in means else "" for a in algs) + " |")
    return "\n".join(out)


def main(argv: list[str] | None = None) -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    sub = ap.add_subparsers(dest="cmd", required=True)
    d = sub.add_parser("degree")
    d.add_argument("folders", nargs="+", type=Path)
    o = sub.add_parser("overview")
    o.add_argument("--degree", type=Path, default=Path("runs/degree"))
    o.add_argument("--extra", type=Path, default=None)
    args = ap.parse_args(argv)
    if args.cmd == "degree":
        print("\n\n".join(degree_table(f) for f in args.folders))
    else:
        print(overview(args.degree, args.extra))


if __name__ == "__main__":
    main()
