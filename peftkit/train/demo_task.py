"""The bundled demo task: turn a written date into a "ledger code" (`March 5, 2021` ->
`2021.03.05`), as chat rows. The name of the format tells an untrained model nothing, so its exact
match starts near 0; the mapping (month name -> number, zero padding, reordering) is learnt from a
few hundred examples. Rows are generated from a seed, so every run gets the same files.

    python -m peftkit.train.demo_task OUT_DIR   # writes OUT_DIR/train.jsonl and test.jsonl
"""

from __future__ import annotations

import calendar
import datetime
import json
import os
import random
import sys

MONTHS = list(calendar.month_name)[1:]


def rows(n: int, seed: int) -> list[dict]:
    rng = random.Random(seed)
    out = []
    for _ in range(n):
        day = datetime.date(1950, 1, 1) + datetime.timedelta(days=rng.randrange(365 * 100))
        written = f"{MONTHS[day.month - 1]} {day.day}, {day.year}"
        out.append({"messages": [
            {"role": "user", "content": f"Ledger code for {written}?"},
            {"role": "assistant", "content": f"{day.year}.{day.month:02d}.{day.day:02d}"},
        ]})
    return out


def write(out_dir: str, n_train: int = 400, n_test: int = 100, seed: int = 0) -> tuple[str, str]:
    """Write train.jsonl and test.jsonl (disjoint seeds) into `out_dir`; return their paths."""
    os.makedirs(out_dir, exist_ok=True)
    paths = []
    for name, n, s in (("train", n_train, seed), ("test", n_test, seed + 1)):
        path = os.path.join(out_dir, f"{name}.jsonl")
        with open(path, "w", encoding="utf-8") as fh:
            fh.writelines(json.dumps(r) + "\n" for r in rows(n, s))
        paths.append(path)
    return paths[0], paths[1]


if __name__ == "__main__":
    print("\n".join(write(sys.argv[1] if len(sys.argv) > 1 else "demo_data")))
