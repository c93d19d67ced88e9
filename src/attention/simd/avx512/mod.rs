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

use super::{Avx2, CodeKernels, Simd};
use codes::{code_rows_axpy, code_rows_dots};
use std::arch::x86_64::*;

mod codes;
mod strided;

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
        (crate::isa::best() >= crate::isa::Isa::Avx512Vbmi).then_some(Avx512 { avx2 })
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

/// `e^x` in sixteen lanes: [`super::avx2::exp8`]'s Cephes polynomial, with the same
/// guarantees (2 ulp; lanes below -87.3 and `-inf` give exactly 0).
///
/// Softmax is bound by this function's dependency chain (20 cycles per sixteen lanes
/// measured, against about ten of issue), so the chain is kept short: no clamps (the lanes
/// they protected are masked to 0 by `scalef` anyway, and `scalef` saturates a large
/// exponent to `inf` by itself), rounding by the FMA + magic-number trick (one FMA and a
/// subtraction instead of a multiply and a two-uop `roundscale`), and the polynomial in
/// Estrin's form (three dependent steps instead of five).
#[inline]
#[target_feature(enable = "avx512f")]
pub(super) fn exp16(x: __m512) -> __m512 {
    let keep = _mm512_cmp_ps_mask::<_CMP_GE_OQ>(x, _mm512_set1_ps(-87.3));
    // 1.5·2^23: adding it rounds x·log2(e) to an integer (round to nearest even) while
    // |x·log2(e)| < 2^22; lanes outside that are masked out or saturate in `scalef`.
    let magic = _mm512_set1_ps(12_582_912.0);
    let fx = _mm512_sub_ps(
        _mm512_fmadd_ps(x, _mm512_set1_ps(std::f32::consts::LOG2_E), magic),
        magic,
    );
    let r = _mm512_fnmadd_ps(fx, _mm512_set1_ps(0.693_359_4), x);
    let r = _mm512_fnmadd_ps(fx, _mm512_set1_ps(-2.121_944_4e-4), r);
    let c = _mm512_set1_ps;
    let r2 = _mm512_mul_ps(r, r);
    let r4 = _mm512_mul_ps(r2, r2);
    // y = (c0·r + c1)·r⁴ + (c2·r + c3)·r² + (c4·r + c5)
    let p01 = _mm512_fmadd_ps(c(1.987_569_1e-4), r, c(1.398_199_9e-3));
    let p23 = _mm512_fmadd_ps(c(8.333_452e-3), r, c(4.166_579_6e-2));
    let p45 = _mm512_fmadd_ps(c(0.166_666_65), r, c(0.5));
    let y = _mm512_fmadd_ps(p01, r4, _mm512_fmadd_ps(p23, r2, p45));
    let y = _mm512_fmadd_ps(y, r2, _mm512_add_ps(r, c(1.0)));
    // y · 2^fx in one instruction, where AVX2 builds the power of two from its exponent bits.
    _mm512_maskz_scalef_ps(keep, y, fx)
}

/// [`Simd::exp_shifted`] sixteen lanes at a time; the tail is masked, not scalar.
#[inline]
#[target_feature(enable = "avx512f")]
fn exp_shifted(row: &mut [f32]) -> (f32, f32) {
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
        return (m, 0.0);
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
    (m, _mm512_reduce_add_ps(vs))
}

/// [`Simd::f16_to_f32`] sixteen at a time with a masked tail. `half`'s slice conversion goes
/// eight at a time through a call per chunk: 2% of a 16k-token decode step.
#[inline]
#[target_feature(enable = "avx512f,avx512bw,avx512vl")]
fn f16_to_f32(src: &[half::f16], dst: &mut [f32]) {
    let n = src.len().min(dst.len());
    let (s, d) = (src.as_ptr().cast::<u16>(), dst.as_mut_ptr());
    let main = n - n % 16;
    // SAFETY: elements i .. i + 16 with i + 16 <= main <= n of both slices, then the masked
    // tail's elements main .. n (masked-out lanes are neither read nor written).
    unsafe {
        for i in (0..main).step_by(16) {
            let h = _mm256_loadu_si256(s.add(i).cast());
            _mm512_storeu_ps(d.add(i), _mm512_cvtph_ps(h));
        }
        if main < n {
            let k = ((1u32 << (n - main)) - 1) as __mmask16;
            let h = _mm256_maskz_loadu_epi16(k, s.add(main).cast());
            _mm512_mask_storeu_ps(d.add(main), k, _mm512_cvtph_ps(h));
        }
    }
}

/// Whether this module has a kernel for `bits`-bit codes, `n` per row.
#[inline(always)]
fn specialised(bits: u8, n: usize) -> bool {
    matches!(bits, 1..=4 | 8) && n.is_multiple_of(8)
}

impl Simd for Avx512 {
    fn code_kernels(self, bits: u8, width: usize) -> CodeKernels {
        if !specialised(bits, width) {
            return self.avx2.code_kernels(bits, width);
        }
        // SAFETY: an `Avx512` exists only on CPUs with the features; the kernels take rows of
        // whole steps of eight codes (checked) and assert their bounds.
        unsafe {
            match bits {
                1 => CodeKernels::new(bits, width, code_rows_dots::<1>, code_rows_axpy::<1>),
                2 => CodeKernels::new(bits, width, code_rows_dots::<2>, code_rows_axpy::<2>),
                3 => CodeKernels::new(bits, width, code_rows_dots::<3>, code_rows_axpy::<3>),
                4 => CodeKernels::new(bits, width, code_rows_dots::<4>, code_rows_axpy::<4>),
                _ => CodeKernels::new(bits, width, code_rows_dots::<8>, code_rows_axpy::<8>),
            }
        }
    }

    #[inline(always)]
    fn f16_to_f32(self, src: &[half::f16], dst: &mut [f32]) {
        // SAFETY: an `Avx512` exists only on CPUs with AVX-512 F/BW/VL.
        unsafe { f16_to_f32(src, dst) }
    }

    #[inline(always)]
    fn exp_shifted(self, row: &mut [f32]) -> (f32, f32) {
        // SAFETY: an `Avx512` exists only on CPUs with AVX-512F.
        unsafe { exp_shifted(row) }
    }

    #[inline(always)]
    fn dot(self, a: &[f32], b: &[f32]) -> f32 {
        self.avx2.dot(a, b)
    }

    #[inline(always)]
    fn axpy(self, acc: &mut [f32], a: f32, x: &[f32]) {
        self.avx2.axpy(acc, a, x)
    }
}
