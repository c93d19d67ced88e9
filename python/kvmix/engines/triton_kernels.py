"""Triton kernels of the device engine: quantize + dense pack, and dequantize.

The numerics are the Rust codec's (``src/quant/affine.rs``): for a group spanning
``[lo, hi]``, ``scale = fp16((hi - lo) / (2^b - 1))``, ``offset = fp16(lo)``, both rounded
*before* the codes are computed, ``code = min(max((x - offset) / scale + 0.5, 0), top)``
truncated, and a constant group (scale 0) gets code 0. Codes are packed least significant bit
first, ``8 / b`` to a byte, so the rows are byte-identical to the Rust store's. Channel
factors (ZipCache's separable factors, MiKV's fixed key factor) are applied by dividing the
input before quantizing, as the Rust quantizer does. Every quotient is correctly rounded
(``tl.div_rn``, or :func:`_div_fp16` per element in the encodes and the range searches' hot
loop); Triton's ``/`` (the GPU's ``div.full.f32``, within 2 ulp) only gives the reciprocal
:func:`_div_fp16` starts from. And no product that must round on its own is fused into a sum
(the store launches these kernels without fp contraction, but for the three range-search
kernels, which round such products by :func:`_product`), so a value at a rounding boundary
gets the Rust store's code on the GPU too.

With ``CLIP`` (``clip="mse"``, ``src/quant/clip.rs``) each group also tries its range shrunk
about the midpoint by each factor of ``SHR`` (the layout's ``shrink``) and keeps the grid of
least squared error, summed in float64 from exact squares as the Rust quantizer sums them
(``mid - s * half`` rounded twice, as there). ``CLIP == 2``
(``"mse_unbiased"``) keeps only the grids with ``sum((x̂ - x) * x) >= 0`` (float64).

Per-channel grids (keys) span a whole segment, up to a prompt's length: their rows are cut into
chunks, one program each (:func:`channel_partials_kernel` for the minima, maxima and every
candidate's errors, :func:`encode_channels_kernel` for the codes); one program per segment and
channel block combines the chunks and writes the chosen grid into the tier
(:func:`channel_choose_kernel`) or ZipCache's separable factors (:func:`channel_factor_kernel`).
"""

# Triton's kernel language is untyped (its decorators, and parameters whose annotations
# Triton itself reads, e.g. `tl.constexpr`): mypy checks everything else in strict mode.
# mypy: disable-error-code="no-untyped-def,untyped-decorator"

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


