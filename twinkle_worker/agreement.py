"""The ranks' agreement before a call's collectives (`agreed_call`, `MeshAgreement`) and the one rule
for a collective that fails: the mesh is broken and the call is ABORTED. Used by twinkle_worker.model."""

from __future__ import annotations

import contextlib
import functools
import logging
from collections.abc import Iterator
from contextlib import contextmanager
from typing import Any

import torch
import torch.distributed as dist

from twinkle_protocol.errors import Aborted, TwinkleError
from twinkle_worker import strategies

log = logging.getLogger(__name__)

# The attribute agreed_call sets on the methods it wraps (agreed_rpcs reads it).
AGREED = "__twinkle_agreed_call__"
# The words of every error of a failed collective (metrics counts the calls answered with them).
COLLECTIVE_FAILED = "a collective with the other ranks failed"
# Markers of a failed collective in a RuntimeError's text (gloo and NCCL raise plain RuntimeErrors).
COLLECTIVE_FAILURE_MARKERS = ("Gloo", "gloo", "NCCL", "Connection closed", "Timed out")


def agreed_call(method: Any) -> Any:
    """Marks a method that runs collectives. On a mesh of several ranks, every rank says whether
    it passed its checks (strategies.agree) before the first collective or state change, so a
    call refused on one rank (bad input, unknown name) fails on every rank at once, with no
    state changed and no rank left waiting in a collective until the process-group timeout.
    The class's `agreement()` opens the scope (see MeshAgreement.call).
    """

    @functools.wraps(method)
    def wrapper(self: Any, *args: Any, **kwargs: Any) -> Any:
        with self.agreement():
            return method(self, *args, **kwargs)

    setattr(wrapper, AGREED, True)
    return wrapper


def agreed_rpcs(cls: type) -> tuple[str, ...]:
    """The RPC names (forward_backward -> ForwardBackward) of the methods of `cls` marked with agreed_call,
    sorted: the requests whose checks the servicer runs inside the call's agreement."""
    names = [name for name in dir(cls) if getattr(getattr(cls, name, None), AGREED, False)]
    return tuple(sorted("".join(part.capitalize() for part in name.split("_")) for name in names))


def peer_refused(refused: list[int], what: str) -> Aborted:
    """The error of a rank that passed its checks when other ranks refused the call: "not run", PEER_REFUSED."""
    return Aborted(
        f"not run: rank(s) {refused} {what} and the mesh is intact",
        reason="PEER_REFUSED",
        ranks=",".join(map(str, refused)),
    )


