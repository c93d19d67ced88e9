"""Where a prefill makes the host wait for the GPU: each synchronizing call (``.item()``,
``bool(t)``, ``.tolist()``, a device-to-host copy) that torch's sync debug mode reports during
one prefill of Llama-3.1-8B's shape (random bf16 weights, ``--layers`` layers) into each
method's cache, with the kvmix / transformers frames that made it, counted per place.

A synchronizing read costs more than its own time in a prefill: the host, which otherwise runs
ahead of the GPU, waits there until every queued kernel has run, then pays its own host work
with the GPU idle. The prefill's overhead over DynamicCache end to end (``prefill_profile.py``)
is the device time of kvmix's kernels plus such waits.

    python3 gpu/sync_points.py --batch 1 --context 32768 --layers 2
"""

from __future__ import annotations

import argparse
import traceback
import warnings
from collections import Counter

import torch

import kvmix
from kvmix.bench.gpu import _model, llama_8b_config


def frames() -> str:
    """The innermost kvmix / transformers frames of the current stack."""
    keep = [
        f
        for f in traceback.extract_stack()
        if ("kvmix" in f.filename or "transformers" in f.filename)
        and "sync_points" not in f.filename
    ]
    return " < ".join(
        f"{f.filename.rsplit('/', 1)[-1]}:{f.name}:{f.lineno}" for f in keep[-4:][::-1]
    )


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--batch", type=int, default=1)
    p.add_argument("--context", type=int, default=32768)
    p.add_argument("--layers", type=int, default=2)
    p.add_argument("--methods", nargs="+", default=["full", "zipcache", "kvmix-5x"])
    args = p.parse_args()
    dev = torch.device("cuda")
    config = llama_8b_config(False)
    config.num_hidden_layers = args.layers
    model = _model(config, dev, torch.bfloat16)
    gen = torch.Generator().manual_seed(0)
    ids = torch.randint(0, config.vocab_size, (args.batch, args.context), generator=gen).to(dev)
    print(f"# {torch.cuda.get_device_name()}, B={args.batch} T={args.context} layers={args.layers}")
    for method in args.methods:
        if method == "full":
            model.set_attn_implementation("sdpa")
        else:
            kvmix.enable_fused_attention(model)

        def prefill(method: str = method) -> None:
            cache = (
                kvmix.make_cache(method, config)
                if method == "full"
                else kvmix.make_cache(method, config, engine="triton")
            )
            with torch.inference_mode():
                model(ids, past_key_values=cache, use_cache=True, logits_to_keep=1)

        prefill()  # compiles the kernels
        torch.cuda.synchronize()
        seen: Counter[str] = Counter()
        shown = warnings.showwarning

        def record(*_: object, seen: Counter[str] = seen, **__: object) -> None:
            seen[frames()] += 1

        warnings.showwarning = record  # type: ignore[assignment]
        try:
            with warnings.catch_warnings():
                warnings.simplefilter("always")
                warnings.showwarning = record  # type: ignore[assignment]
                torch.cuda.set_sync_debug_mode("warn")
                try:
                    prefill()
                finally:
                    torch.cuda.set_sync_debug_mode(0)
        finally:
            warnings.showwarning = shown
        print(f"## {method}: {sum(seen.values())} synchronizing calls in one prefill")
        for where, n in seen.most_common():
            print(f"  {n:4d}x  {where}")
        torch.cuda.empty_cache()
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
