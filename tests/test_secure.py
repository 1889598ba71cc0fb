"""Threshold CKKS (OpenFHE) for confidential aggregation: round trips, thresholds, determinism, coverage.

The tests that need OpenFHE skip, printing why, when no interpreter here imports it (see
:mod:`fedmdh.secure.backend`; ``make test`` builds ``.venv-fhe``). The arithmetic of the covered
aggregates and the refusal of uncovered algorithms are tested without it.
"""

from __future__ import annotations

import hashlib

import numpy as np
import pytest

from fedmdh.algorithms import ALGORITHMS, make_algorithm
from fedmdh.algorithms.base import Update, weighted_average
from fedmdh.errors import InputError
from fedmdh.runtime.round import Aggregation, aggregate
from fedmdh.secure.aggregation import COVERED, NOT_COVERED, check_covered
from fedmdh.secure.backend import unavailable_reason

#: |decrypted - float64 sum| for |values| <= 1e3 with the default parameters; measured: about 2e-9
CKKS_ABS_BOUND = 1e-7


def secure_aggregate(algorithm, server, updates, secure_sum):
    """The round engine's aggregation step through ``secure_sum`` (round 1, seed 0)."""
    return aggregate(Aggregation(secure=True), algorithm, server, updates, 1, 0, secure_sum)


def _require_openfhe() -> None:
    reason = unavailable_reason()
    if reason is not None:
        print(f"skipped: {reason}")
        pytest.skip(reason)


@pytest.fixture(scope="module")
def group():
    _require_openfhe()
    from fedmdh.secure.threshold import ThresholdGroup

    with ThresholdGroup(["b", "a", "c"]) as g:
        yield g


def _vectors(size: int, seed: int = 0, scale: float = 1e3) -> dict[str, np.ndarray]:
    rng = np.random.default_rng(seed)
    return {n: rng.uniform(-scale, scale, size) for n in ("a", "b", "c")}


# -- without OpenFHE -----------------------------------------------------------------------------------
@pytest.mark.parametrize("name", sorted(NOT_COVERED))
def test_uncovered_algorithms_are_refused_in_one_line_naming_what_they_reveal(name):
    # Execute
    with pytest.raises(InputError) as exc:
        check_covered(name)
    # Assert
    msg = str(exc.value)
    assert "\n" not in msg
    assert msg.startswith("--secure covers fedavg, fedprox, fedmdh, fedmdh-no-gfam, fedmdh-no-cgan, fedmdh-no-rkd, "
                          "fedgan only;")
    assert f"{name} would still reveal {ALGORITHMS[name].secure_reveals}" in msg


@pytest.mark.parametrize("name", COVERED)
def test_covered_algorithms_pass_the_check(name):
    check_covered(name)
    check_covered(make_algorithm(name))


def test_an_algorithm_declares_its_own_secure_rule_and_the_secure_path_follows_it():
    """No table elsewhere: an algorithm outside the registry that declares a rule from sums is covered, and
    secure_aggregate computes its aggregate from exactly the sum of its contributions."""
    from fedmdh.algorithms.fedavg import FedAvg

    class Doubling(FedAvg):
        name = "doubling"

        def secure_contribution(self, update, server_state):
            return 2.0 * super().secure_contribution(update, server_state)

        def aggregate_from_sum(self, server_state, template, total, count):
            return super().aggregate_from_sum(server_state, template, total / 2.0, count)

    class Secretive(FedAvg):
        name = "secretive"
        secure_reveals = "its secret"

    # Prepare: three institutions with counts 1, 2, 3 and one weight each
    ups = [Update(f"i{k}", {"w": np.array([float(k)])}, k) for k in (1, 2, 3)]
    seen = []

    def clear_sum(vectors):
        seen.append({k: v.copy() for k, v in vectors.items()})
        return np.sum([vectors[k] for k in sorted(vectors)], axis=0)

    # Execute
    out = secure_aggregate(Doubling(), {}, ups, clear_sum)
    # Assert: contributions 2 n_i w_i, the mean (1*1 + 2*2 + 3*3) / 6
    assert {k: v.tolist() for k, v in seen[0].items()} == {"i1": [2.0], "i2": [8.0], "i3": [18.0]}
    assert out["w"].tolist() == [(1 * 1 + 2 * 2 + 3 * 3) / 6]
    with pytest.raises(InputError, match="secretive would still reveal its secret"):
        secure_aggregate(Secretive(), {}, ups, clear_sum)


