"""`python -m bench.swap_policies [--quick]`: swap latency per swap policy, and Generate with n > 1.

Swap latency: for each --swap-policy (drain, abort, continue) a real rollout process (--engine torch or
vllm, models/tiny) takes a first version, then, for every run, --inflight long greedy Generate calls
(--long-tokens tokens each, ignore_eos) start, and once they are decoding the trainer pushes the next
version. The figure is the Commit's time as the rollout reports it (CommitResponse.swap_seconds: drain
waits for the in-flight requests, abort ends them at the next token, continue swaps at the next token
and goes on; on vLLM continue aborts the in-flight requests and resubmits each as prompt + its tokens
so far once the new version is in); the push's whole time and how the in-flight requests ended, with how
long they took, are recorded beside it.

Throughput: one Generate with n = --n against --n concurrent single Generate calls (same seeds,
--max-tokens each, ignore_eos), in generated tokens per second, on the same rollout.

Writes bench/results/swap_policies.json (swap_policies_vllm.json for --engine vllm; every run's numbers,
median/min/max). Nothing is asserted.
"""

from __future__ import annotations

import argparse
import json
import logging
import sys
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Any

import grpc
import torch

from bench.measure import machine, summary
from rollout_side.process import RolloutProcess
from trainer_side.publisher import Publisher
from trainer_side.train import new_model
from weightsync.v1 import weightsync_pb2 as pb
from weightsync.v1 import weightsync_pb2_grpc as pb_grpc

ROOT = Path(__file__).resolve().parents[1]
logger = logging.getLogger("bench.swap_policies")
POLICIES = ("drain", "abort", "continue")
PROMPT = "the cat sat"


def states(model_dir: Path, count: int) -> list[dict[str, torch.Tensor]]:
    """`count` distinct versions of the model's weights (seeded, float32)."""
    return [new_model(model_dir, seed=seed).state_dict() for seed in range(count)]


def long_generate(stub: pb_grpc.GenerateStub, tokens: int) -> dict[str, Any]:
    started = time.perf_counter()
    request = pb.GenerateRequest(prompt=PROMPT, max_tokens=tokens, temperature=0, ignore_eos=True)
    try:
        out = stub.Generate(request, timeout=600)
    except grpc.RpcError as error:
        return {"seconds": time.perf_counter() - started, "error": error.code().name}
    versions = sorted(set(out.token_weight_versions)) if out.token_weight_versions else [out.weight_version]
    return {
        "seconds": time.perf_counter() - started,
        "finish_reason": out.finish_reason,
        "tokens": len(out.token_ids),
        "versions": versions,
    }


def swap_latency(
    model_dir: Path, policy: str, args: argparse.Namespace, versions: list[dict[str, Any]]
) -> dict[str, Any]:
    rollout = RolloutProcess(model_dir, engine=args.engine, args=["--swap-policy", policy])
    runs: list[dict[str, Any]] = []
    try:
        channel = grpc.insecure_channel(rollout.address)
        stub = pb_grpc.GenerateStub(channel)
        with Publisher([rollout.address], progress=False) as publisher:
            [first] = publisher.push(versions[0], version=1)
            assert first.ok, first.error
            # The whole long request alone, on this rollout, for scale.
            alone = long_generate(stub, args.long_tokens)
            for run in range(args.runs):
                with ThreadPoolExecutor(args.inflight) as pool:
                    calls = [pool.submit(long_generate, stub, args.long_tokens) for _ in range(args.inflight)]
                    time.sleep(args.lead)  # let the first request get well into decoding
                    version = run + 2
                    started = time.perf_counter()
                    [result] = publisher.push(versions[(run + 1) % len(versions)], version=version)
                    push_seconds = time.perf_counter() - started
                    inflight = [call.result() for call in calls]
                if not result.ok:
                    logger.warning("%s: push of version %d failed: %s", policy, version, result.error)
                runs.append(
                    {
                        "version": version,
                        "ok": result.ok,
                        "commit_seconds": result.swap_seconds,
                        "push_seconds": push_seconds,
                        "inflight": inflight,
                    }
                )
                logger.info("%s run %d: commit %.3f s, push %.3f s", policy, run, result.swap_seconds, push_seconds)
        channel.close()
    finally:
        rollout.stop()
    ok = [r for r in runs if r["ok"]]
    return {
        "long_request_alone_seconds": alone["seconds"],
        "commit_seconds": summary([r["commit_seconds"] for r in ok]) if ok else None,
        "push_seconds": summary([r["push_seconds"] for r in ok]) if ok else None,
        "runs": runs,
    }


