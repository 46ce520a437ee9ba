"""`python -m bench.delta [--quick]`: delta sync against full sync, on updates made by a real optimizer step.

A Qwen2-shaped model of 256 MiB (bench/models.py) with Hugging Face's own initialisation, bf16 weights,
takes AdamW steps (lr 1e-6) on random tokens. After every step the new version goes, in the same run,
to two real rollout processes (torch engine): in full to one (a publisher without delta sync), as a
delta to the other (a publisher with it); the order alternates. Both must confirm the same fingerprint.
Then a dense update (every element moved by one bf16 ulp) goes the same way, where delta sync must
fall back to the full version. Last, a LoRA adapter (rank 16, every projection) is pushed as versions beside
a full push of the same model (docs/lora.md); `--adapter-only` measures that alone. Writes
bench/results/delta.json: every run's numbers, median/min/max, and where the delta's time goes (the
trainer's diff, measured alone on the same versions).

On loopback a full sync moves bytes at memory speed, so a delta cannot be much faster than the passes
over memory it needs (diff and checksums). Without --quick, the sparse figures are measured again on a
simulated cluster (bench/netsim.py: trainer and rollouts in their own network namespaces, every link
capped at each rate of --link: 1 and 10 Gbit/s by default), where, as between real hosts, the link
bounds a full sync.
"""

from __future__ import annotations

import argparse
import json
import logging
import statistics
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable
from pathlib import Path

import torch
from transformers import AutoConfig, AutoModelForCausalLM

from bench.measure import MiB, machine, summary
from bench.models import make_model
from rollout_side.process import RolloutProcess, serve_command
from trainer_side.base_store import BaseStore
from trainer_side.publisher import Publisher, PushResult
from weightsync.delta import TensorDiff, apply_patch, element_view
from weightsync.manifest import Manifest, build_layout, build_manifest, tensor_bytes, tensor_checksum

ROOT = Path(__file__).resolve().parents[1]
logger = logging.getLogger("bench.delta")
SIZE = "256MiB"
LR = 1e-6
SETTLE_SECONDS = 0.5  # between pushes, as a training step would be: background copies finish


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m bench.delta", description=__doc__)
    parser.add_argument("--quick", action="store_true", help="5 measured runs after 1 warm-up (default 9 after 2)")
    parser.add_argument("--runs", type=int, help="measured runs per figure (at least 5)")
    parser.add_argument("--warmup", type=int, help="unmeasured runs first")
    parser.add_argument("--out", type=Path, default=ROOT / "bench" / "results" / "delta.json")
    parser.add_argument(
        "--link",
        default="1gbit,10gbit",
        help="link caps of the simulated cluster to measure on (tc syntax, comma-separated); 'off' skips it",
    )
    parser.add_argument(
        "--adapter-only",
        action="store_true",
        help="only the LoRA adapter push beside a full push (no optimizer steps, no links): a minute, not many",
    )
    parser.add_argument("--driver", type=Path, help=argparse.SUPPRESS)  # the model folder, inside the cluster
    parser.add_argument("--rollouts", help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(asctime)s bench.delta: %(message)s")
    logging.getLogger("trainer_side").setLevel(logging.WARNING)
    runs = max(5, args.runs or (5 if args.quick else 9))
    warmup = args.warmup if args.warmup is not None else (1 if args.quick else 2)
    if args.driver:
        print(json.dumps(_driver(args.driver, args.rollouts.split(","), runs, warmup)))
        return 0
    started = time.perf_counter()
    torch.manual_seed(0)
    model_dir = make_model(SIZE, Path(tempfile.mkdtemp(prefix="ws-delta-")) / "models")
    trainer = Trainer(model_dir)
    nbytes = sum(t.numel() * t.element_size() for t in trainer.state().values())
    logger.info(
        "model %s: %.1f MiB, %d tensors, AdamW lr %g on bf16 weights", SIZE, nbytes / MiB, len(trainer.state()), LR
    )
    args_rollout = ["--log-level", "WARNING"]
    full_rollout = RolloutProcess(model_dir, engine="torch", args=args_rollout)
    delta_rollout = RolloutProcess(model_dir, engine="torch", args=args_rollout)
    results: dict[str, object] = {"machine": machine()}
    try:
        with (
            Publisher([full_rollout.address], progress=False, timeout=300) as plain,
            Publisher([delta_rollout.address], progress=False, timeout=300, delta=True) as deltas,
        ):
            if not args.adapter_only:
                results["sparse"] = _sparse(trainer, plain, deltas, nbytes, runs, warmup)
                results["dense"] = _dense(trainer, plain, deltas, nbytes, runs)
            results["adapter"] = _adapter(trainer, plain, nbytes, runs)
    finally:
        full_rollout.stop()
        delta_rollout.stop()
    config = {"model": SIZE, "bytes": nbytes, "runs": runs, "warmup": warmup, "lr": LR, "optimizer": "AdamW"}
    results["config"] = config | {"adapter_only": args.adapter_only}
    if not args.quick and not args.adapter_only and args.link != "off":
        del trainer
        results["links"] = [_on_a_link(model_dir, rate, runs, warmup) for rate in args.link.split(",")]
    results["seconds"] = time.perf_counter() - started
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(results, indent=1) + "\n")
    _print(results)
    return 0


