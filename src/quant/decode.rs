//! Reconstruction of a slab of token rows, `x̂ = (scale·code + offset)·factor`, straight from
//! the packed codes.
//!
//! The portable kernel unpacks the slab into a scratch buffer and decodes it. The AVX2 kernel
//! fuses the two: each step expands one block of eight codes (`bits` bytes, see
//! [`super::packing`]) in registers — a byte shuffle gives every 32-bit lane the two bytes its
//! code can straddle, a per-lane variable shift (`vpsrlvd`) by `k·bits mod 8` and a mask leave
//! the code — converts it to float and decodes eight channels at once. Unpacking to bytes
//! first, then decoding, made dequantization limited by kvmix's own code, not by memory.
//!
//! `scale·code + offset` is a multiply then an add, never an FMA, in both kernels: the result
//! must be bit-identical to the portable path and to the NumPy reference, which round twice.

use super::packing::unpack;
use crate::element::Element;

/// How the elements of a slab find their scale and offset.
#[derive(Clone, Copy, Debug)]
pub(crate) enum Params<'a> {
    /// One `(scale, offset)` per group of `group_size` consecutive elements of the slab
    /// (groups never straddle rows).
    Groups {
        scale: &'a [f32],
        offset: &'a [f32],
        group_size: usize,
    },
    /// One `(scale, offset)` per channel, shared by every row.
    Channels { scale: &'a [f32], offset: &'a [f32] },
}

/// A run of token rows of `channels` elements sharing one set of parameters and factors.
#[derive(Clone, Copy, Debug)]
pub(crate) struct Slab<'a> {
    pub params: Params<'a>,
    /// Per-channel reconstruction factors, shared by every row.
    pub factor: Option<&'a [f32]>,
    pub channels: usize,
}

/// Decode unpacked `codes` into `dst` (same length, whole rows).
#[inline(always)]
pub(crate) fn decode_codes<T: Element>(codes: &[u8], slab: Slab<'_>, dst: &mut [T]) {
    let d = slab.channels;
    match slab.params {
        Params::Groups {
            scale,
            offset,
            group_size,
        } => {
            let groups = codes
                .chunks_exact(group_size)
                .zip(dst.chunks_exact_mut(group_size));
            for (g, (gc, gd)) in groups.enumerate() {
                let (s, b) = (scale[g], offset[g]);
                match slab.factor {
                    // Multiplying by a factor of 1 changes nothing, so no factor means no multiply.
                    None => {
                        for (o, &c) in gd.iter_mut().zip(gc) {
                            *o = T::from_f32(s * c as f32 + b);
                        }
                    }
                    Some(f) => {
                        let fg = &f[(g * group_size) % d..][..group_size];
                        for ((o, &c), &fc) in gd.iter_mut().zip(gc).zip(fg) {
                            *o = T::from_f32((s * c as f32 + b) * fc);
                        }
                    }
                }
            }
        }
        Params::Channels { scale, offset } => {
            for (rc, rd) in codes.chunks_exact(d).zip(dst.chunks_exact_mut(d)) {
                match slab.factor {
                    None => {
                        for (((o, &c), &s), &b) in rd.iter_mut().zip(rc).zip(scale).zip(offset) {
                            *o = T::from_f32(s * c as f32 + b);
                        }
                    }
                    Some(f) => {
                        let lanes = rd.iter_mut().zip(rc).zip(scale).zip(offset).zip(f);
                        for ((((o, &c), &s), &b), &fc) in lanes {
                            *o = T::from_f32((s * c as f32 + b) * fc);
                        }
                    }
                }
            }
        }
    }
}

/// Unpack the slab's codes (`bits` each) from `packed` into `scratch`, then decode them.
#[inline(always)]
pub(crate) fn decode_packed<T: Element>(
    packed: &[u8],
    bits: u8,
    slab: Slab<'_>,
    scratch: &mut Vec<u8>,
    dst: &mut [T],
) {
    scratch.resize(dst.len(), 0);
    unpack(packed, bits, scratch);
    decode_codes(scratch, slab, dst);
}

