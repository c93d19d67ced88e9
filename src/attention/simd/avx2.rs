//! The AVX2 + FMA implementation of [`super::Simd`].

use super::{
    add_bias, axpy_in_bounds, dots_in_bounds, CodeBlock, CodeKernels, Portable, Simd, Strided,
    StridedMut,
};
use std::arch::x86_64::*;

/// AVX2 + FMA. Only [`Avx2::detect`] makes one, after checking the CPU.
#[derive(Clone, Copy)]
pub struct Avx2(());

impl Avx2 {
    pub fn detect() -> Option<Avx2> {
        (crate::isa::best() >= crate::isa::Isa::Avx2).then_some(Avx2(()))
    }
}

#[inline]
#[target_feature(enable = "avx2,fma")]
fn hsum(v: __m256) -> f32 {
    let lo = _mm256_castps256_ps128(v);
    let hi = _mm256_extractf128_ps::<1>(v);
    let s = _mm_add_ps(lo, hi);
    let s = _mm_add_ps(s, _mm_movehl_ps(s, s));
    let s = _mm_add_ss(s, _mm_movehdup_ps(s));
    _mm_cvtss_f32(s)
}

/// The horizontal sums of four vectors at once (three `vhaddps` instead of four separate
/// reductions).
#[inline]
#[target_feature(enable = "avx2,fma")]
fn hsum4(v: [__m256; 4]) -> [f32; 4] {
    let ab = _mm256_hadd_ps(v[0], v[1]);
    let cd = _mm256_hadd_ps(v[2], v[3]);
    let abcd = _mm256_hadd_ps(ab, cd);
    let s = _mm_add_ps(
        _mm256_castps256_ps128(abcd),
        _mm256_extractf128_ps::<1>(abcd),
    );
    let mut out = [0f32; 4];
    // SAFETY: `out` holds four floats.
    unsafe { _mm_storeu_ps(out.as_mut_ptr(), s) };
    out
}

#[inline]
#[target_feature(enable = "avx2,fma")]
fn dot(a: &[f32], b: &[f32]) -> f32 {
    let n = a.len().min(b.len());
    let main = n / 16 * 16;
    let (mut s0, mut s1) = (_mm256_setzero_ps(), _mm256_setzero_ps());
    let mut i = 0;
    while i < main {
        // SAFETY: i + 16 <= main <= len of both slices.
        unsafe {
            s0 = _mm256_fmadd_ps(
                _mm256_loadu_ps(a.as_ptr().add(i)),
                _mm256_loadu_ps(b.as_ptr().add(i)),
                s0,
            );
            s1 = _mm256_fmadd_ps(
                _mm256_loadu_ps(a.as_ptr().add(i + 8)),
                _mm256_loadu_ps(b.as_ptr().add(i + 8)),
                s1,
            );
        }
        i += 16;
    }
    hsum(_mm256_add_ps(s0, s1)) + Portable.dot(&a[main..n], &b[main..n])
}

/// `acc_i += a·x_i`, as `fma(a, x_i, acc_i + 0)`: the `+ 0` keeps the results of the
/// `axpb(…, 0)` this was cut down from bit for bit (it turns an accumulator of `-0` into `+0`).
#[inline]
#[target_feature(enable = "avx2,fma")]
fn axpy(acc: &mut [f32], a: f32, x: &[f32]) {
    let n = acc.len().min(x.len());
    let main = n / 8 * 8;
    let (va, vb) = (_mm256_set1_ps(a), _mm256_setzero_ps());
    let mut i = 0;
    while i < main {
        // SAFETY: i + 8 <= main <= len of both slices.
        unsafe {
            let p = acc.as_mut_ptr().add(i);
            let v = _mm256_fmadd_ps(
                va,
                _mm256_loadu_ps(x.as_ptr().add(i)),
                _mm256_add_ps(_mm256_loadu_ps(p), vb),
            );
            _mm256_storeu_ps(p, v);
        }
        i += 8;
    }
    Portable.axpy(&mut acc[main..n], a, &x[main..n]);
}

