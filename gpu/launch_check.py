"""The decoding step's launch path on a real GPU (run after ``source gpu/setup.sh``).

1. The fast launch (compiled kernels launched directly, the default) gives bit-identical
   outputs to Triton's own launch, for the attention output written in bf16 in the model's
   layout and for the received attention added in place to the scores.
2. A decoding step of a model on the Triton engine (append, attention, tracking) makes no
   synchronizing call (``torch.cuda.set_sync_debug_mode("error")``).
3. Host microseconds per call: one torch op, Triton's launch and the fast launch of the
   attention (the compiled kernel's launcher called directly, and through its runner as
   before session 26), the stream lookup both ways, and the store's append and attention of
   one layer step.

    python3 gpu/launch_check.py
"""

from __future__ import annotations

import os
import time

import torch

import kvmix
import kvmix.bench.gpu
from kvmix.engines import load_attention
from kvmix.engines.triton_store import TritonLayerStore

# LAUNCH_CHECK_DEVICE=cpu: a smoke run of part 1 under the interpreter (small sizes).
dev = torch.device(os.environ.get("LAUNCH_CHECK_DEVICE", "cuda"))
B, H, HQ, D, N = (2, 8, 32, 128, 3000) if dev.type == "cuda" else (1, 2, 8, 32, 150)
torch.manual_seed(0)
store = TritonLayerStore("zipcache", H, D, {"streaming_gap": 100}, "float16")
store.append(torch.randn(B, H, N, D, device=dev), torch.randn(B, H, N, D, device=dev))
store.add_scores(0, torch.rand(B, H, N, device=dev), torch.ones(B, H, N, device=dev))
store.maybe_classify(True)
for _ in range(5):
    tok = torch.randn(B, H, 1, D, device=dev, dtype=torch.bfloat16)
    store.append(tok, tok)
attn = load_attention(dev)
q = torch.randn(B, HQ, 1, D, device=dev, dtype=torch.bfloat16)
tiers = [store._tiers[t] for t in ("buffer", "high", "low")]
views = [t.view() for t in tiers]
pos = [store.seen - 1]
want = [True, False, False]

ok = True
for rnd in range(3):  # the first call compiles, later ones take the fast path
    ref, rec = attn.attend_tiers(views, q, pos, store._fv_dev, 0.088, H, want, fast_launch=False)
    out = torch.empty(B, 1, HQ, D, device=dev, dtype=torch.bfloat16)
    acc, cnt = tiers[0].acc.clone(), tiers[0].count.clone()
    acc0, cnt0 = acc.clone(), cnt.clone()
    attn.attend_tiers(
        views, q, pos, store._fv_dev, 0.088, H, want,
        accumulate=[(acc, cnt), None, None], out=out, out_layout="bthd",
    )  # fmt: skip
    f = tiers[0].fill
    same_out = torch.equal(out.transpose(1, 2), ref.to(torch.bfloat16))
    same_acc = torch.equal(acc[:, :f], acc0[:, :f] + rec[0])
    p = tiers[0].pos[:, :f]
    seen = ((p >= 0) & (p <= pos[0])).float()
    same_cnt = torch.equal(cnt[:, :f], cnt0[:, :f] + seen)
    print(f"round {rnd}: fast launch == Triton launch: output {same_out}, scores {same_acc}, "
          f"counts {same_cnt}")  # fmt: skip
    ok &= same_out and same_acc and same_cnt

if dev.type == "cpu":
    print("ALL OK" if ok else "MISMATCH")
    raise SystemExit(0)

# A model's decoding step makes no synchronizing call.
config = kvmix.bench.gpu.llama_8b_config(tiny=True)
config.hidden_size, config.num_attention_heads, config.num_key_value_heads = 512, 8, 2
config.head_dim, config.intermediate_size = 64, 1024
model = kvmix.bench.gpu._model(config, dev, torch.bfloat16)
kvmix.enable_fused_attention(model)
for preset in ("zipcache", "kvmix-5x", "uniform2"):
    cache = kvmix.make_cache(preset, model.config)
    ids = torch.randint(0, 256, (2, 700), device=dev)
    with torch.inference_mode():
        token = model(ids, past_key_values=cache, use_cache=True).logits[:, -1:].argmax(-1)
        token = model(token, past_key_values=cache, use_cache=True).logits[:, -1:].argmax(-1)
        torch.cuda.synchronize()
        torch.cuda.set_sync_debug_mode("error")
        try:
            for _ in range(3):
                logits = model(token, past_key_values=cache, use_cache=True).logits
                token = logits[:, -1:].argmax(-1)
            print(f"{preset}: 3 decoding steps, no synchronizing call")
        except RuntimeError as err:
            ok = False
            print(f"{preset}: a decoding step synchronized: {err}")
        finally:
            torch.cuda.set_sync_debug_mode("default")


def host_us(fn, n=300):
    fn()
    torch.cuda.synchronize()
    t0 = time.perf_counter()
    for _ in range(n):
        fn()
    t1 = time.perf_counter()
    torch.cuda.synchronize()
    return 1e6 * (t1 - t0) / n


def through_runner(fn):
    """``fn`` with the fast launch going through the compiled kernel's runner (as it did to
    session 25), not its launcher directly: the same-process baseline of that change."""
    knobs = attn._KNOBS
    attn._KNOBS = None
    try:
        return fn()
    finally:
        attn._KNOBS = knobs


out = torch.empty(B, 1, HQ, D, device=dev, dtype=torch.bfloat16)
acc_add = [(tiers[0].acc.clone(), tiers[0].count.clone()), None, None]


def attend(**kw):
    """The attention call a decoding step makes (in place, bf16 out in the model's layout)."""
    return attn.attend_tiers(
        views, q, pos, store._fv_dev, 0.088, H, want,
        accumulate=acc_add, out=out, out_layout="bthd", **kw,
    )  # fmt: skip


rows = {
    "torch.empty (one op)": lambda: torch.empty(B, 1, HQ, D, device=dev),
    "q.float() (one op)": lambda: q.float(),
    "attend_tiers, Triton's launch": lambda: attend(fast_launch=False),
    "attend_tiers, fast launch": attend,
    "attend_tiers, fast launch through Triton's runner": lambda: through_runner(attend),
    "torch.cuda.current_stream(dev).cuda_stream": lambda: (
        torch.cuda.current_stream(dev).cuda_stream
    ),
    "_raw_stream(dev)": lambda: attn._raw_stream(dev),
    "store.attend(out=..., track) (views included)": lambda: store.attend(
        q, pos, 0.088, True, out=out
    ),
    "store.append (a decoding step's token)": lambda: store.append(tok, tok),
}
for name, fn in rows.items():
    print(f"{name:48s} {host_us(fn):8.1f} us host per call")
print("ALL OK" if ok else "MISMATCH")
