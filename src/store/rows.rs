//! The growing row container of one tier: a stream's key (or value) rows as its
//! [`Codec`] encodes them, with their parameters.
//!
//! Rows of one `(sequence, kv-head)` stream are appended in *segments*: a batch of tokens
//! quantized together (the prompt at prefill, a chunk of buffered tokens during decoding,
//! the tokens demoted in one step). Per-token parameters live with each row; per-channel
//! parameters (channel-wise keys, channel-separable factors) live with the segment.
//!
//! Rejected alternative: re-quantizing a whole tier whenever it grows (what ZipCache's public
//! code does from dequantized values) compounds the error; a row here is quantized once.

use super::codec::{Codec, DenseDtype, Factor};
use crate::error::{KvmixError, Result};
use crate::quant::{self, Grouping, ParamDtype, ParamVec, Params, QuantSpec, Slab};
use half::slice::HalfFloatSliceExt;
use half::{bf16, f16};

/// Row storage: full-precision elements or packed codes.
#[derive(Clone, Debug, PartialEq)]
pub enum RowData {
    F16(Vec<f16>),
    BF16(Vec<bf16>),
    F32(Vec<f32>),
    Packed(Vec<u8>),
}

impl RowData {
    fn nbytes(&self) -> usize {
        match self {
            RowData::F16(v) => v.len() * 2,
            RowData::BF16(v) => v.len() * 2,
            RowData::F32(v) => v.len() * 4,
            RowData::Packed(v) => v.len(),
        }
    }
}

/// Per-channel parameters shared by the rows of one segment.
#[derive(Clone, Debug, PartialEq, Default)]
pub struct Segment {
    /// Channel factor `[head_dim]` (Separable), else empty.
    pub factor: Vec<f16>,
    /// Per-channel scale and offset `[head_dim]` (Channel codec), else empty.
    pub scale: Vec<f16>,
    pub offset: Vec<f16>,
}

/// Rows encoded by [`EncodedRows::encode`], not yet part of any container.
#[derive(Clone, Debug, PartialEq)]
pub struct EncodedSegment {
    n: usize,
    data: Option<RowData>,
    row_scale: Vec<f16>,
    row_offset: Vec<f16>,
    segment: Option<Segment>,
}

/// Bytes held by an [`EncodedRows`], by component.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct RowBytes {
    pub data: usize,
    pub params: usize,
    pub index: usize,
}

impl RowBytes {
    pub fn total(&self) -> usize {
        self.data + self.params + self.index
    }
    pub fn add(&mut self, o: RowBytes) {
        self.data += o.data;
        self.params += o.params;
        self.index += o.index;
    }
}

/// The key (or value) rows of one tier of one stream.
#[derive(Clone, Debug, PartialEq)]
pub struct EncodedRows {
    pub codec: Codec,
    pub dim: usize,
    pub data: RowData,
    /// TokenGroups: `dim / group_size` scales and offsets per row.
    pub row_scale: Vec<f16>,
    pub row_offset: Vec<f16>,
    /// First row of each segment (ascending), for codecs with segment parameters. Rows of a
    /// segment are contiguous (appended together, and `retain` keeps order), so one index per
    /// segment suffices where one per row would cost 4 bytes a token.
    pub segment_start: Vec<u32>,
    pub segments: Vec<Segment>,
    /// The stream's fixed factor (Factor::Fixed), `[dim]`.
    pub fixed_factor: Vec<f16>,
    len: usize,
}

impl EncodedRows {
    pub fn new(codec: Codec, dim: usize) -> Result<Self> {
        codec.validate(dim)?;
        let data = match codec {
            Codec::Dense(DenseDtype::F16) => RowData::F16(Vec::new()),
            Codec::Dense(DenseDtype::BF16) => RowData::BF16(Vec::new()),
            Codec::Dense(DenseDtype::F32) => RowData::F32(Vec::new()),
            _ => RowData::Packed(Vec::new()),
        };
        Ok(EncodedRows {
            codec,
            dim,
            data,
            row_scale: Vec::new(),
            row_offset: Vec::new(),
            segment_start: Vec::new(),
            segments: Vec::new(),
            fixed_factor: Vec::new(),
            len: 0,
        })
    }

    pub fn len(&self) -> usize {
        self.len
    }

    pub fn is_empty(&self) -> bool {
        self.len == 0
    }