/// Whether [`decode_packed_avx2`] handles `slab`: rows of whole blocks of eight codes, and
/// groups that do not split a block.
#[inline(always)]
pub(crate) fn avx2_fits(slab: &Slab<'_>) -> bool {
    slab.channels % 8 == 0
        && match slab.params {
            Params::Groups { group_size, .. } => group_size % 8 == 0,
            Params::Channels { .. } => true,
        }
}

/// [`decode_packed`] fused in AVX2 registers; same results, bit for bit.
///
/// # Safety
/// The CPU must support AVX2, FMA and F16C. Panics (safely) unless `dst` holds whole rows,
/// `packed` exactly their codes, the parameters and factors cover them, and
/// [`avx2_fits`] holds.
#[cfg(target_arch = "x86_64")]
#[target_feature(enable = "avx2,fma,f16c")]
pub(crate) unsafe fn decode_packed_avx2<T: Element>(
    packed: &[u8],
    bits: u8,
    slab: Slab<'_>,
    dst: &mut [T],
) {
    // A constant width makes the shuffle and shift constants and the block load a fixed-size
    // move; a constant factor flag takes the branch out of the inner loops.
    macro_rules! width {
        ($b:literal) => {
            match slab.factor {
                Some(_) => decode_width_avx2::<T, $b, true>(packed, slab, dst),
                None => decode_width_avx2::<T, $b, false>(packed, slab, dst),
            }
        };
    }
    match bits {
        1 => width!(1),
        2 => width!(2),
        3 => width!(3),
        4 => width!(4),
        5 => width!(5),
        6 => width!(6),
        7 => width!(7),
        8 => width!(8),
        _ => panic!("decode_packed_avx2: bits must be 1..=8, got {bits}"),
    }
}

#[cfg(target_arch = "x86_64")]
#[target_feature(enable = "avx2,fma,f16c")]
#[inline]
unsafe fn decode_width_avx2<T: Element, const B: usize, const FACTOR: bool>(
    packed: &[u8],
    slab: Slab<'_>,
    dst: &mut [T],
) {
    use std::arch::x86_64::*;
    let n = dst.len();
    let d = slab.channels;
    assert!(avx2_fits(&slab) && n % d == 0 && packed.len() == n / 8 * B);
    let rows = n / d;
    let factor = slab.factor.unwrap_or(&[]);
    assert!(!FACTOR || factor.len() >= d);
    // Lane k takes the bytes holding bits [k·B, k·B + B) of the block: at most two, since
    // B ≤ 8, and never past the block's last byte (code 7 ends exactly there). `vpshufb`
    // indexes each 128-bit half on its own, and the block is broadcast to both.
    let mut shuffle = [0x80u8; 32];
    let mut shift = [0i32; 8];
    for (k, sh) in shift.iter_mut().enumerate() {
        let (byte, bit) = (k * B / 8, (k * B) % 8);
        let lane = 16 * (k / 4) + 4 * (k % 4);
        shuffle[lane] = byte as u8;
        if bit + B > 8 {
            shuffle[lane + 1] = byte as u8 + 1;
        }
        *sh = bit as i32;
    }
    // SAFETY (the intrinsics and unchecked accesses below): the caller guarantees the CPU
    // features. Block j (< n/8) reads `packed[j·B .. j·B + B]`, in bounds by the length
    // assert; parameter loads stay below the lengths asserted in each arm, factor loads below
    // `d`, and stores below `n`.
    let shuffle = _mm256_loadu_si256(shuffle.as_ptr() as *const __m256i);
    let shift = _mm256_loadu_si256(shift.as_ptr() as *const __m256i);
    let mask = _mm256_set1_epi32((1i32 << B) - 1);
    let src = packed.as_ptr();
    let codes8 = |j: usize| -> __m256 {
        let mut word = [0u8; 8];
        std::ptr::copy_nonoverlapping(src.add(j * B), word.as_mut_ptr(), B);
        let v = _mm256_set1_epi64x(i64::from_le_bytes(word));
        let v = _mm256_shuffle_epi8(v, shuffle);
        _mm256_cvtepi32_ps(_mm256_and_si256(_mm256_srlv_epi32(v, shift), mask))
    };
    let out = dst.as_mut_ptr();
    let fp = factor.as_ptr();
    // Block j of the slab holds channels 8c .. 8c + 8 of its row, c = j mod (d/8).
    let emit = |j: usize, c: usize, v: __m256| {
        let v = if FACTOR {
            _mm256_mul_ps(v, _mm256_loadu_ps(fp.add(8 * c)))
        } else {
            v
        };
        let lanes: [f32; 8] = std::mem::transmute(v);
        for (k, x) in lanes.into_iter().enumerate() {
            *out.add(8 * j + k) = T::from_f32(x);
        }
    };
    let row_blocks = d / 8;
    match slab.params {
        Params::Groups {
            scale,
            offset,
            group_size,
        } => {
            assert!(scale.len() >= n / group_size && offset.len() >= n / group_size);
            let (group_blocks, row_groups) = (group_size / 8, d / group_size);
            for r in 0..rows {
                for gi in 0..row_groups {
                    let g = r * row_groups + gi;
                    let s = _mm256_set1_ps(*scale.get_unchecked(g));
                    let o = _mm256_set1_ps(*offset.get_unchecked(g));
                    for c in gi * group_blocks..(gi + 1) * group_blocks {
                        let j = r * row_blocks + c;
                        emit(j, c, _mm256_add_ps(_mm256_mul_ps(codes8(j), s), o));
                    }
                }
            }
        }
        Params::Channels { scale, offset } => {
            assert!(scale.len() >= d && offset.len() >= d);
            for r in 0..rows {
                for c in 0..row_blocks {
                    let s = _mm256_loadu_ps(scale.as_ptr().add(8 * c));
                    let o = _mm256_loadu_ps(offset.as_ptr().add(8 * c));
                    let j = r * row_blocks + c;
                    emit(j, c, _mm256_add_ps(_mm256_mul_ps(codes8(j), s), o));
                }
            }
        }
    }
}

