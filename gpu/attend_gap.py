"""Why the decode attention kernel takes longer inside the model than in the kernel bench.

Session 23 measured, at B=8 x 32k on one H100, the attend kernel at 211 us a layer inside
decoding steps of the 8B-shaped model (ZipCache; kvmix-5x 302 us) against 131 us (kvmix-5x
182 us) per launch in ``benches/gpu_triton.py``: a 1.6x gap. The tier structure is the same
in both (segments, pages, bits: checked on the CPU), so the differences left are the call
(the model's strided bf16 query, the ``[B, T, H, D]`` bf16 output, the tracked buffer), the
buffer tier (the bench's is empty, so the kernel is compiled without its branch) and the
cache's state between launches (the bench launches the same kernel back to back; in the
model, a layer's matmuls run in between).

Per preset, one layer of Llama-3.1-8B's shape (random bf16 weights) prefills B x T tokens and
decodes a few; then, on that layer's store and on the bench's synthetic store of the same
shape, each call variant is launched 20 times and the profiler's device time of each kernel
launch is taken (median), with and without an L2-sized write between launches.

    python3 gpu/attend_gap.py --batch 8 --context 32768
"""

from __future__ import annotations

import argparse
import dataclasses
import statistics
import sys
from pathlib import Path
from typing import Any

import torch
from prefill_profile import make_cache, prefill_once  # this folder's

import kvmix
from kvmix.bench.gpu import _model, llama_8b_config

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "benches"))
import gpu_triton  # the kernel bench's synthetic stores

TIERS = ("buffer", "high", "low")


def per_launch(fn: Any, flush: torch.Tensor | None, reps: int = 20) -> dict[str, float]:
    """Median device microseconds per launch of each kernel ``fn`` launches (the flush's own
    kernel left out), over ``reps`` calls."""
    from torch.profiler import ProfilerActivity, profile

    for _ in range(3):
        fn()
    cuda = torch.cuda.is_available()
    if cuda:
        torch.cuda.synchronize()
    with profile(activities=[ProfilerActivity.CUDA if cuda else ProfilerActivity.CPU]) as prof:
        for _ in range(reps):
            if flush is not None:
                flush.zero_()
            fn()
        if cuda:
            torch.cuda.synchronize()
    times: dict[str, list[float]] = {}
    for ev in prof.events():
        if ev.device_type.name == "CUDA" and ev.name.startswith("_"):  # Triton's kernels
            times.setdefault(ev.name.split("(")[0][:20], []).append(ev.device_time)
    return {k: statistics.median(v) for k, v in times.items()}


def describe(st: Any) -> str:
    parts = []
    for name in TIERS:
        v = st._tiers[name].view()
        parts.append(
            f"{name} fill {v.fill} pages {v.fill_pages(64)} nseg {v.nseg} "
            f"k {v.k_mode}/{v.k_bits} v {v.v_mode}/{v.v_bits} {v.kd.dtype}"
        )
    return "; ".join(parts)


def variants(st: Any, q_model: torch.Tensor, out_model: torch.Tensor, qpos: list[int],
             scale: float) -> list[tuple[str, Any]]:  # fmt: skip
    """The call as the model makes it, then one difference at a time taken away."""
    from kvmix.engines import load_attention

    attn = load_attention(q_model.device)
    views = [st._tiers[t].view() for t in TIERS]
    no_buffer = [dataclasses.replace(views[0], fill=0), *views[1:]]
    q_plain = q_model.contiguous()
    hk = st.kv_heads
    rot = st.rotation

    def tiers(vs: list[Any], q: torch.Tensor) -> Any:
        return lambda: attn.attend_tiers(vs, q, qpos, st._fv_dev, scale, hk, None, rotation=rot)

    def as_model() -> Any:
        return st.attend(q_model, qpos, scale, True, out=out_model)

    return [
        ("store.attend as the model calls it", as_model),
        ("attend_tiers, model's q, untracked", tiers(views, q_model)),
        ("attend_tiers, contiguous q", tiers(views, q_plain)),
        ("attend_tiers, contiguous q, no buffer", tiers(no_buffer, q_plain)),
    ]


