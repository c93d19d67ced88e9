"""The Triton device engine: a layer's mixed-precision store held in torch tensors.

Every tier (the full-precision buffer, the high and the low tier) of every stream
``(sequence, kv-head)`` lives in torch tensors on the device of the tensors it was given:
codes, per-token or per-segment scales and offsets, channel factors, positions and scores. So
``torch.cuda.memory_allocated()`` sees all of it, and :meth:`TritonLayerStore.memory` counts
the bytes those tensors hold.

Layout (what differs from the Rust store, and why):

* The streams of a layer share one row index per tier: row ``r`` of every stream is written by
  the same push. A stream that has fewer rows to store in a push (ZipCache's salient set of a
  left-padded sequence) leaves the rest as holes, position ``-1``, which every kernel masks.
  So tier sizes follow from counts the host already knows and nothing is read back while
  decoding.
* Segments (the rows of one push, or of one block of a push, that share per-segment
  parameters: per-channel keys, separable value factors) are packed back to back, so a
  segmented tier holds the Rust store's rows (a page may hold several segments). The
  kernels walk a segmented tier by *blocks*: a block is the rows of one segment within one
  page (:attr:`TierView.seg`, a table of each block's first row and segment, one for the
  layer's streams since every stream's segment starts at the same row). A kernel loads the
  block's page as it loads a page of an unsegmented tier and masks the rows outside the
  block, so each iteration loads one segment's parameters, and a page of one segment (the
  common case) is one iteration, as before. Starting each segment on a fresh page instead
  (the layout before) left up to 63 rows of holes per segment: kvmix-5x's 4-token sink
  segment cost 60 rows per stream and layer, each decoding classification's ~14 salient
  rows a 64-row page. A page shared by segments costs one iteration per segment (a
  classification's segments are about one extra iteration each), so the kernels walk about
  as many blocks as they walked pages then. ``memory()`` counts the block table as the
  segment index (one per layer, 8 bytes per block), where the Rust store counts 4 bytes per
  segment, stream and codec; every other count is the Rust store's (where no stream leaves
  holes). Rejected: a loop over a page's segments inside the page loop (a dot per segment,
  rows picked by ``tl.where``): every page would carry a loop inside the software-pipelined
  page loop, for the few pages that need it, and Triton's pipeliner passes over loops that
  hold loops (not measured here); blocks keep the page loop's body as it was.
* Removing rows (``crop``) turns them into holes rather than moving data.

Which tokens go to which tier is decided on the device with the Rust store's rules
(``src/store/classify.rs``): the same scores, the same tie breaks, the same rounding of
budgets; the codecs come from the Rust store's ``layout`` (the one definition of every policy).
"""

from __future__ import annotations

import math
import weakref
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

import torch

from kvmix.engines.base import (
    ConfigError,
    DTypeError,
    NonFiniteError,
    ShapeError,
    as_integer,
    load_kernels,
)

if TYPE_CHECKING:
    from kvmix.types import BufferDtype, PolicyName

#: Rows per page (and per attention block).
PAGE = 64
#: Rows per program when a segment's per-channel grids are fitted and its keys encoded; the
#: channels per program, and the rows of one tile in a program's loop over its chunk.
CHANNEL_CHUNK = 512
CHANNEL_BLOCK = 16
CHANNEL_TILE = 32
#: Candidate grids of the range search evaluated together per pass over a chunk (sharing
#: each row's float64 widening).
CHANNEL_CANDIDATES = 4

_DTYPES = {"float16": torch.float16, "bfloat16": torch.bfloat16, "float32": torch.float32}
_MODES = {"dense": 0, "channel": 1, "token_groups": 2}
_SUPPORTED = ("full", "uniform", "zipcache", "mikv", "eviction")
_F16_MAX = 65504.0
#: Check queries and scores on CPU tensors for NaN/Inf (and negative scores) at once, as the
#: Rust store does; on a GPU the same read would synchronize every step, so it is not made
#: there. ``kvmix.bench.host.count_host_work`` turns it off to count what a GPU step does.
CHECK_HOST_VALUES = True
#: Decoding steps between reads of the device-side non-finite flag (each read synchronizes).
_BAD_CHECK_STEPS = 32
#: Positions are stored in 2 bytes (int16; ``-1`` marks a hole) while every position written
#: is at most this, then every tier widens them to int32 once: as the Rust store's 2-byte
#: positions while they fit in 16 bits (there unsigned, to 65535), a quarter of the metadata
#: of a 3-bit row of 64 channels less.
POS16_LIMIT = 32767


#: How the range searches decide (see ``triton_kernels._grid``): ``"fp32"`` in fp32, again in
#: float64 where fp32 rounding could have changed a decision (the grids are the float64
#: search's); ``"float64"`` always in float64; ``"fp32-unchecked"`` in fp32 with no second
#: search unless two errors tie exactly (for tests: the fp32 path's own choices).
SEARCH = "fp32"


def search_margin(terms: int) -> float:
    """How close an fp32 range-search decision may come to flipping before the search is run
    again in float64 (``triton_kernels._grid``): 4x the relative error of an fp32 sum of
    ``terms`` products summed in any order, each rounded once (``(terms + 1) * 2^-24``), so
    the decisions left to fp32 are the ones its rounding cannot have changed; -1 (always in
    float64) or 0 as :data:`SEARCH` says."""
    return {"fp32": 4.0 * (terms + 1) * 2.0**-24, "float64": -1.0, "fp32-unchecked": 0.0}[SEARCH]


#: Each codec's shrink factors on each device (:meth:`_Codec.shrink_tensor`).
_SHRINK_ON: dict[tuple[tuple[float, ...], torch.device], torch.Tensor] = {}


def _device_values(
    values: list[int] | list[float], device: Any, dtype: torch.dtype = torch.int64
) -> torch.Tensor:
    """Host numbers as a tensor on ``device`` without waiting for it: a plain copy from
    pageable memory synchronizes with the GPU, so small per-step counts go through pinned
    memory asynchronously (the caching host allocator keeps the block until the copy ran)."""
    host = torch.tensor(values, dtype=dtype)
    if torch.device(device).type == "cuda":
        return host.pin_memory().to(device, non_blocking=True)
    return host.to(device)


def _run(fn: Any, grid: tuple[int, ...], *args: Any, fusion: bool = False, **consts: Any) -> None:
    """``fn[grid](*args, **consts)`` through the attention module's launcher: on a GPU, a
    kernel already compiled for the same specialization is launched directly, skipping
    Triton's per-call binding (~300 us of host time per launch on the H200's host, against
    tens of microseconds), with Triton's default warps and stages. Compiled without fp
    contraction unless ``fusion``: a product and a sum then round twice, as in the Rust
    quantizer and the interpreter (the rotation's products and sums), so the GPU writes what
    they write. The range searches' kernels pass ``fusion=True`` for their hot loop (their
    one product that must round on its own is ``triton_kernels._product``)."""
    from kvmix.engines import load_attention

    dev = next(a.device for a in args if isinstance(a, torch.Tensor))
    load_attention(dev)._launch(
        fn, grid, list(args), consts, 4, 3, dev.type == "cuda", fusion=fusion
    )


def _round_half_away(x: float) -> int:
    """Rust's ``f64::round`` (half away from zero), not Python's banker's rounding."""
    return math.floor(x + 0.5)


def _partition(
    kern: Any, pick: torch.Tensor, p: torch.Tensor, width: int, code: int = 1
) -> tuple[torch.Tensor, torch.Tensor]:
    """Each row of ``pick [S, n]``'s stable partition, its first ``width`` columns: the column
    indices (int64 ``[S, width]``) of the columns where it holds (bool ``pick``; or where the
    int8 categories ``pick`` equal ``code``), in column order, then of the others, in column
    order (the order a stable sort of ``~pick`` gives), and ``p [S, n]``'s positions at the
    picked ones, -1 (a hole) at the others. One launch
    (``partition_kernel``): the stable sort, two gathers and a select it replaces were ~5 torch
    ops and a radix sort's several launches, paid per classification and per tier pushed to,
    on the host, which sets the pace of a decoding step on a GPU (~120 us of host time per
    sort on the H100's host, session 23's profile)."""
    s, n = pick.shape
    w = min(width, n)
    idx = torch.empty(s, w, dtype=torch.long, device=pick.device)
    gp = torch.empty(s, w, dtype=p.dtype, device=p.device)
    if s and w:
        pick = pick if pick.stride(1) == 1 else pick.contiguous()
        p = p if p.stride(1) == 1 else p.contiguous()
        _run(
            kern.partition_kernel, (s,), pick, p, idx, gp, n, w, code, pick.stride(0),
            p.stride(0), BLOCK=1024,
        )  # fmt: skip
    return idx, gp


#: The Rust codecs' `clip` names as the quantize kernels' ``CLIP`` switch.
_CLIPS = {"minmax": 0, "mse": 1, "mse_unbiased": 2}


def _index(name: str, v: Any) -> int:
    """A non-negative integer argument (anything with ``__index__``, not a bool), else the
    Rust store's ``ConfigError`` for it."""
    i = as_integer(v)
    if i is None or i < 0:
        raise ConfigError(f"`{name}` must be a non-negative integer, got {v}")
    return i


def _indices(name: str, seq: Any) -> list[int]:
    """A sequence of non-negative integers, as the Rust store takes it."""
    out = []
    for v in seq:
        try:
            out.append(_index(name, v))
        except ConfigError:
            raise ConfigError(f"`{name}` must hold non-negative integers, got {v}") from None
    return out


