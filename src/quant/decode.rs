//! Reconstruction of one token row, `x̂ = (scale·code + offset)·factor`, straight from the
//! packed codes.
//!
//! The portable kernel unpacks the row into a scratch buffer and decodes it. The AVX2 kernel
//! fuses the two: each step expands one block of eight codes (`bits` bytes, see
//! [`super::packing`]) in registers — a byte shuffle gives every 32-bit lane the two bytes its
//! code can straddle, a per-lane variable shift (`vpsrlvd`) by `k·bits mod 8` and a mask leave
//! the code — converts it to float and decodes eight channels at once. Unpacking to bytes
//! first, then decoding, made dequantization limited by kvmix's own code, not by memory.
//!
//! `scale·code + offset` is a multiply then an add, never an FMA, in both kernels: the result
//! must be bit-identical to the portable path and to the NumPy reference, which round twice.

use super::packing::{packed_len, unpack};
use crate::element::Element;

/// The parameters of one token row.
#[derive(Clone, Copy, Debug)]
pub(crate) enum RowParams<'a> {
    /// One `(scale, offset)` per group of `group_size` consecutive channels.
    Groups {
        scale: &'a [f32],
        offset: &'a [f32],
        group_size: usize,
    },
    /// One `(scale, offset)` per channel.
    Channels { scale: &'a [f32], offset: &'a [f32] },
}

/// Decode a row of unpacked `codes` into `dst` (same length); `factor`, if any, holds one
/// value per channel.
#[inline(always)]
pub(crate) fn decode_codes<T: Element>(
    codes: &[u8],
    params: RowParams<'_>,
    factor: Option<&[f32]>,
    dst: &mut [T],
) {
    match params {
        RowParams::Groups {
            scale,
            offset,
            group_size,
        } => {
            let groups = codes
                .chunks_exact(group_size)
                .zip(dst.chunks_exact_mut(group_size));
            for (g, (gc, gd)) in groups.enumerate() {
                let (s, b) = (scale[g], offset[g]);
                match factor {
                    // Multiplying by a factor of 1 changes nothing, so no factor means no multiply.
                    None => {
                        for (o, &c) in gd.iter_mut().zip(gc) {
                            *o = T::from_f32(s * c as f32 + b);
                        }
                    }
                    Some(f) => {
                        let fg = &f[g * group_size..][..group_size];
                        for ((o, &c), &fc) in gd.iter_mut().zip(gc).zip(fg) {
                            *o = T::from_f32((s * c as f32 + b) * fc);
                        }
                    }
                }
            }
        }
        RowParams::Channels { scale, offset } => match factor {
            None => {
                for (((o, &c), &s), &b) in dst.iter_mut().zip(codes).zip(scale).zip(offset) {
                    *o = T::from_f32(s * c as f32 + b);
                }
            }
            Some(f) => {
                let lanes = dst.iter_mut().zip(codes).zip(scale).zip(offset).zip(f);
                for ((((o, &c), &s), &b), &fc) in lanes {
                    *o = T::from_f32((s * c as f32 + b) * fc);
                }
            }
        },
    }
}

/// Unpack a row of `dst.len()` codes of `bits` bits from `packed` into `scratch`, then decode.
#[inline(always)]
pub(crate) fn decode_packed<T: Element>(
    packed: &[u8],
    bits: u8,
    params: RowParams<'_>,
    factor: Option<&[f32]>,
    scratch: &mut Vec<u8>,
    dst: &mut [T],
) {
    scratch.resize(dst.len(), 0);
    unpack(packed, bits, scratch);
    decode_codes(scratch, params, factor, dst);
}

/// Whether [`decode_packed_avx2`] handles rows with `params`: groups must not split a block
/// of eight codes.
#[inline(always)]
pub(crate) fn avx2_fits(params: &RowParams<'_>) -> bool {
    match params {
        RowParams::Groups { group_size, .. } => group_size % 8 == 0,
        RowParams::Channels { .. } => true,
    }
}

