//! Classification: moving a stream's buffered tokens into its tiers under each policy, and
//! for the heavy-hitter policies (MiKV, H2O eviction) trimming the important set back to its
//! budget, demoting or dropping what leaves it.

use super::layer::Stream;
use super::policy::{Policy, Selection, ZipCacheConfig};
use super::tier::{PreparedRows, RowBatch, Tier};
use crate::error::{KvmixError, Result};
use crate::importance::{normalized, top_k};

/// The important set of a heavy-hitter + recent policy among `candidates` (position, score,
/// valid): the `n_recent` most recent valid tokens plus the `budget - n_recent` best-scored
/// of the other valid ones.
fn heavy_and_recent(candidates: &[(u32, f32, bool)], budget: usize, n_recent: usize) -> Vec<bool> {
    let mut important = vec![false; candidates.len()];
    let mut by_recency: Vec<usize> = (0..candidates.len()).filter(|&i| candidates[i].2).collect();
    let n_recent = n_recent.min(budget).min(by_recency.len());
    // Positions are distinct: the n_recent newest are a unique set, found in linear time.
    if n_recent > 0 && n_recent < by_recency.len() {
        by_recency
            .select_nth_unstable_by_key(n_recent - 1, |&i| std::cmp::Reverse(candidates[i].0));
    }
    for &i in &by_recency[..n_recent] {
        important[i] = true;
    }
    let mut rest: Vec<usize> = by_recency[n_recent..].to_vec();
    // top_k breaks ties toward the higher index; order `rest` oldest-first so that means recent.
    rest.sort_unstable_by_key(|&i| candidates[i].0);
    let scores: Vec<f32> = rest.iter().map(|&i| candidates[i].1).collect();
    for j in top_k(&scores, budget - n_recent) {
        important[rest[j]] = true;
    }
    important
}

/// What ZipCache ranks: normalized attention (accumulated attention / visible queries), or the
/// accumulated attention itself for the ablation.
fn ranking_scores(c: &ZipCacheConfig, acc: &[f32], count: &[f32]) -> Vec<f32> {
    if c.normalized {
        normalized(acc, count)
    } else {
        acc.to_vec()
    }
}

/// Each sequence's ranking scores over its buffered tokens, from the accumulated attention and
/// query counts summed over its kv-heads, when the policy selects one salient set per layer;
/// `streams` are ordered `(sequence, kv-head)`. The streams of a sequence buffer the same
/// positions in the same order (they are appended and classified together); a mismatch is an
/// error, not a wrong ranking.
pub(super) fn pooled_scores(
    policy: Policy,
    streams: &[Stream],
    kv_heads: usize,
) -> Result<Option<Vec<Vec<f32>>>> {
    let Policy::ZipCache(c) = policy else {
        return Ok(None);
    };
    if c.selection != Selection::Layer {
        return Ok(None);
    }
    let mut pooled = Vec::with_capacity(streams.len() / kv_heads);
    for heads in streams.chunks(kv_heads) {
        let n = heads[0].buffer.len();
        if heads.iter().any(|h| h.buffer.len() != n) {
            return Err(KvmixError::Shape(
                "the kv-heads of a sequence buffer different numbers of tokens".into(),
            ));
        }
        let (mut acc, mut count) = (vec![0f32; n], vec![0f32; n]);
        for sc in heads.iter().filter_map(|h| h.buffer.scores.as_ref()) {
            acc.iter_mut().zip(&sc.acc).for_each(|(a, x)| *a += x);
            count.iter_mut().zip(&sc.count).for_each(|(c, x)| *c += x);
        }
        pooled.push(ranking_scores(&c, &acc, &count));
    }
    Ok(Some(pooled))
}

/// What one classification does to one stream, computed (and every row encoded) without
/// changing it: a store classifies only once every stream's plan exists, so a refusal leaves
/// every stream as it was, and [`Plan::apply`] cannot fail.
pub(super) struct Plan {
    /// Rows leaving the buffer / the high tier.
    take_buffer: Vec<bool>,
    take_high: Option<Vec<bool>>,
    to_high: Vec<PreparedRows>,
    to_low: Vec<PreparedRows>,
    /// Positions whose representation changes.
    moved: Vec<u32>,
}

