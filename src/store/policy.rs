//! The methods as configurations of the store: which codecs each tier uses and how the
//! buffered tokens are classified.

use super::codec::{Codec, DenseDtype, Factor};
use crate::error::{KvmixError, Result};
use crate::importance::CountMode;
use crate::quant::Clip;

/// MiKV (Yang et al., 2024): important tokens (heavy hitters + recent) at high precision,
/// every other token kept at low precision; the important set is trimmed back to its budget
/// as decoding proceeds and the tokens leaving it are demoted, never dropped.
#[derive(Clone, Copy, Debug, PartialEq)]
pub struct MikvConfig {
    /// Fraction of tokens kept at high precision (half heavy hitters, half recent).
    pub ratio: f64,
    /// Fraction of the budget reserved for the most recent tokens.
    pub recent_share: f64,
    /// High tier: `None` = fp16, else int8/int4 per-token groups.
    pub high_bits: Option<u8>,
    pub low_bits: u8,
    /// Per-token group size; `None` = head_dim / 2.
    pub group_size: Option<usize>,
    /// Outlier-aware keys (the channel balancer from the prompt's queries).
    pub key_balancer: bool,
    /// Decoding steps between classifications (1 = H2O's per-step trimming).
    pub streaming_gap: usize,
}

impl Default for MikvConfig {
    fn default() -> Self {
        MikvConfig {
            ratio: 0.2,
            recent_share: 0.5,
            high_bits: None,
            low_bits: 2,
            group_size: None,
            key_balancer: true,
            streaming_gap: 1,
        }
    }
}

/// Which streams of a layer share one set of salient tokens.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Selection {
    /// One set per (sequence, layer): the scores of all its kv-heads are summed first. The
    /// paper's formula is for one attention matrix and does not say per head; pooling a
    /// layer's heads keeps a retrieved key's later digits, which the probes only see in some
    /// heads (SmolLM2-135M passkey at 4k: 35/40 against 21/40, the same bytes).
    Layer,
    /// One set per (sequence, kv-head), its query heads summed: the public code.
    KvHead,
}

/// ZipCache (He et al., 2024): salient tokens by normalized attention at `high_bits`,
/// the rest at `low_bits`; keys per-channel, values channel-separable tokenwise.
#[derive(Clone, Copy, Debug, PartialEq)]
pub struct ZipCacheConfig {
    pub salient_ratio: f64,
    pub high_bits: u8,
    pub low_bits: u8,
    /// Code width of the regular tokens' keys when it differs from `low_bits` (`None` =
    /// `low_bits`, the paper). 2-bit per-channel keys over a whole token set are what breaks
    /// long-range retrieval on small models; 3-bit keys at 2-bit values keep it.
    pub low_key_bits: Option<u8>,
    pub probe_recent: f64,
    pub probe_random: f64,
    pub count_mode: CountMode,
    /// `false` ranks by plain accumulated attention (for ablations).
    pub normalized: bool,
    /// `false` quantizes values plainly per token, without the channel factors (for ablations).
    pub channel_separable: bool,
    pub selection: Selection,
    pub streaming_gap: usize,
    /// The first `sink_tokens` valid tokens of each sequence (attention sinks, Xiao et al.,
    /// 2024, "Efficient Streaming Language Models with Attention Sinks") are always salient,
    /// within the salient budget, and go to the high tier as a segment of their own, so their
    /// outlying keys and values set no other token's per-channel statistics.
    pub sink_tokens: usize,
    /// Regular tokens per low-tier segment (`0`: one segment per classification, the paper).
    /// Each segment has its own per-channel key ranges and value factors, so a long prompt's
    /// regular keys are not all quantized on the range of its most outlying token (KIVI's
    /// per-channel keys are grouped over token blocks in the same way: Liu et al., 2024).
    pub key_block: usize,
    /// How the keys' groups (both tiers) choose their range: [`Clip::MinMax`] (the paper)
    /// or [`Clip::Mse`] (the range of least squared error). Split by keys and values, not by
    /// tier: squared error is attention error for values at every width, not for keys
    /// (`notes/kvmix-5x.md`, session 10).
    pub key_clip: Clip,
    /// The same for the values' groups.
    pub value_clip: Clip,
}

