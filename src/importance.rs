//! Token importance: probe-query attention at prefill, accumulated and normalized scores,
//! and deterministic top-k selection.
//!
//! * Accumulated attention (H2O, used by MiKV): the softmax probability each token received,
//!   summed over the query heads of its GQA group and over every scored query.
//! * Normalized attention (ZipCache): accumulated attention divided by the number of scored
//!   queries that could see the token. Plain accumulation favours early tokens simply because
//!   more queries see them. The exact count is the default; ZipCache's public code divides by
//!   `L - j` (the count in the full attention matrix) even when only probe rows were scored,
//!   available as [`CountMode::FullMatrix`].

use crate::element::Element;
use crate::error::{KvmixError, Result};

/// How to count the queries that saw token `j` during a probed prefill.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub enum CountMode {
    /// Probe rows at or after `j`.
    Exact,
    /// `L - j`, as ZipCache's public code does.
    FullMatrix,
}

/// Probe query positions for a prompt of `len` tokens: the `ceil(recent·len)` most recent plus
/// `ceil(random·len)` distinct uniformly random earlier positions (seeded), sorted.
pub fn probe_positions(len: usize, recent: f64, random: f64, seed: u64) -> Result<Vec<usize>> {
    for (name, v) in [("recent", recent), ("random", random)] {
        if !(0.0..=1.0).contains(&v) {
            return Err(KvmixError::Config(format!(
                "probe fraction `{name}` must be in [0, 1], got {v}"
            )));
        }
    }
    // Positions are u32 in the store; checked before allocating (2**40 aborted the process).
    let limit = crate::store::layer::MAX_POSITIONS;
    if len > limit {
        return Err(KvmixError::Shape(format!(
            "probe `length` {len} is beyond the limit of {limit} positions"
        )));
    }
    let n_recent = ((recent * len as f64).ceil() as usize).clamp(usize::from(len > 0), len);
    let earlier = len - n_recent;
    let n_random = ((random * len as f64).ceil() as usize).min(earlier);
    let mut out: Vec<usize> = Vec::new();
    out.try_reserve_exact(n_random + n_recent).map_err(|_| {
        KvmixError::Shape(format!(
            "{} probe positions for length {len} do not fit in memory",
            n_random + n_recent
        ))
    })?;
    // Partial Fisher-Yates over the earlier positions with a SplitMix64 stream; the pool is
    // sparse (only swapped slots are stored), so memory follows the probes, not the length.
    let mut pool: std::collections::HashMap<usize, usize> = std::collections::HashMap::new();
    let mut state = seed;
    for i in 0..n_random {
        state = state.wrapping_add(0x9E37_79B9_7F4A_7C15);
        let mut z = state;
        z = (z ^ (z >> 30)).wrapping_mul(0xBF58_476D_1CE4_E5B9);
        z = (z ^ (z >> 27)).wrapping_mul(0x94D0_49BB_1331_11EB);
        z ^= z >> 31;
        let j = i + (z % (earlier - i) as u64) as usize;
        let (pi, pj) = (*pool.get(&i).unwrap_or(&i), *pool.get(&j).unwrap_or(&j));
        pool.insert(i, pj);
        pool.insert(j, pi);
        out.push(pj);
    }
    out.extend(earlier..len);
    out.sort_unstable();
    Ok(out)
}

/// Refuse NaN/Inf in `q`, `k` or `scale`, and inputs whose logits `scale · q·k` could pass
/// 1e37 (a softmax over infinite logits is NaN, silently zeroed downstream).
pub fn check_logits<T: Element>(q: &[T], k: &[T], d: usize, scale: f32) -> Result<()> {
    if !scale.is_finite() {
        return Err(KvmixError::NonFinite(format!(
            "`scale` must be finite, got {scale}"
        )));
    }
    let mut q_l1 = 0f64;
    for row in q.chunks(d.max(1)) {
        let mut l1 = 0f64;
        for x in row {
            let x = x.to_f32();
            if !x.is_finite() {
                return Err(KvmixError::NonFinite(format!("queries contain {x}")));
            }
            l1 += x.abs() as f64;
        }
        q_l1 = q_l1.max(l1);
    }
    let mut k_max = 0f64;
    for x in k {
        let x = x.to_f32();
        if !x.is_finite() {
            return Err(KvmixError::NonFinite(format!("keys contain {x}")));
        }
        k_max = k_max.max(x.abs() as f64);
    }
    let bound = q_l1 * k_max * scale.abs() as f64;
    if bound > 1e37 {
        return Err(KvmixError::NonFinite(format!(
            "queries (L1 norm up to {q_l1:e}), keys (up to {k_max:e}) and scale {scale} could give \
             logits beyond float32 (bound {bound:e})"
        )));
    }
    Ok(())
}

