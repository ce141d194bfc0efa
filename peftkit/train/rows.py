"""Read a data file into rows (dicts), each tagged with where it came from (`file:line`).

Accepted: JSON Lines (`.jsonl`), JSON (`.json`: a list of objects, or one object holding such a
list under a single key), CSV (`.csv`), Parquet (`.parquet`) and a folder written by
`datasets.Dataset.save_to_disk`. Errors name the file and line (or row index).
"""

from __future__ import annotations

import csv
import io
import json
import os
from dataclasses import dataclass
from typing import Any

from ..errors import UserError, require
from .inputs import read_text


class DataError(UserError):
    """Bad training/eval data; the message names the file and the line or row."""


@dataclass(frozen=True)
class Row:
    data: dict[str, Any]
    where: str  # "path:line" or "path: row i"


def read_rows(path: str) -> list[Row]:
    if not os.path.exists(path):
        raise DataError(f"{path}: no such file or folder")
    if os.path.isdir(path):
        rows = _read_datasets_dir(path)
    else:
        ext = os.path.splitext(path)[1].lower()
        readers = {".jsonl": _read_jsonl, ".json": _read_json, ".csv": _read_csv,
                   ".parquet": _read_parquet}
        if ext not in readers:
            raise DataError(f"{path}: unknown file type {ext!r}; use .jsonl, .json, .csv, "
                            ".parquet or a saved `datasets` folder")
        rows = readers[ext](path)
    if not rows:
        raise DataError(f"{path}: the dataset is empty (no rows)")
    for row in rows:
        if not isinstance(row.data, dict):
            raise DataError(f"{row.where}: expected a JSON object, got {type(row.data).__name__}")
    return rows


def _read_jsonl(path: str) -> list[Row]:
    rows = []
    for number, line in enumerate(read_text(path, "data").split("\n"), 1):
        if not line.strip():
            continue
        try:
            rows.append(Row(json.loads(line), f"{path}:{number}"))
        except json.JSONDecodeError as err:
            raise DataError(f"{path}:{number}: malformed JSON ({err.msg} at column "
                            f"{err.colno})") from None
    return rows


def _read_json(path: str) -> list[Row]:
    try:
        data = json.loads(read_text(path, "data"))
    except json.JSONDecodeError as err:
        raise DataError(f"{path}:{err.lineno}: malformed JSON ({err.msg} at column "
                        f"{err.colno})") from None
    if isinstance(data, dict) and len(data) == 1 and isinstance(next(iter(data.values())), list):
        data = next(iter(data.values()))
    if not isinstance(data, list):
        raise DataError(f"{path}: expected a list of objects (or JSON Lines in a .jsonl file)")
    return [Row(item, f"{path}: row {i}") for i, item in enumerate(data)]


def _read_csv(path: str) -> list[Row]:
    rows = []
    reader = csv.DictReader(io.StringIO(read_text(path, "data"), newline=""))
    for record in reader:
        where = f"{path}:{reader.line_num}"
        if None in record or any(v is None for v in record.values()):
            raise DataError(f"{where}: malformed CSV row (its number of fields differs "
                            f"from the header's {len(reader.fieldnames or [])})")
        rows.append(Row(record, where))
    return rows


def _read_parquet(path: str) -> list[Row]:
    Dataset = require("datasets", "train", "Reading .parquet data").Dataset
    return [Row(r, f"{path}: row {i}") for i, r in enumerate(Dataset.from_parquet(path))]


def _read_datasets_dir(path: str) -> list[Row]:
    datasets = require("datasets", "train", "Reading a saved `datasets` folder")
    try:
        ds = datasets.load_from_disk(path)
    except FileNotFoundError as err:
        raise DataError(f"{path}: not a folder written by datasets' save_to_disk ({err})") from None
    if isinstance(ds, datasets.DatasetDict):
        if "train" not in ds:
            raise DataError(f"{path}: a DatasetDict without a 'train' split ({list(ds)})")
        ds = ds["train"]
    return [Row(r, f"{path}: row {i}") for i, r in enumerate(ds)]
