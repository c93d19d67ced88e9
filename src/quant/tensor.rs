//! Quantization of a whole `[..., tokens, channels]` tensor at one of two granularities,
//! with an optional per-channel normalization. Every leading index (sequence, head) gets its
//! own statistics: nothing is ever shared across the batch.
//!
//! * [`Grouping::TokenGroups`] — each token's channels split into groups of `group_size`
//!   (MiKV: `head_dim/2`; ZipCache values: `head_dim`, one group per token).
//! * [`Grouping::ChannelBlocks`] — each channel over blocks of `token_block` consecutive
//!   tokens (KIVI keys: a block per residual window; ZipCache keys: one block = all tokens).
//! * `channel_scale` `f` (shape `[..., channels]`): the tensor is quantized as `x / f` and
//!   reconstructed as `f · x̂`. ZipCache's channel-separable values use `f = sqrt(max|x_c|)`;
//!   MiKV's key balancer uses `f = 1 / b_c` (keys stored as `k·b`, see [`super::channel`]).
//!
//! Codes are packed densely in row-major order, so when a token row holds a whole number of
//! bytes (`channels · bits` divisible by 8, true for every real head_dim) rows are packed in
//! parallel; otherwise the packing runs once over the whole tensor.

use super::affine::{min_max_finite, Affine, ParamDtype, ParamVec};
use super::clip::{self, Clip};
use super::packing::{check_bits, pack, packed_len, unpack};
use crate::element::Element;
use crate::error::{KvmixError, Result};
use crate::parallel;
use rayon::prelude::*;

/// How values share quantization parameters.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub enum Grouping {
    /// Groups of `group_size` consecutive channels within one token.
    TokenGroups { group_size: usize },
    /// One channel over `token_block` consecutive tokens (the last block may be shorter).
    ChannelBlocks { token_block: usize },
}

/// A complete description of a quantizer.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub struct QuantSpec {
    pub bits: u8,
    pub grouping: Grouping,
    pub param_dtype: ParamDtype,
    /// How each group's range is chosen ([`Clip::MinMax`]: the papers' quantizers).
    pub clip: Clip,
}

impl QuantSpec {
    /// Check the spec against a tensor with `channels` channels.
    pub fn validate(&self, channels: usize) -> Result<()> {
        check_bits(self.bits)?;
        match self.grouping {
            Grouping::TokenGroups { group_size } => {
                if group_size == 0 || !channels.is_multiple_of(group_size) {
                    return Err(KvmixError::Config(format!(
                        "`group_size` must be a positive divisor of the channel dimension \
                         ({channels}), got {group_size}"
                    )));
                }
            }
            Grouping::ChannelBlocks { token_block } => {
                if token_block == 0 {
                    return Err(KvmixError::Config(
                        "`token_block` must be positive (or None for all tokens), got 0".into(),
                    ));
                }
            }
        }
        Ok(())
    }
}

/// The geometry of a `[..., tokens, channels]` tensor: `rows` is the product of the leading
/// dimensions (one statistics domain each).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Geometry {
    pub rows: usize,
    pub tokens: usize,
    pub channels: usize,
}

impl Geometry {
    pub fn from_dims(dims: &[usize]) -> Result<Self> {
        if dims.len() < 2 {
            return Err(KvmixError::Shape(format!(
                "expected an array of shape [..., tokens, channels] (rank >= 2), got shape {dims:?}"
            )));
        }
        let channels = dims[dims.len() - 1];
        let tokens = dims[dims.len() - 2];
        let rows = dims[..dims.len() - 2].iter().product();
        if channels == 0 {
            return Err(KvmixError::Shape(format!(
                "the channel (last) dimension must be non-empty, got shape {dims:?}"
            )));
        }
        Ok(Geometry {
            rows,
            tokens,
            channels,
        })
    }

    pub fn len(&self) -> usize {
        self.rows * self.tokens * self.channels
    }

    pub fn is_empty(&self) -> bool {
        self.len() == 0
    }
}

/// A quantized tensor: packed codes plus every parameter needed to reconstruct it.
#[derive(Clone, Debug, PartialEq)]
pub struct QuantizedTensor {
    /// Shape of the original tensor, `[..., tokens, channels]`.
    pub dims: Vec<usize>,
    pub spec: QuantSpec,
    /// Packed codes, row-major over `dims`.
    pub codes: Vec<u8>,
    /// Per-group scale. TokenGroups: `[rows, tokens, channels/group]`;
    /// ChannelBlocks: `[rows, ceil(tokens/block), channels]`.
    pub scale: ParamVec,
    /// Per-group offset, same layout as `scale`.
    pub offset: ParamVec,
    /// Per-(row, channel) reconstruction factor `[rows, channels]`, if any.
    pub channel_scale: Option<ParamVec>,
}

