"""Device check and timing of the Triton engine, runnable without the compiled core.

Loads ``kvmix.engines`` by path (a GPU host may not have the Rust wheel), takes the policies'
layouts from ``benches/triton_layouts.json`` (written by ``LayerStore(...).layout`` on a host
with the core), checks the CUDA engine against the interpreter (same codes) and against an
fp64 torch reference (attention on the dequantized cache), then times the fused kernel
against SDPA on the dense bf16 cache and against the bandwidth bound. Prints one table.
"""

import json
import sys
import time
import types
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parents[1]
pkg = types.ModuleType("kvmix")
pkg.__path__ = [str(ROOT / "python" / "kvmix")]
sys.modules["kvmix"] = pkg
from kvmix.engines import load_attention  # noqa: E402
from kvmix.engines.triton_store import TritonLayerStore  # noqa: E402

LAYOUTS = json.loads((ROOT / "benches" / "triton_layouts.json").read_text())
HQ, HK, D = 32, 8, 128


def store(name, device, b, n, seed=0, dtype=torch.bfloat16):
    lay = LAYOUTS[name]
    st = TritonLayerStore(lay["policy"], HK, D, lay["config"], "float32", layout=lay["layout"])
    gdev = "cpu" if n * b < 100_000 else device  # small: identical inputs on both devices
    g = torch.Generator(device=gdev).manual_seed(seed)
    # Keys with a few outlier channels, as real keys have.
    boost = 1 + 4 * (torch.arange(D, device=gdev) % 17 == 0)
    k = torch.randn(b, HK, n, D, generator=g, device=gdev) * boost
    v = torch.randn(b, HK, n, D, generator=g, device=gdev)
    st.append(k.to(dtype).float().to(device), v.to(dtype).float().to(device))
    del k, v
    if lay["policy"] == "zipcache":
        acc = torch.rand(b, HK, n, generator=g, device=gdev).to(device)
        st.add_scores(0, acc, torch.ones(b, HK, n, device=device))
    st.maybe_classify(force=True)
    return st


