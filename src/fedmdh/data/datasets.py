"""The built-in default federation: the FedMDH perovskite split, or a synthetic stand-in offline.

The demo needs a three-institution regression task that works on a fresh machine. Two are built in:

* :func:`perovskite_split` -- the authors' own three-institution benchmark (ABO3 perovskite oxides,
  target ``e_form`` in eV/atom), pinned to one commit of their public repository and to the sha256 of
  each file. It is looked for, in order,

  1. in ``data_dir`` (a local copy; the environment variable ``FEDMDH_DATA_DIR`` is used when the
     argument is ``None``),
  2. in the cache (``cache_dir``; else ``$FEDMDH_CACHE``; else ``~/.cache/fedmdh``), under the
     subfolder :data:`CACHE_SUBDIR`,
  3. at the original source (raw files of GitHub ``SICC-Group/FedMDH`` at :data:`PINNED_COMMIT`),
     downloaded into the cache with a timeout, verified, then atomically renamed into place.

  Every file is checked against its pinned sha256; a wrong file raises
  :class:`~fedmdh.errors.InputError` naming the file and both hashes. When the source cannot be
  reached it raises :class:`DatasetUnavailable`.

* :func:`synthetic_federation` -- a small synthetic task with known ground truth, written as CSVs.

:func:`default_federation` tries the first and falls back to the second, with one line saying so.
"""

from __future__ import annotations

import hashlib
import http.client
import json
import os
import sys
import tempfile
import urllib.error
import urllib.request
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import pandas as pd

from fedmdh.errors import InputError
from fedmdh.seeding import rng_for

__all__ = [
    "CACHE_SUBDIR",
    "DATASET_NAME",
    "DEFAULT_BASE_URL",
    "FILE_SHA256",
    "INSTITUTION_FILES",
    "PINNED_COMMIT",
    "SYNTHETIC_FORMULA",
    "SYNTHETIC_NOISE_STD",
    "TEST_FILE",
    "DatasetUnavailable",
    "DefaultFederation",
    "default_cache_dir",
    "default_federation",
    "perovskite_split",
    "sha256_of",
    "synthetic_federation",
]

DATASET_NAME = "fedmdh_perovskite_split"
PINNED_COMMIT = "038a412246e2106aa980288515e20a71a4da780c"
CACHE_SUBDIR = f"{DATASET_NAME}-{PINNED_COMMIT}"
DEFAULT_BASE_URL = (
    f"https://raw.githubusercontent.com/SICC-Group/FedMDH/{PINNED_COMMIT}"
    "/fabric-mge-backend/apps/fl/FedMDH/data/Material"
)
DEFAULT_TIMEOUT_S = 20.0

INSTITUTION_FILES: tuple[str, ...] = ("train_part0.csv", "train_part1.csv", "train_part2.csv")
TEST_FILE = "test_data1.csv"
PEROVSKITE_TARGET = "e_form"

#: sha256 of each file, byte-identical to the source at :data:`PINNED_COMMIT`.
FILE_SHA256: dict[str, str] = {
    "train_part0.csv": "f11a10dcc8f2bff041d8c638f8cca781775de6b4c04f36988e0cfb1867f79f0a",
    "train_part1.csv": "9b17d56dc1f286f3d809099fb07cda1d86a4dcbf31cca1e9696e4d89d6157466",
    "train_part2.csv": "9c298b54b98641472d195ca70616ddeff0cf098c2311eccc05845f4df88c3f15",
    "test_data1.csv": "bb17ae2f19e685bc9f707b0c1f0636b6a19adbc39d3d8022541c9007144882aa",
}

#: Folder of each file under the source's ``data/Material`` prefix.
_REMOTE_FOLDER = {
    "train_part0.csv": "train",
    "train_part1.csv": "train",
    "train_part2.csv": "train",
    "test_data1.csv": "test",
}

