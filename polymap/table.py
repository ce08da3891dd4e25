"""The FeatureTable: one row per (run, step), stored as Parquet, written atomically.

Schema: key columns ``run`` (str), ``step`` (int), then ``seed``, ``model``, ``tokens``,
``status`` (``ok``, ``warning``, ``nonfinite``, ``failed``), ``error`` (the reason, or
empty), ``fingerprint`` and ``feature_sets`` (bookkeeping for incremental runs), then the
feature columns ``<set>.<feature>`` (float64).

:class:`FeatureStore` makes a sweep crash-safe: every finished row is first written as
its own small Parquet part file (write to a temporary name, then rename), and parts are
merged into the main file every so often and at the end (again temp + rename). A crash
at any moment loses at most the row being computed; the next run merges leftover parts.
A lock file keeps two sweeps from writing the same table at once.

>>> df = read_table("features.parquet")                       # doctest: +SKIP
>>> feature_columns(df)[:2]                                    # doctest: +SKIP
['hu2023.l1', 'hu2023.l2']
"""

from __future__ import annotations

import fcntl
import os
import uuid
from collections.abc import Iterable, Sequence
from pathlib import Path

import numpy as np
import pandas as pd

from polymap.atomic import write_parquet
from polymap.errors import PolymapError, UsageError

KEY_COLUMNS = ("run", "step")
META_COLUMNS = (
    "run",
    "step",
    "seed",
    "model",
    "tokens",
    "status",
    "error",
    "fingerprint",
    "feature_sets",
    "architecture",
)
STATUSES = ("ok", "warning", "nonfinite", "failed")


class TableError(PolymapError, ValueError):
    """A table that does not follow the FeatureTable schema."""


class TableLockedError(PolymapError, RuntimeError):
    """Another process is writing the same table."""


def feature_columns(df: pd.DataFrame) -> list[str]:
    """The ``<set>.<feature>`` columns of a table, in table order."""
    return [c for c in df.columns if c not in META_COLUMNS and "." in c]


MAX_STEP = 2**63  # steps are int64


def _bad(df: pd.DataFrame, column: str, bad: pd.Series, why: str) -> None:
    if bad.any():
        row = int(np.flatnonzero(bad.to_numpy())[0])
        raise TableError(
            f"column {column!r}: {why} ({int(bad.sum())} row(s); first: row {row}, "
            f"run {df['run'].iloc[row]!r}, {column} = {df[column].iloc[row]!r})"
        )


def _integers(df: pd.DataFrame, column: str) -> pd.Series:
    """``column`` as whole numbers (missing allowed); words or fractions are an error."""
    values = pd.to_numeric(df[column], errors="coerce")
    _bad(df, column, values.isna() & df[column].notna(), "not a number")
    _bad(df, column, (values != np.floor(values)) & values.notna(), "not a whole number")
    return values


def _check_keys(df: pd.DataFrame) -> None:
    """The key columns as the schema says, before any cast can hide a bad value: ``run``
    a non-empty string, ``step`` a whole number in [0, 2^63), ``status`` one of
    :data:`STATUSES` (or missing: ok). One line naming the column and the first bad row."""
    run = df["run"]
    _bad(df, "run", run.isna() | (run.astype(str).str.strip() == ""), "empty run name")
    raw = df["step"]
    if pd.api.types.is_unsigned_integer_dtype(raw.dtype):  # uint64 >= 2^63 would wrap
        _bad(df, "step", raw >= MAX_STEP, "beyond int64")
    step = pd.to_numeric(raw, errors="coerce")
    _bad(df, "step", step.isna(), "not a number (or missing)")
    _bad(df, "step", step != np.floor(step), "not a whole number")
    _bad(df, "step", (step < 0) | (step >= MAX_STEP), "outside 0 <= step < 2^63")
    status = df["status"]
    _bad(df, "status", status.notna() & ~status.astype(str).isin(STATUSES),
         f"not one of {STATUSES}")  # fmt: skip


