"""The Triton store packs segments back to back: it holds the Rust store's rows.

kvmix-5x keeps per-segment parameters in both tiers (per-channel keys, separable value
factors) and writes small segments: the 4-token sink segment, and at every decoding
classification ~14% of ``streaming_gap`` tokens to the high tier. A tiny random Llama
generates greedily on both engines (CPU tensors: Triton's interpreter runs the kernels): after
the prompt and after two decoding classifications, every byte count of every tier is the Rust
store's, but the segment index, which the Triton store keeps as one block table per layer
(shared by its streams) where the Rust store keeps each stream's segment starts; and the
attention over the stores agrees.
"""

from __future__ import annotations

import itertools

import pytest
import torch

import kvmix
from kvmix.models import tiny_random_model

pytest.importorskip("triton")
from kvmix.engines.triton_store import PAGE

#: A prompt longer than two pages (so the low tier's prompt segment spans pages), and decoding
#: past two classifications (steps 4 and 8).
PROMPT, GAP, NEW = 150, 4, 10
INDEX = ("key_index", "value_index")


def _generate(engine: str, new: int, device: str = "cpu") -> tuple[torch.Tensor, kvmix.KvmixCache]:
    model = kvmix.enable_fused_attention(tiny_random_model("llama", num_hidden_layers=2))
    model = model.to(device)
    ids = torch.randint(3, 128, (2, PROMPT), generator=torch.Generator().manual_seed(3))
    ids = ids.to(device)
    cache = kvmix.Kvmix5xCache(model.config, streaming_gap=GAP, engine=engine)  # type: ignore[arg-type]
    out = model.generate(
        input_ids=ids,
        attention_mask=torch.ones_like(ids),
        past_key_values=cache,
        max_new_tokens=new,
        do_sample=False,
    )
    return out[:, PROMPT:].cpu(), cache


CUDA = pytest.param(
    "cuda",
    marks=[
        pytest.mark.cuda,
        pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU"),
    ],
)


@pytest.mark.parametrize("device", ["cpu", CUDA])
@pytest.mark.parametrize("new", [1, NEW], ids=["prompt", "two-classifications"])
def test_kvmix_5x_triton_store_holds_the_rust_stores_bytes(new: int, device: str) -> None:
    """``device="cuda"`` (``pytest -m cuda``): the Triton engine compiled, against the Rust
    engine on the CPU."""
    want, rust = _generate("rust", new)
    got, tri = _generate("triton", new, device)
    torch.testing.assert_close(got, want, rtol=0, atol=0)
    index_r = index_t = 0
    for lr, lt in zip(rust.layers, tri.layers, strict=True):
        mr, mt = lr.store.memory(), lt.store.memory()
        assert mt["tokens"] == mr["tokens"] == 2 * 2 * (PROMPT + new - 1)
        for name in ("buffer", "high", "low"):
            r, t = mr["tiers"][name], mt["tiers"][name]
            # Codes, parameters, positions and scores: byte for byte (this failed when every
            # segment started on a fresh page: the sink segment alone left 60 rows of holes).
            assert {k: t[k] for k in t if k not in INDEX and k != "total"} == {
                k: r[k] for k in r if k not in INDEX and k != "total"
            }, name
            tier = lt.store._tiers[name]
            if tier.segmented:
                # The block table: each block's first row and segment, and the fill; a block
                # is rows of one segment within one page.
                assert t["key_index"] + t["value_index"] == tier.seg.numel() * 4
                starts = [*tier.blocks[0::2], tier.fill]
                pairs = itertools.pairwise(starts)
                assert all(a < b and a // PAGE == (b - 1) // PAGE for a, b in pairs)
                assert len(set(tier.blocks[1::2])) == tier.nseg
            index_r += r["key_index"] + r["value_index"]
            index_t += t["key_index"] + t["value_index"]
        assert mt["bytes"] - mr["bytes"] == sum(
            mt["tiers"][n]["key_index"] + mt["tiers"][n]["value_index"]
            - mr["tiers"][n]["key_index"] - mr["tiers"][n]["value_index"]
            for n in ("buffer", "high", "low")
        )  # fmt: skip
    # The whole cache: the Rust count but for the index (each store's own, checked above).
    r_all, t_all = rust.memory_report(), tri.memory_report()
    assert t_all["bytes"] - r_all["bytes"] == index_t - index_r
    # Attention over every tier of each layer (a query at the next position, received
    # attention tracked), as in the engines' parity tests.
    g = torch.Generator().manual_seed(4)
    for lr, lt in zip(rust.layers, tri.layers, strict=True):
        s_r, s_t = lr.store, lt.store
        q = torch.randn(2, 4, 1, s_t.head_dim, generator=g)
        pos = [s_t.seen]
        # The Rust store holds what the layer rotated (its query rotated, its output rotated
        # back around it); the Triton store rotates in its kernels.
        rot = lr.host_rotation
        assert rot is not None and lt.host_rotation is None
        out_r = torch.from_numpy(s_r.attend((q @ rot).numpy(), pos, 0.25, True)) @ rot.T
        out_t = s_t.attend(q.to(device), pos, 0.25, True).cpu()
        # As the engines' parity tests ask (tests/test_engine_cache.py): on a GPU the field
        # path's fp16 parts put the outputs ~6e-5 apart relative to the largest (H200), more
        # than the interpreter's exact fp32 (within 2e-5 there).
        torch.testing.assert_close(out_t, out_r, rtol=1e-5, atol=1e-5)