/// Causal softmax attention of the probe rows of `q` (`[batch, q_heads, len, d]`) over `k`
/// (`[batch, kv_heads, len, d]`), reduced to per-token importance: returns `(acc, count)`,
/// each `[batch, kv_heads, len]`. `first_valid[b]` masks left padding (keys before it get
/// nothing, and padded probe rows are skipped).
#[allow(clippy::too_many_arguments)]
pub fn probe_scores<T: Element>(
    q: &[T],
    q_dims: &[usize],
    k: &[T],
    k_dims: &[usize],
    probes: &[usize],
    scale: f32,
    first_valid: &[usize],
    count_mode: CountMode,
) -> Result<(Vec<f32>, Vec<f32>)> {
    let (b, hq, len, d, hk) = match (q_dims, k_dims) {
        ([b, hq, lq, d], [bk, hk, lk, dk]) if b == bk && lq == lk && d == dk && *hk > 0 && hq % hk == 0 => {
            (*b, *hq, *lq, *d, *hk)
        }
        _ => {
            return Err(KvmixError::Shape(format!(
                "probe scoring needs queries [batch, q_heads, len, d] and keys [batch, kv_heads, len, d] \
                 with q_heads a multiple of kv_heads; got {q_dims:?} and {k_dims:?}"
            )))
        }
    };
    if q.len() != b * hq * len * d || k.len() != b * hk * len * d {
        return Err(KvmixError::Shape(
            "data length does not match the given shapes".into(),
        ));
    }
    if let Some(&p) = probes.iter().find(|&&p| p >= len) {
        return Err(KvmixError::Shape(format!(
            "probe position {p} is outside the {len} tokens"
        )));
    }
    if first_valid.len() != b {
        return Err(KvmixError::Shape(format!(
            "`first_valid` needs one entry per sequence ({b}), got {}",
            first_valid.len()
        )));
    }
    check_logits(q, k, d, scale)?;
    let rep = hq / hk;
    let mut acc = vec![0f32; b * hk * len];
    let mut count = vec![0f32; b * hk * len];
    let mut logits = vec![0f32; len];
    for bi in 0..b {
        let start = first_valid[bi].min(len);
        for h in 0..hk {
            let out = &mut acc[(bi * hk + h) * len..(bi * hk + h + 1) * len];
            let kb = &k[(bi * hk + h) * len * d..(bi * hk + h + 1) * len * d];
            for r in 0..rep {
                let qh = bi * hq + h * rep + r;
                for &p in probes.iter().filter(|&&p| p >= start) {
                    let qrow: Vec<f32> = q[(qh * len + p) * d..(qh * len + p + 1) * d]
                        .iter()
                        .map(|x| x.to_f32())
                        .collect();
                    let mut max = f32::NEG_INFINITY;
                    for j in start..=p {
                        let dot: f32 = qrow
                            .iter()
                            .zip(&kb[j * d..(j + 1) * d])
                            .map(|(a, b)| a * b.to_f32())
                            .sum();
                        logits[j] = dot * scale;
                        max = max.max(logits[j]);
                    }
                    let mut sum = 0f32;
                    for l in &mut logits[start..=p] {
                        *l = (*l - max).exp();
                        sum += *l;
                    }
                    for j in start..=p {
                        out[j] += logits[j] / sum;
                    }
                }
            }
            let cnt = &mut count[(bi * hk + h) * len..(bi * hk + h + 1) * len];
            for (j, c) in cnt.iter_mut().enumerate().skip(start) {
                *c = match count_mode {
                    CountMode::Exact => probes.iter().filter(|&&p| p >= j).count() as f32,
                    CountMode::FullMatrix => (len - j) as f32,
                };
            }
        }
    }
    Ok((acc, count))
}

