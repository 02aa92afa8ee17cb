"""Estimate the GPU memory of 1024 training per image, from activation sizes measured on the CPU.

One forward pass of a recipe's segmenter at 1024x1024 records every tensor autograd saves for the
backward pass (``torch.autograd.graph.saved_tensors_hooks``), counted once per storage. That is the
activation memory of one image in fp32; under bf16 autocast most saved activations are half that
size (stated as an estimate: batch norms and the loss keep fp32). Weights, gradients and Adam's two
moments add 16 bytes per parameter. The batch that fits a GPU of G GiB is then
``(0.9 G - 1.5 GiB context and workspace - 16 B x parameters) / per-image bytes``, and the
accumulation that restores the recipe's batch is ``ceil(batch_size / fitting batch)``.

    python benchmarks/activation_memory.py        # prints JSON; make bench-train writes it too
"""

from __future__ import annotations

import json
import math
import sys
from dataclasses import replace
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).parent))
from common import save  # noqa: E402

from pneumothorax.io import config
from pneumothorax.models import factory

GPUS_GIB = (16, 24, 40, 80)
CONTEXT_GIB = 1.5


def saved_bytes(model: torch.nn.Module, size: int) -> int:
    """Bytes of the tensors autograd keeps from one forward pass of one image (each storage once)."""
    seen: dict[int, int] = {}

    def pack(tensor: torch.Tensor) -> torch.Tensor:
        storage = tensor.untyped_storage()
        seen[storage.data_ptr()] = storage.nbytes()
        return tensor

    model.train()
    x = torch.randn(1, 3, size, size, requires_grad=False)
    with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
        out = model(x)
    out.float().mean().backward()
    return sum(seen.values())


def recipe(name: str) -> dict:
    cfg = config.load(name)
    seg = replace(cfg.segmentation, encoder_weights="none")
    model = factory.create_segmenter(seg, 3)
    final = cfg.segmentation.stages[-1]
    per_image = saved_bytes(model, 1024)
    params = sum(p.numel() for p in model.parameters())
    bf16 = per_image / 2
    rows = {}
    for gib in GPUS_GIB:
        free = gib * 0.9 * 2**30 - CONTEXT_GIB * 2**30 - 16 * params
        fits = max(0, int(free // bf16))
        rows[f"{gib}GB"] = {
            "batch_bf16": fits,
            "accumulate_for_recipe_batch": math.ceil(final.batch_size / fits) if fits else None,
        }
    return {
        "recipe": name,
        "encoder": cfg.segmentation.encoder,
        "size": 1024,
        "recipe_batch": final.batch_size,  # the final stage's (2st_exp5's is at 512; here as if at 1024)
        "parameters_million": round(params / 1e6, 2),
        "activations_fp32_mib_per_image": round(per_image / 2**20, 1),
        "activations_bf16_mib_per_image_estimate": round(bf16 / 2**20, 1),
        "fits": rows,
    }


if __name__ == "__main__":
    result = {"recipes": [recipe(name) for name in ("2st_exp5", "1st_place")]}
    result["method"] = __doc__.split("\n\n")[1].replace("\n", " ")
    print(json.dumps(result, indent=1))
    save("activation_memory", result)
