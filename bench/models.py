"""Synthetic Qwen2 models of a chosen size: a config + tokenizer folder, and random bf16 weights."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import torch
from transformers import AutoConfig, AutoModelForCausalLM

__all__ = ["SIZES", "make_model", "model_bytes", "random_state"]

ROOT = Path(__file__).resolve().parents[1]
TINY = ROOT / "models" / "tiny"

# Qwen2 shapes (hidden, intermediate, heads, kv heads); layers are chosen to reach the target size.
SIZES: dict[str, tuple[int, int, int, int, int]] = {
    # name: (target MiB, hidden, intermediate, heads, kv heads)
    "64MiB": (64, 512, 1408, 8, 2),
    "256MiB": (256, 1024, 2816, 16, 4),
    "1GiB": (1024, 2048, 5632, 16, 4),
    "2GiB": (2048, 2048, 5632, 16, 4),
}
VOCAB = 32000


def make_model(name: str, root: Path) -> Path:
    """Writes models/tiny's tokenizer and a Qwen2 config sized to SIZES[name] under root/name."""
    target_mib, hidden, intermediate, heads, kv_heads = SIZES[name]
    out = root / name
    if (out / "config.json").is_file():
        return out
    shutil.copytree(TINY, out, dirs_exist_ok=True)
    config = json.loads((out / "config.json").read_text())
    config.update(
        hidden_size=hidden,
        intermediate_size=intermediate,
        num_attention_heads=heads,
        num_key_value_heads=kv_heads,
        head_dim=hidden // heads,
        vocab_size=VOCAB,
        num_hidden_layers=1,
        tie_word_embeddings=True,
    )
    one = _param_bytes(config)
    config["num_hidden_layers"] = 2
    per_layer = _param_bytes(config) - one
    base = one - per_layer
    config["num_hidden_layers"] = max(1, round((target_mib * 2**20 - base) / per_layer))
    config["max_window_layers"] = config["num_hidden_layers"]
    (out / "config.json").write_text(json.dumps(config, indent=2))
    return out


def _param_bytes(config: dict[str, object]) -> int:
    with torch.device("meta"):
        model = AutoModelForCausalLM.from_config(AutoConfig.for_model(**config), dtype=torch.bfloat16)
    return sum(p.numel() * p.element_size() for p in model.parameters())


def meta_state(model_dir: Path) -> dict[str, torch.Tensor]:
    """The model's tensors on the meta device (shapes, no memory), tied lm_head left out (as Hugging Face saves it)."""
    with torch.device("meta"):
        model = AutoModelForCausalLM.from_config(AutoConfig.from_pretrained(model_dir))
    return {name: t for name, t in model.state_dict().items() if name != "lm_head.weight"}


def random_state(model_dir: Path, seed: int = 0) -> dict[str, torch.Tensor]:
    """The trainer's tensors: a random bf16 state dict of `meta_state`'s shapes."""
    generator = torch.Generator().manual_seed(seed)
    return {
        name: torch.randn(t.shape, generator=generator, dtype=torch.bfloat16)
        for name, t in meta_state(model_dir).items()
    }


def model_bytes(state: dict[str, torch.Tensor]) -> int:
    return sum(t.numel() * t.element_size() for t in state.values())
