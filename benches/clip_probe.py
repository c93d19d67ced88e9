"""Range clipping vs min-max vs Lloyd-Max on SmolLM2-135M's rotated keys and values (issue 16,
session 10; ``notes/kvmix-5x.md``).

Captures the post-RoPE queries, keys and values of the stdlib tuning passages (cut as
``benches/fidelity_probe.py`` cuts them; never KJV), rotates them by kvmix-5x's Hadamard
matrix, and quantizes each grouping kvmix-5x uses (values 2/3/4-bit channel-separable per
token, keys 3/4-bit per channel over the segment; regular = every token but the 4 sinks, salient
= a random 14%) with: min-max (``minmax``), the 1-D shrink search of ``clip="mse"`` (``mid``; ``midw``
weighs the values' error by the channel factors), a 2-D search of each end (``ends``, on every
ninth layer), Lloyd-Max per group (``lloyd``, a codebook per group, reference only), Gaussian
Lloyd-Max levels scaled by the group's mean and std (``nf``) and fixed shrink factors (``fixS``).
Prints relative squared error and the attention-output error of the last 256 queries.

    KVMIX_NUM_THREADS=1 OMP_NUM_THREADS=1 python benches/clip_probe.py capture
    KVMIX_NUM_THREADS=1 OMP_NUM_THREADS=1 python benches/clip_probe.py analyze /tmp/clip/qkv_stdlib0.npz
    KVMIX_NUM_THREADS=1 OMP_NUM_THREADS=1 python benches/clip_probe.py kjv-diagnostic
"""

# ruff: noqa
import sys


def capture():
    import numpy as np, torch
    from transformers import AttentionInterface
    from transformers.integrations.sdpa_attention import sdpa_attention_forward

    CAP = {}

    def capture(module, query, key, value, attention_mask, **kw):
        i = module.layer_idx
        CAP[i] = (
            query[0, :, -256:].float().numpy().copy(),
            key[0].float().numpy().copy(),
            value[0].float().numpy().copy(),
        )
        return sdpa_attention_forward(module, query, key, value, attention_mask, **kw)

    AttentionInterface.register("capture", capture)

    from kvmix.models import load_smollm2

    model, tok = load_smollm2(attn_implementation="capture")
    # stdlib passages exactly as fidelity_probe cuts them
    from kvmix.passkey import haystack_sentences
    from kvmix.data import _bos_ids

    text = " ".join(haystack_sentences("stdlib"))
    ids = tok(text, add_special_tokens=False)["input_ids"]
    bos = _bos_ids(tok)
    n, prefix, cont = 2, 2048, 256
    need = prefix + cont - len(bos)
    step = (len(ids) - need) // (n - 1)
    # rotation as kvmix.cache.randomized_hadamard(64, 0)
    h = torch.ones(1, 1, dtype=torch.float64)
    while h.shape[0] < 64:
        h = torch.cat([torch.cat([h, h], 1), torch.cat([h, -h], 1)], 0)
    g = torch.Generator().manual_seed(0)
    signs = torch.randint(0, 2, (64,), generator=g, dtype=torch.float64) * 2 - 1
    R = (signs[:, None] * h / 8).float().numpy()
    import os

    os.makedirs("/tmp/clip", exist_ok=True)
    for p in range(n):
        row = bos + ids[p * step : p * step + need]
        x = torch.tensor([row[:prefix]])
        with torch.no_grad():
            model(x, use_cache=False)
        out = {}
        for i, (q, k, v) in CAP.items():
            out[f"q{i}"], out[f"k{i}"], out[f"v{i}"] = q @ R, k @ R, v @ R
        np.savez(f"/tmp/clip/qkv_stdlib{p}.npz", **out)
        print("saved", p, len(CAP))


import sys, time
import numpy as np

F32 = np.float32


def r16(x):
    return np.asarray(x, F32).astype(np.float16).astype(F32)


SHRINK = np.round(np.arange(1.0, 0.449, -0.05), 2).astype(F32)  # 1.0 .. 0.45