impl Default for ZipCacheConfig {
    fn default() -> Self {
        ZipCacheConfig {
            salient_ratio: 0.4,
            high_bits: 4,
            low_bits: 2,
            low_key_bits: None,
            probe_recent: 0.05,
            probe_random: 0.05,
            count_mode: CountMode::Exact,
            normalized: true,
            channel_separable: true,
            selection: Selection::Layer,
            streaming_gap: 100,
            sink_tokens: 0,
            key_block: 0,
            key_clip: Clip::MinMax,
            value_clip: Clip::MinMax,
        }
    }
}

/// KIVI-style uniform quantization: keys per-channel over blocks of `residual` tokens,
/// values per-token groups; the newest `< residual` tokens stay in full precision.
#[derive(Clone, Copy, Debug, PartialEq)]
pub struct UniformConfig {
    pub bits: u8,
    pub residual: usize,
    /// Value group size; `None` = the largest divisor of head_dim up to 64.
    pub group_size: Option<usize>,
}

impl Default for UniformConfig {
    fn default() -> Self {
        UniformConfig {
            bits: 2,
            residual: 128,
            group_size: None,
        }
    }
}

/// H2O-style eviction: keep heavy hitters + recent tokens within `budget`, drop the rest.
#[derive(Clone, Copy, Debug, PartialEq)]
pub struct EvictionConfig {
    pub budget: f64,
    pub recent_share: f64,
    pub streaming_gap: usize,
}

impl Default for EvictionConfig {
    fn default() -> Self {
        EvictionConfig {
            budget: 0.2,
            recent_share: 0.5,
            streaming_gap: 1,
        }
    }
}

/// Which query rows' attention decides a token's importance (what the attention functions
/// must compute for the store, read from the policy instead of compared names).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Scoring {
    /// No importance: tiers follow from positions alone (full, uniform).
    None,
    /// H2O accumulation: every query row's attention (MiKV, eviction).
    EveryQuery,
    /// ZipCache's probe queries at prefill (`probe_recent`, `probe_random`, `count_mode`).
    Probes,
}

impl Scoring {
    pub fn name(self) -> &'static str {
        match self {
            Scoring::None => "none",
            Scoring::EveryQuery => "every_query",
            Scoring::Probes => "probes",
        }
    }
}

#[derive(Clone, Copy, Debug, PartialEq)]
pub enum Policy {
    /// Everything kept in full precision (the identity configuration, for testing).
    Full,
    Mikv(MikvConfig),
    ZipCache(ZipCacheConfig),
    Uniform(UniformConfig),
    Eviction(EvictionConfig),
}

/// Codecs of the three tiers of a stream.
#[derive(Clone, Copy, Debug, PartialEq)]
pub struct Layout {
    pub buffer: DenseDtype,
    pub high: (Codec, Codec),
    pub low: (Codec, Codec),
    /// Whether high-tier rows keep their scores (they are ranked again later).
    pub high_scored: bool,
}

/// Largest magnitude an fp16 element or fp16 quantization parameter holds.
pub const F16_MAX: f32 = 65504.0;

/// Largest magnitude a bf16/fp32 tier accepts (see [`Layout::magnitude_limit`]).
pub const DENSE_MAX: f32 = 1e28;

impl Layout {
    /// The largest magnitude of an input element every tier can store: an fp16 tier holds
    /// ±65504; a quantized codec's fp16 scale `(max − min) / (2^bits − 1)` must stay finite,
    /// which for 1-bit codes halves that (±32752). bf16/fp32 tiers hold up to ±1e28: attention
    /// sums up to 2^32 unnormalized terms before dividing, which must stay finite in fp32.
    /// `append` refuses more, so a classification never meets a value it cannot encode.
    pub fn magnitude_limit(&self) -> f32 {
        let codec = |c: Codec| match c {
            Codec::Dense(DenseDtype::F16) => F16_MAX,
            Codec::Dense(_) => DENSE_MAX,
            Codec::TokenGroups { bits, .. } | Codec::Channel { bits, .. } => {
                F16_MAX.min(F16_MAX * ((1u32 << bits) - 1) as f32 / 2.0)
            }
        };
        [
            Codec::Dense(self.buffer),
            self.high.0,
            self.high.1,
            self.low.0,
            self.low.1,
        ]
        .into_iter()
        .map(codec)
        .fold(f32::MAX, f32::min)
    }

