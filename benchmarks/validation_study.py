"""Choices made on validation data only: GFAM's mapping, the selection rule and the local guard.

Run:
    .venv/bin/python benchmarks/validation_study.py record --federations perovskite runs/degree/gap_h0/data \
        --variants local,fedavg,fedmdh,fedmdh:mapping=per-institution --seeds 0 --rounds 400 --out runs/study
    .venv/bin/python benchmarks/validation_study.py analyse --out runs/study [--markdown docs/...]
    .venv/bin/python benchmarks/validation_study.py compare --out runs/study --variants fedmdh,fedmdh:max_grad_norm=1

``record`` trains each variant on each federation (``fedmdh benchmark``'s defaults: clip margin 1,
validation fraction 0.15, 400 rounds x 5 steps) and stores, for every round and institution, the
predictions of the institution's current model (a) on its *own* validation rows, which is all a
deployed institution can select on, and (b) on *every* institution's validation rows seen through
its own columns (the "federated validation" of the simulator, which mirrors the shared test set: all
label bands, each institution through its own columns). The test set is never read. A run that
diverges (``TrainingDiverged``) is recorded as such (``<variant>_seed<s>.diverged``) and named by
``compare``, not scored.

``analyse`` replays selection rules offline on (a) and scores what they keep on (b): since training
does not depend on the rule, one training run serves every rule. The local guard's reference is the
``local`` variant's run of the same seed (the guard's local model is that model bit for bit).
"""

from __future__ import annotations

import argparse
import json
from collections.abc import Sequence
from pathlib import Path

import numpy as np

ROOT = Path(__file__).resolve().parents[1]
PEROVSKITE = ROOT.parent / "shared" / "datasets" / "fedmdh_perovskite_split"


def _config(federation: str, variant: str, rounds: int):
    from fedmdh.config import ExperimentConfig

    name, settings = parse_variant(variant)
    if federation == "perovskite":
        insts = [str(PEROVSKITE / f"train_part{i}.csv") for i in range(3)]
        test, target = str(PEROVSKITE / "test_data1.csv"), "e_form"
    else:
        folder = Path(federation)
        insts = sorted(str(p) for p in folder.glob("inst*.csv"))
        test = str(folder / "test.csv")
        target = "e_form" if "wolverton" in str(folder) else "target"
    return ExperimentConfig(tuple(insts), test, target, algorithms=(name,), seeds=1, rounds=rounds,
                            algorithm_settings={name: settings} if settings else {}, local_guard="off")


def parse_variant(variant: str) -> tuple[str, dict]:
    """``fedmdh:mapping=per-institution,holder_average=true`` -> ("fedmdh", {...})."""
    name, _, rest = variant.partition(":")
    settings: dict = {}
    for item in filter(None, rest.split(";")):
        k, _, v = item.partition("=")
        settings[k] = (None if v == "none" else json.loads(v) if v in ("true", "false") or v.replace(".", "", 1).isdigit()
                       else v)
    return name, settings


def federation_label(federation: str) -> str:
    return "perovskite" if federation == "perovskite" else Path(federation).parent.name


