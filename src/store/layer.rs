//! The mixed-precision KV store of one attention layer.
//!
//! One stream per `(sequence, kv-head)`, each with three tiers: a full-precision `buffer` of
//! the newest, not yet classified tokens, a `high` tier and a `low` tier (their codecs come
//! from the [`Policy`]). Every token keeps its position. Tokens enter the buffer; a
//! classification (at prefill, then every `streaming_gap` appends) moves them to a tier, and
//! for MiKV also demotes high-tier tokens that fell out of the important set — quantizing
//! them from their high-precision values, never from already quantized ones.

use super::classify::{plan_stream, pooled_scores, Plan};
use super::codec::{Codec, DenseDtype, Factor};
use super::dense::DenseSync;
use super::policy::{Layout, Policy, DENSE_MAX, F16_MAX};
use super::tier::{RowBatch, Tier, TierBytes};
use crate::element::Element;
use crate::error::{KvmixError, Result};
use rayon::prelude::*;

/// Most sequences a store holds: `select_batch` / `repeat_interleave` refuse more before
/// allocating (a stream per sequence and kv-head, each with its own tiers).
pub const MAX_BATCH: usize = 1 << 16;

/// Most positions a store assigns: positions are stored as `u32`.
pub const MAX_POSITIONS: usize = u32::MAX as usize;

/// Elements per task of the parallel NaN/Inf check of appended keys/values.
const CHECK_CHUNK: usize = 1 << 16;

#[derive(Clone, Debug, PartialEq)]
pub struct Stream {
    pub buffer: Tier,
    pub high: Tier,
    pub low: Tier,
}

impl Stream {
    pub fn len(&self) -> usize {
        self.buffer.len() + self.high.len() + self.low.len()
    }

    pub fn is_empty(&self) -> bool {
        self.len() == 0
    }

    pub fn tiers(&self) -> [&Tier; 3] {
        [&self.buffer, &self.high, &self.low]
    }

    fn tiers_mut(&mut self) -> [&mut Tier; 3] {
        [&mut self.buffer, &mut self.high, &mut self.low]
    }

    /// `(tier index, row)` of every token, in position order.
    pub fn position_order(&self) -> Vec<(usize, usize, u32)> {
        let mut order: Vec<(usize, usize, u32)> = self
            .tiers()
            .iter()
            .enumerate()
            .flat_map(|(t, tier)| (0..tier.len()).map(move |r| (t, r, tier.positions.get(r))))
            .collect();
        order.sort_unstable_by_key(|&(_, _, p)| p);
        order
    }
}

/// Bytes held by a layer (or a whole cache), per tier, plus what a dense fp16 cache of the
/// same tokens would take.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct MemoryReport {
    pub buffer: TierBytes,
    pub high: TierBytes,
    pub low: TierBytes,
    /// Tokens held (summed over streams).
    pub tokens: usize,
    /// Bytes of a dense fp16 cache of every token seen (summed over streams).
    pub fp16_bytes: usize,
}

impl MemoryReport {
    pub fn total(&self) -> usize {
        self.buffer.total() + self.high.total() + self.low.total()
    }

    pub fn add(&mut self, o: &MemoryReport) {
        self.buffer.add(o.buffer);
        self.high.add(o.high);
        self.low.add(o.low);
        self.tokens += o.tokens;
        self.fp16_bytes += o.fp16_bytes;
    }
}

#[derive(Clone, Debug)]
pub struct LayerStore {
    pub policy: Policy,
    pub layout: Layout,
    pub kv_heads: usize,
    pub head_dim: usize,
    pub batch: usize,
    pub streams: Vec<Stream>,
    /// First non-padding position of each sequence.
    pub first_valid: Vec<usize>,
    seen: usize,
    appends_since_classify: usize,
    classified_once: bool,
    balancer: Option<Vec<f32>>,
    /// Largest |key| appended since the last reset: bounds the attention logits, so a query
    /// that would overflow them is refused instead of giving a silently wrong softmax.
    max_abs_key: f32,
    /// What the last [`Self::dense_into`] wrote, so that the next call rewrites only what
    /// changed (`None`: everything must be rewritten).
    pub(super) dense_sync: Option<DenseSync>,
}

