//! Attention over the rows of one tier, with dequantization folded into the arithmetic.
//!
//! Rows come in *runs* that share per-channel parameters (a segment, or the whole tier when
//! the codec has none). For a run, the queries are transformed once — multiplied by the
//! channel factor, by the per-channel scales — so that each row costs one unpack and one dot
//! product per query:
//!
//! * per-token groups: `q·k̂ = Σ_g α_g (q'_g · c_g) + β_g Σ q'_g`, `q' = q ⊙ f`;
//! * per-channel keys: `q·k̂ = (q' ⊙ α) · c + q' · β`;
//! * values: `Σ_j p_j v̂_j = f ⊙ Σ_j p_j (α_j c_j + β_j)` (per-token groups) or
//!   `f ⊙ (α ⊙ Σ_j p_j c_j + β Σ_j p_j)` (per-channel), with `f` applied once per run.

use super::simd::{CodeBlock, Simd, Strided, StridedMut};
use crate::store::codec::Codec;
use crate::store::rows::{EncodedRows, RowData};
use half::f16;
use half::slice::HalfFloatSliceExt;

/// Rows `[start, end)` sharing per-channel parameters.
pub struct Run<'a> {
    pub start: usize,
    pub end: usize,
    /// Reconstruction factor per channel, if any.
    pub factor: Option<&'a [f16]>,
    /// Per-channel scale and offset (per-channel codec).
    pub scale: Option<&'a [f16]>,
    pub offset: Option<&'a [f16]>,
}

/// The runs of `rows`.
pub fn runs(rows: &EncodedRows) -> Vec<Run<'_>> {
    let fixed = (!rows.fixed_factor.is_empty()).then_some(rows.fixed_factor.as_slice());
    if rows.segments.is_empty() {
        return vec![Run {
            start: 0,
            end: rows.len(),
            factor: fixed,
            scale: None,
            offset: None,
        }];
    }
    fn nonempty_of(v: &[f16]) -> Option<&[f16]> {
        (!v.is_empty()).then_some(v)
    }
    rows.segments
        .iter()
        .enumerate()
        .map(|(s, seg)| Run {
            start: rows.segment_start[s] as usize,
            end: rows
                .segment_start
                .get(s + 1)
                .map_or(rows.len(), |&e| e as usize),
            factor: nonempty_of(&seg.factor).or(fixed),
            scale: nonempty_of(&seg.scale),
            offset: nonempty_of(&seg.offset),
        })
        .collect()
}

#[inline(always)]
fn to_f32<S: Simd>(simd: S, v: &[f16]) -> Vec<f32> {
    let mut out = vec![0f32; v.len()];
    simd.f16_to_f32(v, &mut out);
    out
}

/// Row `r` of a full-precision tier as `f32`, in `buf`. F16 rows go through
/// [`Simd::f16_to_f32`] (sixteen at a time with AVX-512; `half`'s conversion calls a function
/// for every eight).
#[inline(always)]
fn load_dense_row<S: Simd>(simd: S, rows: &EncodedRows, r: usize, buf: &mut [f32]) {
    let d = rows.dim;
    match &rows.data {
        RowData::F16(v) => simd.f16_to_f32(&v[r * d..(r + 1) * d], buf),
        RowData::BF16(v) => v[r * d..(r + 1) * d].convert_to_f32_slice(buf),
        RowData::F32(v) => buf.copy_from_slice(&v[r * d..(r + 1) * d]),
        RowData::Packed(_) => unreachable!("packed rows are read by the code kernels"),
    }
}

/// Per-token-group scales and offsets of the rows of `run`, as `f32` (one bulk conversion
/// instead of one per use).
#[inline(always)]
fn run_params<S: Simd>(
    simd: S,
    rows: &EncodedRows,
    run: &Run,
    groups: usize,
) -> (Vec<f32>, Vec<f32>) {
    let span = run.start * groups..run.end * groups;
    (
        to_f32(simd, &rows.row_scale[span.clone()]),
        to_f32(simd, &rows.row_offset[span]),
    )
}

/// The scales and offsets of group `k0 % groups` for `m` rows from flat index `k0`, as
/// contiguous slices: borrowed when every row is one group, else gathered into `buf`.
#[inline(always)]
fn group_params<'a>(
    scales: &'a [f32],
    offsets: &'a [f32],
    k0: usize,
    groups: usize,
    m: usize,
    buf: &'a mut Vec<f32>,
) -> (&'a [f32], &'a [f32]) {
    if groups == 1 {
        return (&scales[k0..k0 + m], &offsets[k0..k0 + m]);
    }
    buf.clear();
    buf.extend((0..m).map(|t| scales[k0 + t * groups]));
    buf.extend((0..m).map(|t| offsets[k0 + t * groups]));
    buf.split_at(m)
}

