"""The caches on the Triton engine end to end, on one GPU (``--device cuda``; ``--device cpu``
runs the same checks under Triton's interpreter at small sizes, as a smoke test).

1. Token parity: a small random Llama (fp32) generates greedily with each preset on the GPU
   (Triton engine) and on the CPU (Rust engine): same tokens? same tier for every token?
2. Memory: after a SmolLM2-shaped random model (bf16) decodes with a ZipCache, the bytes the
   caches free on ``reset()`` (``torch.cuda.memory_allocated`` before - after) against
   ``memory_report()["allocated_bytes"]`` and against the stores' tensors rounded as the
   caching allocator rounds them (512 bytes).
3. Host syncs: one decoding step under ``torch.cuda.set_sync_debug_mode("warn")``.
4. Decode timing: median step after a prefill, DynamicCache vs kvmix presets, fused and
   portable, at batch 1 and 8.

    python3 gpu/engine_e2e.py --device cuda > results/gpu/engine-e2e-h200.txt
"""

from __future__ import annotations

import argparse
import statistics
import time
import warnings
from typing import Any

import numpy as np
import torch
from transformers import DynamicCache, LlamaConfig, LlamaForCausalLM

import kvmix
from kvmix.models import tiny_random_model

PRESETS: dict[str, Any] = {
    "full": lambda c, e: kvmix.FullPrecisionCache(c, engine=e),
    "uniform4": lambda c, e: kvmix.QuantizedKVCache(c, bits=4, residual=32, engine=e),
    "uniform2": lambda c, e: kvmix.QuantizedKVCache(c, bits=2, residual=32, engine=e),
    "zipcache": lambda c, e: kvmix.ZipCache(c, streaming_gap=8, engine=e),
    "zipcache-rotated": lambda c, e: kvmix.KvmixCache(
        c, "zipcache", {"salient_ratio": 0.2, "streaming_gap": 8}, rotation_seed=0, engine=e
    ),
    "kvmix-5x": lambda c, e: kvmix.Kvmix5xCache(c, streaming_gap=8, engine=e),
    "mikv": lambda c, e: kvmix.MiKVCache(c, engine=e),
    "eviction": lambda c, e: kvmix.EvictionCache(c, engine=e),
}
ENABLE = {"fused": kvmix.enable_fused_attention, "portable": kvmix.enable_portable_scoring}


def sync(device: str) -> None:
    if device == "cuda":
        torch.cuda.synchronize()


def tiers_of(cache: Any) -> list[dict[str, list[int]]]:
    out = []
    for layer in cache.layers:
        st = layer.store
        for s in range(st.batch * st.kv_heads):
            tp = st.tier_positions(s)
            out.append(
                {t: sorted(int(x) for x in np.asarray(torch.as_tensor(tp[t]).cpu())) for t in tp}
            )
    return out


def token_parity(device: str, prompt: int, new: int) -> None:
    print(f"== 1. token parity: CPU Rust engine vs {device} Triton engine (fp32 random Llama) ==")
    over = dict(
        num_hidden_layers=3,
        hidden_size=256,
        intermediate_size=512,
        num_attention_heads=8,
        num_key_value_heads=2,
        head_dim=64 if device == "cuda" else 16,
        vocab_size=512,
        max_position_embeddings=4096,
    )
    g = torch.Generator().manual_seed(0)
    ids = torch.randint(3, 512, (2, prompt), generator=g)
    mask = torch.ones_like(ids)
    mask[1, :17] = 0
    for mode, enable in ENABLE.items():
        for name, make in PRESETS.items():
            if name == "eviction" and mode == "portable":
                continue  # eviction has no dense keys to hand back: fused only
            res = {}
            for engine, dev in (("rust", "cpu"), ("triton", device)):
                model = enable(tiny_random_model("llama", **over)).to(dev)
                cache = make(model.config, "auto" if dev == "cuda" else engine)
                with torch.inference_mode():
                    out = model.generate(
                        input_ids=ids.to(dev),
                        attention_mask=mask.to(dev),
                        past_key_values=cache,
                        max_new_tokens=new,
                        do_sample=False,
                    )
                res[engine] = (out[:, prompt:].cpu(), tiers_of(cache), cache)
            (tr, pr, cr), (tt, pt, ct) = res["rust"], res["triton"]
            same = int((tr == tt).all(1).sum())
            first = [
                int((tr[b] != tt[b]).nonzero()[0]) if not torch.equal(tr[b], tt[b]) else new
                for b in range(2)
            ]
            print(
                f"{mode:8s} {name:17s} engine {ct.layers[0].engine_name}: sequences with identical "
                f"tokens {same}/2 (first difference at step {first}); tiers identical: {pr == pt}; "
                f"bytes rust {cr.memory_report()['bytes']} triton {ct.memory_report()['bytes']}"
            )


