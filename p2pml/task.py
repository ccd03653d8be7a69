"""The task a network predicts: its rows, read the same way on every node, and its identity.

A task is a built-in dataset (scikit-learn ships them: no download) or a CSV file. Every node
turns it into the same rows, bit for bit, and the genesis holds what identifies it (kind,
feature names, classes, the Merkle root of its rows: ``ledger.Task``), so messages never cross
between tasks. docs/ledger.md gives the exact rules; in short:

- **Feature names**: lower-case, units in parentheses dropped, every run of other characters
  than a-z and 0-9 made one ``_`` (``"sepal length (cm)"`` -> ``sepal_length``).
- **CSV**: UTF-8 with a header row. A cell that is empty or ``NA`` is missing, and a row with
  a missing cell is left out. A column is a number if every cell is one (a decimal literal),
  else categorical: its categories sorted by code point, each one's code its index (0, 1, ...).
  The target of a classification: its classes sorted (numerically if all are numbers), the
  class index the label; of a regression: a number.
- **Rows root**: RFC 6962's Merkle tree hash over the rows in file order, each leaf the
  row's features as big-endian IEEE float64 followed by its target (class index as a
  big-endian int64, or value as a float64).
- **Split**: the held-out rows are ``TEST_FRACTION`` of them, drawn by scikit-learn's
  ``train_test_split`` with ``SPLIT_SEED`` (stratified by class for a classification).
"""

from __future__ import annotations

import csv
import hashlib
import io
import math
import re
import struct
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from p2pml.ledger import BPS, CLASSIFICATION, IRIS, REGRESSION, VALUE_ONE, Task

BUILTINS = {"iris": CLASSIFICATION, "wine": CLASSIFICATION, "breast_cancer": CLASSIFICATION,
            "digits": CLASSIFICATION, "diabetes": REGRESSION}
SPLIT_SEED = 0
TEST_FRACTION = 0.3
FEATURE_LIMIT = 10**9  # |feature| at most this in a query (Iris: 0-100 cm)
MAX_CSV_BYTES = 64 * 1024 * 1024
MISSING = ("", "NA")
# Regression defaults: a vote agrees within max(band_bps x |consensus|, tolerance) of it; the
# tolerance is the training targets' standard deviation over TOLERANCE_DIVISOR.
DEFAULT_BAND_BPS = 1_000
TOLERANCE_DIVISOR = 2

_NUMBER = re.compile(r"[+-]?(\d+\.?\d*|\.\d+)([eE][+-]?\d+)?", re.ASCII)


class TaskError(ValueError):
    """A [task] that cannot be used; the message names what is wrong."""


@dataclass(frozen=True, slots=True)
class TaskSource:
    """The [task] table of a peers file, as given (paths resolved against the file's folder)."""

    dataset: str | None = None
    csv: str | None = None
    target: str | None = None
    sha256: str | None = None
    kind: str | None = None
    band_bps: int | None = None
    tolerance: float | None = None  # in the target's own unit

    def describe(self) -> dict:
        """What a model-training child needs to load the same task (JSON)."""
        return {k: getattr(self, k) for k in self.__slots__ if getattr(self, k) is not None}


@dataclass(frozen=True)
class TaskData:
    spec: Task
    x: np.ndarray  # float64 rows in file order
    y: np.ndarray  # class index (int64) or value (float64)

    def split(self) -> tuple[np.ndarray, np.ndarray, np.ndarray, np.ndarray]:
        """(x_train, x_test, y_train, y_test): the same split on every node."""
        from sklearn.model_selection import train_test_split

        stratify = self.y if self.spec.kind == CLASSIFICATION else None
        return train_test_split(self.x, self.y, test_size=TEST_FRACTION, random_state=SPLIT_SEED,
                                stratify=stratify)

    def held_out(self) -> tuple[np.ndarray, np.ndarray]:
        """Rows no member trained on, with their truth."""
        _, x_test, _, y_test = self.split()
        return x_test, y_test


def feature_name(raw: str) -> str:
    """A column's name as queries give it (see the module docstring)."""
    return re.sub(r"[^a-z0-9]+", "_", re.sub(r"\([^)]*\)", "", raw).lower()).strip("_")


