//! The AVX-512 decoder: sixteen codes (`2·bits` bytes) per step, one full cache line of fp32
//! output per store.
//!
//! The `2·bits` bytes are broadcast to the four 128-bit lanes, and a byte shuffle plus a
//! per-lane shift bring code `k` to the low bits of 32-bit lane `k`, as in the AVX2 decoder.
//! Up to 4 bits no mask or integer conversion follows: `vpermps` reads only the low four bits
//! of each index, so a 16-entry table whose entry `i` is the value of code `i mod 2^bits`
//! maps the shifted lanes straight to floats. In token groups the table holds the decoded
//! values `scale·i + offset` themselves, built once per group with the same multiply and add
//! (so the same roundings) as the portable path; per channel it holds the codes as floats.
//! That halves the vector instructions per element against converting and scaling every
//! lane, which matters because only two ports execute 512-bit arithmetic.

use super::{Params, Slab};
use crate::element::Element;
use std::arch::x86_64::*;

/// Whether [`decode_packed`] handles `slab`: rows of whole steps of sixteen codes, and
/// groups that do not split a step.
#[inline(always)]
pub(crate) fn fits(slab: &Slab<'_>) -> bool {
    slab.channels.is_multiple_of(16)
        && match slab.params {
            Params::Groups { group_size, .. } => group_size % 16 == 0,
            Params::Channels { .. } => true,
        }
}

