//! Which range a group's uniform grid spans: its values' min and max, or the range of least
//! squared error.
//!
//! A min-max grid wastes levels on the tails. After kvmix-5x's Hadamard rotation the values
//! are near-Gaussian, and the extremes of a 64-value group sit near ±2.4σ: a 2-bit grid
//! spanning them has about twice the squared error of the same grid clipped to its best range,
//! which is close to a Lloyd-Max codebook's (Lloyd 1982, "Least squares quantization in PCM";
//! Max 1960, "Quantizing for minimum distortion"). On SmolLM2-135M's rotated keys and values
//! (`notes/kvmix-5x.md`, session 10) the clipped grid's squared error is 0.55x min-max's for
//! 2-bit values and 0.50x for 3-bit per-channel keys (Lloyd-Max per group: 0.50x, 0.44x).
//! Clipping keeps the stored format (codes, scale, offset), so no decoder or attention kernel
//! changes; only the quantizers search. The search over clipping ratios is the one of AWQ's
//! and OmniQuant's weight clipping (Lin et al., 2024; Shao et al., 2024) and Atom's clipped
//! asymmetric groups (Zhao et al., 2024); KVQuant (Hooper et al., 2024) clips keys and values
//! at outlier percentiles instead.
//!
//! [`Clip::Mse`] tries the min-max grid first, then the grids whose range is the min-max
//! range shrunk about its midpoint by each factor of [`SHRINK`], and keeps the one of least
//! squared error (the first on a tie), so its error is never above min-max's. Errors are
//! summed in f64 from exact squares of f32 differences, so engines that sum in another order
//! choose the same grid unless two candidates' errors agree to ~1e-15 (only when fp16 rounding
//! gives two candidates the same grid, and then the first is kept everywhere).
//!
//! Measured and not kept (session 10): one fixed ratio per bit width (no search) fits 2-bit
//! values (0.7: 0.58x min-max's error, the search 0.55x) but not 4-bit ones (0.7: 3.8x);
//! each end shrunk on its own (a 2-D search, 11² candidates) lowers the squared error only
//! 4-9% more. Squared error is not attention error for keys: at 4 bits the clipped keys'
//! attention-output error is 0.97x (regular) and 1.06x (salient) min-max's, against 0.68x at
//! 3 bits; an extreme key sets the logits that matter.
//!
//! Nor is it the model's error: on kvmix-5x, clipped values lower KL(full || cache) on the
//! tuning text (stdlib docstrings, -10.5%) and raise it on KJV (+11%; keys and values +21%).
//! The least-squares grid shrinks each group toward its middle, and every layer's attention
//! output with it (x0.90 on KJV); [`Clip::MseUnbiased`] keeps only the candidates that do not
//! shrink: keys and values, KL -6% on stdlib and -19% on KJV. No preset uses either yet;
//! min-max stays the default.

use super::affine::{max_code, Affine, ParamDtype};
use crate::error::{KvmixError, Result};

/// How a group's range is chosen.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, Default)]
pub enum Clip {
    /// The group's min and max (round-to-nearest over the full range; the papers' quantizers).
    #[default]
    MinMax,
    /// The range of least squared error among min-max and [`SHRINK`]'s shrunk ranges.
    Mse,
    /// As `Mse`, among the candidates whose reconstruction does not shrink the group
    /// (`<x̂ - x, x> >= 0`, summed in f64 from exact products); min-max when none qualifies.
    /// A least-squares grid shrinks its values toward the middle, and attention does not
    /// average a shared shrinkage away (session 10: attention outputs x0.90 per layer).
    MseUnbiased,
}

impl Clip {
    /// Every name, as [`Self::parse`] reads it and [`Self::name`] writes it.
    pub const NAMES: [&'static str; 3] = ["minmax", "mse", "mse_unbiased"];

    pub fn name(self) -> &'static str {
        match self {
            Clip::MinMax => "minmax",
            Clip::Mse => "mse",
            Clip::MseUnbiased => "mse_unbiased",
        }
    }

    pub fn parse(name: &str) -> Result<Self> {
        match name {
            "minmax" => Ok(Clip::MinMax),
            "mse" => Ok(Clip::Mse),
            "mse_unbiased" => Ok(Clip::MseUnbiased),
            _ => Err(KvmixError::Config(format!(
                "`clip` must be 'minmax', 'mse' or 'mse_unbiased', got {name:?}"
            ))),
        }
    }
}

/// Shrink factors [`Clip::Mse`] tries after the min-max range, largest first. The best
/// factor of a 2-bit 64-value group (or 3-bit key channel over a 2k-token segment) is 0.60 to
/// 0.75 for 80% of the groups of SmolLM2's rotated keys and values; 0.45 is rarely reached.
pub const SHRINK: [f32; 11] = [0.95, 0.9, 0.85, 0.8, 0.75, 0.7, 0.65, 0.6, 0.55, 0.5, 0.45];

/// The range `[lo, hi]` shrunk about its midpoint by `s`, in this exact operation order (the
/// reference quantizer and the Triton kernels compute it the same way).
#[inline(always)]
pub fn shrunk_range(lo: f32, hi: f32, s: f32) -> (f32, f32) {
    let mid = (lo + hi) * 0.5;
    let half = (hi - lo) * 0.5;
    (mid - s * half, mid + s * half)
}

