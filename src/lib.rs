//! kvmix: importance-aware mixed-precision compression of transformer KV caches.
//!
//! The core (everything but [`python`]) knows nothing of Python: it works on slices in
//! `[..., tokens, channels]` row-major layout and returns [`error::KvmixError`] for every
//! input it refuses. The PyO3 bindings live behind the `python` cargo feature.

pub mod attention;
pub mod element;
pub mod error;
pub mod importance;
pub mod isa;
pub mod parallel;
pub mod quant;
pub mod store;
#[doc(hidden)]
pub mod testing;

#[cfg(feature = "python")]
mod python;

pub use error::{KvmixError, Result};