    /// Whether every codec's token groups start on a byte boundary, the geometry the fused
    /// attention kernels read (`group_size × bits` a multiple of 8). Other geometries (e.g.
    /// 3-bit codes in groups of 4) are valid and stored exactly the same; attention over them
    /// takes the reference path.
    pub fn byte_aligned_groups(&self) -> bool {
        [self.high.0, self.high.1, self.low.0, self.low.1]
            .into_iter()
            .all(|c| match c {
                Codec::TokenGroups {
                    bits, group_size, ..
                } => (group_size * bits as usize).is_multiple_of(8),
                _ => true,
            })
    }
}

fn check_ratio(name: &str, v: f64) -> Result<()> {
    if (0.0..=1.0).contains(&v) {
        Ok(())
    } else {
        Err(KvmixError::Config(format!(
            "`{name}` must be in [0, 1], got {v}"
        )))
    }
}

fn check_bits_in(name: &str, bits: u8, valid: &[u8]) -> Result<()> {
    if valid.contains(&bits) {
        Ok(())
    } else {
        Err(KvmixError::Config(format!(
            "`{name}` must be one of {valid:?}, got {bits}"
        )))
    }
}

fn check_gap(gap: usize) -> Result<()> {
    if gap == 0 {
        return Err(KvmixError::Config(
            "`streaming_gap` must be at least 1, got 0".into(),
        ));
    }
    Ok(())
}

impl Policy {
    /// Every policy's name, as [`Self::name`] writes it.
    pub const NAMES: [&'static str; 5] = ["full", "uniform", "mikv", "zipcache", "eviction"];

    pub fn name(&self) -> &'static str {
        match self {
            Policy::Full => "full",
            Policy::Uniform(_) => "uniform",
            Policy::Mikv(_) => "mikv",
            Policy::ZipCache(_) => "zipcache",
            Policy::Eviction(_) => "eviction",
        }
    }

    /// The policy `name` with every option at its default.
    pub fn default_of(name: &str) -> Result<Policy> {
        Ok(match name {
            "full" => Policy::Full,
            "uniform" => Policy::Uniform(UniformConfig::default()),
            "mikv" => Policy::Mikv(MikvConfig::default()),
            "zipcache" => Policy::ZipCache(ZipCacheConfig::default()),
            "eviction" => Policy::Eviction(EvictionConfig::default()),
            _ => {
                return Err(KvmixError::Config(format!(
                    "`policy` must be one of {}, got {name:?}",
                    Self::NAMES.map(|n| format!("'{n}'")).join(", ")
                )))
            }
        })
    }

    pub fn scoring(&self) -> Scoring {
        match self {
            Policy::Full | Policy::Uniform(_) => Scoring::None,
            Policy::Mikv(_) | Policy::Eviction(_) => Scoring::EveryQuery,
            Policy::ZipCache(_) => Scoring::Probes,
        }
    }

    /// Whether tokens are dropped (so the cache cannot hand every token back densely).
    pub fn evicts(&self) -> bool {
        matches!(self, Policy::Eviction(_))
    }

    /// The buffer dtype when none is given: float16 (the papers' full precision) for every
    /// compressed policy; float32 for `full`, the identity configuration, so that it matches
    /// an fp32 model's own cache exactly.
    pub fn default_buffer(&self) -> DenseDtype {
        match self {
            Policy::Full => DenseDtype::F32,
            _ => DenseDtype::F16,
        }
    }

