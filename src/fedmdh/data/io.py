"""Reading and validating institution tables.

Each check raises :class:`fedmdh.errors.InputError` with one line that names the file, the column
or the row and says what to do. Row numbers in messages are line numbers in the file (the header
is line 1), so a user can jump straight to them.
"""

from __future__ import annotations

import csv
import hashlib
import io
import stat
from collections.abc import Iterable, Sequence
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import pandas as pd

from fedmdh.errors import InputError

MIN_ROWS = 10
_SHOW = 5


def line_numbers(rows: Iterable[int]) -> str:
    """Format data-row positions as file line numbers (header = line 1)."""
    rows = list(rows)
    shown = ", ".join(str(r + 2) for r in rows[:_SHOW])
    more = f" and {len(rows) - _SHOW} more" if len(rows) > _SHOW else ""
    return f"line{'s' if len(rows) > 1 else ''} {shown}{more}"


#: the most columns a CSV may have (featurized tables have a few hundred), and the longest header line, in bytes
MAX_COLUMNS = 10_000
MAX_HEADER_BYTES = 1_000_000


def check_header_size(path: str | Path, raw: bytes) -> None:
    """Refuse a CSV whose header line is longer than :data:`MAX_HEADER_BYTES` or names more than
    :data:`MAX_COLUMNS` columns, before the table is parsed (a million columns take minutes and gigabytes)."""
    end = raw.find(b"\n", 0, MAX_HEADER_BYTES + 1)
    if end < 0 and len(raw) > MAX_HEADER_BYTES:
        raise InputError(f"{path}: the header line is longer than {MAX_HEADER_BYTES:,} bytes; fedmdh reads tables "
                         f"of at most {MAX_COLUMNS:,} columns: keep the columns you need.")
    line = raw[: end if end >= 0 else len(raw)].decode("latin-1")  # a comma is one byte in UTF-8 too
    try:
        n = len(next(csv.reader([line]), []))
    except csv.Error:  # a stray carriage return: count the commas (an upper bound)
        n = line.count(",") + 1
    if n > MAX_COLUMNS:
        raise InputError(f"{path}: has {n:,} columns; fedmdh reads tables of at most {MAX_COLUMNS:,}: keep the "
                         "columns you need.")


def read_csv_checked(path: str | Path) -> pd.DataFrame:
    """Read a CSV file, refusing missing, empty, binary or malformed files and duplicate headers."""
    path = Path(path)
    if not path.exists():
        raise InputError(f"{path}: file not found; check the path.")
    if path.is_dir():
        raise InputError(f"{path}: is a directory; give the path of a CSV file.")
    if not path.is_file():  # a FIFO, socket or device: reading it could block forever
        raise InputError(f"{path}: is not a regular file; give the path of a CSV file.")
    try:
        raw = path.read_bytes()
    except OSError as exc:
        raise InputError(f"{path}: cannot be read ({exc.strerror or exc}); check its permissions.") from None
    if not raw.strip():
        raise InputError(f"{path}: the file is empty; give a CSV file with a header row and data rows.")
    head = raw[:8192]
    if b"\x00" in head:
        raise InputError(f"{path}: is not a CSV file (it contains binary data); export the table as CSV.")
    check_header_size(path, raw)
    try:
        text = raw.decode("utf-8-sig")
    except UnicodeDecodeError:
        try:
            text = raw.decode("latin-1")
        except UnicodeDecodeError:  # pragma: no cover - latin-1 decodes any byte string
            raise InputError(f"{path}: is not a text CSV file; export the table as UTF-8 CSV.") from None
    try:
        header = next(csv.reader(io.StringIO(text)))
    except (csv.Error, StopIteration) as exc:
        raise InputError(f"{path}: is not a readable CSV file ({exc}); export the table as CSV.") from None
    header = [h.strip() for h in header]
    if len(header) < 2:
        raise InputError(
            f"{path}: is not a CSV table with at least two comma-separated columns "
            f"(found header {header[:1]!r}); export the table as CSV."
        )
    seen: set[str] = set()
    dupes = [h for h in header if h in seen or seen.add(h)]  # type: ignore[func-returns-value]
    if dupes:
        raise InputError(f"{path}: duplicate column name {dupes[0]!r}; give every column a unique name.")
    if any(h == "" for h in header):
        raise InputError(f"{path}: column {header.index('') + 1} has an empty name; name every column.")
    try:
        frame = pd.read_csv(io.StringIO(text), skipinitialspace=True)
    except (pd.errors.ParserError, ValueError) as exc:
        msg = str(exc).strip().splitlines()[0]
        raise InputError(f"{path}: is not a well-formed CSV file ({msg}); fix or re-export it.") from None
    frame.columns = header
    if len(frame) == 0:
        raise InputError(f"{path}: has a header but no data rows; add rows.")
    return frame


