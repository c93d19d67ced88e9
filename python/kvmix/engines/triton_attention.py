"""Decode attention computed directly on the Triton engine's packed tiers.

One program per (stream, block of query rows, split of a tier's pages): it reads the packed
codes of its pages once, unpacks them with vectorized shifts into a *field-major* channel
order (column ``j`` of a tile holds channel ``(j % B) * PER + j // B``, where ``PER`` codes
share a byte and ``B`` is the bytes per row), so a tile is one contiguous byte load repeated
``PER`` times out of L1 instead of ``D`` scalar byte loads. The queries, the per-channel
parameters and the output are permuted the same way, so no unpacked copy of the cache is
ever made. Dequantization is folded into the dots where the algebra allows it:

* per-channel keys (one segment per page): ``q·k̂ = (q∘s)·code + q·o``;
* per-token keys/values with one group per row: ``q·k̂_t = s_t (q·code_t) + o_t Σq``,
  ``Σ_t p_t v̂_t = Σ_t (p_t s_t) code_t + Σ_t p_t o_t``;
* the fixed key factor (MiKV's balancer) is folded into the queries once per program,
  ZipCache's separable value factor (per page) multiplies the page's contribution.

Each program keeps an online softmax (base 2, fp32) and writes its partial maximum, sum and
unnormalized output; a small merge kernel combines every split of every tier with the
log-sum-exp rule. With ``track`` the tier's base-2 logits are written too, and the received
attention follows from the merged maximum and sum (torch ops on the device, no host sync).
"""

from __future__ import annotations

import triton
import triton.language as tl


# Reductions through our own combine functions: triton.language's tl.sum/tl.max/tl.min are
# themselves @jit functions, compiled or interpreted depending on TRITON_INTERPRET when
# triton was first imported, so a kernel loaded for the other mode could not call them.
@triton.jit
def _add(a, b):
    return a + b


@triton.jit
def _maxf(a, b):
    return tl.maximum(a, b)


@triton.jit
def _minf(a, b):
    return tl.minimum(a, b)


@triton.jit
def _sum(x, axis: tl.constexpr):
    return tl.reduce(x, axis, _add)


@triton.jit
def _max(x, axis: tl.constexpr):
    return tl.reduce(x, axis, _maxf)


@triton.jit
def _min(x, axis: tl.constexpr):
    return tl.reduce(x, axis, _minf)


# Modes of a tier's keys or values (constexpr kernel arguments).
# Compiled kernels may only read globals that are constexpr (the interpreter reads any).
DENSE = tl.constexpr(0)
CHANNEL = tl.constexpr(1)  # per-channel scale/offset of the page's segment (keys only)
TOKEN = tl.constexpr(2)  # per-token groups of channels