/// `e^x` in every lane: Cephes' `expf` (range reduction by ln 2 split in two constants,
/// a degree-6 polynomial, the exponent added as an integer), within 2 ulp of the libm
/// result over the range softmax uses. Lanes below -87.3 (where `e^x` is subnormal) and
/// `-inf` give exactly 0, as masked logits must.
#[inline]
#[target_feature(enable = "avx2,fma")]
pub(super) fn exp8(x: __m256) -> __m256 {
    let zero_below = _mm256_cmp_ps::<_CMP_GE_OQ>(x, _mm256_set1_ps(-87.3));
    let x = _mm256_min_ps(
        _mm256_max_ps(x, _mm256_set1_ps(-87.3)),
        _mm256_set1_ps(88.3),
    );
    let fx = _mm256_round_ps::<{ _MM_FROUND_TO_NEAREST_INT | _MM_FROUND_NO_EXC }>(_mm256_mul_ps(
        x,
        _mm256_set1_ps(std::f32::consts::LOG2_E),
    ));
    let r = _mm256_fnmadd_ps(fx, _mm256_set1_ps(0.693_359_4), x);
    let r = _mm256_fnmadd_ps(fx, _mm256_set1_ps(-2.121_944_4e-4), r);
    let mut y = _mm256_set1_ps(1.987_569_1e-4);
    for c in [
        1.398_199_9e-3,
        8.333_452e-3,
        4.166_579_6e-2,
        0.166_666_65,
        0.5,
    ] {
        y = _mm256_fmadd_ps(y, r, _mm256_set1_ps(c));
    }
    let y = _mm256_fmadd_ps(
        y,
        _mm256_mul_ps(r, r),
        _mm256_add_ps(r, _mm256_set1_ps(1.0)),
    );
    let pow2 = _mm256_slli_epi32::<23>(_mm256_add_epi32(
        _mm256_cvtps_epi32(fx),
        _mm256_set1_epi32(127),
    ));
    _mm256_and_ps(_mm256_mul_ps(y, _mm256_castsi256_ps(pow2)), zero_below)
}

/// [`Simd::exp_shifted`] eight lanes at a time.
#[inline]
#[target_feature(enable = "avx2,fma")]
fn exp_shifted(row: &mut [f32]) -> (f32, f32) {
    let n = row.len();
    let main = n / 8 * 8;
    let p = row.as_mut_ptr();
    let mut vm = _mm256_set1_ps(f32::NEG_INFINITY);
    // SAFETY (all loops): lanes i .. i + 8 with i + 8 <= main <= n.
    for i in (0..main).step_by(8) {
        vm = _mm256_max_ps(vm, unsafe { _mm256_loadu_ps(p.add(i)) });
    }
    let mut lanes = [0f32; 8];
    // SAFETY: `lanes` holds eight floats.
    unsafe { _mm256_storeu_ps(lanes.as_mut_ptr(), vm) };
    let m = lanes
        .into_iter()
        .chain(row[main..].iter().copied())
        .fold(f32::NEG_INFINITY, f32::max);
    if m == f32::NEG_INFINITY {
        row.fill(0.0);
        return (m, 0.0);
    }
    let vmax = _mm256_set1_ps(m);
    let mut vs = _mm256_setzero_ps();
    for i in (0..main).step_by(8) {
        unsafe {
            let e = exp8(_mm256_sub_ps(_mm256_loadu_ps(p.add(i)), vmax));
            _mm256_storeu_ps(p.add(i), e);
            vs = _mm256_add_ps(vs, e);
        }
    }
    let mut sum = hsum(vs);
    for l in row[main..].iter_mut() {
        *l = (*l - m).exp();
        sum += *l;
    }
    (m, sum)
}

/// Eight `B`-bit codes starting at byte `at` as `f32` lanes.
///
/// SAFETY: the caller guarantees `at + B <= codes.len()`.
#[inline]
#[target_feature(enable = "avx2,fma")]
unsafe fn codes8<const B: usize>(codes: *const u8, at: usize) -> __m256 {
    // SAFETY: the caller guarantees B readable bytes at `at`.
    let ints = unsafe {
        match B {
            2 => {
                let w = (codes.add(at) as *const u16).read_unaligned() as i32;
                let shifts = _mm256_setr_epi32(0, 2, 4, 6, 8, 10, 12, 14);
                _mm256_and_si256(
                    _mm256_srlv_epi32(_mm256_set1_epi32(w), shifts),
                    _mm256_set1_epi32(3),
                )
            }
            4 => {
                let w = (codes.add(at) as *const u32).read_unaligned() as i32;
                let shifts = _mm256_setr_epi32(0, 4, 8, 12, 16, 20, 24, 28);
                _mm256_and_si256(
                    _mm256_srlv_epi32(_mm256_set1_epi32(w), shifts),
                    _mm256_set1_epi32(15),
                )
            }
            _ => {
                let w = (codes.add(at) as *const i64).read_unaligned();
                _mm256_cvtepu8_epi32(_mm_set1_epi64x(w))
            }
        }
    };
    _mm256_cvtepi32_ps(ints)
}

