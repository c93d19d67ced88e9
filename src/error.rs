//! One error type for the whole core. The Python binding maps each variant to one
//! exception class of the `kvmix.KvmixError` family, so every message must name the
//! offending argument and the value it had.

use std::fmt;

/// Everything the core can refuse. Each variant carries a complete, user-facing message.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum KvmixError {
    /// An array has the wrong rank or a dimension that does not fit.
    Shape(String),
    /// An element type the operation does not support.
    DType(String),
    /// A configuration value out of its valid range (bits, group size, ratios, ...).
    Config(String),
    /// NaN or ±Inf in the input, or a value the parameter dtype cannot represent.
    NonFinite(String),
}

impl KvmixError {
    pub fn message(&self) -> &str {
        match self {
            KvmixError::Shape(m)
            | KvmixError::DType(m)
            | KvmixError::Config(m)
            | KvmixError::NonFinite(m) => m,
        }
    }
}

impl fmt::Display for KvmixError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.message())
    }
}

impl std::error::Error for KvmixError {}

pub type Result<T> = std::result::Result<T, KvmixError>;

/// `Err(KvmixError::Shape(format!(...)))`, for the common early return.
#[macro_export]
macro_rules! shape_err {
    ($($arg:tt)*) => { Err($crate::error::KvmixError::Shape(format!($($arg)*))) };
}

/// `Err(KvmixError::Config(format!(...)))`, for the common early return.
#[macro_export]
macro_rules! config_err {
    ($($arg:tt)*) => { Err($crate::error::KvmixError::Config(format!($($arg)*))) };
}
