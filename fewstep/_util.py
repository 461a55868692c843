"""Small helpers shared across subpackages."""

from __future__ import annotations

import difflib
from collections.abc import Iterable


def close_matches(name: str, choices: Iterable[str], n: int = 3) -> str:
    """``" (did you mean 'a', 'b'?)"`` for the choices closest to ``name``, or ``""``."""
    found = difflib.get_close_matches(str(name), list(choices), n=n, cutoff=0.5)
    return f" (did you mean {', '.join(repr(f) for f in found)}?)" if found else ""