/// [`CodeKernels::dots`] without the bias, for `B`-bit codes.
///
/// SAFETY: AVX2+FMA available; `block.width % 8 == 0`; bounds are asserted.
#[inline]
#[target_feature(enable = "avx2,fma")]
unsafe fn code_rows_dots<const B: usize>(
    q: Strided<'_>,
    block: CodeBlock<'_>,
    mut out: StridedMut<'_>,
) {
    if !dots_in_bounds(&q, &block, &out) {
        return;
    }
    // SAFETY: as asserted above, for every group of queries.
    unsafe { for_query_groups!(q.count, |i| rows_dots::<B>(q.skip(i), block, out.skip(i))) }
}

/// [`code_rows_dots`], then the bias: the key kernel of [`CodeKernels`].
///
/// SAFETY: as [`code_rows_dots`].
#[target_feature(enable = "avx2,fma")]
unsafe fn dots_biased<const B: usize>(
    q: Strided<'_>,
    block: CodeBlock<'_>,
    mut out: StridedMut<'_>,
    bias: &[f32],
) {
    // SAFETY: the caller's.
    unsafe { code_rows_dots::<B>(q, block, out.reborrow()) };
    add_bias(out, block.rows, bias);
}

/// [`code_rows_dots`] for `M` queries from `q`, row by row.
///
/// SAFETY: as [`code_rows_dots`] for the first `M` queries.
#[inline]
#[target_feature(enable = "avx2,fma")]
unsafe fn rows_dots<const B: usize, const M: usize>(
    q: Strided<'_>,
    block: CodeBlock<'_>,
    out: StridedMut<'_>,
) {
    for r in 0..block.rows {
        let c = &block.codes[r * block.row_bytes..];
        // SAFETY: the caller's bounds cover row r and the M queries.
        let sums = unsafe { dots_group::<B, M>(q.data, q.stride, c, block.width) };
        for (j, &x) in sums[..M].iter().enumerate() {
            out.data[j * out.stride + r] = x;
        }
    }
}

/// One row's dots with `M` queries. Two accumulators per query (even and odd chunks of
/// eight codes): with one, the chain of dependent FMAs bounded the loop.
///
/// SAFETY: AVX2+FMA available; `n % 8 == 0`; `codes` holds `n·B/8` bytes and `q` holds
/// `(M-1)·stride + n` floats.
#[inline]
#[target_feature(enable = "avx2,fma")]
unsafe fn dots_group<const B: usize, const M: usize>(
    q: &[f32],
    stride: usize,
    codes: &[u8],
    n: usize,
) -> [f32; 4] {
    let (cp, qp) = (codes.as_ptr(), q.as_ptr());
    let mut even = [_mm256_setzero_ps(); 4];
    let mut odd = [_mm256_setzero_ps(); 4];
    let pairs = n / 16 * 16;
    // Byte offsets as `k / 8 * B`, exact since `k % 8 == 0`. For `k * B / 8` LLVM must allow
    // for `k * B` wrapping, and (depending on what it inlines this into) masked every offset:
    // 16k-token step, AVX2, one thread, 4.92 → 4.80 ms.
    // SAFETY (both loops): the caller's bounds cover every read.
    for k in (0..pairs).step_by(16) {
        unsafe {
            let c0 = codes8::<B>(cp, k / 8 * B);
            let c1 = codes8::<B>(cp, (k / 8 + 1) * B);
            for j in 0..M {
                let row = qp.add(j * stride + k);
                even[j] = _mm256_fmadd_ps(_mm256_loadu_ps(row), c0, even[j]);
                odd[j] = _mm256_fmadd_ps(_mm256_loadu_ps(row.add(8)), c1, odd[j]);
            }
        }
    }
    for k in (pairs..n).step_by(8) {
        unsafe {
            let c = codes8::<B>(cp, k / 8 * B);
            for (j, e) in even.iter_mut().enumerate().take(M) {
                *e = _mm256_fmadd_ps(_mm256_loadu_ps(qp.add(j * stride + k)), c, *e);
            }
        }
    }
    hsum4([
        _mm256_add_ps(even[0], odd[0]),
        _mm256_add_ps(even[1], odd[1]),
        _mm256_add_ps(even[2], odd[2]),
        _mm256_add_ps(even[3], odd[3]),
    ])
}

