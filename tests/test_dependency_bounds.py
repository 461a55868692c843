"""pyproject.toml's lower bounds are the versions CI's second job tests (scripts/oldest-constraints.txt)."""

from __future__ import annotations

import re
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
UNTESTED_EXTRAS = {"xformers"}  # optional extras neither CI job installs


def _name(s: str) -> str:
    return re.sub(r"[-_.]+", "-", s).lower()


def _lower_bounds() -> dict[str, str]:
    """{distribution: version} for every `name>=version` of the runtime and dev dependencies."""
    text = (ROOT / "pyproject.toml").read_text()
    text = text[text.index("\n[project]"):text.index("\n[project.scripts]")]  # not the build backend's requires
    out = {}
    for m in re.finditer(r'^\s*(?:(\w+)\s*=\s*\[)?\s*"([A-Za-z0-9_.-]+)>=([0-9][^",;<]*)"', text, re.M):
        extra, name, version = m.groups()
        if extra not in UNTESTED_EXTRAS:
            out[_name(name)] = version.strip()
    return out


def _pins() -> dict[str, str]:
    out = {}
    for line in (ROOT / "scripts" / "oldest-constraints.txt").read_text().splitlines():
        line = line.split("#", 1)[0].strip()
        if line:
            name, version = line.split("==")
            out[_name(name)] = version.strip()
    return out


def test_every_lower_bound_is_the_pinned_oldest_version():
    bounds, pins = _lower_bounds(), _pins()
    assert {"torch", "diffusers", "numpy", "transformers", "pytest"} <= bounds.keys()
    assert "xformers" not in bounds
    assert {k: pins.get(k) for k in bounds} == bounds
