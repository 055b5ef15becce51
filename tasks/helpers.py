"""Public helpers for dataset adapters: the same functions the built-in adapters use (``mtlbench.tasks.helpers``).

A simple dataset plugin needs three of them (the README's "Dataset plugins" section has a complete example):
:func:`data_file` (find a file under the data directory, verify its hash, download it once), :func:`read_csv`
(a CSV as numpy columns) and :func:`from_arrays` (numpy arrays -> a validated :class:`~mtlbench.MultiTaskData`
with a seeded, grouped or stratified split, training-set vocabularies and standardisation). The lower-level
pieces below are public too, for adapters that need more control.

- **Where files are.** An adapter gets ``data_dir`` (``--data-dir``, else ``$MTLBENCH_DATA_DIR``) and looks for each
  source file at ``<data_dir>/<relpath>``, then at ``<cache>/downloads/<relpath>`` (where downloads land, because a
  data directory may be read-only). ``<cache>`` is ``$MTLBENCH_CACHE_DIR``, default ``~/.cache/mtlbench``.
- **Verification.** A file with a pinned sha256 is refused (one line naming it) unless its hash matches; a gzip
  file may instead match a pinned hash of its decompressed content (a re-compressed copy of the same bytes). The
  content is hashed at least once per process: the memo lives in this process only (keyed by path, size and mtime),
  because a memo on disk keyed by metadata would let a file with flipped bytes of the same size and mtime pass.
- **Downloads.** A missing file with a public URL is downloaded into ``<cache>/downloads`` (streamed to a temporary
  file, verified against the pinned hash, then moved into place), unless ``$MTLBENCH_OFFLINE`` is ``1``. When it
  cannot be had, the error names the file, where to put it and the URL (or how to get it, for login-only data).
- **Reading.** CSV and Parquet files go through HF ``datasets`` (``load_dataset("csv" | "parquet",
  cache_dir=<cache>/hf)``), which converts them once to a memory-mapped Arrow cache; columns then become numpy
  arrays column by column (no per-row Python).
- **Processed tensors.** :func:`cached_tensors` keys the split tensors, schema and info by the adapter's name,
  version, options and the sha256 of every source file, and stores them with ``torch.save`` under
  ``<cache>/tensors``; a second load with the same key only reads that file. A corrupt cache file is rebuilt.
- **Splits.** :func:`hash_order` gives a permutation from a splitmix64 hash of (key, split seed): it depends on no
  library's random stream, so a fixed split seed gives the same split on every machine and version, whatever the
  run seed. :func:`split_rows` builds train/val/test from it: random rows, whole groups (a subject never straddles
  two splits) or per stratum (every task gets its share of rows in every split).
- **Features.** Categorical vocabularies come from the training split only (sorted values get ids 1..K, anything
  else the out-of-vocabulary id 0: :func:`encode_categorical`); dense columns are standardised with training
  statistics (:func:`standardise`).
"""
from __future__ import annotations

import contextlib
import gzip
import hashlib
import json
import os
import tempfile
import urllib.request
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable, Iterator, Sequence

import numpy as np
import torch

from mtlbench.data import CategoricalField, FeatureSchema, MultiTaskData, Split, TaskSpec
from mtlbench.errors import MtlbenchError

DATA_DIR_ENV = "MTLBENCH_DATA_DIR"
CACHE_DIR_ENV = "MTLBENCH_CACHE_DIR"
OFFLINE_ENV = "MTLBENCH_OFFLINE"
CACHE_FORMAT = "1"  # bump when the layout of the cached payload changes
DOWNLOAD_TIMEOUT_S = 60


class HashMismatch(MtlbenchError):
    """A file whose sha256 differs from the pinned one: it is refused, never read."""


@dataclass(frozen=True)
class SourceFile:
    """A file an adapter reads: its place under the data directory, how it is verified and where it comes from."""

    relpath: str                      # under the data directory, e.g. "census_income/census-income.test.gz"
    sha256: str | None = None         # pinned sha256 of the file (None: not pinned)
    content_sha256: str | None = None  # pinned sha256 of the decompressed content of a .gz file, accepted as well
    url: str | None = None            # public download URL (None: the user must supply the file)
    how_to_get: str = ""              # a short hint for files that cannot be downloaded

    @property
    def name(self) -> str:
        return Path(self.relpath).name


# ------------------------------------------------------------------------------------------------- places

def cache_dir() -> Path:
    """``$MTLBENCH_CACHE_DIR``, default ``~/.cache/mtlbench``."""
    env = os.environ.get(CACHE_DIR_ENV)
    return Path(env).expanduser() if env else Path.home() / ".cache" / "mtlbench"


def resolve_data_dir(given: str | os.PathLike | None) -> Path | None:
    """The adapter's ``data_dir``, else ``$MTLBENCH_DATA_DIR``, else None (only downloads are searched)."""
    value = given if given else os.environ.get(DATA_DIR_ENV)
    return Path(value).expanduser() if value else None


def offline() -> bool:
    return os.environ.get(OFFLINE_ENV, "").strip().lower() in ("1", "true", "yes", "on")


