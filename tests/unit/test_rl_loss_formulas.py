"""The RL losses' formulas, normalisations, option and input checks, and the client's custom-loss weights.

References are written out here with plain torch on small tensors (per sequence, no padding),
not with the worker's code.
"""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch

from twinkle_client import custom_loss
from twinkle_client.losses import dpo
from twinkle_protocol.errors import FailedPrecondition, InvalidArgument, NotFound
from twinkle_worker.losses import make_loss
from twinkle_worker.normalization import Normalization, check_window

RTOL, ATOL = 1e-5, 1e-6


def _batch() -> dict[str, torch.Tensor]:
    """B=3, T=4: row 1 has one ignored label, row 2 a mask hole and a padded last position."""
    generator = torch.Generator().manual_seed(3)
    labels = torch.tensor([[5, 6, 7, 8], [-100, 1, 2, 3], [4, 4, 4, -100]])
    return {
        "input_ids": torch.zeros(3, 4, dtype=torch.long),
        "labels": labels,
        "logprobs": -torch.rand(3, 4, generator=generator) * 2,
        "ref_logprobs": -torch.rand(3, 4, generator=generator) * 2,
        "advantages": torch.tensor([1.0, -0.5, 2.0]),
        "weights": torch.tensor([[1.0, -2.0, 0.5, 1.0], [1.0, 1.0, 1.0, 1.0], [0.0, 3.0, -1.0, 1.0]]),
        "mask": torch.tensor([[1.0, 1, 1, 1], [1, 1, 1, 1], [1, 0, 1, 1]]),
    }


def _logps(batch: dict[str, torch.Tensor]) -> torch.Tensor:
    generator = torch.Generator().manual_seed(4)
    logps = (batch["logprobs"] + torch.randn(3, 4, generator=generator) * 0.3).requires_grad_(True)
    return logps


def _rows(batch: dict[str, torch.Tensor]) -> list[torch.Tensor]:
    """The loss-token positions of each row."""
    keep = (batch["labels"] != -100) & (batch["mask"] == 1)
    return [torch.nonzero(keep[row])[:, 0] for row in range(keep.shape[0])]


def _reference_terms(loss: str, options: dict[str, float], batch: dict[str, torch.Tensor], logps: torch.Tensor):  # type: ignore[no-untyped-def]
    """Per row: the tensor of its terms at its loss tokens, straight from the formulas."""
    out = []
    for row, index in enumerate(_rows(batch)):
        lp, q, ref = logps[row, index], batch["logprobs"][row, index], batch["ref_logprobs"][row, index]
        a = batch["advantages"][row]
        r = torch.exp(lp - q)
        if loss == "cross_entropy":
            out.append(-lp * batch["weights"][row, index])
        elif loss == "importance_sampling":
            out.append(-r * a)
        elif loss == "ppo":
            lo, hi = options["clip_low_threshold"], options["clip_high_threshold"]
            out.append(-torch.min(r * a, torch.clamp(r, lo, hi) * a))
        elif loss == "cispo":
            lo, hi = options["clip_low_threshold"], options["clip_high_threshold"]
            out.append(-torch.clamp(r, lo, hi).detach() * lp * a)
        elif loss == "dro":
            out.append(-(lp * a - options["beta"] / 2 * (lp - q) ** 2))
        elif loss == "grpo":
            lo, hi = 1 - options["epsilon"], 1 + options["epsilon"]
            kl = torch.exp(ref - lp) - (ref - lp) - 1
            out.append(-torch.min(r * a, torch.clamp(r, lo, hi) * a) + options["kl_coef"] * kl)
    return out


CASES = [
    ("cross_entropy", {}),
    ("importance_sampling", {}),
    ("ppo", {"clip_low_threshold": 0.9, "clip_high_threshold": 1.1}),
    ("cispo", {"clip_low_threshold": 0.9, "clip_high_threshold": 1.1}),
    ("dro", {"beta": 0.7}),
    ("grpo", {"epsilon": 0.1, "kl_coef": 0.4}),
]