_PEROVSKITE_DESCRIPTION = (
    "FedMDH perovskite split: ABO3 perovskite oxides (Emery & Wolverton 2017) featurized with matminer; "
    "3 institutions (1231/891/1066 rows) holding different e_form bands and feature sets; "
    f"322 test rows; target e_form [eV/atom]; source GitHub SICC-Group/FedMDH@{PINNED_COMMIT[:12]}."
)


class DatasetUnavailable(InputError):
    """The dataset is neither available locally nor downloadable (e.g. no network)."""


@dataclass(frozen=True)
class DefaultFederation:
    """A federation ready to load: one CSV per institution plus a shared test CSV.

    Attributes
    ----------
    institutions:
        One CSV path per institution, in order.
    test:
        The shared test CSV.
    target:
        Name of the target column.
    source:
        Where the files came from: ``"local copy"``, ``"cache"``, ``"download"`` or ``"synthetic"``.
    description:
        One human-readable line about the task.
    """

    institutions: tuple[Path, ...]
    test: Path
    target: str
    source: str
    description: str


# ----------------------------------------------------------------------------------------------
# Hashing and locations
# ----------------------------------------------------------------------------------------------


def sha256_of(path: str | Path) -> str:
    """Hex sha256 of a file's bytes."""
    h = hashlib.sha256()
    with open(path, "rb") as fh:
        for chunk in iter(lambda: fh.read(1 << 20), b""):
            h.update(chunk)
    return h.hexdigest()


def _check_hash(path: Path, name: str, what: str) -> None:
    expected = FILE_SHA256[name]
    actual = sha256_of(path)
    if actual != expected:
        raise InputError(
            f"{path}: {what} {name} has sha256 {actual}, expected {expected}; "
            "replace it with the original file (or delete it to re-download)."
        )


def default_cache_dir() -> Path:
    """``$FEDMDH_CACHE`` if set, else ``~/.cache/fedmdh``."""
    env = os.environ.get("FEDMDH_CACHE", "").strip()
    return Path(env).expanduser() if env else Path.home() / ".cache" / "fedmdh"


def _federation(folder: Path, source: str) -> DefaultFederation:
    return DefaultFederation(
        institutions=tuple(folder / n for n in INSTITUTION_FILES),
        test=folder / TEST_FILE,
        target=PEROVSKITE_TARGET,
        source=source,
        description=_PEROVSKITE_DESCRIPTION,
    )


def _all_files() -> tuple[str, ...]:
    return (*INSTITUTION_FILES, TEST_FILE)


# ----------------------------------------------------------------------------------------------
# Download
# ----------------------------------------------------------------------------------------------


def _download(url: str, dest: Path, name: str, timeout: float, hint: str = "data_dir=") -> None:
    """Download ``url`` to ``dest`` via a temp file in the same folder; verify; rename atomically.

    Network failures raise :class:`DatasetUnavailable`; a wrong hash raises :class:`InputError`.
    Nothing is ever left under ``dest`` unless it is verified.
    """
    dest.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp_name = tempfile.mkstemp(prefix=f".{name}.", suffix=".part", dir=dest.parent)
    tmp = Path(tmp_name)
    try:
        h = hashlib.sha256()
        try:
            with os.fdopen(fd, "wb") as out, urllib.request.urlopen(url, timeout=timeout) as resp:
                for chunk in iter(lambda: resp.read(1 << 16), b""):
                    h.update(chunk)
                    out.write(chunk)
        except (urllib.error.URLError, http.client.HTTPException, OSError, ValueError) as exc:
            reason = getattr(exc, "reason", None) or exc
            raise DatasetUnavailable(
                f"{url}: could not download {name} ({reason}); check the network, or pass a local "
                f"copy with {hint} (or FEDMDH_DATA_DIR)."
            ) from None
        actual = h.hexdigest()
        expected = FILE_SHA256[name]
        if actual != expected:
            raise InputError(
                f"{url}: downloaded {name} has sha256 {actual}, expected {expected}; the source changed "
                f"or the transfer was corrupted; retry, or pass a verified local copy with {hint}."
            )
        os.replace(tmp, dest)
    finally:
        tmp.unlink(missing_ok=True)