def record(federation: str, variant: str, seed: int, rounds: int, out: Path) -> Path:
    """Train once and store own- and federated-validation predictions of every round (float32)."""
    from fedmdh.errors import TrainingDiverged
    from fedmdh.experiment.runner import load_tables, prepare
    from fedmdh.runtime.simulator import simulate, validation_views

    cfg = _config(federation, variant, rounds)
    fed = prepare(cfg, load_tables(cfg), seed)
    insts = fed.institutions
    views = validation_views(fed)
    n_val = sum(d.y_val.size for d in insts)
    own = {d.name: np.zeros((rounds, d.y_val.size), np.float32) for d in insts}
    every = {d.name: np.zeros((rounds, n_val), np.float32) for d in insts}
    algo = cfg.build_algorithm(cfg.algorithms[0])

    def on_models(rnd: int, models) -> None:
        for d in insts:
            own[d.name][rnd - 1] = algo.predict(models[d.name], d.clip(d.X_val))
            every[d.name][rnd - 1] = algo.predict(models[d.name], views[d.name])

    path = run_path(out, federation, variant, seed)
    path.parent.mkdir(parents=True, exist_ok=True)
    try:
        res = simulate(fed, algo, rounds, seed=seed, on_models=on_models)
    except TrainingDiverged as exc:  # recorded, so that analyse names it instead of scoring it
        path.with_suffix(".diverged").write_text(json.dumps({"round": exc.round, "loss": exc.loss}))
        _write_federation(path.parent, fed)
        return path.with_suffix(".diverged")
    arrays = {"y_all": np.concatenate([d.y_val for d in insts]).astype(np.float32), "seconds": np.asarray(res.seconds)}
    for d in insts:
        arrays[f"own/{d.name}"] = own[d.name]
        arrays[f"every/{d.name}"] = every[d.name]
        arrays[f"y_own/{d.name}"] = d.y_val.astype(np.float32)
    np.savez_compressed(path, **arrays)
    _write_federation(path.parent, fed)
    return path


def run_path(out: Path, federation: str, variant: str, seed: int) -> Path:
    return out / federation_label(federation) / f"{variant.replace(':', '~').replace('=', '-').replace(';', '+')}_seed{seed}.npz"


def _write_federation(folder: Path, fed) -> None:
    insts = fed.institutions
    (folder / "federation.json").write_text(json.dumps(
        {"H": fed.heterogeneity.H, "alpha": fed.heterogeneity.alpha, "KL_avg": fed.heterogeneity.KL_avg,
         "names": [d.name for d in insts], "n_val": [int(d.y_val.size) for d in insts]}))


# ---------------------------------------------------------------------------------------------- rules


def load_run(path: Path) -> dict:
    with np.load(path) as z:
        return {k: z[k] for k in z.files}


def replay(run: dict, ref: dict | None, names: Sequence[str], rule: dict) -> dict[str, np.ndarray]:
    """What each institution keeps under ``rule``, as its predictions on every validation row."""
    from fedmdh.algorithms.guard import BLEND_WEIGHTS
    from fedmdh.runtime.protocol import choose_blend, choose_round

    out = {}
    mode, round_se, guard_se = rule["mode"], rule.get("round_se", 0.0), rule.get("guard_se", 0.0)
    for n in names:
        y = run[f"y_own/{n}"].astype(np.float64)
        r_fed = choose_round(run[f"own/{n}"].astype(np.float64), y, round_se)
        fed_every = run[f"every/{n}"][r_fed].astype(np.float64)
        if ref is None or mode == "off":
            out[n] = fed_every
            continue
        r_loc = choose_round(ref[f"own/{n}"].astype(np.float64), y, round_se)
        lam = choose_blend(run[f"own/{n}"][r_fed].astype(np.float64), ref[f"own/{n}"][r_loc].astype(np.float64),
                           y, BLEND_WEIGHTS[mode], guard_se)
        out[n] = lam * fed_every + (1.0 - lam) * ref[f"every/{n}"][r_loc].astype(np.float64)
    return out


def scores(out: Path, rules: dict[str, dict]) -> list[dict]:
    """One record per (federation, variant, rule, seed): each institution's federated-validation MSE
    of what the rule keeps, and of what the local model keeps under the same round rule."""
    recs = []
    for fdir in sorted(p for p in out.iterdir() if p.is_dir()):
        meta = json.loads((fdir / "federation.json").read_text())
        names = meta["names"]
        for p in sorted(fdir.glob("*_seed*.npz")):
            key, seed = p.stem.rsplit("_seed", 1)
            q = fdir / f"local_seed{seed}.npz"
            if key == "local" or not q.exists():
                continue
            run, ref = load_run(p), load_run(q)
            y = run["y_all"].astype(np.float64)
            for rname, rule in rules.items():
                kept = replay(run, ref, names, rule)
                local_kept = replay(ref, None, names, {**rule, "mode": "off"})
                recs.append({"federation": fdir.name, "variant": key, "rule": rname, "seed": int(seed),
                             "var": float(np.var(y)), "names": names,
                             "mse": [float(np.mean((kept[n] - y) ** 2)) for n in names],
                             "local": [float(np.mean((local_kept[n] - y) ** 2)) for n in names]})
    return recs


