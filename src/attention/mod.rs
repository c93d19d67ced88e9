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
//! Rejected: a single-pass online softmax. It saves the logit buffer (4 bytes per token per
//! query, small next to the cache) but must rescale the accumulator and cannot hand out
//! normalized probabilities without a second pass anyway.

mod rows;
pub mod simd;

use crate::error::{KvmixError, Result};
use crate::parallel;
use crate::store::LayerStore;
use rayon::prelude::*;
use rows::{accumulate_values, key_logits, runs};

/// One stream's share of the result: outputs `[rep, q_len, d]`, and per tier the attention
/// each row received and the number of queries that saw it.
type StreamResult = (Vec<f32>, [Vec<f32>; 3], [Vec<f32>; 3]);

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
    attend_impl(store, q, q_dims, q_positions, scale, true)
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
    attend_impl(store, q, q_dims, q_positions, scale, false).map(|a| a.out)
}

fn attend_impl(
    store: &LayerStore,
    q: &[f32],
    q_dims: &[usize],
    q_positions: &[usize],
    scale: f32,
    track: bool,
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
    if q.iter().any(|x| !x.is_finite()) {
        return Err(KvmixError::NonFinite(
            "queries contain NaN or Inf; kvmix refuses them rather than returning a silently \
             wrong attention output"
                .into(),
        ));
    }
    let rep = hq / hk;
    let nq = rep * tq;
    let work: usize = store.streams.iter().map(|s| s.len()).sum::<usize>() * nq * d;
    let queries = Queries {
        q,
        hq,
        tq,
        d,
        rep,
        positions: q_positions,
        scale,
        track,
    };
    let results: Vec<StreamResult> = parallel::run(work, |par| {
        let one = |s: usize| dispatch_stream(store, s, &queries);
        if par {
            (0..store.streams.len()).into_par_iter().map(one).collect()
        } else {
            (0..store.streams.len()).map(one).collect()
        }
    });
    let mut out = vec![0f32; q.len()];
    let mut received = Vec::with_capacity(results.len());
    let mut seen_by = Vec::with_capacity(results.len());
    for (s, (o, r, c)) in results.into_iter().enumerate() {
        let (bi, h) = (s / hk, s % hk);
        // Stream outputs are [rep, tq, d]: query heads h*rep .. h*rep+rep of sequence bi.
        let start = (bi * hq + h * rep) * tq * d;
        out[start..start + nq * d].copy_from_slice(&o);
        received.push(r);
        seen_by.push(c);
    }
    Ok(Attention {
        out,
        received,
        seen_by,
    })
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

/// [`attend_stream`] compiled for AVX-512 (F/BW/VL/VBMI) or else AVX2+FMA+F16C when the CPU
/// has them, else for the baseline target.
fn dispatch_stream(store: &LayerStore, s: usize, qs: &Queries<'_>) -> StreamResult {
    #[cfg(target_arch = "x86_64")]
    if let Some(avx512) = simd::Avx512::detect() {
        // SAFETY: `detect` confirmed the CPU has every feature the function is compiled for.
        return unsafe { attend_stream_avx512(avx512, store, s, qs) };
    }
    #[cfg(target_arch = "x86_64")]
    if let Some(avx) = simd::Avx2::detect() {
        // SAFETY: `detect` confirmed the CPU has every feature the function is compiled for.
        return unsafe { attend_stream_avx2(avx, store, s, qs) };
    }
    attend_stream(simd::Portable, store, s, qs)
}

#[cfg(target_arch = "x86_64")]
#[target_feature(enable = "avx2,fma,f16c")]
unsafe fn attend_stream_avx2(
    avx: simd::Avx2,
    store: &LayerStore,
    s: usize,
    qs: &Queries<'_>,
) -> StreamResult {
    attend_stream(avx, store, s, qs)
}

#[cfg(target_arch = "x86_64")]
#[target_feature(enable = "avx512f,avx512bw,avx512vl,avx512vbmi,avx2,fma,f16c")]
unsafe fn attend_stream_avx512(
    avx512: simd::Avx512,
    store: &LayerStore,
    s: usize,
    qs: &Queries<'_>,
) -> StreamResult {
    attend_stream(avx512, store, s, qs)
}

#[inline(always)]
fn attend_stream<S: simd::Simd>(
    simd: S,
    store: &LayerStore,
    s: usize,
    qs: &Queries<'_>,
) -> StreamResult {
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
    let (bi, h) = (s / hk, s % hk);
    let stream = &store.streams[s];
    let nq = rep * tq;
    let first = (bi * hq + h * rep) * tq * d;
    let queries: Vec<f32> = q[first..first + nq * d].iter().map(|x| x * scale).collect();
    let tiers = stream.tiers();
    let total: usize = tiers.iter().map(|t| t.len()).sum();
    let first_valid = store.first_valid[bi] as u32;
    // Pass 1: logits [nq, total], tiers concatenated. Every entry is written below (each
    // tier's rows, for every query), so the reused buffer needs no clearing.
    let mut buffer = LOGITS.take();
    if buffer.len() < nq * total {
        buffer.resize(nq * total, 0.0);
    }
    let logits = &mut buffer[..nq * total];
    let mut base = 0;
    for tier in tiers {
        for run in runs(&tier.keys) {
            key_logits(
                simd,
                &tier.keys,
                &run,
                &queries,
                nq,
                &mut logits[base..],
                total,
            );
        }
        // Mask: invisible tokens get -inf. Query i is head i / tq at position q_positions[i % tq].
        // Decoding sees every stored token, so the per-element test runs only when needed.
        let min_q = q_positions.iter().copied().min().unwrap_or(0);
        let needs_mask = tier
            .positions
            .min_max()
            .is_some_and(|(lo, hi)| lo < first_valid || hi as usize > min_q);
        if needs_mask {
            let qpos: Vec<usize> = (0..nq).map(|i| q_positions[i % tq]).collect();
            for r in 0..tier.len() {
                let p = tier.positions.get(r);
                for (i, &qp) in qpos.iter().enumerate() {
                    if p < first_valid || p as usize > qp {
                        logits[i * total + base + r] = f32::NEG_INFINITY;
                    }
                }
            }
        }
        base += tier.len();
    }
    // Softmax per query, but the division by the sum is left to the end: the values pass is
    // linear in the probabilities, so scaling each query's output once saves a read and
    // write of every probability (1.4% of a 16k-token step). A query that sees nothing has
    // a sum of 0 and gets zero output.
    let mut inv = vec![0f32; nq];
    for (row, v) in logits.chunks_exact_mut(total.max(1)).zip(inv.iter_mut()) {
        let sum = simd.exp_shifted(row);
        *v = if sum > 0.0 { 1.0 / sum } else { 0.0 };
    }
    // Pass 2: values.
    let mut out = vec![0f32; nq * d];
    let mut received: [Vec<f32>; 3] = Default::default();
    let mut seen_by: [Vec<f32>; 3] = Default::default();
    let mut base = 0;
    for (t, tier) in tiers.iter().enumerate() {
        let probs = &logits;
        for run in runs(&tier.values) {
            // Row r of this tier sits at column base + r.
            accumulate_values(
                simd,
                &tier.values,
                &run,
                &probs[base..],
                total,
                nq,
                &mut out,
            );
        }
        if track && tier.scores.is_some() {
            // Query by query over contiguous probabilities (vectorizes), not row by row.
            let mut rec = vec![0f32; tier.len()];
            for (i, &v) in inv.iter().enumerate() {
                let p = &probs[i * total + base..i * total + base + tier.len()];
                rec.iter_mut().zip(p).for_each(|(a, &x)| *a += x * v);
            }
            received[t] = rec;
            seen_by[t] = (0..tier.len())
                .map(|r| {
                    let p = tier.positions.get(r);
                    if p < first_valid {
                        return 0.0;
                    }
                    q_positions.iter().filter(|&&qp| qp as u32 >= p).count() as f32
                })
                .collect();
        }
        base += tier.len();
    }
    for (o, &v) in out.chunks_exact_mut(d.max(1)).zip(&inv) {
        o.iter_mut().for_each(|x| *x *= v);
    }
    LOGITS.set(buffer);
    (out, received, seen_by)
}

impl LayerStore {
    /// [`attend`], then add the attention each token received to the importance scores of
    /// the tiers that track them.
    pub fn attend_and_track(
        &mut self,
        q: &[f32],
        q_dims: &[usize],
        q_positions: &[usize],
        scale: f32,
    ) -> Result<Vec<f32>> {
        let a = attend(self, q, q_dims, q_positions, scale)?;
        for (stream, (rec, cnt)) in self
            .streams
            .iter_mut()
            .zip(a.received.iter().zip(&a.seen_by))
        {
            for (t, tier) in [&mut stream.buffer, &mut stream.high, &mut stream.low]
                .into_iter()
                .enumerate()
            {
                if let Some(sc) = tier.scores.as_mut() {
                    sc.acc.iter_mut().zip(&rec[t]).for_each(|(a, r)| *a += r);
                    sc.count.iter_mut().zip(&cnt[t]).for_each(|(c, n)| *c += n);
                }
            }
        }
        Ok(a.out)
    }
}

#[cfg(test)]
mod tests;
