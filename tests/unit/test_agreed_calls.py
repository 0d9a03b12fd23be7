"""Which calls run inside the ranks' agreement: the methods marked with twinkle_worker.agreement.agreed_call,
and the requests the servicer checks inside the vote (servicer.AGREED_REQUESTS) derived from them."""

from __future__ import annotations

from twinkle_protocol._proto import worker_pb2
from twinkle_worker import servicer
from twinkle_worker.agreement import agreed_rpcs
from twinkle_worker.model import TransformersModel

# The calls that run collectives: the seed's methods whose ranks must agree before they run.
COLLECTIVE_CALLS = {
    "ForwardBackward",
    "ForwardOnly",
    "Sample",
    "ClipGradNorm",
    "Step",
    "ClipGradAndStep",
    "Save",
    "Load",
    "ResumeFromCheckpoint",
    "ExportWeights",
}


def test_the_agreed_methods_are_the_calls_that_run_collectives() -> None:
    rpcs = agreed_rpcs(TransformersModel)
    assert set(rpcs) == COLLECTIVE_CALLS
    # forward_only and sample are wrapped by torch.no_grad too: the mark survives the outer decorator.
    assert {"ForwardOnly", "Sample"} <= set(rpcs)


def test_every_agreed_method_has_its_request_message_and_the_servicer_checks_them_in_the_vote() -> None:
    requests = {name: getattr(worker_pb2, f"{name}Request", None) for name in agreed_rpcs(TransformersModel)}
    assert all(requests.values()), [name for name, message in requests.items() if message is None]
    # ExportWeights is checked in its handler, inside the agreement it opens itself.
    expected = {getattr(worker_pb2, f"{name}Request") for name in COLLECTIVE_CALLS - {"ExportWeights"}}
    assert set(servicer.AGREED_REQUESTS) == expected
