//! A tier: key rows, value rows, their positions and (optionally) their importance scores,
//! all aligned row by row so that every operation moves them together.

use super::codec::Codec;
use super::rows::{EncodedRows, EncodedSegment, RowBytes};
use crate::error::Result;

/// Give back memory a shrunken vector no longer needs (not on every small change).
fn shrink<T>(v: &mut Vec<T>) {
    if v.capacity() > 2 * v.len() + 64 {
        v.shrink_to_fit();
    }
}

/// Token positions of a tier's rows: 2 bytes each while every position fits, 4 after.
/// (A u32 per token would be ~8% of a 2-bit cache at head_dim 64.)
#[derive(Clone, Debug, PartialEq)]
pub enum Positions {
    U16(Vec<u16>),
    U32(Vec<u32>),
}

impl Default for Positions {
    fn default() -> Self {
        Positions::U16(Vec::new())
    }
}

impl Positions {
    pub fn len(&self) -> usize {
        match self {
            Positions::U16(v) => v.len(),
            Positions::U32(v) => v.len(),
        }
    }

    pub fn is_empty(&self) -> bool {
        self.len() == 0
    }

    #[inline]
    pub fn get(&self, i: usize) -> u32 {
        match self {
            Positions::U16(v) => v[i] as u32,
            Positions::U32(v) => v[i],
        }
    }

    /// The smallest and largest position, if any (one vectorized pass, not a `get` per row).
    pub fn min_max(&self) -> Option<(u32, u32)> {
        fn fold<T: Copy + Ord + Into<u32>>(v: &[T]) -> Option<(u32, u32)> {
            let (&first, _) = v.split_first()?;
            let (lo, hi) = v
                .iter()
                .fold((first, first), |(lo, hi), &x| (lo.min(x), hi.max(x)));
            Some((lo.into(), hi.into()))
        }
        match self {
            Positions::U16(v) => fold(v),
            Positions::U32(v) => fold(v),
        }
    }

    pub fn to_vec(&self) -> Vec<u32> {
        (0..self.len()).map(|i| self.get(i)).collect()
    }

    pub fn push(&mut self, p: u32) {
        if let Positions::U16(v) = self {
            if p <= u16::MAX as u32 {
                v.push(p as u16);
                return;
            }
            *self = Positions::U32(v.iter().map(|&x| x as u32).collect());
        }
        if let Positions::U32(v) = self {
            v.push(p);
        }
    }

    fn retain(&mut self, keep: &[bool]) {
        let mut it = keep.iter();
        match self {
            Positions::U16(v) => {
                v.retain(|_| *it.next().unwrap_or(&false));
                shrink(v);
            }
            Positions::U32(v) => {
                v.retain(|_| *it.next().unwrap_or(&false));
                shrink(v);
            }
        }
    }

    pub fn nbytes(&self) -> usize {
        match self {
            Positions::U16(v) => v.len() * 2,
            Positions::U32(v) => v.len() * 4,
        }
    }
}

/// Importance state of a tier's rows: accumulated attention and the number of scored
/// queries that could see each token (for the normalized score).
#[derive(Clone, Debug, Default, PartialEq)]
pub struct Scores {
    pub acc: Vec<f32>,
    pub count: Vec<f32>,
}

impl Scores {
    fn retain(&mut self, keep: &[bool]) {
        let mut a = keep.iter();
        let mut c = keep.iter();
        self.acc.retain(|_| *a.next().unwrap_or(&false));
        self.count.retain(|_| *c.next().unwrap_or(&false));
        shrink(&mut self.acc);
        shrink(&mut self.count);
    }

    pub fn nbytes(&self) -> usize {
        (self.acc.len() + self.count.len()) * 4
    }
}

/// Rows handed between tiers: full-precision values and everything that travels with them.
#[derive(Clone, Debug, Default, PartialEq)]
pub struct RowBatch {
    pub positions: Vec<u32>,
    /// `positions.len() × head_dim` each.
    pub keys: Vec<f32>,
    pub values: Vec<f32>,
    pub acc: Vec<f32>,
    pub count: Vec<f32>,
}

impl RowBatch {
    pub fn len(&self) -> usize {
        self.positions.len()
    }

    pub fn is_empty(&self) -> bool {
        self.positions.is_empty()
    }

    /// The rows where `pick` is true.
    pub fn select(&self, pick: &[bool], d: usize) -> RowBatch {
        let mut out = RowBatch::default();
        for (i, _) in pick.iter().enumerate().filter(|(_, &p)| p) {
            out.positions.push(self.positions[i]);
            out.keys.extend_from_slice(&self.keys[i * d..(i + 1) * d]);
            out.values
                .extend_from_slice(&self.values[i * d..(i + 1) * d]);
            out.acc.push(self.acc[i]);
            out.count.push(self.count[i]);
        }
        out
    }
}