@triton.jit
def _cumsum(x, axis: tl.constexpr):
    return tl.associative_scan(x, axis, _add)


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
    """One stage of the fast Walsh-Hadamard transform of the rows of ``x [M, D]`` (the
    attention module's ``_butterfly``; each kernel module is loaded on its own)."""
    a, b = tl.split(tl.reshape(x, (M, D // 2, 2)))
    return tl.reshape(tl.permute(tl.join(a + b, a - b), (0, 2, 1)), (M, D))


@triton.jit
def _hadamard(x, M: tl.constexpr, D: tl.constexpr):
    """``x [M, D] @ H``, ``H`` the Sylvester Hadamard matrix (see the attention module's
    ``_hadamard``)."""
    for i in tl.static_range(16):
        if (2 << i) <= D:
            x = _butterfly(x, M, D)
    return x


@triton.jit
def append_rows_kernel(
    K,  # [B, H, N, D] any float dtype, read through its strides
    V,
    skb,
    skh,
    skt,
    skd,
    svb,
    svh,
    svt,
    svd,
    KD,  # [S, cap, D] the buffer tier's dense rows (its dtype)
    VD,
    POS,  # int16/int32 [S, cap]
    ACC,  # fp32 [S, cap] scores (SCORED)
    CNT,
    BAD,  # int32 [1]: set to 1 if a value is NaN/Inf or beyond the fp16 range (CHECK)
    ROT,  # fp32 [D, D] the store's randomized Hadamard rotation (ROTATE)
    row0,
    cap,
    position,
    n,
    kv_heads,
    D: tl.constexpr,
    BR: tl.constexpr,
    SCORED: tl.constexpr,
    CHECK: tl.constexpr,
    ROTATE: tl.constexpr,
):
    """``n`` new tokens of every stream into the dense buffer at rows ``row0 ..``, ``BR`` rows
    per program: the rows (converted as ``x.float().to(buffer dtype)``; with ``ROTATE``, first
    rotated as ``(x.float() @ ROT).to(x.dtype)`` up to the order of the fp32 sums: ``(x *
    ROT[:, 0]) @ H`` by the fast Walsh-Hadamard transform in fp32, no dot, so nothing drops to
    TF32), positions ``position ..``, zero scores, and the non-finite flag (of the rows
    stored). A decoding step is ``n = BR = 1``; a prompt is read once and written once (no
    rotated copy, no zero-filled buffer rows, no separate pass for the finiteness check)."""
    s = tl.program_id(0)
    b = (s // kv_heads).to(tl.int64)
    h = (s % kv_heads).to(tl.int64)
    t = tl.program_id(1) * BR + tl.arange(0, BR)
    ok = t < n
    t64 = t.to(tl.int64)
    j = tl.arange(0, D).to(tl.int64)
    m = ok[:, None]
    src_k = K + b * skb + h * skh + t64[:, None] * skt + j[None, :] * skd
    src_v = V + b * svb + h * svh + t64[:, None] * svt + j[None, :] * svd
    k = tl.load(src_k, mask=m, other=0.0).to(tl.float32)
    v = tl.load(src_v, mask=m, other=0.0).to(tl.float32)
    if ROTATE:
        rot = tl.load(ROT + j * D)[None, :]
        k = _cast_rtne(_hadamard(k * rot, BR, D), K.dtype.element_ty).to(tl.float32)
        v = _cast_rtne(_hadamard(v * rot, BR, D), V.dtype.element_ty).to(tl.float32)
    dst = s.to(tl.int64) * cap + row0 + t64
    tl.store(KD + dst[:, None] * D + j[None, :], _cast_rtne(k, KD.dtype.element_ty), mask=m)
    tl.store(VD + dst[:, None] * D + j[None, :], _cast_rtne(v, VD.dtype.element_ty), mask=m)
    tl.store(POS + dst, position + t, mask=ok)
    if SCORED:
        zero = tl.full((BR,), 0.0, tl.float32)
        tl.store(ACC + dst, zero, mask=ok)
        tl.store(CNT + dst, zero, mask=ok)
    if CHECK:
        # NaN fails every comparison: `!(|x| <= max)` flags it with the infinities (masked
        # rows load as 0 and pass).
        ok2 = (tl.abs(k) <= 65504.0).to(tl.int32) + (tl.abs(v) <= 65504.0).to(tl.int32)
        bad = _sum(_sum(2 - ok2, 1), 0)
        tl.store(BAD, 1, mask=bad > 0)


@triton.jit(do_not_specialize=["n", "width", "code"])
def partition_kernel(
    PICK,  # [S, n] bool, or int8 categories (``code``), read through its row stride
    P,  # int16/int32 [S, n] positions, read through its row stride
    IDX,  # int64 [S, width] out: the columns, picked ones first
    GP,  # [S, width] out, P's dtype: the picked columns' positions, -1 (a hole) for the rest
    n,
    width,
    code,
    sp_pick,
    sp_p,
    BLOCK: tl.constexpr,
):
    """Row ``s`` stably partitioned by ``PICK == code``, the first ``width`` columns kept: the
    picked columns in column order, then the others in column order (what a stable sort of
    the keys ``PICK != code`` orders them as), with the picked columns' positions and -1 for
    the others. One program per stream: a pass counts the picked columns, a second writes
    each column at its rank, from running sums within blocks of ``BLOCK`` columns."""
    s = tl.program_id(0).to(tl.int64)
    cols = tl.arange(0, BLOCK)
    total = _sum(cols * 0, 0)
    for c0 in range(0, n, BLOCK):
        c = c0 + cols
        ok = c < n
        v = tl.load(PICK + s * sp_pick + c, mask=ok, other=0).to(tl.int32)
        total += _sum(((v == code) & ok).to(tl.int32), 0)
    before = total * 0  # picked columns before this block
    for c0 in range(0, n, BLOCK):
        c = c0 + cols
        ok = c < n
        v = tl.load(PICK + s * sp_pick + c, mask=ok, other=0).to(tl.int32)
        pi = ((v == code) & ok).to(tl.int32)
        picked_before = before + _cumsum(pi, 0) - pi  # picked columns before column c
        dest = tl.where(pi != 0, picked_before, total + c - picked_before)
        keep = ok & (dest < width)
        pos = tl.load(P + s * sp_p + c, mask=keep & (pi != 0), other=-1)
        out = s * width + dest
        tl.store(IDX + out, c.to(tl.int64), mask=keep)
        tl.store(GP + out, pos.to(GP.dtype.element_ty), mask=keep)
        before += _sum(pi, 0)


# ZipCache's token categories (``zipcache_rank_kernel`` / ``mark_salient_kernel``; the
# store pushes each category's rows by its value).
CAT_PAD = tl.constexpr(0)  # left padding: a low-tier segment of its own
CAT_SINK = tl.constexpr(1)  # an attention sink: a high-tier segment of its own
CAT_SALIENT = tl.constexpr(2)
CAT_REGULAR = tl.constexpr(3)


@triton.jit(do_not_specialize=["n", "n_sink"])
def zipcache_rank_kernel(
    ACC,  # fp32 [S, n] the tokens' accumulated attention, row stride sa
    CNT,  # fp32 [S, n] how many queries saw each, row stride sc
    P,  # int16/int32 [S, n] positions, row stride sp
    FV,  # int32 [B] each sequence's first valid position
    KEY,  # fp32 [S, n] out: the ranking key, columns reversed
    CAT,  # int8 [S, n] out: CAT_PAD, CAT_SINK or CAT_REGULAR (salient ones marked later)
    n,
    n_sink,
    kv_heads,
    sa,
    sc,
    sp,
    LAYER: tl.constexpr,
    NORMALIZED: tl.constexpr,
    BLOCK: tl.constexpr,
):
    """ZipCache's ranking keys and categories for one classification, one program per stream
    (what ``TritonLayerStore._classify_zipcache`` did in ~30 torch ops): each token's score
    (the accumulated attention, divided by its count when ``NORMALIZED``, correctly rounded;
    summed over the sequence's kv-heads first with ``LAYER``), its category (left padding;
    the first ``n_sink`` valid positions, the attention sinks; the rest regular), and the
    key that an ascending stable sort ranks by: ``-score`` for an eligible token (valid, not
    a sink; a NaN score as -inf, +-inf as the largest finite values, as ``torch.nan_to_num``
    maps them), NaN (after every number) for the others, written with the columns reversed
    so that a stable sort puts the more recent of two equal scores first (ties go to the more
    recent token, as the Rust store's ``importance::top_k``)."""
    s = tl.program_id(0)
    b = s // kv_heads
    s64 = s.to(tl.int64)
    fv = tl.load(FV + b)
    cols = tl.arange(0, BLOCK)
    for c0 in range(0, n, BLOCK):
        c = c0 + cols
        ok = c < n
        if LAYER:
            a = tl.full([BLOCK], 0.0, tl.float32)
            k = tl.full([BLOCK], 0.0, tl.float32)
            for h in range(kv_heads):  # in head order, as a sum over the heads' axis
                r = (b * kv_heads + h).to(tl.int64)
                a += tl.load(ACC + r * sa + c, mask=ok, other=0.0)
                k += tl.load(CNT + r * sc + c, mask=ok, other=0.0)
        else:
            a = tl.load(ACC + s64 * sa + c, mask=ok, other=0.0)
            k = tl.load(CNT + s64 * sc + c, mask=ok, other=0.0)
        if NORMALIZED:
            score = tl.where(k > 0, tl.div_rn(a, tl.where(k > 0, k, 1.0)), 0.0)
        else:
            score = a
        big = 3.4028234663852886e38
        score = tl.where(score == float("inf"), big, score)
        score = tl.where(score == float("-inf"), -big, score)
        score = tl.where(score != score, float("-inf"), score)
        p = tl.load(P + s64 * sp + c, mask=ok, other=-1).to(tl.int32)
        valid = p >= fv
        sink = valid & (p < fv + n_sink)
        key = tl.where(valid & ~sink, -score, float("nan"))
        tl.store(KEY + s64 * n + (n - 1 - c), key, mask=ok)
        cat = tl.where(valid, tl.where(sink, CAT_SINK, CAT_REGULAR), CAT_PAD)
        tl.store(CAT + s64 * n + c, cat.to(tl.int8), mask=ok)


@triton.jit(do_not_specialize=["n"])
def mark_salient_kernel(
    ORDER,  # int64 [S, n] the stable ascending sort's indices of zipcache_rank_kernel's keys
    CAT,  # int8 [S, n] the categories, updated in place
    KS,  # int64 [B] each sequence's salient count
    n,
    kv_heads,
    BLOCK: tl.constexpr,
):
    """The first ``KS[b]`` tokens of stream ``s``'s ranking (``b``: its sequence; the sort's
    indices count the reversed columns) become salient where they are regular: ineligible
    tokens' NaN keys sort last, so they are among the first only when fewer tokens are
    eligible than salient."""
    s = tl.program_id(0).to(tl.int64)
    k = tl.minimum(tl.load(KS + s // kv_heads), n)  # never past the row
    cols = tl.arange(0, BLOCK)
    for i0 in range(0, k, BLOCK):
        i = i0 + cols
        ok = i < k
        col = n - 1 - tl.load(ORDER + s * n + i, mask=ok, other=0)
        cat = tl.load(CAT + s * n + col, mask=ok, other=CAT_PAD)
        salient = tl.full([BLOCK], CAT_SALIENT, tl.int8)
        tl.store(CAT + s * n + col, salient, mask=ok & (cat == CAT_REGULAR))


@triton.jit
def _rows(X, XS, IDX, NI, s, r, ok, c, D: tl.constexpr, HAS_IDX: tl.constexpr):
    """Rows ``r`` (where ``ok``; else 0) of stream ``s`` and channels ``c`` of ``X`` in fp32:
    ``X`` holds each stream's rows of ``D`` channels back to back, streams ``XS`` elements
    apart; with ``HAS_IDX`` row ``r`` is the stream's row ``IDX[s * NI + r]`` (the tiers' rows
    are read where the buffer holds them, not first gathered into a copy). ``X`` may be fp16 or
    bf16 (the buffer's rows as they are stored, without a full-size fp32 copy of the prompt
    first): every such value widens to fp32 exactly, so the quantizers see the values an fp32
    input would give them."""
    if HAS_IDX:
        r = tl.load(IDX + s * NI + r, mask=ok, other=0)
    x = tl.load(X + s * XS + r[:, None] * D + c[None, :], mask=ok[:, None], other=0.0)
    return x.to(tl.float32)


@triton.jit
def quantize_token_groups_kernel(
    X,  # each stream's rows, fp32, fp16 or bf16 (see `_rows`)
    XS,  # elements between streams in X
    IDX,  # int64 [S, N]: the source row of each row (HAS_IDX)
    FAC,  # fp16 channel factors (HAS_FAC): row r's at FAC + s * FSS + (F0 + r // RB) * FBS
    CODES,  # uint8 [S, cap, D*BITS/8]
    SC,  # fp16 [S, cap, G]
    OF,
    SHR,  # fp32 [NSHR] shrink factors (CLIP)
    FSS,  # FAC's stream stride, first segment and segment stride (elements)
    F0,
    FBS,
    N,
    RB,  # rows of each segment (the rows are N / RB segments back to back)
    cap,
    row0,  # first destination row
    D: tl.constexpr,
    GS: tl.constexpr,
    BITS: tl.constexpr,
    HAS_FAC: tl.constexpr,
    BR: tl.constexpr,
    CLIP: tl.constexpr,
    NSHR: tl.constexpr,
    HAS_IDX: tl.constexpr,
    MARGIN: tl.constexpr,  # see `_grid`
):
    s = tl.program_id(0).to(tl.int64)
    r = tl.program_id(1) * BR + tl.arange(0, BR)
    ok = r < N
    c = tl.arange(0, D)
    x = _rows(X, XS, IDX, N, s, r, ok, c, D, HAS_IDX)
    if HAS_FAC:
        at = s * FSS + (F0 + r // RB).to(tl.int64) * FBS
        f = tl.load(FAC + at[:, None] + c[None, :], mask=ok[:, None], other=1.0)
        x = tl.div_rn(x, f.to(tl.float32))
    G: tl.constexpr = D // GS
    xg = tl.reshape(x, [BR, G, GS])
    top: tl.constexpr = (1 << BITS) - 1
    scale, offset = _grid(xg, top, SHR, NSHR, CLIP, MARGIN)
    sf = scale.to(tl.float32)
    of = offset.to(tl.float32)
    div = tl.where(sf == 0.0, 1.0, sf)
    y = _div_fp16(xg - of[:, :, None], div[:, :, None], (1.0 / div)[:, :, None]) + 0.5
    y = tl.minimum(tl.maximum(y, 0.0), top)
    code = tl.where(sf[:, :, None] == 0.0, 0, y.to(tl.int32))
    dst = s * cap + row0 + r
    _store_codes(CODES, tl.reshape(code, [BR, D]), dst, ok, 0, BR, D, D, BITS)
    gi = tl.arange(0, G)
    tl.store(SC + dst[:, None] * G + gi[None, :], scale, mask=ok[:, None])
    tl.store(OF + dst[:, None] * G + gi[None, :], offset, mask=ok[:, None])


#: Below this, an fp32 sum of squares may have lost terms to underflow (a squared error under
#: fp32's smallest normal, ~1.2e-38): the float64 search decides (see :func:`_grid`).
_TINY: tl.constexpr = tl.constexpr(1e-28)


@triton.jit
def _grid(xg, top: tl.constexpr, SHR, NSHR: tl.constexpr, CLIP: tl.constexpr, MARGIN: tl.constexpr):
    """The fp16 grid ``(scale, offset)`` of each token group of ``xg [BR, G, GS]``: its
    min-max grid, or with ``CLIP`` the grid of least :func:`_group_error` among that one and
    the range shrunk about its midpoint by each factor of ``SHR``, the first on a tie
    (``src/quant/clip.rs``; a constant range, scale 0, is not searched). The per-channel
    grids make the same choice from chunked partial sums (``channel_choose_kernel``).

    The search runs in fp32 first (:func:`_group_error32`: no float64 conversion, the
    search's bottleneck on the GPU), and its choice is the float64 one unless a decision is
    within ``MARGIN`` of flipping, relative to what fp32 rounding can move it: the best two
    errors, or a grid's shrink sum against 0. Then the whole tile is searched again in
    float64 (:func:`_grid64`), so the grids are the float64 search's in every case (a
    negative ``MARGIN`` always searches in float64)."""
    lo = _min(xg, 2)
    hi = _max(xg, 2)
    scale = _fp16_scale(lo, hi, top)
    offset = lo.to(tl.float16)
    if CLIP:
        searched = scale != 0.0
        inf = float("inf")
        best, ok, near = _group_error32(xg, scale, offset, top, CLIP, MARGIN)
        best = tl.where(ok, best, inf)
        second = tl.full(best.shape, inf, tl.float32)
        mid, half = _mid_half(lo, hi)
        chosen_sc, chosen_of = scale, offset
        for i in range(NSHR):
            sc_i, of_i = _shrunk(mid, half, SHR, i, top)
            err, ok, near_i = _group_error32(xg, sc_i, of_i, top, CLIP, MARGIN)
            near = near | near_i
            err = tl.where(ok, err, inf)
            better = err < best
            second = tl.where(better, best, tl.minimum(second, err))
            chosen_sc = tl.where(better, sc_i, chosen_sc)
            chosen_of = tl.where(better, of_i, chosen_of)
            best = tl.where(better, err, best)
        near = near | _near_tie(best, second, MARGIN) | (best < _TINY)
        if MARGIN >= 0:
            redo = _max(_max((near & searched).to(tl.int32), 1), 0) > 0
        else:
            redo = True
        if redo:
            scale, offset = _grid64(xg, scale, offset, lo, hi, top, SHR, NSHR, CLIP)
        else:
            scale = tl.where(searched, chosen_sc, scale)
            offset = tl.where(searched, chosen_of, offset)
    return scale, offset


@triton.jit
def _fp16_scale(lo, hi, top: tl.constexpr):
    """The fp16 scale of the range ``[lo, hi]`` on ``top + 1`` codes, from the correctly
    rounded quotient ``(hi - lo) / top`` (as ``Affine::from_range``)."""
    return tl.div_rn(hi - lo, tl.full(lo.shape, top, tl.float32)).to(tl.float16)


@triton.jit
def _mid_half(lo, hi):
    """The midpoint and half-width of ``[lo, hi]`` that the shrunk ranges start from, rounded
    as ``src/quant/clip.rs``'s ``shrunk_range`` rounds them."""
    return _product(lo + hi, tl.full(lo.shape, 0.5, tl.float32)), (hi - lo) * 0.5


@triton.jit
def _product(a, b):
    """``a * b`` rounded once on its own, never fused into a following sum: ``mid - s *
    half`` must round twice, as in the Rust quantizer, but the range searches' kernels are
    compiled with fp contraction (their fp32 error sums are filters checked by a margin, and
    contracting them saves instructions in the hot loop), which would fuse the product into
    the difference (the midpoint's ``(lo + hi) * 0.5`` too, which is exact but for
    subnormals). An fma with a zero addend is the rounded product and is not a multiply the
    compiler may contract (``x * y + 0.0`` differs from ``x * y`` for a product of -0;
    compiled for sm_90 it stays an ``FFMA`` with the zero register)."""
    return tl.fma(a, b, tl.full(b.shape, 0.0, tl.float32))


@triton.jit
def _shrunk(mid, half, SHR, i, top: tl.constexpr):
    """The fp16 grid of the range ``mid -+ half`` shrunk by ``SHR[i]`` about its midpoint."""
    s_i = tl.load(SHR + i)
    p = _product(s_i, half)
    a = mid - p
    b = mid + p
    return _fp16_scale(a, b, top), a.to(tl.float16)


@triton.jit
def _near_tie(best, second, MARGIN: tl.constexpr):
    """Whether the runner-up's error ``second`` is within ``MARGIN`` of the ``best`` (both
    finite: an infinite runner-up, no valid second grid, is no tie)."""
    two = second < float("inf")  # then `best` is finite too
    b = tl.where(two, best, 0.0)
    return two & (tl.where(two, second, 0.0) - b <= MARGIN * b)


@triton.jit
def _grid64(
    xg, scale, offset, lo, hi, top: tl.constexpr, SHR, NSHR: tl.constexpr, CLIP: tl.constexpr
):
    """:func:`_grid`'s search in float64, from the min-max grid ``scale``, ``offset``."""
    searched = scale != 0.0
    best = _group_error(xg, scale, offset, top, CLIP)
    mid, half = _mid_half(lo, hi)
    for i in range(NSHR):
        sc_i, of_i = _shrunk(mid, half, SHR, i, top)
        err = _group_error(xg, sc_i, of_i, top, CLIP)
        better = searched & (err < best)
        scale = tl.where(better, sc_i, scale)
        offset = tl.where(better, of_i, offset)
        best = tl.where(better, err, best)
    return scale, offset


@triton.jit
def _group_error32(xg, scale, offset, top, CLIP: tl.constexpr, MARGIN: tl.constexpr):
    """:func:`_group_error` in fp32, with whether the grid passes the shrink test (``CLIP ==
    2``) and whether that test is within ``MARGIN`` of the other answer (``|sum(d * x)| <=
    MARGIN * sum(|d * x|)``: fp32 rounding could have flipped it)."""
    sf = scale.to(tl.float32)[:, :, None]
    of = offset.to(tl.float32)[:, :, None]
    d = _reconstruct(xg, sf, of, top) - xg
    err = _sum(d * d, 2)
    if CLIP == 2:
        dx = d * xg
        shrink = _sum(dx, 2)
        ok = shrink >= 0.0
        mag = _sum(tl.abs(dx), 2)
        near = (tl.abs(shrink) <= MARGIN * mag) | (mag < _TINY)
    else:
        ok = err == err
        near = err != err
    return err, ok, near


@triton.jit
def _div_fp16(a, b, rb):
    """``a / b`` correctly rounded, as an IEEE division (the Rust quantizer's), for divisors
    ``b`` that are fp16 values (the stored scales), given ``rb``, ``1 / b`` within a few ulp
    (Triton's ``/``, computed once per group, not per element).

    Triton compiles ``/`` to the GPU's ``div.full.f32`` (within 2 ulp), so a code at a
    rounding boundary could differ from the Rust store's; ``tl.div_rn`` is exact but costs a
    dozen instructions and a slow-path check per element. Instead one Markstein step: ``q =
    a * rb`` is within ~3 ulp of ``a / b``; its residual ``a - b * q`` is exact by an fma
    (``b`` has 11 significant bits, so it fits in fp32); and ``q + residual * rb`` is within
    2^-20 ulp of ``a / b``, which lies at least 2^-12 ulp from any midpoint between fp32
    numbers (``a`` has 24 significant bits, ``b`` 11, and a quotient is never a midpoint), so
    the fma rounds it to the correctly rounded quotient, whether ``rb`` was rounded
    correctly (the interpreter) or not (the GPU). The interpreter's fma is exact too, so the
    CPU tests run this arithmetic. No overflow: ``|a| <= 2 * 65504`` (the store refuses
    larger inputs) and ``rb <= 2^24``; a residual that underflows (``|a| < 2^-100``) leaves
    a quotient far below any code boundary. An infinite ``b`` (an fp16 scale that
    overflowed) gives NaN where the division gives 0, and a dividend of -0 gives +0 where
    it gives -0: code 0 either way."""
    q = a * rb
    return tl.fma(tl.fma(-q, b, a), rb, q)


@triton.jit
def _reconstruct(x, sf, of, top):
    """``x`` on the grid (fp32 ``sf``, ``of`` broadcast to it), as the decoder rebuilds it.

    The range searches evaluate this for every candidate grid and element, so it avoids the
    conversion pipe (a quarter of the fp32 rate on the GPU): the code ``trunc(y)`` of
    ``0 <= y <= top`` is taken as ``round(y)`` by the 2^23 trick, less 1 where that rounded
    up, which is the same integer; and a constant group (``sf == 0``) needs no code of 0,
    since ``0 * code + of`` is ``of`` for any code. The quotient is :func:`_div_fp16`'s, the
    correctly rounded one, from one reciprocal per grid (not per element)."""
    div = tl.where(sf == 0.0, 1.0, sf)
    y = _div_fp16(x - of, div, 1.0 / div) + 0.5
    y = tl.minimum(tl.maximum(y, 0.0), top)
    code = (y + 8388608.0) - 8388608.0
    code = tl.where(code > y, code - 1.0, code)
    return sf * code + of


@triton.jit
def _group_error(xg, scale, offset, top, CLIP: tl.constexpr):
    """Squared error of the token groups ``xg [BR, G, GS]`` on their fp16 grids ``[BR, G]``,
    summed over each group in float64; with ``CLIP == 2`` a grid that shrinks its group
    (``sum((x̂ - x) * x) < 0``) scores the largest float64."""
    sf = scale.to(tl.float32)[:, :, None]
    of = offset.to(tl.float32)[:, :, None]
    d = (_reconstruct(xg, sf, of, top) - xg).to(tl.float64)
    err = _sum(d * d, 2)
    if CLIP == 2:
        err = tl.where(_sum(d * xg.to(tl.float64), 2) < 0.0, 1.7976931348623157e308, err)
    return err


@triton.jit
def _chunk(NR, s, NBLK, NCH, CHUNK: tl.constexpr):
    """The chunk of grid axis 2 in the channel kernels: its segment ``blk``, its index ``ch``
    in the segment, and its rows ``[r_lo, r_hi)`` of the segment (none past the stream's real
    rows ``NR[s, blk]``: a chunk past them is empty, ``r_hi = r_lo``, so that the count of
    whole tiles ``(r_hi - r_lo) // BR`` is never negative and means the same whether integer
    division truncates, as Triton's does, or floors, as Python's)."""
    q = tl.program_id(2)
    blk = q // NCH
    ch = q % NCH
    r_lo = ch * CHUNK
    r_hi = tl.minimum(r_lo + CHUNK, tl.load(NR + s * NBLK + blk))
    return blk, ch, r_lo, tl.maximum(r_hi, r_lo)


@triton.jit
def _errors_run(
    e2, ex, em, X, XS, IDX, N, s, base, lo, hi, r_hi, c, sf, of, top,
    D: tl.constexpr, BR: tl.constexpr, HAS_IDX: tl.constexpr, MASKED: tl.constexpr,
    F64: tl.constexpr,
):  # fmt: skip
    """``e2``, ``ex`` and ``em`` plus the squared errors, shrink terms ``(x̂ - x) * x`` and
    their magnitudes of the candidate grids ``sf``, ``of`` ``[NCP, 1, CB]`` on the tiles of
    rows ``lo .. hi`` (elementwise; in float64 with ``F64``, where ``em`` is not kept);
    ``MASKED``: rows at or past ``r_hi`` add nothing (the last, partial tile)."""
    for r0 in range(lo, hi, BR):
        r = r0 + tl.arange(0, BR)
        x = _rows(X, XS, IDX, N, s, base + r, r < r_hi, c, D, HAS_IDX)[None, :, :]
        d = _reconstruct(x, sf, of, top) - x
        if MASKED:
            d = tl.where((r < r_hi)[None, :, None], d, 0.0)
        if F64:
            d = d.to(tl.float64)
            e2 += d * d
            ex += d * x.to(tl.float64)
        else:
            dx = d * x
            e2 += d * d
            ex += dx
            em += tl.abs(dx)
    return e2, ex, em


@triton.jit
def _errors_span(
    e2, ex, em, X, XS, IDX, N, s, base, r_lo, r_hi, c, sf, of, top,
    D: tl.constexpr, BR: tl.constexpr, HAS_IDX: tl.constexpr, F64: tl.constexpr,
):  # fmt: skip
    """:func:`_errors_run` over rows ``r_lo .. r_hi``: the whole tiles unmasked, then the
    partial one."""
    full = r_lo + (r_hi - r_lo) // BR * BR
    e2, ex, em = _errors_run(
        e2, ex, em, X, XS, IDX, N, s, base, r_lo, full, r_hi, c, sf, of, top,
        D, BR, HAS_IDX, False, F64,
    )  # fmt: skip
    return _errors_run(
        e2, ex, em, X, XS, IDX, N, s, base, full, r_hi, r_hi, c, sf, of, top,
        D, BR, HAS_IDX, True, F64,
    )  # fmt: skip


@triton.jit
def channel_partials_kernel(
    X,  # each stream's rows (as `_rows` reads them): NBLK segments of BSTRIDE rows
    XS,  # elements between streams in X
    IDX,  # int64 [S, N]: the source row of each row (HAS_IDX)
    NR,  # int32 [S, NBLK]: real rows of each stream's segment (the rest are holes)
    OUT0,  # MODE 0: fp32 [S, NBLK, NCH, D] chunk minima; else f64 [NC, S, NBLK, NCH, D] errors
    OUT1,  # MODE 0: chunk maxima; else f64 sums of (x̂ - x) * x (does the grid shrink?)
    OUT2,  # MODE 1: f64 sums of |(x̂ - x) * x| (how far fp32 rounding could move OUT1)
    LO,  # MODE 1: MODE 0's chunk minima and maxima, whose candidate grids are tried
    HI,
    SHR,  # fp32 [NC - 1] shrink factors (MODE 1)
    N,
    BSTRIDE,
    NBLK,
    NCH,  # chunks of CHUNK rows per segment
    NC,  # candidate grids (MODE 1)
    D: tl.constexpr,
    BITS: tl.constexpr,
    CB: tl.constexpr,  # channels per program
    CHUNK: tl.constexpr,
    BR: tl.constexpr,
    MODE: tl.constexpr,  # 0: min and max; 1: every candidate grid's errors
    HAS_IDX: tl.constexpr,
    NCP: tl.constexpr,  # candidates per pass over the chunk (MODE 1), a power of two
):
    """One chunk of one segment's rows for ``CB`` channels: its minima and maxima, or every
    candidate grid's squared error and shrink sum, in fp32 (``channel_choose_kernel``
    combines the chunks in float64 and searches again in float64, from exact squares as
    ``src/quant/clip.rs`` sums them, where fp32 rounding could have changed the choice), so a
    long segment is spread over the whole GPU instead of one program per channel block.

    A candidate's sums run elementwise over the chunk's tiles of ``BR`` rows and are reduced
    over the rows once: reducing every tile across the program's warps (the first design,
    with the chunk held in registers) cost more than the errors themselves. The tiles are
    read again for each pass of ``NCP`` candidates, from the cache."""
    s = tl.program_id(0).to(tl.int64)
    c = tl.program_id(1) * CB + tl.arange(0, CB)
    blk, ch, r_lo, r_hi = _chunk(NR, s, NBLK, NCH, CHUNK)
    base = blk * BSTRIDE  # the segment's first row
    part = (s * NBLK + blk) * NCH + ch
    if MODE == 0:
        lo = tl.full([BR, CB], float("inf"), tl.float32)
        hi = tl.full([BR, CB], float("-inf"), tl.float32)
        for r0 in range(r_lo, r_hi, BR):
            r = r0 + tl.arange(0, BR)
            ok = (r < r_hi)[:, None]
            x = _rows(X, XS, IDX, N, s, base + r, r < r_hi, c, D, HAS_IDX)
            lo = tl.minimum(lo, tl.where(ok, x, float("inf")))
            hi = tl.maximum(hi, tl.where(ok, x, float("-inf")))
        tl.store(OUT0 + part * D + c, _min(lo, 0))
        tl.store(OUT1 + part * D + c, _max(hi, 0))
    else:
        top: tl.constexpr = (1 << BITS) - 1
        streams = tl.num_programs(0)
        lo, hi = _segment_range(LO, HI, NR, s, blk, NBLK, NCH, c, D)
        # NCP candidates at a time, a [NCP, BR, CB] tile of errors per row tile: a row's load
        # is shared by the NCP candidates, and the sums run elementwise in fp32, reduced over
        # the rows once. Candidates past NC are computed on a dummy grid and not stored.
        for i0 in range(0, NC, NCP):
            ci = i0 + tl.arange(0, NCP)
            cm = (ci < NC)[:, None]
            sf, of = _candidate(lo[None, :], hi[None, :], tl.minimum(ci, NC - 1)[:, None], SHR, top)
            sf, of = sf[:, None, :], of[:, None, :]
            e2 = tl.full([NCP, BR, CB], 0.0, tl.float32)
            ex = tl.full([NCP, BR, CB], 0.0, tl.float32)
            em = tl.full([NCP, BR, CB], 0.0, tl.float32)
            e2, ex, em = _errors_span(
                e2, ex, em, X, XS, IDX, N, s, base, r_lo, r_hi, c, sf, of, top,
                D, BR, HAS_IDX, False,
            )  # fmt: skip
            out = (ci[:, None] * streams * NBLK * NCH + part) * D + c[None, :]
            tl.store(OUT0 + out, _sum(e2, 1).to(tl.float64), mask=cm)
            tl.store(OUT1 + out, _sum(ex, 1).to(tl.float64), mask=cm)
            tl.store(OUT2 + out, _sum(em, 1).to(tl.float64), mask=cm)


@triton.jit
def _segment_range(LO, HI, NR, s, blk, NBLK, NCH, c, D: tl.constexpr):
    """Segment ``blk``'s per-channel minima and maxima ``[CB]`` from its chunks' partials
    (``channel_partials_kernel`` MODE 0: a chunk past the real rows holds +inf / -inf), or 0
    and 0 for a segment with no real row (as the Rust quantizer ranges an empty group)."""
    at = (s * NBLK + blk) * NCH
    lo = tl.load(LO + at * D + c)
    hi = tl.load(HI + at * D + c)
    for ch in range(1, NCH):
        lo = tl.minimum(lo, tl.load(LO + (at + ch) * D + c))
        hi = tl.maximum(hi, tl.load(HI + (at + ch) * D + c))
    empty = tl.load(NR + s * NBLK + blk) == 0
    return tl.where(empty, 0.0, lo), tl.where(empty, 0.0, hi)


@triton.jit
def _candidate(lo, hi, i, SHR, top: tl.constexpr):
    """Candidate grid ``i`` of the range ``[lo, hi]`` as fp16 values in fp32: ``i == 0`` the
    min-max grid, ``i >= 1`` the range shrunk about its midpoint by ``SHR[i - 1]``
    (``src/quant/clip.rs``; as :func:`_grid` for token groups). The divisions are correctly
    rounded and ``mid - s * half`` rounds twice (:func:`_product`: the channel kernels that
    call this are compiled with fp contraction), as in the Rust quantizer."""
    s_i = tl.load(SHR + tl.maximum(i - 1, 0))
    mid, half = _mid_half(lo, hi)
    p = _product(s_i, half)
    a = tl.where(i == 0, lo, mid - p)
    b = tl.where(i == 0, hi, mid + p)
    scale = _fp16_scale(a, b, top)
    return scale.to(tl.float32), a.to(tl.float16).to(tl.float32)


@triton.jit
def channel_choose_kernel(
    X,  # each stream's rows, as for channel_partials_kernel (the float64 search reads them)
    XS,
    IDX,
    LO,  # fp32 [S, NBLK, NCH, D]: the chunks' minima (channel_partials_kernel MODE 0)
    HI,  # their maxima
    NR,  # int32 [S, NBLK]: real rows of each segment
    ERR,  # f64 [NC, S, NBLK, NCH, D]: the candidates' chunk errors (MODE 1; CLIP)
    GROW,  # f64, the same shape: their sums of (x̂ - x) * x
    MAG,  # f64, the same shape: their sums of |(x̂ - x) * x|
    SHR,  # fp32 [NC - 1] shrink factors (CLIP)
    SC,  # fp16 [S, SEGCAP, D]: the tier's per-channel scales; segment b goes to SEG0 + b
    OF,  # the same, offsets
    N,
    BSTRIDE,
    NBLK,
    NCH,
    NC,
    SEGCAP,
    SEG0,
    D: tl.constexpr,
    BITS: tl.constexpr,
    CB: tl.constexpr,
    BR: tl.constexpr,
    HAS_IDX: tl.constexpr,
    CLIP: tl.constexpr,  # 0 min-max, 1 least squared error, 2 the same among unshrinking grids
    MARGIN: tl.constexpr,  # see `_grid`; here relative to the chunks' fp32 sums
):
    """Each segment's per-channel grid, written into the tier: min-max, or with ``CLIP`` the
    candidate of least error summed over the chunks, the first on a tie, as the Rust search
    keeps a candidate only when strictly better; ``CLIP == 2`` skips a grid that shrinks its
    channel (``sum((x̂ - x) * x) < 0``); a constant channel (min-max scale 0) keeps min-max.
    Where the chunks' fp32 sums leave a decision within ``MARGIN`` of flipping (as
    :func:`_grid`), the program searches its channels again in float64 over the segment's
    rows, so the choice is the float64 search's. One program per (stream, channel block,
    segment): the choice stays on the device, without the torch ops that combined the chunks
    (a few dozen host ops per push, the classification's largest host cost)."""
    s = tl.program_id(0).to(tl.int64)
    c = tl.program_id(1) * CB + tl.arange(0, CB)
    blk = tl.program_id(2)
    top: tl.constexpr = (1 << BITS) - 1
    lo, hi = _segment_range(LO, HI, NR, s, blk, NBLK, NCH, c, D)
    scale, offset = _candidate(lo, hi, tl.full([CB], 0, tl.int32), SHR, top)
    if CLIP:
        streams = tl.num_programs(0)
        at = (s * NBLK + blk) * NCH
        inf = float("inf")
        best = tl.full([CB], inf, tl.float64)
        second = tl.full([CB], inf, tl.float64)
        best_i = tl.full([CB], 0, tl.int32)
        near = best != best
        for i in range(0, NC):
            err = tl.full([CB], 0.0, tl.float64)
            grow = tl.full([CB], 0.0, tl.float64)
            mag = tl.full([CB], 0.0, tl.float64)
            for ch in range(0, NCH):
                o = ((i * streams * NBLK * NCH) + at + ch) * D + c
                err += tl.load(ERR + o)
                grow += tl.load(GROW + o)
                mag += tl.load(MAG + o)
            if CLIP == 2:
                near = near | (tl.abs(grow) <= MARGIN * mag) | (mag < _TINY)
                err = tl.where(grow < 0.0, inf, err)
            better = err < best
            second = tl.where(better, best, tl.minimum(second, err))
            best_i = tl.where(better, i, best_i)
            best = tl.where(better, err, best)
        near = near | _near_tie(best, second, MARGIN) | (best < _TINY)
        searched = scale != 0.0
        if MARGIN >= 0:
            redo = _max((near & searched).to(tl.int32), 0) > 0
        else:
            redo = True
        if redo:
            best_i = _search64(
                X, XS, IDX, N, tl.load(NR + s * NBLK + blk), s, blk * BSTRIDE, c, lo, hi,
                SHR, NC, top, D, CB, BR, HAS_IDX, CLIP,
            )  # fmt: skip
        best_i = tl.where(searched, best_i, 0)
        scale, offset = _candidate(lo, hi, best_i, SHR, top)
    dst = (s * SEGCAP + SEG0 + blk) * D + c
    tl.store(SC + dst, scale.to(tl.float16))
    tl.store(OF + dst, offset.to(tl.float16))


@triton.jit
def _search64(
    X, XS, IDX, N, nr, s, base, c, lo, hi, SHR, NC, top: tl.constexpr,
    D: tl.constexpr, CB: tl.constexpr, BR: tl.constexpr, HAS_IDX: tl.constexpr,
    CLIP: tl.constexpr,
):  # fmt: skip
    """The index of the chosen candidate grid of channels ``c`` over a segment's ``nr`` rows
    from ``base``, searched in float64 (``src/quant/clip.rs``'s rule, as
    ``channel_choose_kernel``), one candidate per pass over the rows: the rare path."""
    best = tl.full([CB], float("inf"), tl.float64)
    best_i = tl.full([CB], 0, tl.int32)
    for i in range(0, NC):
        sf, of = _candidate(lo, hi, tl.full([CB], i, tl.int32), SHR, top)
        sf, of = sf[None, None, :], of[None, None, :]
        e2 = tl.full([1, BR, CB], 0.0, tl.float64)
        ex = tl.full([1, BR, CB], 0.0, tl.float64)
        unused = tl.full([1, BR, CB], 0.0, tl.float64)
        e2, ex, unused = _errors_span(
            e2, ex, unused, X, XS, IDX, N, s, base, 0, nr, c, sf, of, top, D, BR, HAS_IDX, True,
        )  # fmt: skip
        err = _sum(_sum(e2, 1), 0)
        if CLIP == 2:
            err = tl.where(_sum(_sum(ex, 1), 0) < 0.0, float("inf"), err)
        better = err < best
        best_i = tl.where(better, i, best_i)
        best = tl.where(better, err, best)
    return best_i


@triton.jit
def channel_factor_kernel(
    LO,  # fp32 [S, NBLK, NCH, D]: the chunks' minima (channel_partials_kernel MODE 0)
    HI,
    NR,  # int32 [S, NBLK]
    VF,  # fp16 [S, SEGCAP, D]: the tier's separable factors; segment b goes to SEG0 + b
    NBLK,
    NCH,
    SEGCAP,
    SEG0,
    D: tl.constexpr,
    CB: tl.constexpr,
):
    """ZipCache's channel-separable factors of each segment: ``sqrt(max |x|)`` per channel
    over its real rows, in fp16 (1 for a channel of zeros or a segment with no real row)."""
    s = tl.program_id(0).to(tl.int64)
    c = tl.program_id(1) * CB + tl.arange(0, CB)
    blk = tl.program_id(2)
    lo, hi = _segment_range(LO, HI, NR, s, blk, NBLK, NCH, c, D)
    amax = tl.maximum(-lo, hi)
    f = tl.where(amax > 0.0, tl.sqrt_rn(tl.maximum(amax, 0.0)), 1.0)
    tl.store(VF + (s * SEGCAP + SEG0 + blk) * D + c, f.to(tl.float16))


@triton.jit
def encode_channels_kernel(
    X,  # each stream's rows, laid out as for channel_partials_kernel
    XS,
    IDX,
    NR,  # int32 [S, NBLK]
    CODES,  # uint8 [S, cap, D*BITS/8]
    SC,  # fp16 [S, SEGCAP, D]: the tier's per-channel scales, segment b's at SEG0 + b
    OF,  # the same, offsets
    SEGCAP,
    SEG0,
    N,
    cap,
    row0,  # destination row of segment 0; segment b goes to row0 + b * BSTRIDE
    BSTRIDE,
    NBLK,
    NCH,
    D: tl.constexpr,
    BITS: tl.constexpr,
    CB: tl.constexpr,
    CHUNK: tl.constexpr,
    BR: tl.constexpr,
    HAS_IDX: tl.constexpr,
):
    """The codes of one chunk of one segment's rows for ``CB`` channels on their chosen grid."""
    s = tl.program_id(0).to(tl.int64)
    c = tl.program_id(1) * CB + tl.arange(0, CB)
    blk, _, r_lo, r_hi = _chunk(NR, s, NBLK, NCH, CHUNK)
    sf = tl.load(SC + (s * SEGCAP + SEG0 + blk) * D + c).to(tl.float32)
    of = tl.load(OF + (s * SEGCAP + SEG0 + blk) * D + c).to(tl.float32)
    div = tl.where(sf == 0.0, 1.0, sf)
    rdiv = 1.0 / div
    top: tl.constexpr = (1 << BITS) - 1
    base = blk * BSTRIDE  # the segment's first row, in X and (plus row0) in the tier
    for r0 in range(r_lo, r_hi, BR):
        r = r0 + tl.arange(0, BR)
        ok = r < r_hi
        x = _rows(X, XS, IDX, N, s, base + r, ok, c, D, HAS_IDX)
        y = _div_fp16(x - of[None, :], div[None, :], rdiv[None, :]) + 0.5
        y = tl.minimum(tl.maximum(y, 0.0), top)
        code = tl.where(sf[None, :] == 0.0, 0, y.to(tl.int32))
        dst = s * cap + row0 + base + r
        _store_codes(CODES, code, dst, ok, tl.program_id(1) * CB, BR, CB, D, BITS)


@triton.jit
def _store_codes(
    CODES,
    code,  # int32 [BR, W]: the codes of channels c0 .. c0 + W of rows `dst`
    dst,
    ok,
    c0,
    BR: tl.constexpr,
    W: tl.constexpr,
    D: tl.constexpr,
    BITS: tl.constexpr,
):
    """Pack ``code`` least significant bit first into rows of ``D * BITS / 8`` bytes, as the
    Rust packer (``src/quant/packing.rs``) packs a row: code ``i`` at bits ``[i*BITS,
    (i+1)*BITS)`` of the row. ``c0`` and ``W`` are multiples of 8 (whole bytes for any width)."""
    B: tl.constexpr = D * BITS // 8
    if 8 % BITS == 0:
        PER: tl.constexpr = 8 // BITS
        shifts = tl.arange(0, PER) * BITS
        packed = _sum(tl.reshape(code, [BR, W // PER, PER]) << shifts[None, None, :], 2)
        col = c0 // PER + tl.arange(0, W // PER)
        tl.store(CODES + dst[:, None] * B + col[None, :], packed.to(tl.uint8), mask=ok[:, None])
    else:
        # Eight codes make BITS whole bytes: pack them into one word, store its bytes.
        shifts = tl.arange(0, 8) * BITS
        word = _sum(tl.reshape(code, [BR, W // 8, 8]) << shifts[None, None, :], 2)
        base = (c0 // 8 + tl.arange(0, W // 8)) * BITS
        for k in tl.static_range(BITS):
            byte = ((word >> (8 * k)) & 255).to(tl.uint8)
            tl.store(CODES + dst[:, None] * B + (base + k)[None, :], byte, mask=ok[:, None])


@triton.jit
def dequantize_kernel(
    POS,  # int32 [S, cap]
    KD,
    KS,
    KO,
    KSEG,  # int32 block table of a segmented tier (`TierView.seg`)
    KFIX,  # fp16 [S, D] fixed key factor (K_FIX)
    VD,
    VS,
    VO,
    VF,
    OUTK,  # fp32 [S, T, D]: row `pos` of the stream receives the token at `pos`
    OUTV,
    ROT,  # fp32 [D, D] the store's randomized Hadamard rotation (ROTATE)
    cap,
    nseg,
    T,
    D: tl.constexpr,
    BLOCK_N: tl.constexpr,
    K_MODE: tl.constexpr,
    K_BITS: tl.constexpr,
    K_GS: tl.constexpr,
    K_FIX: tl.constexpr,
    V_MODE: tl.constexpr,
    V_BITS: tl.constexpr,
    V_GS: tl.constexpr,
    V_SEP: tl.constexpr,
    ROTATE: tl.constexpr,  # rows rotated back, x @ ROT^T = (x @ H) * ROT[:, 0]
):
    s = tl.program_id(0).to(tl.int64)
    page = tl.program_id(1)
    cap64 = cap.to(tl.int64)
    if K_MODE == 1 or V_SEP:
        # A segmented tier: program `page` takes block `page` of the block table (KSEG, see
        # `TierView.seg`), the rows of one segment within one page.
        r0 = tl.load(KSEG + 2 * page)
        seg = tl.load(KSEG + 2 * page + 1).to(tl.int64)
        r1 = tl.load(KSEG + 2 * page + 2)
        t = ((r0 // BLOCK_N) * BLOCK_N + tl.arange(0, BLOCK_N)).to(tl.int64)
        pos = tl.load(POS + s * cap64 + t)
        pos = tl.where((t >= r0) & (t < r1), pos, -1)
    else:
        seg = 0
        t = (page * BLOCK_N + tl.arange(0, BLOCK_N)).to(tl.int64)
        pos = tl.load(POS + s * cap64 + t)
    ok = (pos >= 0)[:, None]
    c = tl.arange(0, D)
    dst = (s * T + tl.maximum(pos, 0).to(tl.int64))[:, None] * D + c[None, :]
    k = _decode(KD, KS, KO, s, t, c, seg, cap64, nseg, D, K_MODE, K_BITS, K_GS)
    if K_FIX:
        k = k * tl.load(KFIX + s * D + c).to(tl.float32)[None, :]
    if ROTATE:
        k = _hadamard(k, BLOCK_N, D) * tl.load(ROT + c * D)[None, :]
    tl.store(OUTK + dst, k, mask=ok)
    v = _decode(VD, VS, VO, s, t, c, seg, cap64, nseg, D, V_MODE, V_BITS, V_GS)
    if V_SEP:
        v = v * tl.load(VF + (s * nseg + seg) * D + c).to(tl.float32)[None, :]
    if ROTATE:
        v = _hadamard(v, BLOCK_N, D) * tl.load(ROT + c * D)[None, :]
    tl.store(OUTV + dst, v, mask=ok)


@triton.jit
def _decode(
    DATA,
    SC,
    OF,
    s,
    t,
    c,
    seg,
    cap64,
    nseg,
    D: tl.constexpr,
    MODE: tl.constexpr,
    BITS: tl.constexpr,
    GS: tl.constexpr,
):
    if MODE == 0:
        x = tl.load(DATA + (s * cap64 + t[:, None]) * D + c[None, :]).to(tl.float32)
    else:
        B: tl.constexpr = D * BITS // 8
        row = DATA + (s * cap64 + t[:, None]) * B
        if 8 % BITS == 0:
            PER: tl.constexpr = 8 // BITS
            raw = tl.load(row + (c // PER)[None, :]).to(tl.int32)
            code = ((raw >> ((c % PER) * BITS)[None, :]) & ((1 << BITS) - 1)).to(tl.float32)
        else:
            # A code may straddle two bytes: read both (the second past the row's end is 0).
            bit = c * BITS
            lo = tl.load(row + (bit // 8)[None, :]).to(tl.int32)
            nxt = bit // 8 + 1
            hi = tl.load(row + tl.minimum(nxt, B - 1)[None, :], mask=(nxt < B)[None, :], other=0)
            word = lo | (hi.to(tl.int32) << 8)
            code = ((word >> (bit % 8)[None, :]) & ((1 << BITS) - 1)).to(tl.float32)
        if MODE == 1:
            sc = tl.load(SC + (s * nseg + seg) * D + c).to(tl.float32)[None, :]
            of = tl.load(OF + (s * nseg + seg) * D + c).to(tl.float32)[None, :]
        else:
            G: tl.constexpr = D // GS
            g = (c // GS)[None, :]
            sc = tl.load(SC + (s * cap64 + t[:, None]) * G + g).to(tl.float32)
            of = tl.load(OF + (s * cap64 + t[:, None]) * G + g).to(tl.float32)
        x = code * sc + of
    return x


@triton.jit
def divide_kernel(A, B, RB, OUT, N, HAS_RB: tl.constexpr, BLOCK: tl.constexpr):
    """``OUT = A / B`` (fp32; ``B`` holding fp16 values) as the store's kernels divide
    (:func:`_div_fp16`), from the reciprocals ``RB`` (``HAS_RB``) or from Triton's ``1 / B``
    (on a GPU, ``div.full.f32``): for the tests, which compare it with IEEE division."""
    i = tl.program_id(0) * BLOCK + tl.arange(0, BLOCK)
    ok = i < N
    a = tl.load(A + i, mask=ok, other=0.0)
    b = tl.load(B + i, mask=ok, other=1.0)
    rb = tl.load(RB + i, mask=ok, other=1.0) if HAS_RB else 1.0 / b
    tl.store(OUT + i, _div_fp16(a, b, rb), mask=ok)
