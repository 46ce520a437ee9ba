"""Where vLLM's own LoRA path (LLM(enable_lora=True) + LoRARequest) parts from transformers + PEFT (#24).

Builds a PEFT rank-8 adapter on every projection of the tiny model (bf16 values, non-zero B), then scores
one token sequence (a prompt and transformers' merged greedy continuation) with vLLM's prompt_logprobs,
with and without the adapter, and compares each position's logprob of the actual next token with
transformers' under several merges of the same adapter (all modules; all but one kind; other scalings).
The merge vLLM's numbers match names what vLLM applied. Run under the shared lock:

    flock /work/tools/vllm.lock env PYTHONPATH=$PWD python scripts/vllm_lora_check.py [--trained] [--out FILE.json]

All figures are the largest absolute difference over every scored position of the 4 prompts.
"""

from __future__ import annotations

import argparse
import itertools
import json
import math
import os
import tempfile
from pathlib import Path
from typing import Any

import torch
from peft import LoraConfig, get_peft_model, get_peft_model_state_dict
from transformers import AutoModelForCausalLM, AutoTokenizer

MODEL = Path(__file__).resolve().parents[1] / "models" / "tiny"
TARGETS = ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"]
RANK, ALPHA = 8, 16
PROMPTS = ["the cat sat", "monday tuesday", "one two three", "january february"]
TOKENS = 12


def base_model() -> Any:
    return AutoModelForCausalLM.from_pretrained(MODEL, dtype=torch.bfloat16).eval()


def trained_base(out: Path) -> Path:
    """The tests' base (tests/conftest.py trained_state: 60 AdamW steps on TASK), saved in bf16 as a model folder."""
    import shutil

    from trainer_side.train import new_model, train_iterations

    tokenizer = AutoTokenizer.from_pretrained(MODEL)
    model = new_model(MODEL)
    train_iterations(model, tokenizer, 60)
    model.to(torch.bfloat16).save_pretrained(out)
    for f in MODEL.iterdir():
        if f.name.startswith(("tokenizer", "vocab", "merges", "special", "generation")):
            shutil.copy(f, out / f.name)
    return out


def make_adapter(seed: int, out: Path) -> dict[str, torch.Tensor]:
    """A PEFT adapter with bf16 values saved to `out` (save_pretrained); returns its tensors (fp32, bf16 values)."""
    model = base_model()
    torch.manual_seed(seed)
    peft = get_peft_model(model, LoraConfig(r=RANK, lora_alpha=ALPHA, target_modules=TARGETS, init_lora_weights=False))
    with torch.no_grad():
        for name, param in peft.named_parameters():
            if "lora_" in name:
                param.copy_(param.to(torch.bfloat16))
    peft.save_pretrained(out)
    return {k: v.detach().clone() for k, v in get_peft_model_state_dict(peft).items()}


def merged(adapter: dict[str, torch.Tensor], modules: list[str], scaling: float) -> Any:
    """The base with B @ A * scaling added (fp32, rounded to bf16, as PEFT's merge) on `modules` only."""
    model = base_model()
    weights = dict(model.named_parameters())
    with torch.no_grad():
        for name, a in adapter.items():
            if ".lora_A." not in name:
                continue
            module = name.removeprefix("base_model.model.").split(".lora_A.")[0]
            if module.rsplit(".", 1)[-1] not in modules:
                continue
            b = adapter[name.replace(".lora_A.", ".lora_B.")]
            w = weights[module + ".weight"]
            w.copy_((w.float() + (b.float() @ a.float()) * scaling).to(torch.bfloat16))
    return model


def greedy(model: Any, ids: list[int], n: int) -> list[int]:
    with torch.no_grad():
        out = model.generate(torch.tensor([ids]), max_new_tokens=n, do_sample=False, min_new_tokens=n)
    return [int(t) for t in out[0, len(ids) :]]


def token_logprobs(model: Any, seq: list[int]) -> list[float]:
    """log p(seq[i] | seq[:i]) for i >= 1, from the model's logits in fp32."""
    with torch.no_grad():
        logits = model(torch.tensor([seq])).logits[0].float()
    logp = torch.log_softmax(logits, dim=-1)
    return [float(logp[i - 1, seq[i]]) for i in range(1, len(seq))]


def vllm_scores(seqs: list[list[int]], adapter_dir: Path, prompts: list[list[int]], max_rank: int) -> dict[str, Any]:
    """vLLM's prompt logprobs of each sequence with and without the adapter, and its greedy tokens with it."""
    os.environ.setdefault("VLLM_CPU_OMP_THREADS_BIND", "nobind")
    os.environ.setdefault("VLLM_ENABLE_V1_MULTIPROCESSING", "0")
    from vllm import LLM, SamplingParams
    from vllm.inputs import TokensPrompt
    from vllm.lora.request import LoRARequest

    llm = LLM(
        model=str(MODEL),
        dtype="bfloat16",
        enable_lora=True,
        max_lora_rank=max_rank,
        max_model_len=512,
        enforce_eager=True,
        kv_cache_memory_bytes=1 << 30,
    )
    lora = LoRARequest("adapter", 1, str(adapter_dir))
    score = SamplingParams(max_tokens=1, prompt_logprobs=0, temperature=0)

    def scored(request: LoRARequest | None) -> list[list[float]]:
        outs = llm.generate([TokensPrompt(prompt_token_ids=s) for s in seqs], score, lora_request=request)
        pairs = zip(seqs, outs, strict=True)
        return [[float(p[s[i]].logprob) for i, p in enumerate(o.prompt_logprobs) if p] for s, o in pairs]

    def generated(batch: list[list[int]]) -> list[tuple[list[int], list[float]]]:
        """Greedy tokens with the adapter, and each one's logprob as decoding computed it."""
        params = SamplingParams(max_tokens=TOKENS, temperature=0, ignore_eos=True, logprobs=0)
        outs = llm.generate([TokensPrompt(prompt_token_ids=p) for p in batch], params, lora_request=lora)
        got = []
        for o in outs:
            ids = list(o.outputs[0].token_ids)
            got.append((ids, [float(lp[t].logprob) for t, lp in zip(ids, o.outputs[0].logprobs, strict=True)]))
        return got

    return {
        "lora": scored(lora),
        "base": scored(None),
        "batched": generated(prompts),  # the prompts decoded together
        "single": [generated([p])[0] for p in prompts],  # one request at a time
    }


