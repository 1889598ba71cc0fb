"""From a request to a validated task: uploads, field checks, and the federation's figures.

Every check is the library's own, as ``fedmdh run`` makes it: :class:`fedmdh.config.ExperimentConfig`
(algorithm, rounds, number of institutions), :class:`fedmdh.ledger.options.LedgerOptions` (ledger),
:func:`fedmdh.experiment.runner.load_tables` (every file) and
:func:`fedmdh.experiment.runner.prepare` (the test set carries every institution's columns), so
a request gets the CLI's one-line messages, with uploaded files named as the user named them.
Each problem is a :class:`FieldError`: the message and the form field it belongs to.
"""

from __future__ import annotations

import re
import shutil
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

from fedmdh.errors import InputError
from fedmdh.service.limits import MAX_NAME_CHARS, MAX_NUMBER_CHARS, MAX_PATH_CHARS, shown

MAX_INSTITUTIONS = 64
#: request fields, in the order the page shows them (and errors are looked for)
FIELDS = ("institutions", "test", "target", "algorithm", "rounds", "seed", "ledger", "chain_rpc", "exclude")
DEFAULTS = {"algorithm": "fedavg", "rounds": 400, "seed": 0, "ledger": "embedded"}


class FieldError(InputError):
    """A problem with one field of a request (HTTP ``status``, 422 unless the size limit)."""

    def __init__(self, field: str | None, message: str, status: int = 422) -> None:
        super().__init__(message)
        self.field = field
        self.status = status


@dataclass(frozen=True)
class FileEntry:
    """One CSV of a request: where the service reads it, and the name to show for it."""

    path: str
    shown: str


_UNSAFE = re.compile(r"[^A-Za-z0-9._-]+")


def sanitise_filename(name: str | None, fallback: str = "upload.csv") -> str:
    """A safe file name for an upload: no folders, no leading dots, only ``[A-Za-z0-9._-]``, at most 100 chars."""
    base = re.split(r"[\\/]", name or "")[-1]
    base = _UNSAFE.sub("_", base).strip("._") or fallback
    if len(base) > 100:
        stem, dot, ext = base.rpartition(".")
        base = (stem[: 100 - len(ext) - 1] + "." + ext) if dot and len(ext) <= 10 else base[:100]
    return base


def too_large(shown: str, size: int, limit: int) -> FieldError:
    return FieldError(None, f"{shown}: is {size / 1e6:.1f} MB, over the service's upload limit of {limit / 1e6:g} MB "
                            "per file; send a smaller file or start the service with a larger --max-upload-mb.",
                      status=413)


def bounded(name: str, value: str, limit: int, what: str = "characters") -> str:
    """``value`` when it is at most ``limit`` long; else a FieldError that shows only its start."""
    if len(value) > limit:
        raise FieldError(name, f"{name} is {len(value):,} {what} long; the service takes at most {limit:,} (got "
                               f"{shown(value)}).")
    return value


def _int_field(name: str, value: Any) -> int:
    if isinstance(value, bool):
        raise FieldError(name, f"{name} must be a whole number, got {shown(value)}.")
    if isinstance(value, int):
        value = str(value)  # its digits bounded like a string's
    if isinstance(value, float) and value.is_integer():
        return int(value)
    if isinstance(value, str):
        bounded(name, value.strip(), MAX_NUMBER_CHARS)
    try:
        return int(str(value).strip())
    except ValueError:
        raise FieldError(name, f"{name} must be a whole number, got {shown(value)}.") from None


def _str_field(name: str, value: Any, limit: int = MAX_NAME_CHARS) -> str:
    if not isinstance(value, str):
        raise FieldError(name, f"{name} must be a string, got {shown(value)}.")
    return bounded(name, value.strip(), limit)


def _config_check(field: str, **kw: Any) -> None:
    """Run ExperimentConfig's own check of one field (the other fields set to valid placeholders)."""
    from fedmdh.config import ExperimentConfig

    base: dict[str, Any] = dict(institutions=("a.csv", "b.csv"), test="t.csv", target="y", algorithms=("fedavg",),
                                seeds=1)
    try:
        ExperimentConfig(**{**base, **kw})
    except InputError as exc:
        raise FieldError(field, str(exc)) from None