class Trainer:
    """A bf16 model and AdamW: every `step` is one real optimizer step on random tokens."""

    def __init__(self, model_dir: Path) -> None:
        config = AutoConfig.from_pretrained(model_dir)
        self.model = AutoModelForCausalLM.from_config(config, dtype=torch.bfloat16)  # HF's initialisation
        self.model.train()
        self.optimizer = torch.optim.AdamW(self.model.parameters(), lr=LR)
        self.vocab = config.vocab_size
        self.generator = torch.Generator().manual_seed(1)

    def state(self) -> dict[str, torch.Tensor]:
        """The live parameters (bf16, on the CPU): what a training loop hands to `push`."""
        return {k: v for k, v in self.model.state_dict().items() if k != "lm_head.weight"}

    def step(self) -> None:
        ids = torch.randint(0, self.vocab, (2, 64), generator=self.generator)
        loss = self.model(input_ids=ids, labels=ids).loss
        loss.backward()
        self.optimizer.step()
        self.optimizer.zero_grad(set_to_none=True)

    def bump_every_element(self) -> None:
        """A dense update: every element moves by one bf16 ulp (its bit pattern + 1)."""
        with torch.no_grad():
            for tensor in self.state().values():
                tensor.view(torch.int16).add_(1)


def _snapshot(state: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    return {k: v.detach().clone() for k, v in state.items()}


def _unchanged(before: dict[str, torch.Tensor], after: dict[str, torch.Tensor]) -> float:
    same = sum(int((before[k].view(torch.int16) == after[k].view(torch.int16)).sum()) for k in before)
    return same / sum(t.numel() for t in before.values())


_version = iter(range(1, 1 << 30))


def _timed(publisher: Publisher, state: dict[str, torch.Tensor], version: int) -> tuple[float, PushResult]:
    started = time.perf_counter()
    [result] = publisher.push(state, version)
    seconds = time.perf_counter() - started
    if not result.ok:
        raise RuntimeError(result.line())
    return seconds, result


def _both(
    plain: Publisher, deltas: Publisher, state: dict[str, torch.Tensor], delta_first: bool
) -> tuple[float, PushResult, float, PushResult]:
    """The same version in full and as a delta, in the given order; checks both fingerprints agree."""
    version = next(_version)
    order: list[Callable[[], tuple[float, PushResult]]] = [
        lambda: _timed(plain, state, version),
        lambda: _timed(deltas, state, version),
    ]
    if delta_first:
        order.reverse()
    out = []
    for push in order:
        out.append(push())
        time.sleep(SETTLE_SECONDS)
    (full_s, full), (delta_s, delta) = out if not delta_first else out[::-1]
    if full.fingerprint != delta.fingerprint:
        raise RuntimeError(f"fingerprints differ: full {full.fingerprint}, delta {delta.fingerprint}")
    return full_s, full, delta_s, delta


def _sparse(
    trainer: Trainer, plain: Publisher, deltas: Publisher, nbytes: int, runs: int, warmup: int
) -> dict[str, object]:
    logger.info("first version, in full to both rollouts")
    _both(plain, deltas, trainer.state(), delta_first=False)
    rows: list[dict[str, float]] = []
    for i in range(warmup + runs):
        before = _snapshot(trainer.state())
        trainer.step()
        unchanged = _unchanged(before, trainer.state())
        parts = _breakdown(before, trainer.state())
        full_s, _, delta_s, delta = _both(plain, deltas, trainer.state(), delta_first=i % 2 == 1)
        if not delta.delta:
            raise RuntimeError("the AdamW step was not sent as a delta")
        row = {
            "full_s": full_s,
            "delta_s": delta_s,
            "speedup": full_s / delta_s,
            "wire_bytes": delta.bytes_sent,
            "bytes_ratio": delta.bytes_sent / nbytes,
            "unchanged": unchanged,
            **parts,
            "swap_s": delta.swap_seconds,
        }
        logger.info(
            "%s %d: full %.3f s, delta %.3f s (%.1fx), %.2f%% of the bytes, %.3f%% unchanged; alone: diff %.3f s, "
            "apply+verify %.3f s",
            "warm-up" if i < warmup else "run",
            i if i < warmup else i - warmup,
            full_s,
            delta_s,
            full_s / delta_s,
            100 * delta.bytes_sent / nbytes,
            100 * unchanged,
            parts["trainer_diff_s"],
            parts["rollout_apply_verify_s"],
        )
        if i >= warmup:
            rows.append(row)
        del before
    return {key: summary([r[key] for r in rows]) for key in rows[0]}


def _timed_scan(
    before: dict[str, torch.Tensor], after: dict[str, torch.Tensor]
) -> tuple[Manifest, list[TensorDiff] | None, float]:
    """The delta publisher's scan of `after` against `before` as its base, and the seconds it took."""
    store = BaseStore()
    try:
        store.assume(0, build_manifest(before.items()), before)
        started = time.perf_counter()
        manifest, diffs = store.scan(after)
        return manifest, diffs, time.perf_counter() - started
    finally:
        store.close()  # its diff threads


def _breakdown(before: dict[str, torch.Tensor], after: dict[str, torch.Tensor]) -> dict[str, float]:
    """Where a delta's time goes, each part alone on the same two versions (same code as the real path).

    trainer_diff_s: checksums + compare + patch encoding (BaseStore.scan); trainer_hash_only_s: what a full
    sync spends on checksums; rollout_apply_verify_s: decoding and applying every patch to a copy of the
    base and checksumming every tensor, as the rollout must before commit.
    """
    tensors = dict(after.items())
    manifest, diffs, diff_s = _timed_scan(before, tensors)
    started = time.perf_counter()
    build_manifest(tensors.items())
    hash_s = time.perf_counter() - started
    staged = [t.clone() for t in before.values()]
    assert diffs is not None
    started = time.perf_counter()
    for entry, target, diff, new in zip(manifest, staged, diffs, tensors.values(), strict=True):
        if diff.patch is not None:
            apply_patch(element_view(target), diff.patch)
        else:
            target.copy_(new)  # sent FULL: the rollout copies it from the chunks
        if tensor_checksum(tensor_bytes(target)) != entry.checksum:
            raise RuntimeError(f"{entry.name}: the patched tensor does not match")
    apply_s = time.perf_counter() - started
    return {"trainer_diff_s": diff_s, "trainer_hash_only_s": hash_s, "rollout_apply_verify_s": apply_s}


def _dense(trainer: Trainer, plain: Publisher, deltas: Publisher, nbytes: int, runs: int) -> dict[str, object]:
    """Every element changed: the delta publisher must send the full version, about as fast as a plain one.

    Each measured dense update follows a sparse AdamW step (pushed to both, unmeasured), so the delta
    publisher holds a base and takes the real fallback path: a sampled diff finds the update dense, the
    version goes in full, and no copy of it is kept. Pushes are ~0.1 s on a shared 2-core machine, so
    there are more of them than elsewhere; the publisher's extra work is also timed alone (`extra_*`).
    """
    rows: list[dict[str, float]] = []
    for i in range(2 * runs + 1):
        trainer.step()
        _both(plain, deltas, trainer.state(), delta_first=False)
        before = _snapshot(trainer.state())
        trainer.bump_every_element()
        unchanged = _unchanged(before, trainer.state())
        extra = _fallback_work(before, trainer.state())
        del before
        had_base = bool(deltas.delta_holders)  # else it has none to fall back from (see trainer_side/base_store.py)
        plain_s, _, fallback_s, fallback = _both(plain, deltas, trainer.state(), delta_first=i % 2 == 0)
        if fallback.delta or fallback.bytes_sent != nbytes:
            raise RuntimeError("a dense update was sent as a delta")
        logger.info(
            "dense %s: plain full %.3f s, delta publisher (%s) %.3f s (%.3fx), %.1f%% unchanged; "
            "alone: scan %.4f s vs manifest %.4f s",
            "warm-up" if i == 0 else i - 1,
            plain_s,
            "fell back to full" if had_base else "held no base",
            fallback_s,
            fallback_s / plain_s,
            100 * unchanged,
            extra["extra_scan_s"],
            extra["extra_manifest_s"],
        )
        if i:
            row = {"plain_s": plain_s, "fallback_s": fallback_s, "overhead": fallback_s / plain_s - 1, **extra}
            rows.append({**row, "had_base": float(had_base)})
    out = {key: summary([r[key] for r in rows]) for key in rows[0] if key != "had_base"}
    out["overhead_of_medians"] = (
        statistics.median(r["fallback_s"] for r in rows) / statistics.median(r["plain_s"] for r in rows) - 1
    )
    # With a base the push is the fallback itself (sampled diff, base dropped); without one, the publisher
    # may keep this version as its next base, copying the model while the chunks stream.
    for name, want in (("with_base", 1.0), ("without_base", 0.0)):
        some = [r["overhead"] for r in rows if r["had_base"] == want]
        out[f"overhead_{name}"] = summary(some) if some else {"runs": 0}
    return out


LORA_TARGETS = ("q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj")


def _adapter(trainer: Trainer, plain: Publisher, nbytes: int, runs: int) -> dict[str, object]:
    """A rank-16 LoRA adapter on every projection, pushed as versions (docs/lora.md), beside a full push.

    Each run pushes the model in full (it becomes the base), then one adapter over it, then another: the
    first adapter pays the rollout's copy of the base, the second is the steady state of LoRA training.
    """
    state = trainer.state()
    config = {"r": 16, "lora_alpha": 32, "target_modules": list(LORA_TARGETS)}
    rows: list[dict[str, float]] = []
    for i in range(runs + 1):
        full_s, _ = _timed(plain, state, next(_version))
        time.sleep(SETTLE_SECONDS)
        timed = []
        for seed in (2 * i, 2 * i + 1):
            adapter = _lora(state, 16, seed)
            started = time.perf_counter()
            [result] = plain.push_adapter(adapter, config, next(_version))
            timed.append((time.perf_counter() - started, result))
            if not result.ok:
                raise RuntimeError(result.line())
            time.sleep(SETTLE_SECONDS)
        (first_s, _), (adapter_s, result) = timed
        adapter_bytes = sum(t.numel() * t.element_size() for t in adapter.values())
        logger.info(
            "adapter %s: full %.3f s, adapter %.3f s (first over a new base %.3f s), %.2f%% of the bytes, "
            "rollout merge+load %.3f s",
            "warm-up" if i == 0 else i - 1,
            full_s,
            adapter_s,
            first_s,
            100 * adapter_bytes / nbytes,
            result.swap_seconds,
        )
        if i:
            rows.append(
                {
                    "full_s": full_s,
                    "adapter_s": adapter_s,
                    "first_adapter_s": first_s,
                    "speedup": full_s / adapter_s,
                    "wire_bytes": result.bytes_sent,
                    "bytes_ratio": adapter_bytes / nbytes,
                    "rollout_merge_load_s": result.swap_seconds,
                }
            )
    return {key: summary([r[key] for r in rows]) for key in rows[0]}


def _lora(state: dict[str, torch.Tensor], rank: int, seed: int) -> dict[str, torch.Tensor]:
    """A random adapter of `rank` under PEFT's names, on every projection of `state`."""
    generator = torch.Generator().manual_seed(seed)
    out = {}
    for name, weight in state.items():
        module = name.removesuffix(".weight")
        if weight.dim() == 2 and module.rsplit(".", 1)[-1] in LORA_TARGETS:
            for factor, shape in (("A", (rank, weight.shape[1])), ("B", (weight.shape[0], rank))):
                tensor = torch.randn(shape, generator=generator) * 0.01
                out[f"base_model.model.{module}.lora_{factor}.weight"] = tensor.to(torch.bfloat16)
    return out


def _fallback_work(before: dict[str, torch.Tensor], after: dict[str, torch.Tensor]) -> dict[str, float]:
    """The delta publisher's part of a dense push, alone: its scan (a sampled diff) vs a plain push's layout.

    Neither hashes: a dense update is sent like a plain full version, checksummed as its chunks go out."""
    tensors = dict(after.items())
    _, diffs, scan_s = _timed_scan(before, tensors)
    if diffs is None or any(d.patch is not None for d in diffs):
        raise RuntimeError("the dense update was not recognised as dense")
    started = time.perf_counter()
    build_layout(tensors.items())
    return {"extra_scan_s": scan_s, "extra_manifest_s": time.perf_counter() - started}


def _driver(model_dir: Path, rollouts: list[str], runs: int, warmup: int) -> dict[str, object]:
    """Inside the trainer's namespace: the sparse figures against two rollouts on other hosts."""
    logging.basicConfig(level=logging.INFO, format="%(asctime)s bench.delta (cluster): %(message)s")
    torch.manual_seed(0)
    trainer = Trainer(model_dir)
    nbytes = sum(t.numel() * t.element_size() for t in trainer.state().values())
    with (
        Publisher(rollouts[:1], progress=False, timeout=600) as plain,
        Publisher(rollouts[1:], progress=False, timeout=600, delta=True) as deltas,
    ):
        return _sparse(trainer, plain, deltas, nbytes, runs, warmup)


def _on_a_link(model_dir: Path, rate: str, runs: int, warmup: int) -> dict[str, object]:
    """The sparse figures with trainer and rollouts on a simulated cluster whose links are capped at `rate`."""
    from bench.netsim import Cluster, unavailable_reason

    if reason := unavailable_reason():
        logger.warning("no simulated cluster (%s): link figures skipped", reason)
        return {"skipped": reason}
    logger.info("simulated cluster, every link capped at %s", rate)
    port = 50051
    with Cluster(3, rate) as cluster:
        addresses = [f"{a}:{port}" for a in cluster.addresses[1:]]
        servers = [
            subprocess.Popen(
                cluster.command(
                    i, serve_command(model_dir, host=cluster.addresses[i], port=port, args=["--log-level", "WARNING"])
                ),
                cwd=ROOT,
            )
            for i in (1, 2)
        ]
        try:
            up = [
                sys.executable,
                "-c",
                f"from rollout_side.process import wait_until_up as w; [w(a, 300) for a in {addresses!r}]",
            ]
            subprocess.run(cluster.command(0, up), cwd=ROOT, check=True, timeout=400)
            driver = [
                sys.executable,
                "-m",
                "bench.delta",
                "--driver",
                str(model_dir),
                "--rollouts",
                ",".join(addresses),
            ]
            driver += ["--runs", str(runs), "--warmup", str(warmup)]
            done = subprocess.run(cluster.command(0, driver), cwd=ROOT, stdout=subprocess.PIPE, text=True, timeout=3600)
            if done.returncode != 0:
                raise RuntimeError(f"the driver in the simulated cluster failed ({done.returncode})")
            figures = json.loads(done.stdout.strip().splitlines()[-1])
        finally:
            for server in servers:
                server.terminate()
            for server in servers:
                server.wait(60)
    return {"rate": rate, "sparse": figures}


def _print(results: dict[str, object]) -> None:
    def med(block: object, key: str) -> float:
        return float(block[key]["median"])  # type: ignore[index]

    if "sparse" in results:
        _print_delta(results, med)
    adapter = results["adapter"]
    print(
        f"LoRA rank 16 on every projection: adapter push {med(adapter, 'adapter_s'):.3f} s "
        f"(first over a new base {med(adapter, 'first_adapter_s'):.3f} s) vs full push {med(adapter, 'full_s'):.3f} s: "
        f"{med(adapter, 'speedup'):.1f}x, {100 * med(adapter, 'bytes_ratio'):.2f}% of the bytes; "
        f"rollout merge+load {med(adapter, 'rollout_merge_load_s'):.3f} s"
    )


def _print_delta(results: dict[str, object], med: Callable[[object, str], float]) -> None:
    sparse, dense = results["sparse"], results["dense"]
    print(
        f"AdamW lr {LR:g}, {SIZE}: unchanged {100 * med(sparse, 'unchanged'):.3f}%, "
        f"delta wire bytes {100 * med(sparse, 'bytes_ratio'):.2f}% of full (1/{1 / med(sparse, 'bytes_ratio'):.0f}), "
        f"full {med(sparse, 'full_s'):.3f} s vs delta {med(sparse, 'delta_s'):.3f} s: "
        f"{med(sparse, 'speedup'):.2f}x; alone: trainer diff {med(sparse, 'trainer_diff_s'):.3f} s, "
        f"rollout apply+verify {med(sparse, 'rollout_apply_verify_s'):.3f} s"
    )
    for link in results.get("links", []):  # type: ignore[attr-defined]
        if "sparse" in link:
            on = link["sparse"]
            print(
                f"on a {link['rate']} link: full {med(on, 'full_s'):.3f} s vs delta {med(on, 'delta_s'):.3f} s: "
                f"{med(on, 'speedup'):.1f}x, {100 * med(on, 'bytes_ratio'):.2f}% of the bytes"
            )
    print(
        f"dense: plain full {med(dense, 'plain_s'):.3f} s, delta publisher falling back "
        f"{med(dense, 'fallback_s'):.3f} s: {100 * med(dense, 'overhead'):+.1f}% (median of per-run ratios), "
        f"{100 * float(dense['overhead_of_medians']):+.1f}% (ratio of medians); alone: scan "  # type: ignore[index]
        f"{med(dense, 'extra_scan_s'):.4f} s vs plain manifest {med(dense, 'extra_manifest_s'):.4f} s"
    )
    for name in ("with_base", "without_base"):
        block = dense[f"overhead_{name}"]  # type: ignore[index]
        if block.get("runs"):
            print(f"  {name.replace('_', ' ')}: {100 * block['median']:+.1f}% median of {block['runs']} runs")


if __name__ == "__main__":
    raise SystemExit(main())
