//! Bindings of the layer store and the importance functions, for experiments on numpy
//! arrays and for the transformers cache layers.

use super::arrays::{to_numpy, FloatArray, FloatSlice};
use super::errors::detached;
use super::policy;
use crate::error::KvmixError;
use crate::importance;
use crate::quant::{self, Clip};
use crate::store::{
    Codec, DenseDtype, Factor, LayerStore, Layout, MemoryReport, Policy, TierBytes,
};
use numpy::{PyArrayDyn, PyReadonlyArrayDyn, PyReadwriteArrayDyn, PyUntypedArrayMethods};
use pyo3::prelude::*;
use pyo3::types::PyDict;
use std::sync::{Mutex, MutexGuard, TryLockError};

pub fn register(m: &Bound<'_, PyModule>) -> PyResult<()> {
    m.add_class::<PyLayerStore>()?;
    m.add_function(wrap_pyfunction!(probe_positions, m)?)?;
    m.add_function(wrap_pyfunction!(probe_scores, m)?)?;
    m.add_function(wrap_pyfunction!(top_k, m)?)?;
    Ok(())
}

/// The mixed-precision KV store of one attention layer (see `kvmix.store`).
#[pyclass(name = "LayerStore", module = "kvmix._kvmix", frozen)]
pub struct PyLayerStore {
    /// A store may be shared between Python threads: each call holds the lock for its whole
    /// duration (kernels run with the GIL released, so without it a second thread would meet
    /// PyO3's bare "Already borrowed" error, or worse).
    inner: Mutex<LayerStore>,
}

impl PyLayerStore {
    /// The store, waiting (with the GIL released) while another thread's call holds it.
    fn lock(&self) -> PyResult<MutexGuard<'_, LayerStore>> {
        loop {
            match self.inner.try_lock() {
                Ok(g) => return Ok(g),
                Err(TryLockError::WouldBlock) => Python::attach(|py| {
                    py.detach(|| std::thread::sleep(std::time::Duration::from_micros(20)))
                }),
                Err(TryLockError::Poisoned(_)) => {
                    return Err(KvmixError::Config(
                        "this LayerStore was left unusable by an internal error in another \
                         thread; build a new one"
                            .into(),
                    )
                    .into())
                }
            }
        }
    }
}

/// A float32 numpy array argument, else a `DTypeError` naming it (not numpy's `TypeError`).
fn f32_arg<'py>(name: &str, a: &Bound<'py, PyAny>) -> PyResult<PyReadonlyArrayDyn<'py, f32>> {
    a.extract().map_err(|_| {
        KvmixError::DType(format!(
            "`{name}` must be a float32 numpy array, got {}",
            a.getattr("dtype")
                .map(|d| d.to_string())
                .unwrap_or_else(|_| a.get_type().to_string())
        ))
        .into()
    })
}

fn f32_vec(a: &PyReadonlyArrayDyn<'_, f32>) -> Vec<f32> {
    a.as_array().iter().copied().collect()
}

fn tier_dict<'py>(py: Python<'py>, t: &TierBytes) -> PyResult<Bound<'py, PyDict>> {
    let d = PyDict::new(py);
    d.set_item("key_data", t.keys.data)?;
    d.set_item("key_params", t.keys.params)?;
    d.set_item("key_index", t.keys.index)?;
    d.set_item("value_data", t.values.data)?;
    d.set_item("value_params", t.values.params)?;
    d.set_item("value_index", t.values.index)?;
    d.set_item("positions", t.positions)?;
    d.set_item("scores", t.scores)?;
    d.set_item("total", t.total())?;
    Ok(d)
}

pub fn memory_dict<'py>(py: Python<'py>, m: &MemoryReport) -> PyResult<Bound<'py, PyDict>> {
    let d = PyDict::new(py);
    d.set_item("bytes", m.total())?;
    d.set_item("fp16_bytes", m.fp16_bytes)?;
    d.set_item("tokens", m.tokens)?;
    let tiers = PyDict::new(py);
    tiers.set_item("buffer", tier_dict(py, &m.buffer)?)?;
    tiers.set_item("high", tier_dict(py, &m.high)?)?;
    tiers.set_item("low", tier_dict(py, &m.low)?)?;
    d.set_item("tiers", tiers)?;
    Ok(d)
}

