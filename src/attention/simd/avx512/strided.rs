//! 2-bit codes decoded 64 at a time in six instructions instead of eight.
//!
//! `vpmovzxbd` puts sixteen code bytes in sixteen lanes; a byte holds four codes, and the
//! low four bits of a lane (codes 0 and 1 of its byte) index one of two sixteen-entry tables
//! (`i mod 4`, `i div 4`), so one `vpermps` each gives codes 0 and 1 of every byte; a shift
//! by four does the same for codes 2 and 3. [`super::codes16`] spends a `vpmultishiftqb` and
//! a `vpermps` per sixteen codes. The price is the channel order: vector `i` holds channels
//! `4k + i` (lane `k`), so the accumulators of [`axpy_span2`] are kept in that order and
//! converted when they are loaded and stored, once per block of rows, and the key kernel
//! takes its queries in that order. Measured on 16k tokens, one thread: keys 8.9 → 8.2 ns
//! and values 6.6 → 6.1 ns per 2-bit row, the decode step 2.59 → 2.46 ms.
//!
//! Not for 4-bit codes: a byte holds two, so the second still needs a shift and its own
//! `vpermps`, four instructions per 32 codes, as many as `codes16` takes (measured: 4-bit
//! values 6.61 → 6.54 ns per row, not worth a second channel order).

use super::codes::rows_by_query;
use super::{prefetch_rows, PREFETCH_AHEAD};
use crate::attention::simd::CodeBlock;
use std::arch::x86_64::*;

/// `vpermps` tables: index `i` (two codes, low first) → the low code, → the high code.
#[derive(Clone, Copy)]
pub(super) struct Tables {
    low: __m512,
    high: __m512,
}

#[inline]
#[target_feature(enable = "avx512f")]
pub(super) fn tables() -> Tables {
    Tables {
        low: _mm512_setr_ps(
            0., 1., 2., 3., 0., 1., 2., 3., 0., 1., 2., 3., 0., 1., 2., 3.,
        ),
        high: _mm512_setr_ps(
            0., 0., 0., 0., 1., 1., 1., 1., 2., 2., 2., 2., 3., 3., 3., 3.,
        ),
    }
}

/// The 64 codes in the sixteen bytes at `p`: vector `i`, lane `k` is code `4k + i`.
///
/// SAFETY: AVX-512 F available; sixteen bytes are readable at `p`.
#[inline]
#[target_feature(enable = "avx512f")]
pub(super) unsafe fn codes64(t: Tables, p: *const u8) -> [__m512; 4] {
    // SAFETY: the caller's sixteen bytes.
    let bytes = _mm512_cvtepu8_epi32(unsafe { _mm_loadu_si128(p.cast()) });
    let upper = _mm512_srli_epi32::<4>(bytes);
    [
        _mm512_permutexvar_ps(bytes, t.low),
        _mm512_permutexvar_ps(bytes, t.high),
        _mm512_permutexvar_ps(upper, t.low),
        _mm512_permutexvar_ps(upper, t.high),
    ]
}

/// Lane `4i + b` ← lane `4b + i`: the 4×4 transpose inside each vector (its own inverse).
#[inline]
#[target_feature(enable = "avx512f")]
fn transpose_lanes(v: __m512) -> __m512 {
    let idx = _mm512_setr_epi32(0, 4, 8, 12, 1, 5, 9, 13, 2, 6, 10, 14, 3, 7, 11, 15);
    _mm512_permutexvar_ps(idx, v)
}

/// 64 consecutive channels (vector `m` = channels `16m ..`) → [`codes64`]'s order (vector
/// `i`, lane `k` = channel `4k + i`).
#[inline]
#[target_feature(enable = "avx512f,avx512bw,avx512vl,avx512vbmi")]
pub(super) fn to_strided(v: [__m512; 4]) -> [__m512; 4] {
    rows_by_query(v.map(|x| transpose_lanes(x)))
}

/// The inverse of [`to_strided`].
#[inline]
#[target_feature(enable = "avx512f,avx512bw,avx512vl,avx512vbmi")]
pub(super) fn from_strided(v: [__m512; 4]) -> [__m512; 4] {
    rows_by_query(v).map(|x| transpose_lanes(x))
}

