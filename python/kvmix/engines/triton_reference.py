"""Plain-torch reference for the Triton attention kernel (tests and benchmarks).

Independent of the kernels: packs codes with the Rust layout (``src/quant/packing.rs``: a
least-significant-bit-first bitstream, so 8 codes of 3 bits fill 3 bytes), builds
:class:`~kvmix.engines.triton_store.TierView` s of any codec the kernel reads, dequantizes a
view in float64 and computes attention and received attention over a set of views.
"""

from __future__ import annotations

from typing import Any

import torch

from kvmix.engines.triton_store import PAGE, TierView


def pack_codes(codes: torch.Tensor, bits: int) -> torch.Tensor:
    """``codes [..., D]`` (values below ``2^bits``) packed LSB first: ``[..., D * bits / 8]``."""
    shifts = torch.arange(bits, device=codes.device)
    stream = (codes.long()[..., None] >> shifts) & 1  # [..., D, bits], LSB first
    stream = stream.reshape(*codes.shape[:-1], -1, 8)
    weights = 1 << torch.arange(8, device=codes.device)
    return (stream * weights).sum(-1).to(torch.uint8)


def unpack_codes(packed: torch.Tensor, bits: int, d: int) -> torch.Tensor:
    """The inverse of :func:`pack_codes`: ``[..., D]`` int64."""
    stream = (packed.long()[..., None] >> torch.arange(8, device=packed.device)) & 1
    stream = stream.reshape(*packed.shape[:-1], d, bits)
    return (stream << torch.arange(bits, device=packed.device)).sum(-1)


