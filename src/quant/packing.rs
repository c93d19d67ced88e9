//! Dense bit packing of quantization codes, 1 to 8 bits each.
//!
//! Code `i` occupies bits `[i*b, (i+1)*b)` of a little-endian bit stream (least significant
//! bit first). Eight codes of `b` bits are exactly `b` bytes for every width, so the packers
//! work on blocks of eight codes with a `u64` accumulator; 3-bit codes are as dense as the
//! byte-aligned widths. A block of eight is also what makes slices independently packable:
//! any run of `8k` codes starts on a byte boundary.

use crate::error::{KvmixError, Result};

/// Number of bytes needed to hold `n` codes of `bits` bits each.
pub fn packed_len(n: usize, bits: u8) -> usize {
    (n * bits as usize).div_ceil(8)
}

/// Reject widths outside `1..=8` with a message naming the argument.
pub fn check_bits(bits: u8) -> Result<()> {
    if (1..=8).contains(&bits) {
        Ok(())
    } else {
        Err(KvmixError::Config(format!(
            "`bits` must be between 1 and 8, got {bits}"
        )))
    }
}

/// Pack `codes` (each `< 2^bits`; higher bits are ignored) into `out`, which must hold
/// exactly [`packed_len`] bytes.
#[inline]
pub fn pack(codes: &[u8], bits: u8, out: &mut [u8]) {
    assert_eq!(
        out.len(),
        packed_len(codes.len(), bits),
        "pack: output length"
    );
    #[cfg(target_arch = "x86_64")]
    let (codes, out) = if matches!(bits, 1 | 2 | 4) && crate::parallel::has_avx2() {
        // SAFETY: `has_avx2` confirmed the features; lengths were checked above.
        let done = unsafe { pack_avx2(codes, bits, out) };
        (&codes[done..], &mut out[done * bits as usize / 8..])
    } else {
        (codes, out)
    };
    pack_portable(codes, bits, out);
}

/// [`pack`] without SIMD.
#[inline]
fn pack_portable(codes: &[u8], bits: u8, out: &mut [u8]) {
    match bits {
        1 => pack_const::<1>(codes, out),
        2 => pack_const::<2>(codes, out),
        3 => pack_const::<3>(codes, out),
        4 => pack_const::<4>(codes, out),
        5 => pack_const::<5>(codes, out),
        6 => pack_const::<6>(codes, out),
        7 => pack_const::<7>(codes, out),
        8 => out.copy_from_slice(codes),
        _ => unreachable!("bits validated by check_bits"),
    }
}

/// Unpack `out.len()` codes of `bits` bits from `packed`.
#[inline]
pub fn unpack(packed: &[u8], bits: u8, out: &mut [u8]) {
    assert_eq!(
        packed.len(),
        packed_len(out.len(), bits),
        "unpack: input length"
    );
    match bits {
        1 => unpack_const::<1>(packed, out),
        2 => unpack_const::<2>(packed, out),
        3 => unpack_const::<3>(packed, out),
        4 => unpack_const::<4>(packed, out),
        5 => unpack_const::<5>(packed, out),
        6 => unpack_const::<6>(packed, out),
        7 => unpack_const::<7>(packed, out),
        8 => out.copy_from_slice(packed),
        _ => unreachable!("bits validated by check_bits"),
    }
}

