//! The Python exception family and the one helper that runs a kernel with the GIL released
//! and converts its error, so no binding can forget either.

use crate::error::KvmixError as CoreError;
use pyo3::create_exception;
use pyo3::exceptions::PyValueError;
use pyo3::marker::Ungil;
use pyo3::prelude::*;

create_exception!(
    kvmix,
    KvmixError,
    PyValueError,
    "Base class of every error kvmix raises."
);
create_exception!(
    kvmix,
    ShapeError,
    KvmixError,
    "An array has the wrong rank or shape."
);
create_exception!(
    kvmix,
    DTypeError,
    KvmixError,
    "An array has an unsupported dtype."
);
create_exception!(
    kvmix,
    ConfigError,
    KvmixError,
    "A configuration value is out of range."
);
create_exception!(
    kvmix,
    NonFiniteError,
    KvmixError,
    "NaN/Inf in the input, or values the parameter dtype cannot represent."
);

pub fn register(m: &Bound<'_, PyModule>) -> PyResult<()> {
    let py = m.py();
    m.add("KvmixError", py.get_type::<KvmixError>())?;
    m.add("ShapeError", py.get_type::<ShapeError>())?;
    m.add("DTypeError", py.get_type::<DTypeError>())?;
    m.add("ConfigError", py.get_type::<ConfigError>())?;
    m.add("NonFiniteError", py.get_type::<NonFiniteError>())?;
    Ok(())
}

impl From<CoreError> for PyErr {
    fn from(e: CoreError) -> PyErr {
        match e {
            CoreError::Shape(m) => ShapeError::new_err(m),
            CoreError::DType(m) => DTypeError::new_err(m),
            CoreError::Config(m) => ConfigError::new_err(m),
            CoreError::NonFinite(m) => NonFiniteError::new_err(m),
        }
    }
}

/// Run `f` with the GIL released and turn its error into the matching Python exception.
/// A panic (a bug: every input must be refused by a check before it could cause one) becomes a
/// `KvmixError` naming it, never an abort or a `PanicException` crossing into Python.
pub fn detached<T: Ungil + Send, F>(py: Python<'_>, f: F) -> PyResult<T>
where
    F: Ungil + Send + FnOnce() -> crate::error::Result<T>,
{
    py.detach(|| std::panic::catch_unwind(std::panic::AssertUnwindSafe(f)))
        .map_err(panic_error)?
        .map_err(PyErr::from)
}

/// The `KvmixError` a caught panic becomes.
pub fn panic_error(payload: Box<dyn std::any::Any + Send>) -> PyErr {
    let what = payload
        .downcast_ref::<String>()
        .map(String::as_str)
        .or_else(|| payload.downcast_ref::<&str>().copied())
        .unwrap_or("unknown panic");
    KvmixError::new_err(format!(
        "internal error in kvmix's core (please report it with the call that caused it): {what}"
    ))
}