def affine_q(x, lo, hi, bits):
    """x [..., n] groups along last axis; lo/hi [...]. fp16 params, round-half-up, clamp."""
    top = F32(2**bits - 1)
    sc = r16((hi - lo) / top)
    of = r16(lo)
    safe = np.where(sc == 0, F32(1), sc)
    c = np.clip(np.floor((x - of[..., None]) / safe[..., None] + F32(0.5)), 0, top)
    c = np.where(sc[..., None] == 0, 0, c)
    return sc[..., None] * c + of[..., None]


def quant_groups(x, bits, mode, w=None):
    """x [G, n]: each row one group. mode minmax | mid (1-D shrink about the midpoint) |
    ends (2-D shrink of each end) | lloyd (per-group Lloyd-Max codebook, reference) |
    nf (fixed Gaussian Lloyd-Max levels scaled by group mean/std). Returns x̂, chosen shrink."""
    lo, hi = x.min(-1), x.max(-1)
    if mode == "minmax":
        return affine_q(x, lo, hi, bits), np.ones(len(x), F32)
    if mode in ("mid", "midw"):
        c, r = (lo + hi) / 2, (hi - lo) / 2
        best = None
        best_err = None
        best_s = np.ones(len(x), F32)
        for s in SHRINK:
            xh = affine_q(x, c - s * r, c + s * r, bits)
            d = (x - xh) ** 2
            if mode == "midw":
                d = d * w
            e = d.sum(-1)
            if best is None:
                best, best_err = xh, e
            else:
                m = e < best_err
                best = np.where(m[:, None], xh, best)
                best_err = np.where(m, e, best_err)
                best_s = np.where(m, s, best_s)
        return best, best_s
    if mode == "ends":
        c, r = (lo + hi) / 2, (hi - lo) / 2
        best = affine_q(x, lo, hi, bits)
        best_err = ((x - best) ** 2).sum(-1)
        best_s = np.ones(len(x), F32)
        for s1 in SHRINK:
            for s2 in SHRINK:
                xh = affine_q(x, c - s1 * r, c + s2 * r, bits)
                e = ((x - xh) ** 2).sum(-1)
                m = e < best_err
                best = np.where(m[:, None], xh, best)
                best_err = np.where(m, e, best_err)
                best_s = np.where(m, (s1 + s2) / 2, best_s)
        return best, best_s
    if mode.startswith("fix"):
        s = F32(float(mode[3:]))
        c, r = (lo + hi) / 2, (hi - lo) / 2
        return affine_q(x, c - s * r, c + s * r, bits), np.full(len(x), s, F32)
    if mode == "lloyd":
        L = 2**bits
        cb = lo[:, None] + (hi - lo)[:, None] * (np.arange(L) + 0.5)[None, :] / L
        for _ in range(25):
            a = np.abs(x[:, :, None] - cb[:, None, :]).argmin(-1)
            for k in range(L):
                m = a == k
                cnt = m.sum(-1)
                cb[:, k] = np.where(cnt > 0, (x * m).sum(-1) / np.maximum(cnt, 1), cb[:, k])
        cb = r16(cb)
        a = np.abs(x[:, :, None] - cb[:, None, :]).argmin(-1)
        return np.take_along_axis(cb, a, 1), np.ones(len(x), F32)
    if mode == "nf":
        levels = {
            2: [-1.510, -0.4528, 0.4528, 1.510],
            3: [-2.152, -1.344, -0.7560, -0.2451, 0.2451, 0.7560, 1.344, 2.152],
            4: [
                -2.733,
                -2.069,
                -1.618,
                -1.256,
                -0.9424,
                -0.6568,
                -0.3880,
                -0.1284,
                0.1284,
                0.3880,
                0.6568,
                0.9424,
                1.256,
                1.618,
                2.069,
                2.733,
            ],
        }[bits]
        mu, sd = r16(x.mean(-1)), r16(x.std(-1))
        cb = mu[:, None] + sd[:, None] * np.array(levels, F32)[None, :]
        a = np.abs(x[:, :, None] - cb[:, None, :]).argmin(-1)
        return np.take_along_axis(cb, a, 1), np.ones(len(x), F32)
    raise ValueError(mode)


