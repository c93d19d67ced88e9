"""Decode attention computed directly on the Triton engine's packed tiers.

One launch covers every tier of a layer: program ``(stream, split)`` finds its tier from the
split index (the splits of the buffer, then the high tier, then the low tier), reads the
packed codes of its pages once and keeps an online softmax (base 2, fp32) over them. A GQA
group's query heads are the rows of one program, so a kv-head's codes are read once for all
its query heads. A second launch merges the splits with the log-sum-exp rule and writes the
output; with ``track`` a third computes each tracked tier's received attention from the
logits the first wrote. Nothing is read back to the host, and per call the host only
computes page counts and launches (no tensor is built for the queries: the kernel reads
``q`` through its strides and folds ``scale * log2(e)`` in).

Unpacking. A tile's column ``j`` holds channel ``(j % NW) * FPW + j // NW``, where ``FPW``
codes share a word and ``NW`` words make a row (*field-major* order): one load of a row's
words, repeated ``FPW`` times out of L1, then a shift and a mask per element, and the
integer code becomes an exact fp16 through its bit pattern (``code | 0x6400`` is
``1024 + code``). The queries, the per-channel parameters and the output are permuted the
same way, so no unpacked copy of the cache is ever made. 3-bit codes follow the Rust packing
(a least-significant-bit-first bitstream: 8 codes in 3 bytes), read as 24-bit groups.

Dots. Codes are exact in fp16, so the other operand is split into ``hi + lo`` fp16 parts
after a per-row power-of-two scaling (no overflow, no precision lost to the range):
``x·c = hi·c + lo·c`` with fp32 accumulation is within ~2^-22 of the fp32 product. Tensor-core
dots need 16 rows; a decode step has ``group`` rows (4 for 32 query / 8 kv-heads), so the
parts are stacked into the padding rows and cost no extra dot. Dequantization is folded into
the dots where the algebra allows it:

* per-channel keys (one segment per page): ``q·k̂ = (q∘s)·code + q·o``;
* per-token groups ``g``: ``q·k̂_t = Σ_g s_tg (q_g·code_t) + o_tg Σq_g`` (the groups' masked
  queries are stacked rows too), ``Σ_t p_t v̂_t = Σ_g [Σ_t (p_t s_tg) code_t]_g + Σ_t p_t o_tg``;
* the fixed key factor (MiKV's balancer) is folded into the queries once per program,
  ZipCache's separable value factor (per page) multiplies the page's contribution.

Dense tiers (the full-precision buffer) use fp32 dots.

Rotation (kvmix-5x's ``rotation=``). A store whose keys and values are held rotated by a
randomized Hadamard matrix ``R = diag(c) H`` (``H`` the Sylvester Hadamard matrix of entries
±1, ``c = R[:, 0]`` the random signs over ``sqrt(D)``; ``kvmix.cache.randomized_hadamard``) is
attended with the unrotated query: each program writes ``q @ R = (q * c) @ H`` of its rows to a
slab of its own (the tiers read the query from there, through the same strided loads), and the
merge writes ``out @ R^T = (out @ H) * c``. ``@ H`` is a fast Walsh-Hadamard transform
(``_hadamard``: ``log2(D)`` add/subtract stages in fp32, no dot, so nothing can drop to TF32),
and only ``R``'s first column is read: a ``D x D`` matrix read per program would be 64 KiB at
``D = 128``, ~70 MB of L2 reads per launch of ~1000 programs.

The field path (``fields=True``, ``_tier_fields``; the default on NVIDIA GPUs) reads 2-,
4- and 8-bit tiers as int16 elements and gives each bit field its own dot, so that only
elementwise work (one inline-PTX op per field) lies between a load and its dot: the packed
elements then go from shared memory straight into the mma operand registers and are
unpacked there, at about half the instructions per code (``notes/triton-kernel.md``).
Its page loop carries across pages what does not change between them: the keys' query
operands are built once per run of pages of one segment, and the value accumulators are the
value dots' own, rescaled only when a row's running maximum or operand scale changes. Its key
dots are transposed (``_kdot``): the page's 64 tokens are the mma's M and the query rows' hi
and lo parts its N, which an mma takes 8 of, where as its M they were padded to 16.
"""

# Triton's kernel language is untyped (its decorators, and parameters whose annotations
# Triton itself reads, e.g. `tl.constexpr`), and so are the launchers that hand kernels their
# arguments: mypy checks everything else in strict mode.
# mypy: disable-error-code="no-untyped-def,untyped-decorator,no-untyped-call"

from __future__ import annotations

import os
from typing import Any

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
def _sum(x, axis: tl.constexpr):
    return tl.reduce(x, axis, _add)


@triton.jit
def _max(x, axis: tl.constexpr):
    return tl.reduce(x, axis, _maxf)


@triton.jit
def _cast_rtne(x, DT: tl.constexpr):
    """fp32 ``x`` as ``DT``, rounded to nearest even as torch's ``.to()`` rounds. bfloat16 is
    rounded by hand: Triton's interpreter truncates fp32 to bfloat16 (the GPU rounds to
    nearest even), so the two would disagree in the last bit; the rounded fp32 is exact in
    bfloat16, so the final conversion is the same everywhere."""
    if DT == tl.bfloat16:
        bits = x.to(tl.uint32, bitcast=True)
        bits = ((bits + (((bits >> 16) & 1) + 0x7FFF)) >> 16) << 16
        x = tl.where(x != x, x, bits.to(tl.float32, bitcast=True))
    if DT == tl.float16:
        # What rounds past the largest fp16 is infinite, made explicit: the interpreter's
        # numpy cast would warn about it (as it would about 0 * inf: no product here).
        inf = tl.where(x > 0, float("inf"), float("-inf"))
        x = tl.where((tl.abs(x) < 65520.0) | (x != x), x, inf)
    return x.to(DT)


