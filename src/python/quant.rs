//! Bindings of the quantization core: `quantize`, the `QuantizedTensor` class, channel
//! factors and bit packing.

use super::arrays::{to_numpy, FloatArray};
use super::errors::detached;
use crate::element::Element;
use crate::error::KvmixError;
use crate::quant::{self, Clip, Grouping, ParamDtype, ParamVec, QuantSpec, QuantizedTensor};
use crate::with_float_slice;
use half::slice::HalfBitsSliceExt;
use half::{bf16, f16};
use numpy::{
    PyArrayDyn, PyArrayMethods, PyReadonlyArray1, PyReadonlyArrayDyn, PyReadwriteArrayDyn,
    PyUntypedArrayMethods,
};
use pyo3::prelude::*;
use pyo3::types::PyDict;

pub fn register(m: &Bound<'_, PyModule>) -> PyResult<()> {
    m.add_class::<PyQuantizedTensor>()?;
    m.add("CLIPS", pyo3::types::PyTuple::new(m.py(), Clip::NAMES)?)?;
    // The shrink factors of `clip="mse"`, for the reference quantizer and the Triton kernels
    // (each f32 exactly, as a Python float).
    m.add(
        "CLIP_SHRINK",
        pyo3::types::PyTuple::new(m.py(), quant::clip::SHRINK.map(f64::from))?,
    )?;
    m.add_function(wrap_pyfunction!(quantize, m)?)?;
    m.add_function(wrap_pyfunction!(channel_absmax, m)?)?;
    m.add_function(wrap_pyfunction!(separable_channel_scale, m)?)?;
    m.add_function(wrap_pyfunction!(key_balancer, m)?)?;
    m.add_function(wrap_pyfunction!(pack_bits, m)?)?;
    m.add_function(wrap_pyfunction!(unpack_bits, m)?)?;
    Ok(())
}

/// A quantized `[..., tokens, channels]` tensor: packed codes and their parameters.
#[pyclass(name = "QuantizedTensor", module = "kvmix._kvmix", frozen)]
pub struct PyQuantizedTensor {
    pub inner: QuantizedTensor,
}

fn params_to_numpy<'py>(
    py: Python<'py>,
    p: &ParamVec,
    shape: &[usize],
) -> PyResult<Bound<'py, PyAny>> {
    Ok(match p {
        ParamVec::F16(v) => to_numpy(py, v.clone(), shape)?.into_any(),
        ParamVec::F32(v) => to_numpy(py, v.clone(), shape)?.into_any(),
    })
}

/// Output element type of `dequantize`.
fn parse_out_dtype(name: &str) -> PyResult<u8> {
    match name {
        "float32" => Ok(0),
        "float16" => Ok(1),
        "bfloat16" => Ok(2),
        _ => Err(KvmixError::DType(format!(
            "`dtype` must be 'float32', 'float16' or 'bfloat16', got {name:?}"
        ))
        .into()),
    }
}

#[pymethods]
impl PyQuantizedTensor {
    /// Shape of the original tensor.
    #[getter]
    fn shape(&self) -> Vec<usize> {
        self.inner.dims.clone()
    }

    #[getter]
    fn bits(&self) -> u8 {
        self.inner.spec.bits
    }

