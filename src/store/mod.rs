//! The per-layer mixed-precision KV store: codecs and row containers, tiers, policies.

mod classify;
pub mod codec;
mod dense;
pub mod layer;
pub mod policy;
pub mod reference;
pub mod rows;
pub mod tier;

pub use codec::{Codec, DenseDtype, Factor};
pub use layer::{LayerStore, MemoryReport, Stream};
pub use policy::{
    EvictionConfig, Layout, MikvConfig, Policy, Scoring, Selection, UniformConfig, ZipCacheConfig,
};
pub use tier::{RowBatch, Tier, TierBytes};
