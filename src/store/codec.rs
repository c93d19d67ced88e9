//! How one tier encodes its key (or value) rows: full precision ([`DenseDtype`]) or packed
//! codes ([`Codec`]), with an optional per-channel [`Factor`]. The rows themselves live in
//! [`super::rows::EncodedRows`].

use crate::error::{KvmixError, Result};
use crate::quant::{self, Clip};

/// Element type of a full-precision tier or buffer.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub enum DenseDtype {
    F16,
    BF16,
    F32,
}

impl DenseDtype {
    pub fn size(self) -> usize {
        match self {
            DenseDtype::F16 | DenseDtype::BF16 => 2,
            DenseDtype::F32 => 4,
        }
    }

    /// Every dtype's name, as [`Self::parse`] reads it and [`Self::name`] writes it.
    pub const NAMES: [&'static str; 3] = ["float16", "bfloat16", "float32"];

    pub fn name(self) -> &'static str {
        match self {
            DenseDtype::F16 => "float16",
            DenseDtype::BF16 => "bfloat16",
            DenseDtype::F32 => "float32",
        }
    }

    pub fn parse(name: &str) -> Result<Self> {
        match name {
            "float16" => Ok(DenseDtype::F16),
            "bfloat16" => Ok(DenseDtype::BF16),
            "float32" => Ok(DenseDtype::F32),
            _ => Err(KvmixError::Config(format!(
                "`buffer_dtype` must be 'float16', 'bfloat16' or 'float32', got {name:?}"
            ))),
        }
    }
}

/// Per-channel factor applied before per-token quantization.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub enum Factor {
    None,
    /// ZipCache values: `sqrt(max|x_c|)` over each segment's rows.
    Separable,
    /// A factor fixed per stream (MiKV's key balancer `1/b`), set once with
    /// [`super::rows::EncodedRows::set_fixed_factor`].
    Fixed,
}

/// The encoding of one tier's keys or values.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub enum Codec {
    Dense(DenseDtype),
    /// Asymmetric per-token groups of `group_size` channels.
    TokenGroups {
        bits: u8,
        group_size: usize,
        factor: Factor,
        clip: Clip,
    },
    /// Asymmetric per-channel over each segment's tokens (KIVI / ZipCache keys).
    Channel {
        bits: u8,
        clip: Clip,
    },
}

impl Codec {
    /// Check the codec against `head_dim`; rows must pack to whole bytes.
    pub fn validate(&self, head_dim: usize) -> Result<()> {
        match *self {
            Codec::Dense(_) => Ok(()),
            Codec::TokenGroups {
                bits, group_size, ..
            } => {
                quant::check_bits(bits)?;
                if group_size == 0 || !head_dim.is_multiple_of(group_size) {
                    return Err(KvmixError::Config(format!(
                        "`group_size` must divide head_dim ({head_dim}), got {group_size}"
                    )));
                }
                check_row_bytes(head_dim, bits)
            }
            Codec::Channel { bits, .. } => {
                quant::check_bits(bits)?;
                check_row_bytes(head_dim, bits)
            }
        }
    }

    /// Bits per code, `None` for dense rows.
    pub(super) fn bits(&self) -> Option<u8> {
        match *self {
            Codec::Dense(_) => None,
            Codec::TokenGroups { bits, .. } | Codec::Channel { bits, .. } => Some(bits),
        }
    }

    /// Whether the codec keeps per-segment parameters (per-channel scales or factors).
    pub(super) fn has_segments(&self) -> bool {
        matches!(
            self,
            Codec::Channel { .. }
                | Codec::TokenGroups {
                    factor: Factor::Separable,
                    ..
                }
        )
    }
}

fn check_row_bytes(head_dim: usize, bits: u8) -> Result<()> {
    if !(head_dim * bits as usize).is_multiple_of(8) {
        return Err(KvmixError::Config(format!(
            "head_dim ({head_dim}) x bits ({bits}) must be a multiple of 8 so that every token's \
             codes start on a byte boundary"
        )));
    }
    Ok(())
}
