//! The AVX-512 implementation of [`super::Simd`] (F + BW + VL + VBMI): sixteen lanes per
//! FMA, twice AVX2's arithmetic on a core with two 512-bit FMA units (a Sapphire Rapids
//! Xeon measured 124 vs 62 G lane-FMA/s per thread, `examples/fma_peak.rs`, no frequency
//! penalty).
//!
//! Sixteen codes of 1–4 bits become sixteen exact `f32` lanes in two instructions:
//! `vpmultishiftqb` copies, into the low byte of each 32-bit lane, the eight bits starting at
//! that code's bit offset in a broadcast 64-bit load, and `vpermps` looks the low four bits up
//! in a table of the code values (`i mod 2^bits`, so the neighbour's bits above the code are
//! ignored). Shift + mask + convert, as the AVX2 path does, is three; with only four queries
//! per kv-head the decode competes with the FMAs for the same two vector ports.
//!
//! Rejected: decoding to `1 + c/2^bits` with one `vpternlogd` (exponent bits OR-ed in) instead
//! of the table lookup. Same uop count, and it adds a large constant term to every dot
//! product that must be subtracted again, costing precision.

use super::{Avx2, Simd};
use std::arch::x86_64::*;

/// AVX-512 F/BW/VL/VBMI plus everything [`Avx2`] needs. Only [`Avx512::detect`] makes one.
#[derive(Clone, Copy)]
pub struct Avx512 {
    /// The fallback for the primitives this module does not specialise (bit widths 5–7,
    /// lengths that are not a multiple of eight, the single-vector helpers).
    avx2: Avx2,
}

impl Avx512 {
    pub fn detect() -> Option<Avx512> {
        let avx2 = Avx2::detect()?;
        let ok = std::arch::is_x86_feature_detected!("avx512f")
            && std::arch::is_x86_feature_detected!("avx512bw")
            && std::arch::is_x86_feature_detected!("avx512vl")
            && std::arch::is_x86_feature_detected!("avx512vbmi");
        ok.then_some(Avx512 { avx2 })
    }
}

/// `vpmultishiftqb` controls for `B`-bit codes: 32-bit lane `k` takes, in its low byte, the
/// eight bits from bit `B·k` of the broadcast 64-bit word.
const fn shift_controls(b: usize) -> [u8; 64] {
    let mut c = [0u8; 64];
    let mut k = 0;
    while k < 16 {
        c[4 * k] = (b * k) as u8;
        k += 1;
    }
    c
}

/// `vpermps` table for `B`-bit codes: index `i` (four bits) → `i mod 2^B`.
const fn code_table(b: usize) -> [f32; 16] {
    let mut t = [0f32; 16];
    let mut i = 0;
    while i < 16 {
        t[i] = (i & ((1 << b) - 1)) as f32;
        i += 1;
    }
    t
}

static CONTROLS: [[u8; 64]; 5] = [
    [0; 64],
    shift_controls(1),
    shift_controls(2),
    shift_controls(3),
    shift_controls(4),
];
static TABLES: [[f32; 16]; 5] = [
    [0.0; 16],
    code_table(1),
    code_table(2),
    code_table(3),
    code_table(4),
];

/// The constants [`codes16`] needs for `B`-bit codes, loaded once per kernel call.
#[derive(Clone, Copy)]
struct Decoder {
    controls: __m512i,
    table: __m512,
}

#[inline]
#[target_feature(enable = "avx512f,avx512bw,avx512vl,avx512vbmi")]
fn decoder<const B: usize>() -> Decoder {
    let b = if B <= 4 { B } else { 0 };
    // SAFETY: both statics hold 64 bytes.
    unsafe {
        Decoder {
            controls: _mm512_loadu_si512(CONTROLS[b].as_ptr().cast()),
            table: _mm512_loadu_ps(TABLES[b].as_ptr()),
        }
    }
}

/// Bytes a [`codes16`] load reads: eight for 1–4 bits (a 64-bit broadcast, of which only
/// `2·B` hold the codes), sixteen for 8 bits.
const fn load_bytes(b: usize) -> usize {
    if b == 8 {
        16
    } else {
        8
    }
}

/// Sixteen `B`-bit codes (B ∈ 1..=4 or 8) at `p` as exact `f32` lanes.
///
/// SAFETY: `load_bytes(B)` bytes are readable at `p`.
#[inline]
#[target_feature(enable = "avx512f,avx512bw,avx512vl,avx512vbmi")]
unsafe fn codes16<const B: usize>(dec: Decoder, p: *const u8) -> __m512 {
    // SAFETY: the caller guarantees the bytes.
    unsafe {
        if B == 8 {
            _mm512_cvtepi32_ps(_mm512_cvtepu8_epi32(_mm_loadu_si128(p.cast())))
        } else {
            let word = _mm512_set1_epi64(p.cast::<i64>().read_unaligned());
            let idx = _mm512_multishift_epi64_epi8(dec.controls, word);
            _mm512_permutexvar_ps(idx, dec.table)
        }
    }
}

