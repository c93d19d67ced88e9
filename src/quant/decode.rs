//! Reconstruction of a slab of token rows, `x̂ = (scale·code + offset)·factor`, straight from
//! the packed codes.
//!
//! The portable kernel unpacks the slab into a scratch buffer and decodes it. The AVX2 kernel
//! ([`avx2`]) fuses the two, expanding the codes from the packed bytes in registers. Unpacking
//! to bytes first, then decoding, made dequantization limited by kvmix's own code, not by
//! memory.
//!
//! `scale·code + offset` is a multiply then an add, never an FMA, in both kernels: the result
//! must be bit-identical to the portable path and to the NumPy reference, which round twice.

use super::packing::unpack;
use crate::element::Element;

#[cfg(target_arch = "x86_64")]
pub(crate) mod avx2;

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
        unsafe { avx2::decode_packed(&packed, bits, slab, &mut fused) };
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