def _where(data_dir: Path | None, relpath: str) -> str:
    return str(data_dir / relpath) if data_dir is not None else f"<data-dir>/{relpath}"


@dataclass(frozen=True)
class Located:
    path: Path
    sha256: str


def locate(dataset: str, files: Sequence[SourceFile], data_dir: Path | None) -> dict[str, Located]:
    """Find (or download) every file and verify its pinned hash; returns ``relpath -> (path, sha256)``.

    All missing files are named in one line, with where to put them and how to get them.
    """
    found: dict[str, Located] = {}
    missing: list[str] = []
    hints: list[str] = []
    for f in files:
        candidates = ([data_dir / f.relpath] if data_dir is not None else []) + [cache_dir() / "downloads" / f.relpath]
        path = next((p for p in candidates if p.is_file()), None)
        failure = ""
        if path is None and f.url:
            if offline():
                failure = f"not downloaded: ${OFFLINE_ENV} is set"
            else:
                try:
                    path = download(f.url, candidates[-1], f)
                except HashMismatch as exc:
                    raise HashMismatch(f"{dataset}: {exc}") from exc
                except MtlbenchError as exc:
                    failure = str(exc)
        if path is None:
            missing.append(f"{f.name} (put it at {_where(data_dir, f.relpath)}"
                           + (f"; download URL: {f.url}" if f.url and f.url not in failure else "")
                           + (f"; {failure}" if failure else "") + ")")
            if f.how_to_get and f.how_to_get not in hints:
                hints.append(f.how_to_get)
            continue
        found[f.relpath] = Located(path, verify(dataset, path, f))
    if missing:
        if data_dir is None:
            where = f"; no data directory was given: pass --data-dir or set ${DATA_DIR_ENV}"
        else:
            where = "" if data_dir.is_dir() else f"; the data directory {data_dir} does not exist"
        raise MtlbenchError(f"{dataset}: missing file(s) {', '.join(missing)}{where}"
                            + "".join(f"; {h}" for h in hints))
    return found


# ------------------------------------------------------------------------------------------------- hashes

def _sha256_stream(chunks: Iterator[bytes]) -> str:
    h = hashlib.sha256()
    for c in chunks:
        h.update(c)
    return h.hexdigest()


def _read_chunks(fh, size: int = 1 << 20) -> Iterator[bytes]:
    while True:
        block = fh.read(size)
        if not block:
            return
        yield block


# Hashes computed in this process, keyed by (path, size, mtime): never persisted, so every process reads the bytes of
# each file it verifies at least once (a same-size edit that keeps the mtime cannot pass on a stale memo).
_HASHED: dict[str, str] = {}


def _atomic_write_bytes(path: Path, data: bytes) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
    try:
        with os.fdopen(fd, "wb") as fh:
            fh.write(data)
        os.replace(tmp, path)
    except BaseException:
        with contextlib.suppress(OSError):
            os.unlink(tmp)
        raise


def _gunzip_sha256(path: Path) -> str:
    """sha256 of the decompressed bytes of a gzip file ("" if it is not valid gzip)."""
    try:
        with gzip.open(path, "rb") as fh:
            return _sha256_stream(_read_chunks(fh))
    except (OSError, EOFError, gzip.BadGzipFile):
        return ""


def sha256_file(path: Path, content: bool = False) -> str:
    """sha256 of a file (``content``: of its gzip-decompressed bytes), hashed once per process."""
    path = Path(path)
    st = path.stat()
    key = f"{'gunzip:' if content else ''}{path.resolve()}|{st.st_size}|{st.st_mtime_ns}"
    if key in _HASHED:
        return _HASHED[key]
    if content:
        digest = _gunzip_sha256(path)
    else:
        try:
            with open(path, "rb") as fh:
                digest = _sha256_stream(_read_chunks(fh))
        except OSError as exc:
            raise MtlbenchError(f"cannot read {path}: {exc}") from exc
    _HASHED[key] = digest
    return digest


def verify(dataset: str, path: Path, f: SourceFile) -> str:
    """The file's sha256; a file whose hash differs from the pinned one is refused in one line."""
    digest = sha256_file(path)
    if f.sha256 is None or digest == f.sha256:
        return digest
    if f.content_sha256 is not None and sha256_file(path, content=True) == f.content_sha256:
        return digest
    raise HashMismatch(f"{dataset}: hash mismatch for {path}: sha256 {digest}, expected {f.sha256}"
                        + (f" (or decompressed content {f.content_sha256})" if f.content_sha256 else "")
                        + "; the file is corrupt or a different version: delete or replace it"
                        + (f" (source: {f.url})" if f.url else ""))