/// The first `lanes` (8 or 16) of sixteen codes at `p`, other lanes zero, reading only the
/// `lanes·B/8` bytes that hold them (masked loads never fault on masked-out bytes).
///
/// SAFETY: `lanes·B/8` bytes are readable at `p`.
#[inline]
#[target_feature(enable = "avx512f,avx512bw,avx512vl,avx512vbmi")]
unsafe fn codes16_exact<const B: usize>(dec: Decoder, p: *const u8, lanes: usize) -> __m512 {
    let bytes = lanes * B / 8;
    let byte_mask: __mmask16 = ((1u32 << bytes) - 1) as __mmask16;
    let lane_mask: __mmask16 = ((1u32 << lanes) - 1) as __mmask16;
    // SAFETY: the masked load touches only the `bytes` bytes the caller vouches for.
    let raw = unsafe { _mm_maskz_loadu_epi8(byte_mask, p.cast()) };
    if B == 8 {
        _mm512_maskz_mov_ps(lane_mask, _mm512_cvtepi32_ps(_mm512_cvtepu8_epi32(raw)))
    } else {
        let idx = _mm512_multishift_epi64_epi8(dec.controls, _mm512_broadcastq_epi64(raw));
        _mm512_maskz_permutexvar_ps(lane_mask, idx, dec.table)
    }
}

/// How far ahead of the row being decoded the kernels prefetch codes. The hardware
/// prefetchers stop at every 4 KiB page, and a batch's store (96 MiB at B=8, 16k tokens)
/// does not stay in cache between calls.
const PREFETCH_AHEAD: usize = 2048;

/// Prefetch the cache lines of `bytes` bytes from `p` into L1. Prefetches never fault, so
/// `p` may point past the codes (it is computed with `wrapping_add`).
#[inline]
#[target_feature(enable = "avx512f,avx512bw,avx512vl,avx512vbmi")]
fn prefetch_rows(p: *const u8, bytes: usize) {
    for off in (0..bytes).step_by(64) {
        _mm_prefetch::<_MM_HINT_T0>(p.wrapping_add(off).cast());
    }
}

/// Whether the fast loads of a row of `n` codes starting at byte `at` stay inside `len`
/// bytes: the last full unit of sixteen codes may read `load_bytes(B) - 2·B` bytes past
/// its codes (into the next row, or past the end for the last one).
#[inline(always)]
fn row_fits<const B: usize>(at: usize, n: usize, len: usize) -> bool {
    let units = n / 16;
    units == 0 || at + (units - 1) * 2 * B + load_bytes(B) <= len
}

/// The `M ≤ 4` query accumulators of one row's dot products (lanes still to be summed;
/// unused queries stay zero). `SAFE` reads only the row's own bytes.
///
/// SAFETY: `q` holds `(M-1)·stride + n` floats; the row's `n·B/8` bytes (and, unless `SAFE`,
/// the fast loads' over-read) are readable at `c`; `n % 8 == 0`.
#[inline]
#[target_feature(enable = "avx512f,avx512bw,avx512vl,avx512vbmi")]
unsafe fn row_dots<const B: usize, const M: usize, const SAFE: bool>(
    dec: Decoder,
    q: *const f32,
    stride: usize,
    c: *const u8,
    n: usize,
) -> [__m512; 4] {
    let mut acc = [_mm512_setzero_ps(); 4];
    let units = n / 16;
    // SAFETY (both blocks): the caller's bounds cover every read.
    unsafe {
        for u in 0..units {
            let x = if SAFE {
                codes16_exact::<B>(dec, c.add(u * 2 * B), 16)
            } else {
                codes16::<B>(dec, c.add(u * 2 * B))
            };
            for (j, a) in acc.iter_mut().enumerate().take(M) {
                *a = _mm512_fmadd_ps(_mm512_loadu_ps(q.add(j * stride + 16 * u)), x, *a);
            }
        }
        if !n.is_multiple_of(16) {
            let x = codes16_exact::<B>(dec, c.add(units * 2 * B), 8);
            for (j, a) in acc.iter_mut().enumerate().take(M) {
                let qv = _mm512_maskz_loadu_ps(0x00ff, q.add(j * stride + 16 * units));
                *a = _mm512_fmadd_ps(qv, x, *a);
            }
        }
    }
    acc
}

