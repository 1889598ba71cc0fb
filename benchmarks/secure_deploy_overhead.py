"""A deployed task, secure (``--secure``) against plain: seconds and bytes per round, measured in one run.

Run:  .venv/bin/python benchmarks/secure_deploy_overhead.py [--data-dir DIR] [--rounds 10]
      [--algorithms fedavg] [--flower]

The perovskite split's three institutions as three node services (fedmdh.runtime.node) on a real
chain (anvil), driven by the coordinator; each algorithm runs plain, then secure, with the same
seed. Without ``--flower`` the messages go through the wire's encoding in this process
(``DirectTransport``: the protocol's own cost: nodes' work, chain transactions, OpenFHE); with
``--flower`` through ``fedmdh deploy local``'s processes (SuperLink with TLS, one SuperNode and node
process per institution), which adds Flower's cost per message exchange (a secure round is two
exchanges: the round, then the partial decryptions).

Printed per algorithm: the median seconds per round (rounds 2..R), bytes the institutions send
the coordinator per round and bytes it sends them (median), the setup's seconds and bytes (a
secure setup: key chain, key escrow, two encrypted passes), and the mean test R2 of both with
their difference. The machine is shared: compare figures of one run only.
"""

from __future__ import annotations

import argparse
import json
import os
import shlex
import sys
import tempfile
import time
from pathlib import Path

import numpy as np

DEFAULT_DATA = Path(__file__).resolve().parents[2] / "shared" / "datasets" / "fedmdh_perovskite_split"
NAMES = ["train_part0", "train_part1", "train_part2"]


class Counting:
    """A transport that counts the bytes of every message (the wire's encoding) each way."""

    def __init__(self, inner) -> None:
        self.inner, self.up, self.down = inner, 0, 0

    def wait_nodes(self, count, timeout):
        return self.inner.wait_nodes(count, timeout)

    def exchange(self, requests, timeout, optional=frozenset()):
        from fedmdh.runtime.flower.wire import pack

        self.down += sum(len(pack(*m)) for m in requests.values())
        replies = self.inner.exchange(requests, timeout, optional=optional)
        self.up += sum(len(pack(*m)) for m in replies.values())
        return replies


def run_direct(folder: Path, algorithm: str, rounds: int, secure: bool, work: Path, url: str) -> dict:
    from fedmdh.config import ExperimentConfig
    from fedmdh.runtime.coordinator import Coordinator, DeployTask, DirectTransport, experiment_settings
    from fedmdh.runtime.node import NodeService

    files = [str(folder / f"{n}.csv") for n in NAMES]
    test = str(folder / "test_data1.csv")
    cfg = ExperimentConfig(files, test, "e_form", algorithms=(algorithm,), seeds=1, rounds=rounds)
    kind = f"{algorithm}-{'secure' if secure else 'plain'}"
    nodes = {n: NodeService(n, f, "e_form", work / kind / n, test=test) for n, f in zip(NAMES, files)}
    transport = Counting(DirectTransport(nodes))
    marks: list[tuple[float, int, int]] = []
    task = DeployTask(kind, experiment_settings(cfg), 3, url, str(work / kind / "out"), keystore=str(work / "ks"),
                      wait_s=300, secure=secure)
    t0 = time.perf_counter()
    coord = Coordinator(task, transport, before_round=lambda r: marks.append((time.perf_counter(), transport.up,
                                                                                 transport.down)))
    final = coord.run()
    marks.append((time.perf_counter(), transport.up, transport.down))
    for svc in nodes.values():
        t = svc.tasks.get(kind)
        if t is not None and t.secure is not None:
            t.secure.close()
    # marks[i]: before round i + 1's messages; round r's cost: from before round r + 1 to before r + 2
    per = [(b[0] - a[0], b[1] - a[1], b[2] - a[2]) for a, b in zip(marks[1:-1], marks[2:])]
    return {"seconds": [p[0] for p in per], "up": [p[1] for p in per], "down": [p[2] for p in per],
            "setup_s": marks[0][0] - t0, "setup_up": marks[0][1], "setup_down": marks[0][2], "r2": final["r2"]}