def download(url: str, dest: Path, f: SourceFile | None = None) -> Path:
    """Stream ``url`` to ``dest`` through a temporary file; with a pinned hash, refuse a different file."""
    dest = Path(dest)
    dest.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=dest.parent, prefix=f".{dest.name}.", suffix=".part")
    try:
        h = hashlib.sha256()
        with os.fdopen(fd, "wb") as out:
            try:
                with urllib.request.urlopen(url, timeout=DOWNLOAD_TIMEOUT_S) as resp:
                    for block in _read_chunks(resp):
                        h.update(block)
                        out.write(block)
            except (OSError, ValueError) as exc:  # URLError is an OSError
                reason = getattr(exc, "reason", None) or exc
                raise MtlbenchError(f"download from {url} failed: {reason}") from exc
        digest = h.hexdigest()
        if f is not None and f.sha256 is not None and digest != f.sha256:
            ok = f.content_sha256 is not None and _gunzip_sha256(Path(tmp)) == f.content_sha256
            if not ok:
                raise HashMismatch(f"hash mismatch for {f.name} downloaded from {url}: sha256 {digest}, expected "
                                    f"{f.sha256}; the download was discarded")
        os.replace(tmp, dest)
        return dest
    finally:
        with contextlib.suppress(OSError):
            os.unlink(tmp)


# ------------------------------------------------------------------------------------------------- reading

@contextlib.contextmanager
def _quiet_datasets() -> Iterator[Any]:
    import datasets
    from datasets.utils import logging as ds_logging

    was_enabled = ds_logging.is_progress_bar_enabled()
    level = ds_logging.get_verbosity()
    ds_logging.disable_progress_bar()
    ds_logging.set_verbosity(ds_logging.CRITICAL)  # a parse error is reported by read_table, in one line
    try:
        yield datasets
    finally:
        ds_logging.set_verbosity(level)
        if was_enabled:
            ds_logging.enable_progress_bar()


def first_line(path: Path) -> str:
    """The first line of a (possibly gzip-compressed) text file, without its line ending."""
    opener = gzip.open if str(path).endswith(".gz") else open
    try:
        with opener(path, "rt", encoding="utf-8", errors="replace", newline="") as fh:
            return fh.readline().rstrip("\r\n")
    except (OSError, EOFError) as exc:
        raise MtlbenchError(f"cannot read {path}: {exc}") from exc


def check_header(dataset: str, path: Path, expected: Sequence[str], layout: str) -> list[str]:
    """The CSV header of ``path``; a header that lacks or adds columns is refused, naming them."""
    header = [c.strip().strip('"') for c in first_line(path).split(",")]
    missing = [c for c in expected if c not in header]
    unexpected = [c for c in header if c not in expected]
    dup = sorted({c for c in header if header.count(c) > 1})
    if missing or unexpected or dup:
        parts = []
        if missing:
            parts.append("missing column(s) " + _short_list(missing))
        if unexpected:
            parts.append("unexpected column(s) " + _short_list(unexpected))
        if dup:
            parts.append("duplicated column(s) " + _short_list(dup))
        raise MtlbenchError(f"{dataset}: {path} does not have the {layout} layout: {'; '.join(parts)} "
                            f"(expected {len(expected)} columns: {_short_list(expected, 8)})")
    return header


def _short_list(items: Sequence[str], keep: int = 12) -> str:
    items = list(items)
    return ", ".join(items) if len(items) <= keep else ", ".join(items[:keep]) + f", ... ({len(items)} in all)"


def read_table(dataset: str, path: Path, kind: str = "csv", sha256: str | None = None, **kwargs: Any):
    """Read a CSV or Parquet file through HF ``datasets``; a pyarrow Table (memory-mapped Arrow).

    The Arrow cache lives under ``<cache>/hf/<sha256 prefix>``: HF keys its cache by path and modification time,
    the extra level keys it by content as well.
    """
    sub = (sha256 or sha256_file(path))[:16]
    with _quiet_datasets() as datasets:
        try:
            ds = datasets.load_dataset(kind, data_files=str(path), split="train",
                                       cache_dir=str(cache_dir() / "hf" / sub), **kwargs)
        except Exception as exc:  # parse errors of any kind: one line naming the file and the root cause
            root: BaseException = exc
            while root.__cause__ is not None:
                root = root.__cause__
            detail = " ".join(str(root).split())[:300]
            raise MtlbenchError(f"{dataset}: cannot parse {path} as {kind}: {type(root).__name__}: {detail}") from exc
    return ds.data.table


def column_numpy(table, name: str, dtype: Any = None) -> np.ndarray:
    arr = table.column(name).to_numpy()
    return arr if dtype is None else arr.astype(dtype, copy=False)


# ------------------------------------------------------------------------------------------------- processing

_M1, _M2, _GOLD = np.uint64(0xBF58476D1CE4E5B9), np.uint64(0x94D049BB133111EB), np.uint64(0x9E3779B97F4A7C15)


def mix64(x: np.ndarray) -> np.ndarray:
    """splitmix64 finaliser, vectorised over a uint64 array."""
    with np.errstate(over="ignore"):
        x = x.astype(np.uint64) + _GOLD
        x = (x ^ (x >> np.uint64(30))) * _M1
        x = (x ^ (x >> np.uint64(27))) * _M2
        return x ^ (x >> np.uint64(31))