    /// `"token"` (channel groups within a token) or `"channel"` (each channel over token blocks).
    #[getter]
    fn grouping(&self) -> &'static str {
        match self.inner.spec.grouping {
            Grouping::TokenGroups { .. } => "token",
            Grouping::ChannelBlocks { .. } => "channel",
        }
    }

    /// Channels per group (token grouping) or tokens per block (channel grouping).
    #[getter]
    fn group_size(&self) -> usize {
        match self.inner.spec.grouping {
            Grouping::TokenGroups { group_size } => group_size,
            Grouping::ChannelBlocks { token_block } => token_block,
        }
    }

    #[getter]
    fn param_dtype(&self) -> &'static str {
        self.inner.spec.param_dtype.name()
    }

    /// The packed codes, as a 1-D uint8 array (a copy).
    #[getter]
    fn codes<'py>(&self, py: Python<'py>) -> PyResult<Bound<'py, PyArrayDyn<u8>>> {
        to_numpy(py, self.inner.codes.clone(), &[self.inner.codes.len()])
    }

    /// Per-group scales, shaped `[..., tokens, channels/group]` or `[..., blocks, channels]`.
    #[getter]
    fn scale<'py>(&self, py: Python<'py>) -> PyResult<Bound<'py, PyAny>> {
        params_to_numpy(py, &self.inner.scale, &self.param_shape())
    }

    /// Per-group offsets, same shape as `scale`.
    #[getter]
    fn offset<'py>(&self, py: Python<'py>) -> PyResult<Bound<'py, PyAny>> {
        params_to_numpy(py, &self.inner.offset, &self.param_shape())
    }

    /// Per-channel reconstruction factors `[..., channels]`, or None.
    #[getter]
    fn channel_scale<'py>(&self, py: Python<'py>) -> PyResult<Option<Bound<'py, PyAny>>> {
        let dims = &self.inner.dims;
        let mut shape = dims[..dims.len() - 2].to_vec();
        shape.push(dims[dims.len() - 1]);
        self.inner
            .channel_scale
            .as_ref()
            .map(|c| params_to_numpy(py, c, &shape))
            .transpose()
    }

    /// All codes unpacked to one uint8 each, shaped like the original tensor.
    fn unpacked_codes<'py>(&self, py: Python<'py>) -> PyResult<Bound<'py, PyArrayDyn<u8>>> {
        let codes = py.detach(|| self.inner.unpacked_codes());
        to_numpy(py, codes, &self.inner.dims)
    }

    /// Reconstruct the tensor. `dtype` is 'float32', 'float16' or 'bfloat16' (returned as
    /// a uint16 array of bfloat16 bits).
    #[pyo3(signature = (dtype = "float32"))]
    fn dequantize<'py>(&self, py: Python<'py>, dtype: &str) -> PyResult<Bound<'py, PyAny>> {
        Ok(match parse_out_dtype(dtype)? {
            0 => self.dequantize_new::<f32, f32>(py, |s| s)?,
            1 => self.dequantize_new::<f16, f16>(py, |s| s)?,
            _ => self.dequantize_new::<u16, bf16>(py, |s| s.reinterpret_cast_mut())?,
        })
    }

    /// Reconstruct the tensor into `out`, a writeable C-contiguous float32 or float16 array
    /// of the tensor's shape (e.g. a buffer reused across calls, which spares the page faults
    /// of fresh memory).
    fn dequantize_into(&self, py: Python<'_>, out: &Bound<'_, PyAny>) -> PyResult<()> {
        let dims = &self.inner.dims;
        let check =
            |shape: &[usize], contiguous: bool| -> PyResult<()> {
                if shape != dims.as_slice() || !contiguous {
                    return Err(KvmixError::Shape(format!(
                    "`out` must be a C-contiguous array of shape {dims:?}, got shape {shape:?}{}",
                    if contiguous { "" } else { " (not C-contiguous)" }
                ))
                    .into());
                }
                Ok(())
            };
        if let Ok(mut a) = out.extract::<PyReadwriteArrayDyn<'_, f32>>() {
            check(a.shape(), a.is_c_contiguous())?;
            let buf = a
                .as_slice_mut()
                .map_err(|e| KvmixError::Shape(e.to_string()))?;
            return detached(py, || self.inner.dequantize_into(buf));
        }
        if let Ok(mut a) = out.extract::<PyReadwriteArrayDyn<'_, f16>>() {
            check(a.shape(), a.is_c_contiguous())?;
            let buf = a
                .as_slice_mut()
                .map_err(|e| KvmixError::Shape(e.to_string()))?;
            return detached(py, || self.inner.dequantize_into(buf));
        }
        Err(
            KvmixError::DType("`out` must be a writeable float32 or float16 numpy array".into())
                .into(),
        )
    }

    /// Bytes held, by component: `codes`, `scale`, `offset`, `channel_scale`, `total`.
    fn nbytes<'py>(&self, py: Python<'py>) -> PyResult<Bound<'py, PyDict>> {
        let b = self.inner.nbytes();
        let d = PyDict::new(py);
        d.set_item("codes", b.codes)?;
        d.set_item("scale", b.scale)?;
        d.set_item("offset", b.offset)?;
        d.set_item("channel_scale", b.channel_scale)?;
        d.set_item("total", b.total())?;
        Ok(d)
    }

    fn __repr__(&self) -> String {
        format!(
            "QuantizedTensor(shape={:?}, bits={}, grouping='{}', group_size={}, param_dtype='{}', nbytes={})",
            self.inner.dims,
            self.inner.spec.bits,
            self.grouping(),
            self.group_size(),
            self.param_dtype(),
            self.inner.nbytes().total()
        )
    }
}