/// [`super::decode_packed`] fused in AVX-512 registers; same results, bit for bit.
///
/// # Safety
/// The CPU must support AVX-512 F/BW/VL, AVX2, FMA and F16C. Panics (safely) unless `dst`
/// holds whole rows, `packed` exactly their codes, the parameters and factors cover them,
/// and [`fits`] holds.
#[target_feature(enable = "avx512f,avx512bw,avx512vl,avx2,fma,f16c")]
pub(crate) unsafe fn decode_packed<T: Element>(
    packed: &[u8],
    bits: u8,
    slab: Slab<'_>,
    stream: bool,
    dst: &mut [T],
) {
    macro_rules! width {
        ($b:literal) => {
            match slab.factor {
                Some(_) => decode_width::<T, $b, true>(packed, slab, stream, dst),
                None => decode_width::<T, $b, false>(packed, slab, stream, dst),
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
        _ => panic!("avx512::decode_packed: bits must be 1..=8, got {bits}"),
    }
}

#[target_feature(enable = "avx512f,avx512bw,avx512vl,avx2,fma,f16c")]
#[inline]
unsafe fn decode_width<T: Element, const B: usize, const FACTOR: bool>(
    packed: &[u8],
    slab: Slab<'_>,
    stream: bool,
    dst: &mut [T],
) {
    let n = dst.len();
    let d = slab.channels;
    assert!(fits(&slab) && n.is_multiple_of(d) && packed.len() == n / 8 * B);
    let rows = n / d;
    let factor = slab.factor.unwrap_or(&[]);
    assert!(!FACTOR || factor.len() >= d);
    // Lane k takes the bytes holding bits [k·B, k·B + B) of the step: at most two, and never
    // past its last byte (code 15 ends exactly there). `vpshufb` indexes each 128-bit lane
    // on its own, and the step's bytes (at most 16) are broadcast to all four.
    let mut shuffle = [0x80u8; 64];
    let mut shift = [0i32; 16];
    let mut code_values = [0f32; 16];
    for k in 0..16 {
        let (byte, bit) = (k * B / 8, (k * B) % 8);
        let lane = 16 * (k / 4) + 4 * (k % 4);
        shuffle[lane] = byte as u8;
        if bit + B > 8 {
            shuffle[lane + 1] = byte as u8 + 1;
        }
        shift[k] = bit as i32;
        code_values[k] = (k % (1 << B)) as f32;
    }
    // SAFETY (the intrinsics and unchecked accesses below): the caller guarantees the CPU
    // features. Step j (< n/16) reads `packed[2B·j .. 2B·j + 2B]` (16 bytes only where they
    // are in bounds, else through a copy), in bounds by the length assert; parameter loads
    // stay below the lengths asserted in each arm, factor loads below `d`, stores below `n`.
    let shuffle = _mm512_loadu_si512(shuffle.as_ptr() as *const _);
    let shift = _mm512_loadu_si512(shift.as_ptr() as *const _);
    let mask = _mm512_set1_epi32((1i32 << B) - 1);
    let code_values = _mm512_loadu_ps(code_values.as_ptr());
    let src = packed.as_ptr();
    let step_bytes = 2 * B;
    // Steps before this one can load 16 bytes without reading past `packed`.
    let wide_steps = (packed.len() + step_bytes).saturating_sub(16) / step_bytes;
    // The step's codes, each in the low bits of its lane (higher bits hold the next codes).
    let shifted = |j: usize| -> __m512i {
        let bytes = if j < wide_steps {
            _mm_loadu_si128(src.add(j * step_bytes) as *const __m128i)
        } else {
            let mut word = [0u8; 16];
            std::ptr::copy_nonoverlapping(src.add(j * step_bytes), word.as_mut_ptr(), step_bytes);
            _mm_loadu_si128(word.as_ptr() as *const __m128i)
        };
        let v = _mm512_shuffle_epi8(_mm512_broadcast_i32x4(bytes), shuffle);
        _mm512_srlv_epi32(v, shift)
    };
    // The codes as floats: a table lookup up to 4 bits (see the module comment).
    let codes = |j: usize| -> __m512 {
        if B <= 4 {
            _mm512_permutexvar_ps(shifted(j), code_values)
        } else {
            _mm512_cvtepi32_ps(_mm512_and_si512(shifted(j), mask))
        }
    };
    let fp = factor.as_ptr();
    let mut lines = LineWriter::new(T::as_f32_slice_mut(dst), stream);
    let out = dst.as_mut_ptr();
    // Step j of the slab holds channels 16c .. 16c + 16 of its row, c = j mod (d/16).
    let mut emit = |j: usize, c: usize, v: __m512| {
        let v = if FACTOR {
            _mm512_mul_ps(v, _mm512_loadu_ps(fp.add(16 * c)))
        } else {
            v
        };
        if let Some(lines) = lines.as_mut() {
            lines.put(j, v);
        } else {
            let lanes: [f32; 16] = std::mem::transmute(v);
            for (k, x) in lanes.into_iter().enumerate() {
                *out.add(16 * j + k) = T::from_f32(x);
            }
        }
    };
    let row_steps = d / 16;
    match slab.params {
        Params::Groups {
            scale,
            offset,
            group_size,
        } => {
            assert!(scale.len() >= n / group_size && offset.len() >= n / group_size);
            let (group_steps, row_groups) = (group_size / 16, d / group_size);
            for r in 0..rows {
                for gi in 0..row_groups {
                    let g = r * row_groups + gi;
                    let s = _mm512_set1_ps(*scale.get_unchecked(g));
                    let o = _mm512_set1_ps(*offset.get_unchecked(g));
                    let steps = gi * group_steps..(gi + 1) * group_steps;
                    if B <= 4 {
                        let table = _mm512_add_ps(_mm512_mul_ps(code_values, s), o);
                        for c in steps {
                            let j = r * row_steps + c;
                            emit(j, c, _mm512_permutexvar_ps(shifted(j), table));
                        }
                    } else {
                        for c in steps {
                            let j = r * row_steps + c;
                            emit(j, c, _mm512_add_ps(_mm512_mul_ps(codes(j), s), o));
                        }
                    }
                }
            }
        }
        Params::Channels { scale, offset } => {
            assert!(scale.len() >= d && offset.len() >= d);
            for r in 0..rows {
                for c in 0..row_steps {
                    let s = _mm512_loadu_ps(scale.as_ptr().add(16 * c));
                    let o = _mm512_loadu_ps(offset.as_ptr().add(16 * c));
                    let j = r * row_steps + c;
                    emit(j, c, _mm512_add_ps(_mm512_mul_ps(codes(j), s), o));
                }
            }
        }
    }
    if let Some(lines) = lines.as_mut() {
        lines.finish(n / 16);
    }
}

/// Writes a slab's decoded vectors to fp32 output, in order, one whole cache line per store.
///
/// Numpy places large arrays 16 bytes past a page boundary, so a 64-byte store of each vector
/// where it belongs would straddle two lines every time, which cost 20% against aligned
/// stores. When the output starts `lag` floats past a line, the line that vector j's tail
/// shares with vector j+1's head is stored whole (`vpermt2ps` joins them), and masked stores
/// write the partial first and last lines.
///
/// With `stream` the whole lines bypass the caches (`vmovntps`): the output is not read for
/// the ownership of each line first, which makes large outputs that are not in cache about
/// a quarter cheaper to write, and does not evict the caller's working set.
struct LineWriter {
    out: *mut f32,
    /// Floats from the line boundary before `out` to `out` (0..16).
    lag: usize,
    /// Vector j, kept until vector j+1 completes the line they share.
    prev: __m512,
    /// `vpermt2ps` indices joining the last `lag` floats of one vector to the first of the next.
    join: __m512i,
    stream: bool,
}

impl LineWriter {
    /// A writer for `out`, or `None` when the output is not fp32 (or not 4-byte aligned).
    #[target_feature(enable = "avx512f,avx512bw,avx512vl,avx2,fma,f16c")]
    #[inline]
    fn new(out: Option<&mut [f32]>, stream: bool) -> Option<Self> {
        let out = out?.as_mut_ptr();
        if !(out as usize).is_multiple_of(4) {
            return None;
        }
        let lag = (out as usize % 64) / 4;
        let mut join = [0i32; 16];
        for (k, idx) in join.iter_mut().enumerate() {
            *idx = (16 - lag + k) as i32;
        }
        Some(LineWriter {
            out,
            lag,
            prev: _mm512_setzero_ps(),
            // SAFETY: reads 64 bytes from a 16-element i32 array.
            join: unsafe { _mm512_loadu_si512(join.as_ptr() as *const _) },
            stream,
        })
    }

    /// Store vector `j` (floats 16j .. 16j + 16 of the output), after vectors 0 .. j.
    ///
    /// # Safety
    /// The output holds at least 16(j + 1) floats.
    #[target_feature(enable = "avx512f,avx512bw,avx512vl,avx2,fma,f16c")]
    #[inline]
    unsafe fn put(&mut self, j: usize, v: __m512) {
        // SAFETY: every store stays within floats 0 .. 16(j + 1) of the output; the line
        // stores are 64-byte aligned by the choice of `lag`.
        unsafe {
            if self.lag == 0 {
                self.store_line(self.out.add(16 * j), v);
            } else if j == 0 {
                _mm512_mask_storeu_ps(self.out, ((1u32 << (16 - self.lag)) - 1) as u16, v);
            } else {
                let line = _mm512_permutex2var_ps(self.prev, self.join, v);
                self.store_line(self.out.add(16 * j - self.lag), line);
            }
        }
        self.prev = v;
    }

    /// Store what remains after the last vector, `steps - 1`.
    ///
    /// # Safety
    /// The output holds exactly `16 · steps` floats, all put.
    #[target_feature(enable = "avx512f,avx512bw,avx512vl,avx2,fma,f16c")]
    #[inline]
    unsafe fn finish(&mut self, steps: usize) {
        // SAFETY: the last `lag` floats of the output, from a line boundary.
        unsafe {
            if self.lag != 0 && steps > 0 {
                let tail = _mm512_permutexvar_ps(self.join, self.prev);
                let at = self.out.add(16 * steps - self.lag);
                _mm512_mask_storeu_ps(at, ((1u32 << self.lag) - 1) as u16, tail);
            }
            if self.stream {
                // Streaming stores are weakly ordered: make them visible before the caller
                // signals completion to other threads.
                _mm_sfence();
            }
        }
    }

    #[target_feature(enable = "avx512f,avx512bw,avx512vl,avx2,fma,f16c")]
    #[inline]
    unsafe fn store_line(&self, at: *mut f32, v: __m512) {
        // SAFETY: the caller passes a 64-byte aligned address with 16 floats of output.
        unsafe {
            if self.stream {
                _mm512_stream_ps(at, v);
            } else {
                _mm512_store_ps(at, v);
            }
        }
    }
}