def hash_uniform(keys: np.ndarray, seed: int) -> np.ndarray:
    """A uniform number in [0, 1) per key, a fixed function of (key, seed) (no library random stream)."""
    s = mix64(np.array([seed & 0xFFFFFFFFFFFFFFFF], dtype=np.uint64))[0]
    h = mix64(keys.astype(np.int64).view(np.uint64) ^ s)
    return (h >> np.uint64(11)).astype(np.float64) / float(1 << 53)


def hash_order(n: int, seed: int) -> np.ndarray:
    """A permutation of ``range(n)``: rows sorted by the hash of (row index, seed)."""
    return np.argsort(hash_uniform(np.arange(n, dtype=np.int64), seed), kind="stable")


def subsample(n: int, max_rows: int | None, seed: int) -> np.ndarray:
    """Row indices kept under ``max_rows``: a fixed seeded subset, in file order (all rows when None)."""
    if max_rows is None or max_rows >= n:
        return np.arange(n)
    return np.sort(hash_order(n, seed)[:max_rows])


def dictionary_codes(column) -> tuple[np.ndarray, np.ndarray]:
    """A pyarrow column as (distinct values, int64 code per row), dictionary-encoded in Arrow (no Python per row)."""
    enc = column.combine_chunks().dictionary_encode() if hasattr(column, "combine_chunks") else \
        column.dictionary_encode()
    values = enc.dictionary.to_numpy(zero_copy_only=False)
    if values.dtype == object:
        values = values.astype(str)
    return values, enc.indices.to_numpy(zero_copy_only=False).astype(np.int64)


def encode_categorical(parts: Sequence[tuple[np.ndarray, np.ndarray]]) -> tuple[int, list[np.ndarray]]:
    """Ids from the training split's vocabulary; ``parts`` is ``[(values, codes)]`` per split, train first
    (``values[codes]`` are the split's raw values, see :func:`dictionary_codes`).

    The training split's distinct values, sorted, get ids 1..K; any other value gets 0 (OOV). Returns
    ``(vocab_size = K + 1, [ids per split])``. Only the (small) dictionaries are searched; rows are gathered.
    """
    train_values, train_codes = parts[0]
    vocab = np.unique(train_values[np.unique(train_codes)]) if len(train_codes) else train_values[:0]
    out = []
    for values, codes in parts:
        if len(vocab) == 0 or len(values) == 0:
            out.append(np.zeros(len(codes), dtype=np.int64))
            continue
        pos = np.minimum(np.searchsorted(vocab, values), len(vocab) - 1)
        to_id = np.where(vocab[pos] == values, pos + 1, 0).astype(np.int64)
        out.append(to_id[codes])
    return len(vocab) + 1, out


def standardise(train: np.ndarray, *others: np.ndarray) -> list[np.ndarray]:
    """(x - mean) / std per column with the training split's statistics (computed in float64), as float32.

    One column at a time, so a large matrix is never copied to float64 whole; float32 inputs are overwritten in
    place. A constant column is only centred.
    """
    arrays = (train, *others)
    outs = [x if x.dtype == np.float32 else np.empty(x.shape, dtype=np.float32) for x in arrays]
    for j in range(train.shape[1]):
        col = train[:, j].astype(np.float64)
        mean = float(col.mean()) if len(col) else 0.0
        std = float(col.std()) if len(col) else 1.0
        std = std if std > 0 else 1.0
        for x, o in zip(arrays, outs):
            o[:, j] = (x[:, j].astype(np.float64) - mean) / std
    return outs


Part = tuple[Any, np.ndarray]  # (pyarrow table, row indices) of one split


def categorical_matrix(parts: Sequence[Part], columns: Sequence[str]) -> tuple[list[int], list[np.ndarray]]:
    """int64 ``[N, F]`` per split, vocabularies from the first (training) split; returns (vocab sizes, matrices)."""
    mats = [np.zeros((len(idx), len(columns)), dtype=np.int64) for _, idx in parts]
    sizes: list[int] = []
    coded: dict[tuple[int, str], tuple[np.ndarray, np.ndarray]] = {}
    for j, c in enumerate(columns):
        split_codes = []
        for table, idx in parts:
            k = (id(table), c)
            if k not in coded:
                coded[k] = dictionary_codes(table.column(c))
            values, codes = coded[k]
            split_codes.append((values, codes[idx]))
        size, ids = encode_categorical(split_codes)
        sizes.append(size)
        for m, v in zip(mats, ids):
            m[:, j] = v
        for table, _ in parts:  # free this column's codes
            coded.pop((id(table), c), None)
    return sizes, mats


def dense_matrix(parts: Sequence[Part], columns: Sequence[str]) -> list[np.ndarray]:
    """float32 ``[N, D]`` per split, standardised with the first (training) split's statistics."""
    mats = [np.empty((len(idx), len(columns)), dtype=np.float32) for _, idx in parts]
    for j, c in enumerate(columns):
        for (table, idx), m in zip(parts, mats):
            m[:, j] = column_numpy(table, c, np.float64)[idx]
    return standardise(*mats) if columns else mats