/// The scale, offset and factor of channel `i` of a row.
#[inline(always)]
fn channel_params(params: &RowParams<'_>, factor: Option<&[f32]>, i: usize) -> (f32, f32, f32) {
    let (s, o) = match *params {
        RowParams::Groups {
            scale,
            offset,
            group_size,
        } => (scale[i / group_size], offset[i / group_size]),
        RowParams::Channels { scale, offset } => (scale[i], offset[i]),
    };
    (s, o, factor.map_or(1.0, |f| f[i]))
}

/// [`decode_packed`] fused in AVX2 registers; same results, bit for bit.
///
/// # Safety
/// The CPU must support AVX2, FMA and F16C. Panics (safely) unless `packed` holds exactly
/// the row's codes, the parameters and factors cover the row, and groups are multiples of 8
/// (see [`avx2_fits`]).
#[cfg(target_arch = "x86_64")]
#[target_feature(enable = "avx2,fma,f16c")]
pub(crate) unsafe fn decode_packed_avx2<T: Element>(
    packed: &[u8],
    bits: u8,
    params: RowParams<'_>,
    factor: Option<&[f32]>,
    dst: &mut [T],
) {
    use std::arch::x86_64::*;
    let n = dst.len();
    let b = bits as usize;
    assert!((1..=8).contains(&b) && packed.len() == packed_len(n, bits));
    assert!(avx2_fits(&params));
    let blocks = n / 8;
    match params {
        RowParams::Groups {
            scale,
            offset,
            group_size,
        } => {
            assert!(scale.len() >= n.div_ceil(group_size) && offset.len() >= n.div_ceil(group_size))
        }
        RowParams::Channels { scale, offset } => assert!(scale.len() >= n && offset.len() >= n),
    }
    if let Some(f) = factor {
        assert!(f.len() >= n);
    }
    // Lane k takes the bytes holding bits [k·b, k·b + b) of the block: at most two, since
    // b ≤ 8, and never past the block's last byte (code 7 ends exactly there). `vpshufb`
    // indexes each 128-bit half on its own, and the block is broadcast to both.
    let mut shuffle = [0x80u8; 32];
    let mut shift = [0i32; 8];
    for (k, sh) in shift.iter_mut().enumerate() {
        let (byte, bit) = (k * b / 8, (k * b) % 8);
        let lane = 16 * (k / 4) + 4 * (k % 4);
        shuffle[lane] = byte as u8;
        if bit + b > 8 {
            shuffle[lane + 1] = byte as u8 + 1;
        }
        *sh = bit as i32;
    }
    // SAFETY (the intrinsics below): the caller guarantees the CPU features. Block j reads
    // `packed[j·b .. j·b + 8]` only when that is in bounds (else a padded copy), and the
    // unchecked loads of parameters and factors stay below the lengths asserted above
    // (channels `8j .. 8j + 8` with `j < blocks`).
    let shuffle = _mm256_loadu_si256(shuffle.as_ptr() as *const __m256i);
    let shift = _mm256_loadu_si256(shift.as_ptr() as *const __m256i);
    let mask = _mm256_set1_epi32((1i32 << b) - 1);
    let codes8 = |j: usize| -> __m256 {
        let p = j * b;
        let word = if p + 8 <= packed.len() {
            std::ptr::read_unaligned(packed.as_ptr().add(p) as *const u64)
        } else {
            let mut bytes = [0u8; 8];
            bytes[..b].copy_from_slice(&packed[p..p + b]);
            u64::from_le_bytes(bytes)
        };
        let v = _mm256_shuffle_epi8(_mm256_set1_epi64x(word as i64), shuffle);
        _mm256_cvtepi32_ps(_mm256_and_si256(_mm256_srlv_epi32(v, shift), mask))
    };
    let with_factor = |v: __m256, j: usize| match factor {
        Some(f) => _mm256_mul_ps(v, _mm256_loadu_ps(f.as_ptr().add(8 * j))),
        None => v,
    };
    let store = |dst: &mut [T], j: usize, v: __m256| {
        let lanes: [f32; 8] = std::mem::transmute(v);
        for (o, x) in dst[8 * j..8 * j + 8].iter_mut().zip(lanes) {
            *o = T::from_f32(x);
        }
    };
    match params {
        RowParams::Groups {
            scale,
            offset,
            group_size,
        } => {
            let per_group = group_size / 8;
            for g in 0..blocks.div_ceil(per_group) {
                let s = _mm256_set1_ps(*scale.get_unchecked(g));
                let o = _mm256_set1_ps(*offset.get_unchecked(g));
                for j in g * per_group..((g + 1) * per_group).min(blocks) {
                    let v = _mm256_add_ps(_mm256_mul_ps(codes8(j), s), o);
                    store(dst, j, with_factor(v, j));
                }
            }
        }
        RowParams::Channels { scale, offset } => {
            for j in 0..blocks {
                let s = _mm256_loadu_ps(scale.as_ptr().add(8 * j));
                let o = _mm256_loadu_ps(offset.as_ptr().add(8 * j));
                let v = _mm256_add_ps(_mm256_mul_ps(codes8(j), s), o);
                store(dst, j, with_factor(v, j));
            }
        }
    }
    // The last n mod 8 codes, one by one.
    let rest = n - 8 * blocks;
    if rest > 0 {
        let mut codes = [0u8; 8];
        unpack(&packed[blocks * b..], bits, &mut codes[..rest]);
        for (k, &c) in codes[..rest].iter().enumerate() {
            let i = 8 * blocks + k;
            let (s, o, f) = channel_params(&params, factor, i);
            let v = s * c as f32 + o;
            dst[i] = T::from_f32(if factor.is_some() { v * f } else { v });
        }
    }
}

