"""The built-in default federation: local copy, cache, download (against 127.0.0.1 only), fallback."""

from __future__ import annotations

import functools
import hashlib
import http.server
import json
import shutil
import socket
import threading
from pathlib import Path

import numpy as np
import pandas as pd
import pytest

from fedmdh.data import datasets as ds
from fedmdh.errors import InputError

SHARED = Path(__file__).resolve().parents[2] / "shared" / "datasets" / "fedmdh_perovskite_split"
FILES = ("train_part0.csv", "train_part1.csv", "train_part2.csv", "test_data1.csv")


@pytest.fixture(autouse=True)
def _clean_env(monkeypatch, tmp_path):
    """No user settings leak in; no proxy is used for 127.0.0.1; the default cache is in tmp_path."""
    proxies = ("http_proxy", "HTTP_PROXY", "https_proxy", "HTTPS_PROXY", "all_proxy", "ALL_PROXY")
    for var in ("FEDMDH_DATA_DIR", *proxies):
        monkeypatch.delenv(var, raising=False)
    monkeypatch.setenv("no_proxy", "127.0.0.1,localhost")
    monkeypatch.setenv("FEDMDH_CACHE", str(tmp_path / "default-cache"))


@pytest.fixture
def shared_dir() -> Path:
    missing = [f for f in FILES if not (SHARED / f).is_file()]
    if missing:
        reason = f"shared perovskite files not found under {SHARED} (missing {missing})"
        print(reason)
        pytest.skip(reason)
    return SHARED


def _sha(path: Path) -> str:
    return hashlib.sha256(path.read_bytes()).hexdigest()


def _copy_files(src: Path, dest: Path) -> Path:
    dest.mkdir(parents=True, exist_ok=True)
    for f in FILES:
        shutil.copyfile(src / f, dest / f)
    return dest


def _source_layout(src: Path, root: Path) -> Path:
    """A folder laid out like the source's data/Material: train/ and test/."""
    (root / "train").mkdir(parents=True)
    (root / "test").mkdir(parents=True)
    for f in FILES:
        sub = "test" if f.startswith("test") else "train"
        shutil.copyfile(src / f, root / sub / f)
    return root


class _QuietHandler(http.server.SimpleHTTPRequestHandler):
    def log_message(self, format, *args):  # noqa: A002 - stdlib signature
        pass


class LocalServer:
    """A real HTTP server on 127.0.0.1 (port 0) serving ``root`` from a thread."""

    def __init__(self, root: Path):
        handler = functools.partial(_QuietHandler, directory=str(root))
        self.httpd = http.server.ThreadingHTTPServer(("127.0.0.1", 0), handler)
        self.url = f"http://127.0.0.1:{self.httpd.server_address[1]}"
        self.requests = 0
        orig = self.httpd.finish_request

        def counting(request, client_address):
            self.requests += 1
            orig(request, client_address)

        self.httpd.finish_request = counting  # type: ignore[method-assign]
        self.thread = threading.Thread(
            target=self.httpd.serve_forever, kwargs={"poll_interval": 0.05}, daemon=True
        )
        self.thread.start()
        self.running = True

    def stop(self) -> None:
        if self.running:
            self.httpd.shutdown()
            self.httpd.server_close()
            self.thread.join(timeout=5)
            self.running = False


@pytest.fixture
def serve():
    servers: list[LocalServer] = []

    def start(root: Path) -> LocalServer:
        s = LocalServer(root)
        servers.append(s)
        return s

    yield start
    for s in servers:
        s.stop()


def _closed_port_url() -> str:
    sock = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
    sock.bind(("127.0.0.1", 0))
    port = sock.getsockname()[1]
    sock.close()
    return f"http://127.0.0.1:{port}"


# ----------------------------------------------------------------------------------------------
# Pinned hashes and the local copy
# ----------------------------------------------------------------------------------------------


def test_pinned_hashes_match_shared_sha256sums(shared_dir):
    listed = {}
    for line in (shared_dir / "SHA256SUMS").read_text().splitlines():
        if line.strip():
            digest, name = line.split()
            listed[name] = digest
    assert listed == ds.FILE_SHA256
    assert ds.PINNED_COMMIT in ds.DEFAULT_BASE_URL and ds.PINNED_COMMIT in ds.CACHE_SUBDIR


def test_local_copy_verified_and_returned(shared_dir, tmp_path):
    local = _copy_files(shared_dir, tmp_path / "copy")
    fed = ds.perovskite_split(data_dir=local, download=False)
    assert fed.source == "local copy"
    assert fed.target == "e_form"
    assert fed.institutions == tuple(local / f for f in FILES[:3])
    assert fed.test == local / "test_data1.csv"
    for p in (*fed.institutions, fed.test):
        assert _sha(p) == ds.FILE_SHA256[p.name]
    head = pd.read_csv(fed.institutions[0], nrows=3)
    assert "e_form" in head.columns


def test_local_copy_from_env_var(shared_dir, tmp_path, monkeypatch):
    local = _copy_files(shared_dir, tmp_path / "envcopy")
    monkeypatch.setenv("FEDMDH_DATA_DIR", str(local))
    fed = ds.perovskite_split(download=False)
    assert fed.source == "local copy" and fed.test == local / "test_data1.csv"