def quant_values(v, bits, mode):
    """ZipCache values: v [T, D] one segment: f = fp16(sqrt(max|v_c|)), v/f per-token groups of D."""
    f = r16(np.sqrt(np.abs(v).max(0)))
    f = np.where(f > 0, f, F32(1))
    xn = v / f
    xh, s = quant_groups(xn, bits, mode, w=np.broadcast_to(f * f, xn.shape))
    return xh * f, s


def quant_keys(k, bits, mode):
    """Per-channel over the segment's tokens: k [T, D]."""
    xh, s = quant_groups(np.ascontiguousarray(k.T), bits, mode)
    return xh.T, s


def attn(q, k, v):
    # q [9, Q, 64] (rotated), k/v [3, T, 64]; causal: query rows are the last Q positions of T.
    T = k.shape[1]
    Q = q.shape[1]
    kk = np.repeat(k, 3, 0)
    vv = np.repeat(v, 3, 0)
    s = q @ kk.transpose(0, 2, 1) / 8.0
    pos = np.arange(T)[None, :]
    qpos = (T - Q + np.arange(Q))[:, None]
    s = np.where(pos <= qpos, s, -np.inf)
    s = s - s.max(-1, keepdims=True)
    p = np.exp(s)
    p /= p.sum(-1, keepdims=True)
    return p @ vv


def main():
    files = sys.argv[1:]
    rng = np.random.default_rng(0)
    modes = ["minmax", "mid", "midw", "ends", "lloyd", "nf", "fix0.6", "fix0.7", "fix0.8", "fix0.9"]
    # (name, kind, bits, subset): regular = all tokens but the 4 sinks; salient = random 14%.
    tiers = [
        ("V2 regular", "v", 2, "reg"),
        ("K3 regular", "k", 3, "reg"),
        ("V3 regular", "v", 3, "reg"),
        ("K4 regular", "k", 4, "reg"),
        ("V4 salient", "v", 4, "sal"),
        ("K4 salient", "k", 4, "sal"),
    ]
    acc = {}
    for fn in files:
        z = np.load(fn)
        for layer in range(0, 30, 3):
            q, K, V = z[f"q{layer}"], z[f"k{layer}"], z[f"v{layer}"]
            T = K.shape[1]
            sal = np.sort(rng.choice(np.arange(4, T), int(0.14 * T), replace=False))
            o = attn(q, K, V)
            on = (o**2).sum()
            for name, kind, bits, sub in tiers:
                idx = np.arange(4, T) if sub == "reg" else sal
                for mode in modes:
                    if mode == "midw" and kind == "k":
                        continue
                    if mode == "ends" and layer % 9:
                        continue  # 2-D grid: every third layer only
                    t0 = time.time()
                    Kh, Vh = K.copy(), V.copy()
                    se = sx = 0.0
                    shr = []
                    for h in range(3):
                        x = (K if kind == "k" else V)[h][idx]
                        xh, s = (quant_keys if kind == "k" else quant_values)(x, bits, mode)
                        se += ((x - xh) ** 2).sum()
                        sx += (x**2).sum()
                        shr.append(s)
                        (Kh if kind == "k" else Vh)[h, idx] = xh
                    oe = ((attn(q, Kh, Vh) - o) ** 2).sum() / on
                    acc.setdefault((name, mode), []).append(
                        ((fn, layer), se, sx, oe, np.concatenate(shr))
                    )
        print("done", fn, flush=True)
    print(
        f"{'tier':12s} {'mode':7s} {'rel MSE':>9s} {'vs minmax':>9s} {'attn err':>9s} {'vs minmax':>9s} {'shrink p10/50/90':>18s}"
    )
    for name, *_ in tiers:
        base = {r[0]: r for r in acc[(name, "minmax")]}
        for mode in modes:
            if (name, mode) not in acc:
                continue
            rows = acc[(name, mode)]
            b = [base[r[0]] for r in rows]
            mse = sum(r[1] for r in rows) / sum(r[2] for r in rows)
            bmse = sum(r[1] for r in b) / sum(r[2] for r in b)
            ae = np.mean([r[3] for r in rows])
            bae = np.mean([r[3] for r in b])
            p = np.percentile(np.concatenate([r[4] for r in rows]), [10, 50, 90])
            print(
                f"{name:12s} {mode:7s} {mse:9.5f} {mse / bmse:9.3f} {ae:9.2e} {ae / bae:9.3f} {p[0]:6.2f}{p[1]:6.2f}{p[2]:6.2f}  ({len(rows)} layers)"
            )