impl LayerStore {
    pub fn new(
        policy: Policy,
        kv_heads: usize,
        head_dim: usize,
        buffer: DenseDtype,
    ) -> Result<Self> {
        if kv_heads == 0 || head_dim == 0 {
            return Err(KvmixError::Shape(format!(
                "kv_heads and head_dim must be positive, got {kv_heads} and {head_dim}"
            )));
        }
        let layout = policy.layout(head_dim, buffer)?;
        Ok(LayerStore {
            policy,
            layout,
            kv_heads,
            head_dim,
            batch: 0,
            streams: Vec::new(),
            first_valid: Vec::new(),
            seen: 0,
            appends_since_classify: 0,
            classified_once: false,
            balancer: None,
            max_abs_key: 0.0,
            dense_sync: None,
        })
    }

    fn new_stream(&self) -> Result<Stream> {
        let l = &self.layout;
        let d = self.head_dim;
        let buf = Codec::Dense(l.buffer);
        let mut s = Stream {
            buffer: Tier::new(buf, buf, d, true)?,
            high: Tier::new(l.high.0, l.high.1, d, l.high_scored)?,
            low: Tier::new(l.low.0, l.low.1, d, false)?,
        };
        if let Some(b) = &self.balancer {
            set_stream_balancer(&mut s, b)?;
        }
        Ok(s)
    }

    /// Tokens seen so far (positions assigned), whether or not they are still held.
    pub fn seen(&self) -> usize {
        self.seen
    }

    /// Whether the key balancer is required and still missing.
    pub fn needs_balancer(&self) -> bool {
        let fixed = |c: Codec| {
            matches!(
                c,
                Codec::TokenGroups {
                    factor: Factor::Fixed,
                    ..
                }
            )
        };
        (fixed(self.layout.high.0) || fixed(self.layout.low.0)) && self.balancer.is_none()
    }

    /// Append new tokens `[batch, kv_heads, n, head_dim]` to the buffer. Refuses NaN/Inf (and
    /// values beyond fp16 range when a tier stores fp16) before touching the store.
    pub fn append<T: Element>(&mut self, keys: &[T], values: &[T], dims: &[usize]) -> Result<()> {
        let [b, h, n, d] = match *dims {
            [b, h, n, d] => [b, h, n, d],
            _ => {
                return Err(KvmixError::Shape(format!(
                    "keys/values must be [batch, kv_heads, tokens, head_dim], got shape {dims:?}"
                )))
            }
        };
        if h != self.kv_heads || d != self.head_dim {
            return Err(KvmixError::Shape(format!(
                "expected {} kv heads of head_dim {}, got shape {dims:?}",
                self.kv_heads, self.head_dim
            )));
        }
        if self.batch != 0 && b != self.batch {
            return Err(KvmixError::Shape(format!(
                "the store holds a batch of {} sequences, got keys for {b}",
                self.batch
            )));
        }
        if b == 0 {
            return Err(KvmixError::Shape(format!(
                "keys/values must hold at least one sequence, got batch 0 (shape {dims:?})"
            )));
        }
        if self.seen.saturating_add(n) > MAX_POSITIONS {
            return Err(KvmixError::Shape(format!(
                "the store has assigned {} positions; {n} more would pass the limit of \
                 {MAX_POSITIONS} (positions are stored as u32)",
                self.seen
            )));
        }
        if keys.len() != b * h * n * d || values.len() != keys.len() {
            return Err(KvmixError::Shape(format!(
                "keys ({}) and values ({}) must both hold {} elements for shape {dims:?}",
                keys.len(),
                values.len(),
                b * h * n * d
            )));
        }
        if n == 0 {
            return Ok(()); // nothing to store: no position assigned, no classification due
        }
        let limit = self.layout.magnitude_limit();
        let bad = crate::parallel::run(keys.len() * 2, |parallel| {
            let find = |chunk: &[T]| {
                chunk
                    .iter()
                    .map(|x| x.to_f32())
                    .find(|x| !x.is_finite() || x.abs() > limit)
            };
            if parallel {
                let chunks = keys
                    .par_chunks(CHECK_CHUNK)
                    .chain(values.par_chunks(CHECK_CHUNK));
                chunks.find_map_first(find)
            } else {
                keys.chunks(CHECK_CHUNK)
                    .chain(values.chunks(CHECK_CHUNK))
                    .find_map(find)
            }
        });
        if let Some(x) = bad {
            return Err(KvmixError::NonFinite(format!(
                "keys/values contain {x}; kvmix refuses NaN/Inf{}",
                if limit <= DENSE_MAX {
                    format!(
                        " and magnitudes beyond {limit}, the most this policy's fp16 storage and \
                         fp16 quantization parameters can hold"
                    )
                } else {
                    String::new()
                }
            )));
        }
        if let Some(inverse) = &self.balancer {
            check_balanced_keys(keys, inverse, n, d, limit)?;
        }
        let key_max = keys.iter().fold(0f32, |m, x| m.max(x.to_f32().abs()));
        if self.batch == 0 {
            self.batch = b;
            self.first_valid = vec![0; b];
            self.streams = (0..b * h)
                .map(|_| self.new_stream())
                .collect::<Result<_>>()?;
        }
        let start = self.seen as u32;
        let push = |(s, stream): (usize, &mut Stream)| {
            let rows = RowBatch {
                positions: (start..start + n as u32).collect(),
                keys: keys[s * n * d..(s + 1) * n * d]
                    .iter()
                    .map(|x| x.to_f32())
                    .collect(),
                values: values[s * n * d..(s + 1) * n * d]
                    .iter()
                    .map(|x| x.to_f32())
                    .collect(),
                acc: vec![0.0; n],
                count: vec![0.0; n],
            };
            stream.buffer.push(&rows)
        };
        // Streams are independent: a prompt's copy into the buffers runs one stream per thread.
        crate::parallel::run(keys.len(), |parallel| {
            if parallel {
                self.streams.par_iter_mut().enumerate().try_for_each(push)
            } else {
                self.streams.iter_mut().enumerate().try_for_each(push)
            }
        })?;
        self.seen += n;
        self.appends_since_classify += 1;
        self.max_abs_key = self.max_abs_key.max(key_max);
        Ok(())
    }

