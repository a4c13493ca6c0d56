"""The demo's training loop: supervised warm start, then GRPO or VPPO with real sampled rollouts.

Everything a real multimodal RL step does is here, at toy scale: the processor, ``generate`` with
``G`` samples per prompt, a verifiable reward, old-policy log-probabilities, the perturbed-image
forward pass, token visual dependency, GRPO advantages, TAS, TGF, the clipped surrogate and AdamW.
"""

import copy
import math
import random
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from typing import Any

import torch
from torch import Tensor

import vppo_core as V
from vppo_core.analysis import DependencyAccumulator
from vppo_core.integrations.transformers import rollout_inputs, token_dependency, token_logprobs
from vppo_core.perturb import PixelLayout, blacken_patches_pixel_values

from .task import Example, make_example, reward


class ConfigError(ValueError):
    """A ``Config`` field out of range: names the field, what it must be and what it got."""

    def __init__(self, name: str, expected: str, value: object) -> None:
        self.name, self.expected, self.value = name, expected, value
        super().__init__(f"{name} must be {expected}, got {value!r}")


def _is_int(value: object) -> bool:
    return isinstance(value, int) and not isinstance(value, bool)


def _is_real(value: object) -> bool:
    return isinstance(value, (int, float)) and not isinstance(value, bool) and math.isfinite(value)


def _is_device(value: object) -> bool:
    if not isinstance(value, str):
        return False
    try:
        device = torch.device(value)
    except RuntimeError:
        return False
    return device.type != "cuda" or torch.cuda.is_available()


# field -> (test, what it must be); checked in this order, before anything is built.
_RULES: dict[str, tuple[Callable[[Any], bool], str]] = {
    "seed": (
        lambda v: _is_int(v) and -(2**63) <= v < 2**64,
        "an integer in [-2**63, 2**64) (torch.manual_seed's range)",
    ),
    "steps": (lambda v: _is_int(v) and v >= 1, "an integer >= 1"),
    "prompts": (lambda v: _is_int(v) and v >= 1, "an integer >= 1"),
    "group": (lambda v: _is_int(v) and v >= 2, "an integer >= 2 (GRPO compares the responses to one prompt)"),
    "k": (lambda v: _is_real(v) and 0 < v <= 1, "a fraction in (0, 1]"),
    "beta_min": (lambda v: _is_real(v) and 0 < v <= 1, "a number in (0, 1]"),
    "lr": (lambda v: _is_real(v) and v > 0, "a finite number > 0"),
    "sft_steps": (lambda v: _is_int(v) and v >= 0, "an integer >= 0"),
    "sft_lr": (lambda v: _is_real(v) and v > 0, "a finite number > 0"),
    "sft_batch": (lambda v: _is_int(v) and v >= 1, "an integer >= 1"),
    "ppo_epochs": (lambda v: _is_int(v) and v >= 1, "an integer >= 1"),
    "max_new_tokens": (lambda v: _is_int(v) and v >= 1, "an integer >= 1"),
    "temperature": (lambda v: _is_real(v) and v > 0, "a finite number > 0"),
    "eval_every": (lambda v: _is_int(v) and v >= 1, "an integer >= 1"),
    "eval_size": (lambda v: _is_int(v) and v >= 1, "an integer >= 1"),
    "image_size": (lambda v: _is_int(v) and v >= 28, "an integer >= 28 (one 2 x 2 block of 14-pixel patches)"),
    "distractors": (lambda v: _is_int(v) and v >= 0, "an integer >= 0"),
    "hidden_size": (lambda v: _is_int(v) and v >= 16 and v % 16 == 0, "a positive multiple of 16"),
    "patch_size": (lambda v: _is_int(v) and v >= 1, "an integer >= 1"),
    "entropy_coef": (lambda v: _is_real(v), "a finite number"),
    "device": (_is_device, "'cpu', 'cuda' or 'cuda:N' with CUDA available, or another torch device"),
}


# The integer seeds of the demo's example streams (random.Random seeds by absolute value).
EVAL_STREAM, SFT_STREAM, RL_STREAM = 10_000, 1_000_000, 2_000_000


def _held_out_is_disjoint(cfg: "Config") -> bool:
    """The held-out examples are drawn from a stream no training batch uses (for most seeds; a seed
    near 990 000 or 1 990 000 would make the held-out set a warm-start or RL batch)."""
    key = abs(EVAL_STREAM + cfg.seed)
    return not (SFT_STREAM <= key < SFT_STREAM + cfg.sft_steps or RL_STREAM <= key < RL_STREAM + cfg.steps)


