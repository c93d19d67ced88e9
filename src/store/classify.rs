//! Classification: moving a stream's buffered tokens into its tiers under each policy, and
//! for the heavy-hitter policies (MiKV, H2O eviction) trimming the important set back to its
//! budget, demoting or dropping what leaves it.

use super::layer::Stream;
use super::policy::{Policy, Selection, ZipCacheConfig};
use super::tier::Tier;
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

/// Classify the buffer of one stream; returns the positions whose representation changed.
/// `pooled`: the sequence's scores from [`pooled_scores`], ranked instead of the stream's own.
pub(super) fn classify_stream(
    policy: Policy,
    s: &mut Stream,
    seen: usize,
    first_valid: u32,
    pooled: Option<&[f32]>,
) -> Result<Vec<u32>> {
    let valid_tokens = seen.saturating_sub(first_valid as usize);
    match policy {
        Policy::Full => Ok(Vec::new()),
        Policy::Mikv(c) => {
            let budget = (c.ratio * valid_tokens as f64).round() as usize;
            let n_recent = (c.recent_share * budget as f64).round() as usize;
            retain_important(s, budget, n_recent, first_valid, true)
        }
        Policy::Eviction(c) => {
            let budget = (c.budget * valid_tokens as f64).round() as usize;
            let n_recent = (c.recent_share * budget as f64).round() as usize;
            retain_important(s, budget, n_recent, first_valid, false)
        }
        Policy::ZipCache(c) => {
            let n = s.buffer.len();
            let all = s.buffer.take(&vec![true; n]);
            let own;
            let scores = match pooled {
                Some(p) => p,
                None => {
                    own = ranking_scores(&c, &all.acc, &all.count);
                    &own
                }
            };
            let valid: Vec<usize> = (0..n)
                .filter(|&i| all.positions[i] >= first_valid)
                .collect();
            let n_salient = (c.salient_ratio * valid.len() as f64).round() as usize;
            let valid_scores: Vec<f32> = valid.iter().map(|&i| scores[i]).collect();
            let mut salient = vec![false; n];
            for j in top_k(&valid_scores, n_salient) {
                salient[valid[j]] = true;
            }
            let regular: Vec<bool> = salient.iter().map(|&x| !x).collect();
            s.high.push(&all.select(&salient, s.buffer.keys.dim))?;
            s.low.push(&all.select(&regular, s.buffer.keys.dim))?;
            Ok(all.positions)
        }
        Policy::Uniform(c) => {
            let n_flush = s.buffer.len() / c.residual * c.residual;
            let pick: Vec<bool> = (0..s.buffer.len()).map(|i| i < n_flush).collect();
            let rows = s.buffer.take(&pick);
            let d = s.buffer.keys.dim;
            // One segment per block of `residual` tokens: keys get per-channel statistics per block.
            for blk in 0..n_flush / c.residual {
                let pick: Vec<bool> = (0..n_flush).map(|i| i / c.residual == blk).collect();
                s.low.push(&rows.select(&pick, d))?;
            }
            Ok(rows.positions)
        }
    }
}

/// Keep the important set (high tier + buffer candidates) in the high tier; the others are
/// demoted to the low tier (`demote`) or dropped. Returns the positions that moved.
fn retain_important(
    s: &mut Stream,
    budget: usize,
    n_recent: usize,
    first_valid: u32,
    demote: bool,
) -> Result<Vec<u32>> {
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
    let demoted = s.high.take(&leaving);
    let n_buf = s.buffer.len();
    let incoming = s.buffer.take(&vec![true; n_buf]);
    let to_low: Vec<bool> = in_buffer.iter().map(|&i| !i).collect();
    s.high.push(&incoming.select(in_buffer, d))?;
    if demote {
        s.low.push(&demoted)?;
        s.low.push(&incoming.select(&to_low, d))?;
    }
    Ok([demoted.positions, incoming.positions].concat())
}