    /// Mark positions before `first_valid[b]` of sequence `b` as left padding: they are never
    /// ranked important.
    pub fn set_first_valid(&mut self, first_valid: &[usize]) -> Result<()> {
        if first_valid.len() != self.batch {
            return Err(KvmixError::Shape(format!(
                "`first_valid` needs one entry per sequence ({}), got {}",
                self.batch,
                first_valid.len()
            )));
        }
        self.first_valid = first_valid.to_vec();
        Ok(())
    }

    /// MiKV's key balancer `b` `[batch, kv_heads, head_dim]`: keys are stored as `Q(k·b)`.
    pub fn set_key_balancer(&mut self, balancer: &[f32]) -> Result<()> {
        let n = self.batch * self.kv_heads * self.head_dim;
        if self.batch == 0 || balancer.len() != n {
            return Err(KvmixError::Shape(format!(
                "the key balancer must be [batch, kv_heads, head_dim] = {n} values after the first \
                 append, got {}",
                balancer.len()
            )));
        }
        if self.balancer.is_some() {
            return Err(KvmixError::Config(
                "the key balancer is already set: keys already quantized were scaled by it, so \
                 a second one would misread them (reset() the store to start over)"
                    .into(),
            ));
        }
        if balancer.iter().any(|&b| !b.is_finite() || b <= 0.0) {
            return Err(KvmixError::NonFinite(
                "key balancer factors must be finite and positive".into(),
            ));
        }
        let inverse: Vec<f32> = balancer.iter().map(|&b| 1.0 / b).collect();
        // The fp16 factor is what quantization divides by: it must stay a positive normal
        // fp16 number, and the buffered keys scaled by it must stay encodable.
        if inverse
            .iter()
            .any(|&f| !(half::f16::MIN_POSITIVE.to_f32()..=F16_MAX).contains(&f))
        {
            return Err(KvmixError::NonFinite(format!(
                "key balancer factors must lie in [{}, {}] so that their inverses fit fp16",
                1.0 / F16_MAX,
                1.0 / half::f16::MIN_POSITIVE.to_f32()
            )));
        }
        let limit = self.layout.magnitude_limit();
        for (s, stream) in self.streams.iter().enumerate() {
            let rows = stream.buffer.read(&vec![true; stream.buffer.len()]);
            let inv = &inverse[s * self.head_dim..(s + 1) * self.head_dim];
            check_balanced_keys(&rows.keys, inv, rows.len(), self.head_dim, limit)?;
        }
        for (s, stream) in self.streams.iter_mut().enumerate() {
            set_stream_balancer(stream, &inverse[s * self.head_dim..(s + 1) * self.head_dim])?;
        }
        self.balancer = Some(inverse);
        self.dense_sync = None;
        Ok(())
    }