impl Plan {
    /// Carry the plan out; returns the positions whose representation changed.
    pub(super) fn apply(self, s: &mut Stream) -> Vec<u32> {
        if let Some(take) = self.take_high {
            let keep: Vec<bool> = take.iter().map(|&t| !t).collect();
            s.high.retain(&keep);
        }
        let keep: Vec<bool> = self.take_buffer.iter().map(|&t| !t).collect();
        s.buffer.retain(&keep);
        self.to_high.into_iter().for_each(|p| s.high.commit(p));
        self.to_low.into_iter().for_each(|p| s.low.commit(p));
        self.moved
    }
}

/// `rows` split into left padding (positions before `first_valid`) and the rest. Padding goes
/// to a tier as its own segment: per-channel statistics (channel-wise keys, channel-separable
/// value factors) of a sequence's tokens must never see its padding, or a left-padded row
/// would be quantized differently from the same row alone.
fn split_padding(rows: &RowBatch, first_valid: u32, d: usize) -> [RowBatch; 2] {
    let pad: Vec<bool> = rows.positions.iter().map(|&p| p < first_valid).collect();
    let valid: Vec<bool> = pad.iter().map(|&p| !p).collect();
    [rows.select(&pad, d), rows.select(&valid, d)]
}

/// Plan the classification of one stream's buffer (see [`Plan`]).
/// `pooled`: the sequence's scores from [`pooled_scores`], ranked instead of the stream's own.
pub(super) fn plan_stream(
    policy: Policy,
    s: &Stream,
    seen: usize,
    first_valid: u32,
    pooled: Option<&[f32]>,
) -> Result<Plan> {
    let valid_tokens = seen.saturating_sub(first_valid as usize);
    let d = s.buffer.keys.dim;
    let nothing = |n| Plan {
        take_buffer: vec![false; n],
        take_high: None,
        to_high: Vec::new(),
        to_low: Vec::new(),
        moved: Vec::new(),
    };
    match policy {
        Policy::Full => Ok(nothing(s.buffer.len())),
        Policy::Mikv(c) => {
            let budget = (c.ratio * valid_tokens as f64).round() as usize;
            let n_recent = (c.recent_share * budget as f64).round() as usize;
            plan_retain_important(s, budget, n_recent, first_valid, true)
        }
        Policy::Eviction(c) => {
            let budget = (c.budget * valid_tokens as f64).round() as usize;
            let n_recent = (c.recent_share * budget as f64).round() as usize;
            plan_retain_important(s, budget, n_recent, first_valid, false)
        }
        Policy::ZipCache(c) => {
            let n = s.buffer.len();
            let all = s.buffer.read(&vec![true; n]);
            let own;
            let scores = match pooled {
                Some(p) => p,
                None => {
                    own = ranking_scores(&c, &all.acc, &all.count);
                    &own
                }
            };
            // Attention sinks: the sequence's first `sink_tokens` valid positions.
            let sink_end = first_valid as u64 + c.sink_tokens as u64;
            let sink: Vec<bool> = all
                .positions
                .iter()
                .map(|&p| p >= first_valid && (p as u64) < sink_end)
                .collect();
            let n_valid = all.positions.iter().filter(|&&p| p >= first_valid).count();
            let ranked: Vec<usize> = (0..n)
                .filter(|&i| all.positions[i] >= first_valid && !sink[i])
                .collect();
            // The sinks are part of the salient budget, not on top of it.
            let n_sinks = sink.iter().filter(|&&x| x).count();
            let n_salient =
                ((c.salient_ratio * n_valid as f64).round() as usize).saturating_sub(n_sinks);
            let ranked_scores: Vec<f32> = ranked.iter().map(|&i| scores[i]).collect();
            let mut salient = vec![false; n];
            for j in top_k(&ranked_scores, n_salient) {
                salient[ranked[j]] = true;
            }
            let regular: Vec<bool> = (0..n).map(|i| !salient[i] && !sink[i]).collect();
            let [pad, rest] = split_padding(&all.select(&regular, d), first_valid, d);
            let mut to_low = vec![s.low.prepare(&pad)?];
            // The regular tokens in position order, `key_block` per segment (the last one
            // shorter); one segment when `key_block` is 0 or not smaller than their count.
            let block = if c.key_block == 0 {
                rest.len()
            } else {
                c.key_block
            }
            .max(1);
            for start in (0..rest.len().max(1)).step_by(block) {
                let span = start..start + block;
                let pick: Vec<bool> = (0..rest.len()).map(|i| span.contains(&i)).collect();
                to_low.push(s.low.prepare(&rest.select(&pick, d))?);
            }
            Ok(Plan {
                take_buffer: vec![true; n],
                take_high: None,
                // The sinks first, as a segment of their own (empty without sinks).
                to_high: vec![
                    s.high.prepare(&all.select(&sink, d))?,
                    s.high.prepare(&all.select(&salient, d))?,
                ],
                to_low,
                moved: all.positions,
            })
        }
        Policy::Uniform(c) => {
            let n = s.buffer.len();
            let positions = s.buffer.positions.to_vec();
            let is_pad: Vec<bool> = positions.iter().map(|&p| p < first_valid).collect();
            let n_valid = is_pad.iter().filter(|&&p| !p).count();
            let n_flush = n_valid / c.residual * c.residual;
            // Padding, then whole blocks of `residual` valid tokens counted from the first
            // valid one (as the sequence alone would count them); buffer rows are in position
            // order.
            let mut flush = vec![false; n];
            let mut taken = 0;
            for i in 0..n {
                if is_pad[i] {
                    flush[i] = true;
                } else if taken < n_flush {
                    flush[i] = true;
                    taken += 1;
                }
            }
            let rows = s.buffer.read(&flush);
            let [pad, valid] = split_padding(&rows, first_valid, d);
            let mut to_low = vec![s.low.prepare(&pad)?];
            // One segment per block of `residual` tokens: keys get per-channel statistics per block.
            for blk in 0..n_flush / c.residual {
                let pick: Vec<bool> = (0..n_flush).map(|i| i / c.residual == blk).collect();
                to_low.push(s.low.prepare(&valid.select(&pick, d))?);
            }
            Ok(Plan {
                take_buffer: flush,
                take_high: None,
                to_high: Vec::new(),
                to_low,
                moved: rows.positions,
            })
        }
    }
}