@triton.jit
def _butterfly(x, M: tl.constexpr, D: tl.constexpr):
    """One stage of the fast Walsh-Hadamard transform of the rows of ``x [M, D]``:
    ``out[:, k] = x[:, 2k] + x[:, 2k + 1]``, ``out[:, D/2 + k] = x[:, 2k] - x[:, 2k + 1]``."""
    a, b = tl.split(tl.reshape(x, (M, D // 2, 2)))
    return tl.reshape(tl.permute(tl.join(a + b, a - b), (0, 2, 1)), (M, D))


@triton.jit
def _hadamard(x, M: tl.constexpr, D: tl.constexpr):
    """``x [M, D] @ H`` for the ``D x D`` Sylvester Hadamard matrix ``H`` (entries ±1):
    ``log2(D)`` equal stages (``_butterfly``), each taking the lowest index bit and putting its
    result at the top, so the order is natural again after the last (a constant-geometry
    transform: the same reshape at every stage). fp32 adds only: within a few fp32 ulps of the
    exact product, and ``x @ R`` is ``_hadamard(x * c)`` with the products ``x * c`` exactly
    those of the matrix product."""
    for i in tl.static_range(16):
        if (2 << i) <= D:
            x = _butterfly(x, M, D)
    return x


# Modes of a tier's keys or values (constexpr kernel arguments).
# Compiled kernels may only read globals that are constexpr (the interpreter reads any).
DENSE = tl.constexpr(0)
CHANNEL = tl.constexpr(1)  # per-channel scale/offset of the page's segment (keys only)
TOKEN = tl.constexpr(2)  # per-token groups of channels


@triton.jit
def _channel_order(
    D: tl.constexpr, MODE: tl.constexpr, BITS: tl.constexpr, WB: tl.constexpr, BCAST: tl.constexpr
):
    """Channel of each tile column (see the module docstring)."""
    j = tl.arange(0, D)
    if MODE == DENSE:
        ch = j
    elif BCAST == 2:
        ch = j
    elif BITS == 3:
        NG3: tl.constexpr = D // 8
        ch = (j % NG3) * 8 + j // NG3
    else:
        FPW: tl.constexpr = 8 * WB // BITS
        NW: tl.constexpr = D // FPW
        ch = (j % NW) * FPW + j // NW
    return ch


@triton.jit
def _fields(w, BITS: tl.constexpr, FPW: tl.constexpr):
    """The ``FPW`` fields of words ``w [N, NW]`` as ``[N, NW * FPW]`` in natural (packing)
    order, built by repeated ``tl.join``: each join adds a last dimension of 2 held by the same
    thread, so a thread ends up owning a word's ``FPW`` consecutive codes and the conversion to
    the dot operand's layout can store them as vectors instead of one fp16 at a time."""
    # Each join's new index bit is below the previous ones': halves first, single fields last.
    x = w[:, :, None]
    half: tl.constexpr = FPW // 2
    if half >= 16:
        x = tl.join(x, x >> (BITS * 16))
        x = tl.reshape(x, (w.shape[0], w.shape[1], x.shape[2] * 2))
    if half >= 8:
        x = tl.join(x, x >> (BITS * 8))
        x = tl.reshape(x, (w.shape[0], w.shape[1], x.shape[2] * 2))
    if half >= 4:
        x = tl.join(x, x >> (BITS * 4))
        x = tl.reshape(x, (w.shape[0], w.shape[1], x.shape[2] * 2))
    if half >= 2:
        x = tl.join(x, x >> (BITS * 2))
        x = tl.reshape(x, (w.shape[0], w.shape[1], x.shape[2] * 2))
    if half >= 1:
        x = tl.join(x, x >> BITS)
        x = tl.reshape(x, (w.shape[0], w.shape[1], x.shape[2] * 2))
    return tl.reshape(x, (w.shape[0], w.shape[1] * FPW))


@triton.jit
def _codes(
    DATA,
    row,  # int64 [BLOCK_N]: stream * cap + token
    D: tl.constexpr,
    BITS: tl.constexpr,
    WB: tl.constexpr,
    MAGIC: tl.constexpr,
    BCAST: tl.constexpr,
):
    """The codes of rows ``row`` as an exact fp16 tile ``[BLOCK_N, D]`` (``_channel_order``).
    ``DATA`` is the tier's packed rows viewed as words of ``WB`` bytes (bytes for 3 bits).
    ``BCAST``: 2 = load each row's words once and split them by joins (``_fields``, packing
    order); 1 = load each row's words once (``[BLOCK_N, NW]``) and broadcast them over the
    fields in registers; else gather a word per element (``FPW`` times the loads, and as much
    shared memory when the loop is pipelined)."""
    j = tl.arange(0, D)
    if BITS == 3:
        NG3: tl.constexpr = D // 8
        RB: tl.constexpr = 3 * D // 8
        if BCAST == 2:
            gi = tl.arange(0, NG3)
            base = DATA + row[:, None] * RB + 3 * gi[None, :]
            w = (
                tl.load(base).to(tl.int32)
                | (tl.load(base + 1).to(tl.int32) << 8)
                | (tl.load(base + 2).to(tl.int32) << 16)
            )
            code = _fields(w, 3, 8) & 7
        elif BCAST:
            gi = tl.arange(0, NG3)
            base = DATA + row[:, None] * RB + 3 * gi[None, :]
            w = (
                tl.load(base).to(tl.int32)
                | (tl.load(base + 1).to(tl.int32) << 8)
                | (tl.load(base + 2).to(tl.int32) << 16)
            )
            sh = 3 * tl.arange(0, 8)
            code = tl.reshape((w[:, None, :] >> sh[None, :, None]) & 7, (row.shape[0], D))
        else:
            gi = j % NG3
            base = DATA + row[:, None] * RB + 3 * gi[None, :]
            w = (
                tl.load(base).to(tl.int32)
                | (tl.load(base + 1).to(tl.int32) << 8)
                | (tl.load(base + 2).to(tl.int32) << 16)
            )
            code = (w >> (3 * (j // NG3))[None, :]) & 7
    else:
        FPW: tl.constexpr = 8 * WB // BITS
        NW: tl.constexpr = D // FPW
        MASK: tl.constexpr = (1 << BITS) - 1
        if BCAST == 2:
            w = tl.load(DATA + row[:, None] * NW + tl.arange(0, NW)[None, :]).to(tl.int32)
            code = _fields(w, BITS, FPW) & MASK
        elif BCAST:
            w = tl.load(DATA + row[:, None] * NW + tl.arange(0, NW)[None, :]).to(tl.int32)
            sh = BITS * tl.arange(0, FPW)
            code = tl.reshape((w[:, None, :] >> sh[None, :, None]) & MASK, (row.shape[0], D))
        else:
            w = tl.load(DATA + row[:, None] * NW + (j % NW)[None, :]).to(tl.int32)
            code = (w >> (BITS * (j // NW))[None, :]) & MASK
    if MAGIC:
        # 0x6400 is fp16 1024.0 with a zero mantissa: OR-ing a code below 1024 into it gives
        # 1024 + code exactly, without an int-to-float conversion (a slow instruction).
        return (code | 0x6400).to(tl.int16).to(tl.float16, bitcast=True) - 1024.0
    return code.to(tl.float16)


@triton.jit
def _stack_f16(x, M: tl.constexpr, K: tl.constexpr, NP: tl.constexpr, NPART: tl.constexpr):
    """fp32 ``x [M, K]`` as fp16 blocks ``[NP * M, K]`` (hi, lo, zero padding) scaled per row
    by a power of two, and the inverse scale ``[M]``: ``x = inv * Σ_blocks``."""
    amax = _max(tl.abs(x), 1)
    e = (amax.to(tl.int32, bitcast=True) >> 23) & 0xFF
    # Biased exponent of the scale: brings |x| below 2^15 (fp16's range ends at 65504).
    re = tl.minimum(tl.maximum(268 - e, 1), 253)
    r = (re << 23).to(tl.float32, bitcast=True)
    inv = ((254 - re) << 23).to(tl.float32, bitcast=True)
    xs = x * r[:, None]
    hi = xs.to(tl.float16).to(tl.float32)
    part = tl.arange(0, NP)[:, None, None]
    if NPART == 1:
        val = tl.where(part == 0, hi[None, :, :], 0.0)
    else:
        val = tl.where(part == 0, hi[None, :, :], tl.where(part == 1, (xs - hi)[None, :, :], 0.0))
    return tl.reshape(val.to(tl.float16), (NP * M, K)), inv


@triton.jit
def _pad_rows(x, M: tl.constexpr, K: tl.constexpr, NP: tl.constexpr):
    part = tl.arange(0, NP)[:, None, None]
    return tl.reshape(tl.where(part == 0, x[None, :, :], 0.0), (NP * M, K))


@triton.jit
def _unstack(y, M: tl.constexpr, N: tl.constexpr, NP: tl.constexpr, INNER: tl.constexpr = False):
    """The sum of ``y [NP * M, N]``'s blocks (rows ``m * NP + part`` with ``INNER``)."""
    if INNER:
        out = _sum(tl.reshape(y, (M, NP, N)), 1)
    else:
        out = _sum(tl.reshape(y, (NP, M, N)), 0)
    return out


@triton.jit
def _block_rows(SEG, blk, BLOCK_N: tl.constexpr):
    """Block ``blk`` of a segmented tier (``TierView.seg``: rows of one segment within one
    page): the page's rows (a page-aligned tile, as in an unsegmented tier), the block's
    segment, and which of the page's rows are the block's (the others belong to the blocks
    around it, or lie past the fill): ``0 <= t - r0 < r1 - r0``, one unsigned compare per
    row."""
    r0 = tl.load(SEG + 2 * blk)
    seg = tl.load(SEG + 2 * blk + 1).to(tl.int64)
    r1 = tl.load(SEG + 2 * blk + 2)
    base = (r0 // BLOCK_N) * BLOCK_N
    j = tl.arange(0, BLOCK_N)
    mine = (j - (r0 - base)).to(tl.uint32, bitcast=True) < (r1 - r0).to(tl.uint32, bitcast=True)
    return base + j, seg, mine


@triton.jit
def _tier_stacked(
    Q,
    sqb,
    sqh,
    sqt,
    sqd,
    qscale,
    QPOS,
    qpos0,
    FV,
    KFIX,
    POS,
    KD,
    KS,
    KO,
    SEG,
    VD,
    VS,
    VO,
    VF,
    LG,
    PM,
    PL,
    PACC,
    s,
    split,  # this program's split within the tier
    out_split,  # and among every tier's splits (where its partials go)
    cap,
    n_pages,
    pages_per_split,
    n_split,
    nseg,
    kv_heads,
    ROWS: tl.constexpr,
    RP: tl.constexpr,
    TQ: tl.constexpr,
    D: tl.constexpr,
    BLOCK_N: tl.constexpr,
    QPOS_RANGE: tl.constexpr,
    K_MODE: tl.constexpr,
    K_BITS: tl.constexpr,
    K_GS: tl.constexpr,
    K_WB: tl.constexpr,
    K_FIX: tl.constexpr,
    V_MODE: tl.constexpr,
    V_BITS: tl.constexpr,
    V_GS: tl.constexpr,
    V_WB: tl.constexpr,
    V_SEP: tl.constexpr,
    TRACK: tl.constexpr,
    NPART: tl.constexpr,
    MAGIC: tl.constexpr,
    BCAST: tl.constexpr,
    STAGES: tl.constexpr,
    DENSE_TC: tl.constexpr,  # fp16 dense rows on tensor cores (one-warp launches)
):
    s64 = s.to(tl.int64)
    cap64 = cap.to(tl.int64)
    rows = tl.arange(0, RP)
    row_ok = rows < ROWS
    kch = _channel_order(D, K_MODE, K_BITS, K_WB, BCAST)
    vch = _channel_order(D, V_MODE, V_BITS, V_WB, BCAST)
    # Row r of stream s = (b, h) is query head h * G + r // TQ, query r % TQ.
    b = s // kv_heads
    h = s % kv_heads
    G: tl.constexpr = ROWS // TQ
    head = h * G + rows // TQ
    qi = rows % TQ
    qoff = b.to(tl.int64) * sqb + head.to(tl.int64) * sqh + qi.to(tl.int64) * sqt
    q = tl.load(
        Q + qoff[:, None] + kch[None, :].to(tl.int64) * sqd, mask=row_ok[:, None], other=0.0
    )
    q = q.to(tl.float32) * qscale
    if K_FIX:
        q = q * tl.load(KFIX + s64 * D + kch).to(tl.float32)[None, :]
    if QPOS_RANGE:
        qpos = tl.where(row_ok, qpos0 + qi, -1)
    else:
        qpos = tl.load(QPOS + qi, mask=row_ok, other=-1)
    fv = tl.load(FV + b)

    m_i = tl.full([RP], float("-inf"), tl.float32)
    l_i = tl.full([RP], 0.0, tl.float32)
    acc = tl.full([RP, D], 0.0, tl.float32)

    # Key-side constants hoisted out of the page loop.
    if K_MODE == TOKEN:
        KG: tl.constexpr = D // K_GS
        kg = tl.arange(0, KG)
        # Queries masked to each channel group, stacked as rows [KG * RP, D].
        qg3 = tl.where((kch // K_GS)[None, None, :] == kg[:, None, None], q[None, :, :], 0.0)
        qg_sum = _sum(qg3, 2)  # [KG, RP]
        NPK: tl.constexpr = NPART if NPART * KG * RP >= 16 else 16 // (KG * RP)
        qstack, qinv = _stack_f16(tl.reshape(qg3, (KG * RP, D)), KG * RP, D, NPK, NPART)
    elif K_MODE == DENSE:
        NPD: tl.constexpr = 1 if RP >= 16 else 16 // RP
        qpad = _pad_rows(q, RP, D, NPD)
    # fp16 dense rows are exact fp16 operands: in a one-warp launch (the field path's) their
    # dots run on tensor cores with the other side split into fp16 parts (hi, lo), as the
    # packed tiers' codes do; fp32 dots (FMAs) of a page do not fit one warp's registers
    # (offline SASS, Triton 3.6: 3127 instructions and 296 B of stack per thread and 16-row
    # page, against 457 and none). The extra roundings (parts summed, a dot per part) cost
    # accuracy where logits are large and attention is peaked: interpreter, queries x20,
    # 1.3e-5 against the FMAs' 1.2e-6 of the largest output (a third part changed nothing:
    # it is fp32 accumulation, not the split); on an H100 the model's store (ZipCache, B8 x
    # 32k, an fp16 buffer) is 1.2e-5 from float64.
    TCK: tl.constexpr = DENSE_TC and K_MODE == DENSE and KD.dtype.element_ty == tl.float16
    TCV: tl.constexpr = DENSE_TC and V_MODE == DENSE and VD.dtype.element_ty == tl.float16
    NPT: tl.constexpr = NPART if NPART * RP >= 16 else 16 // RP
    if TCK:
        qd, qdinv = _stack_f16(q, RP, D, NPT, NPART)
    if V_MODE == TOKEN:
        VG: tl.constexpr = D // V_GS
        vg = tl.arange(0, VG)
        vsel = (vch // V_GS)[None, None, :] == vg[:, None, None]  # [VG, 1, D]
        NPV: tl.constexpr = NPART if NPART * VG * RP >= 16 else 16 // (VG * RP)
    else:
        NPV2: tl.constexpr = 1 if RP >= 16 else 16 // RP

    p_lo = split * pages_per_split
    p_hi = tl.minimum(p_lo + pages_per_split, n_pages)
    # Dense tiles are large and dense tiers (the buffer) short: no multi-buffering for them,
    # which would take shared memory from the packed tiers' pipeline (one kernel holds both).
    NSL: tl.constexpr = 1 if K_MODE == DENSE or V_MODE == DENSE else STAGES
    # A segmented tier is walked by its blocks (one segment's rows each), others by pages.
    SEGD: tl.constexpr = K_MODE == CHANNEL or V_SEP
    for page in tl.range(p_lo, p_hi, num_stages=NSL):
        if SEGD:
            t, seg, mine = _block_rows(SEG, page, BLOCK_N)
        else:
            t = page * BLOCK_N + tl.arange(0, BLOCK_N)
        row = s64 * cap64 + t.to(tl.int64)
        pos = tl.load(POS + row)
        if SEGD:  # the page's rows of other blocks are holes to this block
            pos = tl.where(mine, pos, -1)
        # ---- keys: logits [RP, BLOCK_N] (base 2, scaled)
        if TCK:
            k16 = tl.load(KD + row[:, None] * D + kch[None, :])
            logits = _unstack(tl.dot(qd, tl.trans(k16)), RP, BLOCK_N, NPT) * qdinv[:, None]
        elif K_MODE == DENSE:
            k = tl.load(KD + row[:, None] * D + kch[None, :]).to(tl.float32)
            logits = _unstack(tl.dot(qpad, tl.trans(k), input_precision="ieee"), RP, BLOCK_N, NPD)
        elif K_MODE == CHANNEL:
            codes = _codes(KD, row, D, K_BITS, K_WB, MAGIC, BCAST)
            ks = tl.load(KS + (s64 * nseg + seg) * D + kch).to(tl.float32)
            ko = tl.load(KO + (s64 * nseg + seg) * D + kch).to(tl.float32)
            NPC: tl.constexpr = NPART if NPART * RP >= 16 else 16 // RP
            a, ainv = _stack_f16(q * ks[None, :], RP, D, NPC, NPART)
            logits = _unstack(tl.dot(a, tl.trans(codes)), RP, BLOCK_N, NPC) * ainv[:, None]
            logits += _sum(q * ko[None, :], 1)[:, None]
        else:
            codes = _codes(KD, row, D, K_BITS, K_WB, MAGIC, BCAST)
            dots = _unstack(tl.dot(qstack, tl.trans(codes)), KG * RP, BLOCK_N, NPK)
            dots = tl.reshape(dots * qinv[:, None], (KG, RP, BLOCK_N))
            sc = tl.load(KS + row[None, :] * KG + kg[:, None]).to(tl.float32)  # [KG, N]
            of = tl.load(KO + row[None, :] * KG + kg[:, None]).to(tl.float32)
            logits = _sum(dots * sc[:, None, :] + qg_sum[:, :, None] * of[:, None, :], 0)
        visible = (pos[None, :] >= fv) & (pos[None, :] <= qpos[:, None]) & row_ok[:, None]
        logits = tl.where(visible, logits, float("-inf"))
        if TRACK:
            lg_ok = row_ok[:, None]
            if SEGD:  # the page's rows of other blocks are theirs to write
                lg_ok = lg_ok & mine[None, :]
            tl.store(
                LG + (s64 * ROWS + rows[:, None]) * cap64 + t[None, :].to(tl.int64),
                logits,
                mask=lg_ok,
            )
        m_new = tl.maximum(m_i, _max(logits, 1))
        m_safe = tl.where(m_new == float("-inf"), 0.0, m_new)
        p = tl.exp2(logits - m_safe[:, None])
        alpha = tl.exp2(m_i - m_safe)
        l_i = l_i * alpha + _sum(p, 1)
        m_i = m_new
        # ---- values: contribution [RP, D] in the values' field order
        if TCV:
            v16 = tl.load(VD + row[:, None] * D + vch[None, :])
            a, ainv = _stack_f16(p, RP, BLOCK_N, NPT, NPART)
            contrib = _unstack(tl.dot(a, v16), RP, D, NPT) * ainv[:, None]
        elif V_MODE == DENSE:
            v = tl.load(VD + row[:, None] * D + vch[None, :]).to(tl.float32)
            contrib = _unstack(
                tl.dot(_pad_rows(p, RP, BLOCK_N, NPV2), v, input_precision="ieee"), RP, D, NPV2
            )
        else:
            codes = _codes(VD, row, D, V_BITS, V_WB, MAGIC, BCAST)
            sc = tl.load(VS + row[None, :] * VG + vg[:, None]).to(tl.float32)  # [VG, N]
            of = tl.load(VO + row[None, :] * VG + vg[:, None]).to(tl.float32)
            ps = p[None, :, :] * sc[:, None, :]  # [VG, RP, N]
            a, ainv = _stack_f16(tl.reshape(ps, (VG * RP, BLOCK_N)), VG * RP, BLOCK_N, NPV, NPART)
            part = _unstack(tl.dot(a, codes), VG * RP, D, NPV) * ainv[:, None]
            part = tl.reshape(part, (VG, RP, D))
            po = _sum(p[None, :, :] * of[:, None, :], 2)  # [VG, RP]
            contrib = _sum(tl.where(vsel, part + po[:, :, None], 0.0), 0)
            if V_SEP:
                vf = tl.load(VF + (s64 * nseg + seg) * D + vch).to(tl.float32)
                contrib = contrib * vf[None, :]
        acc = acc * alpha[:, None] + contrib

    # Only the real query rows are written: the partials are a small fraction of the bytes read.
    out = (s64 * n_split + out_split) * ROWS + rows
    tl.store(PM + out, m_i, mask=row_ok)
    tl.store(PL + out, l_i, mask=row_ok)
    tl.store(PACC + out[:, None] * D + vch[None, :], acc, mask=row_ok[:, None])


@triton.jit
def _row_scale(amax):
    """Per-row power-of-two scale bringing ``amax`` below 2^15 (fp16's range ends at 65504)
    and its inverse (see ``_stack_f16``)."""
    e = (amax.to(tl.int32, bitcast=True) >> 23) & 0xFF
    re = tl.minimum(tl.maximum(268 - e, 1), 253)
    r = (re << 23).to(tl.float32, bitcast=True)
    inv = ((254 - re) << 23).to(tl.float32, bitcast=True)
    return r, inv


@triton.jit
def _stack_scaled(x, r, M: tl.constexpr, K: tl.constexpr, NP: tl.constexpr, NPART: tl.constexpr,
                  INNER: tl.constexpr = False):  # fmt: skip
    """fp32 ``x [M, K]`` times the row scales ``r [M]`` as fp16 blocks ``[NP * M, K]`` (hi,
    lo, zero padding): ``_stack_f16`` with the scale given, so that several operands (the
    fields of a byte) can share one accumulator. ``INNER``: each row's parts next to each
    other (rows ``m * NP + part``), so that a transposed dot's accumulator holds a row's hi
    and lo sums in one thread's registers (``_unstack``'s ``INNER``: no shuffle)."""
    xs = x * r[:, None]
    hi = xs.to(tl.float16).to(tl.float32)
    lo = xs - hi
    if INNER:
        part = tl.arange(0, NP)[None, :, None]
        hi3 = hi[:, None, :]
        lo3 = lo[:, None, :]
    else:
        part = tl.arange(0, NP)[:, None, None]
        hi3 = hi[None, :, :]
        lo3 = lo[None, :, :]
    if NPART == 1:
        val = tl.where(part == 0, hi3, 0.0)
    else:
        val = tl.where(part == 0, hi3, tl.where(part == 1, lo3, 0.0))
    return tl.reshape(val.to(tl.float16), (NP * M, K))


@triton.jit
def _field_asm(x, BITS: tl.constexpr, F: tl.constexpr):
    """Field ``F`` of the low byte of int16 elements (bits ``S = F * BITS < 8``) as exact
    fp16, two elements (one 32-bit register) per inline-PTX instance: the field, masked in
    place, is OR-ed into the bits of fp16 1024.0 (``0x6400 | c << S`` is ``1024 + c * 2^S``),
    then one f16x2 subtraction (``S = 0``) or fused multiply-add (``* 2^-S - 1024 * 2^-S``,
    exact) leaves the code. A pure unary elementwise op: Triton's compiler moves the
    conversion to the dot operand's layout above it, onto the load."""
    if BITS == 2 and F == 0:
        return _pack2(
            x,
            "{ .reg .b32 t, k; mov.b32 k, 0x64006400; "
            "lop3.b32 t, $1, 0x00030003, 0x64006400, 0xea; sub.f16x2 $0, t, k; }",
        )
    elif BITS == 2 and F == 1:
        return _pack2(
            x,
            "{ .reg .b32 t, k, b; mov.b32 k, 0x34003400; mov.b32 b, 0xdc00dc00; "
            "lop3.b32 t, $1, 0x000c000c, 0x64006400, 0xea; fma.rn.f16x2 $0, t, k, b; }",
        )
    elif BITS == 2 and F == 2:
        return _pack2(
            x,
            "{ .reg .b32 t, k, b; mov.b32 k, 0x2c002c00; mov.b32 b, 0xd400d400; "
            "lop3.b32 t, $1, 0x00300030, 0x64006400, 0xea; fma.rn.f16x2 $0, t, k, b; }",
        )
    elif BITS == 2 and F == 3:
        return _pack2(
            x,
            "{ .reg .b32 t, k, b; mov.b32 k, 0x24002400; mov.b32 b, 0xcc00cc00; "
            "lop3.b32 t, $1, 0x00c000c0, 0x64006400, 0xea; fma.rn.f16x2 $0, t, k, b; }",
        )
    elif BITS == 4 and F == 0:
        return _pack2(
            x,
            "{ .reg .b32 t, k; mov.b32 k, 0x64006400; "
            "lop3.b32 t, $1, 0x000f000f, 0x64006400, 0xea; sub.f16x2 $0, t, k; }",
        )
    elif BITS == 4 and F == 1:
        return _pack2(
            x,
            "{ .reg .b32 t, k, b; mov.b32 k, 0x2c002c00; mov.b32 b, 0xd400d400; "
            "lop3.b32 t, $1, 0x00f000f0, 0x64006400, 0xea; fma.rn.f16x2 $0, t, k, b; }",
        )
    elif BITS == 8 and F == 0:
        return _pack2(
            x,
            "{ .reg .b32 t, k; mov.b32 k, 0x64006400; "
            "lop3.b32 t, $1, 0x00ff00ff, 0x64006400, 0xea; sub.f16x2 $0, t, k; }",
        )


@triton.jit
def _pack2(x, asm: tl.constexpr):
    return tl.inline_asm_elementwise(asm, "=r,r", [x], dtype=tl.float16, is_pure=True, pack=2)


@triton.jit
def _high_byte(x):
    """int16 elements' high bytes moved to their low bytes (the high bytes then hold the next
    element's low byte: a field's mask below 8 bits drops it), one shift per register of two
    elements, shared by every field taken from it (identical pure ops are merged)."""
    return tl.inline_asm_elementwise(
        "shr.b32 $0, $1, 8;", "=r,r", [x], dtype=tl.int16, is_pure=True, pack=2
    )


@triton.jit
def _field(x, BITS: tl.constexpr, F: tl.constexpr, ASM: tl.constexpr):
    """Field ``F`` (bits ``F * BITS ..``) of int16 elements ``x`` as an exact fp16 tile."""
    if ASM:
        if BITS * F >= 8:
            out = _field_asm(_high_byte(x), BITS, F - 8 // BITS)
        else:
            out = _field_asm(x, BITS, F)
    else:
        c = (x >> (BITS * F)) & ((1 << BITS) - 1)
        out = (c | 0x6400).to(tl.float16, bitcast=True) - 1024.0
    return out


@triton.jit
def _groups3(words, KNE: tl.constexpr):
    """A 3-bit tier's rows (8 codes in each 3-byte group, channel ``8 g + f`` at bits ``3 f``
    of group ``g``, as the Rust packer packs them) as two int16 tiles ``[N, KNE]``: each
    group's fields 0-4 (bits 0-14) and 5-7 (bits 0-8). ``words`` points at each row's every
    third 32-bit word ``[N, KNE / 4]``: a row is read as
    32-bit words, three words holding four groups, so that its loads are 4-byte asynchronous
    copies the page loop's pipeline issues ahead: three int16 loads per two groups (before
    session 28) were 2-byte loads, which a ``cp.async`` cannot copy, so they stayed in the
    loop as 49 synchronous loads a page (Triton 3.6, sm_90: 1459 -> 1279 SASS instructions a
    page). Each quarter of the groups comes from the same ops on its words (a per-column
    shift or select stops the compiler from moving the dot operand's layout conversion up
    onto the tiles: it converted each field through shared memory, session 23), joined in
    group order."""
    w0 = tl.load(words)
    w1 = tl.load(words + 1)
    w2 = tl.load(words + 2)
    g0 = w0 & 0xFFFFFF
    g1 = ((w0 >> 24) & 0xFF) | ((w1 & 0xFFFF) << 8)
    g2 = ((w1 >> 16) & 0xFFFF) | ((w2 & 0xFF) << 16)
    g3 = (w2 >> 8) & 0xFFFFFF
    n: tl.constexpr = words.shape[0]
    # join(join(a, c), join(b, d)) flattens to a, b, c, d.
    lo = tl.join(tl.join(g0 & 0x7FFF, g2 & 0x7FFF), tl.join(g1 & 0x7FFF, g3 & 0x7FFF))
    hi = tl.join(tl.join(g0 >> 15, g2 >> 15), tl.join(g1 >> 15, g3 >> 15))
    return tl.reshape(lo, (n, KNE)).to(tl.int16), tl.reshape(hi, (n, KNE)).to(tl.int16)


@triton.jit
def _field3(lo, hi, F: tl.constexpr, ASM: tl.constexpr):
    """Field ``F`` of 3-bit groups (``_groups3``'s two tiles) as an exact fp16 tile."""
    if ASM:
        # Fields 0-2 and 5-7 sit at bits 0, 3, 6 of a tile, 3 and 4 at bits 1, 4 of its
        # high byte: all in reach of ``_field3_asm``'s fp16 magic (code << S below 1024).
        if F < 3:
            out = _field3_asm(lo, 3 * F)
        elif F < 5:
            out = _field3_asm(_high_byte(lo), 3 * F - 8)
        else:
            out = _field3_asm(hi, 3 * (F - 5))
    elif F < 5:  # fields 0-4 of ``lo`` and 0-2 of ``hi`` at 3 bits each: ``_field``'s way
        out = _field(lo, 3, F, False)
    else:
        out = _field(hi, 3, F - 5, False)
    return out


@triton.jit
def _field3_asm(x, S: tl.constexpr):
    """Bits ``S .. S + 2`` of int16 elements as exact fp16 (``_field_asm``'s way: masked in
    place, OR-ed into fp16 1024.0, then ``* 2^-S - 1024 * 2^-S`` by one f16x2 FMA)."""
    if S == 0:
        out = _pack2(
            x,
            "{ .reg .b32 t, k; mov.b32 k, 0x64006400; "
            "lop3.b32 t, $1, 0x00070007, 0x64006400, 0xea; sub.f16x2 $0, t, k; }",
        )
    elif S == 1:
        out = _pack2(
            x,
            "{ .reg .b32 t, k, b; mov.b32 k, 0x38003800; mov.b32 b, 0xe000e000; "
            "lop3.b32 t, $1, 0x000e000e, 0x64006400, 0xea; fma.rn.f16x2 $0, t, k, b; }",
        )
    elif S == 3:
        out = _pack2(
            x,
            "{ .reg .b32 t, k, b; mov.b32 k, 0x30003000; mov.b32 b, 0xd800d800; "
            "lop3.b32 t, $1, 0x00380038, 0x64006400, 0xea; fma.rn.f16x2 $0, t, k, b; }",
        )
    elif S == 4:
        out = _pack2(
            x,
            "{ .reg .b32 t, k, b; mov.b32 k, 0x2c002c00; mov.b32 b, 0xd400d400; "
            "lop3.b32 t, $1, 0x00700070, 0x64006400, 0xea; fma.rn.f16x2 $0, t, k, b; }",
        )
    else:  # S == 6
        out = _pack2(
            x,
            "{ .reg .b32 t, k, b; mov.b32 k, 0x24002400; mov.b32 b, 0xcc00cc00; "
            "lop3.b32 t, $1, 0x01c001c0, 0x64006400, 0xea; fma.rn.f16x2 $0, t, k, b; }",
        )
    return out


@triton.jit
def _kfield(kp, kq, BITS: tl.constexpr, F: tl.constexpr, ASM: tl.constexpr):
    """Field ``F`` of a page's key codes: int16 elements ``kp``, or 3-bit groups' two tiles."""
    if BITS == 3:
        out = _field3(kp, kq, F, ASM)
    else:
        out = _field(kp, BITS, F, ASM)
    return out


@triton.jit
def _q_field(qrow, sqd, row_ok, qscale, KFIX, s64, ch, D: tl.constexpr, K_FIX: tl.constexpr):
    """The queries ``[RP, K]`` at channels ``ch`` (``[RP, K]``, or ``[K]`` for every row),
    scaled (and by the fixed key factor)."""
    if len(ch.shape) == 1:
        ch = ch[None, :]
    q = tl.load(qrow + ch.to(tl.int64) * sqd, mask=row_ok[:, None], other=0.0)
    q = q.to(tl.float32) * qscale
    if K_FIX:
        q = q * tl.load(KFIX + s64 * D + ch).to(tl.float32)
    return q


@triton.jit
def _pow2_inv(r):
    """``1 / r`` for a power of two ``r`` (``_row_scale``'s range), exactly."""
    e = (r.to(tl.int32, bitcast=True) >> 23) & 0xFF
    return ((254 - e) << 23).to(tl.float32, bitcast=True)


@triton.jit
def _kchannel_scale(qrow, sqd, row_ok, qscale, KFIX, s64, KS, KO, sb, rows, ke,
                    D: tl.constexpr, K_FIX: tl.constexpr, KF: tl.constexpr,
                    RP: tl.constexpr, KNE: tl.constexpr):  # fmt: skip
    """Per-channel keys of segment ``sb``: the rows' common power-of-two scale of ``q * s``
    over every field (so that every field's dot accumulates into one result), its inverse,
    and the offsets' part ``q · o``. The segment's parameters are loaded per query row (L1
    hits) so that they come in the queries' layout; maxima and offset products are reduced
    once."""
    amax = tl.full([RP, KNE], 0.0, tl.float32)
    qo = tl.full([RP, KNE], 0.0, tl.float32)
    for f in tl.static_range(KF):
        ch = rows[:, None] * 0 + (ke * KF + f)[None, :]
        q = _q_field(qrow, sqd, row_ok, qscale, KFIX, s64, ch, D, K_FIX)
        amax = tl.maximum(amax, tl.abs(q * tl.load(KS + sb + ch).to(tl.float32)))
        qo += q * tl.load(KO + sb + ch).to(tl.float32)
    ar, ainv = _row_scale(_max(amax, 1))
    return ar, ainv, _sum(qo, 1)


@triton.jit
def _i16_asm(x, asm: tl.constexpr):
    return tl.inline_asm_elementwise(asm, "=r,r", [x], dtype=tl.int16, is_pure=True, pack=2)


@triton.jit
def _i8_field16(kp, BITS: tl.constexpr, G: tl.constexpr, ASM: tl.constexpr):
    """Byte field ``G`` of the int16 code tile ``kp [N, KNE]`` as exact small integers in
    place, the bytes in order as int8 ``[N, 2 * KNE]`` (byte ``2 e + h`` of element ``e``):
    2-bit fields 0-2 masked where they lie (``c * 4^G``), field 3 shifted down to bits 4-5
    (``c * 16``: below int8's 127); 4-bit fields shifted down to bits 0-3. One ``and`` (and
    a shift for a top field) per four codes, where fp16 fields take two instructions per two
    codes. The joins and the reshape only relabel registers: Triton 3.6 loads the int16 tile
    from shared memory straight into the int8 operand's layout (8-byte loads)."""
    if ASM:
        if BITS == 2 and G == 0:
            m = _i16_asm(kp, "and.b32 $0, $1, 0x03030303;")
        elif BITS == 2 and G == 1:
            m = _i16_asm(kp, "and.b32 $0, $1, 0x0c0c0c0c;")
        elif BITS == 2 and G == 2:
            m = _i16_asm(kp, "and.b32 $0, $1, 0x30303030;")
        elif BITS == 2:
            m = _i16_asm(kp, "{ .reg .b32 t; shr.b32 t, $1, 2; and.b32 $0, t, 0x30303030; }")
        elif G == 0:
            m = _i16_asm(kp, "and.b32 $0, $1, 0x0f0f0f0f;")
        else:
            m = _i16_asm(kp, "{ .reg .b32 t; shr.b32 t, $1, 4; and.b32 $0, t, 0x0f0f0f0f; }")
    else:
        x = kp.to(tl.int32)
        if BITS == 2 and G < 3:
            m = x & (0x0303 << (2 * G))
        elif BITS == 2:
            m = (x >> 2) & 0x3030
        else:
            m = (x >> (4 * G)) & 0x0F0F
    n: tl.constexpr = kp.shape[0]
    k: tl.constexpr = kp.shape[1]
    lo = (m & 0xFF).to(tl.int8)
    hi = ((m >> 8) & 0xFF).to(tl.int8)
    return tl.reshape(tl.join(lo, hi), (n, 2 * k))


@triton.jit
def _i8_digits(qs, f, RP: tl.constexpr, NB: tl.constexpr):
    """``qs * f`` (``|qs * f| < 2^30``) truncated to an integer and written as four balanced
    signed 8-bit digits, stacked as the int8 operand ``[4 * RP, NB]`` with rows
    ``dh * 2 * RP + r * 2 + dl`` for digit ``d = 2 dh + dl``: in the transposed dot's
    accumulator a thread then holds every digit of its row. Stacked by selects on a tile
    whose last dimension is the bytes: Triton keeps this loop-invariant operand in shared
    memory and reads it every page, and stores it in the order of its register layout's
    fastest dimension; stacked by joins (the digits fastest) its bytes were strided there
    and read one at a time (64 ``LDS.U8`` and 45 ``PRMT`` a page against 16 ``LDS.64``:
    2-bit pages 1068 -> 967 SASS instructions, session 29)."""
    q = (qs * f).to(tl.int32)
    d0 = ((q + 128) & 255) - 128
    q = (q - d0) >> 8
    d1 = ((q + 128) & 255) - 128
    q = (q - d1) >> 8
    d2 = ((q + 128) & 255) - 128
    d3 = (q - d2) >> 8
    dh = tl.arange(0, 2)[:, None, None, None]
    dl = tl.arange(0, 2)[None, None, :, None]
    lo = tl.where(dl == 0, d0[None, :, None, :], d1[None, :, None, :])
    hi = tl.where(dl == 0, d2[None, :, None, :], d3[None, :, None, :])
    x = tl.where(dh == 0, lo, hi)  # [dh, RP, dl, NB]
    return tl.reshape(x, (4 * RP, NB)).to(tl.int8)


@triton.jit
def _i8_channels(rows, be, G: tl.constexpr, KF: tl.constexpr):
    """The channel of byte ``be`` (every row) in byte field ``G``: int16 element ``e = be //
    2`` holds channels ``e * KF + f``, its low byte fields ``f < KF / 2``."""
    return rows[:, None] * 0 + ((be // 2) * KF + (be % 2) * (KF // 2) + G)[None, :]


@triton.jit
def _i8_qs(qrow, sqd, row_ok, qscale, KFIX, s64, KS, KO, sb, rows, be, G: tl.constexpr,
           D: tl.constexpr, K_FIX: tl.constexpr, KF: tl.constexpr):  # fmt: skip
    """``q * s`` and ``q * o`` of segment ``sb`` at byte field ``G``'s channels, ``[RP,
    NB]`` each."""
    ch = _i8_channels(rows, be, G, KF)
    q = _q_field(qrow, sqd, row_ok, qscale, KFIX, s64, ch, D, K_FIX)
    return q * tl.load(KS + sb + ch).to(tl.float32), q * tl.load(KO + sb + ch).to(tl.float32)


@triton.jit
def _i8_dot(kp, k, yi, BITS: tl.constexpr, G: tl.constexpr, ASM: tl.constexpr):
    """Byte field ``G``'s int8 key dot added to the int32 digit sums ``yi [N, 4 * RP]``."""
    return tl.dot(_i8_field16(kp, BITS, G, ASM), tl.trans(k), yi, out_dtype=tl.int32)


@triton.jit
def _kchannel_i8(qrow, sqd, row_ok, qscale, KFIX, s64, KS, KO, sb, rows, be,
                 D: tl.constexpr, K_FIX: tl.constexpr, K_BITS: tl.constexpr, KF: tl.constexpr,
                 RP: tl.constexpr, NB: tl.constexpr):  # fmt: skip
    """Per-channel keys of segment ``sb`` for int8 key dots: ``q * s`` as a 32-bit fixed point
    per row (four int8 digits; every product exact in int32), the inverse of its scale and
    the offsets' part ``q · o``, and the byte fields' digit operands."""
    q0, o0 = _i8_qs(qrow, sqd, row_ok, qscale, KFIX, s64, KS, KO, sb, rows, be, 0, D, K_FIX, KF)
    q1, o1 = _i8_qs(qrow, sqd, row_ok, qscale, KFIX, s64, KS, KO, sb, rows, be, 1, D, K_FIX, KF)
    amax = tl.maximum(tl.abs(q0), tl.abs(q1))
    qo = o0 + o1
    if K_BITS == 2:
        q2, o2 = _i8_qs(qrow, sqd, row_ok, qscale, KFIX, s64, KS, KO, sb, rows, be, 2, D, K_FIX,
                        KF)  # fmt: skip
        q3, o3 = _i8_qs(qrow, sqd, row_ok, qscale, KFIX, s64, KS, KO, sb, rows, be, 3, D, K_FIX,
                        KF)  # fmt: skip
        amax = tl.maximum(amax, tl.maximum(tl.abs(q2), tl.abs(q3)))
        qo += o2 + o3
    am = _max(amax, 1)
    # W: the largest field weight (2-bit fields 2 and 3 hold c * 16); the scale r brings
    # |q s| * W below 2^30 (biased exponent 283 - e for |q s| < 2^(e - 126)), capped at 2^100
    # (a row of zeros, e.g. a GQA padding row: r * 16 stays finite, and its digits 0).
    LW: tl.constexpr = 4 if K_BITS == 2 else 0
    e = (am.to(tl.int32, bitcast=True) >> 23) & 0xFF
    re = tl.minimum(tl.maximum(283 - LW - e, 1), 227)
    r = (re << 23).to(tl.float32, bitcast=True)
    kinv = _pow2_inv(r) * (1.0 / (1 << LW))
    if K_BITS == 2:
        k0 = _i8_digits(q0, r[:, None] * 16.0, RP, NB)
        k1 = _i8_digits(q1, r[:, None] * 4.0, RP, NB)
        k2 = _i8_digits(q2, r[:, None], RP, NB)
        k3 = _i8_digits(q3, r[:, None], RP, NB)
    else:
        k0 = _i8_digits(q0, r[:, None], RP, NB)
        k1 = _i8_digits(q1, r[:, None], RP, NB)
        k2 = k0
        k3 = k1
    return kinv, _sum(qo, 1), k0, k1, k2, k3


@triton.jit
def _i8_logits(y, RP: tl.constexpr, N: tl.constexpr):
    """The int32 digit sums ``y [N, 4 * RP]`` (``_i8_digits``' rows) combined per row:
    ``Σ_d y_d 256^d`` (pairs exact in int32, then one fp32 combination), ``[RP, N]``."""
    y4 = tl.reshape(y, (N, 2, RP, 2))
    dl = tl.arange(0, 2)[None, None, None, :]
    t = _sum(y4 * tl.where(dl == 0, 1, 256), 3)  # [N, dh, RP]
    dh = tl.arange(0, 2)[None, :, None]
    return tl.trans(_sum(t.to(tl.float32) * tl.where(dh == 0, 1.0, 65536.0), 1))


@triton.jit
def _kchannel_op(qrow, sqd, row_ok, qscale, KFIX, s64, KS, sb, rows, ke, ar,
                 F: tl.constexpr, D: tl.constexpr, K_FIX: tl.constexpr, KF: tl.constexpr,
                 RP: tl.constexpr, KNE: tl.constexpr, NPC: tl.constexpr,
                 NPART: tl.constexpr, INNER: tl.constexpr):  # fmt: skip
    """Field ``F``'s stacked query operand ``[NPC * RP, KNE]`` for per-channel keys:
    ``q * s`` at the field's channels, scaled by ``ar``, in hi/lo fp16 parts."""
    ch = rows[:, None] * 0 + (ke * KF + F)[None, :]
    q = _q_field(qrow, sqd, row_ok, qscale, KFIX, s64, ch, D, K_FIX)
    return _stack_scaled(q * tl.load(KS + sb + ch).to(tl.float32), ar, RP, KNE, NPC, NPART, INNER)


@triton.jit
def _ktoken_scale(qrow, sqd, row_ok, qscale, KFIX, s64, ke, kg, D: tl.constexpr,
                  K_FIX: tl.constexpr, KF: tl.constexpr, K_GS: tl.constexpr, KG: tl.constexpr,
                  RP: tl.constexpr, KNE: tl.constexpr):  # fmt: skip
    """Grouped per-token keys: the power-of-two scale of the queries masked to each channel
    group (stacked rows ``[KG * RP]``, common to every field), its inverse, and each masked
    query's sum (the offsets' factor)."""
    amax = tl.full([KG * RP], 0.0, tl.float32)
    qg_sum = tl.full([KG * RP], 0.0, tl.float32)
    for f in tl.static_range(KF):
        ch = ke * KF + f
        q = _q_field(qrow, sqd, row_ok, qscale, KFIX, s64, ch, D, K_FIX)
        qg = tl.where((ch // K_GS)[None, None, :] == kg[:, None, None], q[None, :, :], 0.0)
        qg = tl.reshape(qg, (KG * RP, KNE))
        amax = tl.maximum(amax, _max(tl.abs(qg), 1))
        qg_sum += _sum(qg, 1)
    qr, qinv = _row_scale(amax)
    return qr, qinv, qg_sum


@triton.jit
def _ktoken_op(qrow, sqd, row_ok, qscale, KFIX, s64, ke, kg, qr,
               F: tl.constexpr, D: tl.constexpr, K_FIX: tl.constexpr, KF: tl.constexpr,
               K_GS: tl.constexpr, KG: tl.constexpr, RP: tl.constexpr, KNE: tl.constexpr,
               NPK: tl.constexpr, NPART: tl.constexpr, INNER: tl.constexpr):  # fmt: skip
    """Field ``F``'s stacked query operand ``[NPK * KG * RP, KNE]`` for grouped per-token
    keys: the queries masked to each channel group (stacked rows), scaled by ``qr``."""
    ch = ke * KF + F
    q = _q_field(qrow, sqd, row_ok, qscale, KFIX, s64, ch, D, K_FIX)
    qg = tl.where((ch // K_GS)[None, None, :] == kg[:, None, None], q[None, :, :], 0.0)
    return _stack_scaled(tl.reshape(qg, (KG * RP, KNE)), qr, KG * RP, KNE, NPK, NPART, INNER)


@triton.jit
def _tier_fields(
    Q,
    sqb,
    sqh,
    sqt,
    sqd,
    qscale,
    QPOS,
    qpos0,
    FV,
    KFIX,
    POS,
    KD,
    KS,
    KO,
    SEG,
    VD,
    VS,
    VO,
    VF,
    LG,
    PM,
    PL,
    PACC,
    s,
    split,
    out_split,
    cap,
    n_pages,
    pages_per_split,
    n_split,
    nseg,
    kv_heads,
    ROWS: tl.constexpr,
    RP: tl.constexpr,
    TQ: tl.constexpr,
    D: tl.constexpr,
    BLOCK_N: tl.constexpr,
    QPOS_RANGE: tl.constexpr,
    K_MODE: tl.constexpr,
    K_BITS: tl.constexpr,
    K_GS: tl.constexpr,
    K_FIX: tl.constexpr,
    V_BITS: tl.constexpr,
    V_GS: tl.constexpr,
    V_SEP: tl.constexpr,
    TRACK: tl.constexpr,
    NPART: tl.constexpr,
    STAGES: tl.constexpr,
    ASM: tl.constexpr,
    UNROLL: tl.constexpr,
    TRANS: tl.constexpr,  # the key dots transposed (``_kdot``)
    I8K: tl.constexpr = False,  # per-channel 2/4-bit keys' dots on int8 tensor cores
):
    """A packed tier of 2-, 4- or 8-bit codes read as int16 elements (keys also of 3 bits, read
    as their 24-bit groups, ``_groups3``), one dot per bit field
    (``_field``: the codes unpacked in the dot operand's registers), with what does not change
    from one page to the next carried across the page loop instead of recomputed per page
    (a first version recomputed it per page: ~30% more instructions per page, session 20):

    * the keys' stacked query operands: per-channel keys' (``q * s`` of the segment, hi/lo
      parts, the common row scale, ``q · o``) once per run of pages of one segment (the loop
      is nested: runs, found from the block table, then their pages, where the operands are
      loop-invariant and stay in the dot operand's registers; a segment spans many pages: a
      prefill's whole tier, or ``key_block`` rows); grouped per-token keys' once, before the
      loops;
    * the values' accumulators are the dots' own accumulators (``tl.dot(a, codes, acc)``: no
      elementwise pass over them per page). What a page changed is applied to them only when
      it changes, behind one branch per page, the same for the whole warp: the softmax
      rescaling when a row's running maximum grows (rare after the first pages), the rows'
      power-of-two operand scale when a page's ``p * s`` needs a smaller one (kept, not
      re-fitted per page: the scale only shrinks, so nothing overflows fp16 and what is
      lost to it is below 2^-24 of the largest term), and the separable value factor when
      the segment changes (the accumulators are held divided by the segment's factor; the
      offsets' part, per row and group, is folded in then);
    * the offsets' part ``Σ p o`` as one value per row and group, added at the end.
    """
    s64 = s.to(tl.int64)
    cap64 = cap.to(tl.int64)
    rows = tl.arange(0, RP)
    row_ok = rows < ROWS
    # Fields per element and elements per row: int16 elements, or 3-bit rows' 24-bit groups.
    KF: tl.constexpr = 8 if K_BITS == 3 else 16 // K_BITS
    KNE: tl.constexpr = D // KF
    VFN: tl.constexpr = 16 // V_BITS
    VNE: tl.constexpr = D // VFN
    ke = tl.arange(0, KNE)
    ve = tl.arange(0, VNE)
    if I8K:
        NB: tl.constexpr = 2 * KNE  # code bytes a row
        be = tl.arange(0, NB)
    b = s // kv_heads
    h = s % kv_heads
    G: tl.constexpr = ROWS // TQ
    head = h * G + rows // TQ
    qi = rows % TQ
    qoff = b.to(tl.int64) * sqb + head.to(tl.int64) * sqh + qi.to(tl.int64) * sqt
    qrow = Q + qoff[:, None]
    if QPOS_RANGE:
        qpos = tl.where(row_ok, qpos0 + qi, -1)
    else:
        qpos = tl.load(QPOS + qi, mask=row_ok, other=-1)
    fv = tl.load(FV + b)
    if TQ == 1:
        # A position p is visible iff 0 <= p - fv < qtop - fv + 1, one unsigned compare (p < fv
        # wraps past the span; holes are -1); a query before fv has an empty span.
        if QPOS_RANGE:
            qtop = qpos0
        else:
            qtop = tl.load(QPOS)
        q_span = tl.maximum(qtop - fv + 1, 0).to(tl.uint32, bitcast=True)

    m_i = tl.full([RP], float("-inf"), tl.float32)
    l_i = tl.full([RP], 0.0, tl.float32)
    VG: tl.constexpr = D // V_GS
    vg = tl.arange(0, VG)
    NPV: tl.constexpr = NPART if NPART * VG * RP >= 16 else 16 // (VG * RP)
    MS: tl.constexpr = NPV * VG * RP  # rows of the values' stacked operand
    vpart = tl.arange(0, NPV)[:, None]
    # The values' stacked rows (part, group, row) hold sum_t (p s r)_t code_t for the rows'
    # power-of-two scale r [VG * RP] (2^126 until a page sets it: every accumulator is 0).
    acc0 = tl.full([MS, VNE], 0.0, tl.float32)
    acc1 = tl.full([MS, VNE], 0.0, tl.float32)
    if VFN > 2:
        acc2 = tl.full([MS, VNE], 0.0, tl.float32)
        acc3 = tl.full([MS, VNE], 0.0, tl.float32)
    if VFN > 4:
        acc4 = tl.full([MS, VNE], 0.0, tl.float32)
        acc5 = tl.full([MS, VNE], 0.0, tl.float32)
        acc6 = tl.full([MS, VNE], 0.0, tl.float32)
        acc7 = tl.full([MS, VNE], 0.0, tl.float32)
    vr = tl.full([VG * RP], 8.507059173023462e37, tl.float32)
    po_acc = tl.full([VG * RP], 0.0, tl.float32)
    l_p = tl.full([RP, 8], 0.0, tl.float32)
    o_p = tl.full([RP, 8], 0.0, tl.float32)

    # ---- the keys' query operands, one per field: grouped per-token keys' here, per-channel
    # keys' per run of pages of one segment (below)
    KG: tl.constexpr = D // K_GS
    # Parts of the stacked query operands: hi and lo, padded with zero blocks to the mma's 16
    # rows where they are the key dot's M; transposed (TRANS) they are its N: no padding.
    NPC: tl.constexpr = NPART if TRANS or NPART * RP >= 16 else 16 // RP  # per-channel keys'
    NPK: tl.constexpr = NPART if TRANS or NPART * KG * RP >= 16 else 16 // (KG * RP)  # grouped'
    KM: tl.constexpr = NPC * RP if K_MODE == CHANNEL else NPK * KG * RP  # operand rows
    if K_MODE != CHANNEL:
        kg = tl.arange(0, KG)
        qr, kinv, qg_sum = _ktoken_scale(qrow, sqd, row_ok, qscale, KFIX, s64, ke, kg, D, K_FIX,
                                         KF, K_GS, KG, RP, KNE)  # fmt: skip
        qg_sum3 = tl.reshape(qg_sum, (KG, RP))
        k0 = _ktoken_op(qrow, sqd, row_ok, qscale, KFIX, s64, ke, kg, qr, 0, D, K_FIX, KF,
                        K_GS, KG, RP, KNE, NPK, NPART, TRANS)  # fmt: skip
        k1 = _ktoken_op(qrow, sqd, row_ok, qscale, KFIX, s64, ke, kg, qr, 1, D, K_FIX, KF,
                        K_GS, KG, RP, KNE, NPK, NPART, TRANS)  # fmt: skip
        if KF > 2:
            k2 = _ktoken_op(qrow, sqd, row_ok, qscale, KFIX, s64, ke, kg, qr, 2, D, K_FIX, KF,
                            K_GS, KG, RP, KNE, NPK, NPART, TRANS)  # fmt: skip
            k3 = _ktoken_op(qrow, sqd, row_ok, qscale, KFIX, s64, ke, kg, qr, 3, D, K_FIX, KF,
                            K_GS, KG, RP, KNE, NPK, NPART, TRANS)  # fmt: skip
        if KF > 4:
            k4 = _ktoken_op(qrow, sqd, row_ok, qscale, KFIX, s64, ke, kg, qr, 4, D, K_FIX, KF,
                            K_GS, KG, RP, KNE, NPK, NPART, TRANS)  # fmt: skip
            k5 = _ktoken_op(qrow, sqd, row_ok, qscale, KFIX, s64, ke, kg, qr, 5, D, K_FIX, KF,
                            K_GS, KG, RP, KNE, NPK, NPART, TRANS)  # fmt: skip
            k6 = _ktoken_op(qrow, sqd, row_ok, qscale, KFIX, s64, ke, kg, qr, 6, D, K_FIX, KF,
                            K_GS, KG, RP, KNE, NPK, NPART, TRANS)  # fmt: skip
            k7 = _ktoken_op(qrow, sqd, row_ok, qscale, KFIX, s64, ke, kg, qr, 7, D, K_FIX, KF,
                            K_GS, KG, RP, KNE, NPK, NPART, TRANS)  # fmt: skip

    p_lo = split * pages_per_split
    p_hi = tl.minimum(p_lo + pages_per_split, n_pages)
    SEGD: tl.constexpr = K_MODE == CHANNEL or V_SEP
    # The split's pages in runs of one segment (a segmented tier's blocks; an unsegmented
    # tier is one run): what depends on the segment is set up once per run, and the page
    # loop inside a run has loop-invariant key operands, which the compiler keeps in the
    # dot operand's registers.
    cur = s64 * 0 - 1  # the segment of the last run (none yet)
    run = p_lo
    while run < p_hi:
        if SEGD:
            seg = tl.load(SEG + 2 * run + 1).to(tl.int64)
            # The run: the blocks after ``run`` of the same segment that each continue on the
            # next page (a block starting on a page boundary: a segment's rows are cut only
            # there), so that block ``run + i`` lies in the page ``i`` after the first
            # block's and the run's rows are [r0, r1). The page loop computes its rows from
            # these instead of loading each block's entry (a synchronous load, one every
            # page, whose result the next page's addresses waited on). Searched RUNW blocks
            # a load: one block a load was a chain of dependent loads before every run.
            RUNW: tl.constexpr = 32
            end = run + 1
            more = end < p_hi
            while more:
                nb = end + tl.arange(0, RUNW)
                nb_ok = nb < p_hi
                same = (
                    nb_ok
                    & (tl.load(SEG + 2 * nb + 1, mask=nb_ok, other=-1) == seg)
                    & (tl.load(SEG + 2 * nb, mask=nb_ok, other=1) % BLOCK_N == 0)
                )
                n_same = RUNW - _max(tl.where(same, 0, RUNW - tl.arange(0, RUNW)), 0)
                end += n_same
                more = (n_same == RUNW) & (end < p_hi)
            sb = (s64 * nseg + seg) * D
            r0 = tl.load(SEG + 2 * run)
            r1 = tl.load(SEG + 2 * end)
            t0 = (r0 // BLOCK_N) * BLOCK_N
            if I8K:
                kinv, kqo, k0, k1, k2, k3 = _kchannel_i8(qrow, sqd, row_ok, qscale, KFIX, s64,
                                                         KS, KO, sb, rows, be, D, K_FIX,
                                                         K_BITS, KF, RP, NB)  # fmt: skip
            elif K_MODE == CHANNEL:
                ar, kinv, kqo = _kchannel_scale(qrow, sqd, row_ok, qscale, KFIX, s64, KS, KO, sb,
                                                rows, ke, D, K_FIX, KF, RP, KNE)  # fmt: skip
                k0 = _kchannel_op(qrow, sqd, row_ok, qscale, KFIX, s64, KS, sb, rows, ke, ar, 0,
                                  D, K_FIX, KF, RP, KNE, NPC, NPART, TRANS)  # fmt: skip
                k1 = _kchannel_op(qrow, sqd, row_ok, qscale, KFIX, s64, KS, sb, rows, ke, ar, 1,
                                  D, K_FIX, KF, RP, KNE, NPC, NPART, TRANS)  # fmt: skip
                if KF > 2:
                    k2 = _kchannel_op(qrow, sqd, row_ok, qscale, KFIX, s64, KS, sb, rows, ke, ar,
                                      2, D, K_FIX, KF, RP, KNE, NPC, NPART, TRANS)  # fmt: skip
                    k3 = _kchannel_op(qrow, sqd, row_ok, qscale, KFIX, s64, KS, sb, rows, ke, ar,
                                      3, D, K_FIX, KF, RP, KNE, NPC, NPART, TRANS)  # fmt: skip
                if KF > 4:
                    k4 = _kchannel_op(qrow, sqd, row_ok, qscale, KFIX, s64, KS, sb, rows, ke, ar,
                                      4, D, K_FIX, KF, RP, KNE, NPC, NPART, TRANS)  # fmt: skip
                    k5 = _kchannel_op(qrow, sqd, row_ok, qscale, KFIX, s64, KS, sb, rows, ke, ar,
                                      5, D, K_FIX, KF, RP, KNE, NPC, NPART, TRANS)  # fmt: skip
                    k6 = _kchannel_op(qrow, sqd, row_ok, qscale, KFIX, s64, KS, sb, rows, ke, ar,
                                      6, D, K_FIX, KF, RP, KNE, NPC, NPART, TRANS)  # fmt: skip
                    k7 = _kchannel_op(qrow, sqd, row_ok, qscale, KFIX, s64, KS, sb, rows, ke, ar,
                                      7, D, K_FIX, KF, RP, KNE, NPC, NPART, TRANS)  # fmt: skip
            if V_SEP:
                # Fold the offsets' part in (it takes the old factor too), then hold the
                # accumulators divided by the new segment's factor (the old one is reloaded
                # rather than carried: registers are what the loop is short of).
                # Nothing to fold at a program's first run: its accumulators are 0 (a
                # ZipCache program has a single run, so it never folds).
                if cur >= 0:
                    if VG == 1:
                        po_acc = _sum(o_p, 1)
                        o_p = o_p * 0.0
                    po_s = tl.reshape(tl.where(vpart == 0, (po_acc * vr)[None, :], 0.0), (MS,))
                    old_b = (s64 * nseg + cur) * D
                    fch = ve[:, None] * VFN + tl.arange(0, VFN)[None, :]  # [VNE, VFN]
                    ratio = (tl.load(VF + old_b + fch).to(tl.float32)
                             / tl.load(VF + sb + fch).to(tl.float32))  # fmt: skip
                    acc0 = _vsegment(acc0, po_s, ratio, 0, VFN)
                    acc1 = _vsegment(acc1, po_s, ratio, 1, VFN)
                    if VFN > 2:
                        acc2 = _vsegment(acc2, po_s, ratio, 2, VFN)
                        acc3 = _vsegment(acc3, po_s, ratio, 3, VFN)
                    if VFN > 4:
                        acc4 = _vsegment(acc4, po_s, ratio, 4, VFN)
                        acc5 = _vsegment(acc5, po_s, ratio, 5, VFN)
                        acc6 = _vsegment(acc6, po_s, ratio, 6, VFN)
                        acc7 = _vsegment(acc7, po_s, ratio, 7, VFN)
                    po_acc = po_acc * 0.0
            cur = seg
        else:
            end = p_hi
            t0 = run * BLOCK_N
        # The run's first page's rows and the pointers of its tiles, from which each page's
        # are one scalar offset away: per-page 64-bit address arithmetic on every element
        # was ~40 SASS instructions a page (Triton 3.6, sm_90), now one IMAD.WIDE a load.
        jn = tl.arange(0, BLOCK_N)
        rowb = s64 * cap64 + t0 + jn
        # A row's key words: 32-bit (3-bit rows, every third word: ``_groups3``) or int16.
        KW: tl.constexpr = 3 * KNE // 4 if K_BITS == 3 else KNE
        if K_BITS == 3:
            kb = (KD.to(tl.pointer_type(tl.int32)) + rowb[:, None] * KW
                  + 3 * tl.arange(0, KNE // 4)[None, :])  # fmt: skip
        else:
            kb = KD + rowb[:, None] * KW + ke[None, :]
        vb = VD + rowb[:, None] * VNE + ve[None, :]
        for page in tl.range(run, end, num_stages=STAGES, loop_unroll_factor=UNROLL):
            off = (page - run) * BLOCK_N
            t = t0 + off + jn
            if SEGD:  # the page's rows of this run (``_block_rows``' test)
                mine = (t - r0).to(tl.uint32, bitcast=True) < (r1 - r0).to(tl.uint32, bitcast=True)
            row = rowb + off  # (the grouped layouts' scales)
            pos = tl.load(POS + rowb + off)
            if K_BITS == 3:
                kp, kq = _groups3(kb + off * KW, KNE)  # int16 [N, KNE] x 2
            else:
                kp = tl.load(kb + off * KW)  # int16 [N, KNE]
                kq = kp
            vp = tl.load(vb + off * VNE)  # int16 [N, VNE]
            # ---- keys: logits [RP, BLOCK_N] (base 2, scaled)
            if I8K:
                yi = tl.full([BLOCK_N, 4 * RP], 0, tl.int32)
                yi = _i8_dot(kp, k0, yi, K_BITS, 0, ASM)
                yi = _i8_dot(kp, k1, yi, K_BITS, 1, ASM)
                if K_BITS == 2:
                    yi = _i8_dot(kp, k2, yi, K_BITS, 2, ASM)
                    yi = _i8_dot(kp, k3, yi, K_BITS, 3, ASM)
                logits = _i8_logits(yi, RP, BLOCK_N) * kinv[:, None] + kqo[:, None]
            else:
                y = _kacc(KM, BLOCK_N, TRANS)
                y = _kdot(k0, _kfield(kp, kq, K_BITS, 0, ASM), y, TRANS)
                y = _kdot(k1, _kfield(kp, kq, K_BITS, 1, ASM), y, TRANS)
                if KF > 2:
                    y = _kdot(k2, _kfield(kp, kq, K_BITS, 2, ASM), y, TRANS)
                    y = _kdot(k3, _kfield(kp, kq, K_BITS, 3, ASM), y, TRANS)
                if KF > 4:
                    y = _kdot(k4, _kfield(kp, kq, K_BITS, 4, ASM), y, TRANS)
                    y = _kdot(k5, _kfield(kp, kq, K_BITS, 5, ASM), y, TRANS)
                    y = _kdot(k6, _kfield(kp, kq, K_BITS, 6, ASM), y, TRANS)
                    y = _kdot(k7, _kfield(kp, kq, K_BITS, 7, ASM), y, TRANS)
                if TRANS:
                    y = tl.trans(y)
                if K_MODE == CHANNEL:
                    logits = _unstack(y, RP, BLOCK_N, NPC, TRANS) * kinv[:, None] + kqo[:, None]
                else:
                    dots = _unstack(y, KG * RP, BLOCK_N, NPK, TRANS) * kinv[:, None]
                    dots = tl.reshape(dots, (KG, RP, BLOCK_N))
                    sc = tl.load(KS + row[None, :] * KG + kg[:, None]).to(tl.float32)  # [KG, N]
                    of = tl.load(KO + row[None, :] * KG + kg[:, None]).to(tl.float32)
                    logits = _sum(dots * sc[:, None, :] + qg_sum3[:, :, None] * of[:, None, :], 0)
            if TQ == 1:
                # One query: a token is visible to every row or to none.
                vis = (pos - fv).to(tl.uint32, bitcast=True) < q_span
                if SEGD:  # the page's rows of other blocks are not this block's
                    vis = vis & mine
                # (Padding rows, past ROWS, need no mask: their query is 0, so their logits
                # are finite, and nothing of theirs is stored.)
                visible = vis[None, :]
            else:
                if SEGD:
                    pos = tl.where(mine, pos, -1)
                visible = (pos[None, :] >= fv) & (pos[None, :] <= qpos[:, None]) & row_ok[:, None]
            logits = tl.where(visible, logits, float("-inf"))
            if TRACK:
                lg_ok = row_ok[:, None]
                if SEGD:  # the page's rows of other blocks are theirs to write
                    lg_ok = lg_ok & mine[None, :]
                tl.store(
                    LG + (s64 * ROWS + rows[:, None]) * cap64 + t[None, :].to(tl.int64),
                    logits,
                    mask=lg_ok,
                )
            m_new = tl.maximum(m_i, _max(logits, 1))
            m_safe = tl.where(m_new == float("-inf"), 0.0, m_new)
            p = tl.exp2(logits - m_safe[:, None])
            # ---- values: p times the tokens' scales, per group, as stacked rows
            if VG == 1:
                # One group (ZipCache's and kvmix-5x's values): the scales and offsets as
                # [N] vectors in p's own layout. The [VG, N] form's reshape made Triton move
                # p to another layout and reduce the offsets' sums over the whole warp
                # (4 x 5 shuffles and a trip through shared memory a page).
                sc1 = tl.load(VS + rowb + off).to(tl.float32)
                of1 = tl.load(VO + rowb + off).to(tl.float32)
                ps = p * sc1[None, :]
            else:
                sc = tl.load(VS + row[None, :] * VG + vg[:, None]).to(tl.float32)  # [VG, N]
                of = tl.load(VO + row[None, :] * VG + vg[:, None]).to(tl.float32)
                ps = tl.reshape(p[None, :, :] * sc[:, None, :], (VG * RP, BLOCK_N))
            r_page, _ = _row_scale(_max(tl.abs(ps), 1))
            r_new = tl.minimum(vr, r_page)
            if VG == 1:  # one flag, one reduction over the rows (two shuffles)
                grow = _max(tl.where((m_new > m_i) | (r_new < vr), 1, 0), 0)
            else:
                grow = _max(tl.where(m_new > m_i, 1, 0), 0) + _max(tl.where(r_new < vr, 1, 0), 0)
            if grow > 0:
                # What the accumulators hold is rescaled only when it changes: exp2(m_old -
                # m_new) (0 for a row's first visible page: its accumulators are 0), times
                # the ratio of the operand scales (powers of two).
                alpha = tl.exp2(m_i - m_safe)
                alpha_g = tl.reshape(tl.broadcast_to(alpha[None, :], (VG, RP)), (VG * RP,))
                f_g = alpha_g * (r_new * _pow2_inv(vr))
                f_s = tl.reshape(tl.broadcast_to(f_g[None, :], (NPV, VG * RP)), (MS,))
                acc0 = acc0 * f_s[:, None]
                acc1 = acc1 * f_s[:, None]
                if VFN > 2:
                    acc2 = acc2 * f_s[:, None]
                    acc3 = acc3 * f_s[:, None]
                if VFN > 4:
                    acc4 = acc4 * f_s[:, None]
                    acc5 = acc5 * f_s[:, None]
                    acc6 = acc6 * f_s[:, None]
                    acc7 = acc7 * f_s[:, None]
                if VG == 1:
                    l_p = l_p * alpha[:, None]
                    o_p = o_p * alpha[:, None]
                else:
                    l_i = l_i * alpha
                    po_acc = po_acc * alpha_g
                m_i = m_new
                vr = r_new
            if VG == 1:
                l_p += _sum(tl.reshape(p, (RP, BLOCK_N // 8, 8)), 1)
                o_p += _sum(tl.reshape(p * of1[None, :], (RP, BLOCK_N // 8, 8)), 1)
            else:
                l_i += _sum(p, 1)
                po_acc += tl.reshape(_sum(p[None, :, :] * of[:, None, :], 2), (VG * RP,))
            a = _stack_scaled(ps, vr, VG * RP, BLOCK_N, NPV, NPART)
            acc0 = tl.dot(a, _field(vp, V_BITS, 0, ASM), acc0)
            acc1 = tl.dot(a, _field(vp, V_BITS, 1, ASM), acc1)
            if VFN > 2:
                acc2 = tl.dot(a, _field(vp, V_BITS, 2, ASM), acc2)
                acc3 = tl.dot(a, _field(vp, V_BITS, 3, ASM), acc3)
            if VFN > 4:
                acc4 = tl.dot(a, _field(vp, V_BITS, 4, ASM), acc4)
                acc5 = tl.dot(a, _field(vp, V_BITS, 5, ASM), acc5)
                acc6 = tl.dot(a, _field(vp, V_BITS, 6, ASM), acc6)
                acc7 = tl.dot(a, _field(vp, V_BITS, 7, ASM), acc7)
        run = end

    if VG == 1:
        l_i = _sum(l_p, 1)
        po_acc = _sum(o_p, 1)
    out = (s64 * n_split + out_split) * ROWS + rows
    tl.store(PM + out, m_i, mask=row_ok)
    tl.store(PL + out, l_i, mask=row_ok)
    ob = PACC + out[:, None] * D
    inv_s = tl.reshape(tl.broadcast_to(_pow2_inv(vr)[None, :], (NPV, VG * RP)), (MS,))
    # The last segment's factor (V_SEP; a split without pages never had one: its
    # accumulators are 0).
    fb = (s64 * nseg + tl.maximum(cur, 0)) * D
    # The fields' accumulators hold every VFN-th channel: interleaved back into channel order
    # in registers, so that the partials are stored a row at a time (a field's own store wrote
    # 4 * VFN bytes apart, a sector per value: 1.15M of the launch's 1.49M excess sectors,
    # session 26's profile).
    MV: tl.constexpr = VG * RP
    x0 = _vparts(acc0, inv_s, NPV, MV, VNE)
    x1 = _vparts(acc1, inv_s, NPV, MV, VNE)
    if VFN == 2:
        x = tl.join(x0, x1)
    elif VFN == 4:
        x2 = _vparts(acc2, inv_s, NPV, MV, VNE)
        x3 = _vparts(acc3, inv_s, NPV, MV, VNE)
        x = tl.join(tl.join(x0, x2), tl.join(x1, x3))
    else:
        x2 = _vparts(acc2, inv_s, NPV, MV, VNE)
        x3 = _vparts(acc3, inv_s, NPV, MV, VNE)
        x4 = _vparts(acc4, inv_s, NPV, MV, VNE)
        x5 = _vparts(acc5, inv_s, NPV, MV, VNE)
        x6 = _vparts(acc6, inv_s, NPV, MV, VNE)
        x7 = _vparts(acc7, inv_s, NPV, MV, VNE)
        x = tl.join(
            tl.join(tl.join(x0, x4), tl.join(x2, x6)), tl.join(tl.join(x1, x5), tl.join(x3, x7))
        )
    _vstore(ob, tl.reshape(x, (MV, D)), po_acc, VF, fb, row_ok, RP, VG, V_GS, D, V_SEP)


@triton.jit
def _vsegment(acc, po_s, ratio, F: tl.constexpr, VFN: tl.constexpr):
    """Value field ``F``'s accumulator at a segment change: the offsets' part folded in, then
    held divided by the new segment's factor: times ``ratio [VNE, VFN]``, the old segment's
    factors over the new one's (channel ``e * VFN + f``; factors are floored at fp16's
    smallest normal: nonzero), its column ``F`` selected. The ratio is loaded and divided
    once for every field, a channel a thread (a field's own ``[VNE]`` vectors were 8 scalar
    loads and 4 divisions a thread per field: 536 -> 250 SASS instructions a fold for
    kvmix-5x's 2-bit values, session 29)."""
    f = tl.arange(0, VFN)[None, :]
    return (acc + po_s[:, None]) * _sum(tl.where(f == F, ratio, 0.0), 1)[None, :]


@triton.jit
def _vparts(acc, inv_s, NPV: tl.constexpr, MV: tl.constexpr, VNE: tl.constexpr):
    """A value field's carried accumulator ``[NPV * MV, VNE]`` unscaled and summed over its
    parts: ``[MV, VNE]``."""
    return _sum(tl.reshape(acc * inv_s[:, None], (NPV, MV, VNE)), 0)


@triton.jit
def _kacc(M: tl.constexpr, N: tl.constexpr, TRANS: tl.constexpr):
    """The logits' zero accumulator ``[M, N]``, or with ``TRANS`` ``[N, M]``."""
    if TRANS:
        out = tl.full([N, M], 0.0, tl.float32)
    else:
        out = tl.full([M, N], 0.0, tl.float32)
    return out


@triton.jit
def _kdot(k, field, y, TRANS: tl.constexpr):
    """One field's key dot added to the logits' accumulator: the stacked query operand ``k
    [KM, K]`` times the page's codes ``field [N, K]`` transposed, ``y [KM, N]``; with
    ``TRANS`` the same transposed, ``field @ k^T`` into ``y [N, KM]``: the page's tokens are
    the mma's M (64 rows, no padding) and the query rows its N (an mma takes 8), where the
    other way round the 8 rows of 4 queries' hi and lo parts were padded to 16."""
    if TRANS:
        out = tl.dot(field, tl.trans(k), y)
    else:
        out = tl.dot(k, tl.trans(field), y)
    return out


@triton.jit
def _vstore(ob, x, po, VF, fb, row_ok, RP: tl.constexpr, VG: tl.constexpr, V_GS: tl.constexpr,
            D: tl.constexpr, V_SEP: tl.constexpr):  # fmt: skip
    """The values' partial output from ``x [VG * RP, D]`` (channel order): plus the offsets'
    part, each channel from its own group, times the segment's factor, stored a row at a
    time."""
    j = tl.arange(0, D)
    x = x + po[:, None]
    if VG > 1:
        vsel = (j // V_GS)[None, None, :] == tl.arange(0, VG)[:, None, None]
        x = _sum(tl.where(vsel, tl.reshape(x, (VG, RP, D)), 0.0), 0)
    if V_SEP:
        x = x * tl.load(VF + fb + j).to(tl.float32)[None, :]
    tl.store(ob + j[None, :], x, mask=row_ok[:, None])


@triton.jit
def _split16(x):
    """fp32 ``x [R, K]`` as fp16 ``hi`` and ``lo`` parts of its rows scaled by powers of two
    (no overflow, nothing lost to fp16's range), and the inverse scales ``[R]``."""
    amax = _max(tl.abs(x), 1)
    e = (amax.to(tl.int32, bitcast=True) >> 23) & 0xFF
    re = tl.minimum(tl.maximum(268 - e, 1), 253)
    r = (re << 23).to(tl.float32, bitcast=True)
    inv = ((254 - re) << 23).to(tl.float32, bitcast=True)
    xs = x * r[:, None]
    hi = xs.to(tl.float16)
    lo = (xs - hi.to(tl.float32)).to(tl.float16)
    return hi, lo, inv


@triton.jit
def _dot_exact(x, codes, NPART: tl.constexpr):
    """``x [R, K] @ codes [K, N]`` for fp32 ``x`` and exact fp16 ``codes``: fp16 tensor-core
    dots of ``x``'s hi (and lo) parts, fp32 accumulation."""
    hi, lo, inv = _split16(x)
    y = tl.dot(hi, codes)
    if NPART == 2:
        y = tl.dot(lo, codes, y)
    return y * inv[:, None]


@triton.jit
def _tier_flat(
    Q,
    sqb,
    sqh,
    sqt,
    sqd,
    qscale,
    QPOS,
    qpos0,
    FV,
    KFIX,
    POS,
    KD,
    KS,
    KO,
    SEG,
    VD,
    VS,
    VO,
    VF,
    LG,
    PM,
    PL,
    PACC,
    s,
    split,  # this program's split within the tier
    out_split,  # and among every tier's splits (where its partials go)
    cap,
    n_pages,
    pages_per_split,
    n_split,
    nseg,
    kv_heads,
    ROWS: tl.constexpr,
    RP: tl.constexpr,
    TQ: tl.constexpr,
    D: tl.constexpr,
    BLOCK_N: tl.constexpr,
    QPOS_RANGE: tl.constexpr,
    K_MODE: tl.constexpr,
    K_BITS: tl.constexpr,
    K_GS: tl.constexpr,
    K_WB: tl.constexpr,
    K_FIX: tl.constexpr,
    V_MODE: tl.constexpr,
    V_BITS: tl.constexpr,
    V_GS: tl.constexpr,
    V_WB: tl.constexpr,
    V_SEP: tl.constexpr,
    TRACK: tl.constexpr,
    NPART: tl.constexpr,
    MAGIC: tl.constexpr,
    BCAST: tl.constexpr,
    STAGES: tl.constexpr,
):
    """``_tier_stacked`` with every tile two-dimensional: the ``R >= 16`` rows tl.dot needs
    repeat the ``RP`` query rows (row ``i`` is query row ``i % RP``), and the hi/lo parts are
    two dots accumulating into one result, so no tile is reshaped (each reshape or 3-D
    broadcast is a trip through shared memory)."""
    s64 = s.to(tl.int64)
    cap64 = cap.to(tl.int64)
    R: tl.constexpr = 16 if RP < 16 else RP
    ri = tl.arange(0, R)
    rows = ri % RP
    row_ok = rows < ROWS
    first = ri < ROWS  # the rows written out (one copy of each query row)
    kch = _channel_order(D, K_MODE, K_BITS, K_WB, BCAST)
    vch = _channel_order(D, V_MODE, V_BITS, V_WB, BCAST)
    b = s // kv_heads
    h = s % kv_heads
    G: tl.constexpr = ROWS // TQ
    head = h * G + rows // TQ
    qi = rows % TQ
    qoff = b.to(tl.int64) * sqb + head.to(tl.int64) * sqh + qi.to(tl.int64) * sqt
    q = tl.load(
        Q + qoff[:, None] + kch[None, :].to(tl.int64) * sqd, mask=row_ok[:, None], other=0.0
    )
    q = q.to(tl.float32) * qscale
    if K_FIX:
        q = q * tl.load(KFIX + s64 * D + kch).to(tl.float32)[None, :]
    if QPOS_RANGE:
        qpos = tl.where(row_ok, qpos0 + qi, -1)
    else:
        qpos = tl.load(QPOS + qi, mask=row_ok, other=-1)
    fv = tl.load(FV + b)

    m_i = tl.full([R], float("-inf"), tl.float32)
    l_i = tl.full([R], 0.0, tl.float32)
    acc = tl.full([R, D], 0.0, tl.float32)
    NSL: tl.constexpr = 1 if K_MODE == DENSE or V_MODE == DENSE else STAGES
    p_lo = split * pages_per_split
    p_hi = tl.minimum(p_lo + pages_per_split, n_pages)
    # A segmented tier is walked by its blocks (one segment's rows each), others by pages.
    SEGD: tl.constexpr = K_MODE == CHANNEL or V_SEP
    for page in tl.range(p_lo, p_hi, num_stages=NSL):
        if SEGD:
            t, seg, mine = _block_rows(SEG, page, BLOCK_N)
        else:
            t = page * BLOCK_N + tl.arange(0, BLOCK_N)
        row = s64 * cap64 + t.to(tl.int64)
        pos = tl.load(POS + row)
        if SEGD:  # the page's rows of other blocks are holes to this block
            pos = tl.where(mine, pos, -1)
        if K_MODE == DENSE:
            k = tl.load(KD + row[:, None] * D + kch[None, :]).to(tl.float32)
            logits = tl.dot(q, tl.trans(k), input_precision="ieee")
        elif K_MODE == CHANNEL:
            codes = tl.trans(_codes(KD, row, D, K_BITS, K_WB, MAGIC, BCAST))
            ks = tl.load(KS + (s64 * nseg + seg) * D + kch).to(tl.float32)
            ko = tl.load(KO + (s64 * nseg + seg) * D + kch).to(tl.float32)
            logits = _dot_exact(q * ks[None, :], codes, NPART)
            logits += _sum(q * ko[None, :], 1)[:, None]
        else:
            codes = tl.trans(_codes(KD, row, D, K_BITS, K_WB, MAGIC, BCAST))
            KG: tl.constexpr = D // K_GS
            logits = tl.full([R, BLOCK_N], 0.0, tl.float32)
            for g in tl.static_range(KG):
                qg = tl.where((kch // K_GS == g)[None, :], q, 0.0)
                sc = tl.load(KS + row * KG + g).to(tl.float32)
                of = tl.load(KO + row * KG + g).to(tl.float32)
                logits += _dot_exact(qg, codes, NPART) * sc[None, :]
                logits += _sum(qg, 1)[:, None] * of[None, :]
        visible = (pos[None, :] >= fv) & (pos[None, :] <= qpos[:, None]) & row_ok[:, None]
        logits = tl.where(visible, logits, float("-inf"))
        if TRACK:
            lg_ok = row_ok[:, None]
            if SEGD:  # the page's rows of other blocks are theirs to write
                lg_ok = lg_ok & mine[None, :]
            tl.store(
                LG + (s64 * ROWS + ri[:, None]) * cap64 + t[None, :].to(tl.int64),
                logits,
                mask=lg_ok & first[:, None],
            )
        m_new = tl.maximum(m_i, _max(logits, 1))
        m_safe = tl.where(m_new == float("-inf"), 0.0, m_new)
        p = tl.exp2(logits - m_safe[:, None])
        alpha = tl.exp2(m_i - m_safe)
        l_i = l_i * alpha + _sum(p, 1)
        m_i = m_new
        if V_MODE == DENSE:
            v = tl.load(VD + row[:, None] * D + vch[None, :]).to(tl.float32)
            contrib = tl.dot(p, v, input_precision="ieee")
        else:
            codes = _codes(VD, row, D, V_BITS, V_WB, MAGIC, BCAST)
            VG: tl.constexpr = D // V_GS
            contrib = tl.full([R, D], 0.0, tl.float32)
            for g in tl.static_range(VG):
                sc = tl.load(VS + row * VG + g).to(tl.float32)
                of = tl.load(VO + row * VG + g).to(tl.float32)
                c = _dot_exact(p * sc[None, :], codes, NPART)
                c += _sum(p * of[None, :], 1)[:, None]
                if VG == 1:
                    contrib += c
                else:
                    contrib += tl.where((vch // V_GS == g)[None, :], c, 0.0)
            if V_SEP:
                vf = tl.load(VF + (s64 * nseg + seg) * D + vch).to(tl.float32)
                contrib = contrib * vf[None, :]
        acc = acc * alpha[:, None] + contrib

    out = (s64 * n_split + out_split) * ROWS + ri
    tl.store(PM + out, m_i, mask=first)
    tl.store(PL + out, l_i, mask=first)
    tl.store(PACC + out[:, None] * D + vch[None, :], acc, mask=first[:, None])


@triton.jit
def _tier(
    Q,
    sqb,
    sqh,
    sqt,
    sqd,
    qscale,
    QPOS,
    qpos0,
    FV,
    KFIX,
    POS,
    KD,
    KS,
    KO,
    SEG,
    VD,
    VS,
    VO,
    VF,
    LG,
    PM,
    PL,
    PACC,
    s,
    split,  # this program's split within the tier
    out_split,  # and among every tier's splits (where its partials go)
    cap,
    n_pages,
    pages_per_split,
    n_split,
    nseg,
    kv_heads,
    ROWS: tl.constexpr,
    RP: tl.constexpr,
    TQ: tl.constexpr,
    D: tl.constexpr,
    BLOCK_N: tl.constexpr,
    QPOS_RANGE: tl.constexpr,
    K_MODE: tl.constexpr,
    K_BITS: tl.constexpr,
    K_GS: tl.constexpr,
    K_WB: tl.constexpr,
    K_FIX: tl.constexpr,
    V_MODE: tl.constexpr,
    V_BITS: tl.constexpr,
    V_GS: tl.constexpr,
    V_WB: tl.constexpr,
    V_SEP: tl.constexpr,
    TRACK: tl.constexpr,
    NPART: tl.constexpr,
    MAGIC: tl.constexpr,
    BCAST: tl.constexpr,
    STAGES: tl.constexpr,
    FLAT: tl.constexpr,
    FIELDS: tl.constexpr,
    UNROLL: tl.constexpr,  # the field path's page loop unrolled this many times
):
    # The field path (``_tier_fields``; FIELDS 1: plain unpacking, 2: inline PTX, plus 4:
    # the key dots transposed, 8: int8 key dots) takes
    # packed tiers of 2, 4 or 8 bits (keys also of 3) whose rows give each field's dot at
    # least 16 elements (tl.dot's smallest size): D * bits / 16, or D / 8 for 3 bits, which
    # for D a power of two (as the kernels need) is ``bits * D >= 256``; ``_fields_tier`` is
    # the same rule on the host.
    F16_K: tl.constexpr = K_MODE != DENSE and K_BITS != 1 and K_BITS * D >= 256
    F16_V: tl.constexpr = V_MODE == TOKEN and V_BITS != 1 and V_BITS != 3 and V_BITS * D >= 256
    if FIELDS and F16_K and F16_V:
        _tier_fields(
            Q, sqb, sqh, sqt, sqd, qscale, QPOS, qpos0, FV, KFIX,
            POS, KD, KS, KO, SEG, VD, VS, VO, VF, LG, PM, PL, PACC,
            s, split, out_split, cap, n_pages, pages_per_split, n_split, nseg, kv_heads,
            ROWS, RP, TQ, D, BLOCK_N, QPOS_RANGE,
            K_MODE, K_BITS, K_GS, K_FIX, V_BITS, V_GS, V_SEP, TRACK, NPART, STAGES,
            (FIELDS & 3) == 2, UNROLL, (FIELDS & 4) != 0,
            (FIELDS & 12) == 12 and K_MODE == CHANNEL and (K_BITS == 2 or K_BITS == 4)
            and RP >= 2,
        )  # fmt: skip
    elif FLAT:
        _tier_flat(
            Q,
            sqb,
            sqh,
            sqt,
            sqd,
            qscale,
            QPOS,
            qpos0,
            FV,
            KFIX,
            POS,
            KD,
            KS,
            KO,
            SEG,
            VD,
            VS,
            VO,
            VF,
            LG,
            PM,
            PL,
            PACC,
            s,
            split,
            out_split,
            cap,
            n_pages,
            pages_per_split,
            n_split,
            nseg,
            kv_heads,
            ROWS,
            RP,
            TQ,
            D,
            BLOCK_N,
            QPOS_RANGE,
            K_MODE,
            K_BITS,
            K_GS,
            K_WB,
            K_FIX,
            V_MODE,
            V_BITS,
            V_GS,
            V_WB,
            V_SEP,
            TRACK,
            NPART,
            MAGIC,
            BCAST,
            STAGES,
        )
    else:
        _tier_stacked(
            Q,
            sqb,
            sqh,
            sqt,
            sqd,
            qscale,
            QPOS,
            qpos0,
            FV,
            KFIX,
            POS,
            KD,
            KS,
            KO,
            SEG,
            VD,
            VS,
            VO,
            VF,
            LG,
            PM,
            PL,
            PACC,
            s,
            split,
            out_split,
            cap,
            n_pages,
            pages_per_split,
            n_split,
            nseg,
            kv_heads,
            ROWS,
            RP,
            TQ,
            D,
            BLOCK_N,
            QPOS_RANGE,
            K_MODE,
            K_BITS,
            K_GS,
            K_WB,
            K_FIX,
            V_MODE,
            V_BITS,
            V_GS,
            V_WB,
            V_SEP,
            TRACK,
            NPART,
            MAGIC,
            BCAST,
            STAGES,
            FIELDS != 0,
        )


@triton.jit
def _rotate_query(
    Q, sqb, sqh, sqt, sqd, ROT, QR, s, kv_heads,
    ROWS: tl.constexpr, RP: tl.constexpr, TQ: tl.constexpr, D: tl.constexpr,
):  # fmt: skip
    """``q @ R`` of stream ``s``'s rows (its GQA group's heads times the queries) in fp32,
    stored at ``QR`` as a contiguous ``[B, Hq, TQ, D]`` tensor would hold them."""
    rows = tl.arange(0, RP)
    ok = rows < ROWS
    G: tl.constexpr = ROWS // TQ
    head = (s % kv_heads) * G + rows // TQ
    qi = rows % TQ
    qoff = (s // kv_heads).to(tl.int64) * sqb + head.to(tl.int64) * sqh + qi.to(tl.int64) * sqt
    c = tl.arange(0, D)
    q = tl.load(Q + qoff[:, None] + c[None, :].to(tl.int64) * sqd, mask=ok[:, None], other=0.0)
    signs = tl.load(ROT + c * D)  # R[:, 0]
    qr = _hadamard(q.to(tl.float32) * signs[None, :], RP, D)
    dst = (s.to(tl.int64) * ROWS + rows[:, None]) * D + c[None, :]
    tl.store(QR + dst, qr, mask=ok[:, None])


# Integer arguments that change between decoding steps are not specialized on (Triton
# specializes an integer on being 1 or a multiple of 16, and each new combination compiles the
# kernel again: ~12 s for this one on an H100's host, twice at the first steps and twice more
# once the buffer's fill passed a page; session 24, gpu/compile_count.py). Capacities are
# multiples of a page, so they stay specialized (aligned loads of the positions).
_STEP_VARYING = (
    "qpos0",
    "n_split",
    "sp0",
    *(f"{n}{i}" for i in range(3) for n in ("pages", "ns", "nseg", "pps")),
)


@triton.jit(do_not_specialize=_STEP_VARYING)
def _attend_kernel(
    Q,
    sqb,
    sqh,
    sqt,
    sqd,
    qscale,
    QPOS,
    qpos0,
    FV,
    PM,
    PL,
    PACC,
    n_split,
    kv_heads,
    sp0,  # the launch's first split (a launch per tier: ``attend_tiers(tier_launches=True)``)
    ROT,  # fp32 [D, D] the store's rotation (ROTATE; only its first column is read)
    QR,  # fp32 [n_split, B, Hq, TQ, D] the rotated queries, a slab per split (ROTATE)
    # The merge in this launch (FUSED): a ticket per stream, and what the merge kernel writes
    TK,  # int32 [S]: 0 before the launch, and again after it (the last program resets it)
    OUT,
    MF,
    LF,
    sob,
    soh,
    sot,
    sod,
    # tier 0 (buffer); each tier's pages (of its BN rows) per split
    POS0, KD0, KS0, KO0, SEG0, VD0, VS0, VO0, VF0, KF0, LG0, cap0, pages0, ns0, nseg0, pps0,
    # tier 1 (high)
    POS1, KD1, KS1, KO1, SEG1, VD1, VS1, VO1, VF1, KF1, LG1, cap1, pages1, ns1, nseg1, pps1,
    # tier 2 (low)
    POS2, KD2, KS2, KO2, SEG2, VD2, VS2, VO2, VF2, KF2, LG2, cap2, pages2, ns2, nseg2, pps2,
    ROWS: tl.constexpr,
    RP: tl.constexpr,
    TQ: tl.constexpr,
    D: tl.constexpr,
    QPOS_RANGE: tl.constexpr,
    NPART: tl.constexpr,
    MAGIC: tl.constexpr,
    BCAST: tl.constexpr,
    STAGES: tl.constexpr,
    FLAT: tl.constexpr,
    FIELDS: tl.constexpr,
    ON0: tl.constexpr,  # whether each tier has pages (an empty tier's code is left out)
    ON1: tl.constexpr,
    ON2: tl.constexpr,
    ROTATE: tl.constexpr,  # q @ ROT first (the tiers hold rotated keys and values)
    UNROLL: tl.constexpr,  # the field path's page loop unrolled this many times
    FUSED: tl.constexpr,  # the stream's last program merges its splits (no merge launch)
    FMB: tl.constexpr,  # splits the fused merge reads at a time
    # per tier: key mode, bits, group size, word bytes, fixed factor; the same for values
    # (separable factor instead of the fixed one); tracking; rows per page
    KM0: tl.constexpr, KB0: tl.constexpr, KG0: tl.constexpr, KW0: tl.constexpr, KX0: tl.constexpr,
    VM0: tl.constexpr, VB0: tl.constexpr, VG0: tl.constexpr, VW0: tl.constexpr, VX0: tl.constexpr,
    TR0: tl.constexpr, BN0: tl.constexpr,
    KM1: tl.constexpr, KB1: tl.constexpr, KG1: tl.constexpr, KW1: tl.constexpr, KX1: tl.constexpr,
    VM1: tl.constexpr, VB1: tl.constexpr, VG1: tl.constexpr, VW1: tl.constexpr, VX1: tl.constexpr,
    TR1: tl.constexpr, BN1: tl.constexpr,
    KM2: tl.constexpr, KB2: tl.constexpr, KG2: tl.constexpr, KW2: tl.constexpr, KX2: tl.constexpr,
    VM2: tl.constexpr, VB2: tl.constexpr, VG2: tl.constexpr, VW2: tl.constexpr, VX2: tl.constexpr,
    TR2: tl.constexpr, BN2: tl.constexpr,
):  # fmt: skip
    s = tl.program_id(0)
    sp = tl.program_id(1) + sp0
    if ROTATE:
        # This program's rows of q @ R go to its own slab (no other program writes there),
        # and the tiers read them back as a contiguous [B, Hq, TQ, D] query: every path
        # (stacked, flat, field) loads the query through its strides as before.
        qr = QR + sp.to(tl.int64) * tl.num_programs(0) * ROWS * D
        _rotate_query(Q, sqb, sqh, sqt, sqd, ROT, qr, s, kv_heads, ROWS, RP, TQ, D)
        # The rows were stored by other threads of this program than those that load them.
        tl.debug_barrier()
        Q = qr
        sqb = kv_heads * ROWS * D
        sqh = TQ * D
        sqt = D
        sqd = 1
    if sp < ns0:
        if ON0:
            _tier(
                Q, sqb, sqh, sqt, sqd, qscale, QPOS, qpos0, FV, KF0,
                POS0, KD0, KS0, KO0, SEG0, VD0, VS0, VO0, VF0, LG0, PM, PL, PACC,
                s, sp, sp, cap0, pages0, pps0, n_split, nseg0, kv_heads,
                ROWS, RP, TQ, D, BN0, QPOS_RANGE,
                KM0, KB0, KG0, KW0, KX0, VM0, VB0, VG0, VW0, VX0, TR0, NPART, MAGIC,
                BCAST, STAGES, FLAT, FIELDS, UNROLL,
            )  # fmt: skip
    elif sp < ns0 + ns1:
        if ON1:
            _tier(
                Q, sqb, sqh, sqt, sqd, qscale, QPOS, qpos0, FV, KF1,
                POS1, KD1, KS1, KO1, SEG1, VD1, VS1, VO1, VF1, LG1, PM, PL, PACC,
                s, sp - ns0, sp, cap1, pages1, pps1, n_split, nseg1, kv_heads,
                ROWS, RP, TQ, D, BN1, QPOS_RANGE,
                KM1, KB1, KG1, KW1, KX1, VM1, VB1, VG1, VW1, VX1, TR1, NPART, MAGIC,
                BCAST, STAGES, FLAT, FIELDS, UNROLL,
            )  # fmt: skip
    else:
        if ON2:
            _tier(
                Q, sqb, sqh, sqt, sqd, qscale, QPOS, qpos0, FV, KF2,
                POS2, KD2, KS2, KO2, SEG2, VD2, VS2, VO2, VF2, LG2, PM, PL, PACC,
                s, sp - ns0 - ns1, sp, cap2, pages2, pps2, n_split, nseg2, kv_heads,
                ROWS, RP, TQ, D, BN2, QPOS_RANGE,
                KM2, KB2, KG2, KW2, KX2, VM2, VB2, VG2, VW2, VX2, TR2, NPART, MAGIC,
                BCAST, STAGES, FLAT, FIELDS, UNROLL,
            )  # fmt: skip
    if FUSED:
        # The stream's last program to finish merges every split's partials (what
        # ``_merge_kernel`` does in a launch of its own): each program's partials are stored
        # before it takes its ticket (the barrier, then a release), and the last reads them
        # after its ticket (an acquire, then the barrier), past the L1 cache (``.cg``). The
        # programs of a stream count ``n_split`` tickets over every launch of the call.
        tl.debug_barrier()
        ticket = tl.atomic_add(TK + s, 1, sem="acq_rel", scope="gpu")
        tl.debug_barrier()
        if ticket == n_split - 1:
            _merge_stream(PM, PL, PACC, OUT, MF, LF, ROT, s, n_split, kv_heads,
                          sob, soh, sot, sod, ROWS, TQ, D, FMB, ROTATE)  # fmt: skip
            tl.atomic_xchg(TK + s, 0, sem="relaxed", scope="gpu")


@triton.jit(noinline=True)
def _merge_stream(PM, PL, PACC, OUT, MF, LF, ROT, s, n_split, kv_heads, sob, soh, sot, sod,
                  ROWS: tl.constexpr, TQ: tl.constexpr, D: tl.constexpr,
                  SPLIT_BLOCK: tl.constexpr, ROTATE: tl.constexpr):  # fmt: skip
    """The fused merge of every row of stream ``s`` (``_merge_row``, the partials loaded past
    L1). Not inlined into the attend kernel: inlined, ptxas gave the 4-bit page loop 1050
    SASS instructions (1029 without the option) and 56 B of stack (Triton 3.6, sm_90)."""
    for r in range(ROWS):
        _merge_row(PM, PL, PACC, OUT, MF, LF, ROT, s, r, n_split, kv_heads,
                   sob, soh, sot, sod, ROWS, TQ, D, SPLIT_BLOCK, ROTATE, True)  # fmt: skip


@triton.jit
def _merge_row(PM, PL, PACC, OUT, MF, LF, ROT, s, r, n_split, kv_heads, sob, soh, sot, sod,
               ROWS: tl.constexpr, TQ: tl.constexpr, D: tl.constexpr,
               SPLIT_BLOCK: tl.constexpr, ROTATE: tl.constexpr, CG: tl.constexpr):  # fmt: skip
    """Row ``r`` of stream ``s``: its splits' partials merged (log-sum-exp), the output
    written in ``OUT``'s dtype (rotated back with ``ROTATE``) and the merged maximum and sum
    in ``MF`` / ``LF`` (for the received attention). ``CG``: the partials loaded past the L1
    cache (other programs of the same launch wrote them)."""
    s64 = s.to(tl.int64)
    r = s * 0 + r  # a loop's index is a Python int under the interpreter
    # Row r of stream s = (b, h) is query head h * G + r // TQ, query r % TQ.
    G: tl.constexpr = ROWS // TQ
    ob = (s // kv_heads).to(tl.int64) * sob
    oh = ((s % kv_heads) * G + r // TQ).to(tl.int64) * soh + (r % TQ).to(tl.int64) * sot
    j = tl.arange(0, D)
    m = float("-inf")
    lsum = 0.0
    acc = tl.full([D], 0.0, tl.float32)
    CM: tl.constexpr = ".cg" if CG else ""
    # One pass over the splits, SPLIT_BLOCK at a time with the running maximum rescaling what
    # came before (a block of 64 holds every split of a decoding step's plan at B8, ~33: one
    # round of loads, not two passes of dependent ones; session 24's two-pass loop over 16 at
    # a time took 6.5 us a launch at B8 x 32k, as long as ~5% of the attention; at B1 x 32k
    # the plan's ~256 splits take four blocks).
    for b0 in range(0, n_split, SPLIT_BLOCK):
        idx = b0 + tl.arange(0, SPLIT_BLOCK)
        ok = idx < n_split
        at = (s64 * n_split + idx) * ROWS + r
        pm = tl.load(PM + at, mask=ok, other=float("-inf"), cache_modifier=CM)
        pl = tl.load(PL + at, mask=ok, other=0.0, cache_modifier=CM)
        pa = tl.load(PACC + at[:, None] * D + j[None, :], mask=ok[:, None], other=0.0,
                     cache_modifier=CM)  # fmt: skip
        m_new = tl.maximum(m, _max(pm, 0))
        m_safe = tl.where(m_new == float("-inf"), 0.0, m_new)
        alpha = tl.exp2(m - m_safe)  # 0 while nothing was seen (m = -inf)
        w = tl.exp2(pm - m_safe)
        lsum = lsum * alpha + _sum(pl * w, 0)
        acc = acc * alpha + _sum(pa * w[:, None], 0)
        m = m_new
    m_safe = tl.where(m == float("-inf"), 0.0, m)
    inv = tl.where(lsum > 0.0, 1.0 / tl.where(lsum > 0.0, lsum, 1.0), 0.0)  # no 1/0
    o = acc * inv
    if ROTATE:
        # sum p (v R) = (sum p v) R: rotated back, o @ R^T = (o @ H) * R[:, 0].
        o = tl.reshape(_hadamard(o[None, :], 1, D), (D,)) * tl.load(ROT + j * D)
    tl.store(OUT + ob + oh + j.to(tl.int64) * sod, _cast_rtne(o, OUT.dtype.element_ty))
    tl.store(MF + s64 * ROWS + r, m_safe)
    tl.store(LF + s64 * ROWS + r, lsum)


@triton.jit(do_not_specialize=["n_split"])
def _merge_kernel(
    PM,
    PL,
    PACC,
    OUT,  # [B, Hq, Tq, D] in any layout (strides below) and float dtype
    MF,  # fp32 [S, ROWS]: merged maximum and sum (for the received attention)
    LF,
    ROT,  # fp32 [D, D] the store's rotation (ROTATE; only its first column is read)
    n_split,
    kv_heads,
    sob,
    soh,
    sot,
    sod,
    ROWS: tl.constexpr,
    TQ: tl.constexpr,
    D: tl.constexpr,
    SPLIT_BLOCK: tl.constexpr,
    ROTATE: tl.constexpr,  # write out @ ROT^T (the tiers hold rotated values)
):
    _merge_row(PM, PL, PACC, OUT, MF, LF, ROT, tl.program_id(0), tl.program_id(1), n_split,
               kv_heads, sob, soh, sot, sod, ROWS, TQ, D, SPLIT_BLOCK, ROTATE, False)  # fmt: skip


@triton.jit(do_not_specialize=["qpos0", "fill"])
def _received_kernel(
    LG,  # fp32 [S, ROWS, cap] base-2 logits (-inf where not visible)
    MF,
    LF,
    REC,  # fp32 [S, fill] (not ACCUMULATE)
    ACC,  # fp32 [S, cap] the tier's scores, accumulated in place (ACCUMULATE)
    CNT,
    POS,  # int32 [S, cap] the tier's positions (ACCUMULATE)
    FV,  # int32 [B] first valid position of each sequence (ACCUMULATE)
    QPOS,  # int32 [TQ] query positions (ACCUMULATE and not QPOS_RANGE)
    qpos0,
    kv_heads,
    cap,
    fill,
    ROWS: tl.constexpr,
    RP: tl.constexpr,
    BLOCK: tl.constexpr,
    ACCUMULATE: tl.constexpr,
    TQ: tl.constexpr,
    TQP: tl.constexpr,  # TQ rounded up to a power of two
    QPOS_RANGE: tl.constexpr,
):
    s = tl.program_id(0).to(tl.int64)
    t = tl.program_id(1) * BLOCK + tl.arange(0, BLOCK)
    rows = tl.arange(0, RP)
    ok = rows < ROWS
    m = tl.load(MF + s * ROWS + rows, mask=ok, other=0.0)
    lsum = tl.load(LF + s * ROWS + rows, mask=ok, other=0.0)
    inv = tl.where(lsum > 0.0, 1.0 / tl.where(lsum > 0.0, lsum, 1.0), 0.0)  # no 1/0
    lg = tl.load(
        LG + (s * ROWS + rows[:, None]) * cap + t[None, :],
        mask=ok[:, None] & (t < fill)[None, :],
        other=float("-inf"),
    )
    p = tl.exp2(lg - m[:, None]) * inv[:, None]
    if ACCUMULATE:
        # What the store adds to a tracked tier's rows: the attention each received, and how
        # many of the queries could see it (queries at or after its position; none for holes
        # and left padding).
        live = t < fill
        pos = tl.load(POS + s * cap + t, mask=live, other=-1)
        fv = tl.load(FV + s // kv_heads)
        if QPOS_RANGE:
            seen = tl.minimum(tl.maximum(qpos0 + TQ - pos, 0), TQ)
        else:
            qi = tl.arange(0, TQP)
            qp = tl.load(QPOS + qi, mask=qi < TQ, other=-1)
            seen = _sum((qp[None, :] >= pos[:, None]).to(tl.int32), 1)
        seen = tl.where((pos >= fv) & (pos >= 0), seen, 0).to(tl.float32)
        acc = tl.load(ACC + s * cap + t, mask=live, other=0.0)
        tl.store(ACC + s * cap + t, acc + _sum(p, 0), mask=live)
        cnt = tl.load(CNT + s * cap + t, mask=live, other=0.0)
        tl.store(CNT + s * cap + t, cnt + seen, mask=live)
    else:
        tl.store(REC + s * fill + t, _sum(p, 0), mask=t < fill)


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


#: Rows per page of a dense tier in a one-warp launch (see ``attend_tiers``).
_DENSE_BLOCK_1W = 16


def _next_pow2(n: int) -> int:
    return 1 << max(0, n - 1).bit_length()


def _word_view(data, mode: int, bits: int, d: int):
    """Packed rows viewed as the widest words (up to 4 bytes) that tile a row, and the word
    size in bytes: fewer, wider loads. 3-bit rows stay bytes (24-bit groups)."""
    import torch

    if mode == 0 or bits == 3:
        return data, 1
    row = d * bits // 8
    for wb, dt in ((4, torch.int32), (2, torch.int16)):
        if row % wb == 0 and data.numel() > 1:
            return data.view(dt), wb
    return data, 1


def _fields_tier(t, d: int) -> bool:
    """Whether ``_tier`` sends tier ``t`` down the field path (``F16_K and F16_V``)."""

    def ok(bits: int, widths: tuple[int, ...]) -> bool:
        return bits in widths and bits * d >= 256

    return (
        t.k_mode != 0 and t.v_mode == 2 and ok(t.k_bits, (2, 3, 4, 8)) and ok(t.v_bits, (2, 4, 8))
    )


# Partials of the splits, merged row statistics, the tracked tiers' logits and the rotated
# queries, reused between calls: [capacity] fp32 per device and stream (consumed by the
# merge and received launches before the next call on the same CUDA stream can write them).
_WORKSPACE: dict[Any, Any] = {}


def _stream_key(dev):
    """What the reused buffers are kept per: the device and its current CUDA stream (what is
    launched on one stream before the next call on it has consumed them)."""
    return (dev, _raw_stream(dev) if dev.type == "cuda" else 0)


def _workspace(dev, n_m: int, n_acc: int, n_lg: int = 0, n_q: int = 0):
    import torch

    key = _stream_key(dev)
    ws = _WORKSPACE.get(key)
    if (
        ws is None
        or ws[0].numel() < n_m
        or ws[2].numel() < n_acc
        or ws[5].numel() < n_lg
        or ws[6].numel() < n_q
    ):
        old = [0] * 7 if ws is None else [w.numel() for w in ws]
        m_cap = max(n_m, 2 * old[0])
        a_cap = max(n_acc, 2 * old[2])
        # Logits of the tracked tiers grow with the tier (by a quarter, as tiers do).
        g_cap = max(n_lg, old[5] * 5 // 4, 1)
        # Rotated queries (a slab per split, as the partial outputs): none until asked for,
        # and kept as they are when another buffer grows.
        q_cap = max(n_q, 2 * old[6]) if n_q > old[6] else max(old[6], 1)
        ws = tuple(
            torch.empty(n, dtype=torch.float32, device=dev)
            for n in (m_cap, m_cap, a_cap, m_cap, m_cap, g_cap, q_cap)
        )
        _WORKSPACE[key] = ws
    return ws


# The fused merge's tickets (``attend_tiers(fused_merge=True)``): int32 zeros per device and
# stream, each stream's counter put back to 0 by the program that merged it.
_TICKETS: dict[Any, Any] = {}


def _tickets(dev, streams: int):
    import torch

    key = _stream_key(dev)
    tk = _TICKETS.get(key)
    if tk is None or tk.numel() < streams:
        tk = _TICKETS[key] = torch.zeros(max(streams, 64), dtype=torch.int32, device=dev)
    return tk


# Compiled kernels by launch key, for the fast launch path (see _launch): (kernel, the
# constexpr values in the order of the kernel's parameters).
_COMPILED: dict[Any, Any] = {}
# Per kernel, the indices of its integer arguments that are not specialized on.
_UNSPECIALIZED: dict[Any, frozenset[int]] = {}
# Triton's settings (its launch hooks, which a profiler such as Proton sets).
_KNOBS = getattr(triton, "knobs", None)

# The attention kernel's constexpr items, by their values: built once, not formatted and
# gathered into a dict at every call.
_CONSTS: dict[Any, tuple[tuple[str, Any], ...]] = {}
_TIER_NAMES = ("KM", "KB", "KG", "KW", "KX", "VM", "VB", "VG", "VW", "VX", "TR", "BN")
_BASE_NAMES = (
    "ROWS", "RP", "TQ", "D", "QPOS_RANGE", "NPART", "MAGIC", "BCAST", "STAGES",
    "FLAT", "FIELDS", "ON0", "ON1", "ON2", "ROTATE", "UNROLL", "FUSED", "FMB",
)  # fmt: skip


def _consts(values: tuple[Any, ...]) -> tuple[tuple[str, Any], ...]:
    """The attention kernel's constexpr items for ``values``: the :data:`_BASE_NAMES` values,
    then each tier's :data:`_TIER_NAMES` values (names suffixed by the tier's index)."""
    items = _CONSTS.get(values)
    if items is None:
        names = list(_BASE_NAMES)
        names += [f"{n}{i}" for i in range(3) for n in _TIER_NAMES]
        items = _CONSTS[values] = tuple(zip(names, values, strict=True))
    return items


def _launch(
    fn, grid, args, consts, num_warps, num_stages, fast, stream=None, fusion=True, maxnreg=None
):
    """``fn[grid](*args, **consts)`` (``consts``: a dict, or a tuple of its items, which
    spares building one); ``fusion=False`` compiles it without contracting a product and a
    sum into one fma (one rounding instead of two: the store's kernels must round as the
    Rust quantizer does); with ``fast`` (compiled kernels only) later calls with
    the same key go straight to the compiled kernel, skipping Triton's per-call binding,
    cache-key and option formatting, which cost more host time than a decode step's GPU time.
    The key holds what Triton specializes on: the constexprs, each tensor's dtype and 16-byte
    alignment, and whether each integer argument is 1, a multiple of 16, and fits in 32 bits
    (only the last for the kernel's ``do_not_specialize`` arguments), and the device (a
    kernel is loaded per device); a launch on another device than the current one is made
    with that device current.
    Every positional argument comes before the constexprs (given by name) in the kernels
    launched this way. ``stream``: the
    current CUDA stream's handle (looked up when not given). ``maxnreg``: a cap on the
    registers per thread (NVIDIA), for more warps per SM at the price of spills."""
    opts = {} if maxnreg is None else {"maxnreg": maxnreg}
    if not fast:
        named = dict(consts) if type(consts) is tuple else consts
        fn[grid](
            *args,
            **named,
            num_warps=num_warps,
            num_stages=num_stages,
            enable_fp_fusion=fusion,
            **opts,
        )
        return
    import torch

    tensor = torch.Tensor
    dev = (
        args[0] if isinstance(args[0], tensor) else next(a for a in args if isinstance(a, tensor))
    ).device
    if dev.index != torch.cuda.current_device():
        # Triton compiles, loads and launches a kernel for the current device (its launcher
        # takes the current CUDA context): a model split over GPUs calls its layers with
        # another one current.
        with torch.cuda.device(dev):
            _launch(fn, grid, args, consts, num_warps, num_stages, fast, stream, fusion, maxnreg)
        return
    plain = _UNSPECIALIZED.get(fn)
    if plain is None:
        plain = _UNSPECIALIZED[fn] = frozenset(p.num for p in fn.params if p.do_not_specialize)
    sig = tuple(
        (a.dtype, a.data_ptr() & 15 == 0)
        if isinstance(a, tensor)
        else (-0x80000000 <= a <= 0x7FFFFFFF)  # Triton's i32 / i64 choice only
        if type(a) is int and i in plain
        else (a == 1, a & 15 == 0, -0x80000000 <= a <= 0x7FFFFFFF)
        if type(a) is int
        else None
        for i, a in enumerate(args)
    )
    items = consts if type(consts) is tuple else tuple(consts.items())
    key = (fn, num_warps, num_stages, fusion, maxnreg, items, sig, dev.index)
    hit = _COMPILED.get(key)
    if hit is None:
        named = dict(items)
        kernel = fn[grid](
            *args,
            **named,
            num_warps=num_warps,
            num_stages=num_stages,
            enable_fp_fusion=fusion,
            **opts,
        )
        kernel._init_handles()  # loaded already by the launch; the direct launch needs it
        _COMPILED[key] = (kernel, [named[n] for n in fn.arg_names[len(args) :]])
        return
    kernel, tail = hit
    if stream is None:
        stream = _raw_stream(dev)
    g1 = grid[1] if len(grid) > 1 else 1
    g2 = grid[2] if len(grid) > 2 else 1
    knobs = _KNOBS.runtime if _KNOBS is not None else None
    if knobs is None or _hooked(knobs.launch_enter_hook) or _hooked(knobs.launch_exit_hook):
        # A profiler's launch hooks want their metadata: Triton's own runner builds it.
        kernel[(grid[0], g1, g2)](*args, *tail, stream=stream)
        return
    # What the compiled kernel's runner does (``CompiledKernel.__getitem__``), without its
    # per-call closure and the launch metadata it builds for the hooks (Triton 3.6 builds it
    # at every launch: its hooks are chains, never None), and with no hook to call.
    kernel.run(
        grid[0], g1, g2, stream, kernel.function, kernel.packed_metadata, None, None, None,
        *args, *tail,
    )  # fmt: skip


def _hooked(hook: Any) -> bool:
    """Whether a Triton launch hook is set: a hook chain with calls in it (Triton 3.6 on), or
    a plain callable (earlier Tritons, where an unset hook is None)."""
    return hook is not None and bool(getattr(hook, "calls", True))


def _raw_stream(dev: Any) -> int:
    """The handle of ``dev``'s current CUDA stream, as ``torch.cuda.current_stream(dev)
    .cuda_stream`` but without building a ``Stream`` object (what Triton's own launcher calls;
    ~15 us of host time per launch less on the H100's host, session 23's profile)."""
    import torch

    idx = dev.index if dev.index is not None else torch.cuda.current_device()
    return torch._C._cuda_getCurrentRawStream(idx)


def attend_tiers(
    tiers,
    q,
    q_positions,
    first_valid,
    scale,
    kv_heads,
    track,
    *,
    accumulate=None,
    out=None,
    out_layout="bhtd",
    rotation=None,
    precise=True,
    magic=True,
    bcast=True,
    join=False,
    flat=False,
    fields=None,
    asm=None,
    fast_launch=True,
    target_programs=None,
    block_n=64,
    num_warps=None,
    num_stages=2,
    maxnreg=None,
    transposed=True,
    int8_keys=True,
    merge_block=None,
    unroll=1,
    tier_launches=False,
    fused_merge=False,
):
    """Attention of ``q`` ``[B, Hq, Tq, D]`` (any float dtype and strides) over ``tiers`` (up
    to three ``TierView``).

    Returns ``(out, received)``: ``out`` is ``[B, Hq, Tq, D]`` fp32, or the tensor given as
    ``out`` (any float dtype and strides; ``out_layout="bthd"``: it is ``[B, Tq, Hq, D]``,
    the layout transformers' attention functions return), written in its dtype.
    ``received[i]`` is, for tier ``i`` when ``track`` lists it, the attention each of its
    rows received ``[S, fill]`` (summed over the GQA group's heads and the queries), else
    ``None``; with ``accumulate[i] = (acc, count)`` (the tier's ``[S, cap]`` fp32 scores)
    it is instead added to ``acc`` in place, and to ``count`` how many queries saw each row
    (queries at or after its position; none for holes and left padding), and
    ``received[i]`` is ``None``. ``first_valid`` is ``[B]`` int32 on the
    device. ``rotation``: the fp32 ``[D, D]`` randomized Hadamard matrix ``R`` the tiers'
    keys and values were rotated by (``x @ R``); ``q`` is then the unrotated query, rotated
    in the kernel, and ``out`` is rotated back (see the module docstring); ``R`` must be
    ``diag(R[:, 0]) H`` (``TritonLayerStore.set_rotation`` checks it), and only its first
    column is read. Everything stays on the tensors' device; no value is read back to the
    host.
    ``precise=False`` drops the low fp16 part of the dots (fp16-rounded operands);
    ``magic=False`` unpacks with int-to-float conversions; ``bcast=False`` gathers a word per
    code instead of loading each row's words once; ``join=True`` unpacks by ``tl.join`` into
    the packing order (``_fields``: compiled offline for sm_90 it stores the code tiles to shared
    memory as vectors, 16 instead of 144 scalar fp16 stores per thread and page, but with 60
    instead of 26 barriers; not timed on a GPU yet); the rest are launch parameters.
    ``flat=True``: the 2-D formulation (``_tier_flat``: checked here under the interpreter,
    compiled on an H200 but not timed, so off by default). ``fast_launch`` (on by default;
    compiled kernels only): kernels already compiled for the same specialization are
    launched directly (see ``_launch``), which the CUDA tests check against Triton's own
    launch. ``fields=True``: packed tiers of 2, 4 and 8 bits (keys also of 3: kvmix-5x's
    low tier, ``_groups3``) read as int16 elements with one
    dot per bit field, the codes unpacked in the mma operand registers (``_tier_fields``,
    ``notes/triton-kernel.md``); ``asm``
    (default: on CUDA tensors of an NVIDIA GPU, compiled) unpacks them by inline PTX, else
    by integer ops (the interpreter's way). ``fields``
    defaults to ``asm`` (on an H200: ZipCache B8 x 32k 182 us against 472 us, the CUDA tests
    pass with it); ``KVMIX_TRITON_FIELDS=0`` / ``=1`` overrides that. ``num_warps`` defaults to
    4, or 1 with ``fields`` (compiled offline, 1 warp issues the fewest instructions per code
    and replicates no small dot across warps); ``target_programs`` to 2112 with ``fields``
    (session 22's sweep on an H100, ZipCache B8 x 32k: 136 / 126 us eager / CUDA graph against
    150 / 138 at 4224, 174 / 163 at 1056: the carried page loop keeps a segment's operands
    across a program's pages, so longer runs of pages pay), else 1056 x 4 / num_warps.
    ``maxnreg`` caps the attend kernel's registers per thread (NVIDIA; a launch sweep's
    parameter: the field path's ~240 registers allow 8 warps per SM). ``merge_block``: splits
    the merge reads at a time (default ``max(16, 8192 // D)``: a decoding step's every split in
    one block; smaller in tests, so that the running maximum's rescaling between blocks runs).
    ``unroll``: the field path's page loop unrolled that many times (two pages' independent
    work for the compiler to interleave: the loop is latency bound, session 25's profile).
    ``transposed`` (default ``True``): the field path's key dots transposed (``_kdot``): the
    page's 64 tokens are the mma's M and the query rows' stacked hi / lo parts its N (4
    queries' 8 rows: what an mma takes, where as its M they were padded to 16), a row's hi
    and lo sums in one thread (``_stack_scaled``'s ``INNER``); session 27, H100, B8 x 32k, us
    eager / CUDA graph: ZipCache 123 / 113 against 133 / 123, kvmix-5x 165 / 154 against 179 /
    167 (offline, 11% fewer SASS instructions a page). The same sums in another order: outputs
    within the same tolerances. (The value dots transposed too were slower, 142 / 132 and
    186 / 176: the probabilities then need a transpose through shared memory;
    ``notes/triton-kernel.md``.)
    ``int8_keys`` (default ``True``; with ``transposed``, else ignored, as for keys of other
    widths or grouped per token and GQA groups of one): per-channel keys of 2 and 4 bits
    dotted on int8 tensor cores (``_kchannel_i8``): the query times the segment's scales as a
    32-bit fixed point per row (four int8 digits, every product and sum exact in int32), the
    codes masked in their bytes (``_i8_field16``: one instruction per four codes where fp16
    fields take two per two). Offline (Triton 3.6, sm_90, SASS a page) 2-bit 1093 -> 947,
    4-bit 1066 with it. On an H100 (session 29, B8 x 32k, the attend kernel's GPU time)
    ZipCache 103.0 -> 97.9 us, kvmix-5x (its 3-bit low tier keeps fp16 fields) 116.8 ->
    118.0. Outputs within the same tolerances (float64 reference on the GPU: 5e-7 to 9e-7).
    ``int8_keys=False``: the fp16 fields' dots (session 28's default).
    ``tier_launches`` (default ``False``): one attend launch per tier with pages instead of
    one for all, each compiled with its tier's branch alone (session 30's question: whether
    the programs of one SM running different tiers' page loops, ~15 KB of code each, wait on
    the instruction cache; each launch's kernel also takes fewer registers). The same
    programs and splits, so the same outputs bit for bit. Slower where timed (session 31,
    H100, B8 x 32k: ZipCache 125 against 100 us, kvmix-5x 151 against 115): one tier's
    programs alone leave a partial wave, and the launches' tails add up.
    ``fused_merge`` (default ``False``): no merge launch; each program
    takes a ticket of its stream after storing its partials and the stream's last program
    merges them (``_merge_row``, the merge kernel's code) and puts the ticket back to 0 (one
    launch less a call). Outputs within the same tolerances (the splits are merged 16 at a
    time, not 64); race free on an H100 (session 35). There it cut the B=1 x 8k eager call's
    host time from 210 to 178 us but made the attend kernel 10-11 us slower at B8 x 32k
    (ZipCache 108.3 us against 97.5 + 3.5 for the merge launch: each stream's last program
    merges alone), so it stays off.
    """
    import torch

    if asm is None:
        # Inline PTX needs a compiled kernel on an NVIDIA GPU (the interpreter, which
        # ``engines.base._load`` names ``*_interp``, runs the plain unpacking).
        # ROCm builds of torch also call their devices "cuda"; PTX is NVIDIA's.
        nvidia = q.device.type == "cuda" and torch.version.hip is None
        asm = nvidia and not __name__.endswith("_interp")
    if fields is None:
        # On where it was checked (NVIDIA, compiled, inline PTX: `pytest -m cuda` passes with
        # it on an H200, 2.6x faster than the default kernel at B8 x 32k); elsewhere opt-in.
        env = os.environ.get("KVMIX_TRITON_FIELDS")
        fields = env == "1" if env in ("0", "1") else bool(asm)
    if num_warps is None:
        num_warps = 1 if fields else 4
    if target_programs is None:
        target_programs = 2112 if fields else 1056 * 4 // num_warps
    if merge_block is None:
        merge_block = max(16, 8192 // q.shape[-1])  # [block, D] fp32: 64 registers at 4 warps
    # Constexprs of the launch: a bool or float would compile a kernel of its own, or fail
    # deep inside Triton, so both are refused here, before anything is launched.
    if type(merge_block) is not int or merge_block < 1 or merge_block & (merge_block - 1):
        raise ValueError(f"merge_block must be a power of two, got {merge_block!r}")
    if type(unroll) is not int or unroll < 1:
        raise ValueError(f"unroll must be a positive int, got {unroll!r}")
    if type(transposed) is not bool:
        raise ValueError(f"transposed must be a bool, got {transposed!r}")
    if type(int8_keys) is not bool:
        raise ValueError(f"int8_keys must be a bool, got {int8_keys!r}")
    if type(tier_launches) is not bool:
        raise ValueError(f"tier_launches must be a bool, got {tier_launches!r}")
    if type(fused_merge) is not bool:
        raise ValueError(f"fused_merge must be a bool, got {fused_merge!r}")

    if len(tiers) > 3:
        raise ValueError(f"attend_tiers takes at most 3 tiers, got {len(tiers)}")
    b, hq, tq, d = q.shape
    group = hq // kv_heads
    streams = b * kv_heads
    rows = group * tq
    rp = _next_pow2(rows)
    dev = q.device
    fast = fast_launch and dev.type == "cuda"
    stream = _raw_stream(dev) if fast else None
    pps = plan_splits([t.fill_pages(block_n) for t in tiers], streams, target_programs)
    # Rows per page and pages per split, per tier. A one-warp launch (the field path's) holds
    # a dense tier's fp32 dots (FMAs, no tensor cores) in one warp's registers: at 64 rows a
    # page they spill (offline SASS, Triton 3.6: 19135 instructions and 5840 B of stack per
    # thread and page, against ~1400 for a packed page), and the buffer's one program per
    # stream outlasted the packed tiers' (session 24, H100, B8 x 32k: 209 us against 122 us
    # without the buffer's 14 rows). Such a tier gets pages of 16 rows: fp16 rows on tensor
    # cores (_tier_stacked's DENSE_TC: 457 instructions a page, no stack) in splits of about
    # half a packed split's rows, others with FMAs (3127 instructions, 296 B of stack) in
    # splits of about an eighth (at least one page), so that their programs, which start
    # first, end before the packed tiers' do.
    bns = [block_n] * len(tiers)
    ppss = [pps] * len(tiers)
    for i, t in enumerate(tiers):
        if num_warps == 1 and t.k_mode == 0 and t.v_mode == 0 and block_n > _DENSE_BLOCK_1W:
            half = fields and t.kd.dtype == torch.float16 and t.vd.dtype == torch.float16
            bns[i] = _DENSE_BLOCK_1W
            ppss[i] = max(1, pps * block_n // (_DENSE_BLOCK_1W * (2 if half else 8)))
    pages = [t.fill_pages(bn) for t, bn in zip(tiers, bns, strict=True)]
    splits = [-(-p // n) for p, n in zip(pages, ppss, strict=True)]
    n_split = max(1, sum(splits))
    # The tracked tiers' logits, one after another: [S, ROWS, cap] each.
    lg_at = []
    n_lg = 0
    for i, t in enumerate(tiers):
        lg_at.append(n_lg)
        if track and track[i] and splits[i]:
            n_lg += streams * rows * t.cap
    # Partials, merged row statistics and the logits (flat; kernels index them with each
    # tier's capacity), reused between calls.
    n_acc = streams * n_split * rows * d
    pm, pl, pacc, mf, lf, lgw, qrw = _workspace(
        dev, streams * n_split * rows, n_acc, n_lg, n_acc if rotation is not None else 0
    )
    rot = pm if rotation is None else rotation
    if out is None:
        out = torch.empty((b, hq, tq, d), dtype=torch.float32, device=dev)
        out_layout = "bhtd"
    sb, s1, s2, sd = out.stride()
    out_strides = (sb, s2, s1, sd) if out_layout == "bthd" else (sb, s1, s2, sd)
    n_q = len(q_positions)
    first = int(q_positions[0]) if n_q else 0
    consecutive = n_q == 1 or all(int(p) == first + i for i, p in enumerate(q_positions))
    qpos = pm if consecutive else positions_tensor(q_positions, dev)
    logits: list[Any] = [None] * len(tiers)
    targs: list[Any] = []
    cvals: list[Any] = []
    for i in range(3):
        if i >= len(tiers) or splits[i] == 0:
            # An empty tier: no program reaches its branch; any tensors do.
            targs += [pm] * 11 + [64, 0, 0, 1, 1]
            cvals += [0, 8, d, 1, False, 0, 8, d, 1, False, False, block_n]
            continue
        t = tiers[i]
        if fields and _fields_tier(t, d):
            # The field path (``_tier_fields``) reads int16 elements, and 3-bit key rows as
            # 32-bit words (``_groups3``): a buffer that does not start on 4 bytes (a view
            # into another tensor; the store's own are whole allocations) would be misread.
            if t.k_bits == 3 and t.kd.data_ptr() % 4:
                raise ValueError(
                    f"tier {i}: 3-bit key codes must start on a 4-byte boundary "
                    f"(data_ptr {t.kd.data_ptr():#x})"
                )
            kd, kw, vd, vw = t.kd.view(torch.int16), 2, t.vd.view(torch.int16), 2
        else:
            words = t.words
            if words is None:
                kd, kw = _word_view(t.kd, t.k_mode, t.k_bits, d)
                vd, vw = _word_view(t.vd, t.v_mode, t.v_bits, d)
            else:
                kd, kw, vd, vw = words
        do_track = bool(track and track[i])
        lg = pm
        if do_track:
            lg = lgw if lg_at[i] == 0 else lgw[lg_at[i] :]
            logits[i] = lg
        kfix = t.kfix
        targs += [t.pos, kd, t.ks, t.ko, t.seg, vd, t.vs, t.vo, t.vf]
        targs += [pm if kfix is None else kfix, lg, t.cap, pages[i], splits[i], t.nseg, ppss[i]]
        cvals += [t.k_mode, t.k_bits, t.k_gs, kw, kfix is not None]
        cvals += [t.v_mode, t.v_bits, t.v_gs, vw, bool(t.v_sep), do_track, bns[i]]
    if sum(splits) and rows:  # no query (q_len 0): nothing to attend, nothing received
        on = [len(splits) > i and splits[i] > 0 for i in range(3)]
        # Launches as (tiers compiled in, first split, splits): one for every tier, or with
        # ``tier_launches`` one per tier with pages, compiled with that tier's branch alone.
        if tier_launches:
            firsts = [sum(splits[:i]) for i in range(len(splits))]
            launches = [
                ([j == i for j in range(3)], firsts[i], n) for i, n in enumerate(splits) if n
            ]
        else:
            launches = [(on, 0, n_split)]
        pre = [rows, rp, tq, d, consecutive, 2 if precise else 1, magic]
        pre += [
            2 if join else int(bcast),
            num_stages,
            flat,
            ((2 if asm else 1) + (4 if transposed else 0) + (8 if int8_keys else 0))
            if fields
            else 0,
        ]
        # The fused merge's splits a block: a [block, D] fp32 tile of 64 registers a thread.
        # Without it its arguments are placeholders (no kernel of their own per output dtype).
        fmb = min(merge_block, max(1, 2048 * num_warps // d)) if fused_merge else 1
        post = [rotation is not None, unroll, fused_merge, fmb, *cvals]
        head = [q, q.stride(0), q.stride(1), q.stride(2), q.stride(3), float(scale) * LOG2E]
        head += [qpos, first, first_valid, pm, pl, pacc, n_split, kv_heads]
        if fused_merge:
            tk = _tickets(dev, streams)
            merge_args = [tk, out, mf, lf, *out_strides]
        else:
            merge_args = [pm, pm, pm, pm, 0, 0, 0, 0]
        try:
            for tiers_on, sp0, n in launches:
                consts = _consts((*pre, *tiers_on, *post))
                args = [*head, sp0, rot, qrw, *merge_args, *targs]
                _launch(
                    _attend_kernel, (streams, n), args, consts, num_warps, num_stages, fast,
                    stream, True, maxnreg,
                )  # fmt: skip
        except BaseException:
            if fused_merge:
                # A launch that failed (a launch per tier: a later one) left tickets taken
                # that no merge will put back.
                tk.zero_()
            raise
    else:
        out.zero_()
        received: list[Any] = []
        for i, t in enumerate(tiers):
            tracked = bool(track and track[i])
            if tracked and accumulate is not None and accumulate[i] is not None:
                received.append(None)  # nothing was received: nothing to add
            else:
                received.append(
                    torch.zeros((streams, t.fill), dtype=torch.float32, device=dev)
                    if tracked
                    else None
                )
        return out, received
    if not fused_merge:
        _launch(
            _merge_kernel,
            (streams, rows),
            [pm, pl, pacc, out, mf, lf, rot, n_split, kv_heads, *out_strides],
            dict(ROWS=rows, TQ=tq, D=d, SPLIT_BLOCK=merge_block, ROTATE=rotation is not None),
            4,
            2,
            fast,
            stream,
        )
    received = []
    tqp = _next_pow2(tq)
    for i, (t, lg) in enumerate(zip(tiers, logits, strict=True)):
        add = accumulate[i] if accumulate is not None else None
        if lg is None:
            # A tracked tier without rows received nothing.
            empty = track and track[i] and add is None
            received.append(torch.zeros((streams, t.fill), device=dev) if empty else None)
            continue
        rb = 128
        if add is None:
            rec = torch.empty((streams, t.fill), dtype=torch.float32, device=dev)
            acc = cnt = pm
        else:
            rec, (acc, cnt) = pm, add
        _launch(
            _received_kernel,
            (streams, -(-t.fill // rb)),
            [lg, mf, lf, rec, acc, cnt, t.pos, first_valid, qpos, first, kv_heads, t.cap, t.fill],
            dict(
                ROWS=rows,
                RP=rp,
                BLOCK=rb,
                ACCUMULATE=add is not None,
                TQ=tq,
                TQP=tqp,
                QPOS_RANGE=consecutive,
            ),
            4,
            2,
            fast,
            stream,
        )
        received.append(rec if add is None else None)
    return out, received