/// Logits of the queries (`queries`, `nq × d`, already scaled) against the rows of `run`:
/// `logits.data[i * logits.stride + r]` for row `r`. Visibility is applied by the caller.
///
/// Rejected: a lookup table for 2-bit keys (per byte position, 256 entries of the partial
/// dot products of four codes with the GQA group's queries). Its 128 KiB of tables (head_dim
/// 128) spill out of L1, and the row's 32 dependent L2 lookups measured slower than the
/// unpack-and-FMA loop on an AVX2 Xeon; 4-bit tables would be twice as large.
#[inline(always)]
pub fn key_logits<S: Simd>(
    simd: S,
    rows: &EncodedRows,
    run: &Run,
    queries: &[f32],
    logits: StridedMut<'_>,
) {
    let d = rows.dim;
    let nq = queries.len() / d.max(1);
    let StridedMut {
        data: logits,
        stride,
    } = logits;
    let mut buf = vec![0f32; d];
    // q' = q ⊙ f
    let qf: Vec<f32> = match run.factor {
        Some(f) => {
            let f = to_f32(simd, f);
            queries
                .chunks_exact(d)
                .flat_map(|q| q.iter().zip(&f).map(|(a, b)| a * b).collect::<Vec<_>>())
                .collect()
        }
        None => queries.to_vec(),
    };
    match rows.codec {
        Codec::Dense(_) => {
            for r in run.start..run.end {
                load_dense_row(simd, rows, r, &mut buf);
                for i in 0..nq {
                    logits[i * stride + r] = simd.dot(&qf[i * d..(i + 1) * d], &buf);
                }
            }
        }
        Codec::Channel { bits, .. } => {
            let (alpha, beta) = (
                to_f32(simd, run.scale.unwrap_or(&[])),
                to_f32(simd, run.offset.unwrap_or(&[])),
            );
            let qa: Vec<f32> = qf
                .chunks_exact(d)
                .flat_map(|q| q.iter().zip(&alpha).map(|(a, b)| a * b).collect::<Vec<_>>())
                .collect();
            let qb: Vec<f32> = qf.chunks_exact(d).map(|q| simd.dot(q, &beta)).collect();
            let RowData::Packed(all_codes) = &rows.data else {
                return;
            };
            if nq == 0 || run.end == run.start {
                return;
            }
            // The dots land in the logits directly, with the offset term added as they are
            // stored.
            // Blocks of rows keep a block's codes in L1 for every group of four queries. A
            // decode step has one group, so its blocks are long: the kernel's per-call setup
            // is paid less often (16k tokens, one thread: keys 1.307 → 1.259 ms).
            let block = if nq <= 4 { 4096 } else { 256 };
            let q = Strided::new(&qa, d, nq);
            let kernels = simd.code_kernels(bits, d);
            for b0 in (run.start..run.end).step_by(block) {
                let b1 = (b0 + block).min(run.end);
                let codes = CodeBlock::of_rows(all_codes, bits, d, b0..b1, 0, d);
                let out = StridedMut::new(&mut logits[b0..], stride);
                kernels.dots(q, codes, out, &qb);
            }
        }
        Codec::TokenGroups {
            bits,
            group_size: g,
            ..
        } => {
            let groups = d / g;
            let gsum: Vec<f32> = qf.chunks_exact(g).map(|x| x.iter().sum()).collect();
            let (scales, offsets) = run_params(simd, rows, run, groups);
            let RowData::Packed(all_codes) = &rows.data else {
                return;
            };
            if nq == 0 {
                return;
            }
            const BLOCK: usize = 256;
            let kernels = simd.code_kernels(bits, g);
            // Query-major: dots[i * BLOCK + t] for row r0 + t.
            let mut dots = vec![0f32; BLOCK * nq];
            let mut sab = Vec::new();
            for r0 in (run.start..run.end).step_by(BLOCK) {
                let r1 = (r0 + BLOCK).min(run.end);
                let m = r1 - r0;
                for i in 0..nq {
                    logits[i * stride + r0..i * stride + r1].fill(0.0);
                }
                for gi in 0..groups {
                    let codes = CodeBlock::of_rows(all_codes, bits, d, r0..r1, gi * g, g);
                    let q = Strided::new(&qf[gi * g..], d, nq);
                    kernels.dots(q, codes, StridedMut::new(&mut dots, BLOCK), &[]);
                    // This group's scales and offsets for the block's rows, contiguous.
                    let k0 = (r0 - run.start) * groups + gi;
                    let (sa, sb) = group_params(&scales, &offsets, k0, groups, m, &mut sab);
                    for i in 0..nq {
                        let gs = gsum[i * groups + gi];
                        let l = &mut logits[i * stride + r0..i * stride + r1];
                        let dt = &dots[i * BLOCK..i * BLOCK + m];
                        for (((l, &x), &a), &b) in l.iter_mut().zip(dt).zip(sa).zip(sb) {
                            *l += a * x + b * gs;
                        }
                    }
                }
            }
        }
    }
}

