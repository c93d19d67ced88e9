"""kvmix's attention functions for transformers, registered only when asked for.

* :func:`enable_fused_attention` — the fused path (``attn_implementation="kvmix"``): decoding
  attention runs in Rust directly on the compressed store, and the probabilities it computes
  anyway feed the importance scores.
* :func:`enable_portable_scoring` — the portable path: the model keeps its own attention
  implementation (``"sdpa"``, ``"eager"``, ...) under a kvmix name (``"kvmix_portable_sdpa"``)
  whose function runs the original on the dense dequantized keys/values and computes the
  importance the cache needs from the same queries.

Importing this module registers nothing: each enable function registers its own kvmix-named
function (and the mask function transformers needs for it) with transformers' public
``AttentionInterface``/``AttentionMaskInterface`` and switches the one model it is given to it.
Other models, and transformers' own ``"sdpa"``/``"eager"``, are left as they were.

Prefill is exact in both paths: attention runs on the prompt's own keys/values; importance
comes from probe queries (ZipCache) or from every query (MiKV's accumulated attention, H2O); the
prompt is compressed after.
"""

from __future__ import annotations

import functools
import os
import sys
import time
from collections import deque
from collections.abc import Callable, Iterator
from concurrent.futures import Future, ThreadPoolExecutor
from typing import Any, TypeVar

import numpy as np
import torch
from transformers import AttentionInterface
from transformers.integrations.sdpa_attention import sdpa_attention_forward
from transformers.masking_utils import AttentionMaskInterface, sdpa_mask

from kvmix import _kvmix
from kvmix.errors import ConfigError, NonFiniteError
from kvmix.types import AttentionMode

__all__ = [
    "FUSED_ATTENTION",
    "PORTABLE_PREFIX",
    "attention_mode",
    "enable_fused_attention",
    "enable_portable_scoring",
    "kvmix_attention",
]

#: The attention implementation name of the fused path.
FUSED_ATTENTION = "kvmix"
#: Prefix of the portable path's names: ``"kvmix_portable_" + <the model's implementation>``.
PORTABLE_PREFIX = "kvmix_portable_"

T = TypeVar("T")

#: Query rows per block when computing explicit attention probabilities. Small blocks keep the
#: logits of a block (rows x query heads x keys, 4.7 MB at 32 rows, 9 heads, 4k keys) near the
#: cores, so the mask, softmax and sums after the matmul do not run at memory speed (256-row
#: blocks, 38 MB, made scoring cost 70% of the prefill's own attention); much smaller blocks
#: multiply torch's per-op thread synchronisation, which is slow on a loaded machine.
_ROWS_PER_BLOCK = 32


def _layer_of(key: torch.Tensor) -> Any:
    return getattr(key, "_kvmix_layer", None)


def _first_valid(attention_mask: torch.Tensor | None, batch: int) -> list[int]:
    """First non-padding key position of each sequence, from the 4-D mask's last query row."""
    if attention_mask is None:
        return [0] * batch
    last = attention_mask[:, 0, -1, :]
    visible = last if last.dtype == torch.bool else last == 0
    # argmax of a bool row finds the first True; an all-False row (cannot happen for the last,
    # real query) falls back to 0.
    return [int(i) for i in visible.to(torch.uint8).argmax(dim=-1).tolist()]


def _probe_rows(
    scoring: str, probes: tuple[Any, Any], length: int, first_valid: int = 0
) -> list[int] | None:
    """Query rows whose attention decides importance: ZipCache's probes (``probes``: its
    ``probe_recent`` and ``probe_random`` options), every row for H2O-style accumulation
    (MiKV, eviction), none for policies without importance.

    ZipCache's probes are drawn over a sequence's own tokens (after its left padding,
    ``first_valid``) and shifted past the padding, so a left-padded row is probed exactly as
    the same row alone."""
    if scoring == "probes":
        own = _kvmix.probe_positions(length - first_valid, probes[0], probes[1], 0)
        return [first_valid + p for p in own]
    if scoring == "every_query":
        return list(range(length))
    return None


@functools.lru_cache(maxsize=8)
def _scoring_plan(
    scoring: str, probes: tuple[Any, Any], mode: str, t: int, first_valid: tuple[int, ...]
) -> tuple[list[tuple[int, list[int], list[int]]], list[list[int]], np.ndarray]:
    """The scored rows of a prompt of ``t`` tokens and how many of them see each key, from
    its shape and options alone: ``(groups, per_sequence, counts)`` — per distinct left
    padding ``(first_valid, its sequences, their rows)`` (only those with rows), each
    sequence's rows (``[]``: none), and the visible counts ``(B, 1, T)`` float32 (shared by
    every caller: not to be written).

    Every layer of a prefill asks for the same plan (the probes' draw is seeded): made once,
    not once per layer (~1.4 ms of host time per layer at 32k tokens)."""
    groups: dict[int, list[int]] = {}
    for bi, fv in enumerate(first_valid):
        groups.setdefault(fv, []).append(bi)
    counts = np.zeros((len(first_valid), 1, t), np.float32)
    plan: list[tuple[int, list[int], list[int]]] = []
    per_sequence: list[list[int]] = [[] for _ in first_valid]
    for fv, idx in groups.items():
        rows = _probe_rows(scoring, probes, t, fv)
        if not rows:
            continue
        counts[idx] = _visible_counts(rows, t, [fv] * len(idx), mode)
        for bi in idx:
            per_sequence[bi] = rows
        plan.append((fv, idx, rows))
    return plan, per_sequence, counts


