"""Write the tiny model's weights as one bf16 safetensors file, deterministically (`make weights`).

The README's `push --checkpoint` and standalone `serve --weights` examples use this file. The weights are
the demo trainer's seeded starting point (random, not trained) in bf16, the tied `lm_head` dropped as
Hugging Face saves it: about 5 MB for models/tiny.
"""

from __future__ import annotations

import argparse
import os
from pathlib import Path

import torch
from safetensors.torch import save_file
from transformers import AutoConfig, AutoModelForCausalLM


def build(model_dir: Path, out: Path, seed: int = 0) -> None:
    torch.manual_seed(seed)
    config = AutoConfig.from_pretrained(model_dir)
    model = AutoModelForCausalLM.from_config(config, dtype=torch.float32)  # as trainer_side.train.new_model
    state = {name: tensor.to(torch.bfloat16).contiguous() for name, tensor in model.state_dict().items()}
    if getattr(config, "tie_word_embeddings", False):
        state.pop("lm_head.weight", None)
    partial = out.with_name(out.name + ".partial")
    save_file(state, partial, metadata={"format": "pt"})
    os.replace(partial, out)  # never a half-written file under the final name
    print(f"wrote {out} ({out.stat().st_size / 1e6:.1f} MB, {len(state)} tensors, bf16)")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("model_dir", type=Path, nargs="?", default=Path("models/tiny"))
    parser.add_argument("out", type=Path, nargs="?", help="default: MODEL_DIR/model.safetensors")
    parser.add_argument("--seed", type=int, default=0)
    args = parser.parse_args()
    build(args.model_dir, args.out or args.model_dir / "model.safetensors", args.seed)


if __name__ == "__main__":
    main()