impl PyQuantizedTensor {
    /// A new numpy array of `A` filled with the reconstruction as `T` (`view` reinterprets
    /// the array's elements as `T`), the GIL released while it is filled.
    ///
    /// The array comes from numpy's allocator rather than a Rust `Vec`: numpy asks the kernel
    /// for transparent huge pages on large arrays, which makes the first touch of 64 MiB
    /// several times cheaper than the 4 KiB page faults of a fresh `Vec`, and that first touch
    /// dominated the cost of dequantizing into a new array. `zeros` costs no more than
    /// `empty` here (fresh pages are zeroed by the kernel either way) and spares reasoning
    /// about uninitialized floats.
    fn dequantize_new<'py, A: numpy::Element, T: Element>(
        &self,
        py: Python<'py>,
        view: impl Fn(&mut [A]) -> &mut [T],
    ) -> PyResult<Bound<'py, PyAny>> {
        let array = PyArrayDyn::<A>::zeros(py, self.inner.dims.as_slice(), false);
        {
            let mut rw = array.readwrite();
            let buf = view(
                rw.as_slice_mut()
                    .map_err(|e| KvmixError::Shape(e.to_string()))?,
            );
            detached(py, || self.inner.dequantize_into_fresh(buf))?;
        }
        Ok(array.into_any())
    }

    fn param_shape(&self) -> Vec<usize> {
        let dims = &self.inner.dims;
        let (t, d) = (dims[dims.len() - 2], dims[dims.len() - 1]);
        let mut shape = dims[..dims.len() - 2].to_vec();
        match self.inner.spec.grouping {
            Grouping::TokenGroups { group_size } => shape.extend([t, d / group_size]),
            Grouping::ChannelBlocks { token_block } => shape.extend([t.div_ceil(token_block), d]),
        }
        shape
    }
}

/// A size argument from Python: negative values are a `ConfigError`, not an `OverflowError`.
pub fn non_negative(name: &str, v: i64) -> PyResult<usize> {
    usize::try_from(v).map_err(|_| {
        KvmixError::Config(format!("`{name}` must be a non-negative integer, got {v}")).into()
    })
}

/// Positions from Python (a sequence): each a non-negative integer (anything with
/// `__index__`, not bool); anything else is a `ConfigError` naming the argument, where
/// `Vec<i64>` would raise a `TypeError` for a float and take `True` as 1.
pub fn positions(name: &str, seq: &Bound<'_, PyAny>) -> PyResult<Vec<usize>> {
    let items: Vec<Bound<'_, PyAny>> = seq.extract().map_err(|_| {
        KvmixError::Config(format!(
            "`{name}` must be a sequence of non-negative integers, got {}",
            seq.get_type()
        ))
    })?;
    items
        .iter()
        .map(|p| {
            as_index(p).ok_or_else(|| {
                KvmixError::Config(format!("`{name}` must hold non-negative integers, got {p}"))
                    .into()
            })
        })
        .collect()
}

/// One non-negative integer from Python (anything with `__index__`, not bool), else a
/// `ConfigError` naming the argument.
pub fn index_arg(name: &str, v: &Bound<'_, PyAny>) -> PyResult<usize> {
    as_index(v).ok_or_else(|| {
        KvmixError::Config(format!("`{name}` must be a non-negative integer, got {v}")).into()
    })
}

fn as_index(v: &Bound<'_, PyAny>) -> Option<usize> {
    if v.is_instance_of::<pyo3::types::PyBool>() {
        return None;
    }
    v.extract::<i64>()
        .ok()
        .and_then(|v| usize::try_from(v).ok())
}

