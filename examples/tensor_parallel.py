"""kvmix caches under transformers tensor parallelism.

Each rank of ``tp_plan="auto"`` holds a share of the attention heads, and its cache only those
kv-heads; a kvmix layer builds its store from the kv-heads it receives. Run on two CPU processes
(gloo) or two GPUs (nccl)::

    torchrun --nproc-per-node 2 examples/tensor_parallel.py MODEL_DIR --cache zipcache
    python examples/tensor_parallel.py MODEL_DIR --cache zipcache      # one process, to compare

``--json PATH`` writes what was generated and what each rank held (rank 0 writes it), so the two
runs can be compared; tests/test_tensor_parallel.py does exactly that on a tiny random Llama.
ZipCache runs with ``selection="kv_head"``: the per-layer default pools the scores of every
kv-head of a layer, which under tensor parallelism live on other ranks (kvmix refuses it).
"""

from __future__ import annotations

import argparse
import json
import os
from typing import Any

import torch
import torch.distributed as dist
from transformers import AutoModelForCausalLM, DynamicCache

import kvmix


def build_cache(name: str, config: Any) -> Any:
    if name == "dynamic":
        return DynamicCache(config=config)
    if name == "full":
        return kvmix.FullPrecisionCache(config)
    if name == "zipcache":
        return kvmix.ZipCache(config, selection="kv_head", streaming_gap=4)
    raise SystemExit(f"unknown --cache {name!r}: dynamic, full or zipcache")


def tier_positions(cache: Any) -> list[list[dict[str, list[int]]]]:
    """Per layer, per kv-head this rank holds (sequence 0): the positions in each tier."""
    out = []
    for layer in cache.layers:
        store = layer.store
        out.append(
            [
                {t: sorted(int(p) for p in pos) for t, pos in store.tier_positions(h).items()}
                for h in range(store.kv_heads)
            ]
        )
    return out


def run(model: Any, ids: torch.Tensor, name: str, new_tokens: int, distributed: bool) -> Any:
    """Greedy tokens, and for a kvmix cache every rank's memory report and tier positions."""
    cache = build_cache(name, model.config)
    out = model.generate(ids, past_key_values=cache, max_new_tokens=new_tokens, do_sample=False)
    result: dict[str, Any] = {"tokens": out[0, ids.shape[1] :].tolist()}
    if name != "dynamic":
        result["memory"] = cache.memory_report_across_ranks()
        tiers = tier_positions(cache)
        if distributed:
            gathered: list[Any] = [None] * dist.get_world_size()
            dist.all_gather_object(gathered, tiers)
            result["tiers"] = gathered
        else:
            result["tiers"] = [tiers]
    return result


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("model_dir")
    p.add_argument(
        "--cache",
        default=["zipcache"],
        type=lambda v: v.split(","),
        help="comma-separated: dynamic, full, zipcache",
    )
    p.add_argument("--fused", action="store_true", help="kvmix's fused attention")
    p.add_argument("--prompt-tokens", type=int, default=300)
    p.add_argument("--new-tokens", type=int, default=12)
    p.add_argument("--json", default=None, help="write the results here (rank 0)")
    args = p.parse_args(argv)

    distributed = int(os.environ.get("WORLD_SIZE", "1")) > 1
    extra = {"tp_plan": "auto"} if distributed else {}
    model = AutoModelForCausalLM.from_pretrained(args.model_dir, dtype=torch.float32, **extra)
    if args.fused:
        kvmix.enable_fused_attention(model)
    else:
        kvmix.enable_portable_scoring(model)
    vocab = model.config.vocab_size
    ids = torch.randint(
        0, vocab, (1, args.prompt_tokens), generator=torch.Generator().manual_seed(1)
    )
    rank = dist.get_rank() if distributed else 0
    results = {name: run(model, ids, name, args.new_tokens, distributed) for name in args.cache}
    if rank == 0:
        for name, result in results.items():
            print(f"{name}: tokens {result['tokens']}")
            if "memory" in result:
                for r, m in enumerate(result["memory"]["ranks"]):
                    print(f"  rank {r}: {m['bytes']} bytes held ({m['fp16_bytes']} as fp16)")
                total = result["memory"]["total"]
                print(
                    f"  total: {total['bytes']} bytes held, {total['compression_ratio']:.2f}x "
                    "smaller than fp16"
                )
        if args.json:
            with open(args.json, "w") as f:
                json.dump(results, f)
    if distributed:
        # Shut gloo down before the interpreter exits: a rank leaving with the process group's
        # threads still running is aborted by the C++ runtime ("terminate called without an
        # active exception"), seen once in CI.
        dist.barrier()
        dist.destroy_process_group()
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