/// [`row_dots`] for two rows at once (fast loads only): eight independent FMA chains instead
/// of four (one row's chains left the loop bound by FMA latency), and each query vector is
/// loaded once for both rows.
///
/// SAFETY: as [`row_dots`] with `SAFE = false`, for the rows at `a` and `b`.
#[inline]
#[target_feature(enable = "avx512f,avx512bw,avx512vl,avx512vbmi")]
unsafe fn row_dots2<const B: usize, const M: usize>(
    dec: Decoder,
    q: *const f32,
    stride: usize,
    a: *const u8,
    b: *const u8,
    n: usize,
) -> [[__m512; 4]; 2] {
    // acc[j] = [row a, row b] for query j.
    let mut acc = [[_mm512_setzero_ps(); 2]; 4];
    let units = n / 16;
    // SAFETY (both blocks): the caller's bounds cover every read.
    unsafe {
        for u in 0..units {
            let xa = codes16::<B>(dec, a.add(u * 2 * B));
            let xb = codes16::<B>(dec, b.add(u * 2 * B));
            for (j, aj) in acc.iter_mut().enumerate().take(M) {
                let qv = _mm512_loadu_ps(q.add(j * stride + 16 * u));
                aj[0] = _mm512_fmadd_ps(qv, xa, aj[0]);
                aj[1] = _mm512_fmadd_ps(qv, xb, aj[1]);
            }
        }
        if !n.is_multiple_of(16) {
            let xa = codes16_exact::<B>(dec, a.add(units * 2 * B), 8);
            let xb = codes16_exact::<B>(dec, b.add(units * 2 * B), 8);
            for (j, aj) in acc.iter_mut().enumerate().take(M) {
                let qv = _mm512_maskz_loadu_ps(0x00ff, q.add(j * stride + 16 * units));
                aj[0] = _mm512_fmadd_ps(qv, xa, aj[0]);
                aj[1] = _mm512_fmadd_ps(qv, xb, aj[1]);
            }
        }
    }
    [
        [acc[0][0], acc[1][0], acc[2][0], acc[3][0]],
        [acc[0][1], acc[1][1], acc[2][1], acc[3][1]],
    ]
}

/// Four query accumulators → one vector whose 128-bit lane `j` holds four partial sums of
/// query `j` (two halving steps, three instructions each).
#[inline]
#[target_feature(enable = "avx512f,avx512bw,avx512vl,avx512vbmi")]
fn fold_queries(a: [__m512; 4]) -> __m512 {
    // [a0 | a1] halves: lanes 0-7 = a0.lo + a0.hi, lanes 8-15 = a1.lo + a1.hi.
    let s01 = _mm512_add_ps(
        _mm512_mask_blend_ps(0xff00, a[0], a[1]),
        _mm512_shuffle_f32x4::<0b01_00_11_10>(a[0], a[1]),
    );
    let s23 = _mm512_add_ps(
        _mm512_mask_blend_ps(0xff00, a[2], a[3]),
        _mm512_shuffle_f32x4::<0b01_00_11_10>(a[2], a[3]),
    );
    _mm512_add_ps(
        _mm512_shuffle_f32x4::<0b10_00_10_00>(s01, s23),
        _mm512_shuffle_f32x4::<0b11_01_11_01>(s01, s23),
    )
}

/// Four rows' [`fold_queries`] vectors → their sixteen dot products, query-major: 128-bit
/// lane `j` holds query `j`'s dots with the four rows.
#[inline]
#[target_feature(enable = "avx512f,avx512bw,avx512vl,avx512vbmi")]
fn fold_rows(r: [__m512; 4]) -> __m512 {
    let s01 = _mm512_add_ps(
        _mm512_unpacklo_ps(r[0], r[1]),
        _mm512_unpackhi_ps(r[0], r[1]),
    );
    let s23 = _mm512_add_ps(
        _mm512_unpacklo_ps(r[2], r[3]),
        _mm512_unpackhi_ps(r[2], r[3]),
    );
    _mm512_add_ps(
        _mm512_shuffle_ps::<0x44>(s01, s23),
        _mm512_shuffle_ps::<0xee>(s01, s23),
    )
}