/// Pack the longest prefix of `codes` that is a multiple of 32 codes with AVX2, for the
/// widths that divide a byte (1, 2, 4 bits; `out` as for [`pack`]). Returns the number of
/// codes packed. Multiply-adds of adjacent bytes (`vpmaddubsw`, `vpmaddwd`) by `1, 2^b`
/// merge neighbouring codes into one byte, and one-bit codes are gathered by `vpmovmskb`.
///
/// # Safety
/// The CPU must support AVX2; `out` must hold at least `packed_len(codes.len(), bits)` bytes.
#[cfg(target_arch = "x86_64")]
#[target_feature(enable = "avx2")]
unsafe fn pack_avx2(codes: &[u8], bits: u8, out: &mut [u8]) -> usize {
    use std::arch::x86_64::*;
    let chunks = codes.len() / 32;
    let b = bits as usize;
    assert!(matches!(b, 1 | 2 | 4) && out.len() >= chunks * 4 * b);
    let mask = _mm256_set1_epi8(((1u16 << b) - 1) as i8);
    // SAFETY (below): chunk i reads codes[32i .. 32i + 32] and writes out[4bi .. 4bi + 4b],
    // both in bounds for i < chunks by the assert above.
    for i in 0..chunks {
        let v = _mm256_and_si256(
            _mm256_loadu_si256(codes.as_ptr().add(32 * i) as *const __m256i),
            mask,
        );
        let dst = out.as_mut_ptr().add(4 * b * i);
        match b {
            1 => {
                let m = _mm256_movemask_epi8(_mm256_slli_epi16(v, 7)) as u32;
                std::ptr::copy_nonoverlapping(m.to_le_bytes().as_ptr(), dst, 4);
            }
            2 => {
                // c0 + 4c1 per 16 bits, then (c0 + 4c1) + 16(c2 + 4c3) per 32 bits.
                let pairs = _mm256_maddubs_epi16(v, _mm256_set1_epi16(0x0401));
                let quads = _mm256_madd_epi16(pairs, _mm256_set1_epi32(0x0010_0001));
                // Byte 0 of each dword to the front of its 128-bit half, then both halves' fronts together.
                let front = _mm256_shuffle_epi8(
                    quads,
                    _mm256_setr_epi8(
                        0, 4, 8, 12, -1, -1, -1, -1, -1, -1, -1, -1, -1, -1, -1, -1, 0, 4, 8, 12,
                        -1, -1, -1, -1, -1, -1, -1, -1, -1, -1, -1, -1,
                    ),
                );
                let joined =
                    _mm256_permutevar8x32_epi32(front, _mm256_setr_epi32(0, 4, 0, 0, 0, 0, 0, 0));
                _mm_storel_epi64(dst as *mut __m128i, _mm256_castsi256_si128(joined));
            }
            _ => {
                let pairs = _mm256_maddubs_epi16(v, _mm256_set1_epi16(0x1001));
                let bytes = _mm256_packus_epi16(pairs, pairs);
                let joined = _mm256_permute4x64_epi64(bytes, 0b1000);
                _mm_storeu_si128(dst as *mut __m128i, _mm256_castsi256_si128(joined));
            }
        }
    }
    chunks * 32
}

#[inline(always)]
fn block_word<const B: usize>(codes: &[u8]) -> u64 {
    let mask = (1u64 << B) - 1;
    codes
        .iter()
        .enumerate()
        .fold(0u64, |w, (k, &c)| w | ((c as u64 & mask) << (B * k)))
}

#[inline]
fn pack_const<const B: usize>(codes: &[u8], out: &mut [u8]) {
    // Split at the last whole block: the tail's bytes may themselves be `B` long.
    let full = codes.len() / 8;
    let (out_full, out_tail) = out.split_at_mut(full * B);
    let (codes_full, codes_tail) = codes.split_at(full * 8);
    for (c, o) in codes_full.chunks_exact(8).zip(out_full.chunks_exact_mut(B)) {
        o.copy_from_slice(&block_word::<B>(c).to_le_bytes()[..B]);
    }
    if !codes_tail.is_empty() {
        let w = block_word::<B>(codes_tail).to_le_bytes();
        out_tail.copy_from_slice(&w[..out_tail.len()]);
    }
}

