//! Asymmetric uniform (affine) quantization of one group of values.
//!
//! scale α = (max − min) / (2^b − 1), offset β = min, code = clamp(⌊(x − β)/α + ½⌋, 0, 2^b − 1),
//! x̂ = α·code + β. α and β are rounded to their storage dtype *before* the codes are
//! computed, so each code is the nearest point of the grid that dequantization really uses.
//! A constant group (α = 0) gets code 0 and reconstructs as β.

use crate::error::{KvmixError, Result};
use half::f16;

/// Storage type of the per-group scale and offset (and channel factors).
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub enum ParamDtype {
    F16,
    F32,
}

impl ParamDtype {
    pub fn parse(name: &str) -> Result<Self> {
        match name {
            "float16" | "fp16" | "f16" => Ok(ParamDtype::F16),
            "float32" | "fp32" | "f32" => Ok(ParamDtype::F32),
            _ => Err(KvmixError::Config(format!(
                "`param_dtype` must be 'float16' or 'float32', got {name:?}"
            ))),
        }
    }

    pub fn name(self) -> &'static str {
        match self {
            ParamDtype::F16 => "float16",
            ParamDtype::F32 => "float32",
        }
    }

    /// Bytes one stored parameter takes.
    pub fn size(self) -> usize {
        match self {
            ParamDtype::F16 => 2,
            ParamDtype::F32 => 4,
        }
    }

    /// `v` rounded to this storage type (round to nearest even), returned as `f32`.
    #[inline(always)]
    pub fn round(self, v: f32) -> f32 {
        match self {
            ParamDtype::F16 => f16::from_f32(v).to_f32(),
            ParamDtype::F32 => v,
        }
    }
}

/// Parameters held in their storage dtype: exactly the bytes a store keeps.
#[derive(Clone, Debug, PartialEq)]
pub enum ParamVec {
    F16(Vec<f16>),
    F32(Vec<f32>),
}

impl ParamVec {
    /// Store `values` (already rounded with [`ParamDtype::round`]) in `dtype`.
    pub fn from_f32(dtype: ParamDtype, values: Vec<f32>) -> Self {
        match dtype {
            ParamDtype::F16 => ParamVec::F16(values.into_iter().map(f16::from_f32).collect()),
            ParamDtype::F32 => ParamVec::F32(values),
        }
    }

    pub fn dtype(&self) -> ParamDtype {
        match self {
            ParamVec::F16(_) => ParamDtype::F16,
            ParamVec::F32(_) => ParamDtype::F32,
        }
    }

    pub fn len(&self) -> usize {
        match self {
            ParamVec::F16(v) => v.len(),
            ParamVec::F32(v) => v.len(),
        }
    }

    pub fn is_empty(&self) -> bool {
        self.len() == 0
    }

    #[inline(always)]
    pub fn get(&self, i: usize) -> f32 {
        match self {
            ParamVec::F16(v) => v[i].to_f32(),
            ParamVec::F32(v) => v[i],
        }
    }

    /// Values `start .. start + len` as `f32` into `out` (replacing its contents), converted
    /// in bulk (hardware F16C when present). The decoders reuse `out` from one unit of work to
    /// the next rather than allocate three small vectors per unit.
    pub fn to_f32_range_into(&self, start: usize, len: usize, out: &mut Vec<f32>) {
        out.clear();
        match self {
            ParamVec::F16(v) => {
                out.resize(len, 0.0);
                half::slice::HalfFloatSliceExt::convert_to_f32_slice(&v[start..start + len], out);
            }
            ParamVec::F32(v) => out.extend_from_slice(&v[start..start + len]),
        }
    }

    pub fn to_f32_vec(&self) -> Vec<f32> {
        match self {
            ParamVec::F16(v) => v.iter().map(|x| x.to_f32()).collect(),
            ParamVec::F32(v) => v.clone(),
        }
    }

    /// Bytes held by the values (not counting the `Vec` header).
    pub fn nbytes(&self) -> usize {
        self.len() * self.dtype().size()
    }
}

/// Scale and offset of one group, already rounded to storage precision.
#[derive(Clone, Copy, Debug, PartialEq)]
pub struct Affine {
    pub scale: f32,
    pub offset: f32,
}

/// Largest code of a `bits`-bit quantizer, as `f32`.
#[inline(always)]
pub fn max_code(bits: u8) -> f32 {
    ((1u32 << bits) - 1) as f32
}

