//! The AVX-512 code kernels: dot products of the queries with blocks of key rows, and
//! weighted sums of blocks of value rows, straight from the packed codes ([`super::codes16`]).

use super::strided::{self, axpy_span2, row_dots4_strided, strided_keys, strided_queries};
use super::{codes16, codes16_exact, decoder, prefetch_rows, row_fits, Decoder, PREFETCH_AHEAD};
use crate::attention::simd::{axpy_in_bounds, dots_in_bounds, CodeBlock, Strided, StridedMut};
use std::arch::x86_64::*;

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

/// [`row_dots`] for four rows at once (fast loads only): sixteen independent FMA chains,
/// and each query vector is loaded once for four rows. Two rows at a time measured 6%
/// slower end to end (`attention_profile`, 16k, one thread): one row's chains leave the loop
/// bound by FMA latency, two rows' reload every query vector twice as often.
///
/// Rejected: unrolling the unit loop for a constant head_dim of 128 (no change measured).
/// Rejected: two rows per accumulator (low eight lanes row a, high eight row b, one register
/// holding 32 bytes of each row, the queries permuted to match), which halves the lanes to
/// fold: 2-bit keys 6% faster, 4-bit 5% slower, and within noise end to end.
///
/// SAFETY: as [`row_dots`] with `SAFE = false`, for the rows at `c + r·rb`, `r < 4`.
#[inline]
#[target_feature(enable = "avx512f,avx512bw,avx512vl,avx512vbmi")]
unsafe fn row_dots4<const B: usize, const M: usize>(
    dec: Decoder,
    q: *const f32,
    stride: usize,
    c: *const u8,
    rb: usize,
    n: usize,
) -> [[__m512; 4]; 4] {
    // acc[j][r]: query j, row r.
    let mut acc = [[_mm512_setzero_ps(); 4]; 4];
    let units = n / 16;
    // SAFETY (both blocks): the caller's bounds cover every read.
    unsafe {
        for u in 0..units {
            let x: [__m512; 4] =
                std::array::from_fn(|r| codes16::<B>(dec, c.add(r * rb + u * 2 * B)));
            for (j, aj) in acc.iter_mut().enumerate().take(M) {
                let qv = _mm512_loadu_ps(q.add(j * stride + 16 * u));
                for (a, &xr) in aj.iter_mut().zip(&x) {
                    *a = _mm512_fmadd_ps(qv, xr, *a);
                }
            }
        }
        if !n.is_multiple_of(16) {
            let x: [__m512; 4] =
                std::array::from_fn(|r| codes16_exact::<B>(dec, c.add(r * rb + units * 2 * B), 8));
            for (j, aj) in acc.iter_mut().enumerate().take(M) {
                let qv = _mm512_maskz_loadu_ps(0x00ff, q.add(j * stride + 16 * units));
                for (a, &xr) in aj.iter_mut().zip(&x) {
                    *a = _mm512_fmadd_ps(qv, xr, *a);
                }
            }
        }
    }
    // Row-major: [r][j].
    std::array::from_fn(|r| [acc[0][r], acc[1][r], acc[2][r], acc[3][r]])
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
pub(super) fn rows_by_query(g: [__m512; 4]) -> [__m512; 4] {
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
/// SAFETY: as [`row_dots`] for the row at byte `at` of `block.codes`.
#[inline]
#[target_feature(enable = "avx512f,avx512bw,avx512vl,avx512vbmi")]
unsafe fn row_folded<const B: usize, const M: usize>(
    dec: Decoder,
    q: *const f32,
    stride: usize,
    block: CodeBlock<'_>,
    at: usize,
) -> __m512 {
    let (codes, n) = (block.codes.as_ptr(), block.width);
    // SAFETY: the caller's bounds; `row_fits` decides whether the over-read stays inside.
    let acc = unsafe {
        if row_fits::<B>(at, n, block.codes.len()) {
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
unsafe fn rows_folded_partial<const B: usize, const M: usize>(
    dec: Decoder,
    q: *const f32,
    stride: usize,
    block: CodeBlock<'_>,
    at: usize,
    m: usize,
) -> [__m512; 4] {
    let mut groups = [_mm512_setzero_ps(); 4];
    for (g, gv) in groups.iter_mut().enumerate() {
        let mut folded = [_mm512_setzero_ps(); 4];
        for (k, f) in folded.iter_mut().enumerate() {
            let r = 4 * g + k;
            if r < m {
                // SAFETY: the caller's bounds cover row r.
                *f = unsafe { row_folded::<B, M>(dec, q, stride, block, at + r * block.row_bytes) };
            }
        }
        *gv = fold_rows(folded);
    }
    groups
}

/// `Simd::code_rows_dots` for `M ≤ 4` queries starting at `q`, writing
/// `out[j·out_stride + r]` (plus `bias[j]`) for `j < M`, sixteen rows per store.
///
/// SAFETY: AVX-512 F/BW/VL/VBMI available; `block.width % 8 == 0`; `block.codes` holds
/// every row's `width·B/8` bytes, `q` `(M-1)·stride + width` floats and `out`
/// `(M-1)·out.stride + rows`.
#[inline]
#[target_feature(enable = "avx512f,avx512bw,avx512vl,avx512vbmi")]
unsafe fn dots_group<const B: usize, const M: usize>(
    q: Strided<'_>,
    block: CodeBlock<'_>,
    out: StridedMut<'_>,
    bias: [f32; 4],
) {
    let (rows, row_bytes, n) = (block.rows, block.row_bytes, block.width);
    let dec = decoder::<B>();
    let stride = q.stride;
    let (qp, cp, len) = (q.data.as_ptr(), block.codes.as_ptr(), block.codes.len());
    let zero = _mm512_setzero_ps();
    let strided = strided_keys::<B>(n);
    // SAFETY: `q` holds M queries of n channels (the caller's bounds), `strided_keys` holds.
    let qs = unsafe { strided.then(|| strided_queries::<M>(qp, stride, n)) };
    let tables = strided::tables();
    for r0 in (0..rows).step_by(16) {
        let m = (rows - r0).min(16);
        let at = r0 * row_bytes;
        // SAFETY: the caller's bounds cover the rows; the strided path reads only the rows'
        // own bytes; the fast path only when all sixteen exist and the last one's loads stay
        // inside the codes (then every earlier row's do).
        let groups = unsafe {
            if let (16, Some(qs)) = (m, qs.as_ref()) {
                let mut groups = [zero; 4];
                for (g, gv) in groups.iter_mut().enumerate() {
                    let a = cp.add(at + 4 * g * row_bytes);
                    prefetch_rows(a.wrapping_add(PREFETCH_AHEAD), 4 * row_bytes);
                    let p = row_dots4_strided::<M>(tables, qs, a, row_bytes, n);
                    *gv = fold_rows(p.map(|x| fold_queries(x)));
                }
                groups
            } else if m == 16 && row_fits::<B>(at + 15 * row_bytes, n, len) {
                let mut groups = [zero; 4];
                for (g, gv) in groups.iter_mut().enumerate() {
                    let a = cp.add(at + 4 * g * row_bytes);
                    prefetch_rows(a.wrapping_add(PREFETCH_AHEAD), 4 * row_bytes);
                    let p = row_dots4::<B, M>(dec, qp, stride, a, row_bytes, n);
                    *gv = fold_rows([
                        fold_queries(p[0]),
                        fold_queries(p[1]),
                        fold_queries(p[2]),
                        fold_queries(p[3]),
                    ]);
                }
                groups
            } else {
                rows_folded_partial::<B, M>(dec, qp, stride, block, at, m)
            }
        };
        let mask: __mmask16 = ((1u32 << m) - 1) as __mmask16;
        for (j, v) in rows_by_query(groups).into_iter().enumerate().take(M) {
            let v = _mm512_add_ps(v, _mm512_set1_ps(bias[j]));
            // SAFETY: rows r0 .. r0 + m of query j lie inside `out` (the caller's bound).
            unsafe {
                _mm512_mask_storeu_ps(out.data.as_mut_ptr().add(j * out.stride + r0), mask, v)
            };
        }
    }
}

/// [`CodeKernels::dots`](crate::attention::simd::CodeKernels::dots) for `B`-bit
/// codes; an empty `bias` adds nothing.
///
/// SAFETY: AVX-512 F/BW/VL/VBMI available; `block.width % 8 == 0`; bounds are asserted.
#[inline]
#[target_feature(enable = "avx512f,avx512bw,avx512vl,avx512vbmi")]
pub(super) unsafe fn code_rows_dots<const B: usize>(
    q: Strided<'_>,
    block: CodeBlock<'_>,
    mut out: StridedMut<'_>,
    bias: &[f32],
) {
    if !dots_in_bounds(&q, &block, &out) {
        return;
    }
    // The bias of query i + j, or 0.
    let bias_from = |i: usize| std::array::from_fn(|j| bias.get(i + j).copied().unwrap_or(0.0));
    // Groups of up to four queries share each decoded vector of codes; the group size is a
    // constant so the per-query loops unroll.
    // SAFETY: as asserted above, for every group of queries.
    unsafe {
        for_query_groups!(q.count, |i| dots_group::<B>(
            q.skip(i),
            block,
            out.skip(i),
            bias_from(i)
        ))
    }
}

/// `acc[j·stride + k + 16v ..] += w[j·w_stride + r] · codes` for `M` queries, `V` vectors of
/// sixteen channels from channel `k`, over all rows: the accumulators stay in registers for
/// the whole block of rows, and each row's weights are broadcast once for `16·V` channels.
///
/// SAFETY: AVX-512 available; `k + 16·V <= n`; the bounds of [`code_rows_axpy`].
#[inline]
#[target_feature(enable = "avx512f,avx512bw,avx512vl,avx512vbmi")]
unsafe fn axpy_span<const B: usize, const M: usize, const V: usize>(
    dec: Decoder,
    acc: *mut f32,
    stride: usize,
    w: *const f32,
    w_stride: usize,
    block: CodeBlock<'_>,
    k: usize,
) {
    let (codes, row_bytes, rows) = (block.codes, block.row_bytes, block.rows);
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
unsafe fn axpy_tail8<const B: usize, const M: usize>(
    dec: Decoder,
    acc: *mut f32,
    stride: usize,
    w: *const f32,
    w_stride: usize,
    block: CodeBlock<'_>,
    k: usize,
) {
    let (codes, row_bytes, rows) = (block.codes, block.row_bytes, block.rows);
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
unsafe fn axpy_group<const B: usize, const M: usize>(
    acc: StridedMut<'_>,
    w: Strided<'_>,
    block: CodeBlock<'_>,
) {
    let n = block.width;
    let dec = decoder::<B>();
    let (stride, w_stride) = (acc.stride, w.stride);
    let (ap, wp) = (acc.data.as_mut_ptr(), w.data.as_ptr());
    let mut k = 0;
    // SAFETY (all calls): the caller's bounds, with k + span <= n.
    unsafe {
        // Four vectors of sixteen channels: 4·M accumulators + four codes + M weights fit
        // the 32 registers for M ≤ 4.
        while k + 64 <= n {
            if B == 2 {
                axpy_span2::<M>(ap, stride, wp, w_stride, block, k);
            } else {
                axpy_span::<B, M, 4>(dec, ap, stride, wp, w_stride, block, k);
            }
            k += 64;
        }
        while k + 16 <= n {
            axpy_span::<B, M, 1>(dec, ap, stride, wp, w_stride, block, k);
            k += 16;
        }
        if k < n {
            axpy_tail8::<B, M>(dec, ap, stride, wp, w_stride, block, k);
        }
    }
}

/// [`CodeKernels::axpy`](crate::attention::simd::CodeKernels::axpy) for `B`-bit codes.
///
/// SAFETY: AVX-512 F/BW/VL/VBMI available; `block.width % 8 == 0`; bounds are asserted.
#[inline]
#[target_feature(enable = "avx512f,avx512bw,avx512vl,avx512vbmi")]
pub(super) unsafe fn code_rows_axpy<const B: usize>(
    mut acc: StridedMut<'_>,
    w: Strided<'_>,
    block: CodeBlock<'_>,
) {
    if !axpy_in_bounds(&acc, &w, &block) {
        return;
    }
    // SAFETY: as asserted above, for every group of queries.
    unsafe { for_query_groups!(w.count, |i| axpy_group::<B>(acc.skip(i), w.skip(i), block)) }
}