@dataclass
class Config:
    """Hyper-parameters of the demo (the command-line flags).

    Raises:
        ConfigError: A ``ValueError`` naming the first field out of range, what it must be and
            what it got (checked on construction, before any model is built).
    """

    seed: int = 0
    steps: int = 80
    prompts: int = 16
    group: int = 8
    k: float = 0.4
    beta_min: float = 0.9
    lr: float = 5e-4
    sft_steps: int = 250
    sft_lr: float = 1e-3
    sft_batch: int = 16
    ppo_epochs: int = 2
    max_new_tokens: int = 6
    temperature: float = 1.0
    eval_every: int = 10
    eval_size: int = 128
    image_size: int = 56
    distractors: int = 1
    hidden_size: int = 64
    patch_size: int = 14
    entropy_coef: float = 0.0
    device: str = "cpu"

    def __post_init__(self) -> None:
        for name, (ok, expected) in _RULES.items():
            value = getattr(self, name)
            if not ok(value):
                raise ConfigError(name, expected, value)
        if not _held_out_is_disjoint(self):
            raise ConfigError(
                "seed",
                f"a seed whose held-out stream ({EVAL_STREAM} + seed) is none of the training streams "
                f"({SFT_STREAM} + warm-start step, {RL_STREAM} + RL step)",
                self.seed,
            )


@dataclass
class StepLog:
    """One RL step's measurements (plain floats, for the table, the JSON and the CSV)."""

    step: int
    reward: float
    accuracy: float | None
    kept_frac: float
    dep_mean: float
    dep_p50: float
    dep_p90: float
    dep_max: float
    top20_share: float
    factor_min: float
    factor_max: float
    clip_frac: float
    response_len: float


def _accumulator() -> DependencyAccumulator:
    return DependencyAccumulator(quantiles=(0.5, 0.9), top_fractions=(0.2, 0.4), thresholds=(0.01, 0.1, 1.0))


@dataclass
class RunResult:
    method: str
    logs: list[StepLog] = field(default_factory=list)
    final_accuracy: float = 0.0
    dependency: DependencyAccumulator = field(default_factory=_accumulator)
    example_tokens: list[str] = field(default_factory=list)
    example_dependency: list[float] = field(default_factory=list)
    example_kept: list[bool] = field(default_factory=list)


class Session:
    """The model, processor and data shared by the warm start and both RL runs."""

    def __init__(self, cfg: Config) -> None:
        from vppo_core.integrations.tiny_vlm import tiny_processor, tiny_qwen_vl

        self.cfg = cfg
        self.device = torch.device(cfg.device)
        self.processor = tiny_processor("qwen2_vl", max_pixels=cfg.image_size * cfg.image_size)
        self.tokenizer = self.processor.tokenizer
        self.model = tiny_qwen_vl("qwen2_vl", self.tokenizer, seed=cfg.seed, hidden_size=cfg.hidden_size)
        self.model.to(self.device)
        self.layout = PixelLayout.from_processor(self.processor)
        self.eos = self.tokenizer.eos_token_id
        self.eval_set = self.examples(cfg.eval_size, seed=EVAL_STREAM + cfg.seed)

    def examples(self, n: int, seed: int) -> list[Example]:
        rng = random.Random(seed)
        return [make_example(rng, size=self.cfg.image_size, distractors=self.cfg.distractors) for _ in range(n)]

    def prompt_text(self, ex: Example) -> str:
        messages = [{"role": "user", "content": [{"type": "image"}, {"type": "text", "text": ex.question}]}]
        return self.processor.apply_chat_template(messages, add_generation_prompt=True, tokenize=False)

    def encode(self, examples: Sequence[Example], responses: Sequence[str] | None = None) -> dict[str, Tensor]:
        texts = [self.prompt_text(ex) for ex in examples]
        if responses is not None:
            texts = [t + r + self.tokenizer.eos_token for t, r in zip(texts, responses)]
        batch = self.processor(images=[ex.image for ex in examples], text=texts, return_tensors="pt", padding=True)
        return {k: v.to(self.device) for k, v in batch.items()}

    def generate(self, inputs: dict[str, Tensor], *, sample: bool) -> Tensor:
        return self.model.generate(
            **inputs,
            do_sample=sample,
            temperature=self.cfg.temperature if sample else None,
            top_p=None,
            top_k=None,
            max_new_tokens=self.cfg.max_new_tokens,
        )

    def decode(self, sequences: Tensor, width: int) -> list[str]:
        return self.tokenizer.batch_decode(sequences[:, width:], skip_special_tokens=True)

    @torch.no_grad()
    def accuracy(self) -> float:
        self.model.eval()
        hits = 0.0
        for i in range(0, len(self.eval_set), 32):
            chunk = self.eval_set[i : i + 32]
            inputs = self.encode(chunk)
            sequences = self.generate(inputs, sample=False)
            texts = self.decode(sequences, inputs["input_ids"].shape[1])
            hits += sum(reward(t, ex.answer) for t, ex in zip(texts, chunk))
        return hits / len(self.eval_set)

    def warm_start(self, progress: Callable[[int], Any] | None = None) -> list[float]:
        """Supervised fine-tuning on the reference responses: teaches the answer format."""
        cfg = self.cfg
        opt = torch.optim.AdamW(self.model.parameters(), lr=cfg.sft_lr)
        losses = []
        self.model.train()
        for step in range(cfg.sft_steps):
            batch = self.examples(cfg.sft_batch, seed=SFT_STREAM + step)
            prompts = self.encode(batch)
            inputs = self.encode(batch, [ex.response for ex in batch])
            mask = _response_mask(inputs["attention_mask"], prompts["attention_mask"].sum(-1))
            lp = token_logprobs(self.model, inputs, mask)
            loss = -(lp * mask).sum() / mask.sum()
            opt.zero_grad()
            loss.backward()
            opt.step()
            losses.append(float(loss.detach()))
            if progress:
                progress(1)
        self.model.eval()
        return losses