/// Four [`fold_rows`] vectors (rows `4g .. 4g + 4` in vector `g`) → one vector per query
/// holding its dots with the sixteen rows in order: a 4×4 transpose of 128-bit blocks.
#[inline]
#[target_feature(enable = "avx512f,avx512bw,avx512vl,avx512vbmi")]
fn rows_by_query(g: [__m512; 4]) -> [__m512; 4] {
    let a = _mm512_shuffle_f32x4::<0x44>(g[0], g[1]);
    let b = _mm512_shuffle_f32x4::<0x44>(g[2], g[3]);
    let c = _mm512_shuffle_f32x4::<0xee>(g[0], g[1]);
    let d = _mm512_shuffle_f32x4::<0xee>(g[2], g[3]);
    [
        _mm512_shuffle_f32x4::<0x88>(a, b),
        _mm512_shuffle_f32x4::<0xdd>(a, b),
        _mm512_shuffle_f32x4::<0x88>(c, d),
        _mm512_shuffle_f32x4::<0xdd>(c, d),
    ]
}

/// One row's [`row_dots`], folded by [`fold_queries`].
///
/// SAFETY: as [`row_dots`] for the row at byte `at` of `len` readable bytes at `codes`.
#[inline]
#[target_feature(enable = "avx512f,avx512bw,avx512vl,avx512vbmi")]
unsafe fn row_folded<const B: usize, const M: usize>(
    dec: Decoder,
    q: *const f32,
    stride: usize,
    codes: *const u8,
    len: usize,
    at: usize,
    n: usize,
) -> __m512 {
    // SAFETY: the caller's bounds; `row_fits` decides whether the over-read stays inside.
    let acc = unsafe {
        if row_fits::<B>(at, n, len) {
            row_dots::<B, M, false>(dec, q, stride, codes.add(at), n)
        } else {
            row_dots::<B, M, true>(dec, q, stride, codes.add(at), n)
        }
    };
    fold_queries(acc)
}

/// The [`fold_rows`] vectors of up to sixteen rows from byte `at`, any of which may be
/// missing (`m < 16`, zero) or end too close to `len` for the fast loads: the slow path of
/// [`dots_group`], kept out of line so that its fast path stays small enough to inline.
///
/// SAFETY: as [`row_folded`] for each of the `m` rows.
#[inline(never)]
#[cold]
#[target_feature(enable = "avx512f,avx512bw,avx512vl,avx512vbmi")]
#[allow(clippy::too_many_arguments)]
unsafe fn rows_folded_partial<const B: usize, const M: usize>(
    dec: Decoder,
    q: *const f32,
    stride: usize,
    codes: *const u8,
    len: usize,
    at: usize,
    row_bytes: usize,
    n: usize,
    m: usize,
) -> [__m512; 4] {
    let mut groups = [_mm512_setzero_ps(); 4];
    for (g, gv) in groups.iter_mut().enumerate() {
        let mut folded = [_mm512_setzero_ps(); 4];
        for (k, f) in folded.iter_mut().enumerate() {
            let r = 4 * g + k;
            if r < m {
                // SAFETY: the caller's bounds cover row r.
                *f = unsafe {
                    row_folded::<B, M>(dec, q, stride, codes, len, at + r * row_bytes, n)
                };
            }
        }
        *gv = fold_rows(folded);
    }
    groups
}

/// `Simd::code_rows_dots` for `M ≤ 4` queries starting at `q`, writing
/// `out[j·out_stride + r]` for `j < M`, sixteen rows per store.
///
/// SAFETY: AVX-512 F/BW/VL/VBMI available; `n % 8 == 0`; `codes` holds every row's
/// `n·B/8` bytes, `q` `(M-1)·stride + n` floats and `out` `(M-1)·out_stride + rows`.
#[inline]
#[target_feature(enable = "avx512f,avx512bw,avx512vl,avx512vbmi")]
#[allow(clippy::too_many_arguments)]
unsafe fn dots_group<const B: usize, const M: usize>(
    q: &[f32],
    stride: usize,
    codes: &[u8],
    row_bytes: usize,
    rows: usize,
    n: usize,
    out: &mut [f32],
    out_stride: usize,
) {
    let dec = decoder::<B>();
    let (qp, cp, len) = (q.as_ptr(), codes.as_ptr(), codes.len());
    let zero = _mm512_setzero_ps();
    for r0 in (0..rows).step_by(16) {
        let m = (rows - r0).min(16);
        let at = r0 * row_bytes;
        // SAFETY: the caller's bounds cover the rows; the fast path only when all sixteen
        // exist and the last one's loads stay inside the codes (then every earlier row's do).
        let groups = unsafe {
            if m == 16 && row_fits::<B>(at + 15 * row_bytes, n, len) {
                let mut groups = [zero; 4];
                for (g, gv) in groups.iter_mut().enumerate() {
                    let a = cp.add(at + 4 * g * row_bytes);
                    prefetch_rows(a.wrapping_add(PREFETCH_AHEAD), 4 * row_bytes);
                    let rb = row_bytes;
                    let p01 = row_dots2::<B, M>(dec, qp, stride, a, a.add(rb), n);
                    let p23 = row_dots2::<B, M>(dec, qp, stride, a.add(2 * rb), a.add(3 * rb), n);
                    *gv = fold_rows([
                        fold_queries(p01[0]),
                        fold_queries(p01[1]),
                        fold_queries(p23[0]),
                        fold_queries(p23[1]),
                    ]);
                }
                groups
            } else {
                rows_folded_partial::<B, M>(dec, qp, stride, cp, len, at, row_bytes, n, m)
            }
        };
        let mask: __mmask16 = ((1u32 << m) - 1) as __mmask16;
        for (j, v) in rows_by_query(groups).into_iter().enumerate().take(M) {
            // SAFETY: rows r0 .. r0 + m of query j lie inside `out` (the caller's bound).
            unsafe { _mm512_mask_storeu_ps(out.as_mut_ptr().add(j * out_stride + r0), mask, v) };
        }
    }
}