/// `codes::axpy_span` for 2-bit codes and four vectors (64 channels from `k`), decoding
/// with [`codes64`]. Reads exactly the span's sixteen bytes of each row.
///
/// SAFETY: AVX-512 F/BW/VL/VBMI available; `k + 64 <= n`; the bounds of
/// [`super::codes::code_rows_axpy`] for 2-bit codes.
#[inline]
#[target_feature(enable = "avx512f,avx512bw,avx512vl,avx512vbmi")]
pub(super) unsafe fn axpy_span2<const M: usize>(
    acc: *mut f32,
    stride: usize,
    w: *const f32,
    w_stride: usize,
    block: CodeBlock<'_>,
    k: usize,
) {
    let (codes, row_bytes, rows) = (block.codes, block.row_bytes, block.rows);
    let t = tables();
    // SAFETY: the caller's bounds cover every access (each row's bytes k/4 .. k/4 + 16).
    unsafe {
        let mut a = [[_mm512_setzero_ps(); 4]; M];
        for (j, aj) in a.iter_mut().enumerate() {
            let p = acc.add(j * stride + k);
            *aj = to_strided(std::array::from_fn(|v| _mm512_loadu_ps(p.add(16 * v))));
        }
        let cp = codes.as_ptr();
        for r in 0..rows {
            let at = r * row_bytes + k / 4;
            prefetch_rows(cp.wrapping_add(at + PREFETCH_AHEAD), 16);
            let x = codes64(t, cp.add(at));
            for (j, aj) in a.iter_mut().enumerate() {
                let wj = _mm512_set1_ps(*w.add(j * w_stride + r));
                for (acc_v, &xv) in aj.iter_mut().zip(&x) {
                    *acc_v = _mm512_fmadd_ps(wj, xv, *acc_v);
                }
            }
        }
        for (j, aj) in a.iter().enumerate() {
            let p = acc.add(j * stride + k);
            for (v, x) in from_strided(*aj).into_iter().enumerate() {
                _mm512_storeu_ps(p.add(16 * v), x);
            }
        }
    }
}

/// Widest rows [`row_dots4_strided`] takes (its queries live in a fixed array).
pub(super) const MAX_STRIDED_N: usize = 256;

/// Whether the key kernel uses [`row_dots4_strided`] for `B`-bit codes, `n` per row.
#[inline(always)]
pub(super) fn strided_keys<const B: usize>(n: usize) -> bool {
    B == 2 && n > 0 && n.is_multiple_of(64) && n <= MAX_STRIDED_N
}

/// The first `M` queries (`stride` apart) in [`codes64`]'s channel order, 64 channels per
/// entry: `out[u][j]` holds channels `64u .. 64u + 64` of query `j`.
///
/// SAFETY: AVX-512 F/BW/VL/VBMI available; `q` holds `(M-1)·stride + n` floats;
/// `strided_keys::<2>(n)`.
#[inline]
#[target_feature(enable = "avx512f,avx512bw,avx512vl,avx512vbmi")]
pub(super) unsafe fn strided_queries<const M: usize>(
    q: *const f32,
    stride: usize,
    n: usize,
) -> [[[__m512; 4]; 4]; MAX_STRIDED_N / 64] {
    let mut out = [[[_mm512_setzero_ps(); 4]; 4]; MAX_STRIDED_N / 64];
    for (u, ou) in out.iter_mut().enumerate().take(n / 64) {
        for (j, oj) in ou.iter_mut().enumerate().take(M) {
            // SAFETY: channels 64u .. 64u + 64 <= n of query j (the caller's bounds).
            let p = unsafe { q.add(j * stride + 64 * u) };
            *oj = to_strided(std::array::from_fn(|v| unsafe {
                _mm512_loadu_ps(p.add(16 * v))
            }));
        }
    }
    out
}

/// `codes::row_dots4` for 2-bit codes decoded by [`codes64`], with the queries from
/// [`strided_queries`] (a dot product does not care in which lane a channel is summed).
/// Reads exactly each row's `n/4` bytes.
///
/// SAFETY: AVX-512 F/BW/VL/VBMI available; `strided_keys::<2>(n)`; the four rows' bytes at
/// `c + r·rb` are readable.
#[inline]
#[target_feature(enable = "avx512f,avx512bw,avx512vl,avx512vbmi")]
pub(super) unsafe fn row_dots4_strided<const M: usize>(
    t: Tables,
    qs: &[[[__m512; 4]; 4]; MAX_STRIDED_N / 64],
    c: *const u8,
    rb: usize,
    n: usize,
) -> [[__m512; 4]; 4] {
    // acc[r][j]: row r, query j.
    let mut acc = [[_mm512_setzero_ps(); 4]; 4];
    for (u, qu) in qs.iter().enumerate().take(n / 64) {
        for (r, ar) in acc.iter_mut().enumerate() {
            // SAFETY: bytes 16u .. 16u + 16 <= n/4 of row r.
            let x = unsafe { codes64(t, c.add(r * rb + 16 * u)) };
            for (a, qj) in ar.iter_mut().zip(qu).take(M) {
                for (&qi, &xi) in qj.iter().zip(&x) {
                    *a = _mm512_fmadd_ps(qi, xi, *a);
                }
            }
        }
    }
    acc
}
