//! Reconstruction of a whole [`QuantizedTensor`]: the tensor is cut into runs of at most
//! [`TOKENS_PER_UNIT`] tokens of one row, and each run is decoded by the fastest kernel the
//! CPU has (see [`super::decode`]), in parallel for large tensors.

use super::decode::{decode_codes, decode_packed_fastest, Params, Slab};
use super::packing::packed_len;
use super::tensor::{split_mut, units, Grouping, QuantizedTensor, Unit, TOKENS_PER_UNIT};
use crate::element::Element;
use crate::error::{KvmixError, Result};
use crate::isa::Isa;
use crate::parallel;
use rayon::prelude::*;

/// Outputs of at least this many bytes are written with streaming stores, which bypass the
/// caches (see [`QuantizedTensor::dequantize_into`]).
pub const STREAM_MIN_BYTES: usize = 32 << 20;

/// What every unit of one reconstruction shares.
struct Job<'a> {
    /// All codes unpacked, when rows do not pack to whole bytes.
    all_codes: Option<&'a [u8]>,
    /// The instruction set the CPU supports.
    isa: Isa,
    /// Whether to write with streaming stores.
    stream: bool,
}

/// A unit's parameters as `f32`, reused from unit to unit by one worker.
#[derive(Default)]
struct UnitParams {
    scale: Vec<f32>,
    offset: Vec<f32>,
    factor: Vec<f32>,
}

impl QuantizedTensor {
    /// Reconstruct the tensor into `out` (row-major over `dims`), e.g. a buffer reused from
    /// step to step.
    ///
    /// An output of [`STREAM_MIN_BYTES`] or more is written with streaming stores where the
    /// CPU has them (AVX-512): such a buffer has left the caches by the time it is reused, and
    /// ordinary stores would first read every line of it from memory, only to overwrite it.
    /// That made writing 64 MiB after other work cost twice as much as writing it while it
    /// was still cached; streaming stores cost the same either way, about 20% more than the
    /// cached case. Below the threshold the output may well still be cached, for the caller
    /// to read next, so it stays there.
    pub fn dequantize_into<T: Element>(&self, out: &mut [T]) -> Result<()> {
        let stream = std::mem::size_of_val(out) >= STREAM_MIN_BYTES;
        self.reconstruct(out, stream)
    }

    /// [`Self::dequantize_into`] for an output freshly allocated (zeroed by the OS) just
    /// before the call, which is always written with ordinary stores: the OS zeroes each page
    /// when it is first touched, which leaves the page in cache, and a streaming store to a
    /// cached line must evict it first (five times slower than an ordinary one).
    pub fn dequantize_into_fresh<T: Element>(&self, out: &mut [T]) -> Result<()> {
        self.reconstruct(out, false)
    }

    fn reconstruct<T: Element>(&self, out: &mut [T], stream: bool) -> Result<()> {
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
        let aligned = (d * bits as usize).is_multiple_of(8);
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
        let job = Job {
            all_codes: all_codes.as_deref(),
            isa: crate::isa::best(),
            stream,
        };
        let one = |params: &mut UnitParams, (u, dst): (Unit, &mut [T])| {
            self.dequantize_unit_best(&job, &u, params, dst)
        };
        parallel::run(geo.len(), |par| {
            if par {
                work.into_par_iter().for_each_init(UnitParams::default, one);
            } else {
                let mut params = UnitParams::default();
                work.into_iter().for_each(|item| one(&mut params, item));
            }
        });
        Ok(())
    }

    /// Unpack and decode one unit into `dst`, with the SIMD kernels `job.isa` allows (the
    /// CPU supports it; when it is not [`Isa::Portable`], the caller is compiled for AVX2).
    #[inline(always)]
    fn dequantize_unit<T: Element>(
        &self,
        job: &Job<'_>,
        u: &Unit,
        params: &mut UnitParams,
        dst: &mut [T],
    ) {
        let geo = self.geometry();
        let d = geo.channels;
        let bits = self.spec.bits;
        let first = (u.row * geo.tokens + u.token_start) * d;
        if let Some(cs) = &self.channel_scale {
            cs.to_f32_range_into(u.row * d, d, &mut params.factor);
        }
        let n_params = match self.spec.grouping {
            Grouping::TokenGroups { group_size } => {
                (u.token_end - u.token_start) * (d / group_size)
            }
            Grouping::ChannelBlocks { .. } => d,
        };
        self.scale
            .to_f32_range_into(u.param_start, n_params, &mut params.scale);
        self.offset
            .to_f32_range_into(u.param_start, n_params, &mut params.offset);
        let (scale, offset) = (params.scale.as_slice(), params.offset.as_slice());
        let slab = Slab {
            params: match self.spec.grouping {
                Grouping::TokenGroups { group_size } => Params::Groups {
                    scale,
                    offset,
                    group_size,
                },
                Grouping::ChannelBlocks { .. } => Params::Channels { scale, offset },
            },
            factor: self
                .channel_scale
                .as_ref()
                .map(|_| params.factor.as_slice()),
            channels: d,
        };
        let m = dst.len();
        match job.all_codes {
            Some(all) => decode_codes(&all[first..first + m], slab, dst),
            None => {
                let start = first * bits as usize / 8;
                let packed = &self.codes[start..start + packed_len(m, bits)];
                // SAFETY: the caller guarantees that the CPU supports `job.isa`.
                unsafe { decode_packed_fastest(packed, bits, slab, job.isa, job.stream, dst) };
            }
        }
    }

    /// [`Self::dequantize_unit`] compiled for AVX2+FMA+F16C, so that the portable fallbacks
    /// vectorize too.
    #[cfg(target_arch = "x86_64")]
    #[target_feature(enable = "avx2,fma,f16c")]
    unsafe fn dequantize_unit_avx2<T: Element>(
        &self,
        job: &Job<'_>,
        u: &Unit,
        params: &mut UnitParams,
        dst: &mut [T],
    ) {
        self.dequantize_unit(job, u, params, dst)
    }

    /// [`Self::dequantize_unit`] for `job.isa`, which must be what [`crate::isa::best`] returned.
    fn dequantize_unit_best<T: Element>(
        &self,
        job: &Job<'_>,
        u: &Unit,
        params: &mut UnitParams,
        dst: &mut [T],
    ) {
        #[cfg(target_arch = "x86_64")]
        if job.isa >= Isa::Avx2 {
            // SAFETY: `job.isa` came from `isa::best`, which confirmed every feature the
            // function is compiled for.
            return unsafe { self.dequantize_unit_avx2(job, u, params, dst) };
        }
        self.dequantize_unit(job, u, params, dst)
    }

    /// Reconstruct the tensor as a new vector.
    pub fn dequantize<T: Element>(&self) -> Vec<T> {
        let mut out = vec![T::from_f32(0.0); self.geometry().len()];
        // Lengths match by construction.
        let _ = self.dequantize_into_fresh(&mut out);
        out
    }
}
