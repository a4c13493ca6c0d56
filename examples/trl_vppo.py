"""VPPO with TRL: a tiny Qwen2-VL learns "what colour is the circle ?" with ``VPPOTrainer`` (CPU, offline).

``VPPOTrainer`` is TRL's ``GRPOTrainer`` with VPPO's perturbed forward pass, Trajectory-level
Advantage Shaping, Token-level Gradient Filtering and ``vppo_loss``; everything else (sampling,
rewards, GRPO advantages, batching, logging) is TRL's. The model, tokenizer and processor are built
from configs (``vppo_core.integrations.tiny_vlm``), the images are drawn with Pillow, and the reward
is verifiable: 1 if the first colour word of the completion is the circle's colour (0.1 for
another colour: the answer format).

Run: python examples/trl_vppo.py [--steps 4] [--dependency kl|sampled]
Needs: pip install "vppo_core[hf,trl]"   (tests/test_trl.py runs this setup)
"""

import argparse
import dataclasses
import os
from collections.abc import Sequence
from typing import Any

os.environ.setdefault("HF_HUB_OFFLINE", "1")  # nothing to download; also keeps TRL's telemetry offline

from datasets import Dataset
from trl import GRPOConfig

from vppo_core.demo.task import COLOURS, QUESTION, make_dataset, reward
from vppo_core.integrations.tiny_vlm import SPECIAL_TOKENS, tiny_processor, tiny_qwen_vl
from vppo_core.integrations.trl import VPPOTrainer

# A small vocabulary, so that even the random tiny model says colour words and rewards vary.
WORDS: tuple[str, ...] = (*QUESTION.split(), *COLOURS, ".")


def colour_reward(completions: list[list[dict[str, str]]], answer: list[str], **_: Any) -> list[float]:
    """TRL reward function, verifiable: 1 for the right colour first, 0.1 for a wrong one (the format), else 0."""
    rewards = []
    for completion, gold in zip(completions, answer):
        text = completion[-1]["content"]
        named = any(word in COLOURS for word in text.split())
        rewards.append(reward(text, gold) or (0.1 if named else 0.0))
    return rewards


def no_activation_checkpointing() -> dict[str, bool]:
    """GRPOConfig's switch for activation checkpointing (which TRL turns on by default), turned off.

    transformers 5.23 renamed ``gradient_checkpointing`` to ``activation_checkpointing`` and warns
    about the old name; 5.10 to 5.22 know only the old one.
    """
    names = {field.name for field in dataclasses.fields(GRPOConfig)}
    return {"activation_checkpointing" if "activation_checkpointing" in names else "gradient_checkpointing": False}


def tiny_dataset(n: int, seed: int = 0) -> Dataset:
    """``n`` conversational prompts with an ``image`` and the gold ``answer`` (TRL's VLM dataset format)."""
    rows = [
        {"prompt": [{"role": "user", "content": ex.question}], "image": ex.image, "answer": ex.answer}
        for ex in make_dataset(n, seed)
    ]
    return Dataset.from_list(rows)


def make_trainer(
    output_dir: str,
    *,
    steps: int = 4,
    num_generations: int = 4,
    per_device_batch: int = 4,
    accumulation: int = 2,
    learning_rate: float = 1e-2,
    seed: int = 0,
    **vppo: Any,
) -> VPPOTrainer:
    """A ``VPPOTrainer`` on a fresh tiny Qwen2-VL; ``vppo`` goes to VPPOTrainer (``k``, ``dependency``, ...).

    Each optimizer step uses one generation batch of ``per_device_batch * accumulation`` completions
    (``num_generations`` per prompt), split into ``accumulation`` micro-batches.
    """
    processor = tiny_processor("qwen2_vl", words=WORDS)
    model = tiny_qwen_vl("qwen2_vl", processor.tokenizer, seed=seed)
    # A random model would sometimes sample an image placeholder, which the next forward cannot score.
    suppress = processor.tokenizer.convert_tokens_to_ids(list(SPECIAL_TOKENS[3:7]))
    prompts = steps * per_device_batch * accumulation // num_generations
    args = GRPOConfig(
        output_dir=output_dir,
        max_steps=steps,
        per_device_train_batch_size=per_device_batch,
        gradient_accumulation_steps=accumulation,
        num_generations=num_generations,
        max_completion_length=8,
        learning_rate=learning_rate,
        epsilon_high=0.28,  # DAPO's clip-higher, as in VPPO-RL
        generation_kwargs={"suppress_tokens": suppress},
        **no_activation_checkpointing(),
        bf16=False,  # GRPOConfig defaults to bf16 autocast, even on the CPU
        use_cpu=True,
        seed=seed,
        logging_steps=1,
        save_strategy="no",
        report_to="none",
    )
    return VPPOTrainer(
        model=model,
        processing_class=processor,
        reward_funcs=colour_reward,
        train_dataset=tiny_dataset(prompts, seed),
        args=args,
        **vppo,
    )


def main(argv: Sequence[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--steps", type=int, default=4)
    parser.add_argument("--k", type=float, default=0.4, help="TGF: fraction of each completion's tokens kept")
    parser.add_argument("--dependency", choices=("kl", "sampled"), default="kl")
    parser.add_argument("--out", default="runs/trl_vppo")
    opts = parser.parse_args(argv)
    trainer = make_trainer(opts.out, steps=opts.steps, k=opts.k, dependency=opts.dependency)
    trainer.train()
    keys = ("reward", "vppo/kept_frac", "vppo/tas_factor_min", "vppo/tas_factor_max", "vppo/dependency_mean", "loss")
    print("step  " + "  ".join(f"{k:>20}" for k in keys))
    for row in trainer.state.log_history:
        if "vppo/kept_frac" in row:
            print(f"{row['step']:4d}  " + "  ".join(f"{row[k]:20.4f}" for k in keys))


if __name__ == "__main__":
    main()