/// Indices of the `k` largest `scores`; ties go to the higher index (the more recent token).
/// Deterministic for equal inputs; NaN ranks lowest.
pub fn top_k(scores: &[f32], k: usize) -> Vec<usize> {
    let k = k.min(scores.len());
    let mut idx: Vec<usize> = (0..scores.len()).collect();
    if k == 0 {
        return Vec::new();
    }
    let key = |i: usize| {
        if scores[i].is_nan() {
            f32::NEG_INFINITY
        } else {
            scores[i]
        }
    };
    // A total order (score, then index), so the partition is unique: the k best are the same
    // set a full sort would give, found in linear time (MiKV re-ranks its important set at
    // every decoding step).
    idx.select_nth_unstable_by(k - 1, |&a, &b| key(b).total_cmp(&key(a)).then(b.cmp(&a)));
    idx.truncate(k);
    idx.sort_unstable();
    idx
}

/// Normalized score `acc / count` (0 where no query has seen the token yet).
pub fn normalized(acc: &[f32], count: &[f32]) -> Vec<f32> {
    acc.iter()
        .zip(count)
        .map(|(&a, &c)| if c > 0.0 { a / c } else { 0.0 })
        .collect()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn probes_are_recent_plus_distinct_random() {
        let p = probe_positions(100, 0.05, 0.05, 7).unwrap();
        assert_eq!(p.len(), 10);
        assert!((95..100).all(|i| p.contains(&i)));
        let mut u = p.clone();
        u.dedup();
        assert_eq!(u.len(), p.len());
        assert_eq!(p, probe_positions(100, 0.05, 0.05, 7).unwrap());
        assert_ne!(p, probe_positions(100, 0.05, 0.05, 8).unwrap());
    }

    #[test]
    fn probe_fraction_out_of_range_is_refused() {
        assert!(probe_positions(10, 1.5, 0.0, 0).is_err());
    }

    #[test]
    fn top_k_breaks_ties_toward_recent() {
        assert_eq!(top_k(&[1.0, 3.0, 3.0, 2.0], 1), vec![2]);
        assert_eq!(top_k(&[1.0, f32::NAN, 0.5], 2), vec![0, 2]);
        assert_eq!(top_k(&[1.0, 2.0], 0), Vec::<usize>::new());
        assert_eq!(top_k(&[1.0, 2.0], 5), vec![0, 1]);
        // Against a full sort, with many ties and NaNs.
        let mut state = 7u64;
        for n in [1usize, 2, 17, 300] {
            let scores: Vec<f32> = (0..n)
                .map(|_| {
                    state = state
                        .wrapping_mul(6364136223846793005)
                        .wrapping_add(1442695040888963407);
                    match state >> 61 {
                        0 => f32::NAN,
                        r => (r % 4) as f32,
                    }
                })
                .collect();
            for k in 0..=n {
                let mut want: Vec<usize> = (0..n).collect();
                let key = |i: usize| {
                    if scores[i].is_nan() {
                        f32::NEG_INFINITY
                    } else {
                        scores[i]
                    }
                };
                want.sort_by(|&a, &b| key(b).total_cmp(&key(a)).then(b.cmp(&a)));
                want.truncate(k);
                want.sort_unstable();
                assert_eq!(top_k(&scores, k), want, "n={n} k={k}");
            }
        }
    }

    #[test]
    fn probe_rows_sum_to_one_each() {
        let (b, hq, hk, len, d) = (1, 2, 1, 6, 4);
        let q: Vec<f32> = (0..b * hq * len * d)
            .map(|i| (i as f32 * 0.37).sin())
            .collect();
        let k: Vec<f32> = (0..b * hk * len * d)
            .map(|i| (i as f32 * 0.11).cos())
            .collect();
        let probes = [2, 5];
        let (acc, count) = probe_scores(
            &q,
            &[b, hq, len, d],
            &k,
            &[b, hk, len, d],
            &probes,
            0.5,
            &[0],
            CountMode::Exact,
        )
        .unwrap();
        let total: f32 = acc.iter().sum();
        assert!((total - (probes.len() * hq) as f32).abs() < 1e-5);
        assert_eq!(count, vec![2.0, 2.0, 2.0, 1.0, 1.0, 1.0]);
    }
}