/// SAFETY: AVX-512 F/BW/VL/VBMI available; `n % 8 == 0`; bounds are asserted.
#[inline]
#[target_feature(enable = "avx512f,avx512bw,avx512vl,avx512vbmi")]
#[allow(clippy::too_many_arguments)]
unsafe fn code_rows_dots<const B: usize>(
    q: &[f32],
    stride: usize,
    nq: usize,
    codes: &[u8],
    row_bytes: usize,
    rows: usize,
    n: usize,
    out: &mut [f32],
    out_stride: usize,
) {
    if rows == 0 || nq == 0 {
        return;
    }
    assert!(
        codes.len() >= (rows - 1) * row_bytes + n * B / 8
            && q.len() >= (nq - 1) * stride + n
            && out.len() >= (nq - 1) * out_stride + rows
    );
    // Groups of up to four queries share each decoded vector of codes; the group size is a
    // constant so the per-query loops unroll.
    for i0 in (0..nq).step_by(4) {
        let (qi, oi) = (&q[i0 * stride..], &mut out[i0 * out_stride..]);
        let (rb, os) = (row_bytes, out_stride);
        // SAFETY: as asserted above, for the queries from i0 on.
        unsafe {
            match nq - i0 {
                1 => dots_group::<B, 1>(qi, stride, codes, rb, rows, n, oi, os),
                2 => dots_group::<B, 2>(qi, stride, codes, rb, rows, n, oi, os),
                3 => dots_group::<B, 3>(qi, stride, codes, rb, rows, n, oi, os),
                _ => dots_group::<B, 4>(qi, stride, codes, rb, rows, n, oi, os),
            }
        }
    }
}

/// `acc[j·stride + k + 16v ..] += w[j·w_stride + r] · codes` for `M` queries, `V` vectors of
/// sixteen channels from channel `k`, over all rows: the accumulators stay in registers for
/// the whole block of rows, and each row's weights are broadcast once for `16·V` channels.
///
/// SAFETY: AVX-512 available; `k + 16·V <= n`; the bounds of [`code_rows_axpy`].
#[inline]
#[target_feature(enable = "avx512f,avx512bw,avx512vl,avx512vbmi")]
#[allow(clippy::too_many_arguments)]
unsafe fn axpy_span<const B: usize, const M: usize, const V: usize>(
    dec: Decoder,
    acc: *mut f32,
    stride: usize,
    w_stride: usize,
    w: *const f32,
    codes: &[u8],
    row_bytes: usize,
    rows: usize,
    k: usize,
) {
    // SAFETY: the caller's bounds cover every access; `row_fits` guards the over-read.
    unsafe {
        let mut a = [[_mm512_setzero_ps(); V]; M];
        for (j, aj) in a.iter_mut().enumerate() {
            for (v, x) in aj.iter_mut().enumerate() {
                *x = _mm512_loadu_ps(acc.add(j * stride + k + 16 * v));
            }
        }
        let cp = codes.as_ptr();
        for r in 0..rows {
            let at = r * row_bytes + k * B / 8;
            prefetch_rows(cp.wrapping_add(at + PREFETCH_AHEAD), 16 * V * B / 8);
            let mut x = [_mm512_setzero_ps(); V];
            if row_fits::<B>(at, 16 * V, codes.len()) {
                for (v, xv) in x.iter_mut().enumerate() {
                    *xv = codes16::<B>(dec, cp.add(at + v * 2 * B));
                }
            } else {
                for (v, xv) in x.iter_mut().enumerate() {
                    *xv = codes16_exact::<B>(dec, cp.add(at + v * 2 * B), 16);
                }
            }
            for (j, aj) in a.iter_mut().enumerate() {
                let wj = _mm512_set1_ps(*w.add(j * w_stride + r));
                for (acc_v, &xv) in aj.iter_mut().zip(&x) {
                    *acc_v = _mm512_fmadd_ps(wj, xv, *acc_v);
                }
            }
        }
        for (j, aj) in a.iter().enumerate() {
            for (v, &x) in aj.iter().enumerate() {
                _mm512_storeu_ps(acc.add(j * stride + k + 16 * v), x);
            }
        }
    }
}