def smol_config(layers: int) -> LlamaConfig:
    return LlamaConfig(
        vocab_size=49152,
        hidden_size=576,
        intermediate_size=1536,
        num_hidden_layers=layers,
        num_attention_heads=9,
        num_key_value_heads=3,
        head_dim=64,
        max_position_embeddings=8192,
        rope_theta=100000.0,
        tie_word_embeddings=True,
    )


def random_model(layers: int, device: str, dtype: torch.dtype) -> Any:
    torch.manual_seed(0)
    with torch.device(device):
        model = LlamaForCausalLM(smol_config(layers)).to(dtype)
    return model.eval()


def decode(
    model: Any, cache: Any, batch: int, prompt: int, steps: int, device: str
) -> dict[str, float]:
    g = torch.Generator().manual_seed(1)
    ids = torch.randint(3, model.config.vocab_size, (batch, prompt), generator=g).to(device)
    with torch.inference_mode():
        sync(device)
        t0 = time.perf_counter()
        out = model(input_ids=ids, past_key_values=cache, use_cache=True)
        nxt = out.logits[:, -1:].argmax(-1)
        sync(device)
        prefill = time.perf_counter() - t0
        times = []
        for _ in range(steps):
            sync(device)
            t0 = time.perf_counter()
            out = model(input_ids=nxt, past_key_values=cache, use_cache=True)
            nxt = out.logits[:, -1:].argmax(-1)
            sync(device)
            times.append(time.perf_counter() - t0)
    return {"prefill_s": prefill, "step_ms": 1e3 * statistics.median(times[2:] or times)}