@dataclass(frozen=True)
class InstitutionTable:
    """One institution's validated table: numeric features and the target.

    Attributes
    ----------
    name:
        The institution's name (the file stem unless given).
    source:
        Where the table came from (a path), for messages.
    features:
        Feature column names, in file order.
    X:
        ``(n, d)`` float64 feature values; NaN marks a missing value.
    y:
        ``(n,)`` float64 target values (never NaN).
    """

    name: str
    source: str
    features: tuple[str, ...]
    X: np.ndarray = field(repr=False)
    y: np.ndarray = field(repr=False)

    @property
    def n_rows(self) -> int:
        return int(self.y.shape[0])

    @property
    def n_missing(self) -> int:
        return int(np.isnan(self.X).sum())


def numeric_column(series: pd.Series, col: str, where: str, hint: str) -> np.ndarray:
    """A column as float64 (booleans as 0/1, non-finite as NaN); a non-numeric cell is an error.

    ``where`` prefixes the message (e.g. ``"file.csv: "``); ``hint`` says what to do.
    """
    if series.dtype == bool:
        series = series.astype(np.float64)
    values = pd.to_numeric(series, errors="coerce")
    bad = values.isna() & series.notna()
    if bad.any():
        row = int(np.flatnonzero(bad.to_numpy())[0])
        raise InputError(
            f"{where}column {col!r} is not numeric ({line_numbers([row])} holds {series.iloc[row]!r}); {hint}"
        )
    arr = values.to_numpy(dtype=np.float64)
    arr[~np.isfinite(arr)] = np.nan
    return arr


def _numeric_frame(frame: pd.DataFrame, source: str, columns: Sequence[str]) -> np.ndarray:
    out = np.empty((len(frame), len(columns)), dtype=np.float64)
    for j, col in enumerate(columns):
        out[:, j] = numeric_column(
            frame[col], col, f"{source}: ", "featurize it (e.g. `fedmdh featurize` for formulas) or drop the column."
        )
    return out


def check_magnitude(values: np.ndarray, columns: Sequence[str], where: str) -> None:
    """Refuse a column whose sum of squares overflows float64 (pooled standardisation needs it).

    ``values`` is ``(n, d)`` (NaN: missing); the message names the column and the line of its
    largest value.
    """
    with np.errstate(over="ignore", invalid="ignore"):
        sq = np.nansum(values * values, axis=0)
    bad = np.flatnonzero(~np.isfinite(sq))
    if bad.size:
        j = int(bad[0])
        col = np.abs(values[:, j])
        row = int(np.nanargmax(col))
        raise InputError(
            f"{where}column {columns[j]!r} holds values too large to standardise ({line_numbers([row])} holds "
            f"{values[row, j]:.6g}; their squares overflow float64); rescale the column (other units or a log)."
        )