#[cfg(all(test, target_arch = "x86_64"))]
mod tests {
    use super::*;
    use crate::quant::packing::pack;
    use half::{bf16, f16};
    use proptest::prelude::*;

    fn both<T: Element + PartialEq + std::fmt::Debug>(
        codes: &[u8],
        bits: u8,
        params: RowParams<'_>,
        factor: Option<&[f32]>,
    ) -> std::result::Result<(), TestCaseError> {
        let mut packed = vec![0u8; packed_len(codes.len(), bits)];
        pack(codes, bits, &mut packed);
        let mut portable = vec![T::from_f32(0.0); codes.len()];
        decode_packed(
            &packed,
            bits,
            params,
            factor,
            &mut Vec::new(),
            &mut portable,
        );
        let mut fused = vec![T::from_f32(-1.0); codes.len()];
        // SAFETY: only run when the CPU has the features.
        unsafe { decode_packed_avx2(&packed, bits, params, factor, &mut fused) };
        prop_assert_eq!(portable, fused);
        Ok(())
    }

    proptest! {
        #[test]
        fn avx2_matches_portable(
            bits in 1u8..=8,
            blocks in 1usize..40,
            group_blocks in 1usize..5,
            per_channel: bool,
            with_factor: bool,
            extra in 0usize..8,
            seed in any::<u64>(),
        ) {
            if !crate::parallel::has_avx2() {
                return Ok(());
            }
            // Token groups always cover whole groups; per-channel rows may end mid-block.
            let n = 8 * blocks * group_blocks + if per_channel { extra } else { 0 };
            let group_size = 8 * group_blocks;
            let mut state = seed | 1;
            let mut next = || {
                state ^= state << 13;
                state ^= state >> 7;
                state ^= state << 17;
                state
            };
            let mask = ((1u16 << bits) - 1) as u64;
            let codes: Vec<u8> = (0..n).map(|_| (next() & mask) as u8).collect();
            let mut value = || (next() % 20_000) as f32 / 997.0 - 10.0;
            let n_params = if per_channel { n } else { n / group_size };
            let scale: Vec<f32> = (0..n_params).map(|_| value().abs() / 7.0).collect();
            let offset: Vec<f32> = (0..n_params).map(|_| value()).collect();
            let factor: Vec<f32> = (0..n).map(|_| value().abs() + 0.01).collect();
            let params = if per_channel {
                RowParams::Channels { scale: &scale, offset: &offset }
            } else {
                RowParams::Groups { scale: &scale, offset: &offset, group_size }
            };
            let factor = with_factor.then_some(factor.as_slice());
            both::<f32>(&codes, bits, params, factor)?;
            both::<f16>(&codes, bits, params, factor)?;
            both::<bf16>(&codes, bits, params, factor)?;
        }
    }
}