/// [`axpy_span`] for the last eight channels when `n % 16 == 8` (masked loads and stores).
///
/// SAFETY: as [`axpy_span`] with `k + 8 == n`.
#[inline]
#[target_feature(enable = "avx512f,avx512bw,avx512vl,avx512vbmi")]
#[allow(clippy::too_many_arguments)]
unsafe fn axpy_tail8<const B: usize, const M: usize>(
    dec: Decoder,
    acc: *mut f32,
    stride: usize,
    w_stride: usize,
    w: *const f32,
    codes: &[u8],
    row_bytes: usize,
    rows: usize,
    k: usize,
) {
    // SAFETY: masked accesses touch only the eight channels / `B` bytes that exist.
    unsafe {
        let mut a = [_mm512_setzero_ps(); M];
        for (j, aj) in a.iter_mut().enumerate() {
            *aj = _mm512_maskz_loadu_ps(0x00ff, acc.add(j * stride + k));
        }
        for r in 0..rows {
            let x = codes16_exact::<B>(dec, codes.as_ptr().add(r * row_bytes + k * B / 8), 8);
            for (j, aj) in a.iter_mut().enumerate() {
                *aj = _mm512_fmadd_ps(_mm512_set1_ps(*w.add(j * w_stride + r)), x, *aj);
            }
        }
        for (j, aj) in a.iter().enumerate() {
            _mm512_mask_storeu_ps(acc.add(j * stride + k), 0x00ff, *aj);
        }
    }
}

/// [`code_rows_axpy`] for the `M` queries whose weights are `w[j·w_stride + r]`.
///
/// SAFETY: as [`code_rows_axpy`] for the first `M` of `nq` queries.
#[inline]
#[target_feature(enable = "avx512f,avx512bw,avx512vl,avx512vbmi")]
#[allow(clippy::too_many_arguments)]
unsafe fn axpy_group<const B: usize, const M: usize>(
    acc: &mut [f32],
    stride: usize,
    w_stride: usize,
    w: &[f32],
    codes: &[u8],
    row_bytes: usize,
    rows: usize,
    n: usize,
) {
    let dec = decoder::<B>();
    let (ap, wp) = (acc.as_mut_ptr(), w.as_ptr());
    let mut k = 0;
    // SAFETY (all calls): the caller's bounds, with k + span <= n.
    unsafe {
        // Four vectors of sixteen channels: 4·M accumulators + four codes + M weights fit
        // the 32 registers for M ≤ 4.
        while k + 64 <= n {
            axpy_span::<B, M, 4>(dec, ap, stride, w_stride, wp, codes, row_bytes, rows, k);
            k += 64;
        }
        while k + 16 <= n {
            axpy_span::<B, M, 1>(dec, ap, stride, w_stride, wp, codes, row_bytes, rows, k);
            k += 16;
        }
        if k < n {
            axpy_tail8::<B, M>(dec, ap, stride, w_stride, wp, codes, row_bytes, rows, k);
        }
    }
}

/// SAFETY: AVX-512 F/BW/VL/VBMI available; `n % 8 == 0`; bounds are asserted.
#[inline]
#[target_feature(enable = "avx512f,avx512bw,avx512vl,avx512vbmi")]
#[allow(clippy::too_many_arguments)]
unsafe fn code_rows_axpy<const B: usize>(
    acc: &mut [f32],
    stride: usize,
    nq: usize,
    w: &[f32],
    w_stride: usize,
    codes: &[u8],
    row_bytes: usize,
    rows: usize,
    n: usize,
) {
    if rows == 0 || nq == 0 {
        return;
    }
    assert!(
        codes.len() >= (rows - 1) * row_bytes + n * B / 8
            && acc.len() >= (nq - 1) * stride + n
            && w.len() >= (nq - 1) * w_stride + rows
    );
    for i0 in (0..nq).step_by(4) {
        let (a, wi) = (&mut acc[i0 * stride..], &w[i0 * w_stride..]);
        let (ws, rb) = (w_stride, row_bytes);
        // SAFETY: as asserted above, for the queries from i0 on.
        unsafe {
            match nq - i0 {
                1 => axpy_group::<B, 1>(a, stride, ws, wi, codes, rb, rows, n),
                2 => axpy_group::<B, 2>(a, stride, ws, wi, codes, rb, rows, n),
                3 => axpy_group::<B, 3>(a, stride, ws, wi, codes, rb, rows, n),
                _ => axpy_group::<B, 4>(a, stride, ws, wi, codes, rb, rows, n),
            }
        }
    }
}

