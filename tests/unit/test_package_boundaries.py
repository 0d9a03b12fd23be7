"""Who imports whom: twinkle_protocol imports neither side; the worker and the client import the
protocol, not each other (docs/design.md, "Pieces"). The exceptions are named here, with why."""

from __future__ import annotations

import ast
import pathlib

import pytest

ROOT = pathlib.Path(__file__).resolve().parents[2]
# twinkle-launch starts local workers with the client's embedded launcher.
ALLOWED = {"twinkle_worker/launch.py": {"twinkle_client"}}


def imported_packages(path: pathlib.Path, top_level: bool = False) -> set[str]:
    """The top-level packages a module imports: anywhere in it, or only at module level (not lazily)."""
    tree = ast.parse(path.read_text())
    found = set()
    for node in tree.body if top_level else ast.walk(tree):
        if isinstance(node, ast.Import):
            found.update(alias.name.split(".")[0] for alias in node.names)
        elif isinstance(node, ast.ImportFrom) and node.module and node.level == 0:
            found.add(node.module.split(".")[0])
    return found


@pytest.mark.parametrize(
    ("package", "forbidden"),
    [
        ("twinkle_protocol", {"twinkle_client", "twinkle_worker", "twinkle_tinker"}),
        ("twinkle_worker", {"twinkle_client", "twinkle_tinker"}),
        ("twinkle_client", {"twinkle_worker", "twinkle_tinker"}),
    ],
)
def test_a_package_imports_only_what_its_side_may(package: str, forbidden: set[str]) -> None:
    crossings = {}
    for path in sorted((ROOT / package).rglob("*.py")):
        relative = path.relative_to(ROOT).as_posix()
        if "/_proto/" in relative:
            continue
        bad = (imported_packages(path) & forbidden) - ALLOWED.get(relative, set())
        if bad:
            crossings[relative] = sorted(bad)
    assert not crossings, f"{package} imports across the boundary: {crossings}"


def test_the_protocol_loads_without_torch() -> None:
    """torch only where a caller hands it torch tensors (imported inside those functions)."""
    heavy = {"torch", "transformers", "peft", "accelerate"}
    eager = {
        path.relative_to(ROOT).as_posix(): sorted(imported_packages(path, top_level=True) & heavy)
        for path in (ROOT / "twinkle_protocol").glob("*.py")
    }
    assert not {path: names for path, names in eager.items() if names}
