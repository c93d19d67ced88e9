//! Attention computed directly on the compressed store, with the attention each token
//! received as a by-product for the importance tracker.
//!
//! Two passes per `(sequence, kv-head)` stream: the first reads the keys of every tier and
//! writes the logits of all the stream's queries (the query heads of its GQA group × the
//! query positions); the second turns them into `e^(logit − max)` (fp32) and reads the values
//! once, weighting them; each query's output, and its share of what the tracker receives, is
//! divided by the query's sum at the end. Every compressed byte is read once, no dense copy of
//! K or V is ever built, and the probabilities are exactly what the tracker needs.
//!
//! Threads take streams. With fewer than two streams per thread (one sequence of a model with
//! few kv-heads), long streams are cut into parts that run on different threads, each with
//! its own max and sum; the merge rescales the parts to the stream's max (split softmax).
//!
//! Rejected: a single-pass online softmax. It saves the logit buffer (4 bytes per token per
//! query, small next to the cache) but must rescale the accumulator and cannot hand out
//! normalized probabilities without a second pass anyway.

mod rows;
pub mod simd;

use crate::error::{KvmixError, Result};
use crate::parallel;
use crate::store::LayerStore;
use rayon::prelude::*;
use rows::{accumulate_values, key_logits, runs, Run};
use simd::{Strided, StridedMut};

/// The result of [`attend`]: outputs, and for every stream and tier the attention each row
/// received (summed over the GQA group's heads and the queries) and how many queries saw it.
pub struct Attention {
    /// `[batch, q_heads, q_len, head_dim]`.
    pub out: Vec<f32>,
    /// `received[stream][tier][row]`, tiers ordered buffer, high, low.
    pub received: Vec<[Vec<f32>; 3]>,
    pub seen_by: Vec<[Vec<f32>; 3]>,
}

/// `softmax(q·Kᵀ·scale + mask)·V` for queries `q` (`[batch, q_heads, q_len, head_dim]`) at
/// positions `q_positions` (length `q_len`, shared by the batch) against everything `store`
/// holds. A token is visible to a query at or after its position, unless it is left padding.
pub fn attend(
    store: &LayerStore,
    q: &[f32],
    q_dims: &[usize],
    q_positions: &[usize],
    scale: f32,
) -> Result<Attention> {
    attend_impl(store, q, q_dims, q_positions, scale, true, None)
}

/// [`attend`]'s output alone: the attention each token received is not collected (a decode
/// step that does not feed the importance tracker).
pub fn attend_untracked(
    store: &LayerStore,
    q: &[f32],
    q_dims: &[usize],
    q_positions: &[usize],
    scale: f32,
) -> Result<Vec<f32>> {
    attend_impl(store, q, q_dims, q_positions, scale, false, None).map(|a| a.out)
}

fn attend_impl(
    store: &LayerStore,
    q: &[f32],
    q_dims: &[usize],
    q_positions: &[usize],
    scale: f32,
    track: bool,
    parts_per_stream: Option<usize>,
) -> Result<Attention> {
    let (b, hq, tq, d) = match *q_dims {
        [b, hq, tq, d] => (b, hq, tq, d),
        _ => {
            return Err(KvmixError::Shape(format!(
                "queries must be [batch, q_heads, q_len, head_dim], got {q_dims:?}"
            )))
        }
    };
    let hk = store.kv_heads;
    if b != store.batch
        || d != store.head_dim
        || hq % hk != 0
        || q.len() != b * hq * tq * d
        || q_positions.len() != tq
    {
        return Err(KvmixError::Shape(format!(
            "queries {q_dims:?} do not fit the store (batch {}, {hk} kv heads, head_dim {}) \
             or `q_positions` (length {})",
            store.batch,
            store.head_dim,
            q_positions.len()
        )));
    }
    if hq == 0 {
        return Err(KvmixError::Shape(format!(
            "queries need at least one head (a multiple of the {hk} kv heads), got {q_dims:?}"
        )));
    }
    store.check_queries(q, d, scale)?;
    if tq == 0 || !store.layout.byte_aligned_groups() {
        // Codes of a token group that do not fill whole bytes: the kernels read whole bytes.
        // No query at all (q_len 0): nothing to compute, and the kernels assume one.
        let reference =
            crate::store::reference::attend(store, q, hq, tq, q_positions, scale, track);
        return Ok(reference);
    }
    let rep = hq / hk;
    let nq = rep * tq;
    let work: usize = store.streams.iter().map(|s| s.len()).sum::<usize>() * nq * d;
    let queries = Queries::new(q, [hq, tq, d], hk, q_positions, scale, track);
    let (parts, results) = parallel::run(work, |par| {
        // Streams are cut into parts only for threads that will run them.
        let threads = if par { parallel::num_threads() } else { 1 };
        let parts = split_streams(store, threads, parts_per_stream);
        let one = |p: &Part| dispatch_part(store, p, &queries);
        let results: Vec<PartResult> = if par {
            parts.par_iter().map(one).collect()
        } else {
            parts.iter().map(one).collect()
        };
        (parts, results)
    });
    Ok(merge_parts(store, &parts, results, &queries))
}

