//! Reconstruction of a slab of token rows, `x̂ = (scale·code + offset)·factor`, straight from
//! the packed codes.
//!
//! The portable kernel unpacks the slab into a scratch buffer and decodes it. The SIMD
//! kernels ([`avx2`], eight codes per step, and [`avx512`], sixteen) fuse the two: they expand
//! codes from the packed bytes in registers and decode whole vectors of channels at once.
//! Unpacking to bytes first, then decoding, made dequantization limited by kvmix's own code,
//! not by memory.
//!
//! `scale·code + offset` is a multiply then an add, never an FMA, in every kernel: the result
//! must be bit-identical to the portable path and to the NumPy reference, which round twice.

use super::packing::unpack;
use crate::element::Element;
use crate::isa::Isa;

#[cfg(target_arch = "x86_64")]
mod avx2;
#[cfg(target_arch = "x86_64")]
mod avx512;

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

/// [`decode_packed`] with the fastest kernel that `isa` and the slab's shape allow; every
/// kernel gives the same result, bit for bit. `stream` asks for stores that bypass the caches
/// where the kernel has them (for outputs much larger than the caches).
///
/// # Safety
/// The CPU must support `isa` (it is [`crate::isa::best`], or below it).
#[inline(always)]
pub(crate) unsafe fn decode_packed_fastest<T: Element>(
    packed: &[u8],
    bits: u8,
    slab: Slab<'_>,
    isa: Isa,
    stream: bool,
    dst: &mut [T],
) {
    #[cfg(target_arch = "x86_64")]
    {
        if isa >= Isa::Avx512 && avx512::fits(&slab) {
            // SAFETY: the caller guarantees the CPU features.
            return unsafe { avx512::decode_packed(packed, bits, slab, stream, dst) };
        }
        if isa >= Isa::Avx2 && avx2::fits(&slab) {
            // SAFETY: as above.
            return unsafe { avx2::decode_packed(packed, bits, slab, dst) };
        }
    }
    let _ = isa;
    decode_packed(packed, bits, slab, &mut Vec::new(), dst);
}

#[cfg(all(test, target_arch = "x86_64"))]
mod tests {
    use super::*;
    use crate::quant::packing::{pack, packed_len};
    use half::{bf16, f16};
    use proptest::prelude::*;

    /// Decode `codes` with the portable kernel and with every SIMD kernel the CPU has and the
    /// slab fits; all must agree bit for bit.
    fn all_kernels_agree<T: Element + PartialEq + std::fmt::Debug>(
        codes: &[u8],
        bits: u8,
        slab: Slab<'_>,
    ) -> std::result::Result<(), TestCaseError> {
        // Exactly the slab's bytes: a read past the end would show up under Miri/ASan, and
        // the last step is the one most likely to go wrong.
        let mut packed = vec![0u8; packed_len(codes.len(), bits)];
        pack(codes, bits, &mut packed);
        let mut portable = vec![T::from_f32(0.0); codes.len()];
        decode_packed(&packed, bits, slab, &mut Vec::new(), &mut portable);
        let isa = crate::isa::best();
        if isa >= Isa::Avx2 && avx2::fits(&slab) {
            let mut fused = vec![T::from_f32(-1.0); codes.len()];
            // SAFETY: `detect` checked the CPU features.
            unsafe { avx2::decode_packed(&packed, bits, slab, &mut fused) };
            prop_assert_eq!(&portable, &fused, "avx2, {} bits", bits);
        }
        if isa >= Isa::Avx512 && avx512::fits(&slab) {
            // fp32 output at every position within a cache line (the kernel joins vectors
            // into whole lines), with sentinels around it that must survive.
            let n = codes.len();
            let mut buf = vec![T::from_f32(-1.0); n + 32];
            let base = (buf.as_ptr() as usize % 64) / std::mem::size_of::<T>();
            for lag in [0usize, 1, 4, 15] {
                for stream in [false, true] {
                    let start = (lag + 16 - base % 16) % 16;
                    buf.fill(T::from_f32(-1.0));
                    // SAFETY: as above.
                    unsafe {
                        avx512::decode_packed(
                            &packed,
                            bits,
                            slab,
                            stream,
                            &mut buf[start..start + n],
                        )
                    };
                    prop_assert_eq!(
                        &portable[..],
                        &buf[start..start + n],
                        "avx512, {} bits",
                        bits
                    );
                    let outside = buf[..start].iter().chain(&buf[start + n..]);
                    prop_assert!(outside.into_iter().all(|&x| x == T::from_f32(-1.0)));
                }
            }
        }
        Ok(())
    }