def validate_table(
    frame: pd.DataFrame,
    target: str,
    source: str,
    name: str | None = None,
    exclude: Sequence[str] = (),
    min_rows: int = MIN_ROWS,
    kind: str = "institution",
) -> InstitutionTable:
    """Validate one institution's table and split it into features and target.

    Parameters
    ----------
    frame:
        The table as read.
    target:
        Name of the target column.
    source:
        The file it came from, named in every message.
    name:
        The institution's name; defaults to the file stem of ``source``.
    exclude:
        Columns that are neither features nor target (identifiers, formulas, other properties).
    min_rows:
        The fewest rows an institution may have.
    kind:
        What the table is, in messages: ``"institution"`` (its name must then be an institution name,
        :func:`check_institution_name`) or ``"test set"``.
    """
    if kind == "institution":
        check_institution_name(name or Path(source).stem, f"{source}: ")
    if target not in frame.columns:
        cols = ", ".join(repr(c) for c in list(frame.columns)[:8])
        more = ", ..." if frame.shape[1] > 8 else ""
        raise InputError(
            f"{source}: target column {target!r} not found (columns: {cols}{more}); "
            "pass the right --target or add the column."
        )
    y_series = pd.to_numeric(frame[target], errors="coerce")
    bad = y_series.isna() & frame[target].notna()
    if bad.any():
        row = int(np.flatnonzero(bad.to_numpy())[0])
        raise InputError(
            f"{source}: target column {target!r} is not numeric ({line_numbers([row])} holds "
            f"{frame[target].iloc[row]!r}); fix the value or drop the row."
        )
    y = y_series.to_numpy(dtype=np.float64)
    nan_rows = np.flatnonzero(~np.isfinite(y))
    if nan_rows.size == len(y):
        raise InputError(f"{source}: target column {target!r} is empty (all values missing); fill it in.")
    if nan_rows.size:
        raise InputError(
            f"{source}: target {target!r} is missing or not finite at {line_numbers(nan_rows)} "
            f"({nan_rows.size} row{'s' if nan_rows.size > 1 else ''}); fill in or drop those rows."
        )
    if len(y) < min_rows:
        rows = f"{len(y)} row{'s' if len(y) != 1 else ''}"
        if kind == "institution":
            raise InputError(f"{source}: has {rows}; an institution needs at least {min_rows} "
                             "(merge it with another institution or collect more data).")
        raise InputError(f"{source}: has {rows}; the {kind} needs at least {min_rows} to measure the models on "
                         "(give more held-out rows).")
    check_magnitude(y[:, None], [target], f"{source}: target ")
    if np.ptp(y) == 0.0:
        raise InputError(
            f"{source}: target column {target!r} is constant ({y[0]!r}); there is nothing to learn, "
            "check the column or the file."
        )
    excluded = set(exclude)
    features = tuple(c for c in frame.columns if c != target and c not in excluded)
    if not features:
        raise InputError(f"{source}: has no feature columns besides the target {target!r}; add features.")
    alias = next((c for c in features if c.casefold() == target.casefold()), None)
    if alias is not None:
        raise InputError(
            f"{source}: column {alias!r} differs from the target {target!r} only by case; if it is the target "
            f"under another name it leaks the answer: rename it or pass --exclude {alias!r}."
        )
    X = _numeric_frame(frame, source, features)
    check_magnitude(X, features, f"{source}: ")
    all_nan = np.flatnonzero(np.isnan(X).all(axis=0))
    if all_nan.size:
        col = features[int(all_nan[0])]
        raise InputError(
            f"{source}: column {col!r} is empty (all values missing); drop the column or fill it in."
        )
    return InstitutionTable(
        name=name or Path(source).stem,
        source=str(source),
        features=features,
        X=X,
        y=y,
    )


def load_institution(
    path: str | Path,
    target: str,
    name: str | None = None,
    exclude: Sequence[str] = (),
    kind: str = "institution",
) -> InstitutionTable:
    """Read and validate one institution's CSV file (``kind="test set"``: the shared test file)."""
    frame = read_csv_checked(path)
    return validate_table(frame, target, str(path), name=name, exclude=exclude, kind=kind)


def _file_key(path: str | Path) -> tuple[int, int] | None:
    """``(device, inode)`` of a regular file; ``None`` otherwise (reported, with the path, when read)."""
    try:
        st = Path(path).stat()
    except OSError:
        return None
    return (st.st_dev, st.st_ino) if stat.S_ISREG(st.st_mode) else None


def _file_digest(path: str | Path) -> str | None:
    try:
        return hashlib.sha256(Path(path).read_bytes()).hexdigest()
    except OSError:
        return None