/// Rows below which a stream is not cut into parts: a part's fixed costs and the merge must
/// stay small next to its work.
const MIN_PART_ROWS: usize = 2048;

/// A contiguous range `[lo, hi)` of stream `s`'s rows, tiers in order (buffer, high, low).
struct Part {
    s: usize,
    lo: usize,
    hi: usize,
}

/// The work of one call as parts, in stream order. Each stream is one part, unless there are
/// fewer than two streams per thread (one sequence of a model with few kv-heads: SmolLM2's
/// three on two cores left one core idle a third of the time); then long streams are cut
/// into enough parts of at least [`MIN_PART_ROWS`] rows to give every thread about two, and
/// their softmax is merged afterwards (split softmax). `force`: parts per stream (tests).
fn split_streams(store: &LayerStore, threads: usize, force: Option<usize>) -> Vec<Part> {
    let n = store.streams.len();
    let want = match force {
        Some(k) => k.max(1),
        None if threads > 1 && n > 0 && n < 2 * threads => (2 * threads).div_ceil(n),
        None => 1,
    };
    let mut parts = Vec::new();
    for (s, stream) in store.streams.iter().enumerate() {
        let len = stream.len();
        let k = if force.is_some() {
            want.min(len.max(1))
        } else {
            want.min(len / MIN_PART_ROWS).max(1)
        };
        parts.extend((0..k).map(|i| Part {
            s,
            lo: len * i / k,
            hi: len * (i + 1) / k,
        }));
    }
    parts
}

/// One part's share of the result. The output is not yet divided by the softmax sum, and the
/// probabilities are relative to the part's own max: [`merge_parts`] rescales them.
struct PartResult {
    /// `[nq, d]`: `Σ_r e^(logit − max)·v_r` over the part's rows.
    out: Vec<f32>,
    /// Per query: the part's max logit and `Σ_r e^(logit − max)`.
    max: Vec<f32>,
    sum: Vec<f32>,
    /// Per tier: the part's rows `[start, end)` of that tier.
    rows: [(usize, usize); 3],
    /// Per tier, when tracking: the attention each row received (a stream in one part:
    /// final), or `[nq, rows]` of `e^(logit − max)` (a part of a split stream).
    received: [Vec<f32>; 3],
    seen_by: [Vec<f32>; 3],
    /// Whether the part is its whole stream (`received` final).
    whole: bool,
}

