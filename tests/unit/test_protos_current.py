"""The generated stubs in twinkle_protocol/_proto are what scripts/gen_protos.py makes from protos/ now."""

from __future__ import annotations

import importlib.util
import pathlib

ROOT = pathlib.Path(__file__).resolve().parents[2]
STUBS = ROOT / "twinkle_protocol" / "_proto"


def _gen_protos():  # type: ignore[no-untyped-def]
    spec = importlib.util.spec_from_file_location("gen_protos", ROOT / "scripts" / "gen_protos.py")
    assert spec is not None and spec.loader is not None
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def test_generated_stubs_are_current(tmp_path: pathlib.Path) -> None:
    written = _gen_protos().generate(tmp_path)
    names = sorted(path.name for path in written)
    assert {"worker_pb2.py", "worker_pb2_grpc.py", "tensor_pb2.py", "__init__.py"} <= set(names)
    checked_in = sorted(path.name for path in STUBS.iterdir() if path.is_file() and path.suffix in (".py", ".pyi"))
    assert names == checked_in, "stub files differ from what gen_protos writes; run python scripts/gen_protos.py"
    stale = [name for name in names if (tmp_path / name).read_bytes() != (STUBS / name).read_bytes()]
    assert not stale, f"stale generated stubs {stale}: run python scripts/gen_protos.py and commit the result"
