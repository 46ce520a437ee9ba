"""The demo trainer: teaches the tiny model a small built-in task and pushes after every step.

It exists to show the whole loop on one machine, and to give tests a deterministic, briefly
trained checkpoint (a random tiny model has near-tied logits, useless for comparing engines).
"""

from __future__ import annotations

import copy
import logging
from collections.abc import Sequence
from pathlib import Path

import grpc
import torch
from transformers import AutoConfig, AutoModelForCausalLM, AutoTokenizer, PreTrainedModel

from trainer_side.publisher import Publisher
from weightsync.v1 import weightsync_pb2 as pb
from weightsync.v1 import weightsync_pb2_grpc as pb_grpc

__all__ = ["TASK", "greedy", "new_model", "run_demo", "train_iterations"]

logger = logging.getLogger(__name__)

# Sequences the model learns to continue; the demo prompts with their first words.
TASK = [
    "monday tuesday wednesday thursday friday saturday sunday",
    "one two three four five six seven eight nine ten",
    "red orange yellow green blue purple",
    "the cat sat on the mat and the dog sat on the log",
    "january february march april may june july",
]
PROMPT = "the cat sat"


def new_model(model_dir: Path, seed: int = 0) -> PreTrainedModel:
    """The model of `model_dir` with seeded random weights, in float32 for training."""
    torch.manual_seed(seed)
    config = AutoConfig.from_pretrained(model_dir)
    return AutoModelForCausalLM.from_config(config, dtype=torch.float32)


def train_iterations(model: PreTrainedModel, tokenizer, iterations: int, lr: float = 3e-3) -> float:  # type: ignore[no-untyped-def]
    """Runs `iterations` deterministic AdamW steps on TASK; returns the last loss."""
    batch = tokenizer(TASK, return_tensors="pt", padding=True)
    labels = batch["input_ids"].masked_fill(batch["attention_mask"] == 0, -100)
    optimizer = torch.optim.AdamW(model.parameters(), lr=lr)
    model.train()
    loss = torch.tensor(0.0)
    for _ in range(iterations):
        loss = model(**batch, labels=labels).loss
        loss.backward()
        optimizer.step()
        optimizer.zero_grad()
    model.eval()
    return float(loss.detach())


def greedy(model: PreTrainedModel, prompt_ids: Sequence[int], max_tokens: int) -> list[int]:
    """Hugging Face transformers' own greedy decoding: the reference every engine must equal."""
    with torch.no_grad():
        out = model.generate(
            torch.tensor([list(prompt_ids)]),
            attention_mask=torch.ones(1, len(prompt_ids), dtype=torch.long),
            max_new_tokens=max_tokens,
            do_sample=False,
        )
    tokens: list[int] = out[0, len(prompt_ids) :].tolist()
    return tokens


def run_demo(
    model_dir: Path,
    rollouts: Sequence[str],
    steps: int,
    iterations_per_step: int = 20,
    token: str | None = None,
    credentials: grpc.ChannelCredentials | None = None,
    shared_memory: Path | None = None,
) -> bool:
    """Trains, pushes after every step and checks each rollout answers as the trainer's own model.

    Returns True if every push committed and every rollout's greedy answer matched.
    """
    tokenizer = AutoTokenizer.from_pretrained(model_dir)
    model = new_model(model_dir)
    prompt_ids = tokenizer(PROMPT, add_special_tokens=False)["input_ids"]
    channel = (lambda a: grpc.secure_channel(a, credentials)) if credentials else grpc.insecure_channel
    generators = {a: pb_grpc.GenerateStub(channel(a)) for a in rollouts}
    all_ok = True
    with Publisher(rollouts, token=token, credentials=credentials, shared_memory=shared_memory) as publisher:
        start = 1 + max((s.weight_version for s in publisher.status().values() if not isinstance(s, str)), default=0)
        for version in range(start, start + steps):
            loss = train_iterations(model, tokenizer, iterations_per_step)
            results = publisher.push(model.state_dict(), version)
            pushed = copy.deepcopy(model).to(torch.bfloat16)  # exactly the weights that went on the wire
            expected = greedy(pushed, prompt_ids, 12)
            for result in results:
                if not result.ok:
                    print(f"step {version}: {result.line()}")
                    all_ok = False
                    continue
                answer = generators[result.address].Generate(
                    pb.GenerateRequest(prompt=PROMPT, max_tokens=12, temperature=0, min_weight_version=version),
                    timeout=60,
                )
                same = list(answer.token_ids) == expected
                all_ok &= same
                print(
                    f"step {version}  loss {loss:5.2f}  sync {result.seconds * 1000:6.1f} ms  "
                    f"rollout v{answer.weight_version}: {PROMPT!r} -> {answer.text!r}  "
                    f"{'== trainer' if same else '!= trainer ' + repr(tokenizer.decode(expected))}"
                )
    return all_ok