def binary_column(dataset: str, table, name: str, path: Path) -> np.ndarray:
    """A 0/1 label column as bool; any other value is refused in one line."""
    x = column_numpy(table, name)
    bad = np.unique(x[(x != 0) & (x != 1)])
    if len(bad):
        raise MtlbenchError(f"{dataset}: {path} has non-binary value(s) {', '.join(map(str, bad[:5]))} in label "
                            f"column '{name}' (valid: 0, 1)")
    return x.astype(bool)


def read_layout_csv(dataset: str, path: Path, columns: Sequence[str], floats: Sequence[str], layout: str,
                    sha256: str | None = None):
    """A headered CSV whose columns must be exactly ``columns`` (in any order; ``floats`` are read as float64, the
    others as int64): the header is checked first (naming missing and unexpected columns), then the file is read
    through HF ``datasets`` with those types."""
    from datasets import Features, Value

    header = check_header(dataset, path, columns, layout)
    fl = set(floats)
    return read_table(dataset, path, "csv", sha256,
                      features=Features({c: Value("float64" if c in fl else "int64") for c in header}))


def check_nonempty(dataset: str, sizes: dict[str, int], why: str) -> None:
    """One line naming the empty split(s) and why, instead of an engine-level error later."""
    empty = [s for s, n in sizes.items() if n == 0]
    if empty:
        raise MtlbenchError(f"{dataset}: the {', '.join(empty)} split{'s are' if len(empty) > 1 else ' is'} empty "
                            f"{why} (rows per split: {', '.join(f'{k} {v}' for k, v in sizes.items())})")


def to_tensors(categorical: np.ndarray, dense: np.ndarray, labels: np.ndarray,
               masks: np.ndarray) -> dict[str, torch.Tensor]:
    return {"categorical": torch.from_numpy(np.ascontiguousarray(categorical, dtype=np.int64)),
            "dense": torch.from_numpy(np.ascontiguousarray(dense, dtype=np.float32)),
            "labels": torch.from_numpy(np.ascontiguousarray(labels, dtype=np.float32)),
            "masks": torch.from_numpy(np.ascontiguousarray(masks, dtype=bool))}


def source_info(files: Sequence[SourceFile], found: dict[str, Located]) -> dict[str, Any]:
    """Provenance for the run record: each file's place under the data directory, its sha256 and whether that
    hash is pinned (no machine-specific paths)."""
    return {f.relpath: {"sha256": found[f.relpath].sha256, "pinned": f.sha256 is not None} for f in files}


# ------------------------------------------------------------------------------------------------- tensor cache

Payload = dict[str, Any]


def payload(splits: dict[str, dict[str, torch.Tensor]], schema: FeatureSchema, info: dict[str, Any]) -> Payload:
    return {"format": CACHE_FORMAT, "splits": splits,
            "schema": {"categorical": [[f.name, int(f.vocab_size)] for f in schema.categorical],
                       "dense": list(schema.dense)},
            "info": info}


def unpack(p: Payload) -> tuple[dict[str, Split], FeatureSchema, dict[str, Any]]:
    schema = FeatureSchema(categorical=tuple(CategoricalField(n, int(v)) for n, v in p["schema"]["categorical"]),
                           dense=tuple(p["schema"]["dense"]))
    return {s: Split(dict(t)) for s, t in p["splits"].items()}, schema, dict(p["info"])


def cache_key(dataset: str, version: str, options: dict[str, Any], sources: dict[str, str]) -> str:
    blob = json.dumps({"dataset": dataset, "version": version, "format": CACHE_FORMAT, "options": options,
                       "sources": sources}, sort_keys=True, default=str)
    return hashlib.sha256(blob.encode()).hexdigest()


def cached_tensors(dataset: str, version: str, options: dict[str, Any], sources: dict[str, str],
                   build: Callable[[], Payload]) -> tuple[Payload, bool]:
    """The processed payload for this key: read from ``<cache>/tensors`` if there, else built and stored.

    Returns ``(payload, hit)``. An unreadable cache file is rebuilt; a cache directory that cannot be written
    only costs the speed-up.
    """
    key = cache_key(dataset, version, options, sources)
    path = cache_dir() / "tensors" / f"{dataset}-{key[:24]}.pt"
    if path.is_file():
        try:
            p = torch.load(path, map_location="cpu", weights_only=True)
            if isinstance(p, dict) and p.get("format") == CACHE_FORMAT and p.get("key") == key:
                return p, True
        except Exception:  # a truncated or foreign file: rebuild it
            pass
    p = build()
    p["key"] = key
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
        fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
        os.close(fd)
        try:
            torch.save(p, tmp)
            os.replace(tmp, path)
        finally:
            with contextlib.suppress(OSError):
                os.unlink(tmp)
    except OSError:
        pass
    return p, False


# ------------------------------------------------------------------------------------------------- simple adapters

def data_file(dataset: str, relpath: str, data_dir: str | os.PathLike | None, sha256: str | None = None,
              url: str | None = None, how_to_get: str = "") -> Path:
    """One source file: ``<data_dir>/<relpath>`` (``data_dir`` is the adapter's, else ``$MTLBENCH_DATA_DIR``), else
    the download cache, else downloaded from ``url`` into the cache. With ``sha256`` a different file is refused.
    A missing file is one line naming where to put it and how to get it (``how_to_get``)."""
    f = SourceFile(relpath, sha256=sha256, url=url, how_to_get=how_to_get)
    return locate(dataset, [f], resolve_data_dir(data_dir))[relpath].path