def one_method(method: str, model: Any, config: Any, ids: torch.Tensor, flush: torch.Tensor,
               args: argparse.Namespace) -> None:  # fmt: skip
    """Prefill and a few steps of ``method``, the query and output the model's call passes,
    then each store's and call's per-launch kernel times."""
    dev = ids.device
    cache = make_cache(method, config, "triton")
    prefill_once(model, ids, cache)
    token = ids[:, -1:]

    def step() -> None:
        model(token, past_key_values=cache, use_cache=True)

    with torch.inference_mode():
        for _ in range(3):  # compiles the step's kernels; the buffer takes rows
            step()
    st = cache.layers[0].store
    seen: dict[str, Any] = {}
    real = st.attend

    def spy(q: Any, qpos: Any, scale: Any, track: Any = True, *, out: Any = None) -> Any:
        seen.update(q=q.clone(), strides=q.stride(), qpos=list(qpos), scale=scale,
                    track=track, out=out)  # fmt: skip
        return real(q, qpos, scale, track, out=out)

    st.attend = spy
    with torch.inference_mode():
        steps = per_launch(step, None, 8)
    st.attend = real
    # The captured query keeps the model's strides (clone keeps a dense layout's order).
    q_model = torch.empty_strided(seen["q"].shape, seen["strides"], dtype=seen["q"].dtype,
                                  device=dev)  # fmt: skip
    q_model.copy_(seen["q"])
    out_model = torch.empty_like(seen["out"]) if seen["out"] is not None else None
    print(f"## {method}: q {tuple(q_model.shape)} {q_model.dtype} strides "
          f"{q_model.stride()}, out "
          f"{None if out_model is None else (tuple(out_model.shape), out_model.dtype)}, "
          f"track {seen['track']}")  # fmt: skip
    print("  in the model's steps, per launch (us): "
          + " ".join(f"{k}={v:.1f}" for k, v in sorted(steps.items())))  # fmt: skip
    if st.rotation is None:
        # The model's store against the float64 reference (its fp16 buffer rows included).
        from kvmix.engines import triton_reference as ref

        views = [st._tiers[t].view() for t in TIERS]
        top = [st.seen - 1]
        got = st.attend(q_model, top, seen["scale"], False)
        want, _ = ref.attention(views, q_model, top, st._fv_dev, seen["scale"], st.kv_heads)
        err = ((got.double() - want).abs().max() / want.abs().max()).item()
        print(f"  model's store against float64: max |out - ref| / max |ref| = {err:.2e}")
        del views, got, want
    rows = st._tiers["buffer"].view().fill
    stores = [("model's store", st)]
    if not args.quick:
        stores.append(("bench store", gpu_triton.store(method, dev, args.batch, args.context)))
    with_rows = gpu_triton.store(method, dev, args.batch, args.context, extra=rows)
    stores.append((f"bench store + {rows} buffer rows", with_rows))
    for label, s in stores:
        print(f"  {label}: {describe(s)}")
        calls = variants(s, q_model, out_model, [s.seen - 1], seen["scale"])
        for vlabel, fn in calls[:1] if args.quick else calls:
            with torch.inference_mode():
                warm = per_launch(fn, None)
                cold = per_launch(fn, flush)
            a = "_attend_kernel"
            rest = " ".join(f"{k}={warm[k]:.1f}" for k in sorted(warm) if k != a)
            print(f"    {vlabel:40s} attend {warm.get(a, float('nan')):6.1f} us, after an "
                  f"L2 flush {cold.get(a, float('nan')):6.1f} | {rest}")  # fmt: skip


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--batch", type=int, default=8)
    p.add_argument("--context", type=int, default=32768)
    p.add_argument("--methods", nargs="+", default=["zipcache", "kvmix-5x"])
    p.add_argument("--smoke", action="store_true", help="CPU, interpreter, a narrow model")
    p.add_argument("--quick", action="store_true",
                   help="the model's call only, on the model's store and the bench's with rows "
                   "in its buffer")  # fmt: skip
    args = p.parse_args()
    dev = torch.device("cpu" if args.smoke else "cuda")
    config = llama_8b_config(False)
    config.num_hidden_layers = 1
    if args.smoke:  # the kernel bench's heads (8 kv, 128 wide), little else
        config.hidden_size = config.intermediate_size = 256
        config.vocab_size = 256
    model = _model(config, dev, torch.float32 if args.smoke else torch.bfloat16)
    kvmix.enable_fused_attention(model)
    gen = torch.Generator().manual_seed(0)
    ids = torch.randint(0, config.vocab_size, (args.batch, args.context), generator=gen).to(dev)
    # Larger than the L2 (50 MB on an H100).
    flush = torch.empty(96 * 2**20 // 4 // (64 if args.smoke else 1), device=dev)
    gpu = torch.cuda.get_device_name() if dev.type == "cuda" else "CPU (interpreter)"
    print(f"# {gpu}, torch {torch.__version__}, "
          f"B={args.batch} T={args.context}, one layer")  # fmt: skip
    for method in args.methods:
        one_method(method, model, config, ids, flush, args)
        torch.cuda.empty_cache()
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