#[cfg(all(test, target_arch = "x86_64"))]
mod tests {
    use super::*;
    use crate::quant::packing::{pack, packed_len};
    use half::{bf16, f16};
    use proptest::prelude::*;

    fn both<T: Element + PartialEq + std::fmt::Debug>(
        codes: &[u8],
        bits: u8,
        slab: Slab<'_>,
    ) -> std::result::Result<(), TestCaseError> {
        // Exactly the slab's bytes: a read past the end would show up under Miri/ASan, and
        // the last block is the one most likely to go wrong.
        let mut packed = vec![0u8; packed_len(codes.len(), bits)];
        pack(codes, bits, &mut packed);
        let mut portable = vec![T::from_f32(0.0); codes.len()];
        decode_packed(&packed, bits, slab, &mut Vec::new(), &mut portable);
        let mut fused = vec![T::from_f32(-1.0); codes.len()];
        // SAFETY: the caller checked the CPU features.
        unsafe { decode_packed_avx2(&packed, bits, slab, &mut fused) };
        prop_assert_eq!(portable, fused);
        Ok(())
    }

    proptest! {
        #[test]
        fn avx2_matches_portable(
            bits in 1u8..=8,
            rows in 1usize..12,
            group_blocks in 1usize..5,
            row_groups in 1usize..5,
            per_channel: bool,
            with_factor: bool,
            seed in any::<u64>(),
        ) {
            if !crate::parallel::has_avx2() {
                return Ok(());
            }
            let group_size = 8 * group_blocks;
            let d = group_size * row_groups;
            let n = rows * d;
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
            let n_params = if per_channel { d } else { n / group_size };
            let scale: Vec<f32> = (0..n_params).map(|_| value().abs() / 7.0).collect();
            let offset: Vec<f32> = (0..n_params).map(|_| value()).collect();
            let factor: Vec<f32> = (0..d).map(|_| value().abs() + 0.01).collect();
            let params = if per_channel {
                Params::Channels { scale: &scale, offset: &offset }
            } else {
                Params::Groups { scale: &scale, offset: &offset, group_size }
            };
            let slab = Slab { params, factor: with_factor.then_some(factor.as_slice()), channels: d };
            both::<f32>(&codes, bits, slab)?;
            both::<f16>(&codes, bits, slab)?;
            both::<bf16>(&codes, bits, slab)?;
        }
    }
}
