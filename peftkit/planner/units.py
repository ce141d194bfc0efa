"""Byte sizes: parsing `--gpu 24GB` and printing GiB."""

from __future__ import annotations

import re

GIB = 1024**3
# GPU makers' memory "GB" are binary: a "24 GB" card holds 24 GiB. So K/M/G/T(B) read as 2^10n.
_UNITS = {"": 1, "b": 1, "k": 1024, "m": 1024**2, "g": GIB, "t": 1024**4}


def parse_size(text: str) -> int:
    """Bytes in `text`: `24GB`, `24GiB`, `24G` (all 24 * 2^30), `512MB`, `25769803776`."""
    m = re.fullmatch(r"\s*([0-9]*\.?[0-9]+)\s*([kmgt]?)(i?b)?\s*", str(text).lower())
    if m is None or (m.group(3) == "ib" and not m.group(2)) or float(m.group(1)) <= 0:
        raise ValueError(
            f"cannot read the memory size {text!r}; write a number and a unit, such as 24GB, "
            f"24GiB, 80G or 512MB (GPU memory units are binary: 24GB = 24 GiB)"
        )
    return int(float(m.group(1)) * _UNITS[m.group(2)])


def gib(nbytes: float) -> str:
    return f"{nbytes / GIB:.2f} GiB"