def read_csv(dataset: str, path: str | os.PathLike, **kwargs: Any) -> dict[str, np.ndarray]:
    """A headered CSV file as ``{column: numpy array}`` (numbers as numbers, text as str), read through HF
    ``datasets`` (a memory-mapped Arrow cache keyed by the file's content); ``kwargs`` go to its CSV reader."""
    path = Path(path)
    table = read_table(dataset, path, "csv", **kwargs)
    out = {}
    for name in table.column_names:
        arr = table.column(name).to_numpy()
        out[name] = arr.astype(str) if arr.dtype == object else arr
    return out


SPLIT_FRACTIONS = (0.7, 0.15, 0.15)


def _group_keys(values: np.ndarray) -> np.ndarray:
    """A stable int64 key per value: the value itself for integers, else the first 8 bytes of its blake2b hash
    (one Python call per *distinct* value, never per row)."""
    if np.issubdtype(values.dtype, np.integer) or values.dtype == bool:
        return values.astype(np.int64)
    return np.array([int.from_bytes(hashlib.blake2b(str(v).encode(), digest_size=8).digest(), "little",
                                    signed=True) for v in values.tolist()], dtype=np.int64)


def split_rows(n: int, fractions: Sequence[float] = SPLIT_FRACTIONS, seed: int = 0, groups: Any = None,
               stratify: Any = None, max_rows: int | None = None) -> dict[str, np.ndarray]:
    """Fixed train/val/test row indices (each sorted) for ``n`` rows, from ``seed`` alone (see :func:`hash_order`).

    - default: rows in hash order, of which only the first ``max_rows`` are kept when given (a fixed seeded subset
      for quick runs); of those ``m`` rows the first ``int(f_train * m)`` train, up to ``int((f_train + f_val) *
      m)`` val, the rest test;
    - ``groups`` (one value per row, e.g. a subject or a search id): whole groups in hash order of their value, a
      group going to the split in which its middle row falls by cumulative row count, so no group straddles two
      splits and the fractions hold by rows (as nearly as whole groups allow);
    - ``stratify`` (one value per row, e.g. the task a row is labelled for): the default rule applied within each
      stratum, so every stratum has its share in every split (a stratum needs enough rows for a share to be
      non-empty: ``int(0.15 * 7) = 1``).
    """
    fr = tuple(float(f) for f in fractions)
    if len(fr) != 3 or any(f < 0 for f in fr) or abs(sum(fr) - 1.0) > 1e-9 or fr[0] <= 0:
        raise MtlbenchError(f"split fractions must be three non-negative numbers (train, val, test) summing to 1 "
                            f"with a positive train share; got {fractions}")
    if groups is not None and stratify is not None:
        raise MtlbenchError("split_rows: give groups (keep each group in one split) or stratify (split each stratum), "
                            "not both")
    names = ("train", "val", "test")
    if groups is None and stratify is None:
        order = hash_order(n, seed)
        if max_rows is not None:
            order = order[:max_rows]
        m = len(order)
        a, b = int(fr[0] * m), int((fr[0] + fr[1]) * m)
        return {s: np.sort(order[lo:hi]) for s, (lo, hi) in zip(names, ((0, a), (a, b), (b, m)))}
    if max_rows is not None:
        raise MtlbenchError("split_rows: max_rows applies to the plain row split only, not with groups or stratify")
    col = np.asarray(groups if groups is not None else stratify)
    if col.shape != (n,):
        raise MtlbenchError(f"split_rows: {'groups' if groups is not None else 'stratify'} has shape "
                            f"{list(col.shape)}; expected one value per row, [{n}]")
    values, inverse = np.unique(col, return_inverse=True)
    inverse = inverse.reshape(-1)
    which = np.empty(n, dtype=np.int64)
    if groups is not None:
        g_order = np.argsort(hash_uniform(_group_keys(values), seed), kind="stable")
        sizes = np.bincount(inverse, minlength=len(values))[g_order]
        middle = np.cumsum(sizes) - sizes / 2.0  # the row position of each group's middle, in group order
        g_split = np.where(middle < fr[0] * n, 0, np.where(middle < (fr[0] + fr[1]) * n, 1, 2))
        split_of_group = np.empty(len(values), dtype=np.int64)
        split_of_group[g_order] = g_split
        which = split_of_group[inverse]
    else:
        u = hash_uniform(np.arange(n, dtype=np.int64), seed)
        order = np.lexsort((u, inverse))  # by stratum, then hash
        counts = np.bincount(inverse, minlength=len(values))
        starts = np.cumsum(counts) - counts
        rank = np.empty(n, dtype=np.int64)
        rank[order] = np.arange(n) - starts[inverse[order]]
        size = counts[inverse]
        a = (fr[0] * size).astype(np.int64)
        b = ((fr[0] + fr[1]) * size).astype(np.int64)
        which = np.where(rank < a, 0, np.where(rank < b, 1, 2))
    return {s: np.flatnonzero(which == k) for k, s in enumerate(names)}