/// Bytes held by a quantized tensor, by component.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct ByteCount {
    pub codes: usize,
    pub scale: usize,
    pub offset: usize,
    pub channel_scale: usize,
}

impl ByteCount {
    pub fn total(&self) -> usize {
        self.codes + self.scale + self.offset + self.channel_scale
    }
}

/// Work is split into units that own a contiguous run of tokens of one row: a token group
/// unit is a run of tokens, a channel block unit is one block.
#[derive(Clone, Copy, Debug)]
pub(super) struct Unit {
    pub row: usize,
    pub token_start: usize,
    pub token_end: usize,
    /// Index of the unit's first parameter in `scale`/`offset`.
    pub param_start: usize,
}

/// Tokens per token-group unit: enough work to amortize scheduling, small enough to stay in cache.
pub(super) const TOKENS_PER_UNIT: usize = 64;

pub(super) fn units(geo: Geometry, grouping: Grouping) -> Vec<Unit> {
    let mut out = Vec::new();
    let (step, params_per_unit_token) = match grouping {
        Grouping::TokenGroups { group_size } => (TOKENS_PER_UNIT, geo.channels / group_size),
        Grouping::ChannelBlocks { token_block } => (token_block, 0),
    };
    let mut param_start = 0;
    for row in 0..geo.rows {
        let mut t = 0;
        while t < geo.tokens {
            let end = (t + step).min(geo.tokens);
            out.push(Unit {
                row,
                token_start: t,
                token_end: end,
                param_start,
            });
            param_start += match grouping {
                Grouping::TokenGroups { .. } => (end - t) * params_per_unit_token,
                Grouping::ChannelBlocks { .. } => geo.channels,
            };
            t = end;
        }
    }
    out
}

fn param_count(geo: Geometry, grouping: Grouping) -> usize {
    match grouping {
        Grouping::TokenGroups { group_size } => geo.rows * geo.tokens * (geo.channels / group_size),
        Grouping::ChannelBlocks { token_block } => {
            geo.rows * geo.tokens.div_ceil(token_block) * geo.channels
        }
    }
}

/// Split `buf` into consecutive mutable pieces of the given lengths.
pub(super) fn split_mut<T>(mut buf: &mut [T], lens: impl Iterator<Item = usize>) -> Vec<&mut [T]> {
    let mut out = Vec::new();
    for n in lens {
        let (head, tail) = std::mem::take(&mut buf).split_at_mut(n);
        out.push(head);
        buf = tail;
    }
    out
}

/// Run `f` on every item, in parallel when `parallel` is set.
fn for_each<I: Send>(items: Vec<I>, parallel: bool, f: impl Fn(I) + Sync + Send) {
    if parallel {
        items.into_par_iter().for_each(f);
    } else {
        items.into_iter().for_each(f);
    }
}

fn check_channel_scale(
    cs: Option<&[f32]>,
    geo: Geometry,
    dtype: ParamDtype,
) -> Result<Option<Vec<f32>>> {
    let Some(cs) = cs else { return Ok(None) };
    if cs.len() != geo.rows * geo.channels {
        return Err(KvmixError::Shape(format!(
            "`channel_scale` must hold one factor per (leading index, channel): expected {} \
             values ({} x {}), got {}",
            geo.rows * geo.channels,
            geo.rows,
            geo.channels,
            cs.len()
        )));
    }
    let rounded: Vec<f32> = cs.iter().map(|&f| dtype.round(f)).collect();
    if rounded.iter().any(|f| !f.is_finite() || *f <= 0.0) {
        return Err(KvmixError::NonFinite(format!(
            "`channel_scale` factors must be finite and positive in {}",
            dtype.name()
        )));
    }
    Ok(Some(rounded))
}

#[inline(always)]
/// Load tokens `[t0, t1)` of `row` as `f32`, divided by the channel factors, into `buf`.
fn load_normalized<T: Element>(
    x: &[T],
    geo: Geometry,
    row: usize,
    t0: usize,
    t1: usize,
    cs: Option<&[f32]>,
    buf: &mut Vec<f32>,
) {
    let d = geo.channels;
    let src = &x[(row * geo.tokens + t0) * d..(row * geo.tokens + t1) * d];
    buf.clear();
    match cs {
        None => buf.extend(src.iter().map(|v| v.to_f32())),
        Some(cs) => {
            let f = &cs[row * d..(row + 1) * d];
            for tok in src.chunks_exact(d) {
                buf.extend(tok.iter().zip(f).map(|(v, s)| v.to_f32() / s));
            }
        }
    }
}

