"""Prefill importance on the device: the attention each key receives from a set of query rows,
computed without materializing a probability.

ZipCache scores the prompt's keys by the softmax attention its probe rows (a recent tail plus
random rows, ~10% of the prompt) give them; MiKV and H2O by what every row gives them. The
torch reference (``kvmix.attention._probabilities``) builds the fp32 logits and probabilities
of a block of rows over every key, masks, normalizes and sums them: at 32k tokens, batch 8
and 32 query heads that is ~13 GB of fp32 written and read several times per layer. Here the
same sums come from two kernels that keep every logit in registers:

1. :func:`row_lse_kernel`, one program per ``(sequence, query head, block of rows)``: the
   log-sum-exp (base 2) of each row's logits over the keys it sees, by an online max as in
   flash attention, but without values;
2. :func:`received_kernel`, one program per ``(sequence, kv-head, block of keys)``: for every
   row that can see the block and every query head of the kv-head's GQA group, recompute the
   logits and add ``2^(logit - lse)``, so each key's column sum is finished by one program
   and written once (no atomics; the result does not depend on scheduling). The group's
   heads go one per tile or stacked along the tile's rows (a larger dot per loaded key
   tile, faster on an H200).

Recomputing the logits costs a second ``q·k`` pass (a flash-attention backward does the same);
keeping the probabilities instead would be the memory traffic this module exists to remove.
Dots run on the inputs' dtype (bf16/fp16 tensor cores, fp32 as IEEE fp32) with fp32
accumulation; softmax arithmetic is fp32.

Visibility is the reference's: key ``j`` is visible to row ``r`` of sequence ``b`` when
``first_valid[b] <= j <= r`` (causal, left padding invisible); a row inside the padding sees
nothing and gives nothing.
"""

# Triton's kernel language is untyped (its decorators, and parameters whose annotations
# Triton itself reads, e.g. `tl.constexpr`): mypy checks everything else in strict mode.
# mypy: disable-error-code="no-untyped-def,untyped-decorator,no-untyped-call"

from __future__ import annotations

import math
from collections.abc import Sequence
from typing import Any

import triton
import triton.language as tl

from kvmix.engines.base import DTypeError, NonFiniteError, ShapeError


# Reductions through our own combine functions (see triton_kernels.py: the interpreter swaps
# them for triton's standard ones when loading this module interpreted).
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
def _logits(q, k, qk_scale, IEEE: tl.constexpr):
    """``q k^T`` in base-2 logit units, fp32 accumulated. ``IEEE``: fp32 operands (fp32
    inputs; and bf16 under the interpreter, whose bf16 dot multiplies the raw bit patterns:
    the fp32 products of bf16 values are exact, so the result is the tensor cores')."""
    if IEEE:
        s = tl.dot(q.to(tl.float32), tl.trans(k.to(tl.float32)), input_precision="ieee")
    else:
        s = tl.dot(q, tl.trans(k))
    return s * qk_scale