def normalize(df: pd.DataFrame) -> pd.DataFrame:
    """Schema order and dtypes; raises :class:`TableError` on missing keys or duplicates."""
    missing = [c for c in KEY_COLUMNS if c not in df.columns]
    if missing:
        raise TableError(f"table lacks key column(s) {missing}")
    df = df.copy()
    for column in META_COLUMNS:
        if column not in df.columns:
            df[column] = pd.NA
    _check_keys(df)
    df["run"] = df["run"].astype(str)
    df["step"] = pd.to_numeric(df["step"]).astype("int64")
    for column in ("seed", "tokens"):
        df[column] = _integers(df, column).astype("Int64")
    for column in ("model", "status", "error", "fingerprint", "feature_sets", "architecture"):
        df[column] = df[column].astype("string")
    df["status"] = df["status"].fillna("ok")
    features = feature_columns(df)
    for column in features:
        df[column] = pd.to_numeric(df[column], errors="coerce").astype("float64")
    dup = df.duplicated(list(KEY_COLUMNS), keep=False)
    if dup.any():
        pairs = df.loc[dup, ["run", "step"]].drop_duplicates().head(5).values.tolist()
        raise TableError(f"duplicate (run, step) rows, e.g. {pairs}")
    df = df[list(META_COLUMNS) + features]
    return df.sort_values(["run", "step"], kind="stable").reset_index(drop=True)


def write_table(df: pd.DataFrame, path: str | os.PathLike) -> Path:
    """Write atomically: a reader sees the old file or the new one, never a partial one."""
    return write_parquet(normalize(df), path)


def read_table(path: str | os.PathLike) -> pd.DataFrame:
    """Read a FeatureTable (including rows still in part files of an interrupted sweep).

    A missing file is a :class:`TableError` (not an empty table); two rows of the file
    with the same (run, step) and different values are one too, naming them (rows of
    a resumed sweep's part files replace older ones: that is how a re-extracted
    checkpoint updates its row)."""
    store = FeatureStore(path)
    if not store.path.exists() and not store._part_files():
        raise TableError(f"{store.path}: no such file")
    try:
        return store.load()
    except TableError as err:  # name the file once
        if str(store.path) in str(err):
            raise
        raise TableError(f"{store.path}: {err}") from None


def as_table(table: pd.DataFrame | str | os.PathLike) -> pd.DataFrame:
    """A FeatureTable given as a DataFrame (returned as it is) or a path (read).

    Every API that takes a table takes either, through this function."""
    if isinstance(table, pd.DataFrame):
        return table
    return read_table(table)


def _check_duplicates(frame: pd.DataFrame, path: Path) -> pd.DataFrame:
    """Identical repeated rows are dropped; conflicting ones are an error."""
    if not set(KEY_COLUMNS) <= set(frame.columns):
        return frame
    keys = frame[list(KEY_COLUMNS)].duplicated(keep=False)
    if not keys.any():
        return frame
    repeated = frame[keys]
    distinct = repeated.astype(str).drop_duplicates()
    conflicts = distinct[distinct[list(KEY_COLUMNS)].duplicated(keep=False)]
    if len(conflicts):
        pairs = frame.loc[conflicts.index, list(KEY_COLUMNS)].drop_duplicates().head(3)
        pairs = pairs.values.tolist()
        raise TableError(
            f"{path}: {len(conflicts)} rows share a (run, step) with different values, e.g. "
            f"{pairs}; which one is right cannot be guessed - remove one of each"
        )
    return frame.drop_duplicates(list(KEY_COLUMNS), keep="first")


def _merge(frames: Iterable[pd.DataFrame]) -> pd.DataFrame:
    frames = [f for f in frames if len(f)]
    if not frames:
        return normalize(pd.DataFrame(columns=list(META_COLUMNS)))
    merged = pd.concat(frames, ignore_index=True, sort=False)
    merged = merged.drop_duplicates(list(KEY_COLUMNS), keep="last")
    return normalize(merged)