fn non_finite_error() -> KvmixError {
    KvmixError::NonFinite(
        "input contains NaN or Inf; kvmix refuses non-finite keys/values rather than \
         quantizing them silently"
            .into(),
    )
}

/// What every unit of one `quantize` call shares.
struct QuantizeJob<'a, T> {
    x: &'a [T],
    geo: Geometry,
    cs: Option<&'a [f32]>,
    spec: QuantSpec,
    /// Whether token rows pack to whole bytes (then each unit packs its own codes).
    aligned: bool,
}

/// Quantize one unit of work into its slices of the outputs.
#[inline(always)]
fn quantize_unit<T: Element>(
    job: &QuantizeJob<'_, T>,
    u: Unit,
    code_out: &mut [u8],
    scale_out: &mut [f32],
    offset_out: &mut [f32],
    simd: bool,
) -> Result<()> {
    let d = job.geo.channels;
    let first = (u.row * job.geo.tokens + u.token_start) * d;
    let last = (u.row * job.geo.tokens + u.token_end) * d;
    // fp32 input without channel factors is read in place: copying it first cost a tenth of
    // the quantization time.
    let mut buf = Vec::new();
    let vals = match (T::as_f32_slice(&job.x[first..last]), job.cs) {
        (Some(v), None) => v,
        _ => {
            load_normalized(
                job.x,
                job.geo,
                u.row,
                u.token_start,
                u.token_end,
                job.cs,
                &mut buf,
            );
            &buf
        }
    };
    let mut unit_codes = vec![0u8; vals.len()];
    encode_unit(
        vals,
        job.geo.channels,
        job.spec,
        &mut unit_codes,
        scale_out,
        offset_out,
        simd,
    )?;
    if job.aligned {
        pack(&unit_codes, job.spec.bits, code_out);
    } else {
        code_out.copy_from_slice(&unit_codes);
    }
    Ok(())
}

/// [`quantize_unit`] compiled for AVX2+FMA+F16C.
#[cfg(target_arch = "x86_64")]
#[target_feature(enable = "avx2,fma,f16c")]
unsafe fn quantize_unit_avx2<T: Element>(
    job: &QuantizeJob<'_, T>,
    u: Unit,
    code_out: &mut [u8],
    scale_out: &mut [f32],
    offset_out: &mut [f32],
) -> Result<()> {
    quantize_unit(job, u, code_out, scale_out, offset_out, true)
}

/// [`quantize_unit`] for the best instruction set the CPU has. Both builds compute the same
/// codes: Rust never fuses `a * b + c` on its own.
fn quantize_unit_best<T: Element>(
    job: &QuantizeJob<'_, T>,
    u: Unit,
    code_out: &mut [u8],
    scale_out: &mut [f32],
    offset_out: &mut [f32],
) -> Result<()> {
    #[cfg(target_arch = "x86_64")]
    if parallel::has_avx2() {
        // SAFETY: `has_avx2` confirmed every feature the function is compiled for.
        return unsafe { quantize_unit_avx2(job, u, code_out, scale_out, offset_out) };
    }
    quantize_unit(job, u, code_out, scale_out, offset_out, false)
}

