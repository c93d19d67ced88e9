//! The AVX2 decoder: each step expands one block of eight codes (`bits` bytes, see
//! [`crate::quant::packing`]) in registers — a byte shuffle gives every 32-bit lane the two
//! bytes its code can straddle, a per-lane variable shift (`vpsrlvd`) by `k·bits mod 8` and a
//! mask leave the code — converts it to float and decodes eight channels at once.

use super::{Params, Slab};
use crate::element::Element;

/// Whether [`decode_packed`] handles `slab`: rows of whole blocks of eight codes, and
/// groups that do not split a block.
#[inline(always)]
pub(crate) fn fits(slab: &Slab<'_>) -> bool {
    slab.channels.is_multiple_of(8)
        && match slab.params {
            Params::Groups { group_size, .. } => group_size % 8 == 0,
            Params::Channels { .. } => true,
        }
}

/// [`super::decode_packed`] fused in AVX2 registers; same results, bit for bit.
///
/// # Safety
/// The CPU must support AVX2, FMA and F16C. Panics (safely) unless `dst` holds whole rows,
/// `packed` exactly their codes, the parameters and factors cover them, and
/// [`fits`] holds.
#[target_feature(enable = "avx2,fma,f16c")]
pub(crate) unsafe fn decode_packed<T: Element>(
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
                Some(_) => decode_width::<T, $b, true>(packed, slab, dst),
                None => decode_width::<T, $b, false>(packed, slab, dst),
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
        _ => panic!("avx2::decode_packed: bits must be 1..=8, got {bits}"),
    }
}

#[target_feature(enable = "avx2,fma,f16c")]
#[inline]
unsafe fn decode_width<T: Element, const B: usize, const FACTOR: bool>(
    packed: &[u8],
    slab: Slab<'_>,
    dst: &mut [T],
) {
    use std::arch::x86_64::*;
    let n = dst.len();
    let d = slab.channels;
    assert!(fits(&slab) && n.is_multiple_of(d) && packed.len() == n / 8 * B);
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