def run_flower(folder: Path, algorithm: str, rounds: int, secure: bool, work: Path) -> dict:
    import subprocess

    kind = f"{algorithm}-{'secure' if secure else 'plain'}"
    out = work / kind
    argv = [sys.executable, "-m", "fedmdh.cli", "deploy", "local", "--out", str(out), "--institutions",
            *[str(folder / f"{n}.csv") for n in NAMES], "--test", str(folder / "test_data1.csv"), "--target", "e_form",
            "--algorithm", algorithm, "--rounds", str(rounds), "--record-messages", str(work / f"{kind}-messages")]
    if secure:
        argv.append("--secure")
    t0 = time.perf_counter()
    subprocess.run(argv, check=True, stdout=subprocess.DEVNULL)
    total = time.perf_counter() - t0
    lines = [json.loads(x) for x in (out / "metrics.jsonl").read_text().splitlines()]
    sizes = [(p.name.split("-")[1], p.stat().st_size) for p in sorted((work / f"{kind}-messages").glob("*.bin"))]
    final = json.loads((out / "final_metrics.json").read_text())
    return {"seconds": [x["seconds"] for x in lines[1:]], "total_s": total,
            "up_total": sum(s for w, s in sizes if w == "from"), "down_total": sum(s for w, s in sizes if w == "to"),
            "r2": final["r2"]}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--data-dir", type=Path, default=DEFAULT_DATA)
    ap.add_argument("--rounds", type=int, default=10)
    ap.add_argument("--algorithms", default="fedavg")
    ap.add_argument("--flower", action="store_true", help="over fedmdh deploy local's processes (Flower)")
    args = ap.parse_args()
    from fedmdh.secure.backend import require

    require()
    os.environ.setdefault("FEDMDH_KEY_PASSPHRASE", "benchmark")
    os.environ.setdefault("FEDMDH_KEY_KDF", "pbkdf2")
    os.environ.setdefault("FEDMDH_KEY_KDF_ITERATIONS", "2000")
    print("$ " + " ".join(shlex.quote(a) for a in [sys.executable, *sys.argv]))
    with tempfile.TemporaryDirectory(prefix="fedmdh-secure-deploy-") as tmp:
        work = Path(tmp)
        os.environ.setdefault("FEDMDH_HOME", str(work / "home"))
        if args.flower:
            results = {(a, s): run_flower(args.data_dir, a, args.rounds, s, work)
                       for a in args.algorithms.split(",") for s in (False, True)}
        else:
            from fedmdh.deploy.processes import Services, start_anvil

            with Services(work / "logs") as services:
                _, url = start_anvil(services)
                results = {(a, s): run_direct(args.data_dir, a, args.rounds, s, work, url)
                           for a in args.algorithms.split(",") for s in (False, True)}
    how = "Flower processes (fedmdh deploy local)" if args.flower else "node services in process, wire encoding"
    print(f"deployed task on the perovskite split, 3 institutions, {args.rounds} rounds, {how}, anvil; medians "
          "over rounds 2..R")
    for a in args.algorithms.split(","):
        p, s = results[(a, False)], results[(a, True)]
        med = lambda x: float(np.median(x)) if x else float("nan")  # noqa: E731
        print(f"\n{a}                               plain        secure    ratio")
        print(f"  seconds per round           {med(p['seconds']):10.2f}  {med(s['seconds']):12.2f}  "
              f"{med(s['seconds']) / med(p['seconds']):7.1f}")
        if not args.flower:
            print(f"  bytes up per round      {med(p['up']):14,.0f}  {med(s['up']):12,.0f}  {med(s['up']) / med(p['up']):7.1f}")
            print(f"  bytes down per round    {med(p['down']):14,.0f}  {med(s['down']):12,.0f}  "
                  f"{med(s['down']) / med(p['down']):7.1f}")
            print(f"  setup seconds               {p['setup_s']:10.2f}  {s['setup_s']:12.2f}")
            print(f"  setup bytes up          {p['setup_up']:14,.0f}  {s['setup_up']:12,.0f}")
        else:
            print(f"  whole task seconds          {p['total_s']:10.1f}  {s['total_s']:12.1f}")
            print(f"  bytes up, whole task    {p['up_total']:14,.0f}  {s['up_total']:12,.0f}  "
                  f"{s['up_total'] / p['up_total']:7.1f}")
        print(f"  test R2 (mean over inst.)   {p['r2']:10.4f}  {s['r2']:12.4f}   diff {s['r2'] - p['r2']:+.5f}")


if __name__ == "__main__":
    main()