def kjv_diagnostic():
    """Report-only diagnostic of session 10's KJV result (no tuning): on the eval's first KJV
    passage, 2-bit regular values of every layer, min-max vs the clip search: attention-output
    error, the output's projection on the exact output, and the values' signed shrinkage."""
    import torch
    from transformers import AttentionInterface
    from transformers.integrations.sdpa_attention import sdpa_attention_forward

    CAP = {}

    def cap(module, query, key, value, attention_mask, **kw):
        CAP[module.layer_idx] = (
            query[0, :, -256:].float().numpy().copy(),
            key[0].float().numpy().copy(),
            value[0].float().numpy().copy(),
        )
        return sdpa_attention_forward(module, query, key, value, attention_mask, **kw)

    AttentionInterface.register("capture", cap)
    from kvmix.models import load_smollm2
    from kvmix.data import kjv_passages
    from kvmix.cache import randomized_hadamard

    model, tok = load_smollm2(attn_implementation="capture")
    p = kjv_passages(tok, 4, 2048, 256)
    R = randomized_hadamard(64, 0).numpy()
    with torch.no_grad():
        model(p.prefix_ids[:1], use_cache=False)
    rng = np.random.default_rng(0)
    res = {}
    for layer in range(30):
        q, K, V = (a @ R for a in CAP[layer])
        T = K.shape[1]
        sal = np.sort(rng.choice(np.arange(4, T), int(0.14 * T), replace=False))
        o = attn(q, K, V)
        on = (o**2).sum()
        for name, kind, bits, sub in (("V2 regular", "v", 2, "reg"),):
            idx = np.arange(4, T) if sub == "reg" else sal
            for mode in ("minmax", "mid"):
                Kh, Vh = K.copy(), V.copy()
                se = sx = 0.0
                for h in range(3):
                    x = (K if kind == "k" else V)[h][idx]
                    xh, _ = (quant_keys if kind == "k" else quant_values)(x, bits, mode)
                    se += ((x - xh) ** 2).sum()
                    sx += (x**2).sum()
                    (Kh if kind == "k" else Vh)[h, idx] = xh
                oh = attn(q, Kh, Vh)
                oe = ((oh - o) ** 2).sum() / on
                res.setdefault((name, mode, "proj"), []).append(float((oh * o).sum() / on))
                # signed error of the values themselves: mean of (x̂ - x) * sign(x), i.e. shrinkage
                res.setdefault((name, mode, "shrink"), []).append(
                    float(
                        np.mean(
                            [
                                ((Vh[h, idx] - V[h, idx]) * np.sign(V[h, idx])).mean()
                                / np.abs(V[h, idx]).mean()
                                for h in range(3)
                            ]
                        )
                    )
                )
                r = res.setdefault((name, mode), [0, 0, []])
                r[0] += se
                r[1] += sx
                r[2].append(oe)
    a, b = res[("V2 regular", "minmax")], res[("V2 regular", "mid")]
    r = np.array(b[2]) / np.array(a[2])
    print("per-layer attn ratio (clip / minmax), V2 regular:", " ".join(f"{x:.2f}" for x in r))
    print("worst layers:", np.argsort(-r)[:5], "max", r.max(), "min", r.min())
    for mode in ("minmax", "mid"):
        p = np.array(res[("V2 regular", mode, "proj")])
        sh = np.array(res[("V2 regular", mode, "shrink")])
        print(
            mode,
            "output projection <o_hat,o>/<o,o>: mean %.4f min %.4f max %.4f"
            % (p.mean(), p.min(), p.max()),
            "| value shrinkage E[(x_hat-x) sign x]/E|x|: mean %.4f" % sh.mean(),
        )


if __name__ == "__main__":
    if sys.argv[1] == "capture":
        capture()
    elif sys.argv[1] == "kjv-diagnostic":
        kjv_diagnostic()
    else:
        sys.argv = sys.argv[1:]
        main()