/// `e^x` in sixteen lanes: [`super::x86::exp8`]'s Cephes polynomial, with the same
/// guarantees (2 ulp; lanes below -87.3 and `-inf` give exactly 0).
#[inline]
#[target_feature(enable = "avx512f")]
pub(super) fn exp16(x: __m512) -> __m512 {
    let keep = _mm512_cmp_ps_mask::<_CMP_GE_OQ>(x, _mm512_set1_ps(-87.3));
    let x = _mm512_min_ps(
        _mm512_max_ps(x, _mm512_set1_ps(-87.3)),
        _mm512_set1_ps(88.3),
    );
    let fx = _mm512_roundscale_ps::<{ _MM_FROUND_TO_NEAREST_INT | _MM_FROUND_NO_EXC }>(
        _mm512_mul_ps(x, _mm512_set1_ps(std::f32::consts::LOG2_E)),
    );
    let r = _mm512_fnmadd_ps(fx, _mm512_set1_ps(0.693_359_4), x);
    let r = _mm512_fnmadd_ps(fx, _mm512_set1_ps(-2.121_944_4e-4), r);
    let mut y = _mm512_set1_ps(1.987_569_1e-4);
    for c in [
        1.398_199_9e-3,
        8.333_452e-3,
        4.166_579_6e-2,
        0.166_666_65,
        0.5,
    ] {
        y = _mm512_fmadd_ps(y, r, _mm512_set1_ps(c));
    }
    let y = _mm512_fmadd_ps(
        y,
        _mm512_mul_ps(r, r),
        _mm512_add_ps(r, _mm512_set1_ps(1.0)),
    );
    // y · 2^fx in one instruction (fx is integral, in [-126, 127] after the clamp), where
    // AVX2 builds the power of two from its exponent bits.
    _mm512_maskz_scalef_ps(keep, y, fx)
}

/// [`Simd::softmax`] sixteen lanes at a time; the tail is masked, not scalar.
#[inline]
#[target_feature(enable = "avx512f")]
fn softmax(row: &mut [f32]) {
    let n = row.len();
    let p = row.as_mut_ptr();
    let tail = n % 16;
    let main = n - tail;
    let tail_mask: __mmask16 = ((1u32 << tail) - 1) as __mmask16;
    let neg_inf = _mm512_set1_ps(f32::NEG_INFINITY);
    let mut vm = neg_inf;
    // SAFETY (all loops): lanes i .. i + 16 with i + 16 <= main, or the masked tail's lanes
    // main .. n.
    unsafe {
        for i in (0..main).step_by(16) {
            vm = _mm512_max_ps(vm, _mm512_loadu_ps(p.add(i)));
        }
        vm = _mm512_max_ps(vm, _mm512_mask_loadu_ps(neg_inf, tail_mask, p.add(main)));
    }
    let m = _mm512_reduce_max_ps(vm);
    if m == f32::NEG_INFINITY {
        row.fill(0.0);
        return;
    }
    let vmax = _mm512_set1_ps(m);
    let mut vs = _mm512_setzero_ps();
    // SAFETY: the same lanes as the first loop.
    unsafe {
        for i in (0..main).step_by(16) {
            let e = exp16(_mm512_sub_ps(_mm512_loadu_ps(p.add(i)), vmax));
            _mm512_storeu_ps(p.add(i), e);
            vs = _mm512_add_ps(vs, e);
        }
        let x = _mm512_mask_loadu_ps(neg_inf, tail_mask, p.add(main));
        let e = exp16(_mm512_sub_ps(x, vmax));
        _mm512_mask_storeu_ps(p.add(main), tail_mask, e);
        vs = _mm512_add_ps(vs, e);
    }
    let inv = _mm512_set1_ps(1.0 / _mm512_reduce_add_ps(vs));
    // SAFETY: the same lanes as the first loop.
    unsafe {
        for i in (0..main).step_by(16) {
            _mm512_storeu_ps(p.add(i), _mm512_mul_ps(_mm512_loadu_ps(p.add(i)), inv));
        }
        let x = _mm512_maskz_loadu_ps(tail_mask, p.add(main));
        _mm512_mask_storeu_ps(p.add(main), tail_mask, _mm512_mul_ps(x, inv));
    }
}