@dataclass
class TierView:
    """What the attention kernel needs of one tier (unused tensors are 1-element dummies)."""

    pos: torch.Tensor
    kd: torch.Tensor
    ks: torch.Tensor
    ko: torch.Tensor
    #: A segmented tier's blocks (the rows of one segment within one page), int32
    #: ``[2 * blocks + 1]``: block ``b``'s first row at ``2b`` and its segment at ``2b + 1``;
    #: its rows end where the next block's start (the last entry is the fill). Unused (a
    #: 1-element tensor) in other tiers.
    seg: torch.Tensor
    vd: torch.Tensor
    vs: torch.Tensor
    vo: torch.Tensor
    vf: torch.Tensor
    kfix: torch.Tensor | None
    cap: int
    nseg: int
    fill: int
    k_mode: int
    k_bits: int
    k_gs: int
    v_mode: int
    v_bits: int
    v_gs: int
    v_sep: bool
    #: The packed rows as the kernel's words ``(kd, key word bytes, vd, value word bytes)``,
    #: when the tier has them at hand (else the launcher views them).
    words: tuple[torch.Tensor, int, torch.Tensor, int] | None = None

    @property
    def segmented(self) -> bool:
        """Whether ``seg`` is a block table (per-segment parameters) the kernels walk."""
        return self.k_mode == _MODES["channel"] or self.v_sep

    def fill_pages(self, block_n: int) -> int:
        """Iterations of a kernel's row loop: pages of ``block_n`` rows, or the blocks of a
        segmented tier (each within one page of :data:`PAGE` rows)."""
        if self.segmented:
            if block_n != PAGE:
                raise ValueError(f"a segmented tier is read in blocks of {PAGE} rows")
            return (self.seg.numel() - 1) // 2
        return -(-self.fill // block_n)


class _Codec:
    """One codec of the Rust layout (keys or values of a tier)."""

    def __init__(self, spec: dict[str, Any], head_dim: int) -> None:
        self.kind = spec["kind"]
        self.mode = _MODES[self.kind]
        self.dtype = _DTYPES.get(spec.get("dtype", "float16"), torch.float16)
        self.bits = int(spec.get("bits", 8))
        self.group_size = int(spec.get("group_size", head_dim))
        self.factor = spec.get("factor", "none")
        #: How each group chooses its range (``"minmax"`` or ``"mse"``, the Rust codec's), and
        #: the shrink factors ``"mse"`` searches (from the layout: ``src/quant/clip.rs``).
        self.clip = spec.get("clip", "minmax")
        self.shrink = [float(s) for s in spec.get("shrink", [1.0])]
        if self.kind != "dense":
            if self.bits not in (1, 2, 3, 4, 8):
                raise ConfigError(
                    f"the triton engine packs 1, 2, 3, 4 or 8-bit codes, got {self.bits}-bit; "
                    "use engine='rust' for this policy"
                )
            if self.kind == "token_groups" and (self.group_size * self.bits) % 8:
                raise ConfigError(
                    f"the triton engine needs each group of {self.group_size} {self.bits}-bit "
                    "codes to fill whole bytes; choose another group_size or engine='rust'"
                )
        self.row_bytes = (
            head_dim * self.dtype.itemsize if self.kind == "dense" else head_dim * self.bits // 8
        )
        self.groups = head_dim // self.group_size if self.kind == "token_groups" else 0

    def shrink_tensor(self, device: torch.device) -> torch.Tensor:
        """:attr:`shrink` as fp32 on ``device``, copied once and without waiting (a copy from
        pageable host memory at every push waited for the device's queued work: a host
        synchronization per push, the host and the device no longer overlapping)."""
        key = (tuple(self.shrink), torch.device(device))
        t = _SHRINK_ON.get(key)
        if t is None:  # once per process and device (every layer's codec has the same)
            t = _SHRINK_ON[key] = _device_values(self.shrink, device, torch.float32)
        return t


class _Tier:
    """The rows of one tier of every stream of a layer."""

    def __init__(
        self,
        kcodec: _Codec,
        vcodec: _Codec,
        scored: bool,
        streams: int,
        head_dim: int,
        device: torch.device,
    ) -> None:
        self.k, self.v, self.scored = kcodec, vcodec, scored
        self.s, self.d, self.device = streams, head_dim, device
        self.segmented = kcodec.kind == "channel" or vcodec.factor == "separable"
        #: MiKV's fixed key factor ``fp16 [S, D]`` (the key balancer's inverse), set by the
        #: store for a tier whose keys use it.
        self.kfix: torch.Tensor | None = None
        self.cap = 0
        self.fill = 0
        self.nseg = 0
        self.seg_cap = 0
        dummy = torch.zeros(1, dtype=torch.float16, device=device)
        self._dummy = dummy
        self.pos = torch.full((streams, 0), -1, dtype=torch.int16, device=device)
        self.kd = self._data(kcodec, 0)
        self.vd = self._data(vcodec, 0)
        self.ks = self.ko = self.vs = self.vo = self.vf = dummy
        #: The block table (see :attr:`TierView.seg`), with its host copy ``blocks``.
        self.blocks: list[int] = []
        self._seg = torch.zeros(1, dtype=torch.int32, device=device)
        self._seg_stale = False  # `blocks` changed since `_seg` was uploaded
        self._alloc_params(0)
        self.acc = torch.zeros((streams, 0), dtype=torch.float32, device=device)
        self.count = torch.zeros((streams, 0), dtype=torch.float32, device=device)
        self._word_cache: tuple[torch.Tensor, torch.Tensor, Any] | None = None

    @property
    def seg(self) -> torch.Tensor:
        """The block table on the device, uploaded when first read after pushes changed it
        (a classification's pushes upload it once, not once each)."""
        if self._seg_stale:
            self._seg = _device_values([*self.blocks, self.fill], self.device, torch.int32)
            self._seg_stale = False
        return self._seg

    def _data(self, c: _Codec, rows: int) -> torch.Tensor:
        if c.kind == "dense":
            return torch.zeros((self.s, rows, self.d), dtype=c.dtype, device=self.device)
        return torch.zeros((self.s, rows, c.row_bytes), dtype=torch.uint8, device=self.device)

    def _alloc_params(self, rows: int) -> None:
        f16, s, d, dev = torch.float16, self.s, self.d, self.device
        if self.k.kind == "token_groups":
            self.ks = torch.zeros((s, rows, self.k.groups), dtype=f16, device=dev)
            self.ko = torch.zeros_like(self.ks)
        elif self.k.kind == "channel":
            self.ks = torch.zeros((s, self.seg_cap, d), dtype=f16, device=dev)
            self.ko = torch.zeros_like(self.ks)
        if self.v.kind == "token_groups":
            self.vs = torch.zeros((s, rows, self.v.groups), dtype=f16, device=dev)
            self.vo = torch.zeros_like(self.vs)
        if self.v.factor == "separable":
            self.vf = torch.ones((s, self.seg_cap, d), dtype=f16, device=dev)

    # -- capacity -------------------------------------------------------------------------

    def _grow(self, rows: int, segs: int, written: bool = False) -> None:
        """Make room for ``rows`` rows and ``segs`` segments. Row capacity grows by a
        sixteenth (still amortized O(1) per row: a growth copies the tier on the device,
        ~16 row copies per row appended). A larger step is memory that is allocated and holds
        nothing, which is what capacity is about: a quarter (before session 35) left a ZipCache
        layer filled to 32k in 2048-token chunks with 22-24% of its high and low tiers' rows
        unused (31.8 MB allocated for 25.3 MB held, B=1, 8 kv-heads of 128); a sixteenth
        leaves at most 6.25%. Segment slots double (they are small).
        ``written``: the caller writes every per-row tensor's rows ``fill .. rows`` of every
        stream next, so a reallocation leaves them uninitialized."""
        if rows > self.cap:
            new = max(PAGE, -(-max(rows, self.cap + self.cap // 16) // PAGE) * PAGE)
            self._resize(new, rows if written else 0)
        if segs > self.seg_cap:
            new_s = max(4, segs, 2 * self.seg_cap)
            old = self.seg_cap

            def widen_s(t: torch.Tensor, fill: float) -> torch.Tensor:
                out = torch.full((self.s, new_s, self.d), fill, dtype=t.dtype, device=t.device)
                if old:  # a first allocation has nothing to copy
                    out[:, :old] = t[:, :old]
                return out

            if self.k.kind == "channel":
                self.ks, self.ko = widen_s(self.ks, 0), widen_s(self.ko, 0)
            if self.v.factor == "separable":
                self.vf = widen_s(self.vf, 1)
            self.seg_cap = new_s

    def reserve(self, rows: int, segs: int) -> None:
        """Room for ``rows`` more rows in ``segs`` more segments (pushes that follow fit)."""
        self._grow(self.fill + rows, self.nseg + segs)

    def _resize(self, new: int, written_to: int = 0) -> None:
        """Row capacity ``new`` (a multiple of :data:`PAGE`, at least the fill): every per-row
        tensor is reallocated and its first ``fill`` rows copied; the rows after them are
        initialized (holes: position -1, zero rows, which the kernels read whole pages of)
        but for ``fill .. written_to``, which the caller writes next (a prompt's rows: the
        buffer is not zeroed first and then overwritten). Rows past the fill are holes, so
        none is copied: the buffer emptied by a classification is given back without a copy."""
        keep = min(self.fill, new)
        init = max(keep, written_to)

        def resized(t: torch.Tensor, fill: float) -> torch.Tensor:
            shape = (t.shape[0], new, *t.shape[2:])
            if init == keep:
                out = torch.full(shape, fill, dtype=t.dtype, device=t.device)
            else:
                out = torch.empty(shape, dtype=t.dtype, device=t.device)
                if init < new:
                    out[:, init:] = fill
            if keep:  # a first allocation (capacity 0) has nothing to copy
                out[:, :keep] = t[:, :keep]
            return out

        self.pos = resized(self.pos, -1)
        self.kd = resized(self.kd, 0)
        self.vd = resized(self.vd, 0)
        if self.k.kind == "token_groups":
            self.ks, self.ko = resized(self.ks, 0), resized(self.ko, 0)
        if self.v.kind == "token_groups":
            self.vs, self.vo = resized(self.vs, 0), resized(self.vo, 0)
        if self.scored:  # an unscored tier keeps empty score tensors
            self.acc, self.count = resized(self.acc, 0), resized(self.count, 0)
        self.cap = new

    def clear_rows(self, lo: int, hi: int) -> None:
        """Rows ``lo .. hi`` (past the fill) back to holes after a refused append wrote them:
        position -1 and zero rows (the kernels read whole pages, and a NaN left there would
        reach their output through a zero probability)."""
        self.kd[:, lo:hi] = 0
        self.vd[:, lo:hi] = 0
        self.pos[:, lo:hi] = -1

    def widen_positions(self) -> None:
        """Positions to int32 (see :data:`POS16_LIMIT`); kernels specialize on the dtype."""
        if self.pos.dtype != torch.int32:
            self.pos = self.pos.to(torch.int32)

    def shrink(self, headroom: int) -> bool:
        """Give back rows past ``fill + headroom`` when they are more than half the capacity
        (the buffer after a classification moved a long prompt out of it); whether it did
        (every per-row tensor is then a new one)."""
        need = max(PAGE, -(-(self.fill + headroom) // PAGE) * PAGE)
        if self.cap > 2 * need:
            self._resize(need)
            return True
        return False

    def compact(self, rows: int) -> None:
        """Move each stream's real rows (in row order) to the front and keep ``rows`` of them:
        a tier that only unsegmented rows leave (MiKV's high tier) stops growing with holes."""
        assert not self.segmented, "the block table's segments cannot move"
        f = self.fill
        order = torch.sort((self.pos[:, :f] < 0).int(), dim=1, stable=True).indices[:, :rows]
        names = ["pos", "kd", "vd"]
        if self.k.kind == "token_groups":
            names += ["ks", "ko"]
        if self.v.kind == "token_groups":
            names += ["vs", "vo"]
        if self.scored:
            names += ["acc", "count"]
        for name in names:
            t = getattr(self, name)
            idx = order if t.dim() == 2 else order[:, :, None].expand(-1, -1, t.shape[2])
            moved = t[:, :f].gather(1, idx)
            t[:, :rows] = moved
        self.pos[:, rows:f] = -1
        self.fill = rows

    # -- writing --------------------------------------------------------------------------

    def push(
        self,
        kern: Any,
        keys: torch.Tensor,
        values: torch.Tensor,
        pos: torch.Tensor,
        acc: torch.Tensor | None = None,
        count: torch.Tensor | None = None,
        blocks: int = 1,
        rows: torch.Tensor | None = None,
    ) -> None:
        """Append rows ``[S, n, D]`` (fp32, fp16 or bf16, any tier; a dense tier also takes
        ``[B, H, n, D]`` with ``B * H = S``, in any strides) as ``blocks``
        segments of ``n / blocks`` rows each (one kernel launch per codec for all of them);
        rows with ``pos < 0`` are holes, and a stream's real rows come first in each segment.
        With ``rows`` (int64 ``[S, n]``) the rows pushed are ``keys[s, rows[s, i]]`` (and the
        values'): the quantize kernels read them where they are, without a gathered copy.
        Segments follow each other without holes; a segmented tier's block table gets each
        new segment's blocks, its rows cut at page boundaries (from counts the host knows: no
        read back)."""
        n = keys.shape[-2] if rows is None else rows.shape[1]
        if n == 0:
            return
        rb = n // blocks
        row0 = self.fill
        self._grow(row0 + n, self.nseg + blocks)
        nr = (pos.reshape(self.s, blocks, rb) >= 0).sum(2, dtype=torch.int32)
        if rows is not None:
            rows = rows.contiguous()
        self._encode(kern, self.k, keys, row0, nr, rows, key=True)
        self._encode(kern, self.v, values, row0, nr, rows, key=False)
        self.pos[:, row0 : row0 + n] = pos
        if self.segmented:
            for b in range(blocks):
                start = row0 + b * rb
                cuts = range(-(-start // PAGE) * PAGE, start + rb, PAGE)
                for r in sorted({start, *cuts}):
                    self.blocks += [r, self.nseg + b]
            self._seg_stale = True
            self.nseg += blocks
        if self.scored:
            self.acc[:, row0 : row0 + n] = 0 if acc is None else acc
            self.count[:, row0 : row0 + n] = 0 if count is None else count
        self.fill = row0 + n

    def _encode(
        self,
        kern: Any,
        c: _Codec,
        x: torch.Tensor,
        row0: int,
        nr: torch.Tensor,
        rows: torch.Tensor | None,
        key: bool,
    ) -> None:
        """Quantize and write rows ``x [S, n, D]`` (or ``x[s, rows[s]]``) at ``row0``: ``nr
        [S, blocks]`` real rows in each of ``blocks`` segments of ``n / blocks`` rows, back to
        back."""
        data = self.kd if key else self.vd
        if c.kind == "dense":
            if rows is not None:
                x = x.gather(1, rows[:, :, None].expand(-1, -1, self.d))
            n = x.shape[-2]
            # One strided copy, converted to the tier's dtype by it: a prompt in the model's
            # layout ((B, T, H, D) transposed) is not first made contiguous by a reshape.
            data[:, row0 : row0 + n].view(x.shape).copy_(x)
            return
        if x.stride(-1) != 1 or x.stride(-2) != self.d:
            x = x.contiguous()
        # The kernels read stream s's row r at x[s, r] (a view of the buffer's rows keeps the
        # buffer's stride between streams), or at x[s, rows[s, r]].
        n = x.shape[1] if rows is None else rows.shape[1]
        src = (x, x.stride(0), self._dummy if rows is None else rows)
        has_idx = {"HAS_IDX": rows is not None}
        nr = nr.contiguous()
        if c.kind == "channel":
            self._encode_channels(kern, c, src, n, has_idx, nr, data, row0)
            return
        # CLIP: 0 min-max, 1 least squared error, 2 the same among grids that do not shrink.
        clip = {"CLIP": _CLIPS[c.clip], "NSHR": len(c.shrink)}
        shrink = c.shrink_tensor(x.device)
        sc, of = (self.ks, self.ko) if key else (self.vs, self.vo)
        # The channel factors, read by the kernel where they are kept: the fixed key factor
        # [S, D] for every segment, or each segment's separable factors in the tier.
        fac, fac_at = self._dummy, (0, 0, 0)  # stream stride, first segment, segment stride
        if c.factor == "fixed":
            assert self.kfix is not None, "the key balancer is set before quantizing"
            fac, fac_at = self.kfix, (self.d, 0, 0)
        elif c.factor == "separable":
            # Each segment's channels' largest |x| over the stream's real rows, from the
            # channel kernels' minima and maxima (exact: every input widens to fp32 exactly).
            grid, common, consts = self._channel_launch(n, has_idx, nr, 8)  # BITS: unused
            lo, hi = self._channel_extremes(kern, src, nr, grid, common, consts)
            consts = {"D": self.d, "CB": consts["CB"]}
            _run(kern.channel_factor_kernel, (*grid[:2], nr.shape[1]), lo, hi, nr, self.vf,
                 *common[2:], self.seg_cap, self.nseg, **consts)  # fmt: skip
            fac, fac_at = self.vf, (self.seg_cap * self.d, self.nseg, self.d)
        br = 16
        _run(
            kern.quantize_token_groups_kernel,
            (self.s, -(-n // br)),
            *src,
            fac,
            data,
            sc,
            of,
            shrink,
            *fac_at,
            n,
            n // nr.shape[1],
            self.cap,
            row0,
            D=self.d,
            GS=c.group_size,
            BITS=c.bits,
            HAS_FAC=c.factor in ("separable", "fixed"),
            BR=br,
            **clip,
            **has_idx,
            MARGIN=search_margin(c.group_size),
            fusion=True,
        )

    def _channel_launch(
        self, n: int, has_idx: dict[str, bool], nr: torch.Tensor, bits: int
    ) -> tuple[tuple[int, ...], tuple[Any, ...], dict[str, Any]]:
        """The channel kernels' grid, their arguments after the source rows and ``NR``-side
        tensors (``N, BSTRIDE, NBLK, NCH``), and their constants, for ``n`` rows in
        ``nr.shape[1]`` segments back to back. (Every constant of a kernel is passed, ``NCP``
        and ``MODE`` by the partials' launches: the GPU's direct launcher takes them by name,
        with no defaults.)"""
        nblk = nr.shape[1]
        rb = n // nblk  # rows of each segment
        nch = max(1, -(-rb // CHANNEL_CHUNK))
        cb = min(self.d, CHANNEL_BLOCK)
        consts = {"D": self.d, "BITS": bits, "CB": cb, "CHUNK": CHANNEL_CHUNK, "BR": CHANNEL_TILE}
        return (self.s, self.d // cb, nblk * nch), (n, rb, nblk, nch), consts | has_idx

    def _channel_extremes(
        self,
        kern: Any,
        src: tuple[Any, ...],
        nr: torch.Tensor,
        grid: Any,
        common: Any,
        consts: dict[str, Any],
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """Each chunk's per-channel minima and maxima over its real rows, fp32 ``[S, NBLK,
        NCH, D]`` (``+inf`` / ``-inf`` for a chunk with none), for the choose and factor
        kernels to combine."""
        lo = torch.empty((self.s, *common[2:], self.d), dtype=torch.float32, device=self.device)
        hi = torch.empty_like(lo)
        dummy = self._dummy
        _run(kern.channel_partials_kernel, grid, *src, nr, lo, hi, dummy, dummy, dummy, dummy,
             *common, 0, **consts, MODE=0, NCP=CHANNEL_CANDIDATES, fusion=True)  # fmt: skip
        return lo, hi

    def _encode_channels(
        self,
        kern: Any,
        c: _Codec,
        src: tuple[Any, ...],
        n: int,
        has_idx: dict[str, bool],
        nr: torch.Tensor,
        data: torch.Tensor,
        row0: int,
    ) -> None:
        """Per-channel codes of each segment (keys): its min-max grid, or with a clip the grid
        chosen among min-max and the shrunk candidates, as ``src/quant/clip.rs`` chooses.

        The rows are cut into chunks of :data:`CHANNEL_CHUNK`, one program each per block of
        channels, and the chunks' partial minima, maxima and errors combined by one program
        per segment and channel block (``channel_choose_kernel``), which writes the chosen
        grids into the tier: one program per channel block and segment for the whole search
        (the first design) left a 32k-token prefill's keys to ~256 programs looping over
        every row once per candidate, most of an H200 idle; the choice made with torch (the
        second) cost ~35 host ops per push."""
        grid, common, consts = self._channel_launch(n, has_idx, nr, c.bits)
        lo, hi = self._channel_extremes(kern, src, nr, grid, common, consts)
        clip = _CLIPS[c.clip]
        shrink = c.shrink_tensor(self.device)
        nc = 1 + len(c.shrink) if clip else 1
        sums: tuple[torch.Tensor, ...] = (self._dummy,) * 3  # errors, shrink sums, magnitudes
        if clip:
            shape, f64 = (nc, *lo.shape), torch.float64
            sums = tuple(torch.empty(shape, dtype=f64, device=self.device) for _ in range(3))
            _run(kern.channel_partials_kernel, grid, *src, nr, *sums, lo, hi, shrink,
                 *common, nc, **consts, MODE=1, NCP=CHANNEL_CANDIDATES, fusion=True)  # fmt: skip
        seg = (self.seg_cap, self.nseg)
        margin = search_margin(CHANNEL_CHUNK // CHANNEL_TILE + CHANNEL_TILE)
        _run(kern.channel_choose_kernel, (*grid[:2], nr.shape[1]), *src, lo, hi, nr, *sums,
             shrink, self.ks, self.ko, *common, nc, *seg, D=self.d, BITS=c.bits,
             CB=consts["CB"], BR=CHANNEL_TILE, HAS_IDX=has_idx["HAS_IDX"], CLIP=clip,
             MARGIN=margin, fusion=True)  # fmt: skip
        _run(kern.encode_channels_kernel, grid, *src, nr, data, self.ks, self.ko, *seg,
             n, self.cap, row0, *common[1:], **consts)  # fmt: skip

    # -- reading --------------------------------------------------------------------------

    def _words(self) -> tuple[torch.Tensor, int, torch.Tensor, int]:
        """``kd``/``vd`` viewed as the attention kernel's words, made again only when a
        resize replaced them (two tensor views less per tier and decoding step)."""
        cached = self._word_cache
        if cached is None or cached[0] is not self.kd or cached[1] is not self.vd:
            from kvmix.engines.triton_attention import _word_view

            kd, kw = _word_view(self.kd, self.k.mode, self.k.bits, self.d)
            vd, vw = _word_view(self.vd, self.v.mode, self.v.bits, self.d)
            cached = self._word_cache = (self.kd, self.vd, (kd, kw, vd, vw))
        return cached[2]

    def view(self) -> TierView:
        return TierView(
            pos=self.pos,
            kd=self.kd,
            ks=self.ks,
            ko=self.ko,
            seg=self.seg,
            vd=self.vd,
            vs=self.vs,
            vo=self.vo,
            vf=self.vf,
            kfix=self.kfix,
            cap=self.cap,
            nseg=self.seg_cap,
            fill=self.fill,
            k_mode=self.k.mode,
            k_bits=self.k.bits,
            k_gs=self.k.group_size,
            v_mode=self.v.mode,
            v_bits=self.v.bits,
            v_gs=self.v.group_size,
            v_sep=self.v.factor == "separable",
            words=self._words(),
        )

    def decode_into(
        self,
        kern: Any,
        out_k: torch.Tensor,
        out_v: torch.Tensor,
        rotation: torch.Tensor | None = None,
    ) -> None:
        """Dequantize every row into ``out_k/out_v`` (contiguous ``[S, T, D]``, or
        ``[B, H, T, D]``: the same memory) at its position; rows stored rotated by
        ``rotation`` are rotated back."""
        v = self.view()
        pages = v.fill_pages(PAGE)
        if pages == 0:
            return
        _run(
            kern.dequantize_kernel,
            (self.s, pages),
            v.pos,
            v.kd,
            v.ks,
            v.ko,
            v.seg,
            self._dummy if self.kfix is None else self.kfix,
            v.vd,
            v.vs,
            v.vo,
            v.vf,
            out_k,
            out_v,
            self._dummy if rotation is None else rotation,
            self.cap,
            self.seg_cap,
            out_k.shape[-2],
            D=self.d,
            BLOCK_N=PAGE,
            K_MODE=v.k_mode,
            K_BITS=v.k_bits,
            K_GS=v.k_gs,
            K_FIX=self.kfix is not None,
            V_MODE=v.v_mode,
            V_BITS=v.v_bits,
            V_GS=v.v_gs,
            V_SEP=v.v_sep,
            ROTATE=rotation is not None,
        )

    def row_segments(self) -> list[int]:
        """Each row's segment (a segmented tier's rows up to its fill), from the host's copy
        of the block table."""
        starts = [*self.blocks[0::2], self.fill]
        return [
            seg for b, seg in enumerate(self.blocks[1::2]) for _ in range(starts[b + 1] - starts[b])
        ]

    def select(self, idx: torch.Tensor) -> None:
        # The block table is the same for every stream: it stays.
        for name in ("pos", "kd", "vd", "acc", "count"):
            setattr(self, name, getattr(self, name).index_select(0, idx).contiguous())
        for name in ("ks", "ko", "vs", "vo", "vf"):
            t = getattr(self, name)
            if t is not self._dummy:
                setattr(self, name, t.index_select(0, idx).contiguous())
        if self.kfix is not None:
            self.kfix = self.kfix.index_select(0, idx).contiguous()
        self.s = int(idx.numel())

    def nbytes(self) -> dict[str, int]:
        """Bytes this tier's tensors hold up to its fill (holes included: they are written)."""
        s, f, d = self.s, self.fill, self.d

        def params(c: _Codec, key: bool) -> int:
            if c.kind == "token_groups":
                per = s * f * c.groups * 2 * 2
            elif c.kind == "channel":
                per = s * self.nseg * d * 2 * 2
            else:
                per = 0
            if not key and c.factor == "separable":
                per += s * self.nseg * d * 2
            return per

        # The block table, one for the layer's streams (the Rust store keeps each stream's
        # segment starts: 4 bytes per segment and stream).
        index = self.seg.numel() * 4 if self.segmented else 0
        out = {
            "key_data": s * f * self.k.row_bytes,
            "key_params": params(self.k, True),
            "key_index": index if self.k.kind == "channel" else 0,
            "value_data": s * f * self.v.row_bytes,
            "value_params": params(self.v, False),
            "value_index": index if self.k.kind != "channel" else 0,
            "positions": s * f * self.pos.element_size(),
            "scores": s * f * 8 if self.scored else 0,
        }
        out["total"] = sum(out.values())
        return out


#: Rotations whose values were checked to be a randomized Hadamard matrix: ``id`` -> (a weak
#: reference, the tensor's version counter and data pointer then). The value check reads the
#: matrix on the host, which for a device tensor is a synchronisation; a cache's layers share
#: one matrix, so its values are checked once, where it was made (on the CPU), and each
#: layer's store finds them here. (Writes that bypass the version counter, through ``.data``
#: or a NumPy / DLPack view, are not seen; the caches hold their matrix privately.)
_HADAMARD_CHECKED: dict[int, tuple[weakref.ReferenceType[torch.Tensor], int, int]] = {}


def _known_hadamard(rotation: torch.Tensor) -> bool:
    entry = _HADAMARD_CHECKED.get(id(rotation))
    return (
        entry is not None
        and entry[0]() is rotation
        and entry[1] == rotation._version
        and entry[2] == rotation.data_ptr()
    )


def _remember_hadamard(rotation: torch.Tensor) -> None:
    if rotation.is_inference():  # no version counter to tell an in-place change by
        return
    key = id(rotation)
    _HADAMARD_CHECKED[key] = (
        weakref.ref(rotation, lambda _: _HADAMARD_CHECKED.pop(key, None)),
        rotation._version,
        rotation.data_ptr(),
    )


def check_randomized_hadamard(rotation: Any, d: int) -> None:
    """Raise :class:`ConfigError` unless ``rotation`` is a contiguous float32 ``[d, d]``
    randomized Hadamard matrix ``diag(c) H`` (``H`` Sylvester's, ``c = R[:, 0]``), the form the
    kernels apply as signs and a fast Walsh-Hadamard transform. The values are read on the host
    (a synchronisation for a device tensor) unless this tensor's were already checked and it
    has not changed since."""
    if (
        not isinstance(rotation, torch.Tensor)
        or rotation.shape != (d, d)
        or rotation.dtype != torch.float32
        or not rotation.is_contiguous()
    ):
        raise ConfigError(
            f"`rotation` must be a contiguous float32 [{d}, {d}] tensor, got "
            f"{getattr(rotation, 'dtype', type(rotation))} "
            f"{tuple(getattr(rotation, 'shape', ()))}"
        )
    if not _known_hadamard(rotation):
        _check_hadamard_values(rotation, d)
        _remember_hadamard(rotation)


def _check_hadamard_values(rotation: torch.Tensor, d: int) -> None:
    """Whether ``rotation [d, d]`` equals ``diag(R[:, 0]) H``, read on the host."""
    # H[i, j] = (-1)^popcount(i & j): an independent definition of Sylvester's matrix.
    i = torch.arange(d)
    x = i[:, None] & i[None, :]
    parity = torch.zeros_like(x)
    for bit in range(d.bit_length()):
        parity ^= (x >> bit) & 1
    h = (1 - 2 * parity).float()
    r = rotation.detach().cpu()
    if not torch.equal(r, r[:, :1] * h):
        raise ConfigError(
            "`rotation` must be a randomized Hadamard matrix diag(c) H (e.g. "
            "kvmix.cache.randomized_hadamard): the kernels apply it as a fast "
            "Walsh-Hadamard transform"
        )


def hadamard_to(rotation: torch.Tensor, d: int, device: torch.device | str) -> torch.Tensor:
    """``rotation`` checked where it is (:func:`check_randomized_hadamard`), then copied to
    ``device`` (a ``torch.device`` or its name; a new tensor, also under inference mode) and
    remembered as checked, so that :meth:`TritonLayerStore.set_rotation` reads nothing
    back."""
    check_randomized_hadamard(rotation, d)
    device = torch.device(device)
    with torch.inference_mode(False):  # a normal tensor (changes told by its version counter)
        moved = None
        if device.type == "cuda" and rotation.device.type == "cpu":
            # From pinned memory without waiting: a pageable copy synchronizes (the first
            # layer's prefill would drain the queue here; session 23's sync report).
            try:
                moved = rotation.pin_memory().to(device, non_blocking=True)
            except RuntimeError:  # no pinned memory to be had: the waiting copy below
                pass
        if moved is None:
            moved = rotation.to(device, copy=True)
    _remember_hadamard(moved)
    return moved


class TritonLayerStore:
    """The device engine's store of one layer: the Rust ``LayerStore``'s Python surface on
    torch tensors (any device; CPU tensors run the kernels under the Triton interpreter)."""

    def __init__(
        self,
        policy: PolicyName,
        kv_heads: int,
        head_dim: int,
        config: dict[str, Any] | None = None,
        buffer_dtype: BufferDtype = "float32",
        *,
        layout: dict[str, Any] | None = None,
    ) -> None:
        if policy not in _SUPPORTED:
            raise ConfigError(
                f"the triton engine implements the policies {', '.join(_SUPPORTED)}; "
                f"policy {policy!r} runs on engine='rust'"
            )
        if layout is None:
            from kvmix._kvmix import LayerStore  # validates the options, resolves defaults

            layout = LayerStore(policy, kv_heads, head_dim, config, buffer_dtype).layout
        if policy == "mikv" and layout["high"][0]["kind"] != "dense":
            raise ConfigError(
                "the triton engine keeps MiKV's important tokens at full precision only "
                "(high_bits=None): demoting a quantized high tier is not implemented; use "
                "engine='rust' for high_bits 4 or 8"
            )
        if head_dim & (head_dim - 1) or head_dim < 16:
            raise ConfigError(
                f"the triton engine needs a power-of-two head_dim of at least 16, got {head_dim}"
            )
        if buffer_dtype not in _DTYPES:
            raise ConfigError(
                f"`buffer_dtype` must be one of {list(_DTYPES)}, got {buffer_dtype!r}"
            )
        self._layout = layout
        self.policy = policy
        self.options = dict(layout["options"])
        self.kv_heads = kv_heads
        self.head_dim = head_dim
        self.buffer_dtype = buffer_dtype
        dense = _Codec({"kind": "dense", "dtype": buffer_dtype}, head_dim)
        self._codecs: dict[str, tuple[_Codec, _Codec]] = {
            "buffer": (dense, dense),
            "high": (_Codec(layout["high"][0], head_dim), _Codec(layout["high"][1], head_dim)),
            "low": (_Codec(layout["low"][0], head_dim), _Codec(layout["low"][1], head_dim)),
        }
        self.gap = layout["streaming_gap"]
        self.high_scored = bool(layout["high_scored"])
        #: The randomized Hadamard rotation the rows are stored under (``set_rotation``); a
        #: setting like the policy, so ``reset`` keeps it.
        self.rotation: torch.Tensor | None = None
        self.reset()

    # -- state ------------------------------------------------------------------------------

    def reset(self) -> None:
        self.batch = 0
        self.seen = 0
        self.first_valid: list[int] = []
        #: Buffered positions of each sequence (every kv-head of it holds the same ones).
        self._buf_len: list[int] = []
        self._fv_dev: torch.Tensor | None = None
        self._tiers: dict[str, _Tier] = {}
        self._kfix: torch.Tensor | None = None
        #: Real rows of the high tier per sequence (heavy-hitter policies), known on the host.
        self._high_real: list[int] = []
        self._since = 0
        self._classified = False
        #: Device flag set by a decoding step's append when a value is NaN/Inf or beyond the
        #: fp16 range; read (a synchronization) at a later classification.
        self._bad_flag: torch.Tensor | None = None
        self._bad_steps = 0
        self.device: torch.device | None = None

    @property
    def layout(self) -> dict[str, Any]:
        return self._layout

    @property
    def needs_balancer(self) -> bool:
        """Whether MiKV's key balancer is on and not set yet."""
        return bool(self.options.get("key_balancer")) and self._kfix is None

    @property
    def evicts(self) -> bool:
        """Whether the policy drops tokens (the eviction baseline)."""
        return self.policy == "eviction"

    def tensors(self) -> list[torch.Tensor]:
        """Every tensor the store holds (each once): what it allocated on its device."""
        held: dict[int, torch.Tensor] = {}
        for y in (self._fv_dev, self._bad_flag):
            if y is not None:
                held[id(y)] = y
        for t in self._tiers.values():
            for y in (t._dummy, t.pos, t.kd, t.vd, t.seg, t.acc, t.count):
                held[id(y)] = y
            for y in (t.ks, t.ko, t.vs, t.vo, t.vf):
                held[id(y)] = y
        return list(held.values())

    @property
    def _streams(self) -> int:
        return self.batch * self.kv_heads

    def _first_valid_dev(self) -> torch.Tensor:
        """Each sequence's first valid position, on the device (set by the first append)."""
        assert self._fv_dev is not None, "the store holds no tokens yet"
        return self._fv_dev

    def _kern(self) -> Any:
        assert self.device is not None
        return load_kernels(self.device)

    def _init(self, b: int, device: torch.device) -> None:
        self.batch, self.device = b, device
        self.first_valid = [0] * b
        self._buf_len = [0] * b
        self._high_real = [0] * b
        self._fv_dev = torch.zeros(b, dtype=torch.int32, device=device)
        self._bad_flag = torch.zeros(1, dtype=torch.int32, device=device)
        s = self._streams
        self._tiers = {
            "buffer": _Tier(*self._codecs["buffer"], True, s, self.head_dim, device),
            "high": _Tier(*self._codecs["high"], self.high_scored, s, self.head_dim, device),
            "low": _Tier(*self._codecs["low"], False, s, self.head_dim, device),
        }

    # -- the store interface --------------------------------------------------------------

    def append(self, keys: torch.Tensor, values: torch.Tensor, bfloat16: bool = False) -> None:
        del bfloat16  # torch tensors carry their dtype
        for name, x in (("keys", keys), ("values", values)):
            if not isinstance(x, torch.Tensor) or x.dtype not in _DTYPES.values():
                raise DTypeError(
                    f"`{name}` must be a torch tensor of float32, float16 or bfloat16, got "
                    f"{x.dtype if isinstance(x, torch.Tensor) else type(x).__name__}"
                )
        if keys.dtype != values.dtype:
            raise DTypeError("`keys` and `values` must have the same dtype")
        if keys.dim() != 4 or keys.shape != values.shape:
            raise ShapeError(
                "keys/values must both be [batch, kv_heads, tokens, head_dim], got "
                f"{tuple(keys.shape)} and {tuple(values.shape)}"
            )
        b, h, n, d = keys.shape
        if h != self.kv_heads or d != self.head_dim:
            raise ShapeError(
                f"expected {self.kv_heads} kv heads of head_dim {self.head_dim}, got "
                f"{tuple(keys.shape)}"
            )
        if self.batch and b != self.batch:
            raise ShapeError(f"the store holds a batch of {self.batch} sequences, got {b}")
        if self.device is not None and keys.device != self.device:
            raise ShapeError(f"the store lives on {self.device}, got tensors on {keys.device}")
        if n == 0 or b == 0:
            return
        if n == 1 and self.batch:
            self._append_step(keys, values)
            return
        r = self.rotation
        # On a GPU the rows are rotated inside the append kernel (one read and one write of
        # the prompt). On the CPU, one matmul each first, as the unfused path (the same rows
        # bit for bit).
        fused_rotation = r is not None and keys.device.type == "cuda"
        if r is not None and not fused_rotation:
            keys = (keys.float() @ r).to(keys.dtype)
            values = (values.float() @ r).to(values.dtype)
        first = not self.batch
        if first:
            self._init(b, keys.device)
        buf = self._tiers["buffer"]
        pos_dtypes = {name: t.pos.dtype for name, t in self._tiers.items()}
        cap = buf.cap
        self._fit_positions(self.seen + n - 1)
        check = self.policy != "full"
        # Its own flag: a decoding step's (read at a later classification) stays as it is.
        flag = torch.zeros(1, dtype=torch.int32, device=keys.device) if check else None
        self._append_rows(keys, values, n, flag, r if fused_rotation else None)
        if flag is not None and bool(flag[0]):  # prefill: read back once
            # Refused: the store is put back as it was.
            if first:
                self.reset()
            else:
                buf.clear_rows(buf.fill, buf.fill + n)
                if buf.cap != cap:
                    buf._resize(cap)
                for name, t in self._tiers.items():
                    t.pos = t.pos.to(pos_dtypes[name])
            raise NonFiniteError(
                "keys/values contain NaN/Inf or magnitudes beyond the fp16 range (65504)"
            )
        buf.fill += n
        self.seen += n
        self._buf_len = [x + n for x in self._buf_len]
        self._since += 1

    def _append_rows(
        self,
        keys: torch.Tensor,
        values: torch.Tensor,
        n: int,
        flag: torch.Tensor | None,
        rotation: torch.Tensor | None,
    ) -> None:
        """Write ``n`` tokens of every stream (``[B, H, n, D]``, any strides and float dtype)
        into the buffer after its fill, with their positions and zero scores, by one launch of
        ``append_rows_kernel``: rotated by ``rotation`` if given, and ``flag`` set where a
        value is NaN/Inf or beyond the fp16 range. The fill is not advanced."""
        buf = self._tiers["buffer"]
        row0 = buf.fill
        buf._grow(row0 + n, 0, written=True)
        br = 1 if n == 1 else 32
        _run(
            self._kern().append_rows_kernel,
            (self._streams, -(-n // br)),
            keys,
            values,
            keys.stride(0),
            keys.stride(1),
            keys.stride(2),
            keys.stride(3),
            values.stride(0),
            values.stride(1),
            values.stride(2),
            values.stride(3),
            buf.kd,
            buf.vd,
            buf.pos,
            buf.acc,
            buf.count,
            buf.pos if flag is None else flag,
            buf.pos if rotation is None else rotation,
            row0,
            buf.cap,
            self.seen,
            n,
            self.kv_heads,
            D=self.head_dim,
            BR=br,
            SCORED=buf.scored,
            CHECK=flag is not None,
            ROTATE=rotation is not None,
        )

    def _append_step(self, keys: torch.Tensor, values: torch.Tensor) -> None:
        """A decoding step's token (one per sequence) into the buffer: one kernel launch
        writes the rows, positions and zero scores and flags non-finite values on the device.
        On a GPU nothing waits: the flag is read at a later classification (at most every
        ``_BAD_CHECK_STEPS`` steps), which then refuses. On the CPU it is read at once and the
        row is taken back, so a refused append changes nothing."""
        buf = self._tiers["buffer"]
        row = buf.fill
        self._fit_positions(self.seen)
        check = self.policy != "full"
        flag = self._bad_flag
        assert flag is not None
        self._append_rows(keys, values, 1, flag if check else None, self.rotation)
        if check and keys.device.type == "cpu":
            if bool(flag[0]):
                flag.zero_()
                buf.clear_rows(row, row + 1)
                raise NonFiniteError(
                    "keys/values contain NaN/Inf or magnitudes beyond the fp16 range (65504)"
                )
        elif check:
            self._bad_steps += 1
        buf.fill = row + 1
        self.seen += 1
        self._buf_len = [x + 1 for x in self._buf_len]
        self._since += 1

    def _fit_positions(self, last: int) -> None:
        """Widen every tier's positions to int32 before one above :data:`POS16_LIMIT` is
        written (the host knows ``last``: nothing is read back)."""
        if last > POS16_LIMIT:
            for t in self._tiers.values():
                t.widen_positions()

    def set_first_valid(self, first_valid: list[int]) -> None:
        first_valid = _indices("first_valid", first_valid)
        if len(first_valid) != self.batch:
            raise ShapeError(
                f"`first_valid` needs one entry per sequence ({self.batch}), got {len(first_valid)}"
            )
        self.first_valid = first_valid
        assert self.device is not None
        self._fv_dev = _device_values(self.first_valid, self.device, torch.int32)

    def set_key_balancer(self, balancer: Any) -> None:
        """MiKV's key balancer ``b`` ``[batch, kv_heads, head_dim]`` (numpy or torch): keys of
        the tiers that use it are stored as ``Q(k / f)``, ``f = fp16(1 / b)``, and read back
        times ``f``, as the Rust store does."""
        if self._kfix is not None:
            raise ConfigError(
                "the key balancer is already set: keys already quantized were scaled by it "
                "(reset() the store to start over)"
            )
        b = torch.as_tensor(balancer).to(device=self.device, dtype=torch.float32)
        if not self.batch or b.numel() != self._streams * self.head_dim:
            raise ShapeError(
                f"the key balancer must be [batch, kv_heads, head_dim] = "
                f"{self._streams * self.head_dim} values after the first append, got "
                f"{b.numel()}"
            )
        inverse = 1.0 / b.reshape(self._streams, self.head_dim)
        ok = torch.isfinite(b).all() & (b > 0).all()
        ok &= ((inverse >= 2.0**-14) & (inverse <= _F16_MAX)).all()
        if not bool(ok):  # once per prompt: the prefill may read this back
            raise NonFiniteError(
                "key balancer factors must be finite, positive, and have inverses that are "
                "normal fp16 numbers"
            )
        self._kfix = inverse.to(torch.float16)
        for t in self._tiers.values():
            if t.k.factor == "fixed":
                t.kfix = self._kfix

    def set_rotation(self, rotation: torch.Tensor) -> None:
        """Store keys and values rotated by ``rotation`` (``R``, fp32 ``[D, D]``, on the
        store's device, held by the caller, not counted here): ``append`` takes unrotated
        rows and stores ``x @ R`` (rounded to the rows' dtype, as ``(x.float() @
        R).to(x.dtype)``), ``attend`` takes unrotated queries and returns unrotated outputs,
        both in the kernels (``q @ R`` in the attention launch, ``out @ R^T`` in its merge, a
        decoding step's rows in the append), so a rotated store costs a decoding step no host
        op. ``dense``/``dense_into`` rotate back as they dequantize: they return what
        ``append`` took (in the portable path, written in the model's dtype).

        ``R`` must be a randomized Hadamard matrix ``diag(c) H`` (``H`` the Sylvester
        Hadamard matrix, ``c = R[:, 0]``; ``kvmix.cache.randomized_hadamard``): the kernels
        apply it as signs and a fast Walsh-Hadamard transform.

        Raises:
            ConfigError: ``R`` is not of that form, or rows are already stored.
        """
        if self.seen:
            raise ConfigError("set the rotation before the first append: rows are stored")
        check_randomized_hadamard(rotation, self.head_dim)  # no read of a remembered matrix
        self.rotation = rotation

    def add_scores(self, start: int, acc: torch.Tensor, count: torch.Tensor) -> None:
        """Add importance ``acc`` / ``count`` ``[batch, kv_heads, n]`` (any float dtype, numpy
        or torch) to positions ``start .. start + n``, refused as the Rust store refuses. Its
        check of the values (finite, non-negative) runs where it costs no wait: on CPU
        tensors; on a GPU it would synchronize every step that scores."""
        s = self._streams
        start = _index("start", start)
        a, c = (x if isinstance(x, torch.Tensor) else torch.as_tensor(x) for x in (acc, count))
        for name, x in (("acc", a), ("count", c)):
            if not x.dtype.is_floating_point:
                raise DTypeError(f"`{name}` must be a floating-point tensor, got {x.dtype}")
        if not s or a.numel() != c.numel() or a.numel() % s:
            raise ShapeError(
                f"scores must be [batch, kv_heads, tokens] for {s} streams, got {a.numel()} "
                f"and {c.numel()} values"
            )
        for x in (a, c):
            if CHECK_HOST_VALUES and x.device.type == "cpu":
                bad = ~(torch.isfinite(x) & (x >= 0))
                if bool(bad.any()):
                    raise NonFiniteError(
                        f"importance scores must be finite and non-negative, got {x[bad][0].item()}"
                    )

        def fp32(t: torch.Tensor) -> torch.Tensor:  # fp32 on the store's device, no op if it is
            if t.dtype != torch.float32 or t.device != self.device:
                t = t.to(self.device, torch.float32)
            return t.reshape(s, -1)

        acc, count = fp32(a), fp32(c)
        n = acc.shape[1]
        for name, t in self._tiers.items():
            if not t.scored or t.fill == 0:
                continue
            if name == "buffer" and min(self._buf_len) == t.fill:
                # Every stream holds all of the buffer's rows (no holes), so row r is position
                # seen - fill + r: the scores go in by slices (a prefill's prompt: 4 ops, not
                # a gather per tensor).
                first = self.seen - t.fill
                lo, hi = max(start, first), min(start + n, self.seen)
                if lo < hi:
                    t.acc[:, lo - first : hi - first].add_(acc[:, lo - start : hi - start])
                    t.count[:, lo - first : hi - first].add_(count[:, lo - start : hi - start])
                continue
            p = t.pos[:, : t.fill].long()
            hit = (p >= start) & (p < start + n)
            idx = (p - start).clamp(0, max(n - 1, 0))
            t.acc[:, : t.fill] += torch.where(hit, acc.gather(1, idx), 0.0)
            t.count[:, : t.fill] += torch.where(hit, count.gather(1, idx), 0.0)

    def attend(
        self,
        q: torch.Tensor,
        q_positions: list[int],
        scale: float,
        track: bool = True,
        *,
        out: torch.Tensor | None = None,
    ) -> torch.Tensor:
        """Attention of ``q [B, Hq, Tq, D]`` (any float dtype and strides; read as fp32) over
        every tier: ``[B, Hq, Tq, D]`` fp32, or, with ``out`` (``[B, Tq, Hq, D]``, e.g. in the
        model's dtype: the layout transformers' attention functions return), written into
        ``out`` in its dtype and returned. ``track``: add the attention each tracked token
        received to its score. With a rotation (``set_rotation``), ``q`` and the output are
        unrotated."""
        if (
            q.dim() != 4
            or q.shape[0] != self.batch
            or q.shape[3] != self.head_dim
            or (q.shape[1] % self.kv_heads)
            or len(q_positions) != q.shape[2]
        ):
            raise ShapeError(
                f"queries must be [batch={self.batch}, q_heads (multiple of {self.kv_heads}), "
                f"q_len={len(q_positions)}, head_dim={self.head_dim}], got {tuple(q.shape)}"
            )
        if not q.dtype.is_floating_point:
            raise DTypeError(f"`q` must be a floating-point tensor, got {q.dtype}")
        # A float position would be truncated by the launch; a negative one sees no token.
        q_positions = _indices("q_positions", q_positions)
        if not math.isfinite(scale):
            raise NonFiniteError(f"`scale` must be finite, got {scale}")
        if CHECK_HOST_VALUES and q.device.type == "cpu" and not bool(torch.isfinite(q).all()):
            # The Rust store's refusal, where reading the queries costs no wait for a device.
            # On a GPU that read would synchronize every decoding step; a NaN there comes
            # from a hidden state whose keys and values are flagged on the device and refused
            # at the next classification (``maybe_classify``).
            raise NonFiniteError(
                "queries contain NaN or Inf; kvmix refuses them rather than returning a "
                "silently wrong attention output"
            )
        if out is not None and (
            out.shape != (q.shape[0], q.shape[2], q.shape[1], q.shape[3])
            or out.device != q.device
            or not out.dtype.is_floating_point
        ):
            raise ShapeError(
                f"`out` must be a floating-point [batch, q_len, q_heads, head_dim] = "
                f"{(q.shape[0], q.shape[2], q.shape[1], q.shape[3])} tensor on {q.device}, got "
                f"{tuple(out.shape)} {out.dtype} on {out.device}"
            )
        from kvmix.engines import load_attention

        attn = load_attention(q.device)
        tiers = [self._tiers["buffer"], self._tiers["high"], self._tiers["low"]]
        want = [track and t.scored for t in tiers]
        # Tracked tiers get their received attention and visible-query counts added in place
        # by the kernel (no tensor of them is made).
        add = [(t.acc, t.count) if w else None for t, w in zip(tiers, want, strict=True)]
        result, _ = attn.attend_tiers(
            [t.view() for t in tiers],
            q,
            q_positions,
            self._fv_dev,
            scale,
            self.kv_heads,
            want,
            accumulate=add,
            out=out,
            out_layout="bthd",
            rotation=self.rotation,
        )
        return out if out is not None else result

    def maybe_classify(self, force: bool = False) -> bool:
        due = not self._classified or (self.gap is not None and self._since >= self.gap)
        if not (force or due) or not self.batch:
            return False
        # Reading the flag waits for the device: not at every step of a policy that classifies
        # at every step (MiKV, eviction), but before those steps' tokens get far.
        flag = self._bad_flag
        if self._bad_steps and flag is not None and (force or self._bad_steps >= _BAD_CHECK_STEPS):
            bad, self._bad_steps = bool(flag[0]), 0
            if bad:
                flag.zero_()
                raise NonFiniteError(
                    "a decoding step appended NaN/Inf or magnitudes beyond the fp16 range (65504)"
                )
        if self.policy == "zipcache":
            self._classify_zipcache()
        elif self.policy == "uniform":
            self._classify_uniform()
        elif self.policy in ("mikv", "eviction"):
            if self.needs_balancer:
                raise ConfigError(
                    "MiKV's key balancer is on: call `set_key_balancer` (from the prompt's "
                    "queries and keys) before the first classification, or disable `key_balancer`"
                )
            self._classify_retain(demote=self.policy == "mikv")
        self._tiers["buffer"].shrink(self._buffer_room())
        self._since = 0
        self._classified = True
        return True

    def _buffer_room(self) -> int:
        """Rows the buffer keeps room for after a classification: it refills for
        `streaming_gap` steps (uniform: up to `residual` tokens) before the next one, so room
        for that, not for the prompt it held."""
        return int(self.options.get("residual", self.gap or 0) or 0) + 1

    def _padding(self) -> list[int]:
        """Per sequence, how many of its buffered positions are left padding (before its
        first valid position): the buffer holds positions ``[seen - len, seen)``."""
        return [
            min(n, max(0, fv - (self.seen - n)))
            for fv, n in zip(self.first_valid, self._buf_len, strict=True)
        ]

    def _take_buffer(self, take: list[int]) -> tuple[torch.Tensor, ...]:
        """Every kv-head of sequence ``b`` gives its first ``take[b]`` buffered rows, in
        position order: keys and values (in the buffer's dtype: the quantize kernels widen
        them to fp32 as they load them, so no fp32 copy of the prompt is made), positions,
        scores ``[S, max(take)]``, rows past a stream's share being holes. The rest of each
        stream moves to the front.

        A stream's rows are in position order with holes between them (an append writes every
        stream at the same rows, and a stream that gave more rows than another has holes at
        its end until then), so real rows are first moved to the front (a stable partition).
        """
        buf, h, dev = self._tiers["buffer"], self.kv_heads, self.device
        f, w = buf.fill, max(take)
        if take == self._buf_len and min(take) == f:
            # Every stream gives all of its `f` rows, so it has no hole: its rows are already
            # in position order, and partitioning and gathering them would give them back
            # unchanged. They are handed over as views of the buffer's own rows: the buffer is
            # emptied, and nothing writes it before the classification has pushed them.
            out = (buf.kd[:, :f], buf.vd[:, :f], buf.pos[:, :f], buf.acc[:, :f], buf.count[:, :f])
            buf.fill = 0
            self._buf_len = [0] * self.batch
            # A long prompt's buffer is given back here (new tensors: the views stay as they
            # are); otherwise its rows become holes, the positions and scores copied first.
            if not buf.shrink(self._buffer_room()):
                out = (*out[:2], out[2].clone(), out[3].clone(), out[4].clone())
                buf.pos[:, :f] = -1
            return out
        # Each stream's real rows first (holes' positions are -1 already).
        order, real_pos = _partition(self._kern(), buf.pos[:, :f] >= 0, buf.pos[:, :f], f)
        take_s = _device_values(take, dev).repeat_interleave(h)[:, None]

        def rows(t: torch.Tensor, idx: torch.Tensor) -> torch.Tensor:
            if t.dim() == 3:
                return t[:, :f].gather(1, idx[:, :, None].expand(-1, -1, t.shape[2]))
            return t[:, :f].gather(1, idx)

        idx = order[:, :w]
        mine = torch.arange(w, device=dev)[None, :] < take_s
        k, v = rows(buf.kd, idx), rows(buf.vd, idx)
        p = torch.where(mine, real_pos[:, :w], -1)
        a, c = rows(buf.acc, idx), rows(buf.count, idx)
        left = [n - t for n, t in zip(self._buf_len, take, strict=True)]
        nf = max(left)
        if nf:
            src = torch.arange(nf, device=dev)[None, :] + take_s
            idx = order.gather(1, src.clamp(max=f - 1))
            kept = src < f
            moved = {name: rows(getattr(buf, name), idx) for name in ("kd", "vd", "acc", "count")}
            moved["pos"] = torch.where(kept, rows(buf.pos, idx), -1)
            for name, t in moved.items():
                getattr(buf, name)[:, :nf] = t
        buf.pos[:, nf:f] = -1
        buf.fill = nf
        self._buf_len = left
        return k, v, p, a, c

    def _classify_uniform(self) -> None:
        """As the Rust store: each sequence's left padding is one segment of the low tier, then
        its whole blocks of ``residual`` valid tokens (counted from its first valid one, as the
        sequence alone would count them), one segment per block."""
        r = int(self.options["residual"])
        pads = self._padding()
        blocks = [(n - pad) // r for n, pad in zip(self._buf_len, pads, strict=True)]
        take = [pad + nb * r for pad, nb in zip(pads, blocks, strict=True)]
        if max(take) == 0:
            return
        k, v, p, _, _ = self._take_buffer(take)
        h, dev = self.kv_heads, self.device
        pad_s = _device_values(pads, dev).repeat_interleave(h)[:, None]
        low = self._tiers["low"]
        mp = max(pads)
        if mp:
            gp = torch.where(torch.arange(mp, device=dev)[None, :] < pad_s, p[:, :mp], -1)
            low.push(self._kern(), k[:, :mp], v[:, :mp], gp)
        blk_s = _device_values(blocks, dev).repeat_interleave(h)[:, None]
        w, nb = k.shape[1], max(blocks)
        if nb:
            # Every block of every stream in one push (a segment each); a stream with fewer
            # blocks leaves its last ones as holes.
            rows = torch.arange(nb * r, device=dev)[None, :]
            idx = (pad_s + rows).clamp(max=w - 1)
            gp = torch.where(rows // r < blk_s, p.gather(1, idx), -1)
            low.push(self._kern(), k, v, gp, blocks=nb, rows=idx)

    def _classify_zipcache(self) -> None:
        buf = self._tiers["buffer"]
        n = buf.fill
        if n == 0:
            return
        o = self.options
        # ZipCache classifies the whole buffer each time, so every stream holds the same
        # newest n positions, in order, without holes.
        start = self.seen - n
        pads = self._padding()
        k, v, p, acc, cnt = self._take_buffer(list(self._buf_len))
        b, h = self.batch, self.kv_heads
        kern = self._kern()
        # Attention sinks: the sequence's first `sink_tokens` valid positions, a high-tier
        # segment of their own, counted in the salient budget (as the Rust store).
        n_sink = int(o.get("sink_tokens") or 0)
        sinks = [
            max(0, min(self.seen, fv_b + n_sink) - max(start, fv_b)) for fv_b in self.first_valid
        ]
        # Salient counts per sequence from host-known numbers: no read-back.
        k_all = [
            _round_half_away(o["salient_ratio"] * max(0, n - max(0, fv_b - start)))
            for fv_b in self.first_valid
        ]
        k_seq = [max(0, ks - ns) for ks, ns in zip(k_all, sinks, strict=True)]
        # Each token's category and ranking key in one kernel; the ranking by (eligible,
        # score, index) descending (ties to the more recent token, NaN lowest:
        # importance::top_k) is one stable ascending sort of the keys; the first k of each
        # stream's ranking become salient in another kernel.
        # The kernel reads each row's columns as one run (views of the buffer's rows are).
        acc, cnt, p = (x if x.stride(1) == 1 else x.contiguous() for x in (acc, cnt, p))
        key = torch.empty(b * h, n, dtype=torch.float32, device=p.device)
        cat = torch.empty(b * h, n, dtype=torch.int8, device=p.device)
        _run(
            kern.zipcache_rank_kernel, (b * h,), acc, cnt, p, self._first_valid_dev(), key, cat,
            n, n_sink, h, acc.stride(0), cnt.stride(0), p.stride(0),
            LAYER=o["selection"] == "layer", NORMALIZED=bool(o["normalized"]), BLOCK=1024,
        )  # fmt: skip
        order = torch.sort(key, dim=1, stable=True).indices
        k_s = _device_values(k_seq, p.device)
        _run(kern.mark_salient_kernel, (b * h,), order, cat, k_s, n, h, BLOCK=1024)
        # Room for this classification's pushes at once: one reallocation per tier.
        rest = [n - pad - ks - ns for pad, ks, ns in zip(pads, k_seq, sinks, strict=True)]
        self._tiers["high"].reserve(max(sinks) + max(k_seq), 2)
        kb = int(o.get("key_block") or 0)
        self._tiers["low"].reserve(max(pads) + max(rest), 2 + (max(rest) // kb if kb else 0))
        # Each category's rows by its code (the kernels module's constants).
        c_pad, c_sink = kern.CAT_PAD.value, kern.CAT_SINK.value
        c_salient, c_regular = kern.CAT_SALIENT.value, kern.CAT_REGULAR.value
        self._split_push("high", cat, k, v, p, max(sinks), code=c_sink)
        self._split_push("high", cat, k, v, p, max(k_seq), code=c_salient)
        # As the Rust store: a sequence's left padding is a low-tier segment of its own, so
        # the padding's range does not set its regular tokens' per-channel key codes.
        self._split_push("low", cat, k, v, p, max(pads), code=c_pad)
        # The regular tokens in position order, `key_block` per segment (the last one shorter),
        # as the Rust store cuts them: whole blocks in one push, the rest in another.
        width = max(rest)
        block = int(o.get("key_block") or 0) or max(1, width)
        whole = width // block
        if whole > 1 or (whole == 1 and width > block):
            idx, gp = _partition(kern, cat, p, width, c_regular)
            low = self._tiers["low"]
            cut = whole * block
            low.push(kern, k, v, gp[:, :cut], blocks=whole, rows=idx[:, :cut])
            if width > cut:
                low.push(kern, k, v, gp[:, cut:], rows=idx[:, cut:].contiguous())
        else:
            self._split_push("low", cat, k, v, p, width, code=c_regular)

    def _classify_retain(self, demote: bool) -> None:
        """MiKV / H2O (``src/store/classify.rs``, ``plan_retain_important``): the important set
        among the high tier's and the buffer's tokens is each sequence's ``n_recent`` most
        recent valid tokens plus the best accumulated scores among the others (ties to the more
        recent, NaN lowest), ``budget`` in all; it stays in (or enters) the high tier with its
        scores, the rest is demoted to the low tier (MiKV) or dropped (eviction). Counts come
        from the host; the ranking runs on the device."""
        o = self.options
        buf, high = self._tiers["buffer"], self._tiers["high"]
        nb, nh = buf.fill, high.fill
        if nb == 0:
            return
        h, dev = self.kv_heads, self.device
        ratio = float(o["ratio"] if self.policy == "mikv" else o["budget"])
        share = float(o["recent_share"])
        budgets = [_round_half_away(ratio * max(0, self.seen - fv)) for fv in self.first_valid]
        recents = [_round_half_away(share * x) for x in budgets]
        start = self.seen - nb  # the buffer holds positions [start, seen) of every stream
        incoming = [max(0, nb - max(0, fv - start)) for fv in self.first_valid]  # valid ones
        new_real = [
            min(bud, hr + inc)
            for bud, hr, inc in zip(budgets, self._high_real, incoming, strict=True)
        ]
        leave_w = max(
            hr + inc - nr for hr, inc, nr in zip(self._high_real, incoming, new_real, strict=True)
        )

        def per_stream(values: list[int]) -> torch.Tensor:
            return _device_values(values, dev).repeat_interleave(h)[:, None]

        pos = torch.cat([high.pos[:, :nh], buf.pos[:, :nb]], 1).long()
        score = torch.cat([high.acc[:, :nh], buf.acc[:, :nb]], 1)
        fv = self._first_valid_dev().repeat_interleave(h)[:, None].long()
        valid = (pos >= 0) & (pos >= fv)
        n = pos.shape[1]
        ar = torch.arange(n, device=dev).expand_as(pos)

        def ranks(order: torch.Tensor) -> torch.Tensor:
            r = torch.empty_like(order)
            r.scatter_(1, order, ar)
            return r

        newest = torch.where(valid, pos, -1)
        by_pos = torch.sort(newest, dim=1, descending=True, stable=True).indices
        n_valid = valid.sum(1, keepdim=True)
        budget_s = per_stream(budgets)
        n_rec = torch.minimum(torch.minimum(per_stream(recents), budget_s), n_valid)
        recent = valid & (ranks(by_pos) < n_rec)
        eligible = valid & ~recent
        key = torch.nan_to_num(score, nan=float("-inf")).gather(1, by_pos)
        order = by_pos.gather(1, torch.sort(key, dim=1, descending=True, stable=True).indices)
        first = torch.sort(eligible.gather(1, order), dim=1, descending=True, stable=True)
        order = order.gather(1, first.indices)
        heavy = eligible & (ranks(order) < budget_s - n_rec)
        important = recent | heavy
        keep_high, to_high = important[:, :nh], important[:, nh:]
        leaving = ~keep_high & (pos[:, :nh] >= 0)
        # The buffer's rows in its dtype (the quantize kernels widen them as they load them).
        k_buf, v_buf = buf.kd[:, :nb], buf.vd[:, :nb]
        p_buf = buf.pos[:, :nb]
        self._split_push(
            "high", to_high, k_buf, v_buf, p_buf, min(nb, max(new_real)),
            buf.acc[:, :nb], buf.count[:, :nb],
        )  # fmt: skip
        if demote:

            def joined(hi: torch.Tensor, bu: torch.Tensor) -> torch.Tensor:
                # The prompt's classification has no high tier yet: no copy of the buffer.
                # (Rows of two dtypes are promoted to one that holds both exactly.)
                return torch.cat([hi, bu], 1) if nh else bu

            self._split_push(
                "low",
                joined(leaving, ~to_high & (p_buf >= 0)),
                joined(high.kd[:, :nh], k_buf),
                joined(high.vd[:, :nh], v_buf),
                joined(high.pos[:, :nh], p_buf),
                min(nh, leave_w) + nb,
            )
        high.pos[:, :nh] = torch.where(leaving, -1, high.pos[:, :nh])
        buf.pos[:, :nb] = -1
        buf.fill = 0
        self._buf_len = [0] * self.batch
        self._high_real = new_real
        if high.fill > 2 * max(new_real) + PAGE:
            high.compact(max(new_real))

    def _split_push(
        self,
        tier: str,
        pick: torch.Tensor,
        k: torch.Tensor,
        v: torch.Tensor,
        p: torch.Tensor,
        width: int,
        acc: torch.Tensor | None = None,
        count: torch.Tensor | None = None,
        code: int = 1,
    ) -> None:
        """Push the rows where ``pick`` holds (or, for int8 categories, equals ``code``), in
        position order, real rows first (with their scores, when given); ``k``, ``v`` in any
        float dtype (the buffer's)."""
        if width == 0:
            return
        idx, gp = _partition(self._kern(), pick, p, width, code)
        ga = None if acc is None else acc.gather(1, idx)
        gc = None if count is None else count.gather(1, idx)
        self._tiers[tier].push(self._kern(), k, v, gp, ga, gc, rows=idx)

    def crop(self, length: int) -> None:
        length = _index("length", length)
        if length >= self.seen or not self.batch:
            return
        for t in self._tiers.values():
            t.pos[:, : t.fill] = torch.where(t.pos[:, : t.fill] >= length, -1, t.pos[:, : t.fill])
        buf = self._tiers["buffer"]
        buf.fill = max(0, buf.fill - (self.seen - length))
        # A sequence's buffer holds positions [seen - n, seen); those from `length` on go.
        self._buf_len = [min(n, max(0, length - (self.seen - n))) for n in self._buf_len]
        self.seen = length

    def select_batch(self, indices: list[int]) -> None:
        indices = _indices("indices", indices)
        bad = [i for i in indices if not i < self.batch]
        if bad:
            raise ShapeError(f"batch index {bad[0]} out of range for a batch of {self.batch}")
        h = self.kv_heads
        idx = torch.tensor(
            [i * h + j for i in indices for j in range(h)], dtype=torch.long, device=self.device
        )
        for t in self._tiers.values():
            t.select(idx)
        self.first_valid = [self.first_valid[i] for i in indices]
        self._buf_len = [self._buf_len[i] for i in indices]
        self._high_real = [self._high_real[i] for i in indices]
        if self._kfix is not None:
            self._kfix = self._kfix.index_select(0, idx).contiguous()
        self.batch = len(indices)
        if self.device is not None:
            self._fv_dev = _device_values(self.first_valid, self.device, torch.int32)

    def repeat_interleave(self, repeats: int) -> None:
        repeats = _index("repeats", repeats)  # 0 empties the store, as select_batch([])
        self.select_batch([i for i in range(self.batch) for _ in range(repeats)])

    def dense_all(self) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """Every stream's tokens dequantized, ``[S, seen, D]`` fp32 indexed by position, and a
        ``[S, seen]`` mask of the positions held."""
        s, d = self._streams, self.head_dim
        k = torch.zeros((s, self.seen, d), dtype=torch.float32, device=self.device)
        v = torch.zeros_like(k)
        held = torch.zeros((s, self.seen), dtype=torch.int32, device=self.device)
        for t in self._tiers.values():
            t.decode_into(self._kern(), k, v, self.rotation)
            p = t.pos[:, : t.fill].long()
            held.scatter_reduce_(1, p.clamp(min=0), (p >= 0).int(), reduce="amax")
        return k, v, held.bool()

    def dense(self, stream: int) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        if not 0 <= stream < self._streams:
            raise ShapeError(f"stream {stream} out of range ({self._streams} streams)")
        k, v, held = self.dense_all()
        p = held[stream].nonzero().flatten()
        return p.to(torch.int32), k[stream, p], v[stream, p]

    def dense_into(
        self, keys: torch.Tensor, values: torch.Tensor, changed_only: bool = False
    ) -> int:
        del changed_only  # the device rewrite is one kernel launch per tier
        s = self._streams
        if keys.shape[:2] != (self.batch, self.kv_heads) or keys.shape[2] < self.seen:
            raise ShapeError(
                f"`keys` must be [batch={self.batch}, kv_heads={self.kv_heads}, capacity >= "
                f"{self.seen}, head_dim={self.head_dim}], got {tuple(keys.shape)}"
            )
        if not (keys.is_contiguous() and values.is_contiguous()) or values.shape != keys.shape:
            raise ShapeError("`keys` and `values` must be contiguous and of the same shape")
        del s  # [B, H, T, D] contiguous is [S, T, D]: the kernel takes the tensors as they are
        for t in self._tiers.values():
            t.decode_into(self._kern(), keys, values, self.rotation)
        return self.seen

    def tier_positions(self, stream: int) -> dict[str, torch.Tensor]:
        if not 0 <= stream < self._streams:
            raise ShapeError(f"stream {stream} out of range")
        out = {}
        for name, t in self._tiers.items():
            p = t.pos[stream, : t.fill]
            out[name] = p[p >= 0]
        return out

    def memory(self) -> dict[str, Any]:
        tiers = (
            {n: t.nbytes() for n, t in self._tiers.items()}
            if self._tiers
            else {
                n: dict.fromkeys(
                    (
                        "key_data",
                        "key_params",
                        "key_index",
                        "value_data",
                        "value_params",
                        "value_index",
                        "positions",
                        "scores",
                        "total",
                    ),
                    0,
                )
                for n in ("buffer", "high", "low")
            }
        )
        tokens = sum(int((t.pos[:, : t.fill] >= 0).sum()) for t in self._tiers.values())
        allocated = sum(x.numel() * x.element_size() for x in self.tensors())
        return {
            "bytes": sum(t["total"] for t in tiers.values()),
            "fp16_bytes": self._streams * self.seen * 2 * self.head_dim * 2,
            "tokens": tokens,
            "tiers": tiers,
            "allocated_bytes": allocated,
        }