    /// Bytes of packed codes (or elements) per row.
    pub fn row_bytes(&self) -> usize {
        match self.codec {
            Codec::Dense(d) => self.dim * d.size(),
            _ => self.dim * self.codec.bits().unwrap_or(8) as usize / 8,
        }
    }

    fn groups(&self) -> usize {
        match self.codec {
            Codec::TokenGroups { group_size, .. } => self.dim / group_size,
            _ => 0,
        }
    }

    /// Set the per-stream factor of a `Factor::Fixed` codec (reconstruction multiplies by it).
    pub fn set_fixed_factor(&mut self, factor: &[f32]) -> Result<()> {
        if factor.len() != self.dim {
            return Err(KvmixError::Shape(format!(
                "fixed channel factor must have {} values, got {}",
                self.dim,
                factor.len()
            )));
        }
        self.fixed_factor = factor.iter().map(|&f| f16::from_f32(f)).collect();
        Ok(())
    }

    /// Append `rows` (`n × dim`, row-major) as one segment.
    pub fn push_segment(&mut self, rows: &[f32]) -> Result<()> {
        let seg = self.encode(rows)?;
        self.append(seg);
        Ok(())
    }

    /// Encode `rows` (`n × dim`, row-major) as one segment without touching `self`: every way
    /// encoding can fail happens here, so a caller can encode all it means to store first and
    /// then [`Self::append`] (which cannot fail), leaving the store as it was on an error.
    pub fn encode(&self, rows: &[f32]) -> Result<EncodedSegment> {
        let d = self.dim;
        if !rows.len().is_multiple_of(d) {
            return Err(KvmixError::Shape(format!(
                "rows must be a multiple of head_dim ({d}) values, got {}",
                rows.len()
            )));
        }
        let n = rows.len() / d;
        let mut seg = EncodedSegment {
            n,
            data: None,
            row_scale: Vec::new(),
            row_offset: Vec::new(),
            segment: None,
        };
        if n == 0 {
            return Ok(seg);
        }
        seg.data = Some(match (&self.data, self.codec) {
            (RowData::F16(_), _) => RowData::F16(rows.iter().map(|&x| f16::from_f32(x)).collect()),
            (RowData::BF16(_), _) => {
                RowData::BF16(rows.iter().map(|&x| bf16::from_f32(x)).collect())
            }
            (RowData::F32(_), _) => RowData::F32(rows.to_vec()),
            (RowData::Packed(_), codec) => return self.encode_quantized(rows, n, codec),
        });
        Ok(seg)
    }

    /// Add a segment from [`Self::encode`] of this same container.
    pub fn append(&mut self, seg: EncodedSegment) {
        let Some(data) = seg.data else { return };
        match (&mut self.data, data) {
            (RowData::F16(v), RowData::F16(x)) => v.extend(x),
            (RowData::BF16(v), RowData::BF16(x)) => v.extend(x),
            (RowData::F32(v), RowData::F32(x)) => v.extend(x),
            (RowData::Packed(v), RowData::Packed(x)) => v.extend(x),
            _ => unreachable!("a segment is appended to the container that encoded it"),
        }
        if let Some(segment) = seg.segment {
            self.segment_start.push(self.len as u32);
            self.segments.push(segment);
        }
        self.row_scale.extend(seg.row_scale);
        self.row_offset.extend(seg.row_offset);
        self.len += seg.n;
    }