@triton.jit
def _tier_split_kernel(
    Q,  # fp32 [S, ROWS, D], pre-multiplied by scale*log2(e) (and the fixed key factor)
    QPOS,  # int32 [ROWS]: position of each query row
    FIRST_VALID,  # int32 [S]
    POS,  # int32 [S, cap] (-1: empty row)
    KD,  # key codes uint8 [S, cap, KB] or dense [S, cap, D]
    KS,  # key scale fp16: CHANNEL [S, nseg, D]; TOKEN [S, cap, KG]
    KO,
    KSEG,  # int32 [S, cap // BLOCK_N] segment of each page (CHANNEL keys, separable values)
    VD,
    VS,  # value scale fp16 TOKEN [S, cap, VG]
    VO,
    VF,  # separable value factor fp16 [S, nseg, D]
    PM,  # fp32 [S, NSPLIT, ROWS]
    PL,
    PACC,  # fp32 [S, NSPLIT, ROWS, D]
    LOGITS,  # fp32 [S, ROWS, cap] (TRACK only)
    cap,
    n_pages,
    pages_per_split,
    split_offset,
    n_split,
    nseg,
    kv_heads,
    ROWS: tl.constexpr,
    ROWS_P: tl.constexpr,
    D: tl.constexpr,
    BLOCK_N: tl.constexpr,
    K_MODE: tl.constexpr,
    K_BITS: tl.constexpr,
    K_GS: tl.constexpr,
    V_MODE: tl.constexpr,
    V_BITS: tl.constexpr,
    V_GS: tl.constexpr,
    V_SEP: tl.constexpr,
    TRACK: tl.constexpr,
    DOT_F16: tl.constexpr,
):
    s = tl.program_id(0)
    sp = tl.program_id(1)
    s64 = s.to(tl.int64)
    cap64 = cap.to(tl.int64)

    rows = tl.arange(0, ROWS_P)
    j = tl.arange(0, D)
    # Field-major channel order of the packed keys and values.
    if K_MODE == DENSE:
        kch = j
    else:
        KPER: tl.constexpr = 8 // K_BITS
        KB: tl.constexpr = D // KPER
        kbyte = j % KB
        kshift = (j // KB) * K_BITS
        kch = kbyte * KPER + j // KB
    if V_MODE == DENSE:
        vch = j
    else:
        VPER: tl.constexpr = 8 // V_BITS
        VB: tl.constexpr = D // VPER
        vbyte = j % VB
        vshift = (j // VB) * V_BITS
        vch = vbyte * VPER + j // VB

    row_ok = rows < ROWS
    q = tl.load(
        Q + (s64 * ROWS + rows[:, None]) * D + kch[None, :], mask=row_ok[:, None], other=0.0
    )
    qpos = tl.load(QPOS + rows, mask=row_ok, other=-1)
    qsum = _sum(q, 1)
    fv = tl.load(FIRST_VALID + s)

    m_i = tl.full([ROWS_P], float("-inf"), tl.float32)
    l_i = tl.full([ROWS_P], 0.0, tl.float32)
    acc = tl.full([ROWS_P, D], 0.0, tl.float32)

    p_lo = sp * pages_per_split
    p_hi = tl.minimum(p_lo + pages_per_split, n_pages)
    for page in range(p_lo, p_hi):
        t = page * BLOCK_N + tl.arange(0, BLOCK_N)
        t64 = t.to(tl.int64)
        pos = tl.load(POS + s64 * cap64 + t64)
        # ---- keys: logits [ROWS_P, BLOCK_N]
        if K_MODE == DENSE:
            k = tl.load(KD + (s64 * cap64 + t64[:, None]) * D + kch[None, :]).to(tl.float32)
            if DOT_F16:
                logits = tl.dot(q.to(tl.float16), tl.trans(k.to(tl.float16)))
            else:
                logits = tl.dot(q, tl.trans(k), input_precision="ieee")
        else:
            raw = tl.load(KD + (s64 * cap64 + t64[:, None]) * KB + kbyte[None, :]).to(tl.int32)
            codes = ((raw >> kshift[None, :]) & ((1 << K_BITS) - 1)).to(tl.float32)
            if K_MODE == CHANNEL:
                seg = tl.load(KSEG + s64 * (cap64 // BLOCK_N) + page).to(tl.int64)
                ks = tl.load(KS + (s64 * nseg + seg) * D + kch).to(tl.float32)
                ko = tl.load(KO + (s64 * nseg + seg) * D + kch).to(tl.float32)
                qs = q * ks[None, :]
                if DOT_F16:
                    logits = tl.dot(qs.to(tl.float16), tl.trans(codes.to(tl.float16)))
                else:
                    logits = tl.dot(qs, tl.trans(codes), input_precision="ieee")
                logits += _sum(q * ko[None, :], 1)[:, None]
            else:
                KG: tl.constexpr = D // K_GS
                if KG == 1:
                    sc = tl.load(KS + s64 * cap64 + t64).to(tl.float32)
                    of = tl.load(KO + s64 * cap64 + t64).to(tl.float32)
                    if DOT_F16:
                        dots = tl.dot(q.to(tl.float16), tl.trans(codes.to(tl.float16)))
                    else:
                        dots = tl.dot(q, tl.trans(codes), input_precision="ieee")
                    logits = dots * sc[None, :] + qsum[:, None] * of[None, :]
                else:
                    g = (kch // K_GS)[None, :]
                    sc = tl.load(KS + (s64 * cap64 + t64[:, None]) * KG + g).to(tl.float32)
                    of = tl.load(KO + (s64 * cap64 + t64[:, None]) * KG + g).to(tl.float32)
                    k = codes * sc + of
                    if DOT_F16:
                        logits = tl.dot(q.to(tl.float16), tl.trans(k.to(tl.float16)))
                    else:
                        logits = tl.dot(q, tl.trans(k), input_precision="ieee")
        visible = (pos[None, :] >= fv) & (pos[None, :] <= qpos[:, None]) & row_ok[:, None]
        logits = tl.where(visible, logits, float("-inf"))
        if TRACK:
            tl.store(
                LOGITS + (s64 * ROWS + rows[:, None]) * cap64 + t64[None, :],
                logits,
                mask=row_ok[:, None],
            )
        m_new = tl.maximum(m_i, _max(logits, 1))
        m_safe = tl.where(m_new == float("-inf"), 0.0, m_new)
        p = tl.exp2(logits - m_safe[:, None])
        alpha = tl.exp2(m_i - m_safe)
        l_i = l_i * alpha + _sum(p, 1)
        m_i = m_new
        # ---- values: contribution [ROWS_P, D] in the values' field order
        if V_MODE == DENSE:
            v = tl.load(VD + (s64 * cap64 + t64[:, None]) * D + vch[None, :]).to(tl.float32)
            if DOT_F16:
                contrib = tl.dot(p.to(tl.float16), v.to(tl.float16))
            else:
                contrib = tl.dot(p, v, input_precision="ieee")
        else:
            raw = tl.load(VD + (s64 * cap64 + t64[:, None]) * VB + vbyte[None, :]).to(tl.int32)
            codes = ((raw >> vshift[None, :]) & ((1 << V_BITS) - 1)).to(tl.float32)
            VG: tl.constexpr = D // V_GS
            if VG == 1:
                sc = tl.load(VS + s64 * cap64 + t64).to(tl.float32)
                of = tl.load(VO + s64 * cap64 + t64).to(tl.float32)
                ps = p * sc[None, :]
                if DOT_F16:
                    contrib = tl.dot(ps.to(tl.float16), codes.to(tl.float16))
                else:
                    contrib = tl.dot(ps, codes, input_precision="ieee")
                contrib += _sum(p * of[None, :], 1)[:, None]
            else:
                g = (vch // V_GS)[None, :]
                sc = tl.load(VS + (s64 * cap64 + t64[:, None]) * VG + g).to(tl.float32)
                of = tl.load(VO + (s64 * cap64 + t64[:, None]) * VG + g).to(tl.float32)
                v = codes * sc + of
                if DOT_F16:
                    contrib = tl.dot(p.to(tl.float16), v.to(tl.float16))
                else:
                    contrib = tl.dot(p, v, input_precision="ieee")
            if V_SEP:
                vseg = tl.load(KSEG + s64 * (cap64 // BLOCK_N) + page).to(tl.int64)
                vf = tl.load(VF + (s64 * nseg + vseg) * D + vch).to(tl.float32)
                contrib = contrib * vf[None, :]
        acc = acc * alpha[:, None] + contrib

    # Only the real query rows are written: the partials are a small fraction of the bytes read.
    out = (s64 * n_split + split_offset + sp) * ROWS + rows
    tl.store(PM + out, m_i, mask=row_ok)
    tl.store(PL + out, l_i, mask=row_ok)
    tl.store(PACC + out[:, None] * D + vch[None, :], acc, mask=row_ok[:, None])


@triton.jit
def _merge_kernel(
    PM,
    PL,
    PACC,
    OUT,  # fp32 [S, ROWS, D]
    MF,  # fp32 [S, ROWS]: merged maximum and sum (for the received attention)
    LF,
    n_split,
    ROWS: tl.constexpr,
    D: tl.constexpr,
    SPLIT_BLOCK: tl.constexpr,
):
    s = tl.program_id(0)
    r = tl.program_id(1)
    s64 = s.to(tl.int64)
    j = tl.arange(0, D)
    mv = tl.full([SPLIT_BLOCK], float("-inf"), tl.float32)
    lv = tl.full([SPLIT_BLOCK], 0.0, tl.float32)
    acc = tl.full([D], 0.0, tl.float32)
    # Two passes over the splits: the maximum, then the rescaled sums (splits are few).
    for b0 in range(0, n_split, SPLIT_BLOCK):
        idx = b0 + tl.arange(0, SPLIT_BLOCK)
        pm = tl.load(PM + (s64 * n_split + idx) * ROWS + r, mask=idx < n_split, other=float("-inf"))
        mv = tl.maximum(mv, pm)
    m = _max(mv, 0)
    m_safe = tl.where(m == float("-inf"), 0.0, m)
    for b0 in range(0, n_split, SPLIT_BLOCK):
        idx = b0 + tl.arange(0, SPLIT_BLOCK)
        ok = idx < n_split
        pm = tl.load(PM + (s64 * n_split + idx) * ROWS + r, mask=ok, other=float("-inf"))
        pl = tl.load(PL + (s64 * n_split + idx) * ROWS + r, mask=ok, other=0.0)
        w = tl.exp2(pm - m_safe)
        lv += pl * w
        pa = tl.load(
            PACC + ((s64 * n_split + idx[:, None]) * ROWS + r) * D + j[None, :],
            mask=ok[:, None],
            other=0.0,
        )
        acc += _sum(pa * w[:, None], 0)
    lsum = _sum(lv, 0)
    inv = tl.where(lsum > 0.0, 1.0 / lsum, 0.0)
    tl.store(OUT + (s64 * ROWS + r) * D + j, acc * inv)
    tl.store(MF + s64 * ROWS + r, m_safe)
    tl.store(LF + s64 * ROWS + r, lsum)


# ----------------------------------------------------------------------------------------
# Launcher (plain Python: it runs the kernels of the module it was loaded with, compiled or
# under the interpreter).

LOG2E = 1.4426950408889634


def positions_tensor(q_positions, device):
    """``q_positions`` as an int32 tensor on ``device`` without a blocking copy: consecutive
    positions (every decoding step) are generated on the device; others go through pinned
    memory asynchronously."""
    import torch

    n = len(q_positions)
    first = int(q_positions[0]) if n else 0
    if all(int(p) == first + i for i, p in enumerate(q_positions)):
        return torch.arange(first, first + n, dtype=torch.int32, device=device)
    host = torch.tensor([int(p) for p in q_positions], dtype=torch.int32)
    if torch.device(device).type == "cuda":
        return host.pin_memory().to(device, non_blocking=True)
    return host.to(device)


def plan_splits(pages: list[int], streams: int, target_programs: int) -> int:
    """Pages per split so that streams x splits (over every tier) reach ``target_programs``
    where the context allows it: decode attention is bandwidth bound, and a GPU needs several
    programs per SM in flight to saturate its memory system."""
    total = sum(pages)
    if total == 0:
        return 1
    return max(1, -(-streams * total // max(1, target_programs)))


def attend_tiers(
    tiers,
    q,
    q_positions,
    first_valid,
    scale,
    kv_heads,
    track,
    *,
    dot_f16=False,
    target_programs=528,
    block_n=64,
    num_warps=4,
    num_stages=2,
):
    """Attention of ``q`` ``[B, Hq, Tq, D]`` over ``tiers`` (see ``TierView``).

    Returns ``(out [B, Hq, Tq, D] fp32, received)`` where ``received[i]`` is, for tier ``i``
    when ``track`` lists it, the attention each of its rows received ``[S, cap]`` (summed
    over the GQA group's heads and the queries), else ``None``. Everything stays on the
    tensors' device; no value is read back to the host.
    """
    import torch

    b, hq, tq, d = q.shape
    group = hq // kv_heads
    streams = b * kv_heads
    rows = group * tq
    dev = q.device
    # Rows of a stream: (head in group, query), head-major; scale and log2(e) folded in.
    qs = (q.float() * (scale * LOG2E)).reshape(b, kv_heads, group, tq, d).reshape(streams, rows, d)
    qpos = positions_tensor(q_positions, dev).repeat(group)
    fv = first_valid.repeat_interleave(kv_heads)
    rows_p = max(16, triton.next_power_of_2(rows))
    pages = [t.fill_pages(block_n) for t in tiers]
    pps = plan_splits(pages, streams, target_programs)
    splits = [-(-p // pps) for p in pages]
    n_split = max(1, sum(splits))
    pm = torch.empty((streams, n_split, rows), dtype=torch.float32, device=dev)
    pl = torch.empty_like(pm)
    pacc = torch.empty((streams, n_split, rows, d), dtype=torch.float32, device=dev)
    if sum(splits) == 0:
        pm.fill_(float("-inf"))
        pl.zero_()
        pacc.zero_()
    logits = [None] * len(tiers)
    offset = 0
    for i, (t, ns) in enumerate(zip(tiers, splits, strict=True)):
        if ns == 0:
            continue
        qt = qs if t.kfix is None else qs * t.kfix.float().reshape(streams, 1, d)
        do_track = bool(track and track[i])
        lg = (
            torch.empty((streams, rows, t.cap), dtype=torch.float32, device=dev) if do_track else pm
        )
        if do_track:
            lg.fill_(float("-inf"))
            logits[i] = lg
        _tier_split_kernel[(streams, ns)](
            qt.contiguous(),
            qpos,
            fv,
            t.pos,
            t.kd,
            t.ks,
            t.ko,
            t.seg,
            t.vd,
            t.vs,
            t.vo,
            t.vf,
            pm,
            pl,
            pacc,
            lg,
            t.cap,
            pages[i],
            pps,
            offset,
            n_split,
            t.nseg,
            kv_heads,
            ROWS=rows,
            ROWS_P=rows_p,
            D=d,
            BLOCK_N=block_n,
            K_MODE=t.k_mode,
            K_BITS=t.k_bits,
            K_GS=t.k_gs,
            V_MODE=t.v_mode,
            V_BITS=t.v_bits,
            V_GS=t.v_gs,
            V_SEP=t.v_sep,
            TRACK=do_track,
            DOT_F16=dot_f16,
            num_warps=num_warps,
            num_stages=num_stages,
        )
        offset += ns
    out = torch.empty((streams, rows, d), dtype=torch.float32, device=dev)
    mf = torch.empty((streams, rows), dtype=torch.float32, device=dev)
    lf = torch.empty_like(mf)
    _merge_kernel[(streams, rows)](
        pm, pl, pacc, out, mf, lf, n_split, ROWS=rows, D=d, SPLIT_BLOCK=16
    )
    received = []
    for lg in logits:
        if lg is None:
            received.append(None)
            continue
        p = torch.exp2(lg - mf[:, :, None]) / torch.where(lf > 0, lf, 1.0)[:, :, None]
        received.append(p.sum(1))
    out = out.reshape(b, kv_heads, group, tq, d).reshape(b, hq, tq, d)
    return out, received