impl Affine {
    /// Parameters for a group whose values span `[min, max]`. Fails when the storage dtype
    /// cannot represent them (fp16 overflows past 65504).
    #[inline]
    pub fn from_range(min: f32, max: f32, bits: u8, dtype: ParamDtype) -> Result<Affine> {
        let scale = dtype.round((max - min) / max_code(bits));
        let offset = dtype.round(min);
        if !scale.is_finite() || !offset.is_finite() {
            let hint = match dtype {
                ParamDtype::F16 => "; use `param_dtype='float32'`",
                ParamDtype::F32 => "",
            };
            return Err(KvmixError::NonFinite(format!(
                "values in [{min}, {max}] exceed the range of {} quantization parameters{hint}",
                dtype.name()
            )));
        }
        Ok(Affine { scale, offset })
    }

    /// Codes of `xs` into `codes` (same length).
    #[inline(always)]
    pub fn encode_into(&self, xs: &[f32], bits: u8, codes: &mut [u8]) {
        if self.scale == 0.0 {
            codes.fill(0);
            return;
        }
        let top = max_code(bits);
        for (c, &x) in codes.iter_mut().zip(xs) {
            *c = self.code(x, top);
        }
    }

    /// The code of `x`; `top` is [`max_code`] of the width. With a zero scale the code is
    /// arbitrary (0 or `top`) and decodes to the offset, as [`Self::encode_into`]'s code 0.
    #[inline(always)]
    pub fn code(&self, x: f32, top: f32) -> u8 {
        // clamp(floor(y), 0, top) == trunc(clamp(y, 0, top)) for an integer `top`, and the
        // truncating conversion vectorizes where `floor` is a libm call on the baseline target.
        // `max` then `min` equals clamp for numbers and sends NaN (and 0/0) to 0, ±Inf (x/0)
        // to `top` or 0.
        let y = ((x - self.offset) / self.scale + 0.5).max(0.0).min(top);
        // SAFETY: `y` is finite and in [0, top] (see above), so it fits an i32; the checked
        // `as` cast would not vectorize.
        unsafe { y.to_int_unchecked::<i32>() as u8 }
    }

    #[inline(always)]
    pub fn decode(&self, code: u8) -> f32 {
        self.scale * code as f32 + self.offset
    }
}

/// Minimum and maximum of `xs`, and whether every element is finite.
///
/// Eight independent lanes so the loop vectorizes; `x < lo` (not `f32::min`) keeps it to one
/// compare and blend per element. NaN never wins a comparison, and `x * 0` is NaN exactly when
/// `x` is NaN or ±Inf, which the `probe` lanes collect.
#[inline(always)]
pub fn min_max_finite(xs: &[f32]) -> (f32, f32, bool) {
    let mut lo = [f32::INFINITY; 8];
    let mut hi = [f32::NEG_INFINITY; 8];
    let mut probe = [0f32; 8];
    let mut chunks = xs.chunks_exact(8);
    for c in &mut chunks {
        for l in 0..8 {
            let x = c[l];
            lo[l] = if x < lo[l] { x } else { lo[l] };
            hi[l] = if x > hi[l] { x } else { hi[l] };
            probe[l] += x * 0.0;
        }
    }
    for &x in chunks.remainder() {
        lo[0] = if x < lo[0] { x } else { lo[0] };
        hi[0] = if x > hi[0] { x } else { hi[0] };
        probe[0] += x * 0.0;
    }
    let lo = lo.iter().copied().fold(f32::INFINITY, f32::min);
    let hi = hi.iter().copied().fold(f32::NEG_INFINITY, f32::max);
    let finite = probe.iter().all(|&p| p == 0.0);
    (lo, hi, finite)
}

