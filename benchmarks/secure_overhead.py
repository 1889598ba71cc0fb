"""Secure (threshold CKKS) against plain aggregation: seconds and bytes per round, measured in one run.

Run:  .venv/bin/python benchmarks/secure_overhead.py [--data-dir DIR] [--rounds 10] [--sizes 10000,50000]

1. The perovskite split, FedAvg, in the in-process simulator: the setup phase and ``--rounds``
   rounds plain, then the same secure (setup moments, label histogram and every round's weighted
   parameter sums through :class:`fedmdh.secure.threshold.ThresholdGroup`), with seconds and bytes
   the institutions send per round (plain: the float32 payloads; secure: ciphertexts and partial
   decryptions), and the test R2 of both.
2. The primitives on vectors of ``--sizes`` float64 values, 3 parties: seconds to encrypt one
   party's vector, to add 3, for one partial decryption and the fusion; bytes; the largest error
   of the decrypted sum against the float64 sum.

Both parts run in this process, one after the other, on a shared machine: compare the figures of
one run only. OpenFHE runs where :mod:`fedmdh.secure.backend` finds it (``$FEDMDH_OPENFHE_PYTHON``).
"""

from __future__ import annotations

import argparse
import shlex
import sys
import time
from pathlib import Path

import numpy as np

from fedmdh.algorithms import make_algorithm
from fedmdh.data.federation import prepare_federation
from fedmdh.data.io import load_institution
from fedmdh.runtime.simulator import simulate
from fedmdh.secure.backend import require
from fedmdh.secure.threshold import ThresholdGroup

DEFAULT_DATA = Path(__file__).resolve().parents[2] / "shared" / "datasets" / "fedmdh_perovskite_split"


def _tables(folder: Path):
    tables = [load_institution(str(folder / f"train_part{i}.csv"), "e_form") for i in range(3)]
    return tables, load_institution(str(folder / "test_data1.csv"), "e_form", name="test")


def federation_part(folder: Path, rounds: int) -> None:
    tables, test = _tables(folder)
    t0 = time.perf_counter()
    plain_fed = prepare_federation(tables, test, "e_form", seed=0)
    t_setup_plain = time.perf_counter() - t0
    plain = simulate(plain_fed, make_algorithm("fedavg"), rounds=rounds, seed=0)

    t0 = time.perf_counter()
    group = ThresholdGroup([t.name for t in tables])
    t_keys = time.perf_counter() - t0
    with group:
        t0 = time.perf_counter()
        sums: list[int] = []
        counting = _Counting(group, sums)
        fed = prepare_federation(tables, test, "e_form", seed=0, secure_sum=counting)
        t_setup_secure = time.perf_counter() - t0
        setup_bytes = sum(sums)
        secure = simulate(fed, make_algorithm("fedavg"), rounds=rounds, seed=0, secure=group)
        ctx_bytes, pk_bytes = len(group.scheme.context), len(group.public_key)

    n_params = sum(int(np.prod(np.shape(v))) for v in plain.models[tables[0].name].values())
    sec_plain = np.median([r.seconds for r in plain.history])
    sec_secure = np.median([r.seconds for r in secure.history])
    print(f"FedAvg on {folder.name}, 3 institutions, {n_params:,} parameters, {rounds} rounds (medians per round)")
    print(f"{'':28}{'plain':>14}{'secure':>14}{'ratio':>9}")
    print(f"{'seconds per round':28}{sec_plain:>14.3f}{sec_secure:>14.3f}{sec_secure / sec_plain:>9.1f}")
    b_plain, b_secure = plain.history[-1].bytes_up, secure.history[-1].bytes_up
    print(f"{'bytes up per round':28}{b_plain:>14,}{b_secure:>14,}{b_secure / b_plain:>9.1f}")
    print(f"{'setup seconds':28}{t_setup_plain:>14.3f}{t_setup_secure:>14.3f}")
    print(f"{'setup bytes up (secure)':28}{'-':>14}{setup_bytes:>14,}")
    print(f"{'test R2 (mean over inst.)':28}{plain.final['r2']:>14.4f}{secure.final['r2']:>14.4f}"
          f"{'':>3}diff {secure.final['r2'] - plain.final['r2']:+.5f}")
    print(f"once per task: joint key chain {t_keys:.2f} s (context {ctx_bytes:,} B, joint public key {pk_bytes:,} B)")


class _Counting:
    """A SecureSum that records the bytes each call sent."""

    def __init__(self, group: ThresholdGroup, out: list[int]) -> None:
        self.group, self.out = group, out

    def __call__(self, vectors):
        total = self.group.secure_sum(vectors)
        self.out.append(self.group.bytes_up())
        return total


def primitives_part(sizes: list[int]) -> None:
    print()
    print("threshold CKKS primitives, 3 parties (OpenFHE, ring dimension and slots below)")
    print(f"{'values':>8}{'cts':>5}{'ct bytes/party':>16}{'encrypt s':>11}{'add3 s':>9}{'partial s':>11}"
          f"{'fuse s':>9}{'max |err|':>11}{'max |sum|':>11}")
    with ThresholdGroup(["a", "b", "c"]) as g:
        rng = np.random.default_rng(0)
        for size in sizes:
            xs = {n: rng.normal(0.0, 0.3, size) * rng.integers(50, 500) for n in "abc"}
            t0 = time.perf_counter()
            cts = {n: g.scheme.encrypt(g.public_key, xs[n]) for n in "abc"}
            t_enc = (time.perf_counter() - t0) / 3
            t0 = time.perf_counter()
            total = g.scheme.add([cts[n] for n in "abc"])
            t_add = time.perf_counter() - t0
            t0 = time.perf_counter()
            parts = [p.partial_decrypt(total, i == 0) for i, p in enumerate(g.parties)]
            t_part = (time.perf_counter() - t0) / 3
            t0 = time.perf_counter()
            out = g.scheme.fuse(parts)
            t_fuse = time.perf_counter() - t0
            ref = xs["a"] + xs["b"] + xs["c"]
            print(f"{size:>8,}{len(cts['a'].chunks):>5}{cts['a'].nbytes:>16,}{t_enc:>11.3f}{t_add:>9.3f}"
                  f"{t_part:>11.3f}{t_fuse:>9.3f}{np.max(np.abs(out - ref)):>11.2e}{np.max(np.abs(ref)):>11.1f}")
        print(f"ring dimension {g.scheme.ring_dimension}, {g.scheme.slots} slots per ciphertext; "
              f"a partial decryption is {parts[1].nbytes // len(parts[1].chunks):,} B per ciphertext")


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--data-dir", type=Path, default=DEFAULT_DATA)
    ap.add_argument("--rounds", type=int, default=10)
    ap.add_argument("--sizes", default="10000,50000")
    args = ap.parse_args()
    require()
    print("command:", shlex.join([Path(sys.executable).name, *sys.argv]))
    federation_part(args.data_dir, args.rounds)
    primitives_part([int(s) for s in args.sizes.split(",")])


if __name__ == "__main__":
    main()