DEFAULT_METRICS = {"binary": ("auc", "logloss"), "regression": ("rmse", "r2"), "multiclass": ("accuracy", "logloss")}


def _columns(dataset: str, x: Any, what: str, prefix: str,
             n: int | None) -> tuple[tuple[str, ...], list[np.ndarray]]:
    """(names, 1-D columns) from a ``{name: [N]}`` mapping or an ``[N, K]`` array (names ``<prefix>0..``)."""
    if isinstance(x, dict):
        names, cols = tuple(str(k) for k in x), [np.asarray(v) for v in x.values()]
    else:
        arr = np.asarray(x)
        if arr.ndim == 1:
            arr = arr[:, None]
        if arr.ndim != 2:
            raise MtlbenchError(f"{dataset}: {what} has shape {list(arr.shape)}; expected [N, K] or a mapping "
                                f"name -> [N]")
        names, cols = tuple(f"{prefix}{j}" for j in range(arr.shape[1])), [arr[:, j] for j in range(arr.shape[1])]
    for name, c in zip(names, cols):
        if c.ndim != 1 or (n is not None and len(c) != n):
            raise MtlbenchError(f"{dataset}: {what} column '{name}' has shape {list(c.shape)}; expected "
                                f"[{n if n is not None else 'N'}] (one value per row, as many rows as the labels)")
    return names, cols


