"""GPU check: the torch engine on CUDA receiving pushes into pinned staging memory.

Run on a machine with a GPU (`python -m bench.gpu_push --out DIR`). It boots a rollout process with
`--engine torch --device cuda:0`, then from this process (the trainer, weights on the GPU):
  1. pushes a briefly trained tiny model and checks greedy tokens equal transformers' on the GPU;
  2. pushes a ~1 GiB synthetic Qwen2 several times and reports sync GB/s and the swap pause,
     beside raw TCP loopback measured in the same run.
Results go to DIR/gpu_push.json.
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import socket
import statistics
import sys
import tempfile
import threading
import time
from pathlib import Path

import grpc
import torch
from transformers import AutoConfig, AutoModelForCausalLM, AutoTokenizer

from rollout_side.process import RolloutProcess
from trainer_side.publisher import Publisher
from trainer_side.train import PROMPT, new_model, train_iterations
from weightsync.v1 import weightsync_pb2 as pb
from weightsync.v1 import weightsync_pb2_grpc as pb_grpc

BIG = {
    "hidden_size": 2048,
    "intermediate_size": 5632,
    "num_hidden_layers": 14,
    "num_attention_heads": 16,
    "num_key_value_heads": 4,
    "head_dim": 128,
    "vocab_size": 32000,
}


def sized_model(tiny: Path, out: Path, dims: dict[str, int]) -> Path:
    shutil.copytree(tiny, out)
    config = json.loads((out / "config.json").read_text())
    config.update(dims)
    (out / "config.json").write_text(json.dumps(config, indent=2))
    return out


def serve(model: Path, log: Path) -> RolloutProcess:
    return RolloutProcess(model, engine="torch", args=["--device", "cuda:0"], log=log)


def raw_tcp_gbps(nbytes: int, repeats: int = 3) -> float:
    """Loopback ceiling: sendall from one buffer, recv_into a preallocated one."""
    payload = memoryview(bytearray(os.urandom(1 << 20)) * (nbytes >> 20))
    sink = bytearray(nbytes)
    rates = []
    for _ in range(repeats):
        server = socket.create_server(("127.0.0.1", 0))
        port = server.getsockname()[1]

        def receive(server: socket.socket = server) -> None:
            conn, _ = server.accept()
            view, got = memoryview(sink), 0
            while got < nbytes:
                got += conn.recv_into(view[got:])
            conn.close()

        thread = threading.Thread(target=receive)
        thread.start()
        start = time.perf_counter()
        with socket.create_connection(("127.0.0.1", port)) as client:
            client.sendall(payload)
        thread.join()
        rates.append(nbytes / (time.perf_counter() - start) / 1e9)
        server.close()
    return statistics.median(rates)


def check_correctness(tiny: Path, log_dir: Path) -> dict[str, object]:
    tokenizer = AutoTokenizer.from_pretrained(tiny)
    model = new_model(tiny)
    train_iterations(model, tokenizer, 60)
    model = model.to("cuda")
    rollout = serve(tiny, log_dir / "rollout-tiny.log")
    address = rollout.address
    try:
        with Publisher([address], progress=False) as publisher:
            [result] = publisher.push(model.state_dict(), 1)
        ids = tokenizer(PROMPT, add_special_tokens=False)["input_ids"]
        ref_model = model.to(torch.bfloat16).eval()  # exactly the weights that went on the wire
        with torch.no_grad():
            out = ref_model.generate(
                torch.tensor([ids], device="cuda"),
                max_new_tokens=16,
                do_sample=False,
                attention_mask=torch.ones(1, len(ids), dtype=torch.long, device="cuda"),
            )
        reference = out[0, len(ids) :].tolist()
        answer = pb_grpc.GenerateStub(grpc.insecure_channel(address)).Generate(
            pb.GenerateRequest(prompt_token_ids=ids, max_tokens=16), timeout=60
        )
        return {
            "push_ok": result.ok,
            "error": result.error,
            "tokens_equal": list(answer.token_ids) == reference,
            "rollout_tokens": list(answer.token_ids),
            "reference_tokens": reference,
            "weight_version": answer.weight_version,
        }
    finally:
        rollout.stop()


def measure_throughput(big: Path, log_dir: Path, pushes: int) -> dict[str, object]:
    with torch.device("meta"):
        shapes = AutoModelForCausalLM.from_config(AutoConfig.from_pretrained(big)).state_dict()
    state = {
        k: torch.randn(v.shape, dtype=torch.bfloat16, device="cuda") for k, v in shapes.items() if k != "lm_head.weight"
    }
    nbytes = sum(t.numel() * 2 for t in state.values())
    rollout = serve(big, log_dir / "rollout-big.log")
    address = rollout.address
    runs = []
    try:
        with Publisher([address], progress=False) as publisher:
            for version in range(1, pushes + 2):
                start = time.perf_counter()
                [result] = publisher.push(state, version)
                seconds = time.perf_counter() - start
                if not result.ok:
                    raise RuntimeError(result.error)
                if version > 1:  # the first push is the warm-up
                    runs.append({"seconds": seconds, "gbps": nbytes / seconds / 1e9, "swap_s": result.swap_seconds})
        peak = _peak_rss(rollout.pid)
    finally:
        rollout.stop()
    gbps = [r["gbps"] for r in runs]
    tcp = raw_tcp_gbps(min(nbytes, 1 << 30))
    return {
        "model_bytes": nbytes,
        "runs": runs,
        "median_gbps": statistics.median(gbps),
        "min_gbps": min(gbps),
        "max_gbps": max(gbps),
        "raw_tcp_gbps": tcp,
        "ratio_to_tcp": statistics.median(gbps) / tcp,
        "median_swap_s": statistics.median(r["swap_s"] for r in runs),
        "rollout_peak_rss_bytes": peak,
    }


def _peak_rss(pid: int) -> int:
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith("VmHWM:"):
            return int(line.split()[1]) * 1024
    return 0


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--out", type=Path, default=Path("bench/results"))
    parser.add_argument("--tiny", type=Path, default=Path("models/tiny"))
    parser.add_argument("--pushes", type=int, default=5)
    args = parser.parse_args()
    if not torch.cuda.is_available():
        print("no CUDA device: this check needs a GPU", file=sys.stderr)
        return 2
    args.out.mkdir(parents=True, exist_ok=True)
    with tempfile.TemporaryDirectory() as tmp:
        big = sized_model(args.tiny, Path(tmp) / "big", BIG)
        report = {
            "device": torch.cuda.get_device_name(0),
            "torch": torch.__version__,
            "correctness": check_correctness(args.tiny, args.out),
            "throughput": measure_throughput(big, args.out, args.pushes),
        }
    (args.out / "gpu_push.json").write_text(json.dumps(report, indent=2))
    print(json.dumps(report, indent=2))
    return 0 if report["correctness"]["tokens_equal"] else 1


if __name__ == "__main__":
    sys.exit(main())
