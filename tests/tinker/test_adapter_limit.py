"""The gateway's adapter slots: a limit answered with a clear error, and freed by closing a session."""

from __future__ import annotations

from typing import Any

import pytest
import tinker
from tinker import types

KEY_A = "tml-tenant-a-0123456789"


def test_more_training_clients_than_slots_are_refused_until_one_closes(small: Any) -> None:
    first = tinker.ServiceClient(base_url=small.url, api_key=KEY_A)
    second = tinker.ServiceClient(base_url=small.url, api_key=KEY_A)
    try:
        a = first.create_lora_training_client(base_model=str(small.base_model), rank=4).result()
        second.create_lora_training_client(base_model=str(small.base_model), rank=4).result()
        with pytest.raises(tinker.RequestFailedError, match="all 2 adapter slots"):
            second.create_lora_training_client(base_model=str(small.base_model), rank=4).result()
        data = [
            types.Datum(model_input=types.ModelInput.from_ints([1, 2, 3]), loss_fn_inputs={"target_tokens": [2, 3, 4]})
        ]
        a.forward_backward(data, "cross_entropy").result()
        a.optim_step(types.AdamParams(learning_rate=1e-3)).result()
        first.close("done")  # saves and unloads its model: a slot is free again
        third = second.create_lora_training_client(base_model=str(small.base_model), rank=4).result()
        assert third.forward(data, "cross_entropy").result().metrics["loss:sum"] > 0
    finally:
        second.close("done")