def test_simulate_refuses_an_uncovered_algorithm_before_training(perovskite_fed):
    from fedmdh.runtime.simulator import simulate

    calls = []
    with pytest.raises(InputError, match="flic would still reveal"):
        simulate(perovskite_fed, make_algorithm("flic"), rounds=1, secure=lambda v: calls.append(v))
    assert calls == []


def test_secure_aggregate_is_the_weighted_mean_of_the_sum_it_is_given():
    # Prepare: two layers, three institutions with counts 1, 2, 3
    rng = np.random.default_rng(3)
    ups = [Update(n, {"w": rng.normal(size=(4, 3)).astype(np.float32), "b": rng.normal(size=3).astype(np.float32)}, k)
           for n, k in (("c", 3), ("a", 1), ("b", 2))]
    seen = {}

    def plain_sum(vectors):
        seen.update(vectors)
        return np.sum([vectors[n] for n in sorted(vectors)], axis=0)

    # Execute
    out = secure_aggregate(make_algorithm("fedavg"), {}, ups, plain_sum)
    # Assert: closed form (w_a * 1 + w_b * 2 + w_c * 3) / 6, and each institution sent n_i * w_i only
    by = {u.institution: u for u in ups}
    for key in ("w", "b"):
        expected = (by["a"].payload[key].astype(np.float64) * 1 + by["b"].payload[key] * 2
                    + by["c"].payload[key] * 3) / 6
        np.testing.assert_allclose(out[key], expected, rtol=1e-6, atol=1e-7)
        assert out[key].dtype == np.float32
    np.testing.assert_allclose(seen["c"], np.concatenate([by["c"].payload["b"].ravel(),
                                                          by["c"].payload["w"].ravel()]).astype(np.float64) * 3)
    ref = weighted_average([(u.payload, u.num_examples) for u in sorted(ups, key=lambda u: u.institution)])
    for key in ref:
        np.testing.assert_allclose(out[key], ref[key], rtol=1e-6, atol=1e-7)


def test_secure_fedgan_aggregate_is_its_plain_aggregate(perovskite_fed):
    from fedmdh.runtime.protocol import ClientSlot, aggregate_rng, client_rng, initial_state
    from fedmdh.algorithms.base import FederationSpec

    # Prepare: one real FedGAN round's updates on the perovskite split
    algo = make_algorithm("fedgan")
    spec = FederationSpec.from_federation(perovskite_fed)
    server = initial_state(algo, spec, 0)
    ups = []
    for d in sorted(perovskite_fed.institutions, key=lambda d: d.name):
        upd, _ = algo.client_update(server, ClientSlot(algo, spec, d, 0).get(), d, client_rng(0, 1, d.name), 1)
        ups.append(upd)
    sent = {}

    def plain_sum(vectors):
        sent.update(vectors)
        return np.sum([vectors[n] for n in sorted(vectors)], axis=0)

    # Execute
    ref = algo.aggregate(server, ups, aggregate_rng(0, 1), 1)
    out = secure_aggregate(algo, server, ups, plain_sum)
    # Assert: the same keys and values; each institution sent n_i-weighted sums only
    assert sorted(out) == sorted(ref)
    for key in ref:
        np.testing.assert_allclose(out[key], ref[key], rtol=1e-5, atol=1e-6, err_msg=key)
    u = ups[0]
    mu, var = u.payload["label_stats"]
    np.testing.assert_allclose(sent[u.institution][-2:], [u.num_examples * mu, u.num_examples * (var + mu * mu)])


def _plain_sum(vectors):
    return np.sum([vectors[n] for n in sorted(vectors)], axis=0)


