"""PEFT LoRA adapters over the tiny model for tests, and their transformers + PEFT references (merged)."""

from __future__ import annotations

import copy
import threading
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from peft import LoraConfig, get_peft_model, get_peft_model_state_dict

from trainer_side.publisher import Publisher
from trainer_side.train import greedy
from weightsync.v1 import weightsync_pb2 as pb
from weightsync.v1 import weightsync_pb2_grpc as pb_grpc

from conftest import reference_model

PROMPTS = ["the cat sat", "monday tuesday", "one two three", "january february"]
MAX_TOKENS = 12
TARGETS = ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"]
# Seeds whose merged models keep a gap of at least 0.25 logits between the best two tokens at every greedy
# step (the base alone: 0.19), so no near-tie decides a token; each changes 2-3 of the answers.
SEEDS = (1, 3, 4)


@dataclass(frozen=True)
class Adapter:
    """One adapter version: PEFT's tensors (bf16, PEFT's names), its adapter_config.json, what it should answer."""

    state: dict[str, torch.Tensor]
    config: dict[str, Any]
    reference: dict[str, list[int]]  # prompt -> greedy tokens of transformers + PEFT, merged

    @property
    def nbytes(self) -> int:
        return sum(t.numel() * t.element_size() for t in self.state.values())


def three_adapters(
    model_dir: Path, base_state: dict[str, torch.Tensor], tokenizer
) -> tuple[dict[str, list[int]], list[Adapter]]:  # type: ignore[no-untyped-def]
    """What the base alone answers (transformers), and three adapter versions over it, each answering differently."""
    base = reference_model(model_dir, base_state)
    plain = {p: greedy(base, prompt_ids(tokenizer, p), MAX_TOKENS) for p in PROMPTS}
    made = [make_adapter(model_dir, base_state, tokenizer, seed) for seed in SEEDS]
    assert all(a.reference != plain for a in made), "an adapter that changes no answer proves nothing"
    assert len({str(a.reference) for a in made}) == 3
    return plain, made


def round_to_bf16(model: torch.nn.Module) -> None:
    """Rounds a PEFT model's adapter weights (fp32, PEFT's default) to bf16 values: the adapter that travels."""
    with torch.no_grad():
        for name, param in model.named_parameters():
            if "lora_" in name:
                param.copy_(param.to(torch.bfloat16))


def prompt_ids(tokenizer, prompt: str) -> list[int]:  # type: ignore[no-untyped-def]
    ids: list[int] = tokenizer(prompt, add_special_tokens=False)["input_ids"]
    return ids


def make_adapter(model_dir: Path, base_state: dict[str, torch.Tensor], tokenizer, seed: int) -> Adapter:  # type: ignore[no-untyped-def]
    """A rank-8 adapter on every projection, seeded, over the bf16 base; B is drawn like A (PEFT's
    init_lora_weights=False), not zero."""
    base = reference_model(model_dir, base_state)
    torch.manual_seed(seed)  # after the base: building it seeds too
    config = LoraConfig(r=8, lora_alpha=16, target_modules=TARGETS, init_lora_weights=False)
    model = get_peft_model(base, config)
    round_to_bf16(model)
    state = {k: v.detach().clone() for k, v in get_peft_model_state_dict(model).items()}
    merged = copy.deepcopy(model).merge_and_unload().eval()
    reference = {p: greedy(merged, prompt_ids(tokenizer, p), MAX_TOKENS) for p in PROMPTS}
    return Adapter(state=state, config=config.to_dict(), reference=reference)


def replies(stub: pb_grpc.GenerateStub, tokenizer) -> dict[str, pb.GenerateResponse]:  # type: ignore[no-untyped-def]
    """Each prompt's greedy Generate reply."""
    out = {}
    for prompt in PROMPTS:
        request = pb.GenerateRequest(prompt_token_ids=prompt_ids(tokenizer, prompt), max_tokens=MAX_TOKENS)
        out[prompt] = stub.Generate(request, timeout=60)
    return out


def answers(stub: pb_grpc.GenerateStub, tokenizer) -> dict[str, tuple[list[int], int]]:  # type: ignore[no-untyped-def]
    """Each prompt's greedy tokens and the version that produced them."""
    return {p: (list(reply.token_ids), reply.weight_version) for p, reply in replies(stub, tokenizer).items()}


def swap_under_load(  # type: ignore[no-untyped-def]
    publisher: Publisher,
    stub: pb_grpc.GenerateStub,
    adapters: list[Adapter],
    first: int,
    tokenizer,
    base: tuple[dict[str, torch.Tensor], dict[str, list[int]], str],
    rounds: int = 2,
) -> tuple[list[int], list[tuple[str, int, list[int], int, str]]]:
    """Pushes the adapters in turn as versions first, first + 1, ... (and `base`, the served base's state,
    its answers and fingerprint, once more as a full version midway) while two clients ask all along.

    Returns every version that answered and the answers whose tokens, adapter version or base fingerprint
    are not that version's.
    """
    base_state, plain, fingerprint = base
    expected: dict[int, tuple[dict[str, list[int]], int]] = {}  # version -> (answers, adapter version)
    stop, seen, wrong = threading.Event(), [], []

    def ask() -> None:
        while not stop.is_set():
            for prompt, reply in replies(stub, tokenizer).items():
                version, tokens = reply.weight_version, list(reply.token_ids)
                seen.append(version)
                reference, adapter_version = expected[version]
                if (tokens, reply.adapter_version, reply.base_fingerprint) != (
                    reference[prompt],
                    adapter_version,
                    fingerprint,
                ):
                    wrong.append((prompt, version, tokens, reply.adapter_version, reply.base_fingerprint))

    expected[first] = (adapters[0].reference, first)
    assert publisher.push_adapter(adapters[0].state, adapters[0].config, first)[0].ok
    threads = [threading.Thread(target=ask) for _ in range(2)]
    for t in threads:
        t.start()
    try:
        version = first
        pushes: list[Adapter | None] = (adapters[1:] + adapters[:1]) * rounds
        pushes.insert(len(pushes) // 2, None)  # the base as a full version: adapter version 0
        for adapter in pushes:
            version += 1
            if adapter is None:
                expected[version] = (plain, 0)
                [result] = publisher.push(base_state, version)
            else:
                expected[version] = (adapter.reference, version)
                [result] = publisher.push_adapter(adapter.state, adapter.config, version)
            assert result.ok, result.line()
    finally:
        stop.set()
        for t in threads:
            t.join()
    return seen, wrong