def analyse(out: Path, rules: dict[str, dict], variants: Sequence[str] | None = None) -> str:
    """Markdown: per federation, variant and rule, the federated-validation MSE of what each
    institution keeps (mean over seeds), and a summary over federations."""
    recs = [r for r in scores(out, rules) if not variants or r["variant"] in variants]
    lines = []
    feds = list(dict.fromkeys(r["federation"] for r in recs))
    groups: dict[tuple[str, str, str], list[dict]] = {}
    for r in recs:
        groups.setdefault((r["federation"], r["variant"], r["rule"]), []).append(r)
    for f in feds:
        meta = json.loads((out / f / "federation.json").read_text())
        names = meta["names"]
        lines += [f"### {f} (H {meta['H']:.2f}, alpha {meta['alpha']:.1f}, KL_avg {meta['KL_avg']:.2f}; "
                  f"validation rows {meta['n_val']})", "",
                  "| variant | rule | mean | " + " | ".join(names) + " | worst minus local |",
                  "|---|---|---|" + "---|" * (len(names) + 1)]
        for (ff, v, rn), rs in groups.items():
            if ff != f:
                continue
            mse, loc = np.mean([r["mse"] for r in rs], axis=0), np.mean([r["local"] for r in rs], axis=0)
            lines.append(f"| {v} | {rn} | {mse.mean():.4f} | " + " | ".join(f"{x:.4f}" for x in mse)
                         + f" | {float(np.max(mse - loc)):+.4f} |")
        lines.append("")
    lines += ["### Summary over federations", "",
              "MSE relative to local: mean over federations of (mean MSE / local's mean MSE); institutions "
              "worse than local: kept MSE above local's by more than 2 % of the label variance (R2 0.02).", "",
              "| variant | rule | federations | MSE relative to local | institutions worse than local |",
              "|---|---|---|---|---|"]
    for v in dict.fromkeys(r["variant"] for r in recs):
        for rn in rules:
            rs = [r for r in recs if r["variant"] == v and r["rule"] == rn]
            if not rs:
                continue
            by_fed: dict[str, list[dict]] = {}
            for r in rs:
                by_fed.setdefault(r["federation"], []).append(r)
            rel, worse, total = [], 0, 0
            for f, frs in by_fed.items():
                mse, loc = np.mean([r["mse"] for r in frs], axis=0), np.mean([r["local"] for r in frs], axis=0)
                rel.append(mse.mean() / loc.mean())
                worse += int(np.sum(mse - loc > 0.02 * frs[0]["var"]))
                total += mse.size
            lines.append(f"| {v} | {rn} | {len(by_fed)} | {np.mean(rel):.3f} | {worse} of {total} |")
    return "\n".join(lines)