# ----------------------------------------------------------------------------------------------
# The perovskite split
# ----------------------------------------------------------------------------------------------


def perovskite_split(
    data_dir: str | Path | None = None,
    cache_dir: str | Path | None = None,
    base_url: str | None = None,
    download: bool = True,
    *,
    timeout: float = DEFAULT_TIMEOUT_S,
    local_copy_hint: str = "data_dir=",
) -> DefaultFederation:
    """The FedMDH perovskite split (3 institutions + test set, target ``e_form``), verified.

    Parameters
    ----------
    data_dir:
        A folder holding a local copy (``train_part0.csv``, ``train_part1.csv``, ``train_part2.csv``,
        ``test_data1.csv``). When ``None``, the environment variable ``FEDMDH_DATA_DIR`` is used if
        set. Given a local copy, nothing else is tried: each file must exist and match its pinned
        sha256, else :class:`~fedmdh.errors.InputError`.
    cache_dir:
        Cache root (default ``$FEDMDH_CACHE``, else ``~/.cache/fedmdh``). Files live under
        ``<cache_dir>/<CACHE_SUBDIR>/``; verified files there are used as they are.
    base_url:
        Replaces :data:`DEFAULT_BASE_URL`; files are fetched from ``<base_url>/train/<file>`` and
        ``<base_url>/test/<file>``.
    download:
        Whether missing cache files may be downloaded.
    timeout:
        Seconds to wait on the network per request.
    local_copy_hint:
        How messages tell the user to give a local copy (the CLI says ``--data-dir DIR``).

    Raises
    ------
    InputError
        A local copy is missing a file or holds a file whose sha256 differs (the message names the
        file and both hashes); or a download arrived with the wrong sha256 (nothing is kept).
    DatasetUnavailable
        The files are not in the cache and could not be downloaded (no network, or ``download``
        is false).
    """
    if data_dir is None:
        env = os.environ.get("FEDMDH_DATA_DIR", "").strip()
        data_dir = Path(env).expanduser() if env else None
    if data_dir is not None:
        folder = Path(data_dir)
        if not folder.is_dir():
            raise InputError(
                f"{folder}: data folder not found; give the folder holding {', '.join(_all_files())}."
            )
        for name in _all_files():
            path = folder / name
            if not path.is_file():
                raise InputError(
                    f"{path}: {name} is missing from the local copy; copy it there "
                    f"(expected sha256 {FILE_SHA256[name]})."
                )
            _check_hash(path, name, "local copy of")
        return _federation(folder, "local copy")

    folder = (Path(cache_dir).expanduser() if cache_dir is not None else default_cache_dir()) / CACHE_SUBDIR
    prefix = (base_url if base_url is not None else DEFAULT_BASE_URL).rstrip("/")
    downloaded = False
    for name in _all_files():
        path = folder / name
        if path.is_file() and sha256_of(path) == FILE_SHA256[name]:
            continue
        if not download:
            if path.is_file():
                _check_hash(path, name, "cached")
            raise DatasetUnavailable(
                f"{path}: {name} is not in the cache and downloading is off; allow the download or "
                f"pass a local copy with {local_copy_hint} (or FEDMDH_DATA_DIR)."
            )
        # A stale or corrupted cached file is replaced atomically by a verified download.
        _download(f"{prefix}/{_REMOTE_FOLDER[name]}/{name}", path, name, timeout, local_copy_hint)
        downloaded = True
    return _federation(folder, "download" if downloaded else "cache")


# ----------------------------------------------------------------------------------------------
# The synthetic federation
# ----------------------------------------------------------------------------------------------

