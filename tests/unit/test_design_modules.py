"""docs/design.md's "Pieces" lists every module of the four packages, each under its own path."""

from __future__ import annotations

import pathlib
import re

ROOT = pathlib.Path(__file__).resolve().parents[2]
PACKAGES = ("twinkle_protocol", "twinkle_client", "twinkle_worker", "twinkle_tinker")


def pieces() -> str:
    text = (ROOT / "docs" / "design.md").read_text()
    return text[text.index("## Pieces") : text.index("## Numerics")]


def listed(section: str) -> set[str]:
    """Paths named in the first column: `pkg/a.py`, `pkg/b.py` or, after a full path, `b.py` of the same folder."""
    names: set[str] = set()
    for row in section.splitlines():
        if not row.startswith("| `"):
            continue
        folder = ""
        for path in re.findall(r"`([^`]+)`", row.split(" | ")[0]):
            if "/" in path:
                folder = path.rsplit("/", 1)[0] if path.endswith(".py") else path.rstrip("/")
                names.add(path.rstrip("/"))
            elif folder:
                names.add(f"{folder}/{path}")
    return names


def modules() -> set[str]:
    found = set()
    for package in PACKAGES:
        for path in (ROOT / package).rglob("*.py"):
            relative = path.relative_to(ROOT).as_posix()
            if "/_proto/" not in relative:
                found.add(relative)
    return found


def test_every_module_has_its_line() -> None:
    missing = sorted(modules() - listed(pieces()))
    assert not missing, f"docs/design.md's Pieces leaves out: {missing}"


def test_every_listed_module_exists() -> None:
    gone = sorted(path for path in listed(pieces()) if path.endswith(".py") and not (ROOT / path).exists())
    assert not gone, f"docs/design.md's Pieces names modules that are not there: {gone}"


def test_the_design_points_at_nothing_outside_the_repository() -> None:
    assert "../" not in (ROOT / "docs" / "design.md").read_text()
