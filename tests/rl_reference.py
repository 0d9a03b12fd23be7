"""The single-process reference for the RL-loss tests, written from the formulas (docs/protocol.md, "Losses").

Plain transformers + torch: the worker's initial model (transformers.set_seed, from_config),
each sample run alone (no padding, no batching, no twinkle code), the loss's per-token terms
from its formula, the window's objective under each normalisation, one SGD step. SGD keeps
the weights after a step a linear function of the gradient, so comparing weights compares
gradients without Adam's amplification of rounding noise.

Used by tests/integration/test_rl_losses.py (1 rank) and tests/distributed/test_mesh_rl_losses.py
(2 ranks); `check_loss_parity` runs the workers and the reference side by side and asserts.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from typing import Any

import numpy as np
import torch

VOCAB = 256
SEED = 0
# float32 on both sides; the workers pad, split over ranks and reduce in another order: a few ulps.
RTOL, ATOL = 1e-5, 1e-6
LR = 0.05
GAS, BATCH = 2, 5  # 2 micro-batches of 5 samples per window (5 does not divide over 2 ranks)
NORMALIZATIONS: list[Any] = ["token_mean", "sum", "sequence_mean", 7.0]
# Options that make every branch matter on this data: ratios within about exp(+-0.3) of 1 are clipped
# at 0.9 / 1.1, the KL terms have weight.
LOSS_OPTIONS: dict[str, dict[str, float]] = {
    "cross_entropy": {},
    "importance_sampling": {},
    "ppo": {"clip_low_threshold": 0.9, "clip_high_threshold": 1.1},
    "cispo": {"clip_low_threshold": 0.9, "clip_high_threshold": 1.1},
    "dro": {"beta": 0.5},
    "grpo": {"epsilon": 0.1, "epsilon_high": 0.15, "kl_coef": 0.3},
    "gspo": {"epsilon": 0.03, "kl_coef": 0.2},
}

Sample = dict[str, Any]


class Reference:
    """One process, the whole window: what a mesh of workers must reproduce."""

    def __init__(self, config: Any, seed: int = SEED) -> None:
        import transformers

        transformers.set_seed(seed)
        self.model = transformers.AutoModelForCausalLM.from_config(config).float()
        self.parameters = [p for p in self.model.parameters() if p.requires_grad]
        self.optimizer = torch.optim.SGD(self.parameters, lr=LR)

    def label_logps(self, sample: Mapping[str, Any]) -> torch.Tensor:
        """log p(label) at each position of one sample run alone (0 where the label is -100)."""
        ids = torch.as_tensor(np.asarray(sample["input_ids"]))[None]
        labels = torch.as_tensor(np.asarray(sample["labels"]))
        logits = self.model(input_ids=ids, use_cache=False).logits[0].float()
        picked = torch.log_softmax(logits, -1).gather(-1, labels.clamp(min=0)[:, None])[:, 0]
        return torch.where(labels == -100, torch.zeros_like(picked), picked)

    def logps_now(self, samples: Sequence[Mapping[str, Any]]) -> list[np.ndarray]:
        with torch.no_grad():
            return [self.label_logps(sample).numpy() for sample in samples]

    def view(self, sample: Mapping[str, Any]) -> dict[str, Any]:
        """The sample at its loss tokens: lp (graph-connected), q, ref, a (advantages per token), weights, n."""
        keep = np.asarray(sample["labels"]) != -100
        if "mask" in sample:
            keep &= np.asarray(sample["mask"]) == 1
        index = torch.as_tensor(np.nonzero(keep)[0])
        n = len(index)
        out: dict[str, Any] = {"lp": self.label_logps(sample)[index], "n": n}
        for key, name in (("logprobs", "q"), ("ref_logprobs", "ref"), ("weights", "weights")):
            if key in sample:
                out[name] = torch.as_tensor(np.asarray(sample[key], dtype=np.float32))[index]
        if "advantages" in sample:
            advantage = np.asarray(sample["advantages"], dtype=np.float32)
            out["per_sequence"] = advantage.ndim == 0
            out["a"] = torch.full((n,), float(advantage)) if advantage.ndim == 0 else torch.as_tensor(advantage)[index]
        return out

    def terms(self, loss: str, options: Mapping[str, float], sample: Mapping[str, Any]) -> tuple[torch.Tensor, int]:
        """(sum over the sample's loss tokens of its terms, its loss-token count), graph-connected."""
        v = self.view(sample)
        lp, n = v["lp"], v["n"]
        if loss == "cross_entropy":
            return (-lp * v.get("weights", torch.ones(n))).sum(), n
        a, q = v["a"], v["q"]
        r = torch.exp(lp - q)
        if loss == "importance_sampling":
            return -(r * a).sum(), n
        if loss == "ppo":
            low, high = options["clip_low_threshold"], options["clip_high_threshold"]
            return -torch.min(r * a, torch.clamp(r, low, high) * a).sum(), n
        if loss == "cispo":
            low, high = options["clip_low_threshold"], options["clip_high_threshold"]
            return -(torch.clamp(r, low, high).detach() * lp * a).sum(), n
        if loss == "dro":
            return -(lp * a - options["beta"] / 2 * (lp - q) ** 2).sum(), n
        ref = v["ref"]
        kl = (torch.exp(ref - lp) - (ref - lp) - 1).sum()  # k3
        low, high = 1 - options["epsilon"], 1 + options.get("epsilon_high", options["epsilon"])
        if loss == "grpo":
            return -torch.min(r * a, torch.clamp(r, low, high) * a).sum() + options["kl_coef"] * kl, n
        assert loss == "gspo" and v["per_sequence"]
        # the sequence-level objective: each of the n tokens carries -min(s*A, clip(s)*A), s = exp(mean(lp - q))
        s = torch.exp((lp - q).mean())
        a0 = float(a[0])
        return n * -torch.min(s * a0, torch.clamp(s, low, high) * a0) + options["kl_coef"] * kl, n

    def metrics(self, loss: str, options: Mapping[str, float], samples: Sequence[Mapping[str, Any]]) -> dict:  # type: ignore[type-arg]
        """The loss's metrics over the samples: token-weighted means (sequence-weighted for sequence_ratio_mean)."""
        sums: dict[str, float] = {}
        tokens = sequences = 0
        with torch.no_grad():
            for sample in samples:
                v = self.view(sample)
                tokens += v["n"]
                if loss == "cross_entropy":
                    continue
                lp, q, a = v["lp"], v["q"], v["a"]
                r = torch.exp(lp - q)
                if loss == "gspo":
                    r = torch.exp((lp - q).mean()).expand_as(lp)
                    sums["sequence_ratio_mean"] = sums.get("sequence_ratio_mean", 0.0) + float(r[0])
                    sequences += 1
                sums["ratio_mean"] = sums.get("ratio_mean", 0.0) + float(r.sum())
                d = v["ref"] - lp
                sums["kl"] = sums.get("kl", 0.0) + float((torch.exp(d) - d - 1).sum())
                if loss in ("ppo", "cispo"):
                    low, high = options["clip_low_threshold"], options["clip_high_threshold"]
                else:
                    epsilon = options.get("epsilon", 0.0)
                    low, high = 1 - epsilon, 1 + options.get("epsilon_high", epsilon)
                # cispo counts tokens whose ratio was clipped; the others, where the min takes the clipped side
                clipped = (r < low) | (r > high) if loss == "cispo" else torch.clamp(r, low, high) * a < r * a
                if loss in ("ppo", "cispo", "grpo", "gspo"):
                    sums["clip_fraction"] = sums.get("clip_fraction", 0.0) + float(clipped.sum())
        counts = {"sequence_ratio_mean": sequences}
        return {name: total / counts.get(name, tokens) for name, total in sums.items()}

    def objective(
        self, loss: str, options: Mapping[str, float], normalization: Any, samples: Sequence[Mapping[str, Any]]
    ) -> torch.Tensor:
        """The window's (or micro-batch's) objective under the normalisation."""
        parts = [self.terms(loss, options, sample) for sample in samples]
        total = sum((value for value, _ in parts), torch.zeros(()))
        tokens = sum(n for _, n in parts)
        if normalization == "token_mean":
            return total / tokens
        if normalization == "sum":
            return total
        if normalization == "sequence_mean":
            means = [value / n for value, n in parts if n > 0]
            return sum(means, torch.zeros(())) / len(means)
        return total / float(normalization)

    def step(self, loss: str, options: Mapping[str, float], normalization: Any, samples: Sequence[Sample]) -> float:
        self.optimizer.zero_grad(set_to_none=True)
        self.objective(loss, options, normalization, samples).backward()
        norm = torch.nn.utils.clip_grad_norm_(self.parameters, float("inf"))
        self.optimizer.step()
        return float(norm)

    def weights(self) -> dict[str, torch.Tensor]:
        return {k: v.detach().clone() for k, v in self.model.state_dict().items()}


def make_window(rng: np.random.Generator, reference: Reference, loss: str) -> list[list[Sample]]:
    """GAS micro-batches of BATCH samples (lengths 3..14, prompts of 0..3 tokens masked), with the loss
    inputs: sampler logprobs and ref_logprobs near the current ones (so ratios straddle the clip
    bounds), advantages per sequence in the first micro-batch and per token in the second (per
    sequence throughout for gspo), a 0/1 mask dropping about one token in six, and weights of
    both signs."""
    window = []
    for micro in range(GAS):
        samples = []
        for _ in range(BATCH):
            length = int(rng.integers(3, 15))
            tokens = (int(rng.integers(VOCAB)) + np.arange(length + 1) * int(rng.integers(1, 4))) % VOCAB
            labels = tokens[1:].copy()
            labels[: int(rng.integers(0, 4)) % length] = -100
            samples.append({"input_ids": tokens[:-1].astype(np.int64), "labels": labels.astype(np.int64)})
        for sample, logps in zip(samples, reference.logps_now(samples), strict=True):
            length = len(sample["input_ids"])
            sample["mask"] = (rng.random(length) > 0.17).astype(np.float32)
            sample["mask"][-1] = 1.0
            if loss == "cross_entropy":
                sample["weights"] = rng.normal(0.5, 1.0, length).astype(np.float32)
                continue
            sample["logprobs"] = (logps + rng.normal(0, 0.3, length)).astype(np.float32)
            sample["ref_logprobs"] = (logps + rng.normal(0, 0.3, length)).astype(np.float32)
            per_token = micro == 1 and loss != "gspo"
            sample["advantages"] = (
                rng.normal(0, 1, length).astype(np.float32) if per_token else np.float32(rng.normal(0, 1))
            )
        window.append(samples)
    return window


def _as_tensor(value: Any) -> torch.Tensor:
    return value if isinstance(value, torch.Tensor) else torch.from_numpy(np.array(value))


def assert_weights_close(actual: Mapping[str, Any], expected: Mapping[str, torch.Tensor], exact: bool = False) -> None:
    assert sorted(actual) == sorted(expected), sorted(set(actual) ^ set(expected))
    for key, value in expected.items():
        got = _as_tensor(actual[key])
        if exact:
            assert torch.equal(got, value), f"{key} differs"
        else:
            torch.testing.assert_close(got, value, rtol=RTOL, atol=ATOL, msg=lambda text, key=key: f"{key}: {text}")


def check_loss_parity(
    model: Any, config: Any, loss: str, seed: int = SEED, set_loss: str | None = None
) -> dict[str, list[float]]:
    """A freshly Init'ed client `model` (any mesh) and the reference train one window per normalisation
    with `loss` chosen per call (or, with `set_loss`, that class name given to set_loss before each
    window); asserts each micro-batch's loss, logprobs and metrics, each window's gradient norm and
    the weights after each step. Returns the gradient norms."""
    reference = Reference(config, seed)
    assert_weights_close(model.export_weights(), reference.weights(), exact=True)  # the same start, bit for bit
    model.set_optimizer("SGD", lr=LR, weight_decay=0.0)
    options = LOSS_OPTIONS[loss]
    rng = np.random.default_rng(sum(map(ord, loss)))  # a fixed stream per loss
    norms: dict[str, list[float]] = {"workers": [], "reference": []}
    clipped: list[float] = []
    for normalization in NORMALIZATIONS:
        window = make_window(rng, reference, loss)
        config_ = {**options, "normalization": normalization}
        if set_loss:
            model.set_loss(set_loss, **config_)
        for batch in window:
            per_call = {} if set_loss else {"loss_fn": loss, "loss_fn_config": config_}
            out = model.forward_backward(batch, gradient_accumulation_steps=GAS, **per_call)
            with torch.no_grad():
                expected = float(reference.objective(loss, options, normalization, batch))
            assert abs(out["loss"] - expected) <= RTOL * abs(expected) + ATOL, (normalization, out["loss"], expected)
            # the per-token logprobs in the caller's order, and the metrics merged over the ranks by token count
            for got, want in zip(out["logps"], reference.logps_now(batch), strict=True):
                np.testing.assert_allclose(got, want, rtol=RTOL, atol=ATOL)
            expected_metrics = reference.metrics(loss, options, batch)
            assert sorted(out["metrics"]) == sorted(expected_metrics)
            for name, value in expected_metrics.items():
                assert abs(out["metrics"][name] - value) <= RTOL * abs(value) + ATOL, (name, out["metrics"], value)
            if "clip_fraction" in expected_metrics:
                clipped.append(expected_metrics["clip_fraction"])
        step = model.clip_grad_and_step(max_grad_norm=0.0, gradient_accumulation_steps=GAS)
        assert step["applied"], step
        expected_norm = reference.step(loss, options, normalization, [s for batch in window for s in batch])
        norms["workers"].append(step["grad_norm"])
        norms["reference"].append(expected_norm)
        assert abs(step["grad_norm"] - expected_norm) <= RTOL * expected_norm, (normalization, step, expected_norm)
        assert_weights_close(model.export_weights(), reference.weights())
    if loss in ("ppo", "cispo", "grpo", "gspo"):
        assert max(clipped) > 0 and min(clipped) < 1, clipped  # clipping happens, and not everywhere
    return norms


DPO_BETA = 0.5


def make_pairs(rng: np.random.Generator, reference: Reference, pairs: int) -> list[Sample]:
    """[chosen_1, rejected_1, ...] with prompts masked and ref_logprobs near the current logprobs."""
    samples = []
    for _ in range(2 * pairs):
        length = int(rng.integers(4, 12))
        tokens = (int(rng.integers(VOCAB)) + np.arange(length + 1) * int(rng.integers(1, 4))) % VOCAB
        labels = tokens[1:].copy()
        labels[: int(rng.integers(1, 3))] = -100
        samples.append({"input_ids": tokens[:-1].astype(np.int64), "labels": labels.astype(np.int64)})
    for sample, logps in zip(samples, reference.logps_now(samples), strict=True):
        sample["ref_logprobs"] = (logps + rng.normal(0, 0.5, len(logps))).astype(np.float32)
    return samples


def reference_dpo_step(reference: Reference, samples: Sequence[Sample], beta: float = DPO_BETA) -> float:
    """One SGD step on -mean over pairs of log sigmoid(beta * ((lp_c - ref_c) - (lp_r - ref_r))), the log
    probabilities summed over each sequence's label tokens; returns the gradient norm."""
    reference.optimizer.zero_grad(set_to_none=True)
    log_ratios = []
    for sample in samples:
        keep = torch.as_tensor(np.asarray(sample["labels"]) != -100)
        policy = reference.label_logps(sample)[keep].sum()
        log_ratios.append(policy - float(np.asarray(sample["ref_logprobs"])[keep.numpy()].sum()))
    margins = torch.stack([beta * (log_ratios[i] - log_ratios[i + 1]) for i in range(0, len(samples), 2)])
    (-torch.nn.functional.logsigmoid(margins).mean()).backward()
    norm = torch.nn.utils.clip_grad_norm_(reference.parameters, float("inf"))
    reference.optimizer.step()
    return float(norm)


def check_dpo_parity(model: Any, config: Any, pairs: int = 3) -> None:
    """forward_backward_custom with twinkle_client.losses.dpo equals reference_dpo_step, twice."""
    from twinkle_client.losses import dpo

    reference = Reference(config)
    model.set_optimizer("SGD", lr=LR, weight_decay=0.0)
    rng = np.random.default_rng(11)
    for _ in range(2):
        samples = make_pairs(rng, reference, pairs)
        out = model.forward_backward_custom(samples, dpo(beta=DPO_BETA))
        assert set(out["metrics"]) >= {"reward_accuracy", "reward_margin"}
        step = model.clip_grad_and_step(max_grad_norm=0.0)
        expected = reference_dpo_step(reference, samples)
        assert abs(step["grad_norm"] - expected) <= RTOL * expected, (step, expected)
        assert_weights_close(model.export_weights(), reference.weights())
