"""Device check and timing of the Triton decode attention kernel, runnable without the core.

Loads ``kvmix.engines`` by path (a GPU host may not have the Rust wheel), takes the policies'
layouts from ``benches/triton_layouts.json`` (written by ``LayerStore(...).layout`` on a host
with the core). Checks the compiled kernel against a float64 torch reference: on stores of
every policy (attention on the dequantized cache) and on synthetic tiers of every codec
(``kvmix.engines.triton_reference``; 1/2/3/4/8-bit, grouped), with the received attention.
Then times kernel variants against SDPA on the dense bf16 cache of the same shape and against
the bandwidth bound (compressed bytes / measured copy bandwidth). Two times per variant:
``eager`` (CUDA events around 10 back-to-back calls, as a model calls it: includes the host's
launch cost when that exceeds the GPU's time) and ``graph`` (the same calls replayed from a
CUDA graph: the GPU's time alone). Medians. Prints one table.

    python3 benches/gpu_triton.py [--quick]
"""

import json
import sys
import time
import types
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parents[1]
if "kvmix" not in sys.modules:
    try:
        import kvmix  # noqa: F401
    except ImportError:
        pkg = types.ModuleType("kvmix")
        pkg.__path__ = [str(ROOT / "python" / "kvmix")]
        sys.modules["kvmix"] = pkg
from kvmix.engines import load_attention  # noqa: E402
from kvmix.engines import triton_reference as ref  # noqa: E402
from kvmix.engines.triton_store import TritonLayerStore  # noqa: E402

LAYOUTS = json.loads((ROOT / "benches" / "triton_layouts.json").read_text())
HQ, HK, D = 32, 8, 128
TIERS = ("buffer", "high", "low")


def store(name, device, b, n, seed=0, extra=0):
    lay = LAYOUTS[name]
    st = TritonLayerStore(lay["policy"], HK, D, lay["config"], "float32", layout=lay["layout"])
    g = torch.Generator(device=device).manual_seed(seed)
    # Keys with a few outlier channels, as real keys have.
    boost = 1 + 4 * (torch.arange(D, device=device) % 17 == 0)
    k = torch.randn(b, HK, n, D, generator=g, device=device) * boost
    v = torch.randn(b, HK, n, D, generator=g, device=device)
    if lay.get("rotation_seed") is not None:  # kvmix-5x stores rotated rows
        from kvmix.cache import randomized_hadamard
        from kvmix.engines.triton_store import hadamard_to

        st.set_rotation(hadamard_to(randomized_hadamard(D, lay["rotation_seed"]), D, device))
    st.append(k.bfloat16().float(), v.bfloat16().float())
    del k, v
    if lay["policy"] == "zipcache":
        acc = torch.rand(b, HK, n, generator=g, device=device)
        st.add_scores(0, acc, torch.ones(b, HK, n, device=device))
    st.maybe_classify(force=True)
    if extra:  # rows in the buffer tier too
        k = torch.randn(b, HK, extra, D, generator=g, device=device)
        st.append(k, torch.randn(b, HK, extra, D, generator=g, device=device))
    return st