SYNTHETIC_NOISE_STD = 0.2
SYNTHETIC_FORMULA = (
    "y = 2*sin(x1) + 0.5*x2**2 + 0.8*x3*x4 + 0.7*x5 - 0.6*tanh(2*x6) + 0.3*x7 + eps, eps ~ N(0, 0.2**2)"
)
SYNTHETIC_FEATURES: tuple[str, ...] = ("x1", "x2", "x3", "x4", "x5", "x6", "x7", "x8")
#: Columns each institution holds: x1-x3 shared by all, the rest private or shared by two.
SYNTHETIC_INSTITUTION_FEATURES: tuple[tuple[str, ...], ...] = (
    ("x1", "x2", "x3", "x4", "x5"),
    ("x1", "x2", "x3", "x4", "x6"),
    ("x1", "x2", "x3", "x7", "x8"),
)
#: Centre of each institution's band of the latent variable x1 (label skew), spread 0.5.
SYNTHETIC_X1_CENTRES: tuple[float, ...] = (-1.5, 0.0, 1.5)
_X1_SPREAD = 0.5
_TEST_X1_RANGE = (-2.5, 2.5)


def _synthetic_f(X: np.ndarray) -> np.ndarray:
    """The noiseless ground truth on the columns x1..x8 (x8 has no effect)."""
    x1, x2, x3, x4, x5, x6, x7 = (X[:, j] for j in range(7))
    return 2.0 * np.sin(x1) + 0.5 * x2**2 + 0.8 * x3 * x4 + 0.7 * x5 - 0.6 * np.tanh(2.0 * x6) + 0.3 * x7


