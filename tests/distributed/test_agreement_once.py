"""The agreement opens once per call: a nested agreed call (clip_grad_and_step's clip_grad_norm and
step) joins the vote of the call around it instead of casting one of its own, and a call refused on
one rank fails its peer with PEER_REFUSED while the mesh stays usable. Two real processes over gloo,
each with twinkle_worker.agreement.MeshAgreement as the model holds it."""

from __future__ import annotations

import pathlib
from typing import Any

import torch
import torch.distributed as dist
from dist_reference import run_ranks

from twinkle_protocol.errors import Aborted, InvalidArgument
from twinkle_worker.agreement import MeshAgreement

WORLD = 2


def _rank(rank: int, store: str, results: Any) -> None:
    """One rank: the scenarios below, in the same order on both ranks; reports what it saw."""
    dist.init_process_group("gloo", init_method=f"file://{store}", rank=rank, world_size=WORLD)
    try:
        agreement = MeshAgreement(rank, WORLD, torch.device("cpu"))
        seen: dict[str, Any] = {}
        # An agreed call that casts its vote, then calls another agreed method (which votes again if it opened its own).
        with agreement.call():
            seen["counts"] = agreement.agree(rank + 1, 10)
            with agreement.call():
                seen["inner"] = agreement.agree(rank + 1, 10)
        seen["nested_votes"] = agreement.votes_cast
        # Rank 1 refuses a call before its vote: rank 0 hears it in the vote; neither is left waiting.
        try:
            with agreement.call():
                if rank == 1:
                    raise InvalidArgument("adapter_name: refused on rank 1 only")
                agreement.agree()
        except (Aborted, InvalidArgument) as error:
            seen["refused"] = (type(error).__name__, getattr(error, "reason", None), str(error))
        with agreement.call():  # the mesh is intact: the next call runs on both ranks
            seen["after"] = agreement.agree(1)
        seen["broken"] = agreement.broken
        results.put((rank, seen))
    finally:
        dist.destroy_process_group()


def test_a_nested_agreed_call_joins_the_vote_and_a_refusal_fails_the_peer(tmp_path: pathlib.Path) -> None:
    seen = run_ranks(_rank, (str(tmp_path / "store"),), WORLD)
    for rank in range(WORLD):
        assert seen[rank]["counts"] == [3.0, 20.0]  # the sums over both ranks, from the one vote
        assert seen[rank]["inner"] is None  # the inner call cast no vote of its own
        assert seen[rank]["nested_votes"] == 1, "a nested agreed call opened a second vote"
        assert seen[rank]["after"] == [2.0, 0.0] and seen[rank]["broken"] is None
    kind, reason, message = seen[0]["refused"]
    assert (kind, reason) == ("Aborted", "PEER_REFUSED") and "rank(s) [1] refused this call" in message
    assert seen[1]["refused"][0] == "InvalidArgument"