#[pymethods]
impl PyLayerStore {
    #[new]
    /// `buffer_dtype=None`: the policy's default (`kvmix.default_buffer_dtype`).
    #[pyo3(signature = (policy, kv_heads, head_dim, config = None, buffer_dtype = None))]
    fn new(
        policy: &str,
        kv_heads: usize,
        head_dim: usize,
        config: Option<&Bound<'_, PyDict>>,
        buffer_dtype: Option<&str>,
    ) -> PyResult<Self> {
        let policy = policy::parse(policy, config)?;
        let buffer = match buffer_dtype {
            Some(name) => DenseDtype::parse(name)?,
            None => policy.default_buffer(),
        };
        let inner = LayerStore::new(policy, kv_heads, head_dim, buffer)?;
        Ok(PyLayerStore {
            inner: Mutex::new(inner),
        })
    }

    /// The policy's name.
    #[getter]
    fn policy(&self) -> PyResult<&'static str> {
        Ok(self.lock()?.policy.name())
    }

    /// Every option of the policy, defaults filled in (`LayerStore(policy, h, d, options)`
    /// builds the same store).
    #[getter]
    fn options<'py>(&self, py: Python<'py>) -> PyResult<Bound<'py, PyDict>> {
        let policy = self.lock()?.policy;
        policy::options_dict(py, &policy)
    }

    /// Which queries' attention the store needs as importance: `"none"`, `"every_query"`
    /// (H2O accumulation) or `"probes"` (ZipCache's probe queries at prefill).
    #[getter]
    fn scoring(&self) -> PyResult<&'static str> {
        Ok(self.lock()?.policy.scoring().name())
    }

    /// Whether the policy drops tokens (then no dense copy of every token exists).
    #[getter]
    fn evicts(&self) -> PyResult<bool> {
        Ok(self.lock()?.policy.evicts())
    }

    /// Storage of the not-yet-classified tokens: `"float16"`, `"bfloat16"` or `"float32"`.
    #[getter]
    fn buffer_dtype(&self) -> PyResult<&'static str> {
        Ok(self.lock()?.layout.buffer.name())
    }

    /// Tokens seen (positions assigned so far).
    #[getter]
    fn seen(&self) -> PyResult<usize> {
        let guard = self.lock()?;
        let inner = &*guard;
        Ok(inner.seen())
    }

    #[getter]
    fn batch(&self) -> PyResult<usize> {
        let guard = self.lock()?;
        let inner = &*guard;
        Ok(inner.batch)
    }

    #[getter]
    fn kv_heads(&self) -> PyResult<usize> {
        let guard = self.lock()?;
        let inner = &*guard;
        Ok(inner.kv_heads)
    }

    #[getter]
    fn head_dim(&self) -> PyResult<usize> {
        let guard = self.lock()?;
        let inner = &*guard;
        Ok(inner.head_dim)
    }

    /// The resolved policy: its name, every option (defaults filled in), and the codec of
    /// each tier's keys and values for this head_dim. Another engine (the Triton device
    /// store) builds its tiers from this, so the policies are defined once, here.
    #[getter]
    fn layout<'py>(&self, py: Python<'py>) -> PyResult<Bound<'py, PyDict>> {
        let guard = self.lock()?;
        layout_dict(py, &guard.policy, &guard.layout)
    }

    /// Whether the policy needs `set_key_balancer` before the first classification.
    #[getter]
    fn needs_balancer(&self) -> PyResult<bool> {
        let guard = self.lock()?;
        let inner = &*guard;
        Ok(inner.needs_balancer())
    }

    /// Append keys and values `[batch, kv_heads, tokens, head_dim]` to the buffer.
    #[pyo3(signature = (keys, values, bfloat16 = false))]
    fn append(
        &self,
        py: Python<'_>,
        keys: &Bound<'_, PyAny>,
        values: &Bound<'_, PyAny>,
        bfloat16: bool,
    ) -> PyResult<()> {
        let mut guard = self.lock()?;
        let inner = &mut *guard;
        let k = FloatArray::extract(keys, "keys", bfloat16)?;
        let v = FloatArray::extract(values, "values", bfloat16)?;
        let (kd, vd) = (k.shape(), v.shape());
        if kd != vd {
            return Err(KvmixError::Shape(format!(
                "keys {kd:?} and values {vd:?} must have the same shape"
            ))
            .into());
        }
        let store = &mut *inner;
        match (k.slice(), v.slice()) {
            (FloatSlice::F32(a), FloatSlice::F32(b)) => detached(py, || store.append(&a, &b, &kd)),
            (FloatSlice::F16(a), FloatSlice::F16(b)) => detached(py, || store.append(&a, &b, &kd)),
            (FloatSlice::BF16(a), FloatSlice::BF16(b)) => {
                detached(py, || store.append(&a, &b, &kd))
            }
            _ => {
                Err(KvmixError::DType("`keys` and `values` must have the same dtype".into()).into())
            }
        }
    }

    /// Mark the first `first_valid[b]` positions of sequence `b` as left padding.
    fn set_first_valid(&self, first_valid: &Bound<'_, PyAny>) -> PyResult<()> {
        let first_valid = super::quant::positions("first_valid", first_valid)?;
        let mut guard = self.lock()?;
        let inner = &mut *guard;
        Ok(inner.set_first_valid(&first_valid)?)
    }

    /// MiKV's key balancer `[batch, kv_heads, head_dim]` (from `kvmix.key_balancer`).
    fn set_key_balancer(&self, balancer: PyReadonlyArrayDyn<'_, f32>) -> PyResult<()> {
        let mut guard = self.lock()?;
        let inner = &mut *guard;
        Ok(inner.set_key_balancer(&f32_vec(&balancer))?)
    }

    /// Add importance `acc`/`count` (`[batch, kv_heads, n]`) to positions `start..start+n`.
    fn add_scores(
        &self,
        start: &Bound<'_, PyAny>,
        acc: &Bound<'_, PyAny>,
        count: &Bound<'_, PyAny>,
    ) -> PyResult<()> {
        let start = super::quant::index_arg("start", start)?;
        let (acc, count) = (f32_arg("acc", acc)?, f32_arg("count", count)?);
        let mut guard = self.lock()?;
        let inner = &mut *guard;
        Ok(inner.add_scores(start, &f32_vec(&acc), &f32_vec(&count))?)
    }

    /// Add attention probabilities `[batch, q_heads, q_len, tokens]` over the tokens in
    /// `dense()` order; `query_positions` are the positions of the `q_len` queries.
    fn accumulate_dense(
        &self,
        py: Python<'_>,
        probs: PyReadonlyArrayDyn<'_, f32>,
        query_positions: Vec<usize>,
    ) -> PyResult<()> {
        let mut guard = self.lock()?;
        let inner = &mut *guard;
        let dims = probs.shape().to_vec();
        let p = f32_vec(&probs);
        let store = &mut *inner;
        detached(py, || store.accumulate_dense(&p, &dims, &query_positions))
    }

    /// Attention of `q` (`[batch, q_heads, q_len, head_dim]`, float32) at positions
    /// `q_positions` over everything the store holds, computed on the compressed data.
    /// With `track`, the attention each token received feeds its importance score.
    #[pyo3(signature = (q, q_positions, scale, track = true))]
    fn attend<'py>(
        &self,
        py: Python<'py>,
        q: &Bound<'py, PyAny>,
        q_positions: &Bound<'py, PyAny>,
        scale: f32,
        track: bool,
    ) -> PyResult<Bound<'py, PyArrayDyn<f32>>> {
        let mut guard = self.lock()?;
        let inner = &mut *guard;
        let q = f32_arg("q", q)?;
        let q_positions = super::quant::positions("q_positions", q_positions)?;
        let dims = q.shape().to_vec();
        let qs = match q.as_slice() {
            Ok(s) if q.is_c_contiguous() => std::borrow::Cow::Borrowed(s),
            _ => std::borrow::Cow::Owned(f32_vec(&q)),
        };
        let store = &mut *inner;
        let out = if track {
            detached(py, || {
                store.attend_and_track(&qs, &dims, &q_positions, scale)
            })?
        } else {
            let store = &*store;
            detached(py, || {
                crate::attention::attend_untracked(store, &qs, &dims, &q_positions, scale)
            })?
        };
        to_numpy(py, out, &dims)
    }

    /// Classify the buffer if due (or `force`); returns whether it ran.
    #[pyo3(signature = (force = false))]
    fn maybe_classify(&self, py: Python<'_>, force: bool) -> PyResult<bool> {
        let mut guard = self.lock()?;
        let inner = &mut *guard;
        let store = &mut *inner;
        detached(py, || store.maybe_classify(force))
    }

    /// Drop every token at position `>= length` (`length >= 0`).
    fn crop(&self, length: &Bound<'_, PyAny>) -> PyResult<()> {
        let length = super::quant::index_arg("length", length)?;
        let mut guard = self.lock()?;
        guard.crop(length);
        Ok(())
    }

    fn select_batch(&self, indices: &Bound<'_, PyAny>) -> PyResult<()> {
        let indices = super::quant::positions("indices", indices)?;
        let mut guard = self.lock()?;
        let inner = &mut *guard;
        Ok(inner.select_batch(&indices)?)
    }

    fn repeat_interleave(&self, repeats: &Bound<'_, PyAny>) -> PyResult<()> {
        let repeats = super::quant::index_arg("repeats", repeats)?;
        let mut guard = self.lock()?;
        let inner = &mut *guard;
        Ok(inner.repeat_interleave(repeats)?)
    }

    fn reset(&self) -> PyResult<()> {
        self.lock()?.reset();
        Ok(())
    }

    /// `(positions, keys, values)` of stream `b * kv_heads + h`, dequantized, in position order.
    #[allow(clippy::type_complexity)]
    fn dense<'py>(
        &self,
        py: Python<'py>,
        stream: usize,
    ) -> PyResult<(
        Bound<'py, PyArrayDyn<u32>>,
        Bound<'py, PyArrayDyn<f32>>,
        Bound<'py, PyArrayDyn<f32>>,
    )> {
        let mut guard = self.lock()?;
        let inner = &mut *guard;
        if stream >= inner.streams.len() {
            return Err(KvmixError::Shape(format!(
                "stream {stream} out of range ({} streams)",
                inner.streams.len()
            ))
            .into());
        }
        let (p, k, v) = py.detach(|| inner.dense(stream));
        let (n, d) = (p.len(), inner.head_dim);
        Ok((
            to_numpy(py, p, &[n])?,
            to_numpy(py, k, &[n, d])?,
            to_numpy(py, v, &[n, d])?,
        ))
    }

    /// Dequantize every stream into `keys` and `values`, writeable C-contiguous float32 arrays
    /// `[batch, kv_heads, capacity, head_dim]` reused across calls: each stream's tokens in
    /// position order at `[..., :n, :]`, the rest untouched. Returns `n`, the tokens per stream.
    /// `changed_only=True`: the arrays hold what the previous call wrote, untouched since; only
    /// the rows that changed are rewritten (the store rewrites all when it cannot tell).
    #[pyo3(signature = (keys, values, changed_only = false))]
    fn dense_into(
        &self,
        py: Python<'_>,
        keys: &Bound<'_, PyAny>,
        values: &Bound<'_, PyAny>,
        changed_only: bool,
    ) -> PyResult<usize> {
        let mut guard = self.lock()?;
        let inner = &mut *guard;
        let shape_of =
            |a: &PyReadwriteArrayDyn<'_, f32>, name: &str| -> PyResult<usize> {
                let dims = a.shape();
                let (b, h, d) = (inner.batch, inner.kv_heads, inner.head_dim);
                if dims.len() != 4
                    || dims[0] != b
                    || dims[1] != h
                    || dims[3] != d
                    || !a.is_c_contiguous()
                {
                    return Err(KvmixError::Shape(format!(
                    "`{name}` must be a C-contiguous array [{b}, {h}, capacity, {d}], got shape \
                     {dims:?}{}",
                    if a.is_c_contiguous() { "" } else { " (not C-contiguous)" }
                ))
                    .into());
                }
                Ok(dims[2])
            };
        let (mut k, mut v) = (
            writeable_f32(keys, "keys")?,
            writeable_f32(values, "values")?,
        );
        let capacity = shape_of(&k, "keys")?;
        if shape_of(&v, "values")? != capacity {
            return Err(
                KvmixError::Shape("`keys` and `values` must have the same shape".into()).into(),
            );
        }
        let ks = k
            .as_slice_mut()
            .map_err(|e| KvmixError::Shape(e.to_string()))?;
        let vs = v
            .as_slice_mut()
            .map_err(|e| KvmixError::Shape(e.to_string()))?;
        let store = &mut *inner;
        detached(py, || store.dense_into(ks, vs, capacity, changed_only))
    }

    /// Positions held by each tier of stream `stream`: `{"buffer", "high", "low"}`.
    fn tier_positions<'py>(&self, py: Python<'py>, stream: usize) -> PyResult<Bound<'py, PyDict>> {
        let mut guard = self.lock()?;
        let inner = &mut *guard;
        let s = inner.streams.get(stream).ok_or_else(|| {
            PyErr::from(KvmixError::Shape(format!("stream {stream} out of range")))
        })?;
        let d = PyDict::new(py);
        for (name, tier) in [("buffer", &s.buffer), ("high", &s.high), ("low", &s.low)] {
            let p = tier.positions.to_vec();
            let n = p.len();
            d.set_item(name, to_numpy(py, p, &[n])?)?;
        }
        Ok(d)
    }

    /// Bytes held now, per tier and component, and the dense fp16 size of the same tokens.
    fn memory<'py>(&self, py: Python<'py>) -> PyResult<Bound<'py, PyDict>> {
        let mut guard = self.lock()?;
        let inner = &mut *guard;
        memory_dict(py, &inner.memory())
    }
}