/// Whether this module has a kernel for `bits`-bit codes, `n` per row.
#[inline(always)]
fn specialised(bits: u8, n: usize) -> bool {
    matches!(bits, 1..=4 | 8) && n.is_multiple_of(8)
}

impl Simd for Avx512 {
    #[inline(always)]
    #[allow(clippy::too_many_arguments)]
    fn code_rows_dots(
        self,
        q: &[f32],
        stride: usize,
        nq: usize,
        codes: &[u8],
        row_bytes: usize,
        rows: usize,
        bits: u8,
        n: usize,
        out: &mut [f32],
        out_stride: usize,
    ) {
        let (rb, os) = (row_bytes, out_stride);
        if !specialised(bits, n) {
            return self
                .avx2
                .code_rows_dots(q, stride, nq, codes, rb, rows, bits, n, out, os);
        }
        // SAFETY: an `Avx512` exists only on CPUs with the features; `n % 8 == 0` is checked
        // and the bounds are asserted inside.
        unsafe {
            match bits {
                1 => code_rows_dots::<1>(q, stride, nq, codes, rb, rows, n, out, os),
                2 => code_rows_dots::<2>(q, stride, nq, codes, rb, rows, n, out, os),
                3 => code_rows_dots::<3>(q, stride, nq, codes, rb, rows, n, out, os),
                4 => code_rows_dots::<4>(q, stride, nq, codes, rb, rows, n, out, os),
                _ => code_rows_dots::<8>(q, stride, nq, codes, rb, rows, n, out, os),
            }
        }
    }

    #[inline(always)]
    #[allow(clippy::too_many_arguments)]
    fn code_rows_axpy(
        self,
        acc: &mut [f32],
        stride: usize,
        nq: usize,
        w: &[f32],
        w_stride: usize,
        codes: &[u8],
        row_bytes: usize,
        rows: usize,
        bits: u8,
        n: usize,
    ) {
        let (ws, rb) = (w_stride, row_bytes);
        if !specialised(bits, n) {
            return self
                .avx2
                .code_rows_axpy(acc, stride, nq, w, ws, codes, rb, rows, bits, n);
        }
        // SAFETY: as in `code_rows_dots`.
        unsafe {
            match bits {
                1 => code_rows_axpy::<1>(acc, stride, nq, w, ws, codes, rb, rows, n),
                2 => code_rows_axpy::<2>(acc, stride, nq, w, ws, codes, rb, rows, n),
                3 => code_rows_axpy::<3>(acc, stride, nq, w, ws, codes, rb, rows, n),
                4 => code_rows_axpy::<4>(acc, stride, nq, w, ws, codes, rb, rows, n),
                _ => code_rows_axpy::<8>(acc, stride, nq, w, ws, codes, rb, rows, n),
            }
        }
    }

    #[inline(always)]
    #[allow(clippy::too_many_arguments)]
    fn code_dots(
        self,
        q: &[f32],
        stride: usize,
        nq: usize,
        codes: &[u8],
        bits: u8,
        n: usize,
        out: &mut [f32],
    ) {
        self.code_rows_dots(q, stride, nq, codes, 0, 1, bits, n, out, 1);
    }

    #[inline(always)]
    #[allow(clippy::too_many_arguments)]
    fn code_axpys(
        self,
        acc: &mut [f32],
        stride: usize,
        nq: usize,
        w: &[f32],
        codes: &[u8],
        bits: u8,
        n: usize,
    ) {
        self.code_rows_axpy(acc, stride, nq, w, 1, codes, 0, 1, bits, n);
    }

    #[inline(always)]
    fn softmax(self, row: &mut [f32]) {
        // SAFETY: an `Avx512` exists only on CPUs with AVX-512F.
        unsafe { softmax(row) }
    }

    #[inline(always)]
    fn dot(self, a: &[f32], b: &[f32]) -> f32 {
        self.avx2.dot(a, b)
    }

    #[inline(always)]
    fn axpy(self, acc: &mut [f32], a: f32, x: &[f32]) {
        self.avx2.axpy(acc, a, x)
    }

    #[inline(always)]
    fn axpb(self, acc: &mut [f32], a: f32, x: &[f32], b: f32) {
        self.avx2.axpb(acc, a, x, b)
    }
}