/// Combine the parts of every stream: rescale each part to the stream's max per query,
/// divide by the total sum, scatter the outputs into `[batch, q_heads, q_len, d]`, and
/// concatenate each tier's received attention.
fn merge_parts(
    store: &LayerStore,
    parts: &[Part],
    results: Vec<PartResult>,
    qs: &Queries<'_>,
) -> Attention {
    let (hq, tq, d, rep) = (qs.hq, qs.tq, qs.d, qs.rep);
    let hk = store.kv_heads;
    let nq = rep * tq;
    let mut out = vec![0f32; qs.q.len()];
    let mut received = Vec::with_capacity(store.streams.len());
    let mut seen_by = Vec::with_capacity(store.streams.len());
    let mut i = 0;
    while i < parts.len() {
        let s = parts[i].s;
        let j = i + parts[i..].iter().take_while(|p| p.s == s).count();
        let group = &results[i..j];
        // Factor of each part's terms, per query: e^(max_p − max) / total sum (1/sum for a
        // stream in one part, exactly as an unsplit softmax; 0 for a query that sees nothing).
        let stream_max: Vec<f32> = (0..nq)
            .map(|q| {
                group
                    .iter()
                    .map(|p| p.max[q])
                    .fold(f32::NEG_INFINITY, f32::max)
            })
            .collect();
        let weight = |p: &PartResult, q: usize| {
            if p.sum[q] > 0.0 {
                (p.max[q] - stream_max[q]).exp()
            } else {
                0.0
            }
        };
        let total: Vec<f32> = (0..nq)
            .map(|q| group.iter().map(|p| p.sum[q] * weight(p, q)).sum())
            .collect();
        let factors: Vec<Vec<f32>> = group
            .iter()
            .map(|p| {
                (0..nq)
                    .map(|q| {
                        if total[q] > 0.0 {
                            weight(p, q) / total[q]
                        } else {
                            0.0
                        }
                    })
                    .collect()
            })
            .collect();
        let (bi, h) = (s / hk, s % hk);
        // Stream outputs are [rep, tq, d]: query heads h*rep .. h*rep+rep of sequence bi.
        let start = (bi * hq + h * rep) * tq * d;
        let o = &mut out[start..start + nq * d];
        for (p, f) in group.iter().zip(&factors) {
            for ((o, po), &f) in o
                .chunks_exact_mut(d.max(1))
                .zip(p.out.chunks_exact(d.max(1)))
                .zip(f)
            {
                o.iter_mut().zip(po).for_each(|(a, &x)| *a += x * f);
            }
        }
        let mut rec: [Vec<f32>; 3] = Default::default();
        let mut cnt: [Vec<f32>; 3] = Default::default();
        if qs.track {
            for (p, f) in group.iter().zip(&factors) {
                for t in 0..3 {
                    let (a, b) = p.rows[t];
                    if p.received[t].is_empty() {
                        continue;
                    }
                    if p.whole {
                        rec[t].extend_from_slice(&p.received[t]);
                    } else {
                        let n = b - a;
                        let mut r = vec![0f32; n];
                        for (e, &f) in p.received[t].chunks_exact(n.max(1)).zip(f) {
                            r.iter_mut().zip(e).for_each(|(a, &x)| *a += x * f);
                        }
                        rec[t].extend(r);
                    }
                    cnt[t].extend_from_slice(&p.seen_by[t]);
                }
            }
        }
        received.push(rec);
        seen_by.push(cnt);
        i = j;
    }
    Attention {
        out,
        received,
        seen_by,
    }
}

thread_local! {
    /// Each thread's logits buffer, reused by every stream it computes. A fresh allocation
    /// per stream (256 KiB for 4 queries × 16k tokens) went back to the OS when freed and
    /// page-faulted in again, zeroed, on the next call.
    static LOGITS: std::cell::Cell<Vec<f32>> = const { std::cell::Cell::new(Vec::new()) };
}

/// The queries of one `attend` call, shared by every stream.
struct Queries<'a> {
    /// `[batch, q_heads, q_len, head_dim]`.
    q: &'a [f32],
    hq: usize,
    tq: usize,
    d: usize,
    /// Query heads per kv-head.
    rep: usize,
    positions: &'a [usize],
    scale: f32,
    /// Whether to collect the attention each token received.
    track: bool,
}