/// Quantize `x` (row-major, shape `dims`) with `spec`. `channel_scale`, if given, has shape
/// `[..., channels]` (the leading dims of `x`) and is rounded to the parameter dtype.
pub fn quantize<T: Element>(
    x: &[T],
    dims: &[usize],
    spec: QuantSpec,
    channel_scale: Option<&[f32]>,
) -> Result<QuantizedTensor> {
    let geo = Geometry::from_dims(dims)?;
    if x.len() != geo.len() {
        return Err(KvmixError::Shape(format!(
            "data length {} does not match shape {dims:?}",
            x.len()
        )));
    }
    spec.validate(geo.channels)?;
    let cs = check_channel_scale(channel_scale, geo, spec.param_dtype)?;
    let n = geo.len();
    let d = geo.channels;
    let bits = spec.bits;
    let units = units(geo, spec.grouping);
    let n_params = param_count(geo, spec.grouping);
    let mut scale = vec![0f32; n_params];
    let mut offset = vec![0f32; n_params];
    // Aligned rows pack unit by unit; otherwise collect all codes and pack once at the end.
    let aligned = (d * bits as usize).is_multiple_of(8);
    let mut codes = vec![0u8; if aligned { packed_len(n, bits) } else { n }];
    let code_len = |u: &Unit| {
        let m = (u.token_end - u.token_start) * d;
        if aligned {
            packed_len(m, bits)
        } else {
            m
        }
    };
    let param_len = |u: &Unit| match spec.grouping {
        Grouping::TokenGroups { group_size } => (u.token_end - u.token_start) * d / group_size,
        Grouping::ChannelBlocks { .. } => d,
    };
    let code_parts = split_mut(&mut codes, units.iter().map(code_len));
    let scale_parts = split_mut(&mut scale, units.iter().map(param_len));
    let offset_parts = split_mut(&mut offset, units.iter().map(param_len));
    let work: Vec<_> = units
        .iter()
        .zip(code_parts)
        .zip(scale_parts.into_iter().zip(offset_parts))
        .map(|((u, c), (s, o))| (*u, c, s, o))
        .collect();
    let failure = std::sync::Mutex::new(None::<KvmixError>);
    let cs_ref = cs.as_deref();
    let job = QuantizeJob {
        x,
        geo,
        cs: cs_ref,
        spec,
        aligned,
    };
    parallel::run(n, |par| {
        for_each(work, par, |(u, code_out, scale_out, offset_out)| {
            let res = quantize_unit_best(&job, u, code_out, scale_out, offset_out);
            if let Err(e) = res {
                if let Ok(mut slot) = failure.lock() {
                    slot.get_or_insert(e);
                }
            }
        })
    });
    if let Some(e) = failure.into_inner().ok().flatten() {
        return Err(e);
    }
    if !aligned {
        let mut packed = vec![0u8; packed_len(n, bits)];
        pack(&codes, bits, &mut packed);
        codes = packed;
    }
    Ok(QuantizedTensor {
        dims: dims.to_vec(),
        spec,
        codes,
        scale: ParamVec::from_f32(spec.param_dtype, scale),
        offset: ParamVec::from_f32(spec.param_dtype, offset),
        channel_scale: cs.map(|v| ParamVec::from_f32(spec.param_dtype, v)),
    })
}

#[inline(always)]
/// Quantize the normalized values of one unit (`vals`, `tokens × d`); `simd` says the CPU
/// has AVX2 (the caller is compiled for it).
fn encode_unit(
    vals: &[f32],
    d: usize,
    spec: QuantSpec,
    codes: &mut [u8],
    scale_out: &mut [f32],
    offset_out: &mut [f32],
    simd: bool,
) -> Result<()> {
    match spec.grouping {
        Grouping::TokenGroups { group_size } => {
            for (((g, c), s), o) in vals
                .chunks_exact(group_size)
                .zip(codes.chunks_exact_mut(group_size))
                .zip(scale_out.iter_mut())
                .zip(offset_out.iter_mut())
            {
                #[cfg(target_arch = "x86_64")]
                let (lo, hi, finite) = if simd {
                    // SAFETY: `simd` is only set by `quantize_unit_avx2`, whose caller checked
                    // the CPU features.
                    unsafe { super::affine::min_max_finite_avx2(g) }
                } else {
                    min_max_finite(g)
                };
                #[cfg(not(target_arch = "x86_64"))]
                let (lo, hi, finite) = {
                    let _ = simd;
                    min_max_finite(g)
                };
                if !finite {
                    return Err(non_finite_error());
                }
                let a = clip::fit(g, lo, hi, spec.bits, spec.param_dtype, spec.clip)?;
                a.encode_into(g, spec.bits, c);
                *s = a.scale;
                *o = a.offset;
            }
        }
        Grouping::ChannelBlocks { .. } => {
            // Per-channel lanes: no serial dependency, so the loops vectorize.
            let mut lo = vec![f32::INFINITY; d];
            let mut hi = vec![f32::NEG_INFINITY; d];
            let mut probe = vec![0f32; d];
            for tok in vals.chunks_exact(d) {
                for (((l, h), p), &v) in lo
                    .iter_mut()
                    .zip(hi.iter_mut())
                    .zip(probe.iter_mut())
                    .zip(tok)
                {
                    *l = if v < *l { v } else { *l };
                    *h = if v > *h { v } else { *h };
                    *p += v * 0.0;
                }
            }
            if probe.iter().any(|&p| p != 0.0) {
                return Err(non_finite_error());
            }
            let grid = channel_grids(vals, d, &lo, &hi, spec)?;
            // A constant channel (scale 0) gets code 0: divide by 1 and mask the code to 0.
            let mut divisor = vec![1f32; d];
            let mut keep = vec![0f32; d];
            let mut offset = vec![0f32; d];
            for (c, a) in grid.iter().enumerate() {
                scale_out[c] = a.scale;
                offset_out[c] = a.offset;
                offset[c] = a.offset;
                if a.scale != 0.0 {
                    divisor[c] = a.scale;
                    keep[c] = 1.0;
                }
            }
            let top = super::affine::max_code(spec.bits);
            for (tok, tc) in vals.chunks_exact(d).zip(codes.chunks_exact_mut(d)) {
                let lanes = tc.iter_mut().zip(tok).zip(&divisor).zip(&offset).zip(&keep);
                for ((((c, &v), &div), &off), &k) in lanes {
                    // Clamping first makes truncation equal to floor (see Affine::encode_into).
                    // `max` then `min` equals clamp for numbers and sends NaN to 0.
                    let y = ((v - off) / div + 0.5).max(0.0).min(top) * k;
                    // SAFETY: `y` is finite and in [0, top] (`k` is 0 or 1), so it fits an i32;
                    // the checked `as` cast would not vectorize.
                    *c = unsafe { y.to_int_unchecked::<i32>() } as u8;
                }
            }
        }
    }
    Ok(())
}