fn writeable_f32<'py>(
    obj: &Bound<'py, PyAny>,
    name: &str,
) -> PyResult<PyReadwriteArrayDyn<'py, f32>> {
    obj.extract().map_err(|_| {
        KvmixError::DType(format!("`{name}` must be a writeable float32 numpy array")).into()
    })
}

/// Probe query positions: `ceil(recent·len)` most recent + `ceil(random·len)` random earlier.
#[pyfunction]
#[pyo3(signature = (length, recent = 0.05, random = 0.05, seed = 0))]
fn probe_positions(length: i64, recent: f64, random: f64, seed: u64) -> PyResult<Vec<usize>> {
    let length = super::quant::non_negative("length", length)?;
    Ok(importance::probe_positions(length, recent, random, seed)?)
}

/// Per-token importance from causal softmax over the probe rows: `(acc, count)`,
/// each `[batch, kv_heads, len]`.
#[pyfunction]
#[pyo3(signature = (q, k, probes, scale, first_valid = None, count_mode = "exact", bfloat16 = false))]
#[allow(clippy::too_many_arguments, clippy::type_complexity)]
fn probe_scores<'py>(
    py: Python<'py>,
    q: &Bound<'py, PyAny>,
    k: &Bound<'py, PyAny>,
    probes: Vec<usize>,
    scale: f32,
    first_valid: Option<Vec<usize>>,
    count_mode: &str,
    bfloat16: bool,
) -> PyResult<(Bound<'py, PyArrayDyn<f32>>, Bound<'py, PyArrayDyn<f32>>)> {
    let mode = policy::count_mode(count_mode)?;
    let q = FloatArray::extract(q, "q", bfloat16)?;
    let k = FloatArray::extract(k, "k", bfloat16)?;
    let (qd, kd) = (q.shape(), k.shape());
    let fv = first_valid.unwrap_or_else(|| vec![0; qd.first().copied().unwrap_or(0)]);
    let (acc, count) = match (q.slice(), k.slice()) {
        (FloatSlice::F32(a), FloatSlice::F32(b)) => detached(py, || {
            importance::probe_scores(&a, &qd, &b, &kd, &probes, scale, &fv, mode)
        }),
        (FloatSlice::F16(a), FloatSlice::F16(b)) => detached(py, || {
            importance::probe_scores(&a, &qd, &b, &kd, &probes, scale, &fv, mode)
        }),
        (FloatSlice::BF16(a), FloatSlice::BF16(b)) => detached(py, || {
            importance::probe_scores(&a, &qd, &b, &kd, &probes, scale, &fv, mode)
        }),
        _ => Err(KvmixError::DType("`q` and `k` must have the same dtype".into()).into()),
    }?;
    let shape = [kd[0], kd[1], kd[2]];
    Ok((to_numpy(py, acc, &shape)?, to_numpy(py, count, &shape)?))
}

