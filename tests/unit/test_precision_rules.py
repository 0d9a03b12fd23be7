"""fp16 rules: which meshes may train in fp16, and which grad_scaler_config torch.amp.GradScaler accepts."""

from __future__ import annotations

import pytest
import torch

from twinkle_protocol.errors import FailedPrecondition, InvalidArgument
from twinkle_protocol.mesh import DeviceMesh
from twinkle_worker.precision import check_scaler_config
from twinkle_worker.strategies import StrategyPlan


def _plan(mesh: DeviceMesh, strategy: str = "accelerate", precision: str = "fp16") -> StrategyPlan:
    return StrategyPlan(strategy=strategy, mesh=mesh, device=torch.device("cpu"), mixed_precision=precision)


@pytest.mark.parametrize(
    ("mesh", "strategy"),
    [
        (DeviceMesh.from_sizes(fsdp_size=2), "accelerate"),
        (DeviceMesh.from_sizes(fsdp_size=2, dp_size=2), "accelerate"),
        (DeviceMesh.from_sizes(dp_size=2), "native_fsdp"),
    ],
)
def test_fp16_with_fsdp2_is_refused_naming_why(mesh: DeviceMesh, strategy: str) -> None:
    with pytest.raises(FailedPrecondition, match="fp16.*FSDP2.*inf/NaN"):
        _plan(mesh, strategy).validate()


@pytest.mark.parametrize("mesh", [DeviceMesh.single(), DeviceMesh.from_sizes(dp_size=2)])
def test_fp16_on_cpu_with_one_rank_or_ddp_is_accepted(mesh: DeviceMesh) -> None:
    _plan(mesh).validate()


def test_fp8_on_cpu_is_still_refused() -> None:
    with pytest.raises(FailedPrecondition, match="fp8"):
        _plan(DeviceMesh.single(), precision="fp8").validate()


def test_grad_scaler_config_is_torchs_kwargs_and_fp16_only() -> None:
    assert check_scaler_config("fp16", None) == {}
    assert check_scaler_config("fp16", {"init_scale": 8.0, "growth_interval": 3}) == {
        "init_scale": 8.0,
        "growth_interval": 3,
    }
    assert check_scaler_config("bf16", None) is None
    with pytest.raises(FailedPrecondition, match="grad_scaler_config.*fp16"):
        check_scaler_config("bf16", {"init_scale": 8.0})
    with pytest.raises(InvalidArgument, match="grad_scaler_config.*init_scal"):
        check_scaler_config("fp16", {"init_scal": 8.0})
    with pytest.raises(InvalidArgument, match="grad_scaler_config"):
        check_scaler_config("fp16", {"backoff_factor": 2.0})  # GradScaler requires backoff_factor < 1