    /// A deterministic slab: random codes of `bits` bits, scales, offsets and factors.
    struct Case {
        codes: Vec<u8>,
        scale: Vec<f32>,
        offset: Vec<f32>,
        factor: Vec<f32>,
    }

    fn case(bits: u8, rows: usize, d: usize, n_params: usize, seed: u64) -> Case {
        let mut state = seed | 1;
        let mut next = move || {
            state ^= state << 13;
            state ^= state >> 7;
            state ^= state << 17;
            state
        };
        let mask = ((1u16 << bits) - 1) as u64;
        let codes: Vec<u8> = (0..rows * d).map(|_| (next() & mask) as u8).collect();
        let mut value = || (next() % 20_000) as f32 / 997.0 - 10.0;
        Case {
            codes,
            scale: (0..n_params).map(|_| value().abs() / 7.0).collect(),
            offset: (0..n_params).map(|_| value()).collect(),
            factor: (0..d).map(|_| value().abs() + 0.01).collect(),
        }
    }

    fn check_all_types(
        c: &Case,
        bits: u8,
        params: Params<'_>,
        with_factor: bool,
        d: usize,
    ) -> std::result::Result<(), TestCaseError> {
        let factor = with_factor.then_some(c.factor.as_slice());
        let slab = Slab {
            params,
            factor,
            channels: d,
        };
        all_kernels_agree::<f32>(&c.codes, bits, slab)?;
        all_kernels_agree::<f16>(&c.codes, bits, slab)?;
        all_kernels_agree::<bf16>(&c.codes, bits, slab)
    }

    proptest! {
        #[test]
        fn simd_kernels_match_portable(
            bits in 1u8..=8,
            rows in 1usize..12,
            group_blocks in 1usize..5,
            row_groups in 1usize..5,
            per_channel: bool,
            with_factor: bool,
            seed in any::<u64>(),
        ) {
            // Groups of 8·group_blocks channels: odd block counts fit only the AVX2 kernel.
            let group_size = 8 * group_blocks;
            let d = group_size * row_groups;
            let n_params = if per_channel { d } else { rows * row_groups };
            let c = case(bits, rows, d, n_params, seed);
            let params = if per_channel {
                Params::Channels { scale: &c.scale, offset: &c.offset }
            } else {
                Params::Groups { scale: &c.scale, offset: &c.offset, group_size }
            };
            check_all_types(&c, bits, params, with_factor, d)?;
        }
    }

    /// Every width on slabs whose packed bytes end within, at and past the 16 bytes the
    /// AVX-512 kernel loads at once, so each takes both its wide loads and its tail copy.
    #[test]
    fn every_width_and_tail_matches_portable() {
        for bits in 1u8..=8 {
            for (rows, d) in [
                (1, 16),
                (1, 32),
                (2, 16),
                (3, 16),
                (1, 48),
                (5, 32),
                (7, 64),
            ] {
                for (gs, per_channel) in [(16, false), (d, false), (0, true)] {
                    let n_params = if per_channel { d } else { rows * d / gs };
                    let c = case(
                        bits,
                        rows,
                        d,
                        n_params,
                        0x5eed ^ (bits as u64) << 8 ^ d as u64,
                    );
                    let params = if per_channel {
                        Params::Channels {
                            scale: &c.scale,
                            offset: &c.offset,
                        }
                    } else {
                        Params::Groups {
                            scale: &c.scale,
                            offset: &c.offset,
                            group_size: gs,
                        }
                    };
                    for with_factor in [false, true] {
                        check_all_types(&c, bits, params, with_factor, d).unwrap();
                    }
                }
            }
        }
    }
}
