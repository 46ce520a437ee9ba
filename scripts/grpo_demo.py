"""`make grpo-demo`: TRL's GRPOTrainer trains the tiny model through weightsync, on CPU, in a few minutes.

A rollout boots on dummy weights; the policy is the tiny model after a few supervised steps on the demo
trainer's sentences (so it sometimes says "dog" after "the"). The reward is readable: 1 for a completion
that contains the word "dog", else 0. Every step WeightsyncRollout pushes the policy (version = step) and
samples the completions on the rollout, on-policy. The reward rises as GRPO makes "dog" likelier.
"""

from __future__ import annotations

import argparse
import os
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

os.environ.setdefault("TRL_EXPERIMENTAL_SILENCE", "1")  # rollout_func is "experimental" in TRL 1.16
# TRL sets VLLM_LOGGING_LEVEL=ERROR on import unless set; rollouts started from here inherit it
# and would log nothing of vLLM's boot. INFO is vLLM's own default.
os.environ.setdefault("VLLM_LOGGING_LEVEL", "INFO")

from datasets import Dataset
from transformers import AutoTokenizer
from trl import GRPOConfig, GRPOTrainer

from rollout_side.process import RolloutProcess
from trainer_side.integrations.trl import WeightsyncRollout
from trainer_side.train import new_model, train_iterations

TARGET = "dog"
PROMPTS = ["the", "on the", "and the", "sat on the"]


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--engine", default="vllm", choices=["vllm", "torch"])
    parser.add_argument("--model", type=Path, default=Path("models/tiny"))
    parser.add_argument("--steps", type=int, default=12)
    parser.add_argument("--plot", type=Path, default=Path("grpo_demo.png"))
    args = parser.parse_args()

    log = Path(tempfile.gettempdir()) / f"weightsync-grpo-demo-rollout-{os.getpid()}.log"
    started = time.monotonic()
    print(f"1. starting a rollout ({args.engine} engine, dummy weights, processed logprobs); its log: {log}")
    serve_args = ["--logprobs-mode", "processed_logprobs", "--log-level", "WARNING"]
    process = RolloutProcess(args.model, engine=args.engine, args=serve_args, log=log)
    try:
        tokenizer = AutoTokenizer.from_pretrained(args.model)
        model = new_model(args.model)
        loss = train_iterations(model, tokenizer, 12)
        print(f"2. the policy: the tiny model after 12 supervised steps (loss {loss:.2f})")
        print(f'3. GRPO, {args.steps} steps; reward: 1 if a completion contains "{TARGET}", else 0')
        rewards: list[float] = []
        with WeightsyncRollout([process.address]) as rollout:

            def reward_target(completions: list[str], weight_version: list[int], **kwargs: Any) -> list[float]:
                scores = [float(TARGET in c.split()) for c in completions]
                rewards.append(sum(scores) / len(scores))
                push = rollout.pushes[-1]
                print(
                    f"   step {len(rewards):2d}  mean reward {rewards[-1]:.2f}  "
                    f"completions from version(s) {sorted(set(weight_version))}  push {push.seconds * 1000:.0f} ms"
                )
                return scores

            trainer = GRPOTrainer(
                model=model,
                reward_funcs=reward_target,
                args=_config(args.steps),
                train_dataset=Dataset.from_dict({"prompt": PROMPTS * args.steps * 4}),
                processing_class=tokenizer,
                rollout_func=rollout,
            )
            trainer.train()
        first, last = rewards[0], rewards[-1]
        print(f"4. mean reward rose from {first:.2f} (step 1) to {last:.2f} (step {len(rewards)}): {last - first:+.2f}")
        _plot(rewards, args.plot)
        print(f"   reward per step plotted in {args.plot}; {time.monotonic() - started:.0f} s in all")
        return 0 if last > first else 1
    finally:
        process.stop()


def _config(steps: int) -> GRPOConfig:
    """Small enough for 2 CPU cores: 4 prompts x 8 completions of 8 tokens per step."""
    return GRPOConfig(
        output_dir=tempfile.mkdtemp(prefix="grpo-demo-"),
        max_steps=steps,
        per_device_train_batch_size=32,
        num_generations=8,
        max_completion_length=8,
        learning_rate=1e-2,
        temperature=1.0,
        beta=0.0,
        gradient_checkpointing=False,
        logging_strategy="no",  # the demo prints its own line per step
        save_strategy="no",
        report_to="none",
        disable_tqdm=True,
        log_level="warning",
        use_cpu=True,
        bf16=False,
        seed=0,
    )


def _plot(rewards: list[float], path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    figure, axes = plt.subplots(figsize=(6, 3.5))
    axes.plot(range(1, len(rewards) + 1), rewards, marker="o")
    axes.set(xlabel="GRPO step (= weight version served)", ylabel=f'mean reward ("{TARGET}" in completion)')
    axes.set_ylim(0, 1)
    axes.set_title("TRL GRPOTrainer through weightsync")
    axes.grid(alpha=0.3)
    figure.tight_layout()
    figure.savefig(path, dpi=120)


if __name__ == "__main__":
    sys.exit(main())