#[inline]
fn unpack_const<const B: usize>(packed: &[u8], out: &mut [u8]) {
    let mask = (1u64 << B) - 1;
    let full = out.len() / 8;
    let (out_full, out_tail) = out.split_at_mut(full * 8);
    let (in_full, in_tail) = packed.split_at(full * B);
    for (p, o) in in_full.chunks_exact(B).zip(out_full.chunks_exact_mut(8)) {
        let mut bytes = [0u8; 8];
        bytes[..B].copy_from_slice(p);
        let w = u64::from_le_bytes(bytes);
        for (k, c) in o.iter_mut().enumerate() {
            *c = ((w >> (B * k)) & mask) as u8;
        }
    }
    if !out_tail.is_empty() {
        let mut bytes = [0u8; 8];
        bytes[..in_tail.len()].copy_from_slice(in_tail);
        let w = u64::from_le_bytes(bytes);
        for (k, c) in out_tail.iter_mut().enumerate() {
            *c = ((w >> (B * k)) & mask) as u8;
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;

    #[test]
    fn two_bit_layout_is_lsb_first() {
        let mut out = [0u8; 1];
        pack(&[1, 2, 3, 0], 2, &mut out);
        assert_eq!(out[0], 0b00_11_10_01);
    }

    #[test]
    fn three_bit_is_dense() {
        // 8 codes of 3 bits fill exactly 3 bytes; 9 codes need 4.
        assert_eq!(packed_len(8, 3), 3);
        assert_eq!(packed_len(9, 3), 4);
        let codes = [7u8, 0, 5, 2, 1, 6, 3, 4];
        let mut out = [0u8; 3];
        pack(&codes, 3, &mut out);
        let w = u32::from_le_bytes([out[0], out[1], out[2], 0]);
        for (k, &c) in codes.iter().enumerate() {
            assert_eq!(((w >> (3 * k)) & 7) as u8, c);
        }
    }

    #[test]
    fn bits_outside_range_are_refused() {
        assert!(check_bits(0).is_err());
        assert!(check_bits(9).is_err());
        assert!(check_bits(3).is_ok());
    }

    proptest! {
        #[test]
        fn round_trip_every_width(bits in 1u8..=8, raw in proptest::collection::vec(any::<u8>(), 0..300)) {
            let mask = ((1u16 << bits) - 1) as u8;
            let codes: Vec<u8> = raw.iter().map(|c| c & mask).collect();
            let mut packed = vec![0u8; packed_len(codes.len(), bits)];
            pack(&codes, bits, &mut packed);
            prop_assert_eq!(packed.len(), (codes.len() * bits as usize).div_ceil(8));
            let mut back = vec![0u8; codes.len()];
            unpack(&packed, bits, &mut back);
            prop_assert_eq!(back, codes);
        }

        #[test]
        fn simd_pack_matches_portable(bits in 1u8..=8, raw in proptest::collection::vec(any::<u8>(), 0..300)) {
            // Unmasked codes on purpose: both paths must ignore the high bits alike.
            let mut simd = vec![0u8; packed_len(raw.len(), bits)];
            pack(&raw, bits, &mut simd);
            let mut portable = vec![0u8; simd.len()];
            pack_portable(&raw, bits, &mut portable);
            prop_assert_eq!(simd, portable);
        }

        #[test]
        fn slices_of_eight_pack_independently(bits in 1u8..=8, blocks in 1usize..6, raw in proptest::collection::vec(any::<u8>(), 96)) {
            // Packing two aligned halves separately equals packing the whole: this is what
            // lets the quantizers pack rows in parallel.
            let mask = ((1u16 << bits) - 1) as u8;
            let codes: Vec<u8> = raw.iter().map(|c| c & mask).collect();
            let split = 8 * blocks;
            let mut whole = vec![0u8; packed_len(96, bits)];
            pack(&codes, bits, &mut whole);
            let (a, b) = whole.split_at(packed_len(split, bits));
            let mut pa = vec![0u8; a.len()];
            let mut pb = vec![0u8; b.len()];
            pack(&codes[..split], bits, &mut pa);
            pack(&codes[split..], bits, &mut pb);
            prop_assert_eq!(pa.as_slice(), a);
            prop_assert_eq!(pb.as_slice(), b);
        }
    }
}