def check_distinct_files(paths: Sequence[str | Path], test: str | Path | None = None) -> None:
    """Refuse the same file, or two files with identical content, given as two institutions, and a
    ``test`` file that is one of the institutions' files (the same file or the same content: its
    rows would be rows the models trained on, and the test scores too good)."""
    seen: dict[object, str] = {}
    for p in paths:
        key = _file_key(p)
        if key is None:
            continue
        if key in seen:
            raise InputError(f"{p}: is given twice as an institution (also as {seen[key]}); give each "
                             "institution's file once.")
        seen[key] = str(p)
    test_key = _file_key(test) if test is not None else None
    if test_key is not None and test_key in seen:
        raise InputError(f"{test}: the test set is the file of an institution ({seen[test_key]}); the models would be "
                         "scored on rows they trained on: give a held-out test file.")
    digests: dict[str, str] = {}
    for p in dict.fromkeys(str(v) for v in seen.values()):
        h = _file_digest(p)
        if h is None:
            continue
        if h in digests:
            raise InputError(f"{p}: has the same content as {digests[h]}; one institution's rows would be trained "
                             "on twice; give each institution's file once.")
        digests[h] = p
    if test_key is not None:
        h = _file_digest(test)
        if h is not None and h in digests:
            raise InputError(f"{test}: the test set has the same content as the institution file {digests[h]}; the "
                             "models would be scored on rows they trained on: give a held-out test file.")


#: the longest institution name, in bytes of UTF-8 (64 ASCII characters): the ledger contract stores a
#: participant's name in a String[64], and a name is a folder name (models/NAME) and part of a key's file name
MAX_NAME_BYTES = 64
NAME_RULE = (f"names are printable text of 1 to {MAX_NAME_BYTES} bytes in UTF-8 ({MAX_NAME_BYTES} ASCII characters), "
             "hold no '/' or '\\' and do not start with '.'")


def institution_name_problem(name: str) -> str | None:
    """Why ``name`` cannot be an institution name (it names a folder, a key, a ledger entry), or ``None``.

    The one rule for every entry point (the file stems of ``fedmdh run``, a config file, the service,
    the Python API, ``fedmdh predict --institution``): :data:`NAME_RULE`.
    """
    if not isinstance(name, str) or not name:
        return "it is empty"
    if name in (".", ".."):
        return f"{name!r} names a folder, not an institution"
    if name.startswith("."):
        return "it starts with '.' (a hidden file name)"
    if any(c in name for c in "/\\\0"):
        return "it holds a path separator"
    if not name.isprintable():
        return "it holds a control or other unprintable character"
    size = len(name.encode("utf-8", "surrogatepass"))
    if size > MAX_NAME_BYTES:
        return f"it is {len(name)} characters long" + (f", {size} bytes in UTF-8" if size != len(name) else "")
    return None


def check_institution_name(name: str, where: str = "",
                           hint: str = "rename the file (an institution's name is its file name without .csv)") -> str:
    """``name`` when it is an institution name (:func:`institution_name_problem`), else one line naming the
    problem; ``where`` (e.g. ``"A.csv: "``) prefixes it, ``hint`` says what to do."""
    problem = institution_name_problem(name)
    if problem is not None:
        shown = name if len(name) <= 40 else name[:37] + "..."
        raise InputError(f"{where}{shown!r} is not an institution name ({problem}): {NAME_RULE}; {hint}.")
    return name


def unique_names(paths: Sequence[str | Path]) -> list[str]:
    """Institution names from file stems, made unique with a numeric suffix where stems repeat.

    Each stem must be an institution name (:func:`check_institution_name`), checked here, where every
    entry point derives the names.
    """
    stems = [Path(p).stem for p in paths]
    for p, stem in zip(paths, stems):
        check_institution_name(stem, f"{p}: ")
    out: list[str] = []
    for i, s in enumerate(stems):
        if stems.count(s) > 1:
            out.append(f"{s}-{stems[:i + 1].count(s)}")
        else:
            out.append(s)
    return out


def check_exclude(exclude: Sequence[str], target: str, columns: dict[str, Sequence[str]],
                  flag: str = "--exclude") -> None:
    """Refuse an excluded column that is the target or that no table has (a typo would otherwise train on
    the column the user meant to leave out). ``columns``: each file's columns, by its path."""
    known = list(dict.fromkeys(c for cols in columns.values() for c in cols))
    for col in exclude:
        if col == target:
            raise InputError(f"{flag} {col!r}: is the target column; the target is never a feature, so leave it "
                             f"out of {flag}.")
        if col not in known:
            shown = ", ".join(repr(c) for c in known[:8]) + (f" and {len(known) - 8} more" if len(known) > 8 else "")
            raise InputError(f"{flag} {col!r}: no file has this column (columns: {shown}); check its spelling.")