fn parse_grouping(grouping: &str, size: Option<i64>, dims: &[usize]) -> PyResult<Grouping> {
    let name = if grouping == "channel" {
        "token_block"
    } else {
        "group_size"
    };
    let size = size.map(|s| non_negative(name, s)).transpose()?;
    let (t, d) = match dims {
        [.., t, d] => (*t, *d),
        _ => (0, 0),
    };
    match grouping {
        "token" => Ok(Grouping::TokenGroups {
            group_size: size.unwrap_or(d),
        }),
        // A zero-token tensor still needs a positive block.
        "channel" => Ok(Grouping::ChannelBlocks {
            token_block: size.unwrap_or(t.max(1)),
        }),
        _ => Err(KvmixError::Config(format!(
            "`grouping` must be 'token' or 'channel', got {grouping:?}"
        ))
        .into()),
    }
}

/// Quantize `x` of shape `[..., tokens, channels]`.
#[pyfunction]
#[pyo3(signature = (x, bits, grouping = "token", size = None, channel_scale = None, param_dtype = "float16", bfloat16 = false, clip = "minmax"))]
#[allow(clippy::too_many_arguments)]
fn quantize(
    py: Python<'_>,
    x: &Bound<'_, PyAny>,
    bits: i64,
    grouping: &str,
    size: Option<i64>,
    channel_scale: Option<PyReadonlyArrayDyn<'_, f32>>,
    param_dtype: &str,
    bfloat16: bool,
    clip: &str,
) -> PyResult<PyQuantizedTensor> {
    let bits = u8::try_from(bits)
        .map_err(|_| KvmixError::Config(format!("`bits` must be between 1 and 8, got {bits}")))?;
    let x = FloatArray::extract(x, "x", bfloat16)?;
    let dims = x.shape();
    let spec = QuantSpec {
        bits,
        grouping: parse_grouping(grouping, size, &dims)?,
        param_dtype: ParamDtype::parse(param_dtype)?,
        clip: Clip::parse(clip)?,
    };
    if let Some(cs) = &channel_scale {
        let expected: Vec<usize> = match dims.as_slice() {
            [lead @ .., _, d] => lead.iter().copied().chain([*d]).collect(),
            _ => vec![],
        };
        if dims.len() >= 2 && cs.shape() != expected.as_slice() {
            return Err(KvmixError::Shape(format!(
                "`channel_scale` must have shape {expected:?} (the leading dims of `x` and its \
                 channels), got {:?}",
                cs.shape()
            ))
            .into());
        }
    }
    let cs = channel_scale
        .as_ref()
        .map(|c| c.as_array().iter().copied().collect::<Vec<f32>>());
    let data = x.slice();
    let inner = with_float_slice!(data, v => detached(py, || quant::quantize(v, &dims, spec, cs.as_deref())))?;
    Ok(PyQuantizedTensor { inner })
}

/// The shape `[..., channels]` of per-channel statistics of `x` `[..., tokens, channels]`.
fn stat_shape(dims: &[usize]) -> Vec<usize> {
    match dims {
        [lead @ .., _, d] => lead.iter().copied().chain([*d]).collect(),
        _ => dims.to_vec(),
    }
}

/// `max_t |x|` per leading index and channel: shape `[..., channels]`.
#[pyfunction]
#[pyo3(signature = (x, bfloat16 = false))]
fn channel_absmax<'py>(
    py: Python<'py>,
    x: &Bound<'py, PyAny>,
    bfloat16: bool,
) -> PyResult<Bound<'py, PyArrayDyn<f32>>> {
    let x = FloatArray::extract(x, "x", bfloat16)?;
    let dims = x.shape();
    let data = x.slice();
    let out = with_float_slice!(data, v => detached(py, || quant::channel_absmax(v, &dims)))?;
    to_numpy(py, out, &stat_shape(&dims))
}