/// `out_i += Σ_r probs_i[r] · v̂_r` over the rows of `run`, for each of the `probs.count`
/// queries.
#[inline(always)]
pub fn accumulate_values<S: Simd>(
    simd: S,
    rows: &EncodedRows,
    run: &Run,
    probs: Strided<'_>,
    out: &mut [f32],
) {
    let d = rows.dim;
    let Strided {
        data: probs,
        stride,
        count: nq,
    } = probs;
    let mut buf = vec![0f32; d];
    // Accumulate in the normalized domain, apply the factor once at the end.
    let mut acc = vec![0f32; nq * d];
    let p = |i: usize, r: usize| probs[i * stride + r];
    match rows.codec {
        Codec::Dense(_) => {
            for r in run.start..run.end {
                load_dense_row(simd, rows, r, &mut buf);
                for i in 0..nq {
                    let w = p(i, r);
                    if w != 0.0 {
                        simd.axpy(&mut acc[i * d..(i + 1) * d], w, &buf);
                    }
                }
            }
        }
        Codec::Channel { bits, .. } => {
            let RowData::Packed(all_codes) = &rows.data else {
                return;
            };
            // The probabilities are the weights as they are. Blocks of rows keep a block's
            // codes in L1 while the kernel sweeps it once per span of channels.
            const BLOCK: usize = 256;
            let kernels = simd.code_kernels(bits, d);
            for r0 in (run.start..run.end).step_by(BLOCK) {
                let r1 = (r0 + BLOCK).min(run.end);
                let codes = CodeBlock::of_rows(all_codes, bits, d, r0..r1, 0, d);
                let w = Strided::new(&probs[r0..], stride, nq);
                kernels.axpy(StridedMut::new(&mut acc, d), w, codes);
            }
            let psum: Vec<f32> = (0..nq)
                .map(|i| {
                    probs[i * stride + run.start..i * stride + run.end]
                        .iter()
                        .sum()
                })
                .collect();
            let (alpha, beta) = (
                to_f32(simd, run.scale.unwrap_or(&[])),
                to_f32(simd, run.offset.unwrap_or(&[])),
            );
            for i in 0..nq {
                for c in 0..d {
                    acc[i * d + c] = alpha[c] * acc[i * d + c] + beta[c] * psum[i];
                }
            }
        }
        Codec::TokenGroups {
            bits,
            group_size: g,
            ..
        } => {
            let groups = d / g;
            let (scales, offsets) = run_params(simd, rows, run, groups);
            // Σ_r p·β per (query, group), added to every channel of the group at the end.
            let mut bias = vec![0f32; nq * groups];
            let RowData::Packed(all_codes) = &rows.data else {
                return;
            };
            // Blocks of rows whose weights p·α stay in cache, query-major: w[i * block + t].
            // A decode step (one group of four queries) takes longer blocks, as for keys
            // (values 1.071 → 1.051 ms; 512 to 2048 rows measured alike).
            let block = if nq <= 4 { 1024 } else { 256 };
            let kernels = simd.code_kernels(bits, g);
            let mut w = vec![0f32; block * nq];
            let mut sab = Vec::new();
            for r0 in (run.start..run.end).step_by(block) {
                let r1 = (r0 + block).min(run.end);
                let m = r1 - r0;
                for gi in 0..groups {
                    let k0 = (r0 - run.start) * groups + gi;
                    let (sa, sb) = group_params(&scales, &offsets, k0, groups, m, &mut sab);
                    for i in 0..nq {
                        let pr = &probs[i * stride + r0..i * stride + r1];
                        let wi = &mut w[i * block..i * block + m];
                        for ((x, &p), &a) in wi.iter_mut().zip(pr).zip(sa) {
                            *x = p * a;
                        }
                        // Rejected: one pass computing both (sixteen partial sums for the
                        // dot): 16k step 2.44 → 2.49 ms.
                        bias[i * groups + gi] += simd.dot(pr, sb);
                    }
                    let codes = CodeBlock::of_rows(all_codes, bits, d, r0..r1, gi * g, g);
                    let acc = StridedMut::new(&mut acc[gi * g..], d);
                    kernels.axpy(acc, Strided::new(&w, block, nq), codes);
                }
            }
            for i in 0..nq {
                for c in 0..d {
                    acc[i * d + c] += bias[i * groups + c / g];
                }
            }
        }
    }
    match run.factor {
        Some(f) => {
            let f = to_f32(simd, f);
            for (o, a) in out.chunks_exact_mut(d).zip(acc.chunks_exact(d)) {
                for c in 0..d {
                    o[c] += f[c] * a[c];
                }
            }
        }
        None => out.iter_mut().zip(&acc).for_each(|(o, a)| *o += a),
    }
}