def _leaf(row: np.ndarray, target, regression: bool) -> bytes:
    return struct.pack(f">{len(row)}d", *row) + (struct.pack(">d", target) if regression
                                                 else struct.pack(">q", int(target)))


def merkle_root(leaves: list[bytes]) -> bytes:
    """RFC 6962 Merkle tree hash: leaves as SHA-256(0x00 || leaf), nodes as
    SHA-256(0x01 || left || right), split at the largest power of two below the count."""
    if not leaves:
        return hashlib.sha256(b"").digest()
    level = [hashlib.sha256(b"\x00" + leaf).digest() for leaf in leaves]

    def tree(lo: int, hi: int) -> bytes:
        if hi - lo == 1:
            return level[lo]
        k = 1 << ((hi - lo - 1).bit_length() - 1)
        return hashlib.sha256(b"\x01" + tree(lo, lo + k) + tree(lo + k, hi)).digest()
    return tree(0, len(level))


def rows_root(x: np.ndarray, y: np.ndarray, regression: bool) -> bytes:
    return merkle_root([_leaf(row, t, regression) for row, t in zip(x, y)])


def _builtin(name: str) -> tuple[list[str], tuple[str, ...], np.ndarray, np.ndarray]:
    from sklearn import datasets

    data = getattr(datasets, f"load_{name}")()
    names = [str(n) for n in data.feature_names]
    classes = tuple(str(c) for c in getattr(data, "target_names", ())) if BUILTINS[name] == CLASSIFICATION else ()
    y = data.target.astype(np.int64 if classes else np.float64)
    return names, classes, np.ascontiguousarray(data.data, dtype=np.float64), y


def _is_number(text: str) -> bool:
    return bool(_NUMBER.fullmatch(text))


def _class_names(values: list[str]) -> tuple[str, ...]:
    distinct = set(values)
    if all(_is_number(v) for v in distinct):
        by_value = {}
        for v in distinct:  # "1" and "1.0" are one class
            f = float(v)
            by_value.setdefault(f, v if not f.is_integer() else str(int(f)))
        return tuple(by_value[f] for f in sorted(by_value))
    return tuple(sorted(distinct))


def _read_csv(path: Path, target: str, kind: str, where: str):
    data = path.read_bytes()
    try:
        text = data.decode("utf-8-sig")
    except UnicodeDecodeError as exc:
        raise TaskError(f"{where}: {path} is not UTF-8 text ({exc})") from None
    reader = csv.reader(io.StringIO(text, newline=""))
    try:
        header = next(reader)
        table = [r for r in reader if r]
    except (StopIteration, csv.Error) as exc:
        raise TaskError(f"{where}: {path} is not a CSV file with a header row ({exc or 'empty'})") from None
    header = [h.strip() for h in header]
    if target not in header:
        raise TaskError(f"{where}: {path} has no column {target!r} (columns: {', '.join(header)})")
    for i, r in enumerate(table):
        if len(r) != len(header):
            raise TaskError(f"{where}: {path} line {i + 2} has {len(r)} cells; the header has {len(header)}")
    rows = [[c.strip() for c in r] for r in table if not any(c.strip() in MISSING for c in r)]
    if len(rows) < 10:
        raise TaskError(f"{where}: {path} has {len(rows)} complete rows; a task needs at least 10")
    t = header.index(target)
    columns = [i for i in range(len(header)) if i != t]
    if not columns:
        raise TaskError(f"{where}: {path} has no feature column besides the target")
    x = np.empty((len(rows), len(columns)), dtype=np.float64)
    categories = []
    for j, i in enumerate(columns):
        cells = [r[i] for r in rows]
        if all(_is_number(c) for c in cells):
            x[:, j] = [float(c) for c in cells]
            categories.append(())
        else:
            names = tuple(sorted(set(cells)))
            code = {c: float(n) for n, c in enumerate(names)}
            x[:, j] = [code[c] for c in cells]
            categories.append(names)
    labels = [r[t] for r in rows]
    if kind == REGRESSION:
        bad = next((v for v in labels if not _is_number(v)), None)
        if bad is not None:
            raise TaskError(f"{where}: a regression target must be a number; column {target!r} has {bad!r}")
        y, classes = np.array([float(v) for v in labels], dtype=np.float64), ()
    else:
        classes = _class_names(labels)
        if len(classes) < 2:
            raise TaskError(f"{where}: column {target!r} has {len(classes)} class; a classification needs 2 or more")
        index = {c: n for n, c in enumerate(classes)}
        numeric = all(_is_number(v) for v in labels)
        key = (lambda v: _class_names([v])[0]) if numeric else (lambda v: v)
        y = np.array([index[key(v)] for v in labels], dtype=np.int64)
    names = [header[i] for i in columns]
    if not any(categories):
        categories = []
    return names, classes, x, y, tuple(categories)