def _fedmdh_rounds(fed, algo, rounds: int):
    """Per round: (server state before it, the institutions' real updates, algo.aggregate of them)."""
    from fedmdh.algorithms.base import FederationSpec
    from fedmdh.runtime.protocol import ClientSlot, aggregate_rng, client_rng, initial_state

    spec = FederationSpec.from_federation(fed)
    server = initial_state(algo, spec, 0)
    slots = {d.name: ClientSlot(algo, spec, d, 0) for d in fed.institutions}
    out = []
    for rnd in range(1, rounds + 1):
        ups = [algo.client_update(server, slots[d.name].get(), d, client_rng(0, rnd, d.name), rnd)[0]
               for d in sorted(fed.institutions, key=lambda d: d.name)]
        new = algo.aggregate(server, ups, aggregate_rng(0, rnd), rnd)
        out.append((server, ups, new))
        server = new
    return out


FEDMDH_VARIANTS = [("fedmdh", {}), ("fedmdh", {"holder_average": True}),
                   ("fedmdh", {"mapping": "per-institution"}), ("fedmdh-no-gfam", {}), ("fedmdh-no-cgan", {}),
                   ("fedmdh-no-rkd", {}), ("fedmdh", {"eval_average": 0.9})]


@pytest.mark.parametrize(("name", "kw"), FEDMDH_VARIANTS)
def test_secure_fedmdh_rule_is_fedmdh_aggregate_with_one_barycenter_step(perovskite_fed, name, kw):
    from fedmdh.algorithms.gaussian import psd_sqrt

    # Prepare: two real rounds of the variant, its plain aggregate taking one barycenter step a round
    algo = make_algorithm(name, barycenter_iters=1, **kw)
    rounds = _fedmdh_rounds(perovskite_fed, algo, 2)
    for rnd, (server, ups, ref) in enumerate(rounds, start=1):
        # Execute
        out = secure_aggregate(algo, server, ups, _plain_sum)
        # Assert: every key of the plain aggregate, to the last bits of a reordered float64 sum
        assert sorted(out) == sorted(ref)
        for key in ref:
            if key == "anchor_cov" and rnd == 1:
                continue  # round 1: the plain algorithm solves to convergence (below)
            np.testing.assert_allclose(out[key], ref[key], rtol=1e-9, atol=1e-12, err_msg=f"round {rnd} {key}")
    server, ups, ref = rounds[0]
    if "anchor_cov" in ref:
        # round 1 from the identity: one step is (sum_i w_i S_i^1/2)^2, exact for commuting covariances
        out = secure_aggregate(algo, server, ups, _plain_sum)
        w = np.array([u.num_examples for u in ups], dtype=np.float64) / sum(u.num_examples for u in ups)
        root = sum(wi * psd_sqrt(u.payload["anchor_cov"]) for wi, u in zip(w, ups))
        np.testing.assert_allclose(out["anchor_cov"], root @ root, rtol=1e-9, atol=1e-12)


def test_secure_fedmdh_sends_n_weighted_sums_and_one_barycenter_term(perovskite_fed):
    from fedmdh.algorithms.gaussian import psd_sqrt

    # Prepare: round 2 (an anchor exists) of FedMDH's defaults
    algo = make_algorithm("fedmdh")
    server, ups, _ = _fedmdh_rounds(perovskite_fed, algo, 2)[1]
    sent = {}

    def recording_sum(vectors):
        sent.update(vectors)
        return _plain_sum(vectors)

    # Execute
    secure_aggregate(algo, server, ups, recording_sum)
    # Assert: the tail is n mu, n (var + mu^2); before it n (r S_i r)^1/2, r = S^1/2 of the public anchor
    u = ups[0]
    n, k = float(u.num_examples), u.payload["anchor_mean"].size
    mu, var = u.payload["pred_stats"]
    v = sent[u.institution]
    np.testing.assert_allclose(v[-2:], [n * mu, n * (var + mu * mu)], rtol=1e-12)
    r = psd_sqrt(server["anchor_cov"])
    np.testing.assert_allclose(v[-2 - k * k:-2].reshape(k, k), n * psd_sqrt(r @ u.payload["anchor_cov"] @ r),
                               rtol=1e-9, atol=1e-9)
    np.testing.assert_allclose(v[-2 - k * k - k:-2 - k * k], n * u.payload["anchor_mean"], rtol=1e-12)
    assert v.size == sum(np.size(x) for key, x in u.payload.items() if key != "pred_stats") + 2


