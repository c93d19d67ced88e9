//! The PyO3 binding layer: converts numpy arrays to slices, releases the GIL around every
//! kernel, and maps [`KvmixError`] to the `kvmix.KvmixError` exception family. No numerics
//! live here.

mod arrays;
mod errors;
mod policy;
mod quant;
mod store;

use pyo3::prelude::*;

#[pymodule(gil_used = false)]
fn _kvmix(m: &Bound<'_, PyModule>) -> PyResult<()> {
    errors::register(m)?;
    quant::register(m)?;
    policy::register(m)?;
    store::register(m)?;
    m.add("__version__", env!("CARGO_PKG_VERSION"))?;
    m.add_function(wrap_pyfunction!(num_threads, m)?)?;
    Ok(())
}

/// Number of threads in kvmix's worker pool (set by `KVMIX_NUM_THREADS` before first use).
#[pyfunction]
fn num_threads() -> usize {
    crate::parallel::num_threads()
}
