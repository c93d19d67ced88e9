//! Dense dequantized copies of a layer store, for attention implementations that need plain
//! key/value tensors (the portable path).
//!
//! A decoding step changes few rows: the new token, and every `streaming_gap` steps the tokens
//! a classification moved between tiers (a token is quantized once, so the others keep their
//! dequantized values). [`LayerStore::dense_into`] therefore remembers what it last wrote and,
//! asked to update the same buffers, rewrites only those rows; rewriting the whole 4k-token
//! cache of every layer at every step cost more than the model's own attention.

use super::layer::{LayerStore, Stream};
use crate::error::{KvmixError, Result};
use rayon::prelude::*;

/// What the last [`LayerStore::dense_into`] wrote.
#[derive(Clone, Debug)]
pub(crate) struct DenseSync {
    /// Rows per stream of the buffers it wrote.
    capacity: usize,
    /// Tokens per stream it wrote (positions `0..tokens`, one row each).
    pub(crate) tokens: usize,
    /// Per stream, positions whose stored representation changed since.
    pub(crate) moved: Vec<Vec<u32>>,
}

impl LayerStore {
    /// Positions and dequantized keys/values of stream `s`, in position order.
    pub fn dense(&self, s: usize) -> (Vec<u32>, Vec<f32>, Vec<f32>) {
        let stream = &self.streams[s];
        let mut k = vec![0f32; stream.len() * self.head_dim];
        let mut v = vec![0f32; k.len()];
        let ranks = position_ranks(stream);
        decode_stream(stream, &ranks.dest, &mut k, &mut v, None);
        (ranks.order, k, v)
    }

    /// Dequantized keys and values of every stream written into `keys` and `values`, both
    /// `[streams, capacity, head_dim]` (e.g. buffers reused across decode steps, which spares
    /// allocating and page-faulting the whole cache each step): stream `s`'s tokens in position
    /// order at rows `0..n`, rows `n..capacity` untouched. Every stream must hold the same number
    /// of tokens `n <= capacity` (true unless tokens were evicted); returns `n`.
    ///
    /// `changed_only`: the buffers are the ones the previous call filled, untouched since; only
    /// the rows that changed are rewritten (new tokens, tokens moved between tiers). The store
    /// falls back to a full rewrite whenever it cannot vouch for the rest (first call, another
    /// capacity, batch reordering, eviction).
    pub fn dense_into(
        &mut self,
        keys: &mut [f32],
        values: &mut [f32],
        capacity: usize,
        changed_only: bool,
    ) -> Result<usize> {
        let d = self.head_dim;
        let n = self.streams.first().map_or(0, Stream::len);
        if self.streams.iter().any(|s| s.len() != n) {
            return Err(KvmixError::Shape(
                "dense_into needs every stream to hold the same number of tokens (an eviction \
                 policy dropped some); use dense(stream) per stream"
                    .into(),
            ));
        }
        let want = self.streams.len() * capacity * d;
        if n > capacity || keys.len() != want || values.len() != want {
            return Err(KvmixError::Shape(format!(
                "dense_into needs keys and values of {} streams x capacity {capacity} >= {n} tokens \
                 x head_dim {d} ({want} elements), got {} and {}",
                self.streams.len(),
                keys.len(),
                values.len()
            )));
        }
        let sync = self.dense_sync.take();
        if want == 0 {
            return Ok(n);
        }
        let ranks: Vec<Ranks> = self.streams.iter().map(position_ranks).collect();
        // Rows can be updated in place only if row = position in both calls.
        let in_place = ranks.iter().all(|r| r.identity);
        let update = match sync {
            Some(s) if changed_only && in_place && s.capacity == capacity => Some(s),
            _ => None,
        };
        let fill = |(s, (k, v)): (usize, (&mut [f32], &mut [f32]))| {
            let pick = update.as_ref().map(|u| {
                let mut pick = vec![false; n];
                pick[u.tokens.min(n)..].fill(true);
                for &p in &u.moved[s] {
                    if (p as usize) < n {
                        pick[p as usize] = true;
                    }
                }
                pick
            });
            decode_stream(
                &self.streams[s],
                &ranks[s].dest,
                &mut k[..n * d],
                &mut v[..n * d],
                pick.as_deref(),
            );
        };
        let rows = capacity * d;
        let streams = self.streams.len();
        // A full rewrite is parallel work; an update of a few rows is not worth the threads.
        let work = if update.is_some() { 0 } else { streams * n * d };
        crate::parallel::run(work, |parallel| {
            if parallel {
                let chunks = keys.par_chunks_mut(rows).zip(values.par_chunks_mut(rows));
                chunks.enumerate().for_each(fill);
            } else {
                let chunks = keys.chunks_mut(rows).zip(values.chunks_mut(rows));
                chunks.enumerate().for_each(fill);
            }
        });
        if in_place {
            self.dense_sync = Some(DenseSync {
                capacity,
                tokens: n,
                moved: vec![Vec::new(); streams],
            });
        }
        Ok(n)
    }
}

/// Where each tier row of a stream goes in position order.
struct Ranks {
    /// `dest[tier][row]`: the row's rank in position order.
    dest: [Vec<u32>; 3],
    /// Positions in order.
    order: Vec<u32>,
    /// Whether the stream holds exactly positions `0..n` (rank = position).
    identity: bool,
}

/// The ranks of a stream's rows. A stream that holds exactly the positions `0..n` (nothing
/// evicted; positions are unique) needs no sort: a row's rank is its position.
fn position_ranks(stream: &Stream) -> Ranks {
    let tiers = stream.tiers();
    let n = stream.len();
    let max = tiers
        .iter()
        .filter_map(|t| t.positions.min_max())
        .map(|(_, hi)| hi)
        .max();
    if max.is_none_or(|m| m as usize + 1 == n) {
        return Ranks {
            dest: tiers.map(|t| t.positions.to_vec()),
            order: (0..n as u32).collect(),
            identity: true,
        };
    }
    let order = stream.position_order();
    let mut dest: [Vec<u32>; 3] = tiers.map(|t| vec![0u32; t.len()]);
    for (j, &(t, r, _)) in order.iter().enumerate() {
        dest[t][r] = j as u32;
    }
    Ranks {
        dest,
        order: order.iter().map(|o| o.2).collect(),
        identity: false,
    }
}

/// Dequantize the rows of `stream` into `k` and `v` (`len × d` each) at their ranks `dest`;
/// with `pick`, only the rows whose rank is picked.
fn decode_stream(
    stream: &Stream,
    dest: &[Vec<u32>; 3],
    k: &mut [f32],
    v: &mut [f32],
    pick: Option<&[bool]>,
) {
    for (t, tier) in stream.tiers().iter().enumerate() {
        tier.keys.decode_all_into(&dest[t], pick, k);
        tier.values.decode_all_into(&dest[t], pick, v);
    }
}
