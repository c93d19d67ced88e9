//! Reconstruction of a whole [`QuantizedTensor`]: the tensor is cut into runs of at most
//! [`TOKENS_PER_UNIT`] tokens of one row, each decoded straight from the packed codes (see
//! [`super::decode`]), in parallel for large tensors.

#[cfg(target_arch = "x86_64")]
use super::decode::avx2;
use super::decode::{decode_codes, decode_packed, Params, Slab};
use super::packing::packed_len;
use super::tensor::{for_each, split_mut, units, Grouping, QuantizedTensor, Unit, TOKENS_PER_UNIT};
use crate::element::Element;
use crate::error::{KvmixError, Result};
use crate::parallel;

impl QuantizedTensor {
    /// Reconstruct the tensor into `out` (row-major over `dims`).
    pub fn dequantize_into<T: Element>(&self, out: &mut [T]) -> Result<()> {
        let geo = self.geometry();
        if out.len() != geo.len() {
            return Err(KvmixError::Shape(format!(
                "output length {} does not match shape {:?}",
                out.len(),
                self.dims
            )));
        }
        let d = geo.channels;
        let bits = self.spec.bits;
        let aligned = (d * bits as usize) % 8 == 0;
        let all_codes = if aligned {
            None
        } else {
            Some(self.unpacked_codes())
        };
        // A channel block's parameters hold for every token of the block, so decoding splits
        // blocks into pieces of TOKENS_PER_UNIT tokens: a whole-tensor block gave each thread
        // a few megabytes to write, and one descheduled thread held up the call.
        let units: Vec<Unit> = units(geo, self.spec.grouping)
            .into_iter()
            .flat_map(|u| {
                (u.token_start..u.token_end)
                    .step_by(TOKENS_PER_UNIT)
                    .map(move |t| Unit {
                        token_start: t,
                        token_end: (t + TOKENS_PER_UNIT).min(u.token_end),
                        ..u
                    })
            })
            .collect();
        let parts = split_mut(out, units.iter().map(|u| (u.token_end - u.token_start) * d));
        let work: Vec<_> = units.into_iter().zip(parts).collect();
        parallel::run(geo.len(), |par| {
            for_each(work, par, |(u, dst)| {
                self.dequantize_unit_best(&u, all_codes.as_deref(), dst)
            })
        });
        Ok(())
    }

    /// Unpack and decode one unit into `dst`; `simd` says the CPU has AVX2 (the caller is
    /// compiled for it) and the fused kernel may run.
    #[inline(always)]
    fn dequantize_unit<T: Element>(
        &self,
        u: &Unit,
        all_codes: Option<&[u8]>,
        dst: &mut [T],
        simd: bool,
    ) {
        let geo = self.geometry();
        let d = geo.channels;
        let bits = self.spec.bits;
        let first = (u.row * geo.tokens + u.token_start) * d;
        let factor: Option<Vec<f32>> = self
            .channel_scale
            .as_ref()
            .map(|cs| cs.to_f32_range(u.row * d, d));
        let n_params = match self.spec.grouping {
            Grouping::TokenGroups { group_size } => {
                (u.token_end - u.token_start) * (d / group_size)
            }
            Grouping::ChannelBlocks { .. } => d,
        };
        let scale = self.scale.to_f32_range(u.param_start, n_params);
        let offset = self.offset.to_f32_range(u.param_start, n_params);
        let slab = Slab {
            params: match self.spec.grouping {
                Grouping::TokenGroups { group_size } => Params::Groups {
                    scale: &scale,
                    offset: &offset,
                    group_size,
                },
                Grouping::ChannelBlocks { .. } => Params::Channels {
                    scale: &scale,
                    offset: &offset,
                },
            },
            factor: factor.as_deref(),
            channels: d,
        };
        let m = dst.len();
        match all_codes {
            Some(all) => decode_codes(&all[first..first + m], slab, dst),
            None => {
                let start = first * bits as usize / 8;
                let packed = &self.codes[start..start + packed_len(m, bits)];
                #[cfg(target_arch = "x86_64")]
                if simd && avx2::fits(&slab) {
                    // SAFETY: `simd` is only set by `dequantize_unit_avx2`, whose caller
                    // checked the CPU features; the unit's lengths are consistent.
                    unsafe { avx2::decode_packed(packed, bits, slab, dst) };
                    return;
                }
                let _ = simd;
                decode_packed(packed, bits, slab, &mut Vec::new(), dst);
            }
        }
    }

    /// [`Self::dequantize_unit`] compiled for AVX2+FMA+F16C, with the fused kernel.
    #[cfg(target_arch = "x86_64")]
    #[target_feature(enable = "avx2,fma,f16c")]
    unsafe fn dequantize_unit_avx2<T: Element>(&self, u: &Unit, all: Option<&[u8]>, dst: &mut [T]) {
        self.dequantize_unit(u, all, dst, true)
    }

    fn dequantize_unit_best<T: Element>(&self, u: &Unit, all: Option<&[u8]>, dst: &mut [T]) {
        #[cfg(target_arch = "x86_64")]
        if parallel::has_avx2() {
            // SAFETY: `has_avx2` confirmed every feature the function is compiled for.
            return unsafe { self.dequantize_unit_avx2(u, all, dst) };
        }
        self.dequantize_unit(u, all, dst, false)
    }

    /// Reconstruct the tensor as a new vector.
    pub fn dequantize<T: Element>(&self) -> Vec<T> {
        let mut out = vec![T::from_f32(0.0); self.geometry().len()];
        // Lengths match by construction.
        let _ = self.dequantize_into(&mut out);
        out
    }
}