/// ZipCache's channel factors `sqrt(max_t |x|)` (1 for an all-zero channel): `[..., channels]`.
#[pyfunction]
#[pyo3(signature = (x, bfloat16 = false))]
fn separable_channel_scale<'py>(
    py: Python<'py>,
    x: &Bound<'py, PyAny>,
    bfloat16: bool,
) -> PyResult<Bound<'py, PyArrayDyn<f32>>> {
    let x = FloatArray::extract(x, "x", bfloat16)?;
    let dims = x.shape();
    let data = x.slice();
    let out =
        with_float_slice!(data, v => detached(py, || quant::separable_channel_scale(v, &dims)))?;
    to_numpy(py, out, &stat_shape(&dims))
}

/// MiKV's key balancer `sqrt(max|q_c| / max|k_c|)`: `[batch, kv_heads, head_dim]`.
#[pyfunction]
#[pyo3(signature = (q, k, bfloat16 = false))]
fn key_balancer<'py>(
    py: Python<'py>,
    q: &Bound<'py, PyAny>,
    k: &Bound<'py, PyAny>,
    bfloat16: bool,
) -> PyResult<Bound<'py, PyArrayDyn<f32>>> {
    let q = FloatArray::extract(q, "q", bfloat16)?;
    let k = FloatArray::extract(k, "k", bfloat16)?;
    let (qd, kd) = (q.shape(), k.shape());
    let (qs, ks) = (q.slice(), k.slice());
    use super::arrays::FloatSlice as S;
    let out = match (&qs, &ks) {
        (S::F32(a), S::F32(b)) => detached(py, || quant::key_balancer(a, &qd, b, &kd)),
        (S::F16(a), S::F16(b)) => detached(py, || quant::key_balancer(a, &qd, b, &kd)),
        (S::BF16(a), S::BF16(b)) => detached(py, || quant::key_balancer(a, &qd, b, &kd)),
        _ => Err(KvmixError::DType("`q` and `k` must have the same dtype".into()).into()),
    }?;
    let shape = if kd.len() == 4 {
        vec![kd[0], kd[1], kd[3]]
    } else {
        vec![out.len()]
    };
    to_numpy(py, out, &shape)
}

/// Pack `codes` (uint8, each `< 2**bits`) densely, LSB first.
#[pyfunction]
fn pack_bits<'py>(
    py: Python<'py>,
    codes: PyReadonlyArray1<'py, u8>,
    bits: i64,
) -> PyResult<Bound<'py, PyArrayDyn<u8>>> {
    let bits = checked_bits(bits)?;
    let codes: Vec<u8> = codes.as_array().iter().copied().collect();
    if let Some(bad) = codes.iter().find(|&&c| (c as u32) >> bits != 0) {
        return Err(KvmixError::Config(format!(
            "`codes` must be < 2**bits = {}, found {bad}",
            1u32 << bits
        ))
        .into());
    }
    let mut out = vec![0u8; quant::packed_len(codes.len(), bits)];
    py.detach(|| quant::pack(&codes, bits, &mut out));
    let n = out.len();
    to_numpy(py, out, &[n])
}

/// Unpack `n` codes of `bits` bits from `packed`.
#[pyfunction]
fn unpack_bits<'py>(
    py: Python<'py>,
    packed: PyReadonlyArray1<'py, u8>,
    bits: i64,
    n: i64,
) -> PyResult<Bound<'py, PyArrayDyn<u8>>> {
    let bits = checked_bits(bits)?;
    let n = non_negative("n", n)?;
    let packed: Vec<u8> = packed.as_array().iter().copied().collect();
    if packed.len() != quant::packed_len(n, bits) {
        return Err(KvmixError::Shape(format!(
            "{n} codes of {bits} bits take {} bytes, got {}",
            quant::packed_len(n, bits),
            packed.len()
        ))
        .into());
    }
    let mut out = vec![0u8; n];
    py.detach(|| quant::unpack(&packed, bits, &mut out));
    to_numpy(py, out, &[n])
}

fn checked_bits(bits: i64) -> PyResult<u8> {
    let b = u8::try_from(bits)
        .map_err(|_| KvmixError::Config(format!("`bits` must be between 1 and 8, got {bits}")))?;
    quant::check_bits(b)?;
    Ok(b)
}
