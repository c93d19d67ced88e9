//! numpy ⇄ slice conversion. Inputs arrive as float32, float16, or — since numpy has no
//! bfloat16 — as a uint16 view of bfloat16 bits, flagged by the caller. Non-contiguous
//! arrays are copied into a contiguous buffer rather than refused.

use crate::error::{KvmixError, Result};
use half::slice::HalfBitsSliceExt;
use half::{bf16, f16};
use numpy::{PyArrayDyn, PyArrayMethods, PyReadonlyArrayDyn, PyUntypedArrayMethods};
use pyo3::prelude::*;
use std::borrow::Cow;

/// A borrowed numpy array of one of the supported element types.
pub enum FloatArray<'py> {
    F32(PyReadonlyArrayDyn<'py, f32>),
    F16(PyReadonlyArrayDyn<'py, f16>),
    /// bfloat16 bits in a uint16 array.
    BF16(PyReadonlyArrayDyn<'py, u16>),
}

/// Contiguous data of a [`FloatArray`], borrowed when the array is C-contiguous.
pub enum FloatSlice<'a> {
    F32(Cow<'a, [f32]>),
    F16(Cow<'a, [f16]>),
    BF16(Cow<'a, [bf16]>),
}

/// The elements in row-major (C) order: borrowed when the array is C-contiguous, else copied
/// in logical order. (`as_slice` alone also accepts Fortran order, which would read the
/// elements transposed.)
fn contiguous<'a, T: numpy::Element + Clone>(a: &'a PyReadonlyArrayDyn<'_, T>) -> Cow<'a, [T]> {
    if a.is_c_contiguous() {
        if let Ok(s) = a.as_slice() {
            return Cow::Borrowed(s);
        }
    }
    Cow::Owned(a.as_array().iter().cloned().collect())
}

impl<'py> FloatArray<'py> {
    /// Borrow `obj` as a float array; `bfloat16` says a uint16 array holds bfloat16 bits.
    pub fn extract(obj: &Bound<'py, PyAny>, name: &str, bfloat16: bool) -> Result<Self> {
        if bfloat16 {
            return obj.extract().map(FloatArray::BF16).map_err(|_| {
                KvmixError::DType(format!(
                    "`{name}`: bfloat16 data must be passed as a numpy uint16 array of its bits, got {}",
                    describe(obj)
                ))
            });
        }
        if let Ok(a) = obj.extract() {
            return Ok(FloatArray::F32(a));
        }
        if let Ok(a) = obj.extract() {
            return Ok(FloatArray::F16(a));
        }
        Err(KvmixError::DType(format!(
            "`{name}` must be a numpy array of float32, float16 or bfloat16, got {}",
            describe(obj)
        )))
    }

    pub fn shape(&self) -> Vec<usize> {
        match self {
            FloatArray::F32(a) => a.shape().to_vec(),
            FloatArray::F16(a) => a.shape().to_vec(),
            FloatArray::BF16(a) => a.shape().to_vec(),
        }
    }

    pub fn slice(&self) -> FloatSlice<'_> {
        match self {
            FloatArray::F32(a) => FloatSlice::F32(contiguous(a)),
            FloatArray::F16(a) => FloatSlice::F16(contiguous(a)),
            FloatArray::BF16(a) => FloatSlice::BF16(match contiguous(a) {
                Cow::Borrowed(bits) => Cow::Borrowed(bits.reinterpret_cast::<bf16>()),
                Cow::Owned(bits) => Cow::Owned(bits.iter().map(|&b| bf16::from_bits(b)).collect()),
            }),
        }
    }
}

/// `dtype` and shape of a Python object, for error messages.
fn describe(obj: &Bound<'_, PyAny>) -> String {
    let dtype = obj
        .getattr("dtype")
        .map(|d| d.to_string())
        .unwrap_or_else(|_| obj.get_type().to_string());
    match obj.getattr("shape") {
        Ok(s) => format!("dtype {dtype} with shape {s}"),
        Err(_) => dtype,
    }
}

/// Apply a generic kernel to whichever element type the slice holds.
#[macro_export]
macro_rules! with_float_slice {
    ($slice:expr, $x:ident => $body:expr) => {
        match $slice {
            $crate::python::arrays::FloatSlice::F32(c) => {
                let $x: &[f32] = &c;
                $body
            }
            $crate::python::arrays::FloatSlice::F16(c) => {
                let $x: &[half::f16] = &c;
                $body
            }
            $crate::python::arrays::FloatSlice::BF16(c) => {
                let $x: &[half::bf16] = &c;
                $body
            }
        }
    };
}

/// A new numpy array of `shape` owning `data` (no copy).
pub fn to_numpy<'py, T: numpy::Element>(
    py: Python<'py>,
    data: Vec<T>,
    shape: &[usize],
) -> PyResult<Bound<'py, PyArrayDyn<T>>> {
    numpy::PyArray1::from_vec(py, data).reshape(shape.to_vec())
}