    /// Add importance to the tokens at positions `[start, start + n)` of every stream:
    /// `acc` and `count` are `[batch, kv_heads, n]`.
    pub fn add_scores(&mut self, start: usize, acc: &[f32], count: &[f32]) -> Result<()> {
        let per = self.streams.len();
        if per == 0 || !acc.len().is_multiple_of(per) || acc.len() != count.len() {
            return Err(KvmixError::Shape(format!(
                "scores must be [batch, kv_heads, tokens] for {per} streams, got {} and {} values",
                acc.len(),
                count.len()
            )));
        }
        if let Some(x) = acc
            .iter()
            .chain(count)
            .find(|x| !x.is_finite() || **x < 0.0)
        {
            return Err(KvmixError::NonFinite(format!(
                "importance scores must be finite and non-negative, got {x}"
            )));
        }
        let n = acc.len() / per;
        for (s, stream) in self.streams.iter_mut().enumerate() {
            for tier in stream.tiers_mut() {
                let Some(sc) = tier.scores.as_mut() else {
                    continue;
                };
                for r in 0..tier.positions.len() {
                    let p = tier.positions.get(r) as usize;
                    if p >= start && p < start + n {
                        sc.acc[r] += acc[s * n + p - start];
                        sc.count[r] += count[s * n + p - start];
                    }
                }
            }
        }
        Ok(())
    }

    /// Add attention probabilities `[batch, q_heads, q_len, tokens]` whose columns follow
    /// [`Self::dense`]'s position order; `query_positions` (length `q_len`) decide which
    /// tokens each query could see (for the count).
    pub fn accumulate_dense(
        &mut self,
        probs: &[f32],
        dims: &[usize],
        query_positions: &[usize],
    ) -> Result<()> {
        let [b, hq, tq, tk] = match *dims {
            [b, hq, tq, tk] => [b, hq, tq, tk],
            _ => {
                return Err(KvmixError::Shape(format!(
                    "probabilities must be 4-D, got {dims:?}"
                )))
            }
        };
        let held = self.streams.first().map_or(0, |s| s.len());
        if b != self.batch
            || hq % self.kv_heads != 0
            || tk != held
            || query_positions.len() != tq
            || probs.len() != b * hq * tq * tk
        {
            return Err(KvmixError::Shape(format!(
                "probabilities must be [batch={}, q_heads (multiple of {}), q_len={}, tokens={held}], got {dims:?}",
                self.batch,
                self.kv_heads,
                query_positions.len()
            )));
        }
        let rep = hq / self.kv_heads;
        for (s, stream) in self.streams.iter_mut().enumerate() {
            let (bi, h) = (s / self.kv_heads, s % self.kv_heads);
            if stream.len() != tk {
                return Err(KvmixError::Shape(
                    "streams of a layer hold different token counts".into(),
                ));
            }
            let order = stream.position_order();
            let mut acc = vec![0f32; tk];
            for r in 0..rep {
                let base = ((bi * hq + h * rep + r) * tq) * tk;
                for qi in 0..tq {
                    let row = &probs[base + qi * tk..base + (qi + 1) * tk];
                    acc.iter_mut().zip(row).for_each(|(a, p)| *a += p);
                }
            }
            let valid = self.first_valid[bi] as u32;
            let tiers = stream.tiers_mut();
            for (j, &(t, row, pos)) in order.iter().enumerate() {
                if let Some(sc) = tiers[t].scores.as_mut() {
                    sc.acc[row] += acc[j];
                    let seen_by = query_positions
                        .iter()
                        .filter(|&&q| q as u32 >= pos && pos >= valid)
                        .count();
                    sc.count[row] += seen_by as f32;
                }
            }
        }
        Ok(())
    }

    /// [`crate::attention::attend`], then add the attention each token received to the
    /// importance scores of the tiers that track them; returns the attention's output.
    pub fn attend_and_track(
        &mut self,
        q: &[f32],
        q_dims: &[usize],
        q_positions: &[usize],
        scale: f32,
    ) -> Result<Vec<f32>> {
        let a = crate::attention::attend(self, q, q_dims, q_positions, scale)?;
        for (stream, (rec, cnt)) in self
            .streams
            .iter_mut()
            .zip(a.received.iter().zip(&a.seen_by))
        {
            for (t, tier) in stream.tiers_mut().into_iter().enumerate() {
                if let Some(sc) = tier.scores.as_mut() {
                    sc.acc.iter_mut().zip(&rec[t]).for_each(|(a, r)| *a += r);
                    sc.count.iter_mut().zip(&cnt[t]).for_each(|(c, n)| *c += n);
                }
            }
        }
        Ok(a.out)
    }