@pytest.mark.parametrize("victim", ["train_part1.csv", "test_data1.csv"])
def test_tampered_local_copy_rejected_naming_the_file(shared_dir, tmp_path, victim):
    local = _copy_files(shared_dir, tmp_path / "copy")
    path = local / victim
    raw = bytearray(path.read_bytes())
    raw[len(raw) // 2] ^= 0x01  # one byte changed
    path.write_bytes(bytes(raw))
    with pytest.raises(InputError) as info:
        ds.perovskite_split(data_dir=local, download=False)
    msg = str(info.value)
    assert not isinstance(info.value, ds.DatasetUnavailable)
    assert victim in msg
    assert ds.FILE_SHA256[victim] in msg
    assert hashlib.sha256(bytes(raw)).hexdigest() in msg
    assert "\n" not in msg


def test_local_copy_missing_file_rejected(shared_dir, tmp_path):
    local = _copy_files(shared_dir, tmp_path / "copy")
    (local / "train_part2.csv").unlink()
    with pytest.raises(InputError, match="train_part2.csv"):
        ds.perovskite_split(data_dir=local, download=False)


# ----------------------------------------------------------------------------------------------
# Download against a local server, and the cache
# ----------------------------------------------------------------------------------------------


def test_download_then_cache_without_server(shared_dir, tmp_path, serve):
    server = serve(_source_layout(shared_dir, tmp_path / "www"))
    cache = tmp_path / "cache"
    fed = ds.perovskite_split(cache_dir=cache, base_url=server.url)
    assert fed.source == "download"
    folder = cache / ds.CACHE_SUBDIR
    assert fed.test == folder / "test_data1.csv"
    assert fed.institutions == tuple(folder / f for f in FILES[:3])
    for f in FILES:
        assert (folder / f).read_bytes() == (shared_dir / f).read_bytes()
    assert sorted(p.name for p in folder.iterdir()) == sorted(FILES)  # no temp files left
    assert server.requests == len(FILES)

    server.stop()
    again = ds.perovskite_split(cache_dir=cache, base_url=server.url)
    assert again.source == "cache"
    assert again.institutions == fed.institutions and again.test == fed.test
    # The cache also serves with downloading off.
    assert ds.perovskite_split(cache_dir=cache, download=False).source == "cache"


def test_default_cache_dir_from_env(shared_dir, tmp_path, serve, monkeypatch):
    server = serve(_source_layout(shared_dir, tmp_path / "www"))
    monkeypatch.setenv("FEDMDH_CACHE", str(tmp_path / "envcache"))
    fed = ds.perovskite_split(base_url=server.url + "/")
    assert fed.test.parent == tmp_path / "envcache" / ds.CACHE_SUBDIR


def test_corrupted_download_rejected_and_not_kept(shared_dir, tmp_path, serve):
    www = _source_layout(shared_dir, tmp_path / "www")
    bad = www / "train" / "train_part1.csv"
    raw = bytearray(bad.read_bytes())
    raw[100] ^= 0x20
    bad.write_bytes(bytes(raw))
    server = serve(www)
    cache = tmp_path / "cache"
    with pytest.raises(InputError) as info:
        ds.perovskite_split(cache_dir=cache, base_url=server.url)
    assert not isinstance(info.value, ds.DatasetUnavailable)
    assert "train_part1.csv" in str(info.value)
    assert ds.FILE_SHA256["train_part1.csv"] in str(info.value)
    folder = cache / ds.CACHE_SUBDIR
    assert not (folder / "train_part1.csv").exists()
    assert not list(folder.glob("*.part"))
    assert not list(folder.glob(".*"))
    # default_federation does not hide a corrupted download behind the synthetic fallback.
    with pytest.raises(InputError):
        ds.default_federation(cache_dir=cache, base_url=server.url, notify=lambda m: None)


def test_corrupted_cache_file_is_replaced_by_download(shared_dir, tmp_path, serve):
    server = serve(_source_layout(shared_dir, tmp_path / "www"))
    cache = tmp_path / "cache"
    folder = cache / ds.CACHE_SUBDIR
    assert ds.perovskite_split(cache_dir=cache, base_url=server.url).source == "download"
    (folder / "test_data1.csv").write_bytes(b"truncated")
    with pytest.raises(InputError, match="test_data1.csv"):
        ds.perovskite_split(cache_dir=cache, base_url=server.url, download=False)
    fed = ds.perovskite_split(cache_dir=cache, base_url=server.url)
    assert fed.source == "download"
    assert _sha(fed.test) == ds.FILE_SHA256["test_data1.csv"]


def test_missing_remote_file_is_unavailable(shared_dir, tmp_path, serve):
    www = _source_layout(shared_dir, tmp_path / "www")
    (www / "test" / "test_data1.csv").unlink()  # 404
    server = serve(www)
    with pytest.raises(ds.DatasetUnavailable, match="test_data1.csv"):
        ds.perovskite_split(cache_dir=tmp_path / "cache", base_url=server.url)
    assert not (tmp_path / "cache" / ds.CACHE_SUBDIR / "test_data1.csv").exists()


# ----------------------------------------------------------------------------------------------
# Unreachable source and the fallback
# ----------------------------------------------------------------------------------------------


def test_unreachable_server_raises_unavailable(tmp_path):
    url = _closed_port_url()
    with pytest.raises(ds.DatasetUnavailable) as info:
        ds.perovskite_split(cache_dir=tmp_path / "cache", base_url=url, timeout=5)
    assert isinstance(info.value, InputError)
    assert "\n" not in str(info.value)
    folder = tmp_path / "cache" / ds.CACHE_SUBDIR
    assert not folder.exists() or not any(folder.iterdir())


def test_download_off_and_empty_cache_is_unavailable(tmp_path):
    with pytest.raises(ds.DatasetUnavailable):
        ds.perovskite_split(cache_dir=tmp_path / "cache", download=False)


def test_default_federation_falls_back_to_synthetic(tmp_path, capsys):
    url = _closed_port_url()
    fed = ds.default_federation(cache_dir=tmp_path / "cache", base_url=url, timeout=5, seed=3)
    assert fed.source == "synthetic"
    assert fed.target == "y"
    assert len(fed.institutions) == 3
    assert all(p.is_file() for p in fed.institutions) and fed.test.is_file()
    assert fed.test.parent == tmp_path / "cache" / "synthetic-seed3"
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and "falling back" in err[0] and "synthetic" in err[0]


def test_default_federation_prefers_real_data(shared_dir, tmp_path):
    messages: list[str] = []
    local = _copy_files(shared_dir, tmp_path / "copy")
    fed = ds.default_federation(data_dir=local, notify=messages.append)
    assert fed.source == "local copy" and not messages


# ----------------------------------------------------------------------------------------------
# The synthetic federation
# ----------------------------------------------------------------------------------------------


def _truth(frame: pd.DataFrame) -> np.ndarray:
    """The documented generating function, written independently of the module."""
    x = {c: frame[c].to_numpy(dtype=float) for c in frame.columns}
    return (
        2 * np.sin(x["x1"])
        + 0.5 * x["x2"] ** 2
        + 0.8 * x["x3"] * x["x4"]
        + 0.7 * x["x5"]
        - 0.6 * np.tanh(2 * x["x6"])
        + 0.3 * x["x7"]
    )


def _all_bytes(fed: ds.DefaultFederation) -> dict[str, bytes]:
    paths = [*fed.institutions, fed.test, fed.test.parent / "synthetic.json"]
    return {p.name: p.read_bytes() for p in paths}


def test_synthetic_is_deterministic_under_seed(tmp_path):
    a = ds.synthetic_federation(tmp_path / "a", seed=7)
    b = ds.synthetic_federation(tmp_path / "b", seed=7)
    c = ds.synthetic_federation(tmp_path / "c", seed=8)
    assert _all_bytes(a) == _all_bytes(b)
    assert _all_bytes(a)["test.csv"] != _all_bytes(c)["test.csv"]
    assert a.source == "synthetic" and a.target == "y"


def test_synthetic_institutions_differ_in_features_sizes_and_labels(tmp_path):
    fed = ds.synthetic_federation(tmp_path / "s", seed=0)
    frames = [pd.read_csv(p) for p in fed.institutions]
    test = pd.read_csv(fed.test)
    feats = [frozenset(f.columns) - {"y"} for f in frames]
    assert len(set(feats)) == 3
    shared = frozenset.intersection(*feats)
    assert shared and all(f - shared for f in feats)  # some shared, some private columns
    assert frozenset(test.columns) - {"y"} == frozenset.union(*feats)
    sizes = [len(f) for f in frames]
    assert sizes == [300, 150, 60]
    # Label skew: institutions' label means are well separated (in units of the pooled std).
    means = sorted(f["y"].mean() for f in frames)
    pooled = pd.concat([f["y"] for f in frames]).std()
    assert min(np.diff(means)) > 0.5 * pooled
    meta = json.loads((fed.test.parent / "synthetic.json").read_text())
    assert [i["rows"] for i in meta["institutions"]] == sizes
    assert [set(i["columns"]) for i in meta["institutions"]] == [set(f) for f in feats]
    assert meta["target"] == "y" and meta["seed"] == 0


@pytest.mark.parametrize("seed", [0, 1])
def test_synthetic_noise_std_matches_residual(tmp_path, seed):
    fed = ds.synthetic_federation(tmp_path / "s", seed=seed, n_test=2000)
    meta = json.loads((fed.test.parent / "synthetic.json").read_text())
    sigma = float(meta["noise_std"])
    assert sigma > 0 and "sin" in meta["formula"]
    test = pd.read_csv(fed.test)
    resid = test["y"].to_numpy() - _truth(test)
    assert abs(resid.mean()) < 4 * sigma / np.sqrt(len(resid))
    assert resid.std(ddof=1) == pytest.approx(sigma, rel=0.08)
    # The residual is noise, not signal left over: it is tiny next to the labels' spread.
    assert resid.std() < 0.2 * test["y"].std()