#: Environment variable: threads for the prefill's block-wise scoring loops.
SCORING_THREADS_ENV = "KVMIX_SCORING_THREADS"


def _scoring_threads() -> int:
    """Threads for the scoring loops: ``$KVMIX_SCORING_THREADS``, else torch's thread count."""
    value = os.environ.get(SCORING_THREADS_ENV)
    if value is None or value == "":
        return torch.get_num_threads()
    try:
        threads = int(value)
    except ValueError:
        threads = 0
    if threads < 1:
        raise ConfigError(f"`{SCORING_THREADS_ENV}` must be a positive integer, got {value!r}")
    return threads


def _single_threaded_torch() -> None:
    torch.set_num_threads(1)


#: The scoring threads and the process that started them: a forked child inherits the executor
#: but not its threads, and must start its own.
_pool: tuple[int, ThreadPoolExecutor] | None = None


def _scoring_pool(threads: int) -> ThreadPoolExecutor:
    global _pool
    if _pool is None or _pool[0] != os.getpid() or _pool[1]._max_workers < threads:
        pool = ThreadPoolExecutor(threads, "kvmix-scoring", initializer=_single_threaded_torch)
        _pool = (os.getpid(), pool)
    return _pool[1]


def _map_blocks(
    fn: Callable[[int, int], T], blocks: list[tuple[int, int]], on_cpu: bool = True
) -> Iterator[T]:
    """``fn(start, end)`` for every block, results in order: blocks run side by side on
    :func:`_scoring_threads` Python threads, each running torch on one thread.

    A block is a handful of small torch ops. Run one after another on torch's thread team, every
    op ends in a barrier, and a descheduled team member stalls each one: at load ~4, one layer of
    MiKV's prefill attention (4096 rows) took 5.3 s that way, against 0.58 s with the blocks on
    threads of their own (torch ops release the GIL, so they overlap with no barrier at all). A
    single block (a prompt of at most :data:`_ROWS_PER_BLOCK` scored rows) keeps torch's threads;
    one scoring thread runs the blocks inline on one torch thread. Blocks of GPU tensors run
    inline: their ops queue on the device's stream, which threads would not make wider."""
    if len(blocks) == 1 or not on_cpu:
        yield from (fn(a, b) for a, b in blocks)
        return
    threads = min(_scoring_threads(), len(blocks))
    before = torch.get_num_threads()
    torch.set_num_threads(1)  # the caller's thread, and MKL's process-wide count
    try:
        if threads == 1:
            yield from (fn(a, b) for a, b in blocks)
            return
        pool = _scoring_pool(threads)
        # Autograd and inference modes are per thread: the workers take the caller's.
        inference, grad = torch.is_inference_mode_enabled(), torch.is_grad_enabled()

        def run(a: int, b: int) -> T:
            with torch.inference_mode(inference), torch.set_grad_enabled(grad):
                return fn(a, b)

        # At most `threads` blocks in flight: their logits stay near the cores.
        pending: deque[Future[T]] = deque()
        for a, b in blocks:
            if len(pending) == threads:
                yield pending.popleft().result()
            pending.append(pool.submit(run, a, b))
        while pending:
            yield pending.popleft().result()
    finally:
        torch.set_num_threads(before)


#: Logits per block on a GPU (float32: 512 MiB): GPU blocks are sized by memory, not by
#: cache, and fewer, larger blocks launch fewer kernels.
_GPU_BLOCK_LOGITS = 1 << 27


def _row_blocks(positions: list[int], rows: int = _ROWS_PER_BLOCK) -> list[tuple[int, int]]:
    """``(start, end)`` slices of the query ``positions``, ``rows`` rows each."""
    return [(start, min(start + rows, len(positions))) for start in range(0, len(positions), rows)]