/// A batch encoded for a tier by [`Tier::prepare`], not yet added.
#[derive(Clone, Debug, PartialEq)]
pub struct PreparedRows {
    keys: EncodedSegment,
    values: EncodedSegment,
    positions: Vec<u32>,
    acc: Vec<f32>,
    count: Vec<f32>,
}

/// Bytes held by a tier, by component.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct TierBytes {
    pub keys: RowBytes,
    pub values: RowBytes,
    pub positions: usize,
    pub scores: usize,
}

impl TierBytes {
    pub fn total(&self) -> usize {
        self.keys.total() + self.values.total() + self.positions + self.scores
    }
    pub fn add(&mut self, o: TierBytes) {
        self.keys.add(o.keys);
        self.values.add(o.values);
        self.positions += o.positions;
        self.scores += o.scores;
    }
}

#[derive(Clone, Debug, PartialEq)]
pub struct Tier {
    pub keys: EncodedRows,
    pub values: EncodedRows,
    pub positions: Positions,
    /// Present when the policy ranks this tier's tokens again later.
    pub scores: Option<Scores>,
}

impl Tier {
    pub fn new(
        key_codec: Codec,
        value_codec: Codec,
        head_dim: usize,
        scored: bool,
    ) -> Result<Self> {
        Ok(Tier {
            keys: EncodedRows::new(key_codec, head_dim)?,
            values: EncodedRows::new(value_codec, head_dim)?,
            positions: Positions::default(),
            scores: scored.then(Scores::default),
        })
    }

    pub fn len(&self) -> usize {
        self.positions.len()
    }

    pub fn is_empty(&self) -> bool {
        self.positions.is_empty()
    }

    /// Append a batch as one segment (scores kept only if this tier tracks them).
    pub fn push(&mut self, rows: &RowBatch) -> Result<()> {
        let p = self.prepare(rows)?;
        self.commit(p);
        Ok(())
    }

    /// Encode a batch for this tier without changing it; [`Self::commit`] adds it. Encoding
    /// is the only step that can fail, so a classification prepares every move first.
    pub fn prepare(&self, rows: &RowBatch) -> Result<PreparedRows> {
        Ok(PreparedRows {
            keys: self.keys.encode(&rows.keys)?,
            values: self.values.encode(&rows.values)?,
            positions: rows.positions.clone(),
            acc: rows.acc.clone(),
            count: rows.count.clone(),
        })
    }

    /// Add rows from [`Self::prepare`] of this tier (or one with the same codecs).
    pub fn commit(&mut self, p: PreparedRows) {
        if p.positions.is_empty() {
            return;
        }
        self.keys.append(p.keys);
        self.values.append(p.values);
        for &q in &p.positions {
            self.positions.push(q);
        }
        if let Some(s) = &mut self.scores {
            s.acc.extend_from_slice(&p.acc);
            s.count.extend_from_slice(&p.count);
        }
    }

    /// Decode the rows where `pick` is true, as a batch (scores zero if untracked).
    pub fn read(&self, pick: &[bool]) -> RowBatch {
        let d = self.keys.dim;
        let mut out = RowBatch::default();
        let mut row = vec![0f32; d];
        for (i, _) in pick.iter().enumerate().filter(|(_, &p)| p) {
            out.positions.push(self.positions.get(i));
            self.keys.decode_row(i, &mut row);
            out.keys.extend_from_slice(&row);
            self.values.decode_row(i, &mut row);
            out.values.extend_from_slice(&row);
            let (a, c) = self
                .scores
                .as_ref()
                .map_or((0.0, 0.0), |s| (s.acc[i], s.count[i]));
            out.acc.push(a);
            out.count.push(c);
        }
        out
    }

    /// Keep only the rows where `keep` is true.
    pub fn retain(&mut self, keep: &[bool]) {
        self.keys.retain(keep);
        self.values.retain(keep);
        self.positions.retain(keep);
        if let Some(s) = &mut self.scores {
            s.retain(keep);
        }
    }

    /// Remove the rows where `pick` is true and return them decoded.
    pub fn take(&mut self, pick: &[bool]) -> RowBatch {
        let out = self.read(pick);
        let keep: Vec<bool> = pick.iter().map(|&p| !p).collect();
        self.retain(&keep);
        out
    }

    pub fn nbytes(&self) -> TierBytes {
        TierBytes {
            keys: self.keys.nbytes(),
            values: self.values.nbytes(),
            positions: self.positions.nbytes(),
            scores: self.scores.as_ref().map_or(0, |s| s.nbytes()),
        }
    }
}