def tokens_per_second(seconds: float, tokens: int) -> float:
    return tokens / seconds if seconds else 0.0


def throughput(model_dir: Path, args: argparse.Namespace, version: dict[str, Any]) -> dict[str, Any]:
    rollout = RolloutProcess(model_dir, engine=args.engine)
    try:
        channel = grpc.insecure_channel(rollout.address)
        stub = pb_grpc.GenerateStub(channel)
        with Publisher([rollout.address], progress=False) as publisher:
            [pushed] = publisher.push(version, version=1)
            assert pushed.ok, pushed.error

        def request(n: int, seed: int) -> pb.GenerateRequest:
            return pb.GenerateRequest(
                prompt=PROMPT, max_tokens=args.max_tokens, temperature=1.0, seed=seed, n=n, ignore_eos=True
            )

        def with_n() -> int:
            out = stub.Generate(request(args.n, 0), timeout=600)
            return sum(len(c.token_ids) for c in out.completions) or len(out.token_ids)

        def singles() -> int:
            with ThreadPoolExecutor(args.n) as pool:
                outs = list(pool.map(lambda i: stub.Generate(request(1, i), timeout=600), range(args.n)))
            return sum(len(out.token_ids) for out in outs)

        figures: dict[str, Any] = {}
        for name, fn in (("n", with_n), ("singles", singles)):
            fn()  # warm-up
            rates, seconds = [], []
            for _ in range(args.runs):
                started = time.perf_counter()
                tokens = fn()
                elapsed = time.perf_counter() - started
                seconds.append(elapsed)
                rates.append(tokens_per_second(elapsed, tokens))
            figures[name] = {"tokens": tokens, "seconds": summary(seconds), "tokens_per_second": summary(rates)}
            logger.info("%s: %.0f tokens/s", name, figures[name]["tokens_per_second"]["median"])
        channel.close()
    finally:
        rollout.stop()
    return {
        "n": args.n,
        "max_tokens": args.max_tokens,
        "one_request_with_n": figures["n"],
        "single_requests": figures["singles"],
    }


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m bench.swap_policies", description=__doc__)
    parser.add_argument("--model", type=Path, default=ROOT / "models" / "tiny")
    parser.add_argument("--engine", choices=["torch", "vllm"], default="torch")
    parser.add_argument("--quick", action="store_true", help="2 runs, 64-token requests, n=4 of 16 tokens")
    parser.add_argument("--runs", type=int, default=5, help="measured pushes per policy (and throughput runs)")
    parser.add_argument("--inflight", type=int, default=2, help="long Generate calls in flight at each push")
    parser.add_argument("--long-tokens", type=int, default=480, help="tokens each long request decodes")
    parser.add_argument("--lead", type=float, default=0.3, help="seconds between starting them and the push")
    parser.add_argument("--n", type=int, default=8, help="completions per request in the throughput figure")
    parser.add_argument("--max-tokens", type=int, default=64, help="tokens per completion in the throughput figure")
    parser.add_argument("--policies", default=",".join(POLICIES))
    parser.add_argument("--out", type=Path, help="default: bench/results/swap_policies[_vllm].json")
    args = parser.parse_args(argv)
    suffix = "" if args.engine == "torch" else f"_{args.engine}"
    args.out = args.out or ROOT / "bench" / "results" / f"swap_policies{suffix}.json"
    if args.quick:
        args.runs, args.long_tokens, args.n, args.max_tokens = 2, 64, 4, 16
    logging.basicConfig(level=logging.INFO, format="%(name)s: %(message)s", stream=sys.stderr)
    logging.getLogger("trainer_side").setLevel(logging.WARNING)

    versions = states(args.model, 3)
    report: dict[str, Any] = {
        "machine": machine(),
        "model": str(args.model),
        "engine": args.engine,
        "settings": {k: v for k, v in vars(args).items() if k not in ("out", "model")},
        "swap_latency": {},
    }
    for policy in args.policies.split(","):
        report["swap_latency"][policy] = swap_latency(args.model, policy, args, versions)
    report["generate_n"] = throughput(args.model, args, versions[0])
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(report, indent=2, default=str) + "\n")
    print(json.dumps({p: r["commit_seconds"] for p, r in report["swap_latency"].items()}, default=str))
    print(f"wrote {args.out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