def test_secure_fedmdh_under_ckks_is_its_rule_within_the_ckks_bound(perovskite_fed):
    _require_openfhe()
    from fedmdh.secure.threshold import ThresholdGroup

    # Prepare: round 2 of FedMDH's defaults (shared networks, anchor step, prediction moments)
    algo = make_algorithm("fedmdh")
    server, ups, _ = _fedmdh_rounds(perovskite_fed, algo, 2)[1]
    ref = secure_aggregate(algo, server, ups, _plain_sum)
    # Execute
    with ThresholdGroup([u.institution for u in ups]) as g:
        out = secure_aggregate(algo, server, ups, g)
    # Assert: the decrypted sums are within CKKS's absolute bound, so the aggregate is too
    for key in ref:
        np.testing.assert_allclose(out[key], ref[key], rtol=1e-5, atol=1e-5, err_msg=key)


def test_secure_setup_through_a_plain_sum_gives_the_plain_scaler(perovskite_tables):
    from fedmdh.data.federation import prepare_federation

    tables, test = perovskite_tables
    plain = prepare_federation(tables, test, "e_form", seed=0)
    calls = []

    def plain_sum(vectors):
        calls.append(sorted(vectors))
        return np.sum([vectors[n] for n in sorted(vectors)], axis=0)

    secure = prepare_federation(tables, test, "e_form", seed=0, secure_sum=plain_sum)
    # two passes of setup statistics, then the label histogram: three sums over all three institutions
    assert len(calls) == 3 and all(c == sorted(t.name for t in tables) for c in calls)
    np.testing.assert_allclose(secure.scaler.mean, plain.scaler.mean, rtol=1e-12)
    _assert_same_scale(secure.scaler, plain.scaler)
    assert secure.heterogeneity.kl == pytest.approx(plain.heterogeneity.kl, rel=1e-12)
    assert plain.heterogeneity.KL_avg > 0


def _assert_same_scale(secure, plain) -> None:
    """Scales equal within 1e-9 where float64 can tell (mean^2 / var < 1e6); within 1% elsewhere.

    Both ``ss / n - mean^2`` (plain) and ``ss - 2 m s + n m^2`` (an institution's centred pass) lose
    ``mean^2 / var`` times float64's 1e-16: the perovskite split has a column with std 1.8e-6 beside
    a mean of a few units, where the two differ by 0.2% through rounding alone."""
    ratio = (plain.mean / plain.scale) ** 2
    well = ratio < 1e6
    assert well.sum() >= len(well) - 2
    np.testing.assert_allclose(secure.scale[well], plain.scale[well], rtol=1e-9)
    np.testing.assert_allclose(secure.scale[~well], plain.scale[~well], rtol=1e-2)


# -- with OpenFHE --------------------------------------------------------------------------------------
def test_threshold_round_trip_is_the_float64_sum_within_the_bound(group):
    # Prepare: 20,000 values per institution (3 ciphertexts of 8,192 slots), |x| <= 1e3
    xs = _vectors(20_000)
    # Execute
    out = group.secure_sum(xs)
    # Assert
    expected = xs["a"] + xs["b"] + xs["c"]
    assert out.shape == expected.shape
    assert np.max(np.abs(out - expected)) < CKKS_ABS_BOUND