def _response_mask(attention_mask: Tensor, prompt_lengths: Tensor) -> Tensor:
    from vppo_core.integrations.transformers import response_mask_from_prompt_lengths

    return response_mask_from_prompt_lengths(attention_mask, prompt_lengths)


def rl_run(
    session: Session,
    start_state: dict[str, Tensor],
    method: str,
    progress: Callable[[int], Any] | None = None,
) -> RunResult:
    """Train from ``start_state`` with ``method`` in {"grpo", "vppo"}; same seed, same prompts for both."""
    cfg = session.cfg
    model = session.model
    model.load_state_dict(start_state)
    torch.manual_seed(cfg.seed)
    gen = torch.Generator().manual_seed(cfg.seed)
    opt = torch.optim.AdamW(model.parameters(), lr=cfg.lr)
    result = RunResult(method)
    for step in range(1, cfg.steps + 1):
        # --- rollouts: P prompts x G samples from the current (= old) policy
        batch = session.examples(cfg.prompts, seed=RL_STREAM + step)
        repeated = [ex for ex in batch for _ in range(cfg.group)]
        prompt_inputs = session.encode(repeated)
        model.eval()
        with torch.no_grad():
            sequences = session.generate(prompt_inputs, sample=True)
        width = prompt_inputs["input_ids"].shape[1]
        texts = session.decode(sequences, width)
        rewards = torch.tensor([reward(t, ex.answer) for t, ex in zip(texts, repeated)])
        group_ids = torch.arange(len(repeated)) // cfg.group
        inputs, mask = rollout_inputs(prompt_inputs, sequences, eos_token_id=session.eos)

        # --- old policy: log-probs with the real image, and the dependency against a perturbed image
        perturbed = blacken_patches_pixel_values(
            inputs["pixel_values"].cpu(),
            inputs["image_grid_thw"].cpu(),
            session.layout,
            generator=gen,
            patch_size=cfg.patch_size,
            p=0.5,
        ).to(session.device)
        with torch.no_grad():
            scored = token_dependency(model, inputs, perturbed, mask, temperature=cfg.temperature)
        old_lp, dep = scored.logprobs, scored.dependency

        # --- advantages and token masks
        adv = V.grpo_advantages(rewards.to(session.device), group_ids.to(session.device))
        if method == "vppo":
            adv = V.shape_advantages(adv, dep, mask, beta_min=cfg.beta_min)  # TAS
            keep = V.token_filter_mask(dep, mask, k=cfg.k)  # TGF
            factors = V.advantage_factors(dep, mask, beta_min=cfg.beta_min)  # for the log
        else:
            keep, factors = None, torch.ones(len(repeated))

        # --- policy update: a few epochs over the batch
        model.train()
        for _ in range(cfg.ppo_epochs):
            lp = token_logprobs(model, inputs, mask, temperature=cfg.temperature)
            out = V.vppo_loss(lp, old_lp, adv, mask, keep, entropy_coef=cfg.entropy_coef)
            opt.zero_grad()
            out.loss.backward()
            torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
            opt.step()
        model.eval()

        # --- measurements (the analysis module: per step, and streamed over the run)
        step_stats = _accumulator()
        step_stats.update(dep, mask, group_ids=group_ids.to(session.device))
        result.dependency.merge(step_stats)
        st = step_stats.summary(prefix="")
        acc = session.accuracy() if (step % cfg.eval_every == 0 or step == cfg.steps) else None
        result.logs.append(
            StepLog(
                step=step,
                reward=float(rewards.mean()),
                accuracy=acc,
                kept_frac=float(out.kept_frac),
                dep_mean=st["token/mean"],
                dep_p50=st["token/p50"],
                dep_p90=st["token/p90"],
                dep_max=st["token/max"],
                top20_share=st["trajectory/top20_share"],
                factor_min=float(factors.min()),
                factor_max=float(factors.max()),
                clip_frac=float(out.clip_frac),
                response_len=st["trajectory/length_mean"],
            )
        )
        if step == cfg.steps:  # one decoded response, for the per-token strip
            b = int(torch.argmax(rewards)) if rewards.any() else 0
            idx = mask[b].nonzero().squeeze(-1)
            result.example_tokens = session.tokenizer.convert_ids_to_tokens(inputs["input_ids"][b, idx].tolist())
            result.example_dependency = dep[b, idx].tolist()
            kept = V.token_filter_mask(dep, mask, k=cfg.k)
            result.example_kept = kept[b, idx].tolist()
        if progress:
            progress(1)
    result.final_accuracy = result.logs[-1].accuracy or 0.0
    return result


def snapshot(model: torch.nn.Module) -> dict[str, Tensor]:
    return copy.deepcopy(model.state_dict())