@pytest.mark.parametrize("normalization", ["token_mean", "sum", "sequence_mean", 5.0])
@pytest.mark.parametrize("loss,options", CASES)
def test_value_and_gradient_follow_the_formula(loss: str, options: dict[str, float], normalization) -> None:  # type: ignore[no-untyped-def]
    batch = _batch()
    logps = _logps(batch)
    label_mask = (batch["labels"] != -100).float()
    result = make_loss(loss, {**options, "normalization": normalization})(logps, label_mask, batch)
    rows = _reference_terms(loss, options, batch, logps)
    tokens = sum(len(r) for r in rows)
    assert result.num_tokens == tokens == 9 and result.num_sequences == 3
    numerator = sum(r.sum() / len(r) for r in rows) if normalization == "sequence_mean" else sum(r.sum() for r in rows)
    torch.testing.assert_close(result.loss_sum, numerator, rtol=RTOL, atol=ATOL)
    denominator = {"token_mean": tokens, "sum": 1.0, "sequence_mean": 3.0}.get(normalization, normalization)
    assert result.normalization.denominator(result.num_tokens, result.num_sequences) == denominator
    (ours,) = torch.autograd.grad(result.loss_sum, logps, retain_graph=True)
    (expected,) = torch.autograd.grad(numerator, logps)
    torch.testing.assert_close(ours, expected, rtol=RTOL, atol=ATOL)


def test_ppo_metrics_are_token_weighted_sums_with_their_counts() -> None:
    batch = _batch()
    logps = _logps(batch)
    result = make_loss("ppo", {"clip_low_threshold": 0.9, "clip_high_threshold": 1.1})(
        logps, (batch["labels"] != -100).float(), batch
    )
    ratios, clipped, kls = [], [], []
    for row, index in enumerate(_rows(batch)):
        r = torch.exp(logps[row, index] - batch["logprobs"][row, index]).detach()
        a = batch["advantages"][row]
        ratios.append(r)
        clipped.append(torch.clamp(r, 0.9, 1.1) * a < r * a)
        d = batch["ref_logprobs"][row, index] - logps[row, index].detach()
        kls.append(torch.exp(d) - d - 1)
    assert result.metrics["clip_fraction"][1] == 9
    assert result.metrics["clip_fraction"][0] == float(torch.cat(clipped).sum()) > 0
    assert math.isclose(result.metrics["ratio_mean"][0], float(torch.cat(ratios).sum()), rel_tol=RTOL)
    assert math.isclose(result.metrics["kl"][0], float(torch.cat(kls).sum()), rel_tol=RTOL)


def test_gspo_has_the_gradient_of_the_sequence_ratio() -> None:
    batch = _batch()
    logps = _logps(batch)
    options = {"epsilon": 0.2, "kl_coef": 0.0, "normalization": "sequence_mean"}
    result = make_loss("gspo", options)(logps, (batch["labels"] != -100).float(), batch)
    expected = torch.zeros(())
    for row, index in enumerate(_rows(batch)):
        s = torch.exp((logps[row, index] - batch["logprobs"][row, index]).mean())
        a = batch["advantages"][row]
        expected = expected - torch.min(s * a, torch.clamp(s, 0.8, 1.2) * a)
    torch.testing.assert_close(result.loss_sum, expected, rtol=RTOL, atol=ATOL)
    (ours,) = torch.autograd.grad(result.loss_sum, logps, retain_graph=True)
    (reference,) = torch.autograd.grad(expected, logps)
    torch.testing.assert_close(ours, reference, rtol=RTOL, atol=ATOL)


def test_twinkle_class_names_map_to_the_same_losses() -> None:
    assert make_loss("GRPOLoss", {"beta": 0.1}).options["kl_coef"] == 0.1  # Twinkle's name of the KL coefficient
    assert make_loss("GRPOLoss", {}).normalization == Normalization("sequence_mean")
    assert make_loss("BNPOLoss", {}).normalization == Normalization("token_mean")
    assert make_loss("DRGRPOLoss", {"normalization": 512}).normalization == Normalization("constant", 512.0)
    assert make_loss("CrossEntropyLoss", {}).normalization == Normalization("token_mean")
    assert make_loss("PPOLoss", {}).options == {"clip_low_threshold": 0.8, "clip_high_threshold": 1.2}