/// [`min_max_finite`] with AVX2 intrinsics: the same eight lanes in the same order, and
/// `vminps(x, lo)` is exactly `if x < lo { x } else { lo }`, so the results are identical
/// (down to the sign of a zero). The compiler's own vectorization of the portable loop
/// shuffled the lanes around and took three times as many instructions.
///
/// # Safety
/// The CPU must support AVX2.
#[cfg(target_arch = "x86_64")]
#[target_feature(enable = "avx2")]
#[inline]
pub unsafe fn min_max_finite_avx2(xs: &[f32]) -> (f32, f32, bool) {
    use std::arch::x86_64::*;
    let main = xs.len() / 8 * 8;
    let mut lo = _mm256_set1_ps(f32::INFINITY);
    let mut hi = _mm256_set1_ps(f32::NEG_INFINITY);
    let mut probe = _mm256_setzero_ps();
    let zero = _mm256_setzero_ps();
    for i in (0..main).step_by(8) {
        // SAFETY: i + 8 <= main <= xs.len().
        let x = unsafe { _mm256_loadu_ps(xs.as_ptr().add(i)) };
        lo = _mm256_min_ps(x, lo);
        hi = _mm256_max_ps(x, hi);
        probe = _mm256_add_ps(probe, _mm256_mul_ps(x, zero));
    }
    let (mut l, mut h, mut p) = ([0f32; 8], [0f32; 8], [0f32; 8]);
    // SAFETY: each array holds eight floats.
    unsafe {
        _mm256_storeu_ps(l.as_mut_ptr(), lo);
        _mm256_storeu_ps(h.as_mut_ptr(), hi);
        _mm256_storeu_ps(p.as_mut_ptr(), probe);
    }
    for &x in &xs[main..] {
        l[0] = if x < l[0] { x } else { l[0] };
        h[0] = if x > h[0] { x } else { h[0] };
        p[0] += x * 0.0;
    }
    let lo = l.iter().copied().fold(f32::INFINITY, f32::min);
    let hi = h.iter().copied().fold(f32::NEG_INFINITY, f32::max);
    (lo, hi, p.iter().all(|&v| v == 0.0))
}

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;

    #[cfg(target_arch = "x86_64")]
    proptest! {
        #[test]
        fn avx2_min_max_is_identical(xs in proptest::collection::vec(
            prop_oneof![-1e3f32..1e3, Just(0.0f32), Just(-0.0f32), Just(f32::NAN), Just(f32::INFINITY)],
            0..80,
        )) {
            if crate::parallel::has_avx2() {
                // SAFETY: the CPU has AVX2.
                let (l, h, f) = unsafe { min_max_finite_avx2(&xs) };
                let (pl, ph, pf) = min_max_finite(&xs);
                prop_assert_eq!((l.to_bits(), h.to_bits(), f), (pl.to_bits(), ph.to_bits(), pf));
            }
        }
    }

    #[test]
    fn constant_group_reconstructs_exactly_in_fp32() {
        let a = Affine::from_range(0.1, 0.1, 2, ParamDtype::F32).unwrap();
        let mut codes = [9u8; 3];
        a.encode_into(&[0.1, 0.1, 0.1], 2, &mut codes);
        assert_eq!(codes, [0, 0, 0]);
        assert_eq!(a.decode(0), 0.1);
    }

    #[test]
    fn fp16_overflow_is_an_error() {
        assert!(Affine::from_range(-1e6, 1e6, 4, ParamDtype::F16).is_err());
        assert!(Affine::from_range(-1e6, 1e6, 4, ParamDtype::F32).is_ok());
    }

    #[test]
    fn min_max_flags_nan_and_inf() {
        assert!(min_max_finite(&[1.0, 2.0]).2);
        assert!(!min_max_finite(&[1.0, f32::NAN]).2);
        assert!(!min_max_finite(&[f32::INFINITY, 2.0]).2);
    }

    proptest! {
        #[test]
        fn error_within_half_step(bits in 1u8..=8, f16_params: bool,
                                  xs in proptest::collection::vec(-100.0f32..100.0, 1..64)) {
            let dtype = if f16_params { ParamDtype::F16 } else { ParamDtype::F32 };
            let (lo, hi, ok) = min_max_finite(&xs);
            prop_assert!(ok);
            let a = Affine::from_range(lo, hi, bits, dtype).unwrap();
            let mut codes = vec![0u8; xs.len()];
            a.encode_into(&xs, bits, &mut codes);
            // Exact step and offset vs stored ones: the bound is half a stored step plus
            // what rounding the parameters moved the grid by at the far end.
            let exact_scale = (hi - lo) / max_code(bits);
            let grid_shift = (a.offset - lo).abs() + max_code(bits) * (a.scale - exact_scale).abs();
            for (&x, &c) in xs.iter().zip(&codes) {
                prop_assert!((c as f32) <= max_code(bits));
                let err = (a.decode(c) - x).abs();
                let bound = a.scale / 2.0 + grid_shift + 1e-5 * (1.0 + x.abs());
                prop_assert!(err <= bound, "x={x} code={c} err={err} bound={bound}");
            }
        }
    }
}