    /// Classify the buffer if the policy says it is time (first call, or `streaming_gap`
    /// appends since the last classification), or if `force`. Returns whether it ran.
    pub fn maybe_classify(&mut self, force: bool) -> Result<bool> {
        let due =
            !self.classified_once || self.appends_since_classify >= self.policy.streaming_gap();
        if !(force || due) || self.streams.is_empty() {
            return Ok(false);
        }
        if self.needs_balancer() {
            return Err(KvmixError::Config(
                "MiKV's key balancer is on: call `set_key_balancer` (from the prompt's queries and \
                 keys) before the first classification, or disable `key_balancer`"
                    .into(),
            ));
        }
        let (policy, seen, kv_heads) = (self.policy, self.seen, self.kv_heads);
        let first_valid = &self.first_valid;
        let pooled = pooled_scores(policy, &self.streams, kv_heads)?;
        let plan = |(s, stream): (usize, &Stream)| {
            let seq = s / kv_heads;
            let pooled = pooled.as_ref().map(|p| p[seq].as_slice());
            plan_stream(policy, stream, seen, first_valid[seq] as u32, pooled)
        };
        // Streams are independent: a prompt's quantization runs one stream per thread; the
        // classification of a few buffered decoding tokens stays on this thread. Every
        // stream's rows are encoded before any stream changes, so a refusal (a value no tier
        // can encode) leaves the whole store as it was.
        let buffered: usize = self.streams.iter().map(|s| s.buffer.len()).sum();
        let work = buffered * self.head_dim;
        let plans: Vec<Plan> = crate::parallel::run(work, |parallel| {
            if parallel {
                self.streams
                    .par_iter()
                    .enumerate()
                    .map(plan)
                    .collect::<Result<Vec<Plan>>>()
            } else {
                self.streams.iter().enumerate().map(plan).collect()
            }
        })?;
        let moved: Vec<Vec<u32>> = crate::parallel::run(work, |parallel| {
            if parallel {
                self.streams
                    .par_iter_mut()
                    .zip(plans)
                    .map(|(s, p)| p.apply(s))
                    .collect()
            } else {
                self.streams
                    .iter_mut()
                    .zip(plans)
                    .map(|(s, p)| p.apply(s))
                    .collect()
            }
        });
        if let Some(sync) = &mut self.dense_sync {
            for (s, m) in moved.into_iter().enumerate() {
                sync.moved[s].extend(m);
            }
        }
        self.appends_since_classify = 0;
        self.classified_once = true;
        Ok(true)
    }

    /// Drop every token at position `>= len`.
    pub fn crop(&mut self, len: usize) {
        if len >= self.seen {
            return;
        }
        for stream in &mut self.streams {
            for tier in stream.tiers_mut() {
                let keep: Vec<bool> = (0..tier.len())
                    .map(|r| (tier.positions.get(r) as usize) < len)
                    .collect();
                tier.retain(&keep);
            }
        }
        self.seen = len;
        if let Some(sync) = &mut self.dense_sync {
            sync.tokens = sync.tokens.min(len);
        }
    }

    /// Keep (and reorder) the sequences `indices` of the batch; an index may repeat.
    pub fn select_batch(&mut self, indices: &[usize]) -> Result<()> {
        if indices.len() > MAX_BATCH {
            return Err(KvmixError::Shape(format!(
                "select_batch would hold {} sequences; the limit is {MAX_BATCH}",
                indices.len()
            )));
        }
        if let Some(&bad) = indices.iter().find(|&&i| i >= self.batch) {
            return Err(KvmixError::Shape(format!(
                "batch index {bad} out of range for a batch of {}",
                self.batch
            )));
        }
        if indices.is_empty() {
            // No sequence left: nothing is held and nothing counted (as after `reset`).
            self.reset();
            return Ok(());
        }
        let h = self.kv_heads;
        self.streams = indices
            .iter()
            .flat_map(|&i| self.streams[i * h..(i + 1) * h].iter().cloned())
            .collect();
        self.first_valid = indices.iter().map(|&i| self.first_valid[i]).collect();
        if let Some(b) = &self.balancer {
            let w = h * self.head_dim;
            self.balancer = Some(
                indices
                    .iter()
                    .flat_map(|&i| b[i * w..(i + 1) * w].iter().copied())
                    .collect(),
            );
        }
        self.batch = indices.len();
        self.dense_sync = None;
        Ok(())
    }