def from_arrays(name: str, labels: Any, *, tasks: Sequence[str] | Sequence[TaskSpec] | None = None,
                kinds: str | Sequence[str] | dict[str, str] = "regression",
                metrics: dict[str, Sequence[str]] | None = None, masks: Any = None, categorical: Any = None,
                dense: Any = None, split: Any = None, groups: Any = None, stratify: Any = None,
                fractions: Sequence[float] = SPLIT_FRACTIONS, split_seed: int = 0, standardise_dense: bool = True,
                standardise_labels: bool | Sequence[str] = False, version: str = "1",
                info: dict[str, Any] | None = None) -> MultiTaskData:
    """A validated :class:`MultiTaskData` from numpy arrays (or anything ``np.asarray`` takes), one row per example.

    - ``labels``: ``[N, T]`` (task names from ``tasks``) or ``{task: [N]}``. NaN marks a missing label (its mask is
      False and 0 is stored); bool labels become 0/1.
    - ``tasks``: task names, or full :class:`TaskSpec` objects (then ``kinds``/``metrics`` are not needed);
      ``kinds``: one kind for every task, one per task, or ``{task: kind}`` (binary, regression, multiclass; a
      multiclass task's class count is ``max label + 1``); ``metrics``: ``{task: metric names}`` where the default
      (``DEFAULT_METRICS``) does not fit, the first being the primary one.
    - ``masks``: optional bool ``[N, T]``, False where a label is undefined (combined with the NaN rule).
    - ``categorical``: ``{field: [N]}`` or ``[N, F]`` raw values (strings or numbers); vocabularies come from the
      training split (sorted values -> ids 1..K, unseen -> 0). ``dense``: ``{column: [N]}`` or ``[N, D]`` numbers,
      standardised with training statistics unless ``standardise_dense=False``.
    - the split: ``split`` = a split name per row (``"train"``/``"val"``/``"test"``) or ``{split: row indices}``;
      else :func:`split_rows` with ``fractions`` and ``split_seed``, by ``groups`` or ``stratify`` if given.
    - ``standardise_labels``: True (every regression task) or task names: labels z-scored with training
      statistics; metrics are still reported in the original units (:meth:`MultiTaskData.standardise_labels`).
    - ``version`` and ``info`` (provenance stored in every run record).
    """
    if isinstance(labels, dict):
        if tasks is not None:
            raise MtlbenchError(f"{name}: labels is a mapping task -> column, so tasks= is not needed")
        task_names, label_cols = _columns(name, labels, "labels", "y", None)
        lengths = {t: len(c) for t, c in zip(task_names, label_cols)}
        if len(set(lengths.values())) > 1:
            raise MtlbenchError(f"{name}: label columns differ in length: " + _short_list(
                [f"{t} {k}" for t, k in lengths.items()]))
        y = np.stack([c.astype(np.float64) for c in label_cols], axis=1) if label_cols else np.zeros((0, 0))
    else:
        y = np.asarray(labels)
        if y.ndim == 1:
            y = y[:, None]
        if y.ndim != 2:
            raise MtlbenchError(f"{name}: labels has shape {list(y.shape)}; expected [N, T] or a mapping task -> [N]")
        y = y.astype(np.float64)
        if tasks is None:
            raise MtlbenchError(f"{name}: name the {y.shape[1]} label column(s) with tasks=[...]")
        task_names = tuple(t.name if isinstance(t, TaskSpec) else str(t) for t in tasks)
        if len(task_names) != y.shape[1]:
            raise MtlbenchError(f"{name}: {len(task_names)} task name(s) for {y.shape[1]} label column(s)")
    n, n_tasks = y.shape
    if n == 0:
        raise MtlbenchError(f"{name}: no rows")
    m = ~np.isnan(y)
    if masks is not None:
        given = np.asarray(masks)
        if given.shape != (n, n_tasks):
            raise MtlbenchError(f"{name}: masks has shape {list(given.shape)}; expected [{n}, {n_tasks}] like labels")
        m &= given.astype(bool)
    y = np.where(m, y, 0.0)

    # task specs
    if tasks is not None and all(isinstance(t, TaskSpec) for t in tasks):
        specs = tuple(tasks)  # type: ignore[arg-type]
    else:
        if isinstance(kinds, str):
            kind_of = {t: kinds for t in task_names}
        elif isinstance(kinds, dict):
            missing = [t for t in task_names if t not in kinds]
            if missing:
                raise MtlbenchError(f"{name}: kinds= lacks task(s) {_short_list(missing)}")
            kind_of = dict(kinds)
        else:
            if len(kinds) != n_tasks:
                raise MtlbenchError(f"{name}: {len(kinds)} kind(s) for {n_tasks} task(s)")
            kind_of = dict(zip(task_names, kinds))
        specs_list = []
        for j, t in enumerate(task_names):
            k = kind_of[t]
            if k not in DEFAULT_METRICS:
                raise MtlbenchError(f"{name}: task '{t}' has kind {k!r}; valid: {', '.join(DEFAULT_METRICS)}")
            n_classes = int(y[m[:, j], j].max()) + 1 if k == "multiclass" and m[:, j].any() else 1
            specs_list.append(TaskSpec(t, k, tuple((metrics or {}).get(t, DEFAULT_METRICS[k])),  # type: ignore
                                       n_classes=n_classes))
        specs = tuple(specs_list)

    # split
    if split is None:
        parts = split_rows(n, fractions, split_seed, groups=groups, stratify=stratify)
        rule = (f"{'/'.join(f'{f:g}' for f in fractions)} of rows"
                + (" by group" if groups is not None else " within each stratum" if stratify is not None else "")
                + f", fixed hash order from split_seed {split_seed}")
    elif isinstance(split, dict):
        parts = {s: np.sort(np.asarray(split.get(s, []), dtype=np.int64)) for s in ("train", "val", "test")}
        unknown_splits = [s for s in split if s not in parts]
        if unknown_splits:
            raise MtlbenchError(f"{name}: unknown split(s) {', '.join(map(str, unknown_splits))} (valid: train, val, "
                                f"test)")
        rule = "given row indices"
    else:
        per_row = np.asarray(split).astype(str)
        if per_row.shape != (n,):
            raise MtlbenchError(f"{name}: split has shape {list(per_row.shape)}; expected one split name per row [{n}]")
        bad = sorted(set(np.unique(per_row).tolist()) - {"train", "val", "test"})
        if bad:
            raise MtlbenchError(f"{name}: split holds {', '.join(map(repr, bad[:5]))}; valid: train, val, test")
        parts = {s: np.flatnonzero(per_row == s) for s in ("train", "val", "test")}
        rule = "given split per row"
    check_nonempty(name, {s: len(i) for s, i in parts.items()}, "")
    names = ("train", "val", "test")

    # features
    cat_names, cat_cols = _columns(name, categorical, "categorical", "c", n) if categorical is not None else ((), [])
    dense_names, dense_cols = _columns(name, dense, "dense", "x", n) if dense is not None else ((), [])
    cat = {s: np.zeros((len(parts[s]), len(cat_cols)), dtype=np.int64) for s in names}
    vocab = []
    for j, col in enumerate(cat_cols):
        values, codes = np.unique(col.astype(str) if col.dtype == object else col, return_inverse=True)
        codes = codes.reshape(-1)
        size, ids = encode_categorical([(values, codes[parts[s]]) for s in names])
        vocab.append(size)
        for s, v in zip(names, ids):
            cat[s][:, j] = v
    if dense_cols:
        try:
            raw = np.stack([c.astype(np.float64) for c in dense_cols], axis=1)
        except (TypeError, ValueError) as exc:
            raise MtlbenchError(f"{name}: dense features must be numbers ({exc}); put text columns in categorical=")
        mats = [raw[parts[s]] for s in names]
        dense_mats = standardise(*mats) if standardise_dense else [x.astype(np.float32) for x in mats]
    else:
        dense_mats = [np.zeros((len(parts[s]), 0), dtype=np.float32) for s in names]
    splits = {s: Split(to_tensors(cat[s], d, y[parts[s]], m[parts[s]])) for s, d in zip(names, dense_mats)}
    schema = FeatureSchema(categorical=tuple(CategoricalField(c, v) for c, v in zip(cat_names, vocab)),
                           dense=dense_names)
    data = MultiTaskData(name, version, schema, specs, splits, {"split": rule, **(info or {})}).validate()
    if standardise_labels:
        data = data.standardise_labels(None if standardise_labels is True else list(standardise_labels))
        data._validated = True
    return data