/// Squared reconstruction error of `xs` on grid `a` and its shrink sum `<x̂ - x, x>`, both
/// summed in f64 (each product is exact) in one pass. Eight independent lanes per sum so the
/// loop vectorizes: one serial f64 sum made the squared error 60x the cost of min-max
/// quantization instead of ~12x, and the shrink sum, a serial sum in a second pass until
/// session 17, was most of `Clip::MseUnbiased`'s cost (one layer's 8k-token classification
/// of kvmix-5x on one thread: 120 ms, of which min-max quantization 11 ms).
#[inline(always)]
pub fn errors(a: &Affine, xs: &[f32], bits: u8) -> (f64, f64) {
    let top = max_code(bits);
    let (mut sq, mut sh) = ([0f64; 8], [0f64; 8]);
    let mut add = |lanes: &[f32]| {
        for ((e, p), &x) in sq.iter_mut().zip(sh.iter_mut()).zip(lanes) {
            let d = (a.decode(a.code(x, top)) - x) as f64;
            *e += d * d;
            *p += d * x as f64;
        }
    };
    let mut chunks = xs.chunks_exact(8);
    for c in &mut chunks {
        add(c);
    }
    add(chunks.remainder());
    (sq.iter().sum(), sh.iter().sum())
}

/// Squared reconstruction error of `xs` on grid `a` (see [`errors`]).
#[inline(always)]
pub fn squared_error(a: &Affine, xs: &[f32], bits: u8) -> f64 {
    errors(a, xs, bits).0
}

/// The grid of the group `xs` (min `lo`, max `hi`) under `clip`. Inlined into the caller so
/// that it is compiled for the caller's instruction set (AVX2 in the quantizer).
#[inline(always)]
pub fn fit(
    xs: &[f32],
    lo: f32,
    hi: f32,
    bits: u8,
    dtype: ParamDtype,
    clip: Clip,
) -> Result<Affine> {
    let mut best = Affine::from_range(lo, hi, bits, dtype)?;
    if clip == Clip::MinMax || best.scale == 0.0 {
        return Ok(best);
    }
    let (mut best_err, shrink) = errors(&best, xs, bits);
    if clip == Clip::MseUnbiased && shrink < 0.0 {
        best_err = f64::MAX;
    }
    for s in SHRINK {
        let (a, b) = shrunk_range(lo, hi, s);
        let cand = Affine::from_range(a, b, bits, dtype)?;
        let (err, shrink) = errors(&cand, xs, bits);
        if clip == Clip::MseUnbiased && shrink < 0.0 {
            continue;
        }
        if err < best_err {
            (best, best_err) = (cand, err);
        }
    }
    Ok(best)
}

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;

    #[test]
    fn names_round_trip() {
        for n in Clip::NAMES {
            assert_eq!(Clip::parse(n).unwrap().name(), n);
        }
        assert!(Clip::parse("max").is_err());
    }

    #[test]
    fn gaussian_two_bit_group_halves_the_error() {
        // 64 draws of a standard normal (Box-Muller on a fixed LCG): the clipped 2-bit grid
        // has well under 0.7x min-max's squared error (about 0.55x in expectation).
        let mut state = 12345u64;
        let mut uniform = || {
            state = state
                .wrapping_mul(6364136223846793005)
                .wrapping_add(1442695040888963407);
            ((state >> 40) as f32 + 0.5) / (1u64 << 24) as f32
        };
        let xs: Vec<f32> = (0..64)
            .map(|_| {
                let (u, v) = (uniform(), uniform());
                (-2.0 * u.ln()).sqrt() * (std::f32::consts::TAU * v).cos()
            })
            .collect();
        let (lo, hi) = xs
            .iter()
            .fold((f32::MAX, f32::MIN), |(l, h), &x| (l.min(x), h.max(x)));
        let mm = fit(&xs, lo, hi, 2, ParamDtype::F16, Clip::MinMax).unwrap();
        let mse = fit(&xs, lo, hi, 2, ParamDtype::F16, Clip::Mse).unwrap();
        let (e0, e1) = (squared_error(&mm, &xs, 2), squared_error(&mse, &xs, 2));
        assert!(e1 < 0.7 * e0, "clipped {e1} vs min-max {e0}");
    }

    proptest! {
        #[test]
        fn never_worse_than_min_max(bits in 1u8..=8, f16_params: bool,
                                    xs in proptest::collection::vec(-100.0f32..100.0, 1..80)) {
            let dtype = if f16_params { ParamDtype::F16 } else { ParamDtype::F32 };
            let (lo, hi) = xs.iter().fold((f32::MAX, f32::MIN), |(l, h), &x| (l.min(x), h.max(x)));
            let mm = fit(&xs, lo, hi, bits, dtype, Clip::MinMax).unwrap();
            let mse = fit(&xs, lo, hi, bits, dtype, Clip::Mse).unwrap();
            prop_assert!(squared_error(&mse, &xs, bits) <= squared_error(&mm, &xs, bits));
            // The unbiased search leaves min-max only for a grid that does not shrink.
            let unb = fit(&xs, lo, hi, bits, dtype, Clip::MseUnbiased).unwrap();
            prop_assert!(unb == mm || errors(&unb, &xs, bits).1 >= 0.0);
        }
    }
}
