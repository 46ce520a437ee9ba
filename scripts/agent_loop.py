"""`make agent-demo`: a standalone rollout with real weights and a small agent loop over its OpenAI API.

The debugging case: developing an agent loop against a rollout with no trainer. The rollout starts with
`--weights` (committed as version 1, so the gate is open) and `--http-port`; the loop is plain official
`openai` client code: chat turns that feed each answer back, a completion with logprobs, and a stream.
"""

from __future__ import annotations

import argparse
import os
import tempfile
from pathlib import Path

from openai import OpenAI

from rollout_side.process import RolloutProcess, free_port


def agent_loop(client: OpenAI, model: str, turns: int) -> None:
    messages = [{"role": "system", "content": "count with me"}, {"role": "user", "content": "one two three"}]
    for turn in range(turns):
        reply = client.chat.completions.create(model=model, messages=messages, max_tokens=12, temperature=0)  # type: ignore[arg-type]
        answer = reply.choices[0].message.content or ""
        version = (reply.model_extra or {}).get("weight_version")
        print(f"   turn {turn + 1}: {answer!r} (weight_version {version}, finish {reply.choices[0].finish_reason})")
        messages += [{"role": "assistant", "content": answer}, {"role": "user", "content": "go on"}]
    scored = client.completions.create(model=model, prompt="monday tuesday", max_tokens=4, temperature=0, logprobs=2)
    choice = scored.choices[0]
    print(
        f"   completion {choice.text!r}, token logprobs {choice.logprobs.token_logprobs if choice.logprobs else None}"
    )
    streamed = client.completions.create(model=model, prompt="the cat sat", max_tokens=8, temperature=0, stream=True)
    print("   streamed: " + "|".join(chunk.choices[0].text for chunk in streamed if chunk.choices))


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--engine", default="vllm", choices=["vllm", "torch"])
    parser.add_argument("--model", type=Path, default=Path("models/tiny"))
    parser.add_argument("--weights", type=Path, default=Path("models/tiny/model.safetensors"))
    parser.add_argument("--turns", type=int, default=3)
    args = parser.parse_args()

    http_port = free_port()
    log = Path(tempfile.gettempdir()) / f"weightsync-agent-rollout-{os.getpid()}.log"
    print(f"1. standalone rollout ({args.engine}, weights {args.weights}), HTTP on {http_port}; log: {log}")
    serve_args = ["--weights", str(args.weights), "--http-port", str(http_port)]
    with RolloutProcess(args.model, engine=args.engine, args=serve_args, log=log):
        client = OpenAI(base_url=f"http://127.0.0.1:{http_port}/v1", api_key="unused", max_retries=2)
        model = client.models.list().data[0].id
        print(f"2. agent loop with the openai client against model {model!r}:")
        agent_loop(client, model, args.turns)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