def check_fields(fields: Mapping[str, Any]) -> dict[str, Any]:
    """Check the scalar fields of a request; their values with defaults filled in."""
    from fedmdh.ledger.options import LedgerOptions

    unknown = sorted(set(fields) - set(FIELDS))
    if unknown:
        raise FieldError(unknown[0][:MAX_NAME_CHARS], f"unknown field {shown(unknown[0])}; known: {', '.join(FIELDS)}.")
    out: dict[str, Any] = {}
    target = fields.get("target")
    target = _str_field("target", target) if target is not None else ""
    if not target:
        raise FieldError("target", "missing target; choose the target column (a column of every file).")
    out["target"] = target
    algorithm = _str_field("algorithm", fields.get("algorithm") or DEFAULTS["algorithm"])
    _config_check("algorithm", algorithms=(algorithm,))
    out["algorithm"] = algorithm
    rounds = fields.get("rounds")
    out["rounds"] = _int_field("rounds", DEFAULTS["rounds"] if rounds in (None, "") else rounds)
    _config_check("rounds", rounds=out["rounds"])
    seed = fields.get("seed")
    out["seed"] = _int_field("seed", DEFAULTS["seed"] if seed in (None, "") else seed)
    ledger = fields.get("ledger")
    chain_rpc = fields.get("chain_rpc")
    ledger = _str_field("ledger", ledger) if ledger not in (None, "") else None
    chain_rpc = _str_field("chain_rpc", chain_rpc, MAX_PATH_CHARS) if chain_rpc not in (None, "") else None
    try:
        opts = LedgerOptions.parse(ledger, chain_rpc, DEFAULTS["ledger"])
    except InputError as exc:
        raise FieldError("chain_rpc" if ledger == "rpc" and not chain_rpc else "ledger", str(exc)) from None
    out["ledger"], out["chain_rpc"] = opts.mode, opts.rpc_url
    exclude = fields.get("exclude") or []
    if isinstance(exclude, str):
        exclude = [c for c in (x.strip() for x in exclude.split(",")) if c]
    if not isinstance(exclude, list) or not all(isinstance(c, str) for c in exclude):
        raise FieldError("exclude", f"exclude must be a list of column names, got {shown(exclude)}.")
    from fedmdh.data.io import MAX_COLUMNS

    if len(exclude) > MAX_COLUMNS:
        raise FieldError("exclude", f"exclude names {len(exclude):,} columns; a table has at most {MAX_COLUMNS:,}.")
    out["exclude"] = tuple(bounded("exclude", c.strip(), MAX_NAME_CHARS) for c in exclude if c.strip())
    return out


def check_files(institutions: Sequence[FileEntry], test: FileEntry | None) -> None:
    """The request names at least one institution file and a test file."""
    if not institutions:
        raise FieldError("institutions", "missing institutions; upload one CSV file per institution (at least two).")
    if len(institutions) > MAX_INSTITUTIONS:
        raise FieldError("institutions", f"{len(institutions)} institution files; the service takes at most "
                                         f"{MAX_INSTITUTIONS}.")
    if test is None:
        raise FieldError("test", "missing test; upload the shared test CSV file (it carries every column).")
    for name, entry in [*(("institutions", e) for e in institutions), ("test", test)]:
        bounded(name, entry.shown, MAX_PATH_CHARS, "characters (a file's name or path)")
        bounded(name, entry.path, MAX_PATH_CHARS, "characters (a file's name or path)")


def label_histograms(names: Sequence[str], labels: Sequence[np.ndarray], bins: int) -> dict[str, Any]:
    """Each institution's label histogram over the pooled range (the bins KL_avg is computed over)."""
    pooled = np.concatenate([np.asarray(y, dtype=np.float64).ravel() for y in labels])
    lo, hi = float(pooled.min()), float(pooled.max())
    edges = np.linspace(lo, hi if hi > lo else lo + 1.0, bins + 1)
    return {
        "edges": edges.tolist(),
        "counts": {n: np.histogram(y, edges)[0].astype(int).tolist() for n, y in zip(names, labels)},
        "pooled": np.histogram(pooled, edges)[0].astype(int).tolist(),
    }


def build_task(task_id: str, fields: Mapping[str, Any], institutions: Sequence[FileEntry],
               test: FileEntry | None):
    """Validate a request into a :class:`TaskSpec` and the federation's figures, or raise FieldError."""
    from fedmdh.data.heterogeneity import KL_BINS
    from fedmdh.experiment.runner import federation_info, load_tables, prepare
    from fedmdh.service.runtime import TaskSpec

    check_files(institutions, test)
    assert test is not None
    values = check_fields(fields)
    display = {e.path: e.shown for e in (*institutions, test) if e.path != e.shown}
    spec = TaskSpec(id=task_id, institutions=tuple(e.path for e in institutions), test=test.path, display=display,
                    **values)
    try:
        cfg = spec.config()
    except InputError as exc:
        raise FieldError("institutions", spec.public(str(exc))) from None

    def where(msg: str) -> str:
        if msg.startswith("--exclude "):
            return "exclude"
        return "test" if msg.startswith(test.path + ":") else "institutions"

    try:
        tables = load_tables(cfg)
        fed = prepare(cfg, tables, spec.seed)
    except InputError as exc:
        msg = str(exc)  # the CLI's flag is the request's field here
        raise FieldError(where(msg), spec.public(msg[2:] if msg.startswith("--exclude ") else msg)) from None
    info = federation_info(fed, tables)
    info["files"] = {t.name: spec.public(t.source) for t in tables.institutions}
    info["test"] = {"file": spec.public(tables.test.source), "rows": tables.test.n_rows}
    info["label_histogram"] = label_histograms([t.name for t in tables.institutions],
                                               [t.y for t in tables.institutions], KL_BINS)
    return spec, info


def discard(folder: Path) -> None:
    """Remove the uploads of a refused request."""
    shutil.rmtree(folder, ignore_errors=True)