impl<'a> Queries<'a> {
    /// Queries `q` of shape `[_, hq, tq, d]` for a store of `kv_heads` kv-heads.
    fn new(
        q: &'a [f32],
        [hq, tq, d]: [usize; 3],
        kv_heads: usize,
        positions: &'a [usize],
        scale: f32,
        track: bool,
    ) -> Self {
        Queries {
            q,
            hq,
            tq,
            d,
            rep: hq / kv_heads,
            positions,
            scale,
            track,
        }
    }
}

/// [`attend_part`] compiled for AVX-512 (F/BW/VL/VBMI) or else AVX2+FMA+F16C when the CPU
/// has them, else for the baseline target.
fn dispatch_part(store: &LayerStore, p: &Part, qs: &Queries<'_>) -> PartResult {
    #[cfg(target_arch = "x86_64")]
    if let Some(avx512) = simd::Avx512::detect() {
        // SAFETY: `detect` confirmed the CPU has every feature the function is compiled for.
        return unsafe { attend_part_avx512(avx512, store, p, qs) };
    }
    #[cfg(target_arch = "x86_64")]
    if let Some(avx) = simd::Avx2::detect() {
        // SAFETY: `detect` confirmed the CPU has every feature the function is compiled for.
        return unsafe { attend_part_avx2(avx, store, p, qs) };
    }
    attend_part(simd::Portable, store, p, qs)
}

#[cfg(target_arch = "x86_64")]
#[target_feature(enable = "avx2,fma,f16c")]
unsafe fn attend_part_avx2(
    avx: simd::Avx2,
    store: &LayerStore,
    p: &Part,
    qs: &Queries<'_>,
) -> PartResult {
    attend_part(avx, store, p, qs)
}

#[cfg(target_arch = "x86_64")]
#[target_feature(enable = "avx512f,avx512bw,avx512vl,avx512vbmi,avx2,fma,f16c")]
unsafe fn attend_part_avx512(
    avx512: simd::Avx512,
    store: &LayerStore,
    p: &Part,
    qs: &Queries<'_>,
) -> PartResult {
    attend_part(avx512, store, p, qs)
}

/// `run` restricted to rows `[a, b)`, if any are left.
fn clip<'a>(run: &Run<'a>, a: usize, b: usize) -> Option<Run<'a>> {
    let (start, end) = (run.start.max(a), run.end.min(b));
    (start < end).then_some(Run {
        start,
        end,
        factor: run.factor,
        scale: run.scale,
        offset: run.offset,
    })
}

