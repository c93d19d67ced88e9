"""The prefill scoring kernels (``kvmix.engines.triton_scoring``, under Triton's interpreter on
CPU tensors) against the torch reference of ``kvmix.attention``: ``_probabilities`` (explicit
fp32 softmax of each block of rows) and ``_attention_and_column_sums``.

The kernels take the same bf16/fp16 values as the reference (whose products are exact in
fp32), so they differ only in the order of fp32 sums and in ``exp2`` against ``exp``: column
sums within 1e-5 absolute and relative. Each sum of a row's probabilities is also checked
against 1, an invariant the reference does not set. At the cache level, ZipCache (probes, a
left-padded batch) and MiKV (every row, SDPA's output) on the Triton engine keep every token
in the same tier with either scoring, on inputs checked to have no near-tie at a boundary."""

from __future__ import annotations

from typing import Any

import numpy as np
import pytest
import torch

import kvmix
from kvmix import _kvmix
from kvmix import attention as A
from kvmix.models import tiny_random_model

pytest.importorskip("triton")
from kvmix.engines import load_scoring

TOL = {"rtol": 1e-5, "atol": 1e-5}


def _received(*args: Any, **kw: Any) -> torch.Tensor:
    out: torch.Tensor = load_scoring("cpu").received_attention(*args, **kw)
    return out


def _qk(
    b: int, hq: int, hk: int, t: int, d: int, dtype: torch.dtype, seed: int = 0
) -> tuple[torch.Tensor, torch.Tensor]:
    g = torch.Generator().manual_seed(seed)
    # Model-like layout: (B, T, H, D) transposed to (B, H, T, D), head_dim contiguous.
    q = (torch.randn(b, t, hq, d, generator=g) * 1.5).to(dtype).transpose(1, 2)
    k = torch.randn(b, t, hk, d, generator=g).to(dtype).transpose(1, 2)
    return q, k


CASES = [
    # dtype, head_dim, query heads, kv heads, tokens, rows, first_valid
    (torch.float32, 64, 4, 4, 37, [0, 3, 5, 17, 18, 19, 36], [0, 5]),
    (torch.bfloat16, 128, 8, 2, 50, [2, 9, 30, 31, 32, 49], [0, 3]),
    (torch.float16, 64, 8, 2, 33, [32], [0, 0]),
    # Rows inside one sequence's padding (0..19) see nothing and give nothing.
    (torch.bfloat16, 64, 4, 1, 41, [1, 4, 19, 20, 25, 40], [0, 20]),
    # Every row (MiKV's scoring), T not a multiple of the 16-key tile.
    (torch.float16, 128, 8, 2, 45, list(range(45)), [7, 0]),
]


@pytest.mark.parametrize(
    ("dtype", "d", "hq", "hk", "t", "rows", "fv"),
    CASES,
    ids=[f"{str(c[0])[6:]}-d{c[1]}-rep{c[2] // c[3]}-t{c[4]}-n{len(c[5])}" for c in CASES],
)
def test_kernel_matches_the_torch_reference(
    dtype: torch.dtype, d: int, hq: int, hk: int, t: int, rows: list[int], fv: list[int]
) -> None:
    q, k = _qk(2, hq, hk, t, d, dtype)
    scale = d**-0.5
    want = A._probabilities(q, k, rows, fv, scale)  # CPU tensors: the torch code
    got = _received(q, k, rows, fv, scale)
    assert got.dtype == torch.float32 and got.shape == (2, hk, t)
    torch.testing.assert_close(got, want, **TOL)
    # Each row that sees a key gives each of its query heads' probabilities, summing to 1.
    for bi, f in enumerate(fv):
        seeing = sum(r >= f for r in rows)
        assert abs(float(got[bi].sum()) - seeing * hq) < 1e-4 * max(seeing * hq, 1)
        assert float(got[bi, :, :f].abs().sum()) == 0.0  # padding receives nothing