class MeshAgreement:
    """One rank's side of the agreement: the vote of the call in progress, and whether the mesh is broken.
    All ranks must open the same calls in the same order."""

    def __init__(self, rank: int, world_size: int, device: torch.device) -> None:
        self.rank = rank
        self.world_size = world_size
        self.device = device
        self.vote: str | None = None  # None: no call open; "pending": not cast yet; "cast"
        self.votes_cast = 0  # how many votes this rank took part in (one per agreed call at most)
        # Set when a failure may have left a rank inside a collective: every later call is refused
        # with Aborted until Reset and Init (the ranks can no longer be trusted to pair collectives).
        self.broken: str | None = None

    @property
    def pending(self) -> bool:
        """A call is open and its vote not cast yet."""
        return self.vote == "pending"

    @contextmanager
    def call(self) -> Iterator[None]:
        """The scope of one call that may run collectives (see agreed_call). The servicer opens it
        around decoding a rank's own slice too, so a slice that cannot even be decoded is agreed on."""
        self.check_not_broken()
        if self.world_size == 1 or self.vote is not None:  # one rank, or nested in another agreed call
            yield
            return
        self.vote = "pending"
        try:
            try:
                yield
            except BaseException:
                if self.pending:
                    with contextlib.suppress(Aborted):  # the peers are gone too; this rank's own error says more
                        self.cast_vote(False)
                raise
            self.agree()
        finally:
            self.vote = None

    def agree(self, *counts: int) -> list[float] | None:
        """This rank passed its checks: hear from the others before any collective or state change.

        The vote can carry this rank's counts; returns their sums over the ranks when this call
        cast the vote, None when there is no vote (one rank) or it was cast earlier in the call.
        """
        if self.pending:
            return self.cast_vote(True, *counts)
        return None

    def cast_vote(self, ok: bool, *counts: int) -> list[float]:
        self.vote = "cast"
        refused, total = self.poll("", ok, *counts)
        if ok and refused:
            raise peer_refused(refused, "refused this call before any collective (see their error); nothing changed")
        return total

    def poll(self, what: str, ok: bool, *counts: int) -> tuple[list[int], list[float]]:
        """strategies.agree: the ranks that refused, and the sums of the counts; a failed collective breaks the mesh."""
        self.votes_cast += 1
        try:
            return strategies.agree(ok, self.device, *counts)
        except (RuntimeError, dist.DistBackendError) as error:
            raise self.collective_failed(what, error) from error

    def poll_as_vote(self, what: str, ok: bool, *counts: int) -> tuple[list[int], list[float]]:
        """A poll that is also the call's vote when that is still to be cast (the call deferred it:
        twinkle_worker.backward.vote_after_backward). A rank that refused the call casts its no in the
        same one collective (all polls and votes are the same all_gather), so the ranks stay paired."""
        if self.pending:
            self.vote = "cast"
        return self.poll(what, ok, *counts)

    def confirm(self, what: str, failure: BaseException | None) -> None:
        """After rank-local work (rank 0 writing files), every rank learns whether it succeeded everywhere."""
        if self.world_size > 1:
            refused, _ = self.poll(what, failure is None)
            if failure is None and refused:
                raise Aborted(f"{what} failed on rank(s) {refused} (see their error)", reason="PEER_REFUSED")
        if failure is not None:
            raise failure

    @contextmanager
    def collective(self, what: str) -> Iterator[None]:
        """Turns a failed collective (a peer rank died or timed out) into Aborted. On a mesh, any other
        failure here (an OOM, a bug) happened after the ranks agreed to run the call, so the peers may
        be waiting in a collective for this rank: this rank leaves the process group at once (its
        peers' collectives fail within milliseconds, not at the timeout) and the mesh is marked broken.
        Our own errors (TwinkleError) are raised by every rank alike and pass through."""
        self.agree()
        try:
            yield
        except TwinkleError:
            raise
        except dist.DistBackendError as error:
            raise self.collective_failed(what, error) from error
        except RuntimeError as error:
            text = str(error)
            if any(marker in text for marker in COLLECTIVE_FAILURE_MARKERS):
                raise self.collective_failed(what, error) from error
            if self.world_size > 1:
                raise self.break_mesh(f"{what} failed on this rank ({type(error).__name__}: {text})", error) from error
            raise
        except Exception as error:
            if self.world_size > 1:
                raise self.break_mesh(f"{what} failed on this rank ({type(error).__name__}: {error})", error) from error
            raise

    def collective_failed(self, what: str, error: BaseException) -> Aborted:
        """The rule for a collective with the other ranks that failed (a peer died or timed out): the mesh
        is broken, and the call is Aborted. `what` names the call ("" for the agreement vote itself)."""
        prefix = f"{what}: " if what else ""
        return self.break_mesh(f"{prefix}{COLLECTIVE_FAILED}: {error}", error)

    def break_mesh(self, reason: str, error: BaseException) -> Aborted:
        """Marks the mesh broken (see self.broken) and leaves the process group, so no peer waits on us."""
        first_line = reason.splitlines()[0]
        if self.broken is None:
            self.broken = f"rank {self.rank}: {first_line}"
            log.error("the mesh is broken: %s", self.broken, exc_info=error)
            strategies.abort_process_group()
        return Aborted(f"{first_line}; {self.broken_advice()}")

    def broken_advice(self) -> str:
        return (
            "the mesh is broken (a rank may have been left inside a collective), so this worker refuses "
            "further work: re-initialise (Reset every rank, Init, then resume_from_checkpoint)"
        )

    def check_not_broken(self) -> None:
        if self.broken is not None:
            raise Aborted(f"{self.broken}; {self.broken_advice()}")