def _tolerance(y_train: np.ndarray) -> int:
    """The training targets' standard deviation over TOLERANCE_DIVISOR, in VALUE_ONE units,
    computed in integers (the same on every machine)."""
    values = [int(v) for v in np.rint(y_train * VALUE_ONE)]
    n = len(values)
    mean = sum(values) // n
    return math.isqrt(sum((v - mean) ** 2 for v in values) // n) // TOLERANCE_DIVISOR


def load(source: TaskSource | None, where: str = "[task]") -> TaskData:
    """The task's rows and its genesis spec; raises TaskError naming what is wrong."""
    if source is None:
        source = TaskSource(dataset="iris")
    categories: tuple = ()
    if source.dataset is not None:
        if source.dataset not in BUILTINS:
            raise TaskError(f"{where}: dataset {source.dataset!r} is not built in; choose one of "
                            f"{', '.join(BUILTINS)}, or give csv = \"PATH\"")
        kind = BUILTINS[source.dataset]
        if source.kind is not None and source.kind != kind:
            raise TaskError(f"{where}: dataset {source.dataset!r} is a {kind} task, not {source.kind}")
        raw_names, classes, x, y = _builtin(source.dataset)
        name = source.dataset
    else:
        path = Path(source.csv)
        try:
            digest = hashlib.sha256(path.read_bytes()).hexdigest()
        except OSError as exc:
            raise TaskError(f"{where}: cannot read csv {path}: {exc.strerror or exc}") from None
        if digest != source.sha256.lower():
            raise TaskError(f"{where}: {path} has SHA-256 {digest}, not the {source.sha256} the "
                            f"peers file gives: another file than the network's")
        kind = source.kind
        raw_names, classes, x, y, categories = _read_csv(path, source.target, kind, where)
        name = path.name
    names = tuple(feature_name(n) for n in raw_names)
    for raw, n in zip(raw_names, names):
        if not n or n == "features":
            raise TaskError(f"{where}: column {raw!r} gives the feature name {n!r}, which a query cannot use")
    dup = sorted({n for n in names if names.count(n) > 1})
    if dup:
        raise TaskError(f"{where}: two columns give the feature name {dup[0]!r}; rename one")
    if np.abs(x).max() > FEATURE_LIMIT:
        raise TaskError(f"{where}: a feature value is beyond +-{FEATURE_LIMIT:g}")
    regression = kind == REGRESSION
    band_bps = tolerance = 0
    data = TaskData(Task(name, kind, names, classes), x, y)
    if regression:
        band_bps = DEFAULT_BAND_BPS if source.band_bps is None else source.band_bps
        if not 0 <= band_bps <= BPS:
            raise TaskError(f"{where}: band_bps must be in [0, {BPS}], got {band_bps}")
        if source.tolerance is None:
            tolerance = _tolerance(data.split()[2])
        else:
            tolerance = int(round(source.tolerance * VALUE_ONE))
    elif source.band_bps is not None or source.tolerance is not None:
        raise TaskError(f"{where}: band_bps and tolerance are for regression tasks")
    feature_range = (0, 100) if name == "iris" and source.dataset else (-FEATURE_LIMIT, FEATURE_LIMIT)
    spec = Task(name, kind, names, classes, len(x), rows_root(x, y, regression), categories,
                feature_range, band_bps, tolerance)
    if source.dataset == "iris":
        assert spec == IRIS, "the built-in Iris differs from ledger.IRIS"  # tested
    return TaskData(spec, x, y)


_LOADED: dict = {}


def cached(source: TaskSource | None) -> TaskData:
    """``load``, once per process and source."""
    if source not in _LOADED:
        _LOADED[source] = load(source)
    return _LOADED[source]