def _rows_per_block(query: torch.Tensor, keys: int) -> int:
    """Query rows per block: :data:`_ROWS_PER_BLOCK` on the CPU; on a GPU as many as keep a
    block's logits (batch x query heads x rows x keys) within :data:`_GPU_BLOCK_LOGITS`."""
    if query.device.type == "cpu":
        return _ROWS_PER_BLOCK
    per_row = query.shape[0] * query.shape[1] * max(keys, 1)
    return max(_ROWS_PER_BLOCK, _GPU_BLOCK_LOGITS // per_row)


def _block_probabilities(
    query: torch.Tensor,
    key: torch.Tensor,
    rows: list[int],
    first_valid: list[int],
    scaling: float,
) -> tuple[torch.Tensor, int]:
    """Softmax attention of the prompt's query rows ``rows`` (ascending; row = position = key
    index) over the keys ``0 .. hi-1`` (later keys are invisible to every row):
    ``((B, H_kv, rep, n, hi), hi)``, query heads grouped by kv-head. A key is visible to a query at
    or after its position unless it is left padding; rows that see nothing get zeros."""
    b, hq, _, d = query.shape
    hk = key.shape[1]
    rep, n = hq // hk, len(rows)
    lo, hi = rows[0], rows[-1] + 1
    if rows[-1] - rows[0] == n - 1:  # contiguous rows: a view, not a gather
        q = query[:, :, rows[0] : rows[-1] + 1]
    else:
        q = query[:, :, rows]
    # Query heads h*rep .. h*rep+rep-1 share kv head h: fold them into the row axis.
    # Scaling the (few) queries instead of the (many) logits saves a pass over the logits.
    q = (q.float() * scaling).reshape(b, hk, rep * n, d)
    logits = torch.matmul(q, key[:, :, :hi].float().transpose(-1, -2))
    logits = logits.view(b, hk, rep, n, hi)
    # Keys before the block's first query are visible to all its rows: only [lo, hi) needs the
    # causal mask.
    if hi - lo > 1:
        dev = query.device
        future = torch.arange(lo, hi, device=dev).view(1, -1) > torch.tensor(rows, device=dev).view(
            -1, 1
        )
        logits[..., lo:hi].masked_fill_(future, float("-inf"))
    padded = False
    for bi, fv in enumerate(first_valid):
        if fv > 0:
            logits[bi, ..., : min(fv, hi)] = float("-inf")
            padded |= lo < fv
    probs = torch.softmax(logits, dim=-1)
    if padded:  # rows inside the left padding see no key: their softmax is NaN
        probs.nan_to_num_(0.0)
    return probs, hi


#: Environment variable: which prefill scoring runs. ``auto`` (the default): the Triton
#: kernels of :mod:`kvmix.engines.triton_scoring` for CUDA tensors, the torch code below for
#: the others; ``torch``: the torch code everywhere (the reference, and the "before" of
#: ``gpu/prefill_profile.py``); ``triton``: the kernels everywhere (CPU tensors run them under
#: Triton's interpreter, as the tests do).
SCORING_KERNEL_ENV = "KVMIX_PREFILL_SCORING"
_SCORING_CHOICES = ("auto", "torch", "triton")


def _scoring_kernel(query: torch.Tensor) -> bool:
    """Whether the prefill scoring of ``query``'s tensors runs the Triton kernels."""
    value = os.environ.get(SCORING_KERNEL_ENV) or "auto"
    if value not in _SCORING_CHOICES:
        raise ConfigError(
            f"`{SCORING_KERNEL_ENV}` must be one of {', '.join(_SCORING_CHOICES)}, got {value!r}"
        )
    if value == "auto":
        return query.device.type == "cuda"
    return value == "triton"


def _received(
    query: torch.Tensor,
    key: torch.Tensor,
    rows: list[int] | list[list[int]],
    first_valid: list[int],
    scaling: float,
    row_lse: torch.Tensor | None = None,
) -> torch.Tensor:
    """:func:`kvmix.engines.triton_scoring.received_attention` for ``query``'s device."""
    from kvmix.engines import load_scoring

    out: torch.Tensor = load_scoring(query.device).received_attention(
        query, key, rows, first_valid, scaling, row_lse=row_lse
    )
    return out


#: Per fused SDPA backend ("flash", "cudnn"): whether its forward took fewer key/value heads
#: than query heads and whether its LSE passed :func:`_lse_is_right` (``None``: not tried).
_FUSED_GQA: dict[str, bool | None] = {"flash": None, "cudnn": None}
_FUSED_LSE_OK: dict[str, bool | None] = {"flash": None, "cudnn": None}


def _lse_is_right(
    query: torch.Tensor, key: torch.Tensor, lse: torch.Tensor, scaling: float
) -> bool:
    """Whether ``lse`` (natural log, ``(B, H_q, T)``) is the causal log-sum-exp of the last
    row of sequence 0, every query head, computed here in fp32: the private ops' LSE layout
    is checked once per process before it is trusted."""
    _, hq, t, d = query.shape
    hk = key.shape[1]
    q = query[0, :, t - 1].float().view(hk, hq // hk, d)  # (H_kv, rep, D): GQA groups
    logits = torch.einsum("grd,gtd->grt", q, key[0].float()).reshape(hq, t)
    want = torch.logsumexp(logits * scaling, dim=-1)
    return bool(torch.allclose(lse[0, :, t - 1].float(), want, rtol=1e-3, atol=1e-2))


def _flash_attention_with_lse(
    query: torch.Tensor, key: torch.Tensor, value: torch.Tensor, scaling: float
) -> tuple[torch.Tensor, torch.Tensor] | None:
    """Causal attention of an unpadded prompt over itself by the fused kernel SDPA itself
    chooses for these tensors (flash, or cuDNN on Hopper GPUs), called through its op, which
    returns each row's log-sum-exp beside the output: ``(output (B, T, H_q, D) as
    transformers' sdpa returns it, LSE base 2 (B, H_q, T) float32)``. ``None`` where SDPA
    would run another kernel (calling a different one would slow the prefill's attention by
    more than the LSE saves) or the op refuses the tensors: then the caller runs SDPA and the
    scoring kernels compute the LSE themselves.

    The scoring kernels' first pass (:func:`~kvmix.engines.triton_scoring.row_lse_kernel`)
    computes exactly this LSE, for the scored rows, by a second ``q·k`` sweep: taking it from
    the attention the model runs anyway halves the prefill's scoring work (as FlashAttention's
    backward reuses the forward's LSE, Dao 2023)."""
    from torch.nn.attention import SDPBackend

    b, hq, t, _ = query.shape
    hk = key.shape[1]
    gqa = hk != hq
    try:
        choice = int(
            torch._fused_sdp_choice(
                query, key, value, None, 0.0, True, scale=scaling, enable_gqa=gqa
            )
        )
    except (RuntimeError, TypeError, AttributeError):
        return None
    if query.device.type != "cuda":
        if choice != SDPBackend.FLASH_ATTENTION.value:
            return None
        try:
            op = torch.ops.aten._scaled_dot_product_flash_attention_for_cpu
            out, lse = op(query, key, value, 0.0, True, scale=scaling)[:2]
        except (RuntimeError, NotImplementedError, AttributeError):
            return None
        lse = lse.reshape(b, hq, -1)[:, :, :t].float()
        return out.transpose(1, 2).contiguous(), (lse * float(np.log2(np.e))).contiguous()
    if choice == SDPBackend.FLASH_ATTENTION.value:
        name = "flash"

        def run(k: torch.Tensor, v: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
            op = torch.ops.aten._scaled_dot_product_flash_attention
            res = op(query, k, v, 0.0, True, False, scale=scaling)
            return res[0], res[1]

    elif choice == SDPBackend.CUDNN_ATTENTION.value:
        name = "cudnn"

        def run(k: torch.Tensor, v: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
            op = torch.ops.aten._scaled_dot_product_cudnn_attention
            res = op(query, k, v, None, True, 0.0, True, False, scale=scaling)
            return res[0], res[1]

    else:
        return None
    if _FUSED_LSE_OK[name] is False:
        return None
    try:
        res = None
        if gqa and _FUSED_GQA[name] is not False:
            try:
                res = run(key, value)
                _FUSED_GQA[name] = True
            except torch.cuda.OutOfMemoryError:
                raise  # not a refusal of the tensors: the caller's prefill is out of memory
            except RuntimeError:
                _FUSED_GQA[name] = False
        if res is None:
            k, v = key, value
            if gqa:  # the op wants one key/value head per query head
                k = key.repeat_interleave(hq // hk, dim=1)
                v = value.repeat_interleave(hq // hk, dim=1)
            res = run(k, v)
    except torch.cuda.OutOfMemoryError:
        raise
    except (RuntimeError, NotImplementedError, AttributeError):
        _FUSED_LSE_OK[name] = False
        return None
    out, lse = res
    if lse.numel() < b * hq * t:
        _FUSED_LSE_OK[name] = False
        return None
    lse = lse.reshape(b, hq, -1)[:, :, :t].float()
    if _FUSED_LSE_OK[name] is None:
        _FUSED_LSE_OK[name] = _lse_is_right(query, key, lse, scaling)
        if not _FUSED_LSE_OK[name]:
            return None
    return out.transpose(1, 2).contiguous(), (lse * float(np.log2(np.e))).contiguous()


def _probabilities(
    query: torch.Tensor,
    key: torch.Tensor,
    rows: list[int],
    first_valid: list[int],
    scaling: float,
) -> torch.Tensor:
    """Softmax attention of the prompt's query rows ``rows`` (ascending; row = position = key
    index) over ``key``, summed over the query rows and over the query heads of each kv-head's
    GQA group: ``(B, H_kv, T)``."""
    if _scoring_kernel(query):
        return _received(query, key, rows, first_valid, scaling)
    b, hk, t = query.shape[0], key.shape[1], key.shape[2]
    out = torch.zeros(b, hk, t, device=query.device)

    def block(start: int, end: int) -> tuple[torch.Tensor, int]:
        probs, hi = _block_probabilities(query, key, rows[start:end], first_valid, scaling)
        return probs.sum(dim=(2, 3)), hi

    blocks = _row_blocks(rows, _rows_per_block(query, t))
    for received, hi in _map_blocks(block, blocks, query.device.type == "cpu"):
        out[:, :, :hi] += received
    return out


def _attention_and_column_sums(
    query: torch.Tensor, key: torch.Tensor, value: torch.Tensor, scaling: float
) -> tuple[torch.Tensor, torch.Tensor]:
    """Causal attention of an unpadded prompt over itself computed explicitly, block by block:
    the output ``(B, T, H_q, D)`` (as transformers' sdpa returns it) and, from the same
    probabilities, the attention each key received summed over every query row and the query
    heads of its GQA group ``(B, H_kv, T)``.

    H2O/MiKV accumulation needs every row's probabilities; computing them in a second pass after
    SDPA repeated the whole attention and doubled the prefill's attention time, while one pass
    costs about what SDPA alone does. With the device kernels (:func:`_scoring_kernel`) the
    output is torch's SDPA and the column sums come from
    :func:`kvmix.engines.triton_scoring.received_attention`, which keeps no probability.
    """
    b, hq, t, d = query.shape
    hk = key.shape[1]
    rep = hq // hk
    if _scoring_kernel(query):
        flash = _flash_attention_with_lse(query, key, value, scaling)
        if flash is not None:
            return flash[0], _received(query, key, list(range(t)), [0] * b, scaling, flash[1])
        attn = torch.nn.functional.scaled_dot_product_attention(
            query, key, value, is_causal=True, scale=scaling, enable_gqa=rep > 1
        )
        acc = _received(query, key, list(range(t)), [0] * b, scaling)
        return attn.transpose(1, 2).contiguous(), acc
    out = torch.empty(b, hk, rep, t, d, device=query.device)
    acc = torch.zeros(b, hk, t, device=query.device)
    values = value.float()
    positions = list(range(t))

    def block(start: int, end: int) -> tuple[torch.Tensor, int]:
        rows = positions[start:end]
        probs, hi = _block_probabilities(query, key, rows, [0] * b, scaling)
        n = end - start
        flat = probs.view(b, hk, rep * n, hi)
        # Blocks write disjoint rows of `out`; the column sums are added by the caller.
        out[:, :, :, start:end] = torch.matmul(flat, values[:, :, :hi]).view(b, hk, rep, n, d)
        return probs.sum(dim=(2, 3)), hi

    blocks = _row_blocks(positions, _rows_per_block(query, t))
    for received, hi in _map_blocks(block, blocks, query.device.type == "cpu"):
        acc[:, :, :hi] += received
    attn = out.view(b, hq, t, d).to(query.dtype).transpose(1, 2).contiguous()
    return attn, acc


def _score_prefill(
    layer: Any,
    query: torch.Tensor,
    key: torch.Tensor,
    attention_mask: torch.Tensor | None,
    scaling: float,
    acc: torch.Tensor | None = None,
    row_lse: torch.Tensor | None = None,
) -> None:
    """Importance of the prompt tokens, the key balancer if needed, then compression. ``acc``:
    the attention every row gave each token, when the caller computed it with the output;
    ``row_lse``: every row's log-sum-exp (base 2) from the caller's attention of an unpadded
    prompt, for the scoring kernels (:func:`_flash_attention_with_lse`)."""
    t0 = time.perf_counter()
    store = layer.store
    b, _, t, _ = query.shape
    first_valid = _first_valid(attention_mask, b)
    store.set_first_valid(first_valid)
    layer.first_valid = first_valid
    if store.needs_balancer and layer.on_device:
        store.set_key_balancer(_key_balancer(query, key, first_valid))
    elif store.needs_balancer:
        if any(first_valid):
            # Each sequence's balancer from its own tokens: padding must not set its scale.
            parts = [
                _kvmix.key_balancer(
                    *_as_numpy(query[bi : bi + 1, :, fv:], key[bi : bi + 1, :, fv:])
                )
                for bi, fv in enumerate(first_valid)
            ]
            store.set_key_balancer(np.ascontiguousarray(np.concatenate(parts, axis=0)))
        else:
            store.set_key_balancer(_kvmix.key_balancer(*_as_numpy(query, key)))
    # Policies scoring every query have no `count_mode`: every row is counted exactly.
    mode = layer.options.get("count_mode", "exact")
    probes = (layer.options.get("probe_recent"), layer.options.get("probe_random"))
    # Sequences with the same left padding share their probe rows; an unpadded batch is one
    # group and runs as before, without gathering.
    groups, per_sequence, counts = _scoring_plan(layer.scoring, probes, mode, t, tuple(first_valid))
    scored = bool(groups)
    given = acc
    # The device kernels take each sequence's rows: one launch for the batch, no gather.
    kernel = given is None and _scoring_kernel(query)
    if given is None and not kernel:
        for fv, idx, rows in groups:
            fvs = [fv] * len(idx)
            if len(groups) == 1:
                acc = _probabilities(query, key, rows, fvs, scaling)
            else:
                if acc is None:
                    acc = torch.zeros(b, key.shape[1], t, device=query.device)
                acc[idx] = _probabilities(query[idx], key[idx], rows, fvs, scaling)
    if scored and kernel:
        lse = row_lse if not any(first_valid) else None
        acc = _received(query, key, per_sequence, first_valid, scaling, lse)
    if scored and acc is not None:
        if layer.on_device:
            # The Triton store takes torch tensors on its device; the counts go up without
            # waiting for the device (pinned memory, as the store's own host counts).
            host = torch.from_numpy(counts)
            if acc.device.type == "cuda":
                host = host.pin_memory()
            dev_counts = host.to(acc.device, non_blocking=True).expand(acc.shape)
            store.add_scores(0, acc, dev_counts.contiguous())
        else:
            store.add_scores(
                0, acc.numpy(), np.ascontiguousarray(np.broadcast_to(counts, acc.shape))
            )
    t1 = time.perf_counter()
    store.maybe_classify(True)
    layer.prefill_seconds["scoring"] += t1 - t0
    layer.prefill_seconds["compression"] += time.perf_counter() - t1
    layer.needs_prefill = False


def _key_balancer(query: torch.Tensor, key: torch.Tensor, first_valid: list[int]) -> torch.Tensor:
    """MiKV's key balancer ``sqrt(max|q_c| / max|k_c|)`` ``(B, H_kv, D)`` float32 on the
    tensors' device, as ``_kvmix.key_balancer`` computes it on the host (the maxima over each
    sequence's own tokens and its GQA group's query heads; a zero maximum gives 1).

    On a GPU the host function would need the whole prompt's queries and keys copied to host
    memory as fp32 (5 GB per layer at 32k tokens, batch 8): here two reductions per tensor
    read them in place (``aminmax``, no ``abs`` temporary). Maxima are exact in any dtype, the
    quotient is IEEE fp32 and the root is rounded once, so the result is the host function's."""
    b, hq, _, d = query.shape
    hk = key.shape[1]

    def absmax(x: torch.Tensor) -> torch.Tensor:  # (B, H, T, D) -> (B, H, D) fp32
        if any(first_valid):  # each sequence over its own tokens: views, one per sequence
            parts = [absmax_of(x[bi : bi + 1, :, fv:]) for bi, fv in enumerate(first_valid)]
            return torch.cat(parts, 0)
        return absmax_of(x)

    def absmax_of(x: torch.Tensor) -> torch.Tensor:
        if x.shape[2] == 0:
            return torch.zeros((x.shape[0], x.shape[1], d), device=x.device)
        lo, hi = torch.aminmax(x, dim=2)
        return torch.maximum(hi.float(), -lo.float())

    qm = absmax(query).view(b, hk, hq // hk, d).amax(2)
    km = absmax(key)
    if not bool(torch.isfinite(qm).all() & torch.isfinite(km).all()):  # one read per prompt
        raise NonFiniteError("input contains NaN or Inf; channel statistics are undefined")
    ok = (qm > 0) & (km > 0)
    # The square root in float64, rounded once to float32, is the correctly rounded fp32 root
    # the host computes (torch's vectorized fp32 sqrt on the CPU can be an ulp off).
    root = torch.sqrt((qm / torch.where(ok, km, 1.0)).double()).float()
    return torch.where(ok, root, 1.0)


def _visible_counts(rows: list[int], t: int, first_valid: list[int], mode: str) -> np.ndarray:
    """How many scored query rows can see each key: ``(B, 1, T)`` float32.

    NumPy on the host: the counts are known from the rows alone, and torch's ops on CPU
    tensors hand such small work to their thread team (7 ms per layer on a busy machine).
    The rows at or after each key are a reversed running count of the rows (no search per
    key), computed once per distinct left padding (a batch usually has one)."""
    j = np.arange(t)
    if mode == "full_matrix":
        base = t - j
    else:
        base = np.cumsum(np.bincount(np.asarray(rows, dtype=np.int64), minlength=t)[::-1])[::-1]
        base = base[:t]
    pads, seq = np.unique(np.asarray(first_valid), return_inverse=True)
    per_pad = np.where(j[None, :] >= pads[:, None], base[None, :], 0).astype(np.float32)
    return per_pad[seq.reshape(-1)][:, None, :]


def _as_numpy(query: torch.Tensor, key: torch.Tensor) -> tuple[Any, Any]:
    return (
        query.detach().float().contiguous().cpu().numpy(),
        key.detach().float().contiguous().cpu().numpy(),
    )


def kvmix_attention(
    module: torch.nn.Module,
    query: torch.Tensor,
    key: torch.Tensor,
    value: torch.Tensor,
    attention_mask: torch.Tensor | None,
    scaling: float | None = None,
    dropout: float = 0.0,
    **kwargs: Any,
) -> tuple[torch.Tensor, None]:
    """The ``"kvmix"`` attention implementation (see the module docstring)."""
    layer = _layer_of(key)
    if layer is None:  # not a kvmix cache: behave as sdpa
        return sdpa_attention_forward(
            module, query, key, value, attention_mask, scaling=scaling, dropout=dropout, **kwargs
        )
    scale = float(scaling if scaling is not None else query.shape[-1] ** -0.5)
    if layer.needs_prefill:
        causal = attention_mask is None and getattr(module, "is_causal", True)
        if causal and dropout == 0.0 and layer.scoring == "every_query":
            # Every row is scored (H2O/MiKV): output and scores from one explicit softmax. A
            # padding (or any other) mask keeps the SDPA path below.
            t0 = time.perf_counter()
            attn, acc = _attention_and_column_sums(query, key, value, scale)
            layer.prefill_seconds["attention"] += time.perf_counter() - t0
            _score_prefill(layer, query, key, attention_mask, scale, acc)
            return attn, None
        if causal and dropout == 0.0 and layer.scoring == "probes" and _scoring_kernel(query):
            # Probe rows' LSE from the attention itself: the kernels' first pass is skipped.
            flash = _flash_attention_with_lse(query, key, value, scale)
            if flash is not None:
                _score_prefill(layer, query, key, attention_mask, scale, row_lse=flash[1])
                return flash[0], None
        out = sdpa_attention_forward(
            module, query, key, value, attention_mask, scaling=scale, dropout=dropout, **kwargs
        )
        _score_prefill(layer, query, key, attention_mask, scale)
        return out
    tq = query.shape[2]
    end = layer.cumulative_length
    # A Triton store applies a rotation in its kernels: then this is None, as unrotated.
    rotation = layer.host_rotation
    positions = list(range(end - tq, end))
    if layer.on_device and rotation is None:
        # Torch in and out, on the device: the kernel reads the query in its dtype through
        # its strides and writes the output in the model's dtype and layout, so the step
        # makes no conversion, copy or transpose of its own (a rotated store rotates the
        # query it reads and the output it writes).
        b, hq, _, d = query.shape
        dev_out = torch.empty((b, tq, hq, d), dtype=query.dtype, device=query.device)
        q = query.detach() if query.requires_grad else query  # no op in inference
        layer.store.attend(q, positions, scale, True, out=dev_out)
        layer.store.maybe_classify()
        return dev_out, None
    qf = (query.detach() if query.requires_grad else query).float()
    if rotation is not None:
        qf = qf @ rotation  # the store holds rotated keys: (qR)(kR)^T = qk^T
    if layer.on_device:
        # The reference for the fused rotation (``_Shared.fuse_rotation = False``): fp32
        # output in the returned layout, rotated back (sum p vR = (sum p v)R) and cast by
        # two ops.
        assert rotation is not None
        b, hq, _, d = query.shape
        dev_out = torch.empty((b, tq, hq, d), dtype=torch.float32, device=query.device)
        layer.store.attend(qf, positions, scale, True, out=dev_out)
        layer.store.maybe_classify()
        return (dev_out @ _transposed(layer, rotation)).to(query.dtype), None
    result = torch.from_numpy(layer.store.attend(qf.contiguous().numpy(), positions, scale, True))
    layer.store.maybe_classify()
    if rotation is not None:
        result = result @ rotation.T  # the output is sum p (vR): rotate it back
    attn = result.to(query.dtype).transpose(1, 2).contiguous()
    return attn, None


def _transposed(layer: Any, rotation: torch.Tensor) -> torch.Tensor:
    """``rotation.T`` made contiguous once per layer (not a transpose op per decoding step)."""
    cached = getattr(layer, "_rotation_t", None)
    if cached is None or cached[0] is not rotation:
        cached = layer._rotation_t = (rotation, rotation.T.contiguous())
    t: torch.Tensor = cached[1]
    return t


def _portable(original_name: str) -> Callable[..., Any]:
    """Wrap the attention implementation ``original_name`` so that kvmix caches get their
    importance. The original is looked up at every call (a dict lookup), so a later
    registration of that name is followed, as the model itself would follow it."""

    def wrapped(
        module: torch.nn.Module,
        query: torch.Tensor,
        key: torch.Tensor,
        value: torch.Tensor,
        attention_mask: torch.Tensor | None,
        **kwargs: Any,
    ) -> Any:
        fn = AttentionInterface().get(original_name)  # type: ignore[no-untyped-call]
        if fn is None:  # "eager" is per model file
            fn = sys.modules[type(module).__module__].eager_attention_forward
        out = fn(module, query, key, value, attention_mask, **kwargs)
        layer = _layer_of(key)
        if layer is None:
            return out
        scaling = kwargs.get("scaling")
        scale = float(scaling if scaling is not None else query.shape[-1] ** -0.5)
        if layer.needs_prefill:
            _score_prefill(layer, query, key, attention_mask, scale)
            return out
        _track_dense(layer, query, scale)
        return out

    wrapped.__name__ = f"{PORTABLE_PREFIX}{original_name}"
    return wrapped


def _track_dense(layer: Any, query: torch.Tensor, scale: float) -> None:
    """Importance of this step's queries, then classification. The probabilities come from the
    store's own kernel, as in the fused path (its output is not needed here): the dense keys the
    model's attention read are the store's dequantized keys, so these are the same numbers, and
    one call costs less than the ten small torch ops of recomputing them from the dense keys
    (0.5 ms per layer at 4k tokens, 15% of a SmolLM2 decoding step)."""
    store = layer.store
    if layer.scoring != "none":
        end, tq = layer.cumulative_length, query.shape[2]
        q = query.detach() if query.requires_grad else query
        rotated = layer.host_rotation is not None
        if getattr(layer, "on_device", False) and not rotated:
            # The Triton kernel reads the query in its dtype through its strides (and
            # rotates it, for a store that rotates).
            store.attend(q, list(range(end - tq, end)), scale, True)
            store.maybe_classify()
            return
        qf = q.float()
        if rotated:
            qf = qf @ layer.host_rotation  # the store holds rotated keys
        qs = qf.contiguous() if getattr(layer, "on_device", False) else qf.contiguous().numpy()
        store.attend(qs, list(range(end - tq, end)), scale, True)
    store.maybe_classify()


def attention_mode(config: Any) -> AttentionMode | None:
    """``"fused"`` or ``"portable"`` when a model with ``config`` was enabled for kvmix (see
    :func:`enable_fused_attention`, :func:`enable_portable_scoring`), else ``None``."""
    get = getattr(config, "get_text_config", None)
    text = get(decoder=True) if get is not None else config
    name = getattr(text, "_attn_implementation", None)
    if name == FUSED_ATTENTION:
        return "fused"
    if isinstance(name, str) and name.startswith(PORTABLE_PREFIX):
        return "portable"
    return None


def _set_implementation(model: torch.nn.Module, name: str) -> None:
    set_impl = getattr(model, "set_attn_implementation", None)
    if set_impl is None:
        raise TypeError(f"{type(model).__name__} is not a transformers PreTrainedModel")
    set_impl(name)


def enable_fused_attention(model: torch.nn.Module) -> torch.nn.Module:
    """Make ``model`` run kvmix's fused attention (``attn_implementation="kvmix"``).

    Registers the ``"kvmix"`` attention function and its mask (sdpa's) with transformers, then
    switches ``model`` (and only it) to them. With a kvmix cache, decoding attention then runs on
    the compressed store; with any other cache the function behaves as transformers' sdpa.

    Args:
        model: a transformers ``PreTrainedModel``.

    Returns:
        ``model``.

    >>> kvmix.enable_fused_attention(model)                          # doctest: +SKIP
    >>> model.generate(**inputs, past_key_values=kvmix.ZipCache(model.config))  # doctest: +SKIP
    """
    AttentionInterface.register(FUSED_ATTENTION, kvmix_attention)
    # A custom implementation needs a mask function too, or transformers silently drops the
    # padding mask (masking_utils: unknown implementations get `None`).
    AttentionMaskInterface.register(FUSED_ATTENTION, sdpa_mask)
    _set_implementation(model, FUSED_ATTENTION)
    return model


def enable_portable_scoring(model: torch.nn.Module) -> torch.nn.Module:
    """Keep ``model``'s own attention implementation and add the importance scoring kvmix
    caches need (the portable path: the cache hands attention dense dequantized keys/values).

    The model's implementation ``X`` (``"sdpa"``, ``"eager"``, ...) is wrapped under the name
    ``"kvmix_portable_X"``, registered with transformers together with ``X``'s mask function, and
    ``model`` (only it) is switched to that name. A model on the fused path goes back to sdpa.

    Args:
        model: a transformers ``PreTrainedModel``.

    Returns:
        ``model``.
    """
    current = getattr(getattr(model, "config", None), "_attn_implementation", None)
    if not isinstance(current, str) or current == FUSED_ATTENTION:
        current = "sdpa"
    base = current.removeprefix(PORTABLE_PREFIX)
    name = PORTABLE_PREFIX + base
    AttentionInterface.register(name, _portable(base))
    masks = AttentionMaskInterface()  # type: ignore[no-untyped-call]
    if base in masks:
        AttentionMaskInterface.register(name, masks[base])
    _set_implementation(model, name)
    return model