    /// Repeat every sequence `repeats` times in place (beam search / sampling expansion).
    pub fn repeat_interleave(&mut self, repeats: usize) -> Result<()> {
        // Checked before allocating: 2**40 repeats used to abort the interpreter.
        match self.batch.checked_mul(repeats) {
            Some(n) if n <= MAX_BATCH => {}
            _ => {
                return Err(KvmixError::Shape(format!(
                    "`repeats` = {repeats} on a batch of {} would pass the limit of {MAX_BATCH} \
                     sequences",
                    self.batch
                )))
            }
        }
        let idx: Vec<usize> = (0..self.batch)
            .flat_map(|i| std::iter::repeat_n(i, repeats))
            .collect();
        self.select_batch(&idx)
    }

    /// Empty the store (configuration kept).
    pub fn reset(&mut self) {
        self.batch = 0;
        self.streams.clear();
        self.first_valid.clear();
        self.seen = 0;
        self.appends_since_classify = 0;
        self.classified_once = false;
        self.balancer = None;
        self.max_abs_key = 0.0;
        self.dense_sync = None;
    }

    /// Refuse queries and scales whose attention logits could leave float32 (NaN/Inf, or
    /// `|scale| · Σ|q| · max|k|` beyond 1e37): the softmax would silently turn them into zeros.
    pub fn check_queries(&self, q: &[f32], head_dim: usize, scale: f32) -> Result<()> {
        if !scale.is_finite() {
            return Err(KvmixError::NonFinite(format!(
                "`scale` must be finite, got {scale}"
            )));
        }
        let mut worst = 0f64;
        for row in q.chunks(head_dim.max(1)) {
            let mut l1 = 0f64;
            for &x in row {
                if !x.is_finite() {
                    return Err(KvmixError::NonFinite(
                        "queries contain NaN or Inf; kvmix refuses them rather than returning \
                         a silently wrong attention output"
                            .into(),
                    ));
                }
                l1 += x.abs() as f64;
            }
            worst = worst.max(l1);
        }
        let bound = worst * scale.abs() as f64 * self.max_abs_key as f64;
        if bound > 1e37 {
            return Err(KvmixError::NonFinite(format!(
                "queries of L1 norm {worst:e} with scale {scale} against keys up to {} could \
                 give logits beyond float32 (bound {bound:e}); refused rather than returning a \
                 wrong softmax",
                self.max_abs_key
            )));
        }
        Ok(())
    }

    /// Bytes held, measured from the buffers.
    pub fn memory(&self) -> MemoryReport {
        let mut m = MemoryReport::default();
        for s in &self.streams {
            m.buffer.add(s.buffer.nbytes());
            m.high.add(s.high.nbytes());
            m.low.add(s.low.nbytes());
            m.tokens += s.len();
        }
        // What a dense fp16 cache of every token seen would hold (eviction holds fewer).
        m.fp16_bytes = self.streams.len() * self.seen * 2 * self.head_dim * 2;
        m
    }
}

/// Refuse keys that the key balancer would scale beyond what the quantized tiers encode:
/// keys are stored as `k · b = k / inverse`.
fn check_balanced_keys<T: Element>(
    keys: &[T],
    inverse: &[f32],
    n: usize,
    d: usize,
    limit: f32,
) -> Result<()> {
    for (r, row) in keys.chunks(d).enumerate() {
        let s = r / n.max(1);
        let inv = &inverse[(s * d) % inverse.len().max(1)..][..d];
        for (c, (x, f)) in row.iter().zip(inv).enumerate() {
            let scaled = x.to_f32() / f;
            if !scaled.is_finite() || scaled.abs() > limit {
                return Err(KvmixError::NonFinite(format!(
                    "key {} in channel {c} times its key balancer factor {} is {scaled}, beyond \
                     {limit}, the most the quantized tiers can hold",
                    x.to_f32(),
                    1.0 / f
                )));
            }
        }
    }
    Ok(())
}

fn set_stream_balancer(s: &mut Stream, inverse: &[f32]) -> Result<()> {
    for tier in [&mut s.high, &mut s.low] {
        if let Codec::TokenGroups {
            factor: Factor::Fixed,
            ..
        } = tier.keys.codec
        {
            tier.keys.set_fixed_factor(inverse)?;
        }
    }
    Ok(())
}

#[cfg(test)]
mod tests;

#[cfg(test)]
mod fuzz_tests;