def test_the_gpu_tiles_give_the_same_sums() -> None:
    """The GPU's default tiles (larger than the interpreter's 16 x 16, and different for the
    two kernels) run under the interpreter too: the same sums, across tile edges."""
    q, k = _qk(2, 8, 2, 200, 32, torch.float16, seed=7)
    rows = [*range(0, 150, 3), *range(150, 200)]
    fv = [0, 41]
    want = A._probabilities(q, k, rows, fv, 0.2)
    got = _received(q, k, rows, fv, 0.2, blocks=load_scoring("cpu").GPU_BLOCKS)
    torch.testing.assert_close(got, want, **TOL)


@pytest.mark.parametrize("kernel", ["received", "received_stacked"])
@pytest.mark.parametrize(("hq", "hk"), [(8, 2), (9, 3), (4, 4)], ids=["rep4", "rep3", "rep1"])
@pytest.mark.parametrize(
    "tile",
    [(16, 16, 1, 1), (32, 64, 4, 2), (16, 32, 2, 2, 1)],
    ids=["small", "gpu-like", "elementwise-sums"],
)
def test_both_column_kernels_give_the_same_sums(
    kernel: str, hq: int, hk: int, tile: tuple[int, ...]
) -> None:
    """The column pass per head and with the GQA group's heads stacked in one tile (a group
    of 3 padded to 4), its tiles reduced one by one or summed elementwise first (a fifth tile
    entry), give the reference's sums, padded sequences and tile edges included."""
    q, k = _qk(2, hq, hk, 90, 32, torch.bfloat16, seed=8)
    rows = [*range(0, 60, 4), *range(60, 90)]
    fv = [0, 13]
    want = A._probabilities(q, k, rows, fv, 0.2)
    blocks = {"lse": (16, 16, 1, 1), kernel: tile}
    torch.testing.assert_close(_received(q, k, rows, fv, 0.2, blocks=blocks), want, **TOL)


def test_rows_uploaded_once_per_prompt_follow_the_rows_given() -> None:
    """The rows and first valid positions are uploaded once and reused while a call gives the
    same values (every layer of a prefill): calls in a row with the same rows, then rows of the
    same length but other values, a numpy array of rows changed in place, other first valid
    positions, and another key length each give the reference's sums for what they were
    given."""
    q, k = _qk(2, 8, 2, 70, 32, torch.bfloat16, seed=9)
    rows = np.array([3, 10, 11, 40, 41, 69], dtype=np.int64)
    calls = [(rows.copy(), [0, 5], 70), (rows.copy(), [0, 5], 70)]
    calls.append((np.array([4, 10, 12, 40, 50, 68]), [0, 5], 70))  # same length, new rows
    calls.append((np.array([4, 10, 12, 40, 50, 68]), [2, 0], 70))  # new first valid
    calls.append((np.array([4, 10, 12, 40, 50, 60]), [2, 0], 70))
    calls.append((np.array([4, 10, 12, 40, 50, 60]), [2, 0], 61))  # the same rows, fewer keys
    from kvmix.bench.host import count_host_work

    for i, (r, fv, t) in enumerate(calls):
        qt, kt = q[:, :, :t], k[:, :, :t]
        want = A._probabilities(qt, kt, r.tolist(), fv, 0.2)
        with count_host_work() as (ops, _):
            got = _received(qt, kt, r, fv, 0.2)
        torch.testing.assert_close(got, want, **TOL)
        if i == 1:  # the same rows again: only the sums' and the LSE's tensors are made
            assert ops.total() <= 2, ops.ops
    # The caller's own array, changed in place between two calls.
    _received(q, k, rows, [0, 0], 0.2)
    rows[2] = 12
    want = A._probabilities(q, k, rows.tolist(), [0, 0], 0.2)
    torch.testing.assert_close(_received(q, k, rows, [0, 0], 0.2), want, **TOL)


def test_rows_per_sequence_match_each_sequence_alone() -> None:
    """One launch with each sequence's own rows (as the prefill passes ZipCache's probes of
    sequences padded differently) gives each sequence what the reference gives it alone."""
    q, k = _qk(3, 8, 2, 40, 64, torch.bfloat16, seed=1)
    rows = [[1, 5, 39], [12, 13, 14, 30], []]
    fv = [0, 10, 4]
    got = _received(q, k, rows, fv, 0.125)
    for bi in range(3):
        want = (
            A._probabilities(q[bi : bi + 1], k[bi : bi + 1], rows[bi], fv[bi : bi + 1], 0.125)
            if rows[bi]
            else torch.zeros(1, 2, 40)
        )
        torch.testing.assert_close(got[bi : bi + 1], want, **TOL)