def compare(out: Path, variants: Sequence[str], rule: str = "latest round within 1 SE") -> str:
    """Markdown: one row per (federation, seed), one column per variant: the federated-validation
    MSE / label variance of what the institutions keep under ``rule`` (mean over institutions), or
    the round a run diverged at; then the mean over the rows every variant finished, and how many
    runs diverged. For settings that change training itself (e.g. a gradient clip)."""
    recs = {(r["federation"], r["seed"], r["variant"]): r for r in scores(out, {rule: RULES[rule]})}
    keys = sorted({(f, s) for f, s, _ in recs} | {
        (p.parent.name, int(p.stem.rsplit("_seed", 1)[1])) for p in out.glob("*/*.diverged")})
    label = {v: v.replace(':', '~').replace('=', '-').replace(';', '+') for v in variants}
    lines = ["| federation | seed | " + " | ".join(variants) + " |", "|---|---|" + "---|" * len(variants)]
    sums: dict[str, list[float]] = {v: [] for v in variants}
    diverged = {v: 0 for v in variants}
    for f, s in keys:
        cells, row = [], {}
        for v in variants:
            r = recs.get((f, s, label[v]))
            div = out / f / f"{label[v]}_seed{s}.diverged"
            if r is not None:
                row[v] = float(np.mean(r["mse"]) / r["var"])
                cells.append(f"{row[v]:.4f}")
            elif div.exists():
                diverged[v] += 1
                cells.append(f"diverged (round {json.loads(div.read_text())['round']})")
            else:
                cells.append("-")
        if len(row) == len(variants):
            for v in variants:
                sums[v].append(row[v])
        lines.append(f"| {f} | {s} | " + " | ".join(cells) + " |")
    n = len(sums[variants[0]])
    lines.append(f"| mean over the {n} rows all finished | | " + " | ".join(
        f"{np.mean(sums[v]):.4f}" if sums[v] else "-" for v in variants) + " |")
    every = {v: [float(np.mean(r["mse"]) / r["var"]) for (f, s, lab), r in recs.items() if lab == label[v]]
             for v in variants}
    lines.append("| mean over the rows each finished | | " + " | ".join(
        f"{np.mean(every[v]):.4f} ({len(every[v])})" if every[v] else "-" for v in variants) + " |")
    lines.append("| runs diverged | | " + " | ".join(str(diverged[v]) for v in variants) + " |")
    return "\n".join(lines)


RULES = {
    "best round": {"mode": "off", "round_se": 0.0},
    "latest round within 0.5 SE": {"mode": "off", "round_se": 0.5},
    "latest round within 1 SE": {"mode": "off", "round_se": 1.0},
    "latest round within 2 SE": {"mode": "off", "round_se": 2.0},
    "last round": {"mode": "off", "round_se": 1e9},
    "guard choose": {"mode": "choose", "round_se": 0.0, "guard_se": 0.0},
    "guard blend": {"mode": "blend", "round_se": 0.0, "guard_se": 0.0},
    "guard blend, 1 SE toward federated": {"mode": "blend", "round_se": 0.0, "guard_se": 1.0},
    "guard blend, 2 SE toward federated": {"mode": "blend", "round_se": 0.0, "guard_se": 2.0},
    "guard blend, 1 SE rounds and weight": {"mode": "blend", "round_se": 1.0, "guard_se": 1.0},
}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    sub = ap.add_subparsers(dest="cmd", required=True)
    r = sub.add_parser("record")
    r.add_argument("--federations", nargs="+", required=True)
    r.add_argument("--variants", required=True, help="comma-separated; settings after ':' joined by ';'")
    r.add_argument("--seeds", default="0")
    r.add_argument("--rounds", type=int, default=400)
    r.add_argument("--out", type=Path, default=Path("runs/study"))
    a = sub.add_parser("analyse")
    a.add_argument("--out", type=Path, default=Path("runs/study"))
    a.add_argument("--variants", default=None)
    c = sub.add_parser("compare", help="per federation and seed, one column per variant (1 SE rule)")
    c.add_argument("--out", type=Path, default=Path("runs/study"))
    c.add_argument("--variants", required=True)
    args = ap.parse_args()
    if args.cmd == "record":
        import time

        for f in args.federations:
            for v in args.variants.split(","):
                for s in (int(x) for x in args.seeds.split(",")):
                    path = run_path(args.out, f, v, s)
                    if path.exists() or path.with_suffix(".diverged").exists():
                        continue
                    t = time.perf_counter()
                    done = record(f, v, s, args.rounds, args.out)
                    what = "DIVERGED" if done.suffix == ".diverged" else "done"
                    print(f"{federation_label(f)} {v} seed {s}: {what}, {time.perf_counter() - t:.1f} s", flush=True)
    elif args.cmd == "compare":
        print(compare(args.out, args.variants.split(",")))
    else:
        variants = args.variants.split(",") if args.variants else None
        print(analyse(args.out, RULES, variants))


if __name__ == "__main__":
    main()