def merge_tables(tables: Sequence[pd.DataFrame], how: str = "outer") -> pd.DataFrame:
    """Join FeatureTables on (run, step), e.g. weight features with ``eval.*`` scores.

    Feature columns must not repeat across tables (a :class:`TableError` names them);
    ``seed``/``model``/``tokens`` are taken from the first table that has them, ``status``
    is the worst of the rows joined, ``error`` and ``feature_sets`` are combined.

    >>> a = pd.DataFrame({"run": ["r"], "step": [1], "hu2023.l2": [2.0]})
    >>> b = pd.DataFrame({"run": ["r"], "step": [1], "eval.piqa.acc": [0.6]})
    >>> merge_tables([a, b])[["run", "step", "hu2023.l2", "eval.piqa.acc"]].values.tolist()
    [['r', 1, 2.0, 0.6]]
    """
    if how not in ("outer", "inner", "left"):
        raise UsageError(f"how={how!r} is not one of outer, inner, left")
    tables = [normalize(t) for t in tables]
    if not tables:
        raise TableError("no tables to merge")
    seen: dict[str, int] = {}
    for index, table in enumerate(tables):
        clash = [c for c in feature_columns(table) if c in seen]
        if clash:
            raise TableError(
                f"table {index + 1} repeats feature column(s) {clash[:5]} of table "
                f"{seen[clash[0]] + 1}; drop them from one table first"
            )
        seen.update(dict.fromkeys(feature_columns(table), index))
    merged = tables[0]
    rank = {s: i for i, s in enumerate(STATUSES)}
    for table in tables[1:]:
        right = table.rename(columns={c: f"{c}\x00r" for c in META_COLUMNS[2:]})
        merged = merged.merge(right, on=list(KEY_COLUMNS), how=how)
        for column in ("seed", "model", "tokens"):
            merged[column] = merged[column].combine_first(merged.pop(f"{column}\x00r"))
        left_status = merged["status"].fillna("ok")
        right_status = merged.pop("status\x00r").fillna("ok")
        worse = right_status.map(rank).fillna(0) > left_status.map(rank).fillna(0)
        merged["status"] = left_status.where(~worse, right_status)
        for column, sep in (("error", "; "), ("fingerprint", "+"), ("feature_sets", ",")):
            other = merged.pop(f"{column}\x00r")
            merged[column] = [
                sep.join(str(v) for v in (a, b) if isinstance(v, str) and v) or None
                for a, b in zip(merged[column], other, strict=True)
            ]
    return normalize(merged).sort_values(list(KEY_COLUMNS), ignore_index=True)


class FeatureStore:
    """Incremental, crash-safe writer of one FeatureTable file (see module docs)."""

    def __init__(self, path: str | os.PathLike):
        self.path = Path(path)
        if self.path.exists() and self.path.is_dir():
            raise TableError(f"{self.path}: is a directory, expected a .parquet file path")
        self.parts = self.path.with_name(self.path.name + ".parts")
        self._lock_fh = None

    def _part_files(self) -> list[Path]:
        if not self.parts.is_dir():
            return []
        # a dot-name is a part still being written (polymap.atomic)
        return sorted(p for p in self.parts.glob("*.parquet") if not p.name.startswith("."))

    def load(self) -> pd.DataFrame:
        frames = []
        if self.path.exists():
            try:
                frames.append(_check_duplicates(pd.read_parquet(self.path), self.path))
            except TableError:
                raise
            except Exception as err:  # pyarrow raises several types
                raise TableError(f"{self.path}: unreadable Parquet ({err})") from err
        for part in self._part_files():
            try:
                frames.append(pd.read_parquet(part))
            except Exception:  # a part cut short by a crash before its rename cannot exist
                continue
        return _merge(frames)

    def append(self, row: dict) -> None:
        """Persist one row now (as a part file)."""
        self.parts.mkdir(parents=True, exist_ok=True)
        name = f"{len(self._part_files()):08d}-{uuid.uuid4().hex[:8]}.parquet"
        write_parquet(pd.DataFrame([row]), self.parts / name)

    def compact(self) -> pd.DataFrame:
        """Merge part files into the main file (atomically) and remove them."""
        parts = self._part_files()
        table = self.load()
        if parts or not self.path.exists():
            write_table(table, self.path)
        for part in parts:
            part.unlink(missing_ok=True)
        if self.parts.is_dir() and not any(self.parts.iterdir()):
            self.parts.rmdir()
        return table

    def lock(self) -> FeatureStore:
        """Take the table's lock or raise :class:`TableLockedError` naming the holder."""
        lock_path = self.path.with_name(self.path.name + ".lock")
        lock_path.parent.mkdir(parents=True, exist_ok=True)
        fh = open(lock_path, "a+")  # noqa: SIM115 (held open while the lock is held)
        try:
            fcntl.flock(fh, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            fh.seek(0)
            holder = fh.read().strip() or "another process"
            fh.close()
            raise TableLockedError(
                f"{self.path} is being written by {holder} (lock {lock_path}); "
                "wait for that sweep to finish"
            ) from None
        fh.seek(0)
        fh.truncate()
        fh.write(f"pid {os.getpid()}")
        fh.flush()
        self._lock_fh = fh
        return self

    def unlock(self) -> None:
        if self._lock_fh is not None:
            fcntl.flock(self._lock_fh, fcntl.LOCK_UN)
            self._lock_fh.close()
            self._lock_fh = None

    def __enter__(self) -> FeatureStore:
        return self.lock()

    def __exit__(self, *exc) -> None:
        self.unlock()