# Sizes are not specialized on (Triton would compile a variant per pattern of "is 1" / "is a
# multiple of 16" among them, i.e. again for a new prompt length); strides are.
@triton.jit(do_not_specialize=["n_max", "hq", "rep"])
def row_lse_kernel(
    Q,  # [B, Hq, T, D], read through its strides
    sqb,
    sqh,
    sqt,
    K,  # [B, Hk, T, D], read through its strides
    skb,
    skh,
    skt,
    ROWS,  # int32 [B, N]: each sequence's row positions, ascending
    NROWS,  # int32 [B]: how many of them are real
    FV,  # int32 [B]: first valid (non-padding) key position
    LSE,  # fp32 [B, Hq, N] out: log2 of each row's sum of 2^logit (+inf: sees nothing)
    n_max,
    hq,
    rep,
    qk_scale,  # softmax scale * log2(e)
    D: tl.constexpr,
    BLOCK_M: tl.constexpr,
    BLOCK_N: tl.constexpr,
    IEEE: tl.constexpr,
):
    bh = tl.program_id(0)
    b = bh // hq
    h = bh % hq
    nr = tl.load(NROWS + b)
    i = tl.program_id(1) * BLOCK_M + tl.arange(0, BLOCK_M)
    im = i < nr
    r = tl.load(ROWS + b.to(tl.int64) * n_max + i, mask=im, other=-1)
    fv = tl.load(FV + b)
    d = tl.arange(0, D)
    qrow = Q + b.to(tl.int64) * sqb + h.to(tl.int64) * sqh + r.to(tl.int64) * sqt
    q = tl.load(qrow[:, None] + d[None, :], mask=im[:, None], other=0.0)
    kbase = K + b.to(tl.int64) * skb + (h // rep).to(tl.int64) * skh
    m_i = tl.full((BLOCK_M,), float("-inf"), tl.float32)
    l_i = tl.full((BLOCK_M,), 0.0, tl.float32)
    # Keys below the sequence's first valid position are invisible to every row; those past
    # the block's last row too.
    top = _max(r, 0)
    for j0 in range((fv // BLOCK_N) * BLOCK_N, top + 1, BLOCK_N):
        j = j0 + tl.arange(0, BLOCK_N)
        k = tl.load(kbase + j.to(tl.int64)[:, None] * skt + d[None, :], mask=(j <= top)[:, None])
        s = _logits(q, k, qk_scale, IEEE)
        visible = (j[None, :] <= r[:, None]) & (j[None, :] >= fv)
        s = tl.where(visible, s, float("-inf"))
        m_new = tl.maximum(m_i, _max(s, 1))
        # A row that has seen no key yet keeps max -inf: subtract 0 instead (no inf - inf).
        m_safe = tl.where(m_new == float("-inf"), 0.0, m_new)
        l_i = l_i * tl.exp2(m_i - m_safe) + _sum(tl.exp2(s - m_safe[:, None]), 1)
        m_i = m_new
    seen = l_i > 0.0
    lse = tl.where(seen, m_i + tl.log2(tl.where(seen, l_i, 1.0)), float("inf"))
    tl.store(LSE + bh.to(tl.int64) * n_max + i, lse, mask=im)


@triton.jit
def _column_tile(
    k,
    qhead,
    lhead,
    rows,
    sqt,
    i0,
    stop,
    j,
    fv,
    head_ok,
    qk_scale,
    D: tl.constexpr,
    BLOCK_M: tl.constexpr,
    HH: tl.constexpr,
    MASKED: tl.constexpr,
    IEEE: tl.constexpr,
):
    """One tile's probabilities: the rows ``i0 .. i0 + BLOCK_M`` (below ``stop``) of
    each stacked head against the key block ``j``. Masked rows (past ``stop``, heads past the
    group) read lse = +inf, so ``2^(s - lse)`` is 0 without a select; ``MASKED`` adds the
    causal / left-padding visibility, needed only on the tiles the block's keys cut."""
    m = tl.arange(0, HH * BLOCK_M)
    i = i0 + m % BLOCK_M
    im = (i < stop) & head_ok
    r = tl.load(rows + i, mask=im, other=-1)
    d = tl.arange(0, D)
    q = tl.load(
        qhead[:, None] + r.to(tl.int64)[:, None] * sqt + d[None, :], mask=im[:, None], other=0.0
    )
    lse = tl.load(lhead + i, mask=im, other=float("inf"))
    s = _logits(q, k, qk_scale, IEEE)
    # A row that sees nothing has lse = +inf: 2^(s - inf) = 0.
    p = tl.exp2(s - lse[:, None])
    if MASKED:
        visible = (j[None, :] <= r[:, None]) & (j[None, :] >= fv)
        p = tl.where(visible, p, 0.0)
    return p


@triton.jit
def _column_run(
    acc,
    k,
    qhead,
    lhead,
    rows,
    sqt,
    j,
    fv,
    head_ok,
    qk_scale,
    lo,
    hi,
    D: tl.constexpr,
    BLOCK_M: tl.constexpr,
    HH: tl.constexpr,
    MASKED: tl.constexpr,
    IEEE: tl.constexpr,
    ACC2D: tl.constexpr,
):
    """``acc`` plus the column sums of the tiles of rows ``lo .. hi`` (elementwise with
    ``ACC2D``, else reduced tile by tile): one of a key block's two runs of rows."""
    for i0 in range(lo, hi, BLOCK_M):
        p = _column_tile(
            k, qhead, lhead, rows, sqt, i0, hi, j, fv, head_ok, qk_scale,
            D=D, BLOCK_M=BLOCK_M, HH=HH, MASKED=MASKED, IEEE=IEEE,
        )  # fmt: skip
        if ACC2D:
            acc += p
        else:
            acc += _sum(p, 0)
    return acc


@triton.jit(do_not_specialize=["n_max", "t", "hk", "rep", "n_blocks"])
def received_kernel(
    Q,
    sqb,
    sqh,
    sqt,
    K,
    skb,
    skh,
    skt,
    ROWS,
    NROWS,
    FV,
    LSE,  # fp32 [B, Hq, N] from row_lse_kernel
    RSTART,  # int32 [B, n_blocks]: the first row (index) at or after each key block's start
    RFULL,  # int32 [B, n_blocks]: the first row (index) at or after each key block's last key
    OUT,  # fp32 [B, Hk, T] out: attention received, summed over rows and the GQA group
    n_max,
    t,
    hk,
    rep,
    n_blocks,
    qk_scale,
    D: tl.constexpr,
    HH: tl.constexpr,  # query heads stacked per tile, a power of two (1: a tile per head)
    BLOCK_M: tl.constexpr,  # rows per head: the tile is HH * BLOCK_M query rows
    BLOCK_N: tl.constexpr,
    ACC2D: tl.constexpr,  # sum the tiles elementwise, reduce over rows once at the end
    IEEE: tl.constexpr,
):
    """One key block's column sums over the GQA group's ``rep`` query heads, taken ``HH`` at a
    time: each ``(HH * BLOCK_M) x BLOCK_N`` tile stacks ``BLOCK_M`` rows of each of ``HH``
    heads (rows of a head past the group masked). ``HH = 1`` is a tile per head and per block
    of rows; ``HH >= rep`` stacks the whole group in one dot per block of rows (the key tile
    is shared by the group's heads; a larger M keeps the tensor cores busier per loaded key).

    Rows are ascending, so a block's rows split in two runs: those the block's keys cut
    (``RSTART .. RFULL``: each tile masks causality and padding) and those that see the whole
    block (``RFULL ..``: no visibility test at all, most of the work at long prompts). With
    ``ACC2D`` the tiles are summed elementwise and reduced over rows once, instead of a
    cross-warp reduction per tile (more registers).
    """
    bg = tl.program_id(0)
    kb = tl.program_id(1)
    b = bg // hk
    g = bg % hk
    j = kb * BLOCK_N + tl.arange(0, BLOCK_N)
    jm = j < t
    d = tl.arange(0, D)
    fv = tl.load(FV + b)
    nr = tl.load(NROWS + b)
    kbase = K + b.to(tl.int64) * skb + g.to(tl.int64) * skh
    k = tl.load(kbase + j.to(tl.int64)[:, None] * skt + d[None, :], mask=jm[:, None], other=0.0)
    # Rows before the block's first key see none of it: start at the first row at or after it.
    r0 = tl.load(RSTART + b.to(tl.int64) * n_blocks + kb)
    rf = tl.load(RFULL + b.to(tl.int64) * n_blocks + kb)
    # A block that reaches into the left padding is cut for every row.
    rf = tl.where(fv > kb * BLOCK_N, nr, tl.minimum(rf, nr))
    rows = ROWS + b.to(tl.int64) * n_max
    m = tl.arange(0, HH * BLOCK_M)
    # tl.full, not tl.zeros: tl.zeros is a jit function of triton.language, compiled (not
    # interpreted) when this module is loaded for the interpreter without TRITON_INTERPRET.
    if ACC2D:
        acc = tl.full((HH * BLOCK_M, BLOCK_N), 0.0, tl.float32)
    else:
        acc = tl.full((BLOCK_N,), 0.0, tl.float32)
    for h0 in range(0, rep, HH):
        hh = h0 + m // BLOCK_M
        h = g * rep + hh
        head_ok = hh < rep
        qhead = Q + b.to(tl.int64) * sqb + h.to(tl.int64) * sqh
        lhead = LSE + (b * (hk * rep) + h).to(tl.int64) * n_max
        # The rows the block's keys cut, then the rows that see all of it.
        acc = _column_run(
            acc, k, qhead, lhead, rows, sqt, j, fv, head_ok, qk_scale, r0, rf,
            D, BLOCK_M, HH, True, IEEE, ACC2D,
        )  # fmt: skip
        acc = _column_run(
            acc, k, qhead, lhead, rows, sqt, j, fv, head_ok, qk_scale, rf, nr,
            D, BLOCK_M, HH, False, IEEE, ACC2D,
        )  # fmt: skip
    if ACC2D:
        acc = _sum(acc, 0)
    tl.store(OUT + bg.to(tl.int64) * t + j, acc, mask=jm)


#: ``(BLOCK_M rows, BLOCK_N keys, warps, stages[, ACC2D])`` per kernel on a GPU, from
#: ``gpu/prefill_profile.py --sweep`` on one H200 (B=8 x 32k, Llama-3.1-8B's heads, ZipCache's
#: 3278 probe rows; LSE pass + column pass): the log-sum-exp pass at flash attention's forward
#: tile for head_dim 128 (43.6-46 ms for the best four, within noise); the column pass with
#: the GQA group's heads stacked (``"received_stacked"``: 16 rows per head, tiles summed
#: elementwise, 33.1 ms in all against 35.5 ms for 32 rows per head reduced tile by tile and
#: 45.8 ms for the best per-head tile, ``"received"``, which stays for reference and the
#: sweep). Both are :func:`received_kernel`: a ``"received_stacked"`` entry runs it with the
#: group's heads stacked (``HH`` = ``rep`` rounded up to a power of two), else one head per
#: tile (``HH = 1``); a fifth entry 1 sets ``ACC2D``.
GPU_BLOCKS: dict[str, tuple[int, ...]] = {
    "lse": (128, 64, 8, 3),
    "received": (32, 128, 4, 3),
    "received_stacked": (16, 128, 4, 3, 1),
}
#: Tiles under the interpreter: the smallest tl.dot takes, so small test shapes cross blocks.
INTERPRETED_BLOCKS: tuple[int, ...] = (16, 16, 1, 1)

_DTYPES = ("torch.float16", "torch.bfloat16", "torch.float32")
_INT32_MAX = 2**31 - 1


def _row_arrays(rows: Any, batch: int) -> list[Any]:
    """``rows`` (one sequence of positions, or one per sequence) as one int64 numpy array per
    sequence; a list given for several sequences is converted once (at 32k rows, a Python
    loop over the positions would cost more than the kernels)."""
    import numpy as np

    nested = len(rows) > 0 and not isinstance(rows[0], (int, np.integer))
    if not nested:
        return [np.asarray(rows, dtype=np.int64).reshape(-1)] * batch
    if len(rows) != batch:
        raise ShapeError(
            f"`rows` needs one list per sequence ({batch}) or one shared list, got {len(rows)}"
        )
    done: dict[int, Any] = {}
    for r in rows:
        if id(r) not in done:
            done[id(r)] = np.asarray(r, dtype=np.int64).reshape(-1)
    return [done[id(r)] for r in rows]


#: Per device, the last call's scored rows and first valid positions (host copies, to compare
#: by value), their device tensors ``(rows, counts, first_valid)``, and each key length and
#: tile's block starts: a prefill scores every layer with the same rows, so they are uploaded
#: once per prompt, not once per layer (~20 host ops a layer).
_ROWS_ON: dict[Any, tuple[list[Any], tuple[int, ...], tuple[Any, Any, Any], dict[Any, Any]]] = {}


def _row_tensors(
    per: list[Any], first_valid: tuple[int, ...], dev: Any
) -> tuple[tuple[Any, Any, Any], dict[Any, Any]]:
    """``(rows [B, n] int32 padded with INT32_MAX, row counts [B], first_valid [B])`` on
    ``dev``, and the dict caching the block starts found in them; reused while the rows and
    first valid positions are the same values as the last call's on ``dev``."""
    import numpy as np
    import torch

    hit = _ROWS_ON.get(dev)
    if (
        hit is not None
        and hit[1] == first_valid
        and len(hit[0]) == len(per)
        and all(np.array_equal(a, b) for a, b in zip(hit[0], per, strict=True))
    ):
        return hit[2], hit[3]
    b, n = len(per), max((len(x) for x in per), default=0)
    # Padding past a sequence's rows sorts last, so one searchsorted finds every block's first
    # row; the kernels stop at the sequence's row count.
    host = torch.full((b, n), _INT32_MAX, dtype=torch.int32)
    for bi, seq in enumerate(per):
        host[bi, : len(seq)] = torch.from_numpy(seq)
    counts = torch.tensor([len(x) for x in per], dtype=torch.int32)
    fv = torch.tensor(first_valid, dtype=torch.int32)
    tensors: tuple[Any, Any, Any] = (host, counts, fv)
    if dev.type == "cuda":  # asynchronous copies: the host does not wait for the device
        row_t, nrow_t, fv_t = (x.pin_memory().to(dev, non_blocking=True) for x in tensors)
        tensors = (row_t, nrow_t, fv_t)
    starts: dict[Any, Any] = {}
    _ROWS_ON[dev] = ([x.copy() for x in per], first_valid, tensors, starts)
    return tensors, starts


def received_attention(
    query: Any,
    key: Any,
    rows: Any,
    first_valid: Sequence[int],
    scale: float,
    *,
    blocks: dict[str, tuple[int, ...]] | None = None,
    row_lse: Any = None,
) -> Any:
    """Softmax attention of the query rows ``rows`` over ``key``, summed over the rows and
    over the query heads of each kv-head's GQA group: ``(B, H_kv, T)`` float32.

    Args:
        query: ``(B, H_q, T_q, D)`` float16, bfloat16 or float32, any strides (head_dim
            contiguous is fastest); row ``r`` is the query at position ``r``.
        key: ``(B, H_kv, T, D)``, the same dtype and device; ``H_q`` a multiple of ``H_kv``.
        rows: ascending positions of the scored rows, one list shared by every sequence or one
            list per sequence; each below ``T_q`` and ``T``.
        first_valid: each sequence's first non-padding position.
        scale: the softmax scale (logits are ``scale * q·k``).
        blocks: tiles per kernel (default :data:`GPU_BLOCKS` on a GPU,
            :data:`INTERPRETED_BLOCKS` under the interpreter); a ``"received_stacked"``
            entry runs :func:`received_kernel` with the GQA group's heads stacked in one
            tile (its ``BLOCK_M`` rows per head), else the ``"received"`` tile runs it one
            head per tile.
        row_lse: optional ``(B, H_q, >= T_q)`` float32, the log-sum-exp **base 2** of every
            query row's scaled logits over the keys it sees (``ln``-based LSE times
            ``log2(e)``), as a flash-attention forward of the same prompt returns it: then
            the first kernel (:func:`row_lse_kernel`, half the work) is skipped.

    Returns:
        ``(B, H_kv, T)`` float32 on the inputs' device.
    """
    import torch

    if query.dim() != 4 or key.dim() != 4:
        raise ShapeError(
            f"`query` and `key` must be 4-D [batch, heads, tokens, head_dim], got "
            f"{tuple(query.shape)} and {tuple(key.shape)}"
        )
    b, hq, tq, d = query.shape
    _, hk, t, _ = key.shape
    if key.shape[0] != b or key.shape[3] != d or hk == 0 or hq % hk:
        raise ShapeError(
            f"`key` {tuple(key.shape)} must share `query`'s batch and head_dim, with a number of "
            f"heads dividing query's {hq}"
        )
    if d < 16 or d > 256 or d & (d - 1):
        raise ShapeError(f"head_dim must be a power of two in [16, 256], got {d}")
    if str(query.dtype) not in _DTYPES or key.dtype != query.dtype:
        raise DTypeError(
            f"`query` and `key` must share a dtype among float16, bfloat16 and float32, got "
            f"{query.dtype} and {key.dtype}"
        )
    if key.device != query.device:
        raise ShapeError(f"`query` is on {query.device} but `key` on {key.device}")
    if query.stride(3) != 1 or key.stride(3) != 1:
        # The kernels read a row's head_dim as one contiguous run.
        query, key = query.contiguous(), key.contiguous()
    if not math.isfinite(scale):
        raise NonFiniteError(f"`scale` must be finite, got {scale}")
    if len(first_valid) != b or any(int(f) < 0 for f in first_valid):
        raise ShapeError(
            f"`first_valid` needs one non-negative position per sequence ({b}), got "
            f"{list(first_valid)}"
        )
    if row_lse is not None and (
        row_lse.dim() != 3
        or tuple(row_lse.shape[:2]) != (b, hq)
        or row_lse.shape[2] < tq
        or row_lse.dtype != torch.float32
        or row_lse.device != query.device
    ):
        raise ShapeError(
            f"`row_lse` must be float32 [batch {b}, query heads {hq}, >= {tq} rows] on "
            f"{query.device}, got {row_lse.dtype} {tuple(row_lse.shape)} on {row_lse.device}"
        )
    per = _row_arrays(rows, b)
    limit = min(tq, t)
    for seq in {id(x): x for x in per}.values():
        if seq.size and (seq[0] < 0 or seq[-1] >= limit or (seq[1:] <= seq[:-1]).any()):
            raise ShapeError(
                f"`rows` must be strictly ascending positions in [0, {limit}) (query length "
                f"{tq}, keys {t})"
            )
    out = torch.zeros((b, hk, t), dtype=torch.float32, device=query.device)
    n = max((len(s) for s in per), default=0)
    if n == 0 or t == 0 or b == 0:
        return out

    interpreted = query.device.type == "cpu"
    # Tiles asked for run under the interpreter too (how the tests check the GPU's tiles).
    tiles = blocks or GPU_BLOCKS
    lse_tile = INTERPRETED_BLOCKS if interpreted and not blocks else tiles["lse"]
    rec_name = "received_stacked" if "received_stacked" in tiles else "received"
    rec_tile = INTERPRETED_BLOCKS if interpreted and not blocks else tiles[rec_name]
    dev = query.device
    (row_t, nrow_t, fv_t), block_starts = _row_tensors(per, tuple(int(f) for f in first_valid), dev)
    ieee = query.dtype == torch.float32 or (interpreted and query.dtype == torch.bfloat16)
    qk_scale = float(scale) * math.log2(math.e)
    rep = hq // hk

    if row_lse is not None:
        # Each scored row's LSE, gathered by position (padding past a sequence's rows reads
        # row 0: the kernel masks it).
        idx = torch.where(row_t < tq, row_t, 0).long()
        lse = torch.gather(row_lse, 2, idx[:, None, :].expand(b, hq, n)).contiguous()
    else:
        lse = torch.empty((b, hq, n), dtype=torch.float32, device=dev)

    # On a GPU, a kernel compiled for the same specialization is launched directly (the
    # attention module's launcher: ~150 us less host time per launch, twice per layer).
    from kvmix.engines import load_attention

    launch = load_attention(dev)._launch
    fast = dev.type == "cuda"

    def lse_pass(tile: tuple[int, ...]) -> None:
        bm, bn, warps, stages = tile[:4]
        launch(
            row_lse_kernel, (b * hq, triton.cdiv(n, bm)),
            [query, query.stride(0), query.stride(1), query.stride(2),
             key, key.stride(0), key.stride(1), key.stride(2),
             row_t, nrow_t, fv_t, lse, n, hq, rep, qk_scale],
            (("D", d), ("BLOCK_M", bm), ("BLOCK_N", bn), ("IEEE", ieee)), warps, stages, fast,
        )  # fmt: skip

    # One head per tile, or the GQA group's heads stacked in one (padded to a power of two).
    hh = triton.next_power_of_2(rep) if rec_name == "received_stacked" else 1

    def received_pass(tile: tuple[int, ...]) -> None:
        bm, bn, warps, stages = tile[:4]
        n_blocks = triton.cdiv(t, bn)
        found = block_starts.get((t, bn))
        if found is None:
            starts = torch.arange(0, n_blocks * bn, bn, dtype=torch.int32, device=dev)
            starts = starts.expand(b, n_blocks).contiguous()
            # Each block's first row at or after its first key, and at or after its last key.
            found = block_starts[(t, bn)] = (
                torch.searchsorted(row_t, starts).to(torch.int32),
                torch.searchsorted(row_t, starts + (bn - 1)).to(torch.int32),
            )
        rstart, rfull = found
        acc2d = bool(tile[4] if len(tile) > 4 else 0)
        launch(
            received_kernel, (b * hk, n_blocks),
            [query, query.stride(0), query.stride(1), query.stride(2),
             key, key.stride(0), key.stride(1), key.stride(2),
             row_t, nrow_t, fv_t, lse, rstart, rfull, out, n, t, hk, rep, n_blocks, qk_scale],
            (("D", d), ("HH", hh), ("BLOCK_M", bm), ("BLOCK_N", bn), ("ACC2D", acc2d),
             ("IEEE", ieee)),
            warps, stages, fast,
        )  # fmt: skip

    if row_lse is None:
        _fitted(lse_pass, lse_tile, ("lse", str(query.dtype), d, lse_tile), interpreted)
    _fitted(received_pass, rec_tile, (rec_name, str(query.dtype), d, rec_tile), interpreted)
    return out


#: The tile that compiled for (kernel, dtype, head_dim, asked tile), after any halving.
_FITTED: dict[tuple[Any, ...], tuple[int, ...]] = {}


def _fitted(launch: Any, tile: tuple[int, ...], key: tuple[Any, ...], interpreted: bool) -> None:
    """``launch(tile)``; on a GPU whose shared memory cannot hold the tile (fp32 inputs,
    head_dim 256, a smaller GPU), with the tile halved until it fits, remembered per ``key``
    so the search runs once per shape of kernel."""
    if interpreted:
        launch(tile)
        return
    from triton.runtime.errors import OutOfResources

    tile = _FITTED.get(key, tile)
    while True:
        try:
            launch(tile)
        except OutOfResources:
            bm, bn, warps, stages, *flags = tile
            if bm == bn == 16 and stages == 1:
                raise
            tile = (max(16, bm // 2), max(16, bn // 2), warps, max(1, stages - 1), *flags)
            continue
        _FITTED[key] = tile
        return