def test_fewer_than_all_partial_decryptions_reveal_nothing_of_the_sum(group):
    from fedmdh.secure.threshold import PartialDecryption

    xs = _vectors(8_192, seed=1)
    expected = xs["a"] + xs["b"] + xs["c"]
    group.secure_sum(xs)
    partials = {p.party: p for p in group.last.partials}
    full = group.scheme.fuse(list(partials.values()))
    assert np.max(np.abs(full - expected)) < CKKS_ABS_BOUND
    # every proper subset holding the lead: one party alone, or n-1 parties together; OpenFHE's
    # decoder refuses the result (its error estimate is huge) or, if it decodes, it is noise
    for subset in (["a"], ["a", "b"], ["a", "c"]):
        _assert_not_the_sum(group.scheme, [partials[n] for n in subset], expected)
    # a non-lead party's partial decryption on its own is not the sum either
    for name in ("b", "c"):
        alone = PartialDecryption(name, True, partials[name].chunks, partials[name].length)
        _assert_not_the_sum(group.scheme, [alone], expected)


def _assert_not_the_sum(scheme, partials, expected) -> None:
    try:
        out = scheme.fuse(partials)
    except RuntimeError as exc:
        assert "decryption failed" in str(exc), exc
        return
    r = np.corrcoef(out, expected)[0, 1]
    assert abs(r) < 0.05, r  # 8,192 pairs: chance |r| has sd 0.011
    assert np.median(np.abs(out - expected)) > 1e3 * np.max(np.abs(expected))


