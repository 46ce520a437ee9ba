"""Reads a vLLM model's weights back under their Hugging Face names, inside each worker (installed.py's check).

vLLM does not hold the tensors it was sent: it fuses some, shards them over tensor-parallel ranks and,
on the CPU backend, packs linear weights into GEMM handles. Each case is undone on its own terms:

- fused `qkv_proj` / `gate_up_proj`: this rank's slice of q, k, v (or gate, up) cut back out of the
  fused parameter, by the layer's own head counts and output sizes;
- tensor-parallel shards (column-parallel along dim 0, row-parallel along dim 1, vocabulary rows): the
  ranks' slices gathered over the TP group, so each worker hashes the whole tensor, its own shard in it;
  a replicated tensor (norms, row-parallel biases) is this worker's own copy;
- a weight the CPU backend packed away (an empty `weight` left behind) and the tied `lm_head` (its GEMM
  has its own packed copy of the embedding): read through the layer's own GEMM, the identity in and the
  transposed weight out. Exact, since each output sums one nonzero product; a -0.0 reads as +0.0.

Every rank runs the same collectives in the same order: the names come from one manifest.
"""

from __future__ import annotations

from collections.abc import Iterator, Sequence
from typing import Any

import torch

from rollout_side.engines.installed import ReadBackEntry, sums_of

__all__ = ["installed_param", "read_back"]

# Hugging Face projection -> (vLLM's fused layer, which part of it)
FUSED: dict[str, tuple[str, str | int]] = {
    "q_proj": ("qkv_proj", "q"),
    "k_proj": ("qkv_proj", "k"),
    "v_proj": ("qkv_proj", "v"),
    "gate_proj": ("gate_up_proj", 0),
    "up_proj": ("gate_up_proj", 1),
}


def read_back(model: torch.nn.Module, entries: Sequence[ReadBackEntry], piece_bytes: int) -> list[str]:
    """Each entry's checksum as this worker's model holds it ("" where the model has no such tensor)."""

    def held() -> Iterator[tuple[torch.Tensor | None, int]]:
        for name, offset, size in entries:  # on this thread, in order: every rank runs the same collectives
            tensor = installed_tensor(model, name)
            fits = tensor is not None and tensor.numel() * tensor.element_size() == size
            yield (tensor if fits else None), offset

    with torch.inference_mode():
        return sums_of(held(), piece_bytes)


def installed_param(model: torch.nn.Module, name: str) -> tuple[torch.nn.Module, str, str | int | None] | None:
    """(vLLM layer, its parameter name, part of a fused layer or None) holding HF tensor `name`; None if none."""
    module_name, _, param_name = name.rpartition(".")
    parent, _, leaf = module_name.rpartition(".")
    part: str | int | None = None
    if leaf in FUSED and not _has(model, module_name):
        fused, part = FUSED[leaf]
        module_name = f"{parent}.{fused}"
    if not _has(model, module_name):
        return None
    module = model.get_submodule(module_name)
    if not isinstance(getattr(module, param_name, None), torch.Tensor):
        return None
    return module, param_name, part


def installed_tensor(model: torch.nn.Module, name: str) -> torch.Tensor | None:
    """HF tensor `name` as this worker's model computes with it, whole (gathered over the TP group)."""
    found = installed_param(model, name)
    if found is None:
        return None
    module, param_name, part = found
    local = _local(module, param_name)
    if part is not None:
        local = _unfuse(module, local, part)
    return _gather(module, param_name, local, part)


def _has(model: torch.nn.Module, module_name: str) -> bool:
    try:
        model.get_submodule(module_name)
    except AttributeError:
        return False
    return True


def _local(module: Any, param_name: str) -> torch.Tensor:
    """This rank's copy of the parameter; read through the layer's GEMM where the backend packed it."""
    from vllm.model_executor.layers.vocab_parallel_embedding import ParallelLMHead

    param: torch.Tensor = getattr(module, param_name)
    packed = param_name == "weight" and hasattr(module, "cpu_linear")
    if packed and (param.numel() == 0 or isinstance(module, ParallelLMHead)):
        k = getattr(module, "input_size_per_partition", None) or module.embedding_dim
        eye = torch.eye(k, dtype=param.dtype)
        served: torch.Tensor = module.cpu_linear(eye, param, None)  # x @ W.T with x = I is W.T
        return served.t()
    return param.detach()


def _unfuse(module: Any, local: torch.Tensor, part: str | int) -> torch.Tensor:
    """This rank's slice of one projection, cut out of a fused qkv_proj or gate_up_proj (dim 0)."""
    if isinstance(part, str):
        sizes = {
            "q": module.num_heads * module.head_size,
            "k": module.num_kv_heads * module.head_size,
            "v": module.num_kv_heads * getattr(module, "v_head_size", module.head_size),
        }
        start = {"q": 0, "k": sizes["q"], "v": sizes["q"] + sizes["k"]}[part]
        return local.narrow(0, start, sizes[part])
    tp = module.tp_size
    sizes_local = [s // tp for s in module.output_sizes]
    return local.narrow(0, sum(sizes_local[:part]), sizes_local[part])


def _gather(module: Any, param_name: str, local: torch.Tensor, part: str | int | None) -> torch.Tensor:
    """The whole tensor from every rank's slice (this rank's own copy where the tensor is replicated)."""
    from vllm.distributed import get_tensor_model_parallel_world_size, get_tp_group
    from vllm.model_executor.layers.linear import ColumnParallelLinear, RowParallelLinear
    from vllm.model_executor.layers.vocab_parallel_embedding import VocabParallelEmbedding

    tp = getattr(module, "tp_size", None) or get_tensor_model_parallel_world_size()  # 1 for a disable_tp layer
    if isinstance(module, ColumnParallelLinear):
        dim = 0
    elif isinstance(module, RowParallelLinear) and param_name == "weight":
        dim = 1
    elif isinstance(module, VocabParallelEmbedding):
        dim = 0
    else:
        return local  # replicated
    if tp == 1:
        whole = local
    else:
        data = local.contiguous().view(-1).view(torch.uint8).cpu()
        chunks = [torch.empty_like(data) for _ in range(tp)]
        torch.distributed.all_gather(chunks, data, group=get_tp_group().cpu_group)
        parts = [c.view(local.dtype).view(local.shape) for c in chunks]
        replicas = getattr(module, "num_kv_head_replicas", 1)
        if part in ("k", "v") and replicas > 1:
            parts = parts[::replicas]  # each kv head is held by `replicas` ranks in a row
        whole = torch.cat(parts, dim)
    if isinstance(module, VocabParallelEmbedding):
        whole = whole[: module.org_vocab_size]  # padding rows sit at the end of the padded vocabulary
    return whole