def lead(model: Any, prompt: list[int], got: list[int], want: list[int]) -> float | None:
    """At the first token where `got` leaves `want`: how far the model's logit of want's token leads got's."""
    i = next((i for i, (g, w) in enumerate(zip(got, want, strict=True)) if g != w), None)
    if i is None:
        return None
    with torch.no_grad():
        logits = model(torch.tensor([prompt + want[:i]])).logits[0, -1].float()
    return float(logits[want[i]] - logits[got[i]])


def gap(a: list[list[float]], b: list[list[float]]) -> float:
    """The largest per-token logprob difference."""
    return max(abs(x - y) for ra, rb in zip(a, b, strict=True) for x, y in zip(ra, rb, strict=True))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--seed", type=int, default=1)
    parser.add_argument("--out", type=Path)
    parser.add_argument("--trained", action="store_true", help="the tests' trained base, not models/tiny's weights")
    parser.add_argument("--base", type=Path, help="a model folder --trained made before (reused, not retrained)")
    parser.add_argument("--max-lora-rank", type=int, default=RANK)
    args = parser.parse_args()
    global MODEL
    if args.base:
        MODEL = args.base
    elif args.trained:
        MODEL = trained_base(Path(tempfile.mkdtemp(prefix="ws-lora-base-")))
    tokenizer = AutoTokenizer.from_pretrained(MODEL)
    prompts = [tokenizer(p, add_special_tokens=False)["input_ids"] for p in PROMPTS]
    with tempfile.TemporaryDirectory() as tmp:
        adapter = make_adapter(args.seed, Path(tmp))
        scaling = ALPHA / RANK
        full = merged(adapter, TARGETS, scaling)
        references = [greedy(full, p, TOKENS) for p in prompts]
        seqs = [p + r for p, r in zip(prompts, references, strict=True)]
        variants: dict[str, Any] = {"base": base_model(), f"all, alpha/r={scaling:g}": full}
        for module in TARGETS:
            variants[f"all but {module}"] = merged(adapter, [m for m in TARGETS if m != module], scaling)
        for name, s in (("alpha", ALPHA), ("1", 1.0), ("alpha/sqrt(r)", ALPHA / math.sqrt(RANK))):
            variants[f"all, scaling {name}"] = merged(adapter, TARGETS, s)
        hf = {name: [token_logprobs(m, s) for s in seqs] for name, m in variants.items()}
        vllm = vllm_scores(seqs, Path(tmp), prompts, args.max_lora_rank)
        # Decoding's own logprobs, against transformers' on the sequences vLLM generated.
        decoded: dict[str, Any] = {}
        for how in ("batched", "single"):
            runs = vllm[how]
            seqs_v = [p + ids for p, (ids, _) in zip(prompts, runs, strict=True)]
            decoded[how] = {
                # At each prompt's first differing token: transformers' merged logit of its pick minus vLLM's pick.
                "merged_logit_lead_at_divergence": [
                    lead(full, p, ids, r) for p, (ids, _), r in zip(prompts, runs, references, strict=True)
                ],
                "greedy_equal_tokens_per_prompt": [
                    sum(1 for _ in itertools.takewhile(lambda t: t[0] == t[1], zip(ids, r, strict=True)))
                    for (ids, _), r in zip(runs, references, strict=True)
                ],
                "decode_logprobs_vs": {
                    name: gap(
                        [lps for _, lps in runs],
                        [token_logprobs(m, s)[len(p) - 1 :] for p, s in zip(prompts, seqs_v, strict=True)],
                    )
                    for name, m in (("base", variants["base"]), ("merged", full))
                },
            }
    from vllm import __version__ as vllm_version

    setup = {
        "base": "trained (tests' trained_state)" if args.trained or args.base else "models/tiny",
        "adapter": f"PEFT LoRA r={RANK} alpha={ALPHA} on {','.join(TARGETS)}, seed {args.seed}, bf16 values",
        "max_lora_rank": args.max_lora_rank,
        "dtype": "bfloat16",
        "vllm": vllm_version,
        "torch": torch.__version__,
        "prompts": PROMPTS,
        "tokens": TOKENS,
    }
    report = {
        "setup": setup,
        "prefill_vllm_base_vs_hf_base": gap(vllm["base"], hf["base"]),
        "prefill_vllm_lora_vs": {name: gap(vllm["lora"], scores) for name, scores in hf.items()},
        "decode": decoded,
    }
    print(json.dumps(report, indent=2))
    if args.out:
        args.out.write_text(json.dumps(report, indent=2) + "\n")


if __name__ == "__main__":
    main()