@pytest.mark.parametrize(
    "name,options,error,message",
    [
        ("ppo", {"clip_low": 0.1}, InvalidArgument, "unknown option"),
        ("ppo", {"clip_low_threshold": 1.5}, InvalidArgument, "clip_low_threshold <= clip_high_threshold"),
        ("dro", {}, InvalidArgument, "'beta'"),
        ("grpo", {"kl_coef": -1.0}, InvalidArgument, "kl_coef"),
        ("grpo", {"epsilon": float("nan")}, InvalidArgument, "finite"),
        ("grpo", {"normalization": "mean"}, InvalidArgument, "normalization"),
        ("grpo", {"normalization": -3}, InvalidArgument, "normalization"),
        ("DRGRPOLoss", {}, InvalidArgument, "normalization=<number>"),
        ("CrossEntropyLoss", {"label_smoothing": 0.1}, InvalidArgument, "label_smoothing"),
        ("DPOLoss", {}, NotFound, "forward_backward_custom"),
        ("os.system", {}, NotFound, "available"),
    ],
)
def test_bad_loss_choices_name_the_option(name: str, options: dict, error: type, message: str) -> None:  # type: ignore[type-arg]
    with pytest.raises(error, match=message):
        make_loss(name, options)


@pytest.mark.parametrize(
    "change,message",
    [
        ({"advantages": torch.ones(4)}, r"advantages has shape \[4\]"),
        ({"logprobs": torch.ones(3, 5)}, r"logprobs has shape \[3, 5\]"),
        ({"mask": torch.full((3, 4), 0.5)}, "mask must hold only 0 and 1"),
        ({"advantages": None}, "needs inputs.advantages"),
        ({"ref_logprobs": None}, "needs inputs.ref_logprobs"),
        ({"old_logps": torch.zeros(3, 4)}, "both 'old_logps' and 'logprobs'"),
    ],
)
def test_bad_loss_inputs_are_refused_by_check(change: dict, message: str) -> None:  # type: ignore[type-arg]
    batch = _batch()
    for key, value in change.items():
        if value is None:
            del batch[key]
        else:
            batch[key] = value
    with pytest.raises(InvalidArgument, match=message):
        make_loss("grpo", {"kl_coef": 0.1}).check(batch)


def test_a_window_keeps_one_normalization() -> None:
    check_window(None, Normalization("sum"))
    check_window(Normalization("sum"), Normalization("sum"))
    with pytest.raises(FailedPrecondition, match="differs"):
        check_window(Normalization("sum"), Normalization("token_mean"))


def test_custom_loss_weights_are_minus_the_gradient() -> None:
    samples = [{"input_ids": [1, 2, 3], "labels": [2, 3, -100]}, {"input_ids": [4, 5], "labels": [5, -100]}]
    logps = [np.array([-1.0, -2.0, 0.0], np.float32), np.array([-0.5, 0.0], np.float32)]

    def squared(batch, logprobs):  # type: ignore[no-untyped-def]
        return sum((lp**2).sum() for lp in logprobs), {"n": len(logprobs)}

    loss, metrics, weighted = custom_loss.run(squared, samples, logps)
    assert loss == pytest.approx(1 + 4 + 0.25) and metrics == {"n": 2.0}
    np.testing.assert_allclose(weighted[0]["weights"], [2.0, 4.0, 0.0])  # -d(lp^2)/dlp = -2 lp
    np.testing.assert_allclose(weighted[1]["weights"], [1.0, 0.0])
    assert "weights" not in samples[0]  # the caller's samples are not modified


def test_dpo_is_the_sigmoid_loss_of_the_log_ratio_margins() -> None:
    samples = [
        {"labels": [-100, 1, 2], "ref_logprobs": [0.0, -1.0, -1.0]},
        {"labels": [-100, 3, 4], "ref_logprobs": [0.0, -2.0, -0.5]},
    ]
    logprobs = [torch.tensor([0.0, -0.8, -1.1], requires_grad=True), torch.tensor([0.0, -2.5, -0.4])]
    loss, metrics = dpo(beta=0.5)(samples, logprobs)
    margin = 0.5 * ((-1.9 - -2.0) - (-2.9 - -2.5))
    assert float(loss) == pytest.approx(-math.log(1 / (1 + math.exp(-margin))), rel=1e-6)
    assert metrics["reward_accuracy"] == 1.0 and metrics["reward_margin"] == pytest.approx(margin, rel=1e-6)
    with pytest.raises(InvalidArgument, match="pairs"):
        dpo()(samples[:1], logprobs[:1])


def test_a_client_without_torch_gets_a_clear_error(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setitem(__import__("sys").modules, "torch", None)  # `import torch` now raises ImportError
    with pytest.raises(FailedPrecondition, match="torch is not installed"):
        custom_loss.run(lambda batch, logprobs: (None, {}), [{"input_ids": [1]}], [np.zeros(1, np.float32)])