#[inline(always)]
fn attend_part<S: simd::Simd>(
    simd: S,
    store: &LayerStore,
    part: &Part,
    qs: &Queries<'_>,
) -> PartResult {
    let &Queries {
        q,
        hq,
        tq,
        d,
        rep,
        positions: q_positions,
        scale,
        track,
    } = qs;
    let hk = store.kv_heads;
    let s = part.s;
    let (bi, h) = (s / hk, s % hk);
    let stream = &store.streams[s];
    let nq = rep * tq;
    let first = (bi * hq + h * rep) * tq * d;
    let queries: Vec<f32> = q[first..first + nq * d].iter().map(|x| x * scale).collect();
    let tiers = stream.tiers();
    let whole = part.lo == 0 && part.hi == stream.len();
    // The part's rows of each tier, and the logits column of each tier's row 0. Only the
    // part's first tier can start mid-tier (at row `pad`): its row r sits at column r and
    // columns 0..pad are never touched, so the row kernels keep indexing rows from the
    // tier's start.
    let mut rows = [(0usize, 0usize); 3];
    let mut col0 = [0usize; 3];
    let (mut base, mut col, mut pad) = (0, 0, None);
    for (t, tier) in tiers.iter().enumerate() {
        let a = part.lo.clamp(base, base + tier.len()) - base;
        let b = part.hi.clamp(base, base + tier.len()) - base;
        rows[t] = (a, b);
        if a < b {
            pad.get_or_insert(a);
            col0[t] = col;
            col = col0[t] + b;
        }
        base += tier.len();
    }
    let pad = pad.unwrap_or(0);
    let width = col.max(pad);
    let first_valid = store.first_valid[bi] as u32;
    // Pass 1: logits [nq, width]. Every column of the part's rows is written below (each
    // tier's rows, for every query), so the reused buffer needs no clearing.
    let mut buffer = LOGITS.take();
    if buffer.len() < nq * width {
        buffer.resize(nq * width, 0.0);
    }
    let logits = &mut buffer[..nq * width];
    let min_q = q_positions.iter().copied().min().unwrap_or(0);
    for (t, tier) in tiers.iter().enumerate() {
        let (a, b) = rows[t];
        if a >= b {
            continue;
        }
        for run in runs(&tier.keys).iter().filter_map(|r| clip(r, a, b)) {
            let out = StridedMut::new(&mut logits[col0[t]..], width);
            key_logits(simd, &tier.keys, &run, &queries, out);
        }
        // Mask: invisible tokens get -inf. Query i is head i / tq at position q_positions[i % tq].
        // Decoding sees every stored token, so the per-element test runs only when needed.
        let needs_mask = tier
            .positions
            .min_max()
            .is_some_and(|(lo, hi)| lo < first_valid || hi as usize > min_q);
        if needs_mask {
            let qpos: Vec<usize> = (0..nq).map(|i| q_positions[i % tq]).collect();
            for r in a..b {
                let p = tier.positions.get(r);
                for (i, &qp) in qpos.iter().enumerate() {
                    if p < first_valid || p as usize > qp {
                        logits[i * width + col0[t] + r] = f32::NEG_INFINITY;
                    }
                }
            }
        }
    }
    // Softmax per query, but the division by the sum is left to the merge: the values pass
    // is linear in the probabilities, so scaling each query's output once saves a read and
    // write of every probability (1.4% of a 16k-token step). A query that sees nothing has
    // a sum of 0 and gets zero output.
    let mut max = vec![f32::NEG_INFINITY; nq];
    let mut sum = vec![0f32; nq];
    for (i, row) in logits.chunks_exact_mut(width.max(1)).take(nq).enumerate() {
        (max[i], sum[i]) = simd.exp_shifted(&mut row[pad..]);
    }
    // Pass 2: values.
    let mut out = vec![0f32; nq * d];
    let mut received: [Vec<f32>; 3] = Default::default();
    let mut seen_by: [Vec<f32>; 3] = Default::default();
    let probs = &logits;
    for (t, tier) in tiers.iter().enumerate() {
        let (a, b) = rows[t];
        if a >= b {
            continue;
        }
        for run in runs(&tier.values).iter().filter_map(|r| clip(r, a, b)) {
            // Row r of this tier sits at column col0[t] + r.
            let p = Strided::new(&probs[col0[t]..], width, nq);
            accumulate_values(simd, &tier.values, &run, p, &mut out);
        }
        if track && tier.scores.is_some() {
            let p = |i: usize| &probs[i * width + col0[t] + a..i * width + col0[t] + b];
            received[t] = if whole {
                // Query by query over contiguous probabilities (vectorizes), not row by row.
                let mut rec = vec![0f32; b - a];
                for (i, &sm) in sum.iter().enumerate() {
                    let v = if sm > 0.0 { 1.0 / sm } else { 0.0 };
                    rec.iter_mut().zip(p(i)).for_each(|(r, &x)| *r += x * v);
                }
                rec
            } else {
                // The merge weighs each query's probabilities once every part's max is known.
                (0..nq).flat_map(p).copied().collect()
            };
            seen_by[t] = (a..b)
                .map(|r| {
                    let p = tier.positions.get(r);
                    if p < first_valid {
                        return 0.0;
                    }
                    q_positions.iter().filter(|&&qp| qp as u32 >= p).count() as f32
                })
                .collect();
        }
    }
    LOGITS.set(buffer);
    PartResult {
        out,
        max,
        sum,
        rows,
        received,
        seen_by,
        whole,
    }
}

#[cfg(test)]
mod tests;