    fn encode_quantized(&self, rows: &[f32], n: usize, codec: Codec) -> Result<EncodedSegment> {
        let d = self.dim;
        let (bits, grouping, factor, clip) = match codec {
            Codec::TokenGroups {
                bits,
                group_size,
                factor,
                clip,
            } => (bits, Grouping::TokenGroups { group_size }, factor, clip),
            Codec::Channel { bits, clip } => (
                bits,
                Grouping::ChannelBlocks { token_block: n },
                Factor::None,
                clip,
            ),
            Codec::Dense(_) => unreachable!("dense rows are not quantized"),
        };
        let factor_values: Option<Vec<f32>> = match factor {
            Factor::None => None,
            Factor::Separable => Some(quant::separable_channel_scale(rows, &[n, d])?),
            Factor::Fixed => {
                if self.fixed_factor.is_empty() {
                    return Err(KvmixError::Config(
                        "a fixed channel factor (key balancer) must be set before quantizing"
                            .into(),
                    ));
                }
                Some(self.fixed_factor.iter().map(|f| f.to_f32()).collect())
            }
        };
        let spec = QuantSpec {
            bits,
            grouping,
            param_dtype: ParamDtype::F16,
            clip,
        };
        let mut q = quant::quantize(rows, &[n, d], spec, factor_values.as_deref())?;
        let halves = |p: &ParamVec| match p {
            ParamVec::F16(v) => v.clone(),
            ParamVec::F32(v) => v.iter().map(|&x| f16::from_f32(x)).collect(),
        };
        let mut out = EncodedSegment {
            n,
            data: Some(RowData::Packed(std::mem::take(&mut q.codes))),
            row_scale: Vec::new(),
            row_offset: Vec::new(),
            segment: None,
        };
        if self.codec.has_segments() {
            let mut seg = Segment::default();
            if let (Factor::Separable, Some(cs)) = (factor, &q.channel_scale) {
                seg.factor = halves(cs);
            }
            if let Codec::Channel { .. } = codec {
                seg.scale = halves(&q.scale);
                seg.offset = halves(&q.offset);
            }
            out.segment = Some(seg);
        }
        if let Codec::TokenGroups { .. } = codec {
            out.row_scale = halves(&q.scale);
            out.row_offset = halves(&q.offset);
        }
        Ok(out)
    }

    /// Reconstruct row `i` into `out` (`dim` values).
    pub fn decode_row(&self, i: usize, out: &mut [f32]) {
        self.decode_range(i..i + 1, |_| Some(0), out);
    }

    /// Reconstruct every row, row `i` into `out[dest[i] * dim ..]` (with `pick`, only the
    /// rows `i` with `pick[dest[i]]`): a whole tier in position order.
    pub fn decode_all_into(&self, dest: &[u32], pick: Option<&[bool]>, out: &mut [f32]) {
        debug_assert_eq!(dest.len(), self.len);
        let wanted = |i: usize| {
            let r = dest[i] as usize;
            pick.is_none_or(|p| p[r]).then_some(r)
        };
        self.decode_range(0..self.len, wanted, out);
    }

    /// Reconstruct the rows `rows`, row `i` into row `dest(i)` of `out` (skipped if `None`).
    /// Per-segment parameters are converted once per segment and codes unpacked into one
    /// scratch row: decoding a 4k-token layer row by row, each row converting its parameters
    /// and allocating its scratch, cost 17 ms, most of it overhead.
    fn decode_range(
        &self,
        rows: std::ops::Range<usize>,
        dest: impl Fn(usize) -> Option<usize>,
        out: &mut [f32],
    ) {
        let d = self.dim;
        // `(row, its slice of out)` for the rows that are decoded.
        let at = |i: usize| dest(i).map(|r| (i, r * d..(r + 1) * d));
        let picked = || rows.clone().filter_map(at);
        let codes = match &self.data {
            RowData::F16(v) => {
                for (i, o) in picked() {
                    v[i * d..(i + 1) * d].convert_to_f32_slice(&mut out[o]);
                }
                return;
            }
            RowData::BF16(v) => {
                for (i, o) in picked() {
                    v[i * d..(i + 1) * d].convert_to_f32_slice(&mut out[o]);
                }
                return;
            }
            RowData::F32(v) => {
                for (i, o) in picked() {
                    out[o].copy_from_slice(&v[i * d..(i + 1) * d]);
                }
                return;
            }
            RowData::Packed(codes) => codes,
        };
        let rb = self.row_bytes();
        let bits = self.codec.bits().unwrap_or(8);
        let g = self.groups();
        let to_f32 = |v: &[f16]| v.iter().map(|x| x.to_f32()).collect::<Vec<f32>>();
        let fixed = to_f32(&self.fixed_factor);
        let (mut scratch, mut row_scale, mut row_offset) = (Vec::new(), Vec::new(), Vec::new());
        // Segments overlapping `rows`; a codec without segments is one segment of every row.
        let (first, last) = match (
            self.segment_of(rows.start),
            self.segment_of(rows.end.max(1) - 1),
        ) {
            (Some(a), Some(b)) => (a, b + 1),
            _ => (0, 1),
        };
        for si in first..last {
            let seg = self.segments.get(si);
            let start = self.segment_start.get(si).map_or(0, |&s| s as usize);
            let end = self
                .segment_start
                .get(si + 1)
                .map_or(self.len, |&e| e as usize);
            let (scale, offset) = seg.map_or((Vec::new(), Vec::new()), |s| {
                (to_f32(&s.scale), to_f32(&s.offset))
            });
            let seg_factor = seg
                .filter(|s| !s.factor.is_empty())
                .map(|s| to_f32(&s.factor));
            let factor = seg_factor.as_deref().unwrap_or(&fixed);
            let span = start.max(rows.start)..end.min(rows.end);
            for (i, o) in span.filter_map(at) {
                let params = match d.checked_div(g) {
                    Some(group_size) => {
                        row_scale.clear();
                        row_scale.extend(
                            self.row_scale[i * g..(i + 1) * g]
                                .iter()
                                .map(|x| x.to_f32()),
                        );
                        row_offset.clear();
                        row_offset.extend(
                            self.row_offset[i * g..(i + 1) * g]
                                .iter()
                                .map(|x| x.to_f32()),
                        );
                        Params::Groups {
                            scale: &row_scale,
                            offset: &row_offset,
                            group_size,
                        }
                    }
                    None => Params::Channels {
                        scale: &scale,
                        offset: &offset,
                    },
                };
                let slab = Slab {
                    params,
                    factor: (!factor.is_empty()).then_some(factor),
                    channels: d,
                };
                let packed = &codes[i * rb..(i + 1) * rb];
                quant::decode_packed(packed, bits, slab, &mut scratch, &mut out[o]);
            }
        }
    }