def synthetic_federation(
    out_dir: str | Path,
    seed: int = 0,
    sizes: Sequence[int] = (300, 150, 60),
    n_test: int = 400,
) -> DefaultFederation:
    """Write a small synthetic 3-institution regression task with known ground truth.

    Features ``x1..x8`` are standard normal, except the latent driver ``x1``: institution ``k``
    draws ``x1 ~ N(c_k, 0.5**2)`` with ``c = (-1.5, 0.0, 1.5)``, so each institution sees one region
    of ``x1`` and one band of labels (label skew); the test set draws ``x1 ~ U(-2.5, 2.5)``. The
    target is::

        y = 2*sin(x1) + 0.5*x2**2 + 0.8*x3*x4 + 0.7*x5 - 0.6*tanh(2*x6) + 0.3*x7 + eps,
        eps ~ N(0, 0.2**2)

    (``x8`` is an irrelevant feature), so the best achievable test RMSE is the noise std, 0.2.

    Institutions hold different columns and sizes (default 300/150/60 rows):

    * institution 0: x1, x2, x3, x4, x5
    * institution 1: x1, x2, x3, x4, x6
    * institution 2: x1, x2, x3, x7, x8

    The test set (default 400 rows) carries all of ``x1..x8``. Target column ``y``.

    Files written to ``out_dir``: ``institution_0.csv``, ``institution_1.csv``,
    ``institution_2.csv``, ``test.csv`` and ``synthetic.json`` (formula, noise std, seed, sizes,
    columns). All draws come from ``fedmdh.seeding.rng_for(seed, "synthetic")``, so the files are
    byte-identical for a given seed.
    """
    sizes = tuple(int(s) for s in sizes)
    if len(sizes) != len(SYNTHETIC_INSTITUTION_FEATURES):
        raise InputError(f"sizes={sizes}: give {len(SYNTHETIC_INSTITUTION_FEATURES)} institution sizes.")
    if any(s < 1 for s in sizes) or n_test < 1:
        raise InputError(f"sizes={sizes}, n_test={n_test}: every size must be a positive number of rows.")
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    rng = rng_for(seed, "synthetic")
    d = len(SYNTHETIC_FEATURES)

    def draw(n: int, x1: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        X = rng.standard_normal((n, d))
        X[:, 0] = x1
        y = _synthetic_f(X) + rng.normal(0.0, SYNTHETIC_NOISE_STD, size=n)
        return X, y

    def write(path: Path, X: np.ndarray, y: np.ndarray, columns: Sequence[str]) -> None:
        idx = [SYNTHETIC_FEATURES.index(c) for c in columns]
        frame = pd.DataFrame(X[:, idx], columns=list(columns))
        frame["y"] = y
        frame.to_csv(path, index=False, float_format="%.10g", lineterminator="\n")

    paths: list[Path] = []
    for k, (n, cols, centre) in enumerate(zip(sizes, SYNTHETIC_INSTITUTION_FEATURES, SYNTHETIC_X1_CENTRES)):
        X, y = draw(n, rng.normal(centre, _X1_SPREAD, size=n))
        path = out / f"institution_{k}.csv"
        write(path, X, y, cols)
        paths.append(path)
    X, y = draw(n_test, rng.uniform(*_TEST_X1_RANGE, size=n_test))
    test = out / "test.csv"
    write(test, X, y, SYNTHETIC_FEATURES)

    meta = {
        "formula": SYNTHETIC_FORMULA,
        "noise_std": SYNTHETIC_NOISE_STD,
        "best_rmse": SYNTHETIC_NOISE_STD,
        "seed": int(seed),
        "target": "y",
        "institutions": [
            {"file": p.name, "rows": n, "columns": list(cols), "x1_centre": c, "x1_std": _X1_SPREAD}
            for p, n, cols, c in zip(paths, sizes, SYNTHETIC_INSTITUTION_FEATURES, SYNTHETIC_X1_CENTRES)
        ],
        "test": {"file": test.name, "rows": int(n_test), "columns": list(SYNTHETIC_FEATURES),
                 "x1_uniform": list(_TEST_X1_RANGE)},
    }
    (out / "synthetic.json").write_text(json.dumps(meta, indent=2) + "\n", encoding="utf-8")
    description = (
        f"synthetic federation (seed {seed}): 3 institutions ({'/'.join(map(str, sizes))} rows) with "
        f"different feature subsets and label bands, {n_test} test rows; {SYNTHETIC_FORMULA}; "
        f"best RMSE {SYNTHETIC_NOISE_STD}."
    )
    return DefaultFederation(tuple(paths), test, "y", "synthetic", description)


# ----------------------------------------------------------------------------------------------
# Default with fallback
# ----------------------------------------------------------------------------------------------


def _stderr_line(message: str) -> None:
    print(message, file=sys.stderr)


def default_federation(
    data_dir: str | Path | None = None,
    cache_dir: str | Path | None = None,
    base_url: str | None = None,
    download: bool = True,
    *,
    synthetic_dir: str | Path | None = None,
    seed: int = 0,
    timeout: float = DEFAULT_TIMEOUT_S,
    notify: Callable[[str], None] | None = None,
    local_copy_hint: str = "data_dir=",
) -> DefaultFederation:
    """The perovskite split if it can be had, else the synthetic federation.

    Calls :func:`perovskite_split`; if it raises :class:`DatasetUnavailable`, reports one line via
    ``notify`` (default: print to stderr) and returns :func:`synthetic_federation` written to
    ``synthetic_dir`` (default ``<cache>/synthetic-seed<seed>``); ``local_copy_hint`` is how messages
    say to give a local copy (``data_dir=``; the CLI passes ``--data-dir DIR``). Other errors (a local copy or a
    download with the wrong hash) are raised, never hidden by the fallback.
    """
    try:
        return perovskite_split(data_dir, cache_dir, base_url, download, timeout=timeout,
                                local_copy_hint=local_copy_hint)
    except DatasetUnavailable as exc:
        if synthetic_dir is None:
            root = Path(cache_dir).expanduser() if cache_dir is not None else default_cache_dir()
            synthetic_dir = root / f"synthetic-seed{seed}"
        (notify or _stderr_line)(
            f"fedmdh: perovskite dataset unavailable ({exc}); falling back to the synthetic federation "
            f"in {synthetic_dir}."
        )
        return synthetic_federation(synthetic_dir, seed=seed)