def test_a_ciphertext_neither_holds_nor_correlates_with_the_clear_update(group):
    x = _vectors(8_192, seed=2)["a"]
    ct = group.scheme.encrypt(group.public_key, x)
    ct2 = group.scheme.encrypt(group.public_key, x)
    blob = b"".join(ct.chunks)
    # the clear values, as float64 or float32 bytes, appear nowhere in the ciphertext
    for dtype in (np.float64, np.float32):
        raw = x.astype(dtype).tobytes()
        for start in range(0, 64 * np.dtype(dtype).itemsize, np.dtype(dtype).itemsize):
            assert raw[start:start + 8] not in blob
    # ciphertext words do not correlate with the values (nor does a re-encryption equal it)
    words = np.frombuffer(blob[: (len(blob) // 8) * 8], dtype=np.uint64).astype(np.float64)
    for offset in range(0, words.size - x.size, words.size // 8):
        assert abs(np.corrcoef(words[offset:offset + x.size], x)[0, 1]) < 0.05
    assert ct.digest() != ct2.digest()


def test_the_homomorphic_sum_is_the_same_bytes_twice_and_in_another_engine(group):
    from fedmdh.secure.threshold import ThresholdCKKS

    xs = _vectors(10_000, seed=4)
    cts = [group.scheme.encrypt(group.public_key, xs[n]) for n in sorted(xs)]
    first = group.scheme.add(cts)
    again = group.scheme.add(cts)
    other = ThresholdCKKS(group.scheme.context)  # a peer with only the public context
    try:
        theirs = other.add(cts)
    finally:
        other.close()
    assert first.digest() == again.digest() == theirs.digest()
    assert hashlib.sha256(b"".join(first.chunks)).digest() == hashlib.sha256(b"".join(theirs.chunks)).digest()


def test_secure_fedavg_matches_plain_fedavg_on_perovskite(group, perovskite_tables):
    from fedmdh.data.federation import prepare_federation
    from fedmdh.runtime.simulator import simulate
    from fedmdh.secure.threshold import ThresholdGroup

    tables, test = perovskite_tables
    plain_fed = prepare_federation(tables, test, "e_form", seed=0)
    plain = simulate(plain_fed, make_algorithm("fedavg"), rounds=3, seed=0)
    with ThresholdGroup([t.name for t in tables]) as g:
        fed = prepare_federation(tables, test, "e_form", seed=0, secure_sum=g)
        sec = simulate(fed, make_algorithm("fedavg"), rounds=3, seed=0, secure=g)
        sent = g.bytes_up()
    np.testing.assert_allclose(fed.scaler.mean, plain_fed.scaler.mean, rtol=1e-9, atol=1e-9)
    _assert_same_scale(fed.scaler, plain_fed.scaler)
    assert abs(sec.final["r2"] - plain.final["r2"]) < 0.005
    assert sec.history[-1].bytes_up == sent > 10 * plain.history[-1].bytes_up


def test_fedmdh_run_secure_refuses_an_uncovered_algorithm_and_a_ledger_in_one_line(perovskite, tmp_path):
    import subprocess
    import sys

    base = [sys.executable, "-m", "fedmdh.cli", "run", "--institutions", *perovskite["institutions"],
            "--test", perovskite["test"], "--target", "e_form", "--secure"]
    for extra, expected in ((["--algorithm", "fedkd", "--ledger", "off"], "fedkd would still reveal"),
                            (["--algorithm", "fedavg"], "give --ledger off with --secure")):
        out = tmp_path / extra[1]
        r = subprocess.run([*base, *extra, "--out", str(out)], capture_output=True, text=True, timeout=300)
        assert r.returncode == 2, r.stderr
        lines = [ln for ln in r.stderr.splitlines() if ln.strip()]
        assert len(lines) == 1 and expected in lines[0], r.stderr
        assert not out.exists()


def test_make_test_builds_the_openfhe_interpreter_and_passes_it_to_pytest():
    import subprocess
    from pathlib import Path

    repo = Path(__file__).resolve().parents[1]
    dry = subprocess.run(["make", "-n", "-B", "test", "FEDMDH_ANVIL=/bin/true", "PYTHON_FHE=/usr/bin/python3.10"],
                         cwd=repo, capture_output=True, text=True)
    assert dry.returncode == 0, dry.stderr
    assert "/usr/bin/python3.10 -m venv .venv-fhe" in dry.stdout
    assert '"openfhe==1.6.1.0.22.4"' in dry.stdout
    assert "FEDMDH_OPENFHE_PYTHON=" in dry.stdout


def test_any_peer_verifies_a_secure_sum_from_its_transcript(group):
    from fedmdh.secure.threshold import EncryptedVector, ThresholdCKKS, verify_sum

    # Prepare: a round's transcript (what a ledger would keep as blobs)
    xs = _vectors(9_000, seed=5)
    released = group.secure_sum(xs)
    t = group.last
    peer = ThresholdCKKS(group.scheme.context)  # another process, only the public context
    try:
        # Execute / Assert: the honest transcript verifies in another engine; its own fusion is within
        # the bound but not the same bits (OpenFHE's CKKS decoding adds fresh noise)
        verify_sum(peer, t.ciphertexts, t.total, t.partials, released)
        again = peer.fuse(t.partials)
        assert 0 < np.max(np.abs(again - released)) < 1e-7
        # a released value off by 1e-6, a swapped ciphertext, a missing partial: each named
        bumped = released.copy()
        bumped[17] += 1e-6
        with pytest.raises(ValueError, match="not the released sum"):
            verify_sum(peer, t.ciphertexts, t.total, t.partials, bumped)
        other = group.scheme.encrypt(group.public_key, xs["b"])
        swapped = {**t.ciphertexts, "b": EncryptedVector(other.chunks, other.length)}
        with pytest.raises(ValueError, match="not the claimed sum"):
            verify_sum(peer, swapped, t.total, t.partials, released)
        with pytest.raises(ValueError, match="partial decryptions from"):
            verify_sum(peer, t.ciphertexts, t.total, t.partials[:2], released)
    finally:
        peer.close()


def test_an_interpreter_without_openfhe_is_named_in_one_line(monkeypatch, tmp_path):
    import sys

    from fedmdh.secure import backend

    if backend.runs_in_process():
        pytest.skip("openfhe imports in this interpreter: no external engine is looked for")
    monkeypatch.setenv(backend.ENV_PYTHON, sys.executable)  # the project's Python: its openfhe does not import
    reason = backend.unavailable_reason()
    assert reason is not None and "\n" not in reason
    assert reason.startswith(f"the OpenFHE interpreter {sys.executable} is not usable")
    monkeypatch.setenv(backend.ENV_PYTHON, str(tmp_path / "no-python"))
    assert "no-python" in backend.unavailable_reason()
    with pytest.raises(backend.SecureUnavailable):
        backend.EngineClient()