def reference(st, q, qpos, scale):
    k, v, held = st.dense_all()
    b = q.shape[0]
    k = k.double().reshape(b, HK, -1, D).repeat_interleave(HQ // HK, 1)
    v = v.double().reshape(b, HK, -1, D).repeat_interleave(HQ // HK, 1)
    mask = held.reshape(b, HK, -1).repeat_interleave(HQ // HK, 1)[:, :, None, :]
    pos = torch.arange(k.shape[2], device=q.device)
    mask = mask & (
        pos[None, None, None, :] <= torch.tensor(qpos, device=q.device)[None, None, :, None]
    )
    logits = (q.double() @ k.transpose(-1, -2)) * scale
    logits = logits.masked_fill(~mask, float("-inf"))
    return torch.softmax(logits, -1) @ v


def check():
    rows = []
    for name in ("zipcache", "uniform2", "uniform4", "full"):
        gpu = store(name, "cuda", 2, 700)
        try:
            cpu = store(name, "cpu", 2, 700)
        except Exception as e:  # an older Triton's interpreter; gpu/parity.py checks vs Rust
            print(f"  {name}: Triton interpreter failed ({type(e).__name__}); codes not compared")
            cpu = None
        same = cpu is not None
        for t in ("high", "low", "buffer") if cpu is not None else ():
            a, c = gpu._tiers[t], cpu._tiers[t]
            for f in ("pos", "kd", "vd", "ks", "ko", "vs", "vo", "vf"):
                x, y = getattr(a, f), getattr(c, f)
                if x.numel() > 1 and not torch.equal(x.cpu(), y):
                    diff = (x.cpu().float() != y.float()).float().mean().item()
                    print(f"  {name}/{t}/{f}: {diff:.2e} of elements differ")
                    same = False
        q = torch.randn(2, HQ, 1, D, device="cuda")
        ref = reference(gpu, q, [699], D**-0.5)
        for f16 in (False, True):
            attn = load_attention("cuda")
            out, _ = attn.attend_tiers(
                [gpu._tiers[t].view() for t in ("buffer", "high", "low")],
                q,
                [699],
                gpu._fv_dev,
                D**-0.5,
                HK,
                None,
                dot_f16=f16,
            )
            err = (out.double() - ref).abs().max().item()
            rows.append((name, "f16 dots" if f16 else "fp32 dots", same, err))
        if cpu is not None:
            try:
                oc = cpu.attend(q.cpu(), [699], D**-0.5, track=False)
            except Exception as e:  # Triton 3.6's interpreter cannot loop over tensor bounds
                print(f"  {name}: interpreter attention failed ({type(e).__name__})")
                continue
            rows.append((name, "interpreter", same, (oc.double() - ref.cpu()).abs().max().item()))
    print("correctness: policy | kernel | codes == interpreter | max |out - fp64 ref|")
    for r in rows:
        print(f"  {r[0]:9s} | {r[1]:11s} | {r[2]} | {r[3]:.2e}")


def bench(fn, reps=50):
    for _ in range(5):
        fn()
    torch.cuda.synchronize()
    times = []
    for _ in range(reps):
        a, b = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        a.record()
        fn()
        b.record()
        torch.cuda.synchronize()
        times.append(a.elapsed_time(b))
    times.sort()
    return times[len(times) // 2]


def copy_bandwidth():
    x = torch.empty(2 * 1024**3, dtype=torch.uint8, device="cuda")
    y = torch.empty_like(x)
    ms = bench(lambda: y.copy_(x), 20)
    return 2 * x.numel() / (ms * 1e-3)


def timing(variants):
    bw = copy_bandwidth()
    print(f"copy bandwidth {bw / 1e12:.2f} TB/s")
    attn = load_attention("cuda")
    for name in ("zipcache", "uniform2"):
        for b, n in ((1, 8192), (1, 32768), (8, 8192), (8, 32768)):
            st = store(name, "cuda", b, n)
            mem = st.memory()
            read = mem["bytes"]
            q = torch.randn(b, HQ, 1, D, device="cuda", dtype=torch.bfloat16)
            kd = torch.randn(b, HK, n, D, device="cuda", dtype=torch.bfloat16)
            vd = torch.randn_like(kd)
            sdpa = bench(
                lambda: torch.nn.functional.scaled_dot_product_attention(q, kd, vd, enable_gqa=True)
            )
            views = [st._tiers[t].view() for t in ("buffer", "high", "low")]
            res = []
            for label, kw in variants:
                ms = bench(
                    lambda: attn.attend_tiers(views, q, [n], st._fv_dev, D**-0.5, HK, None, **kw)
                )
                res.append(f"{label}={ms * 1e3:.0f}")
            bound = read / bw * 1e3
            print(
                f"{name:8s} B{b} {n // 1024}k | bytes {read / 1e6:.0f} MB ({mem['fp16_bytes'] / read:.2f}x smaller) "
                f"| bound {bound * 1e3:.0f} us | SDPA bf16 {sdpa * 1e3:.0f} us | "
                + " ".join(res)
                + " (us)"
            )
            del st, kd, vd
            torch.cuda.empty_cache()


if __name__ == "__main__":
    t0 = time.time()
    print(torch.__version__, __import__("triton").__version__, torch.cuda.get_device_name())
    check()
    print(f"check {time.time() - t0:.0f}s")
    variants = [
        ("f32", dict()),
        ("f16", dict(dot_f16=True)),
        ("f16x2", dict(dot_f16=True, target_programs=1056)),
        ("f16x4", dict(dot_f16=True, target_programs=2112)),
        ("f16w8", dict(dot_f16=True, target_programs=1056, num_warps=8)),
        ("f16s3", dict(dot_f16=True, target_programs=1056, num_stages=3)),
    ]
    timing(variants)
    print(f"total {time.time() - t0:.0f}s")