/// Each channel's grid over the tokens `vals` (`tokens × d`) with minima `lo` and maxima `hi`:
/// [`clip::fit`] per channel, with every channel's error for one candidate summed in one pass
/// over the tokens (the channels are contiguous; walking one channel down the tokens at a
/// time would stride through the block once per channel and candidate). Inlined so that it is
/// compiled for the caller's instruction set.
#[inline(always)]
fn channel_grids(
    vals: &[f32],
    d: usize,
    lo: &[f32],
    hi: &[f32],
    spec: QuantSpec,
) -> Result<Vec<Affine>> {
    let fit = |range: &dyn Fn(usize) -> (f32, f32)| {
        (0..d)
            .map(|c| {
                let (a, b) = range(c);
                Affine::from_range(a, b, spec.bits, spec.param_dtype)
            })
            .collect::<Result<Vec<Affine>>>()
    };
    let mut best = fit(&|c| (lo[c], hi[c]))?;
    if spec.clip == Clip::MinMax {
        return Ok(best);
    }
    let top = super::affine::max_code(spec.bits);
    let errors = |grid: &[Affine]| {
        let mut e = vec![0f64; d];
        let mut p = vec![0f64; d];
        for tok in vals.chunks_exact(d) {
            for (((ec, pc), a), &x) in e.iter_mut().zip(p.iter_mut()).zip(grid).zip(tok) {
                // A grid whose scale rounded to 0 decodes every code to its offset, as
                // `Affine::code` (any code) and the encoder (code 0) both give.
                let diff = (a.decode(a.code(x, top)) - x) as f64;
                *ec += diff * diff;
                *pc += diff * x as f64;
            }
        }
        if spec.clip == Clip::MseUnbiased {
            for (ec, pc) in e.iter_mut().zip(&p) {
                if *pc < 0.0 {
                    *ec = f64::INFINITY;
                }
            }
        }
        e
    };
    let mut best_err = errors(&best);
    best_err.iter_mut().for_each(|e| {
        if e.is_infinite() {
            *e = f64::MAX;
        }
    });
    // A channel whose min-max scale is 0 keeps that grid (code 0), as `clip::fit` does.
    let searched: Vec<bool> = best.iter().map(|a| a.scale != 0.0).collect();
    for s in clip::SHRINK {
        let cand = fit(&|c| clip::shrunk_range(lo[c], hi[c], s))?;
        let err = errors(&cand);
        for c in 0..d {
            if searched[c] && err[c] < best_err[c] {
                best[c] = cand[c];
                best_err[c] = err[c];
            }
        }
    }
    Ok(best)
}

impl QuantizedTensor {
    pub fn geometry(&self) -> Geometry {
        // dims were validated at construction.
        Geometry::from_dims(&self.dims).unwrap_or(Geometry {
            rows: 0,
            tokens: 0,
            channels: 1,
        })
    }

    /// Bytes held, by component: exactly the lengths of the stored buffers.
    pub fn nbytes(&self) -> ByteCount {
        ByteCount {
            codes: self.codes.len(),
            scale: self.scale.nbytes(),
            offset: self.offset.nbytes(),
            channel_scale: self.channel_scale.as_ref().map_or(0, |c| c.nbytes()),
        }
    }

    /// All codes, unpacked, row-major over `dims`.
    pub fn unpacked_codes(&self) -> Vec<u8> {
        let mut out = vec![0u8; self.geometry().len()];
        unpack(&self.codes, self.spec.bits, &mut out);
        out
    }
}

#[cfg(test)]
mod tests;