    /// Validate the configuration and derive the tier codecs for `head_dim`.
    pub fn layout(&self, head_dim: usize, buffer: DenseDtype) -> Result<Layout> {
        let full = Codec::Dense(buffer);
        let layout = match *self {
            Policy::Full => Layout {
                buffer,
                high: (full, full),
                low: (full, full),
                high_scored: false,
            },
            Policy::Mikv(c) => {
                check_ratio("ratio", c.ratio)?;
                check_ratio("recent_share", c.recent_share)?;
                check_bits_in("low_bits", c.low_bits, &[1, 2, 3, 4, 8])?;
                check_gap(c.streaming_gap)?;
                let g = c.group_size.unwrap_or((head_dim / 2).max(1));
                let key_factor = if c.key_balancer {
                    Factor::Fixed
                } else {
                    Factor::None
                };
                let tg = |bits, factor| Codec::TokenGroups {
                    bits,
                    group_size: g,
                    factor,
                    clip: Clip::MinMax,
                };
                let high = match c.high_bits {
                    None => (Codec::Dense(DenseDtype::F16), Codec::Dense(DenseDtype::F16)),
                    Some(b) => {
                        check_bits_in("high_bits", b, &[4, 8])?;
                        (tg(b, key_factor), tg(b, Factor::None))
                    }
                };
                Layout {
                    buffer,
                    high,
                    low: (tg(c.low_bits, key_factor), tg(c.low_bits, Factor::None)),
                    high_scored: true,
                }
            }
            Policy::ZipCache(c) => {
                check_ratio("salient_ratio", c.salient_ratio)?;
                check_ratio("probe_recent", c.probe_recent)?;
                check_ratio("probe_random", c.probe_random)?;
                check_bits_in("high_bits", c.high_bits, &[2, 3, 4, 8])?;
                check_bits_in("low_bits", c.low_bits, &[1, 2, 3, 4])?;
                if let Some(b) = c.low_key_bits {
                    check_bits_in("low_key_bits", b, &[1, 2, 3, 4])?;
                }
                check_gap(c.streaming_gap)?;
                let value_factor = if c.channel_separable {
                    Factor::Separable
                } else {
                    Factor::None
                };
                let tier = |bits| {
                    (
                        Codec::Channel {
                            bits,
                            clip: c.key_clip,
                        },
                        Codec::TokenGroups {
                            bits,
                            group_size: head_dim,
                            factor: value_factor,
                            clip: c.value_clip,
                        },
                    )
                };
                let (_, low_values) = tier(c.low_bits);
                let low_keys = Codec::Channel {
                    bits: c.low_key_bits.unwrap_or(c.low_bits),
                    clip: c.key_clip,
                };
                Layout {
                    buffer,
                    high: tier(c.high_bits),
                    low: (low_keys, low_values),
                    high_scored: false,
                }
            }
            Policy::Uniform(c) => {
                check_bits_in("bits", c.bits, &[2, 4, 8])?;
                if c.residual == 0 {
                    return Err(KvmixError::Config(
                        "`residual` must be at least 1, got 0".into(),
                    ));
                }
                // The largest divisor of head_dim up to 64 (64 for 64/128/256, 40 for 80, 48 for 96).
                let g = c.group_size.unwrap_or_else(|| {
                    (1..=head_dim.min(64))
                        .rev()
                        .find(|g| head_dim.is_multiple_of(*g))
                        .unwrap_or(1)
                });
                let low = (
                    Codec::Channel {
                        bits: c.bits,
                        clip: Clip::MinMax,
                    },
                    Codec::TokenGroups {
                        bits: c.bits,
                        group_size: g,
                        factor: Factor::None,
                        clip: Clip::MinMax,
                    },
                );
                Layout {
                    buffer,
                    high: (full, full),
                    low,
                    high_scored: false,
                }
            }
            Policy::Eviction(c) => {
                check_ratio("budget", c.budget)?;
                check_ratio("recent_share", c.recent_share)?;
                check_gap(c.streaming_gap)?;
                let f16 = Codec::Dense(DenseDtype::F16);
                Layout {
                    buffer,
                    high: (f16, f16),
                    low: (f16, f16),
                    high_scored: true,
                }
            }
        };
        layout.high.0.validate(head_dim)?;
        layout.high.1.validate(head_dim)?;
        layout.low.0.validate(head_dim)?;
        layout.low.1.validate(head_dim)?;
        Ok(layout)
    }

    /// Decoding steps to buffer before classifying again.
    pub fn streaming_gap(&self) -> usize {
        match *self {
            Policy::Full => usize::MAX,
            Policy::Mikv(c) => c.streaming_gap,
            Policy::ZipCache(c) => c.streaming_gap,
            Policy::Uniform(c) => c.residual,
            Policy::Eviction(c) => c.streaming_gap,
        }
    }
}