    /// Keep only the rows where `keep` is true, in order; drop segments left without rows.
    pub fn retain(&mut self, keep: &[bool]) {
        debug_assert_eq!(keep.len(), self.len);
        let d = self.dim;
        let rb = self.row_bytes();
        fn compact<T: Copy>(v: &mut Vec<T>, width: usize, keep: &[bool]) {
            if width == 0 || v.is_empty() {
                return;
            }
            let mut w = 0;
            for (r, &k) in keep.iter().enumerate() {
                if k {
                    v.copy_within(r * width..(r + 1) * width, w * width);
                    w += 1;
                }
            }
            v.truncate(w * width);
            // A classified buffer must give its memory back, not just its length.
            if v.capacity() > 2 * v.len() + 64 {
                v.shrink_to_fit();
            }
        }
        match &mut self.data {
            RowData::F16(v) => compact(v, d, keep),
            RowData::BF16(v) => compact(v, d, keep),
            RowData::F32(v) => compact(v, d, keep),
            RowData::Packed(v) => compact(v, rb, keep),
        }
        let g = self.groups();
        compact(&mut self.row_scale, g, keep);
        compact(&mut self.row_offset, g, keep);
        self.retain_segments(keep);
        self.len = keep.iter().filter(|&&k| k).count();
    }

    /// Segment holding row `i`.
    pub fn segment_of(&self, i: usize) -> Option<usize> {
        self.segment_start
            .partition_point(|&s| s as usize <= i)
            .checked_sub(1)
    }

    /// New segment starts after `retain(keep)`; segments left without rows are dropped.
    fn retain_segments(&mut self, keep: &[bool]) {
        if self.segments.is_empty() {
            return;
        }
        let ends = self.segment_start.iter().skip(1).map(|&s| s as usize);
        let ends = ends.chain([self.len]);
        let mut starts = Vec::with_capacity(self.segments.len());
        let mut used = Vec::with_capacity(self.segments.len());
        let (mut begin, mut kept) = (0usize, 0u32);
        for end in ends {
            let n = keep[begin..end].iter().filter(|&&k| k).count() as u32;
            used.push(n > 0);
            if n > 0 {
                starts.push(kept);
            }
            kept += n;
            begin = end;
        }
        let old = std::mem::take(&mut self.segments);
        self.segments = old
            .into_iter()
            .zip(&used)
            .filter(|(_, &u)| u)
            .map(|(s, _)| s)
            .collect();
        self.segment_start = starts;
    }

    /// Drop every row (keeps the codec and the fixed factor).
    pub fn clear(&mut self) {
        let keep = vec![false; self.len];
        self.retain(&keep);
    }

    /// Bytes held, measured from the buffers.
    pub fn nbytes(&self) -> RowBytes {
        let seg_params: usize = self
            .segments
            .iter()
            .map(|s| (s.factor.len() + s.scale.len() + s.offset.len()) * 2)
            .sum();
        RowBytes {
            data: self.data.nbytes(),
            params: (self.row_scale.len() + self.row_offset.len() + self.fixed_factor.len()) * 2
                + seg_params,
            index: self.segment_start.len() * 4,
        }
    }
}

#[cfg(test)]
mod tests;