def check():
    attn = load_attention("cuda")
    print(
        "correctness vs float64 torch: case | batch x queries | precise | "
        "max |out - ref| / max |ref| | max |received - ref|"
    )
    worst = {True: 0.0, False: 0.0}
    for name in ("zipcache", "uniform2", "uniform4", "full"):
        st = store(name, "cuda", 2, 700, extra=5)
        views = [st._tiers[t].view() for t in TIERS]
        for tq in (1, 3):
            q = torch.randn(2, HQ, tq, D, device="cuda", dtype=torch.bfloat16)
            qpos = [st.seen - tq + i for i in range(tq)]
            want, want_rec = ref.attention(views, q, qpos, st._fv_dev, D**-0.5, HK)
            for precise in (True, False):
                out, rec = attn.attend_tiers(
                    views, q, qpos, st._fv_dev, D**-0.5, HK, [True] * 3, precise=precise
                )
                err = ((out.double() - want).abs().max() / want.abs().max()).item()
                rerr = max(
                    (r.double() - w).abs().max().item() if r.numel() else 0.0
                    for r, w in zip(rec, want_rec, strict=True)
                )
                worst[precise] = max(worst[precise], err)
                print(f"  {name:9s} | 2 x {tq} | {precise!s:5} | {err:.2e} | {rerr:.2e}")
    g = torch.Generator().manual_seed(0)
    S = 2 * HK
    synth = [
        ref.synthetic_tier(S, 40, D, ("dense", 0, D), ("dense", 0, D), pos_offset=900, generator=g),
        ref.synthetic_tier(S, 500, D, ("channel", 3, D), ("token", 3, D), v_sep=True, generator=g),
        ref.synthetic_tier(
            S, 400, D, ("token", 4, 32), ("token", 1, 64), pos_offset=500, generator=g
        ),
    ]
    synth2 = [
        ref.synthetic_tier(S, 0, D, ("dense", 0, D), ("dense", 0, D), generator=g),
        ref.synthetic_tier(S, 300, D, ("channel", 8, D), ("token", 2, D), generator=g),
        ref.synthetic_tier(
            S, 300, D, ("token", 2, 16), ("token", 8, 128), pos_offset=300, generator=g
        ),
    ]
    for label, views in (("synth 3/4/1-bit", synth), ("synth 8/2-bit", synth2)):
        views = [_to(v, "cuda") for v in views]
        q = torch.randn(2, HQ, 1, D, device="cuda")
        top = max(int(v.pos.max()) for v in views)
        fv = torch.tensor([0, 17], dtype=torch.int32, device="cuda")
        want, want_rec = ref.attention(views, q, [top], fv, D**-0.5, HK)
        for precise in (True, False):
            out, rec = attn.attend_tiers(
                views, q, [top], fv, D**-0.5, HK, [True] * 3, precise=precise
            )
            err = ((out.double() - want).abs().max() / want.abs().max()).item()
            rerr = max(
                (r.double() - w).abs().max().item() if r.numel() else 0.0
                for r, w in zip(rec, want_rec, strict=True)
            )
            worst[precise] = max(worst[precise], err)
            print(f"  {label:9s} | 2 x 1 | {precise!s:5} | {err:.2e} | {rerr:.2e}")
    print(f"worst relative error: precise {worst[True]:.2e}, fast {worst[False]:.2e}")


def _to(view, device):
    import dataclasses

    return dataclasses.replace(
        view,
        **{
            f.name: getattr(view, f.name).to(device)
            for f in dataclasses.fields(view)
            if isinstance(getattr(view, f.name), torch.Tensor)
        },
    )