def synthetic_tier(
    streams: int,
    fill: int,
    d: int,
    k: tuple[str, int, int],
    v: tuple[str, int, int],
    *,
    v_sep: bool = False,
    nseg: int = 3,
    holes: float = 0.1,
    pos_offset: int = 0,
    device: Any = "cpu",
    generator: torch.Generator | None = None,
) -> TierView:
    """A tier of ``fill`` rows per stream with random codes and parameters. ``k``/``v`` are
    ``(mode, bits, group_size)`` with mode ``"dense"`` (fp32), ``"channel"`` (keys) or
    ``"token"``; a fraction ``holes`` of the rows are holes (position -1). A segmented tier
    (channel keys or ``v_sep``) is cut into runs of 1 to 100 rows, anywhere (so pages hold
    several), each with a random one of the ``nseg`` parameter sets."""
    g = generator
    cap = max(PAGE, -(-fill // PAGE) * PAGE)
    dev = torch.device(device)

    def rand(*shape: int) -> torch.Tensor:
        return torch.rand(*shape, generator=g).to(dev)

    pos = torch.full((streams, cap), -1, dtype=torch.int32)
    pos[:, :fill] = torch.arange(fill, dtype=torch.int32) + pos_offset
    pos[:, :fill][torch.rand(streams, fill, generator=g) < holes] = -1
    # The cuts come from a generator of their own, seeded by as many draws of ``g`` as one
    # segment id per page takes, so that the other draws (codes, parameters, the tiers made
    # next) do not depend on how a tier is cut.
    cg = torch.Generator().manual_seed(
        int(torch.randint(0, nseg, (streams, cap // PAGE), generator=g, dtype=torch.int32).sum())
    )
    table = [0]
    if k[0] == "channel" or v_sep:
        start, table = 0, []
        while start < fill:
            end = min(fill, start + int(torch.randint(1, 101, (1,), generator=cg)))
            sid = int(torch.randint(0, nseg, (1,), generator=cg))
            cuts = sorted({start, *range(-(-start // PAGE) * PAGE, end, PAGE)})
            table += [x for r in cuts for x in (r, sid)]
            start = end
        table.append(fill)
    dummy = torch.zeros(1, dtype=torch.float16, device=dev)
    parts: dict[str, Any] = {}
    for side, (mode, bits, gs) in (("k", k), ("v", v)):
        if mode == "dense":
            parts[side + "d"] = (torch.randn(streams, cap, d, generator=g)).to(dev)
            parts[side + "s"] = parts[side + "o"] = dummy
            parts[side + "_mode"], parts[side + "_bits"], parts[side + "_gs"] = 0, 16, d
            continue
        codes = torch.randint(0, 1 << bits, (streams, cap, d), generator=g)
        parts[side + "d"] = pack_codes(codes, bits).to(dev)
        if mode == "channel":
            parts[side + "s"] = (rand(streams, nseg, d) * 0.5 + 0.01).half()
            parts[side + "o"] = (rand(streams, nseg, d) - 0.5).half()
            parts[side + "_mode"], parts[side + "_gs"] = 1, d
        else:
            parts[side + "s"] = (rand(streams, cap, d // gs) * 0.5 + 0.01).half()
            parts[side + "o"] = (rand(streams, cap, d // gs) - 0.5).half()
            parts[side + "_mode"], parts[side + "_gs"] = 2, gs
        parts[side + "_bits"] = bits
    vf = (rand(streams, nseg, d) + 0.5).half() if v_sep else dummy
    return TierView(
        pos=pos.to(dev),
        kd=parts["kd"],
        ks=parts["ks"],
        ko=parts["ko"],
        seg=torch.tensor(table, dtype=torch.int32, device=dev),
        vd=parts["vd"],
        vs=parts["vs"],
        vo=parts["vo"],
        vf=vf,
        kfix=None,
        cap=cap,
        nseg=nseg,
        fill=fill,
        k_mode=parts["k_mode"],
        k_bits=parts["k_bits"],
        k_gs=parts["k_gs"],
        v_mode=parts["v_mode"],
        v_bits=parts["v_bits"],
        v_gs=parts["v_gs"],
        v_sep=v_sep,
    )


def dequantize(view: TierView, d: int) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """A view's rows ``(pos [S, fill], keys, values [S, fill, D] float64)``."""
    f = view.fill
    seg = torch.zeros((view.pos.shape[0], f), dtype=torch.long, device=view.pos.device)
    if view.segmented:  # each row's segment, from the block table
        table = view.seg.long()
        starts, ids = table[0:-1:2].contiguous(), table[1::2]
        block = torch.searchsorted(starts, torch.arange(f, device=table.device), right=True) - 1
        seg = ids[block][None, :].expand(view.pos.shape[0], -1)
    out = []
    for data, sc, of, mode, bits, gs, key in (
        (view.kd, view.ks, view.ko, view.k_mode, view.k_bits, view.k_gs, True),
        (view.vd, view.vs, view.vo, view.v_mode, view.v_bits, view.v_gs, False),
    ):
        if mode == 0:
            x = data[:, :f].double()
        else:
            c = unpack_codes(data[:, :f], bits, d).double()
            if mode == 1:
                idx = seg[:, :, None].expand(-1, -1, d)
                x = c * sc.double().gather(1, idx) + of.double().gather(1, idx)
            else:
                grp = torch.arange(d, device=c.device) // gs
                x = c * sc[:, :f].double()[:, :, grp] + of[:, :f].double()[:, :, grp]
        if key and view.kfix is not None:
            x = x * view.kfix.double()[:, None, :]
        if not key and view.v_sep:
            x = x * view.vf.double().gather(1, seg[:, :, None].expand(-1, -1, d))
        out.append(x)
    return view.pos[:, :f].long(), out[0], out[1]


def attention(
    views: list[TierView],
    q: torch.Tensor,
    q_positions: list[int],
    first_valid: torch.Tensor,
    scale: float,
    kv_heads: int,
) -> tuple[torch.Tensor, list[torch.Tensor]]:
    """float64 attention of ``q [B, Hq, Tq, D]`` over the views, and each view's received
    attention ``[S, fill]`` (summed over the group's heads and the queries)."""
    b, hq, tq, d = q.shape
    g = hq // kv_heads
    rows = [dequantize(v, d) for v in views]
    pos = torch.cat([r[0] for r in rows], 1)
    k = torch.cat([r[1] for r in rows], 1)
    v = torch.cat([r[2] for r in rows], 1)
    qs = q.double().reshape(b * kv_heads, g * tq, d)
    qp = torch.tensor(q_positions, device=q.device).repeat(g)  # row = head * tq + query
    fv = first_valid.long().repeat_interleave(kv_heads)
    vis = (pos[:, None, :] >= fv[:, None, None]) & (pos[:, None, :] <= qp[None, :, None])
    logits = (qs @ k.transpose(1, 2)) * scale
    p = torch.softmax(logits.masked_fill(~vis, float("-inf")), -1)
    p = torch.nan_to_num(p)  # rows that see nothing
    out = (p @ v).reshape(b, hq, tq, d)
    received, start = [], 0
    for r in rows:
        n = r[0].shape[1]
        received.append(p[:, :, start : start + n].sum(1))
        start += n
    return out, received