def memory_check(device: str, layers: int, prompt: int, steps: int) -> None:
    print(f"== 2. memory: memory_report vs what the caches free on reset ({device}) ==")
    for mode in ("fused", "portable"):
        for name in ("zipcache", "uniform2", "full"):
            model = ENABLE[mode](random_model(layers, device, torch.bfloat16))
            cache = PRESETS[name](model.config, "auto" if device == "cuda" else "triton")
            decode(model, cache, 2, prompt, steps, device)
            sync(device)
            rep = cache.memory_report()
            tensors = [t for layer in cache.layers for t in layer.store.tensors()]
            rounded = sum(-(-t.numel() * t.element_size() // 512) * 512 for t in tensors)
            dense = 0
            for layer in cache.layers:
                if layer._dense is not None:
                    dense += sum(
                        -(-t.numel() * t.element_size() // 512) * 512 for t in layer._dense
                    )
            n_tensors = len(tensors)
            del tensors  # our references would keep the tensors alive through the reset
            before = torch.cuda.memory_allocated() if device == "cuda" else 0
            for layer in cache.layers:
                layer.reset()  # drops the store's tensors and the portable path's buffers
            sync(device)
            freed = before - torch.cuda.memory_allocated() if device == "cuda" else 0
            print(
                f"{mode:8s} {name:9s}: bytes {rep['bytes']:>10,} allocated_bytes "
                f"{rep['allocated_bytes']:>10,} (fp16 {rep['fp16_bytes']:,}, ratio "
                f"{rep['compression_ratio']:.2f}); freed on reset {freed:>10,} = store tensors "
                f"rounded to 512 B {rounded:,} + portable dense buffers {dense:,}: "
                f"{'EQUAL' if freed == rounded + dense else 'DIFFERENT'} "
                f"(allocated_bytes off by {freed - dense - rep['allocated_bytes']:+,} B of "
                f"rounding over {n_tensors} tensors)"
            )
            del cache, model


def sync_check(device: str, layers: int, prompt: int) -> None:
    if device != "cuda":
        return
    print("== 3. host syncs in a decoding step (torch.cuda.set_sync_debug_mode('warn')) ==")
    for mode in ("fused", "portable"):
        for name in ("zipcache", "uniform2", "mikv"):
            model = ENABLE[mode](random_model(layers, device, torch.bfloat16))
            cache = PRESETS[name](model.config, "auto")
            decode(model, cache, 1, prompt, 3, device)
            nxt = torch.tensor([[5]], device=device)
            with torch.inference_mode(), warnings.catch_warnings(record=True) as w:
                warnings.simplefilter("always")
                torch.cuda.set_sync_debug_mode("warn")
                try:
                    model(input_ids=nxt, past_key_values=cache, use_cache=True)
                finally:
                    torch.cuda.set_sync_debug_mode("default")
            where = sorted({str(x.message).splitlines()[0][:90] for x in w})
            print(f"{mode:8s} {name:9s}: {len(w)} synchronizing calls in one step {where}")


def timing(device: str, layers: int, prompt: int, steps: int, batches: list[int]) -> None:
    print(f"== 4. decode timing: SmolLM2-shaped random bf16 model, {prompt}-token prompt ==")
    for batch in batches:
        for mode, name in [
            ("sdpa", "DynamicCache"),
            ("fused", "zipcache"),
            ("portable", "zipcache"),
            ("fused", "uniform4"),
            ("portable", "uniform4"),
            ("fused", "full"),
        ]:
            model = random_model(layers, device, torch.bfloat16)
            if mode == "sdpa":
                cache: Any = DynamicCache(config=model.config)
            else:
                ENABLE[mode](model)
                cache = PRESETS[name](model.config, "auto" if device == "cuda" else "triton")
            decode(model, cache, batch, prompt, 2, device)  # compile / warm up
            cache = (
                DynamicCache(config=model.config)
                if mode == "sdpa"
                else PRESETS[name](model.config, "auto" if device == "cuda" else "triton")
            )
            if device == "cuda":
                torch.cuda.reset_peak_memory_stats()
            r = decode(model, cache, batch, prompt, steps, device)
            peak = torch.cuda.max_memory_allocated() / 2**20 if device == "cuda" else 0
            print(
                f"B={batch} {name:12s} {mode:8s}: prefill {r['prefill_s']:.3f} s, median step "
                f"{r['step_ms']:.2f} ms ({batch / r['step_ms'] * 1e3:.0f} tok/s), peak "
                f"{peak:.0f} MiB"
            )
            del model, cache


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--device", default="cuda")
    args = ap.parse_args()
    dev = args.device
    if dev == "cuda":
        print(
            "device",
            torch.cuda.get_device_name(),
            "torch",
            torch.__version__,
            "triton",
            __import__("triton").__version__,
        )
        import traceback

        for step in (
            lambda: token_parity(dev, 300, 24),
            lambda: memory_check(dev, 30, 4096, 32),
            lambda: sync_check(dev, 30, 4096),
            lambda: timing(dev, 30, 4096, 32, [1, 8]),
        ):
            try:
                step()
            except Exception:  # report and go on to the next check
                traceback.print_exc()
    else:
        token_parity(dev, 40, 6)
        memory_check(dev, 1, 80, 3)
        timing(dev, 1, 80, 2, [1])


if __name__ == "__main__":
    main()