/// Keep the important set (high tier + buffer candidates) in the high tier; the others are
/// demoted to the low tier (`demote`) or dropped.
fn plan_retain_important(
    s: &Stream,
    budget: usize,
    n_recent: usize,
    first_valid: u32,
    demote: bool,
) -> Result<Plan> {
    let d = s.buffer.keys.dim;
    let score = |t: &Tier, r: usize| t.scores.as_ref().map_or(0.0, |x| x.acc[r]);
    let mut candidates = Vec::new();
    for t in [&s.high, &s.buffer] {
        for r in 0..t.len() {
            let p = t.positions.get(r);
            candidates.push((p, score(t, r), p >= first_valid));
        }
    }
    let important = heavy_and_recent(&candidates, budget, n_recent);
    let (in_high, in_buffer) = important.split_at(s.high.len());
    let leaving: Vec<bool> = in_high.iter().map(|&i| !i).collect();
    let n_buf = s.buffer.len();
    let incoming = s.buffer.read(&vec![true; n_buf]);
    let to_low: Vec<bool> = in_buffer.iter().map(|&i| !i).collect();
    let to_high = vec![s.high.prepare(&incoming.select(in_buffer, d))?];
    let mut plan_low = Vec::new();
    let demoted_positions: Vec<u32> = (0..s.high.len())
        .filter(|&r| leaving[r])
        .map(|r| s.high.positions.get(r))
        .collect();
    if demote {
        // Only the demoted rows are decoded (from their high-precision values).
        let demoted = s.high.read(&leaving);
        let [pad, rest] = split_padding(&incoming.select(&to_low, d), first_valid, d);
        plan_low = vec![
            s.low.prepare(&demoted)?,
            s.low.prepare(&pad)?,
            s.low.prepare(&rest)?,
        ];
    }
    Ok(Plan {
        take_buffer: vec![true; n_buf],
        take_high: Some(leaving),
        to_high,
        to_low: plan_low,
        moved: [demoted_positions, incoming.positions].concat(),
    })
}