def test_probabilities_and_column_sums_use_the_kernel_when_asked(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    """``KVMIX_PREFILL_SCORING=triton`` routes the attention module's scoring through the
    kernels (``auto`` does for CUDA tensors): MiKV's one-pass output and column sums become
    SDPA's output and the kernels' sums, within fp32 tolerances of the explicit softmax."""
    q, k = _qk(2, 8, 2, 45, 64, torch.float32, seed=2)
    v = torch.randn(2, 2, 45, 64, generator=torch.Generator().manual_seed(3))
    want_out, want_acc = A._attention_and_column_sums(q, k, v, 0.125)
    want_p = A._probabilities(q, k, [3, 20, 44], [0, 0], 0.125)
    calls: list[int] = []
    real = A._received
    monkeypatch.setattr(A, "_received", lambda *a: calls.append(1) or real(*a))
    monkeypatch.setenv(A.SCORING_KERNEL_ENV, "triton")
    got_out, got_acc = A._attention_and_column_sums(q, k, v, 0.125)
    got_p = A._probabilities(q, k, [3, 20, 44], [0, 0], 0.125)
    assert len(calls) == 2
    torch.testing.assert_close(got_out, want_out, rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(got_acc, want_acc, **TOL)
    torch.testing.assert_close(got_p, want_p, **TOL)
    monkeypatch.setenv(A.SCORING_KERNEL_ENV, "gpu")
    with pytest.raises(kvmix.ConfigError, match="KVMIX_PREFILL_SCORING"):
        A._probabilities(q, k, [3], [0, 0], 0.125)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_flash_lse_replaces_the_first_pass(dtype: torch.dtype) -> None:
    """The flash forward's output is SDPA's and its LSE (base 2) each row's log-sum-exp of
    the scaled causal logits (an independent float64 computation); the kernels given that
    LSE (first pass skipped) give the column sums they compute alone."""
    q, k = _qk(2, 8, 2, 45, 64, dtype, seed=4)
    v = torch.randn(2, 45, 2, 64, generator=torch.Generator().manual_seed(5)).to(dtype)
    v = v.transpose(1, 2)
    flash = A._flash_attention_with_lse(q, k, v, 0.125)
    assert flash is not None
    out, lse = flash
    sdpa = torch.nn.functional.scaled_dot_product_attention(
        q, k, v, is_causal=True, scale=0.125, enable_gqa=True
    )
    tol = {"rtol": 1e-5, "atol": 1e-5} if dtype == torch.float32 else {"rtol": 2e-2, "atol": 2e-2}
    torch.testing.assert_close(out, sdpa.transpose(1, 2), **tol)
    logits = (q.double() @ k.double().repeat_interleave(4, 1).transpose(-1, -2)) * 0.125
    causal = torch.ones(45, 45, dtype=torch.bool).tril()
    want_lse = torch.logsumexp(logits.masked_fill(~causal, float("-inf")), -1) / np.log(2)
    assert lse.shape == (2, 8, 45) and lse.dtype == torch.float32
    torch.testing.assert_close(lse.double(), want_lse, rtol=1e-5, atol=1e-4)
    # The once-per-process check of a private op's LSE accepts it and refuses it shifted.
    natural = lse * float(np.log(2))
    assert A._lse_is_right(q, k, natural, 0.125)
    assert not A._lse_is_right(q, k, natural.roll(1, dims=2), 0.125)
    rows = [0, 3, 17, 30, 44]
    alone = _received(q, k, rows, [0, 0], 0.125)
    given = _received(q, k, rows, [0, 0], 0.125, row_lse=lse)
    # bf16: the flash forward's logits round differently from the kernels' (~5e-5 relative).
    torch.testing.assert_close(
        given, alone, **(TOL if dtype == torch.float32 else {"rtol": 2e-4, "atol": 1e-5})
    )
    with pytest.raises(kvmix.ShapeError, match="row_lse"):
        _received(q, k, rows, [0, 0], 0.125, row_lse=lse[:, :4])
    with pytest.raises(kvmix.ShapeError, match="row_lse"):
        _received(q, k, rows, [0, 0], 0.125, row_lse=lse.double())


def test_bad_input_is_refused_with_a_clear_error() -> None:
    q, k = _qk(2, 4, 2, 20, 32, torch.float32)
    with pytest.raises(kvmix.DTypeError, match="share a dtype"):
        _received(q, k.half(), [1, 2], [0, 0], 0.1)
    with pytest.raises(kvmix.DTypeError, match="share a dtype"):
        _received(q.int(), k.int(), [1, 2], [0, 0], 0.1)
    with pytest.raises(kvmix.ShapeError, match="strictly ascending"):
        _received(q, k, [3, 2], [0, 0], 0.1)
    with pytest.raises(kvmix.ShapeError, match="strictly ascending"):
        _received(q, k, [4, 4], [0, 0], 0.1)
    with pytest.raises(kvmix.ShapeError, match=r"\[0, 20\)"):
        _received(q, k, [5, 20], [0, 0], 0.1)
    with pytest.raises(kvmix.ShapeError, match=r"\[0, 20\)"):
        _received(q, k, [-1, 5], [0, 0], 0.1)
    with pytest.raises(kvmix.ShapeError, match="one list per sequence"):
        _received(q, k, [[1], [2], [3]], [0, 0], 0.1)
    with pytest.raises(kvmix.ShapeError, match="first_valid"):
        _received(q, k, [1], [0], 0.1)
    with pytest.raises(kvmix.ShapeError, match="power of two"):
        _received(q[..., :24], k[..., :24], [1], [0, 0], 0.1)
    with pytest.raises(kvmix.ShapeError, match="dividing"):
        _received(q[:, :3], k, [1], [0, 0], 0.1)
    with pytest.raises(kvmix.ShapeError, match="4-D"):
        _received(q[0], k[0], [1], [0, 0], 0.1)
    with pytest.raises(kvmix.NonFiniteError, match="scale"):
        _received(q, k, [1], [0, 0], float("nan"))


@pytest.mark.parametrize("fv", [[0, 0], [0, 9]])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_device_key_balancer_is_the_host_functions(fv: list[int], dtype: torch.dtype) -> None:
    """MiKV's key balancer computed where the tensors live gives the Rust function's numbers
    (over each sequence's own tokens), bit for bit."""
    q, k = _qk(2, 8, 2, 30, 32, dtype, seed=4)
    q[1, :, : fv[1]] = 1e4  # padding, which must not set the scale
    got = A._key_balancer(q, k, fv)
    for bi, f in enumerate(fv):
        qs, ks = (x[bi : bi + 1, :, f:].float().contiguous().numpy() for x in (q, k))
        want = torch.from_numpy(_kvmix.key_balancer(qs, ks))
        torch.testing.assert_close(got[bi : bi + 1], want, rtol=0, atol=0)
    q[0, 3, 5, 7] = float("nan")
    with pytest.raises(kvmix.NonFiniteError, match="NaN or Inf"):
        A._key_balancer(q, k, fv)


def _held(cache: kvmix.KvmixCache) -> list[dict[str, list[int]]]:
    out = []
    for layer in cache.layers:
        for s in range(layer.store.batch * layer.store.kv_heads):
            tiers = layer.store.tier_positions(s)
            out.append({t: sorted(int(p) for p in torch.as_tensor(tiers[t])) for t in tiers})
    return out


def _boundary_gap(acc: torch.Tensor, count: torch.Tensor, fv: list[int], ratio: float) -> float:
    """The smallest relative gap, over sequences, between the weakest salient and the strongest
    regular token's score as ZipCache ranks them (layer-wise selection: scores summed over the
    kv-heads, then normalized by the visible probe counts)."""
    worst = float("inf")
    for bi, f in enumerate(fv):
        score = acc[bi, :, f:].sum(0) / count[bi, :, f:].sum(0)
        top = score.sort(descending=True).values
        k = int(np.floor(ratio * score.numel() + 0.5))
        worst = min(worst, float((top[k - 1] - top[k]) / top[k - 1]))
    return worst


@pytest.mark.parametrize("padded", [True, False], ids=["left-padded", "unpadded"])
def test_zipcache_tiers_on_the_triton_engine_are_the_torch_scorings(
    monkeypatch: pytest.MonkeyPatch, padded: bool
) -> None:
    """ZipCache on the Triton engine (a tiny random Llama, a batch left-padded or not) holds
    every token in the same tier whether the prefill's probe scores come from the kernels or
    from the torch code. Unpadded, the kernels take the rows' LSE from the flash forward that
    computes the attention (its first pass skipped). A flip needs two tokens' scores within
    the kernels' error (~1e-6 relative here); the test checks that every salient/regular
    boundary is 20 times that apart, so the comparison cannot hinge on a near-tie."""
    from kvmix.engines.triton_store import TritonLayerStore

    model = kvmix.enable_fused_attention(tiny_random_model("llama", num_hidden_layers=2))
    # Seeds whose salient/regular boundaries are far from ties (see the gap check below).
    seed = 5 if padded else 11
    ids = torch.randint(3, 128, (2, 120), generator=torch.Generator().manual_seed(seed))
    mask = torch.ones_like(ids)
    if padded:
        mask[1, :9] = 0
    fv = [0, 9] if padded else [0, 0]
    flash_calls: list[int] = []
    real_flash = A._flash_attention_with_lse
    monkeypatch.setattr(
        A, "_flash_attention_with_lse", lambda *a: flash_calls.append(1) or real_flash(*a)
    )
    add_scores = TritonLayerStore.add_scores
    held, scores = [], []
    for scoring in ("torch", "triton"):
        given: list[tuple[torch.Tensor, torch.Tensor]] = []

        def spy(self: Any, start: int, acc: torch.Tensor, count: torch.Tensor) -> None:
            given.append((acc.clone(), count.clone()))  # noqa: B023 (used in this iteration)
            add_scores(self, start, acc, count)

        monkeypatch.setattr(TritonLayerStore, "add_scores", spy)
        monkeypatch.setenv(A.SCORING_KERNEL_ENV, scoring)
        cache = kvmix.ZipCache(model.config, engine="triton")
        with torch.inference_mode():
            model(input_ids=ids, attention_mask=mask, past_key_values=cache, use_cache=True)
        held.append(_held(cache))
        scores.append(given)
    assert [x.first_valid for x in cache.layers] == [fv, fv]
    assert len(flash_calls) == (0 if padded else 2)  # one per layer, kernels only
    assert all(h["high"] and h["low"] for h in held[0])
    assert held[1] == held[0]
    ratio = float(cache.layers[0].options["salient_ratio"])
    for (acc_t, cnt_t), (acc_k, cnt_k) in zip(scores[0], scores[1], strict=True):
        torch.testing.assert_close(acc_k, acc_t, **TOL)
        torch.testing.assert_close(cnt_k, cnt_t, rtol=0, atol=0)
        err = float(((acc_k - acc_t).abs() / acc_t.abs().clamp_min(1e-6)).max())
        gap = _boundary_gap(acc_t, cnt_t, fv, ratio)
        assert gap > 20 * err, (gap, err)


def test_mikv_tiers_on_the_triton_engine_are_the_torch_scorings(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    """MiKV on the Triton engine (an unpadded batch: the fused path's one-pass attention)
    holds every token in the same tier with SDPA's output and the kernels' column sums as with
    the explicit softmax; as above, every heavy-hitter boundary is checked to be 20 times the
    scores' difference apart."""
    from kvmix.engines.triton_store import TritonLayerStore

    model = kvmix.enable_fused_attention(tiny_random_model("llama", num_hidden_layers=2))
    ids = torch.randint(3, 128, (2, 90), generator=torch.Generator().manual_seed(8))
    add_scores = TritonLayerStore.add_scores
    one_pass = A._attention_and_column_sums
    passes: list[str] = []
    monkeypatch.setattr(
        A, "_attention_and_column_sums", lambda *a: passes.append("one") or one_pass(*a)
    )
    held, scores = [], []
    for scoring in ("torch", "triton"):
        given: list[torch.Tensor] = []

        def spy(self: Any, start: int, acc: torch.Tensor, count: torch.Tensor) -> None:
            given.append(acc.clone())  # noqa: B023 (used in this iteration)
            add_scores(self, start, acc, count)

        monkeypatch.setattr(TritonLayerStore, "add_scores", spy)
        monkeypatch.setenv(A.SCORING_KERNEL_ENV, scoring)
        cache = kvmix.MiKVCache(model.config, engine="triton")
        with torch.inference_mode():
            model(input_ids=ids, past_key_values=cache, use_cache=True)
        held.append(_held(cache))
        scores.append(given)
    assert passes == ["one"] * 4  # two layers, two scorings: the fused path's one pass
    assert all(h["high"] and h["low"] for h in held[0])
    assert held[1] == held[0]
    opts = cache.layers[0].options
    budget = int(np.floor(opts["ratio"] * 90 + 0.5))
    recent = int(np.floor(opts["recent_share"] * budget + 0.5))
    for acc_t, acc_k in zip(scores[0], scores[1], strict=True):
        torch.testing.assert_close(acc_k, acc_t, **TOL)
        err = float(((acc_k - acc_t).abs() / acc_t.abs().clamp_min(1e-6)).max())
        # Per stream: the heavy hitters are the best `budget - recent` among the older tokens.
        older = acc_t[..., : 90 - recent].reshape(-1, 90 - recent).sort(1, descending=True)
        a, c = older.values[:, budget - recent - 1], older.values[:, budget - recent]
        gap = float(((a - c) / a).min())
        assert gap > 20 * err, (gap, err)


@pytest.mark.cuda
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float16])
def test_compiled_kernel_matches_the_torch_reference_on_cuda(
    dtype: torch.dtype, monkeypatch: pytest.MonkeyPatch
) -> None:
    """On a GPU (``pytest -m cuda``): the compiled kernels (tensor-core dots in bf16/fp16)
    against the torch reference on the same device, at a shape that crosses the GPU tiles."""
    q, k = _qk(2, 32, 8, 700, 128, dtype, seed=6)
    q, k = q.cuda(), k.cuda()
    rows = sorted({*range(600, 700), *range(0, 600, 7)})
    fv = [0, 33]
    monkeypatch.setenv(A.SCORING_KERNEL_ENV, "torch")
    want = A._probabilities(q, k, rows, fv, 128**-0.5)  # rows x keys logits in fp32
    got = load_scoring(q.device).received_attention(q, k, rows, fv, 128**-0.5)
    # fp32 inputs: IEEE dots; half inputs: exact products, fp32 sums in another order.
    torch.testing.assert_close(got, want, rtol=1e-4, atol=1e-4)
    if dtype != torch.float32:
        # Unpadded, with the rows' LSE from the flash forward (GQA 4:1, as the 8B shape).
        v = torch.randn_like(k)
        flash = A._flash_attention_with_lse(q, k, v, 128**-0.5)
        assert flash is not None
        sdpa = torch.nn.functional.scaled_dot_product_attention(
            q, k, v, is_causal=True, scale=128**-0.5, enable_gqa=True
        )
        torch.testing.assert_close(flash[0], sdpa.transpose(1, 2), rtol=2e-2, atol=2e-2)
        want0 = A._probabilities(q, k, rows, [0, 0], 128**-0.5)
        got0 = load_scoring(q.device).received_attention(
            q, k, rows, [0, 0], 128**-0.5, row_lse=flash[1]
        )
        torch.testing.assert_close(got0, want0, rtol=1e-4, atol=1e-4)
        # The stacked-heads column pass, at the tiles the profile sweeps.
        for tile in [(32, 128, 8, 2), (16, 128, 4, 3), (32, 64, 4, 3)]:
            got1 = load_scoring(q.device).received_attention(
                q, k, rows, fv, 128**-0.5, blocks={"lse": (128, 64, 8, 3), "received_stacked": tile}
            )
            torch.testing.assert_close(got1, want, rtol=1e-4, atol=1e-4)