/// [`CodeKernels::axpy`] for `B`-bit codes.
///
/// SAFETY: AVX2+FMA available; `block.width % 8 == 0`; bounds are asserted.
#[inline]
#[target_feature(enable = "avx2,fma")]
unsafe fn code_rows_axpy<const B: usize>(
    mut acc: StridedMut<'_>,
    w: Strided<'_>,
    block: CodeBlock<'_>,
) {
    if !axpy_in_bounds(&acc, &w, &block) {
        return;
    }
    // Groups of up to four queries (a constant, so the loops unroll) over pairs of chunks
    // of eight channels: each row's weights are broadcast once for sixteen channels.
    // SAFETY: as asserted above, for every group of queries.
    unsafe { for_query_groups!(w.count, |i| axpy_group::<B>(acc.skip(i), w.skip(i), block)) }
}

/// [`code_rows_axpy`] for `M` queries whose weights are `w[j·w_stride + r]`.
///
/// SAFETY: as [`code_rows_axpy`] with the first `M` of `nq` queries.
#[inline]
#[target_feature(enable = "avx2,fma")]
unsafe fn axpy_group<const B: usize, const M: usize>(
    acc: StridedMut<'_>,
    w: Strided<'_>,
    block: CodeBlock<'_>,
) {
    let (rows, row_bytes, n) = (block.rows, block.row_bytes, block.width);
    let (stride, w_stride) = (acc.stride, w.stride);
    let (cp, ap, wp) = (block.codes.as_ptr(), acc.data.as_mut_ptr(), w.data.as_ptr());
    let mut k = 0;
    // SAFETY (both loops): the caller's bounds cover every access.
    while k + 16 <= n {
        unsafe {
            let mut lo = [_mm256_setzero_ps(); M];
            let mut hi = [_mm256_setzero_ps(); M];
            for j in 0..M {
                lo[j] = _mm256_loadu_ps(ap.add(j * stride + k));
                hi[j] = _mm256_loadu_ps(ap.add(j * stride + k + 8));
            }
            for r in 0..rows {
                let c0 = codes8::<B>(cp, r * row_bytes + k * B / 8);
                let c1 = codes8::<B>(cp, r * row_bytes + (k + 8) * B / 8);
                for j in 0..M {
                    let wj = _mm256_broadcast_ss(&*wp.add(j * w_stride + r));
                    lo[j] = _mm256_fmadd_ps(wj, c0, lo[j]);
                    hi[j] = _mm256_fmadd_ps(wj, c1, hi[j]);
                }
            }
            for j in 0..M {
                _mm256_storeu_ps(ap.add(j * stride + k), lo[j]);
                _mm256_storeu_ps(ap.add(j * stride + k + 8), hi[j]);
            }
        }
        k += 16;
    }
    if k < n {
        unsafe {
            let mut a = [_mm256_setzero_ps(); M];
            for (j, aj) in a.iter_mut().enumerate() {
                *aj = _mm256_loadu_ps(ap.add(j * stride + k));
            }
            for r in 0..rows {
                let c = codes8::<B>(cp, r * row_bytes + k * B / 8);
                for (j, aj) in a.iter_mut().enumerate() {
                    *aj = _mm256_fmadd_ps(_mm256_broadcast_ss(&*wp.add(j * w_stride + r)), c, *aj);
                }
            }
            for (j, aj) in a.iter().enumerate() {
                _mm256_storeu_ps(ap.add(j * stride + k), *aj);
            }
        }
    }
}

impl Simd for Avx2 {
    fn code_kernels(self, bits: u8, width: usize) -> CodeKernels {
        if !width.is_multiple_of(8) {
            return Portable.code_kernels(bits, width);
        }
        // SAFETY: an `Avx2` exists only on CPUs with AVX2 and FMA; the kernels take rows of
        // whole steps of eight codes (checked) and assert their bounds.
        unsafe {
            match bits {
                2 => CodeKernels::new(bits, width, dots_biased::<2>, code_rows_axpy::<2>),
                4 => CodeKernels::new(bits, width, dots_biased::<4>, code_rows_axpy::<4>),
                8 => CodeKernels::new(bits, width, dots_biased::<8>, code_rows_axpy::<8>),
                _ => Portable.code_kernels(bits, width),
            }
        }
    }

    #[inline(always)]
    fn dot(self, a: &[f32], b: &[f32]) -> f32 {
        // SAFETY: an `Avx2` exists only on CPUs with AVX2 and FMA.
        unsafe { dot(a, b) }
    }

    #[inline(always)]
    fn exp_shifted(self, row: &mut [f32]) -> (f32, f32) {
        // SAFETY: as above.
        unsafe { exp_shifted(row) }
    }

    #[inline(always)]
    fn axpy(self, acc: &mut [f32], a: f32, x: &[f32]) {
        // SAFETY: as above.
        unsafe { axpy(acc, a, x) }
    }
}