def events(fn, reps=30, inner=10):
    """Median ms per call over ``reps`` timings of ``inner`` back-to-back calls."""
    for _ in range(3):
        fn()
    torch.cuda.synchronize()
    times = []
    for _ in range(reps):
        a, b = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        a.record()
        for _ in range(inner):
            fn()
        b.record()
        torch.cuda.synchronize()
        times.append(a.elapsed_time(b) / inner)
    times.sort()
    return times[len(times) // 2]


def graph(fn, reps=20, inner=10):
    """Median ms per call replaying ``inner`` calls captured in a CUDA graph."""
    s = torch.cuda.Stream()
    s.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(s):
        for _ in range(3):
            fn()
    torch.cuda.current_stream().wait_stream(s)
    g = torch.cuda.CUDAGraph()
    with torch.cuda.graph(g):
        for _ in range(inner):
            fn()
    g.replay()
    torch.cuda.synchronize()
    times = []
    for _ in range(reps):
        a, b = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        a.record()
        g.replay()
        b.record()
        torch.cuda.synchronize()
        times.append(a.elapsed_time(b) / inner)
    times.sort()
    return times[len(times) // 2]


def copy_bandwidth():
    x = torch.empty(2 * 1024**3, dtype=torch.uint8, device="cuda")
    y = torch.empty_like(x)
    ms = events(lambda: y.copy_(x), 10, 2)
    return 2 * x.numel() / (ms * 1e-3)  # bytes read + written per second


def case(attn, bw, name, b, n, variants):
    st = store(name, "cuda", b, n)
    mem = st.memory()
    read = mem["bytes"]
    q = torch.randn(b, HQ, 1, D, device="cuda", dtype=torch.bfloat16)
    kd = torch.randn(b, HK, n, D, device="cuda", dtype=torch.bfloat16)
    vd = torch.randn_like(kd)

    def sdpa():
        return torch.nn.functional.scaled_dot_product_attention(q, kd, vd, enable_gqa=True)

    sd_e, sd_g = events(sdpa), graph(sdpa)
    views = [st._tiers[t].view() for t in TIERS]
    res = []
    for label, kw, with_graph in variants:

        def fn(kw=kw):
            return attn.attend_tiers(views, q, [n], st._fv_dev, D**-0.5, HK, None, **kw)

        try:
            e = events(fn)
            gtxt = f"/{graph(fn) * 1e3:.0f}" if with_graph else ""
            res.append(f"{label}={e * 1e3:.0f}{gtxt}")
        except Exception as err:  # a variant over the shared-memory limit, say
            res.append(f"{label}=failed({type(err).__name__})")
    # The store's own call as a decode step makes it (tracking the buffer's attention).
    try:
        e = events(lambda: st.attend(q, [n], D**-0.5, track=True))
        res.append(f"store.attend(track)={e * 1e3:.0f}")
    except ValueError as err:  # a page other than the store's default (page_sweep)
        res.append(f"store.attend(track)=failed({err})")
    bound = read / bw * 1e3
    print(
        f"{name:8s} B{b} {n // 1024}k | {read / 1e6:.0f} MB "
        f"({mem['fp16_bytes'] / read:.2f}x < fp16) | bound {bound * 1e3:.0f} | "
        f"SDPA bf16 {sd_e * 1e3:.0f}/{sd_g * 1e3:.0f} | " + " ".join(res),
        flush=True,
    )


def timing(variants, policies, shapes):
    bw = copy_bandwidth()
    print(f"copy bandwidth {bw / 1e12:.2f} TB/s (read + write)")
    attn = load_attention("cuda")
    for name in policies:
        for b, n in shapes:
            case(attn, bw, name, b, n, variants)
            torch.cuda.empty_cache()
    print("(us; eager/graph: eager = events around back-to-back calls, graph = CUDA-graph replay)")


def final():
    """A short run: the default, flat, fast-launch and join variants against the fp64
    reference on a ZipCache store and 3/2-bit synthetic tiers, then their times, and the GPU
    time of each launch (attend, merge, received) from the profiler."""
    attn = load_attention("cuda")
    st = store("zipcache", "cuda", 2, 700, extra=5)
    views = [st._tiers[t].view() for t in TIERS]
    q = torch.randn(2, HQ, 1, D, device="cuda", dtype=torch.bfloat16)
    want, want_rec = ref.attention(views, q, [st.seen - 1], st._fv_dev, D**-0.5, HK)
    g = torch.Generator().manual_seed(0)
    synth = [
        ref.synthetic_tier(2 * HK, 40, D, ("dense", 0, D), ("dense", 0, D), generator=g),
        ref.synthetic_tier(
            2 * HK, 500, D, ("channel", 3, D), ("token", 3, D), v_sep=True, generator=g
        ),
        ref.synthetic_tier(2 * HK, 300, D, ("token", 2, 64), ("token", 2, 64), generator=g),
    ]
    synth = [_to(v, "cuda") for v in synth]
    top = max(int(v.pos.max()) for v in synth)
    swant, _ = ref.attention(synth, q, [top], st._fv_dev, D**-0.5, HK)
    outs = {}
    for label, kw in (
        ("default", {"fast_launch": False}),  # Triton's own launch
        ("flat", {"flat": True, "fast_launch": False}),
        ("fast launch", {"fast_launch": True}),
        ("flat+fast", {"flat": True, "fast_launch": True}),
        ("join", {"join": True, "fast_launch": False}),
    ):
        for _rep in range(3):  # the fast path launches the cached kernel from the second call
            out, rec = attn.attend_tiers(
                views, q, [st.seen - 1], st._fv_dev, D**-0.5, HK, [True] * 3, **kw
            )
            sout, _ = attn.attend_tiers(synth, q, [top], st._fv_dev, D**-0.5, HK, None, **kw)
        err = ((out.double() - want).abs().max() / want.abs().max()).item()
        serr = ((sout.double() - swant).abs().max() / swant.abs().max()).item()
        rerr = max(
            (r.double() - w).abs().max().item() if r.numel() else 0.0
            for r, w in zip(rec, want_rec, strict=True)
        )
        outs[label] = out
        print(f"  {label:11s}: zipcache {err:.2e} (received {rerr:.2e}), synth 3/2-bit {serr:.2e}")
    same = torch.equal(outs["default"], outs["fast launch"])
    print(f"  fast launch == default launch (bitwise): {same}")
    bw = copy_bandwidth()
    print(f"copy bandwidth {bw / 1e12:.2f} TB/s (read + write)")
    variants = [
        ("default", dict(fast_launch=False), True),  # Triton's own launch
        ("flat", dict(flat=True, fast_launch=False), True),
        ("fast", dict(fast_launch=True), True),
        ("flat+fast", dict(flat=True, fast_launch=True), True),
        ("join", dict(join=True, fast_launch=False), True),
        ("join+fast", dict(join=True, fast_launch=True), True),
        ("n128", dict(block_n=128, num_stages=1), True),
        ("n32", dict(block_n=32), True),
    ]
    for b, n in ((1, 8192), (8, 32768)):
        case(attn, bw, "zipcache", b, n, variants)
        breakdown(attn, b, n)
        torch.cuda.empty_cache()
    print("(us; eager/graph)")


def breakdown(attn, b, n, reps=10, name="zipcache", track=(True, True, True), label="", **kw):
    """GPU time of each launch of a call (attend, merge, received), from the profiler's kernel
    records: which share of the step the split kernel itself takes. ``track``: by default
    every tier's received attention, the most a step computes; ``kw``: launch parameters."""
    from torch.profiler import ProfilerActivity, profile

    st = store(name, "cuda", b, n)
    views = [st._tiers[t].view() for t in TIERS]
    q = torch.randn(b, HQ, 1, D, device="cuda", dtype=torch.bfloat16)
    track = list(track) if track else None

    def fn():
        return attn.attend_tiers(views, q, [n], st._fv_dev, D**-0.5, HK, track, **kw)

    for _ in range(3):
        fn()
    torch.cuda.synchronize()
    with profile(activities=[ProfilerActivity.CUDA]) as prof:
        for _ in range(reps):
            fn()
        torch.cuda.synchronize()
    per = {}
    for ev in prof.events():
        if ev.device_type.name == "CUDA":
            per.setdefault(ev.name, []).append(ev.device_time)
    parts = " ".join(
        f"{k[:24]}={sum(v) / reps:.1f}x{len(v) // reps}" for k, v in sorted(per.items())
    )
    if track is None:
        what = "nothing tracked"
    else:
        what = "every tier tracked" if track == [True] * 3 else f"tracked {track}"
    print(f"  per-launch GPU us ({name} B{b} {n // 1024}k, {what}{label}): {parts}", flush=True)


def fields():
    """The field path (``fields=True``: int16 elements, one dot per bit field, inline-PTX
    unpacking): first its times (1, 2 and 4 warps) against the default path, SDPA and the
    bound at ZipCache B1 x 8k and B8 x 32k, then its error against the fp64 reference and
    bitwise against its plain-integer unpacking. Few variants: each compiles the 3-tier kernel
    (seconds each on the GPU host)."""
    attn = load_attention("cuda")
    bw = copy_bandwidth()
    print(f"copy bandwidth {bw / 1e12:.2f} TB/s (read + write)", flush=True)
    variants = [
        ("default", dict(), True),
        ("fields-w4", dict(fields=True), True),
        ("fields-w2", dict(fields=True, num_warps=2, target_programs=2112), True),
        ("fields-w1", dict(fields=True, num_warps=1, target_programs=4224), True),
    ]
    for b, n in ((8, 32768), (1, 8192)):
        case(attn, bw, "zipcache", b, n, variants)
        torch.cuda.empty_cache()
    print("(us; eager/graph)", flush=True)
    g = torch.Generator().manual_seed(0)
    S = 2 * HK
    synth = [
        ref.synthetic_tier(S, 40, D, ("dense", 0, D), ("dense", 0, D), pos_offset=900, generator=g),
        ref.synthetic_tier(S, 500, D, ("channel", 4, D), ("token", 2, D), v_sep=True, generator=g),
        ref.synthetic_tier(
            S, 400, D, ("token", 2, 16), ("token", 8, D), pos_offset=500, generator=g
        ),
    ]
    st = store("zipcache", "cuda", 2, 700, extra=5)
    fv = torch.tensor([0, 17], dtype=torch.int32, device="cuda")
    cases = [
        ("zipcache x1", [st._tiers[t].view() for t in TIERS], st._fv_dev),
        ("synth 4/2/8-bit", [_to(v, "cuda") for v in synth], fv),
    ]
    print("correctness vs float64: case | variant | max |out - ref| / max |ref| | received | "
          "== plain unpacking (bitwise)", flush=True)  # fmt: skip
    for label, views, fvd in cases:
        err, rerr, same = asm_against_plain(attn, views, fvd, num_warps=1)
        print(f"  {label:16s} | fields w1 | {err:.2e} | {rerr:.2e} | {same}", flush=True)


def asm_against_plain(attn, views, fvd, **kw):
    """The field path on ``views`` (2 sequences, one query) against the float64 reference
    (largest relative error of the output, largest absolute error of the received attention)
    and whether its inline-PTX unpacking equals its plain integer unpacking bit for bit
    (output and received attention)."""
    q = torch.randn(2, HQ, 1, D, device="cuda", dtype=torch.bfloat16)
    top = max(int(v.pos.max()) for v in views if v.pos.numel())
    want, want_rec = ref.attention(views, q, [top], fvd, D**-0.5, HK)
    args = (views, q, [top], fvd, D**-0.5, HK, [True] * 3)
    out, rec = attn.attend_tiers(*args, fields=True, **kw)
    plain, prec = attn.attend_tiers(*args, fields=True, asm=False, **kw)
    err = ((out.double() - want).abs().max() / want.abs().max()).item()
    rerr = max(
        (r.double() - w).abs().max().item() if r.numel() else 0.0
        for r, w in zip(rec, want_rec, strict=True)
    )
    same = torch.equal(plain, out) and all(
        torch.equal(a, b) for a, b in zip(rec, prec, strict=True)
    )
    return err, rerr, same


def fields_sweep():
    """The field path's launch parameters at ZipCache B8 x 32k (the issue's kernel target):
    warps, software-pipelining stages of the page loop, and programs (splits), with SDPA and
    the bound beside them, then the per-launch GPU time of the default."""
    attn = load_attention("cuda")
    bw = copy_bandwidth()
    print(f"copy bandwidth {bw / 1e12:.2f} TB/s (read + write)", flush=True)
    variants = [("default", dict(), True)]
    for w, stages, progs in (
        (1, 1, 2112), (1, 3, 2112), (1, 2, 528), (1, 2, 1056), (1, 2, 4224), (1, 2, 8448),
        (1, 1, 1056), (2, 2, 1056), (2, 2, 2112), (2, 2, 4224), (4, 2, 1056),
    ):  # fmt: skip
        kw = dict(fields=True, num_warps=w, num_stages=stages, target_programs=progs)
        variants.append((f"w{w}s{stages}p{progs}", kw, True))
    # Registers capped (the field path takes ~240-255 a thread: 8 one-warp programs per SM;
    # 200 allow 10, 168 allow 12, at a few spills: offline SASS of Triton 3.6, 4-bit tier, +3%
    # and +8% instructions per page).
    for reg in (200, 168, 128):
        variants.append((f"r{reg}", dict(fields=True, maxnreg=reg), True))
    case(attn, bw, "zipcache", 8, 32768, variants)
    breakdown(attn, 8, 32768)
    print("(us; eager/graph)", flush=True)


def presets():
    """The presets' own layouts at B8 x 32k: ZipCache, and kvmix-5x (its low tier's 3-bit
    keys ran the integer path inside the field path's launch until session 23): first
    ``preset_check``, then launch variants beside the default at B8 x 32k and each one's
    per-launch GPU time."""
    attn = load_attention("cuda")
    preset_check(attn)
    bw = copy_bandwidth()
    print(f"copy bandwidth {bw / 1e12:.2f} TB/s (read + write)", flush=True)
    variants = [
        ("default", dict(), True),
        ("int-w4", dict(fields=False), True),  # the integer path for every tier, 4 warps
        ("int-w2", dict(fields=False, num_warps=2), True),
        ("int-w8", dict(fields=False, num_warps=8), True),
        ("fields-w1p4224", dict(fields=True, num_warps=1, target_programs=4224), True),
        ("fields-w2", dict(fields=True, num_warps=2, target_programs=2112), True),
        ("fields-w4", dict(fields=True, num_warps=4, target_programs=1056), True),
    ]
    for name in ("kvmix-5x", "zipcache"):
        case(attn, bw, name, 8, 32768, variants)
        breakdown(attn, 8, 32768, name=name)
        torch.cuda.empty_cache()
    print("(us; eager/graph)", flush=True)


def merge():
    """The merge of the splits' partials (session 25: one pass, every split of the step in one
    block, where session 24's two passes over 16 at a time took 6.5 us a launch at B8 x 32k)
    at the presets' B8 x 32k: the call's time beside SDPA with the default block and with 16
    splits a block (three blocks, rescaled between them), then each launch's GPU time."""
    attn = load_attention("cuda")
    preset_check(attn)
    bw = copy_bandwidth()
    print(f"copy bandwidth {bw / 1e12:.2f} TB/s (read + write)", flush=True)
    variants = [("default", dict(), True), ("merge16", dict(merge_block=16), True)]
    # Launch parameters not yet tried with the carried loop: 3 stages at 2112 programs, 3
    # waves of programs, and registers capped at 224 a thread. The field path's kernel takes
    # 254-255 (8 one-warp programs an SM); at 224, 9 fit, and offline (Triton 3.6, sm_90) its
    # page loops compile to the same instructions without a spill (with an fp16 buffer too;
    # the caps of 200 and below, session 22, spilled and were slower). 9 x 132 SMs = 1188
    # programs a wave, so 2376 for two.
    more = [
        ("s3", dict(num_stages=3), True),
        ("p3168", dict(target_programs=3168), True),
        ("r224", dict(maxnreg=224), True),
        ("r224p2376", dict(maxnreg=224, target_programs=2376), True),
    ]
    for name in ("zipcache", "kvmix-5x"):
        case(attn, bw, name, 8, 32768, variants + (more if name == "zipcache" else more[2:]))
        for label, kw in (("", {}), (", merge_block=16", {"merge_block": 16})):
            breakdown(attn, 8, 32768, reps=20, name=name, track=None, label=label, **kw)
        torch.cuda.empty_cache()
    print("(us; eager/graph)", flush=True)


def unroll():
    """The field path's page loop unrolled twice (``unroll=2``) against the default at
    B8 x 32k, ZipCache and kvmix-5x: the largest difference between the two outputs, then
    the call's time beside SDPA (session 25's profile: the loop is latency bound, a warp
    issuing every ~4 cycles on its own dependent chains; unrolled, the compiler may
    interleave two pages), also with three pipeline stages for ZipCache."""
    attn = load_attention("cuda")
    bw = copy_bandwidth()
    for name in ("zipcache", "kvmix-5x"):
        st = store(name, "cuda", 8, 32768)
        views = [st._tiers[t].view() for t in TIERS]
        q = torch.randn(8, HQ, 1, D, device="cuda", dtype=torch.bfloat16)
        args = (views, q, [32768], st._fv_dev, D**-0.5, HK, None)
        a, _ = attn.attend_tiers(*args)
        b, _ = attn.attend_tiers(*args, unroll=2)
        diff = (a - b).abs().max().item()
        print(f"{name} unroll=2 against the default: max |diff| {diff:.3e}", flush=True)
        del st, views
        variants = [("default", dict(), True), ("unroll2", dict(unroll=2), True)]
        if name == "zipcache":
            variants.append(("unroll2s3", dict(unroll=2, num_stages=3), True))
        case(attn, bw, name, 8, 32768, variants)
        torch.cuda.empty_cache()
    print("(us; eager/graph)", flush=True)


def current():
    """The presets' default launch as the tree on the path has it: the device check
    (``preset_check``), then at B8 x 32k the call's time beside SDPA and the bound, and each
    launch's GPU time. Run once per tree in one call (``gpu/pending.sh``'s ``both``) to time a
    kernel change against the kernel before it on the same card."""
    import inspect

    attn = load_attention("cuda")
    print(f"kvmix from {attn.__file__}", flush=True)
    preset_check(attn)
    variants = [("default", dict(), True)]
    if "transposed" in inspect.signature(attn.attend_tiers).parameters and (
        "--untransposed" in sys.argv
    ):
        # Session 27's transposed key dots (the default), where the tree has them and
        # `--untransposed` asks (session 27 timed them: slower): the
        # untransposed ones checked as the default is (float64 reference, inline PTX against
        # plain unpacking), then timed beside it.
        preset_check(attn, transposed=False)
        variants.append(("untransposed", dict(transposed=False), True))
    i8 = inspect.signature(attn.attend_tiers).parameters.get("int8_keys")
    if i8 is not None:
        # Session 28's int8 key dots, where the tree has them: timed beside the default, on
        # (session 29's default) or off.
        other = not i8.default
        preset_check(attn, int8_keys=other)
        variants.append(("int8 keys" if other else "fp16 keys", dict(int8_keys=other), True))
    fm = inspect.signature(attn.attend_tiers).parameters.get("fused_merge")
    if fm is not None:
        # Session 33's merge in the attend launch (the stream's last program merges), where
        # the tree has it: checked, then timed beside the default, on or off.
        other = not fm.default
        preset_check(attn, fused_merge=other)
        variants.append(("fused merge" if other else "merge launch", dict(fused_merge=other), True))
    bw = copy_bandwidth()
    print(f"copy bandwidth {bw / 1e12:.2f} TB/s (read + write)", flush=True)
    _time_presets(attn, bw, variants)


def fused():
    """Session 33's merge in the attend launch (``fused_merge=True``: the stream's last
    program merges its splits) against the merge launch at B8 x 32k: both presets checked
    with it (float64 reference on the GPU), then timed beside the default."""
    attn = load_attention("cuda")
    preset_check(attn, fused_merge=True)
    bw = copy_bandwidth()
    print(f"copy bandwidth {bw / 1e12:.2f} TB/s (read + write)", flush=True)
    _time_presets(attn, bw, [("default", dict(), True), ("fused", dict(fused_merge=True), True)])


def _time_presets(attn, bw, variants, launches=True):
    """Each variant at ZipCache and kvmix-5x B8 x 32k beside SDPA and the bound, then (with
    ``launches``) each one's launches' GPU time."""
    for name in ("zipcache", "kvmix-5x"):
        case(attn, bw, name, 8, 32768, variants)
        for label, kw, _ in variants if launches else ():
            breakdown(attn, 8, 32768, reps=20, name=name, track=None, label=f", {label}", **kw)
        torch.cuda.empty_cache()
    print("(us; eager/graph)", flush=True)


def reg_sweep():
    """Registers against programs at ZipCache and kvmix-5x B8 x 32k (session 30, on the H200,
    where the kernel runs at 2.0x its bound: latency, not bytes). A cap of ``r`` registers
    lets ``65536 // (32 r)`` one-warp programs share an SM; each cap is paired with the
    program count that fills two whole waves of them on 132 SMs (a cap with the default
    2112 programs leaves a partial wave: session 25's 224 on an H100)."""
    attn = load_attention("cuda")
    bw = copy_bandwidth()
    print(f"copy bandwidth {bw / 1e12:.2f} TB/s (read + write)", flush=True)
    variants = [("default", dict(), True)]
    for reg, progs in ((None, 1056), (None, 3168), (200, 2640), (168, 3168), (168, 1584),
                       (128, 4224), (128, 2112)):  # fmt: skip
        kw = dict(target_programs=progs)
        if reg is not None:
            kw["maxnreg"] = reg
        variants.append((f"r{reg or 'def'}p{progs}", kw, True))
    variants.append(("s3", dict(num_stages=3), True))
    _time_presets(attn, bw, variants, launches=False)


def tier_sweep():
    """A launch per tier (``attend_tiers(tier_launches=True)``) against the one launch, at
    ZipCache and kvmix-5x B8 x 32k (session 30): whether one SM's programs running different
    tiers' page loops wait on the instruction cache. The device check first (float64)."""
    attn = load_attention("cuda")
    preset_check(attn, tier_launches=True)
    bw = copy_bandwidth()
    print(f"copy bandwidth {bw / 1e12:.2f} TB/s (read + write)", flush=True)
    variants = [("default", dict(), True), ("per tier", dict(tier_launches=True), True)]
    _time_presets(attn, bw, variants)


def preset_check(attn=None, **kw):
    """The presets' default launch (the field path, inline-PTX unpacking; ``kw``: launch
    parameters) against the float64 reference, and bitwise (output and received attention)
    against the field path's plain integer unpacking."""
    attn = attn or load_attention("cuda")
    print(f"correctness vs float64{kw or ''}: preset | max |out - ref| / max |ref| | received "
          "| == plain unpacking (bitwise)", flush=True)  # fmt: skip
    for name in ("kvmix-5x", "zipcache"):
        st = store(name, "cuda", 2, 1500, extra=5)
        views = [st._tiers[t].view() for t in TIERS]
        err, rerr, same = asm_against_plain(attn, views, st._fv_dev, **kw)
        print(f"  {name:9s} | {err:.2e} | {rerr:.2e} | {same}", flush=True)


def page_sweep():
    """The field path at ZipCache B8 x 32k with the store's page (``triton_store.PAGE``: the
    rows a segmented tier's block table cuts at, and the kernel's ``block_n``) at 64, 32 and
    16 rows: a smaller page holds fewer operand registers per warp (~250 at 64 rows, 1 warp)
    for more warps in flight (session 19)."""
    import kvmix.engines.triton_store as ts

    attn = load_attention("cuda")
    bw = copy_bandwidth()
    print(f"copy bandwidth {bw / 1e12:.2f} TB/s (read + write)", flush=True)
    for page in (64, 32, 16):
        ts.PAGE = page
        variants = [
            (f"p{page}w1", dict(fields=True, block_n=page, num_warps=1), True),
            (f"p{page}w2", dict(fields=True, block_n=page, num_warps=2), True),
        ]
        case(attn, bw, "zipcache", 8, 32768, variants)
        torch.cuda.empty_cache()
    ts.PAGE = 64
    print("(us; eager/graph)", flush=True)


def default_run(t0):
    """No flag: the device check, then the launch variants at the issue's four shapes."""
    check()
    print(f"check {time.time() - t0:.0f}s", flush=True)
    variants = [
        ("base", dict(), True),
        ("t528", dict(target_programs=528), True),
        ("t2112", dict(target_programs=2112), True),
        ("fast", dict(precise=False), True),
        ("w8", dict(num_warps=8), True),
        ("s1", dict(num_stages=1), True),
        ("s3", dict(num_stages=3), False),
        ("nomagic", dict(magic=False), False),
        ("gather", dict(bcast=False, num_stages=1), False),
    ]
    shapes = ((1, 8192), (1, 32768), (8, 8192), (8, 32768))
    timing(variants, ("zipcache", "uniform2"), shapes)


#: The runs a flag selects (the first given, in this order); no flag: ``default_run``.
RUNS = {"--page-sweep": page_sweep, "--fields-sweep": fields_sweep, "--fields": fields,
        "--final": final, "--presets": presets, "--preset-check": preset_check,
        "--merge": merge, "--unroll": unroll, "--current": current, "--fused": fused,
        "--reg-sweep": reg_sweep, "--tier-sweep": tier_sweep}  # fmt: skip

if __name__ == "__main__":
    t0 = time.time()
    print(torch.__version__, __import__("triton").__version__, torch.cuda.get_device_name())
    flag = next((f for f in RUNS if f in sys.argv), None)
    if flag is None:
        default_run(t0)
    else:
        RUNS[flag]()
    print(f"total {time.time() - t0:.0f}s")