/// Indices (ascending) of the `k` largest scores; ties go to the higher index.
#[pyfunction]
fn top_k(scores: PyReadonlyArrayDyn<'_, f32>, k: usize) -> Vec<usize> {
    importance::top_k(&f32_vec(&scores), k)
}

fn codec_dict<'py>(py: Python<'py>, c: &Codec) -> PyResult<Bound<'py, PyDict>> {
    let d = PyDict::new(py);
    match *c {
        Codec::Dense(dt) => {
            d.set_item("kind", "dense")?;
            d.set_item("dtype", dt.name())?;
        }
        Codec::TokenGroups {
            bits,
            group_size,
            factor,
            clip,
        } => {
            d.set_item("kind", "token_groups")?;
            d.set_item("bits", bits)?;
            d.set_item("group_size", group_size)?;
            let f = match factor {
                Factor::None => "none",
                Factor::Separable => "separable",
                Factor::Fixed => "fixed",
            };
            d.set_item("factor", f)?;
            clip_items(&d, clip)?;
        }
        Codec::Channel { bits, clip } => {
            d.set_item("kind", "channel")?;
            d.set_item("bits", bits)?;
            clip_items(&d, clip)?;
        }
    }
    Ok(d)
}

/// `clip` and, for `"mse"`, the shrink factors it searches (the device engine reads them from
/// the layout: it may run where the compiled core is not installed).
fn clip_items(d: &Bound<'_, PyDict>, clip: Clip) -> PyResult<()> {
    d.set_item("clip", clip.name())?;
    if clip != Clip::MinMax {
        d.set_item("shrink", quant::clip::SHRINK.map(f64::from).to_vec())?;
    }
    Ok(())
}

fn layout_dict<'py>(py: Python<'py>, p: &Policy, l: &Layout) -> PyResult<Bound<'py, PyDict>> {
    let d = PyDict::new(py);
    d.set_item("policy", p.name())?;
    d.set_item("options", policy::options_dict(py, p)?)?;
    d.set_item("buffer", l.buffer.name())?;
    let gap = p.streaming_gap();
    d.set_item(
        "streaming_gap",
        if gap == usize::MAX { None } else { Some(gap) },
    )?;
    d.set_item("high_scored", l.high_scored)?;
    d.set_item(
        "high",
        (codec_dict(py, &l.high.0)?, codec_dict(py, &l.high.1)?),
    )?;
    d.set_item(
        "low",
        (codec_dict(py, &l.low.0)?, codec_dict(py, &l.low.1)?),
    )?;
    Ok(d)
}
