//! Bindings of the layer store and the importance functions, for experiments on numpy
//! arrays and for the transformers cache layers.

use super::arrays::{to_numpy, FloatArray, FloatSlice};
use super::errors::detached;
use crate::error::KvmixError;
use crate::importance::{self, CountMode};
use crate::store::{
    Codec, DenseDtype, EvictionConfig, Factor, LayerStore, Layout, MemoryReport, MikvConfig,
    Policy, Selection, TierBytes, UniformConfig, ZipCacheConfig,
};
use numpy::{PyArrayDyn, PyReadonlyArrayDyn, PyReadwriteArrayDyn, PyUntypedArrayMethods};
use pyo3::prelude::*;
use pyo3::types::PyDict;

pub fn register(m: &Bound<'_, PyModule>) -> PyResult<()> {
    m.add_class::<PyLayerStore>()?;
    m.add_function(wrap_pyfunction!(probe_positions, m)?)?;
    m.add_function(wrap_pyfunction!(probe_scores, m)?)?;
    m.add_function(wrap_pyfunction!(top_k, m)?)?;
    Ok(())
}

/// Read the keys of `config` into `set`, refusing unknown ones with the list of valid keys.
fn read_config(
    config: Option<&Bound<'_, PyDict>>,
    policy: &str,
    valid: &[&str],
    mut set: impl FnMut(&str, &Bound<'_, PyAny>) -> PyResult<()>,
) -> PyResult<()> {
    let Some(config) = config else { return Ok(()) };
    for (k, v) in config.iter() {
        let key: String = k.extract()?;
        if !valid.contains(&key.as_str()) {
            return Err(KvmixError::Config(format!(
                "unknown option `{key}` for policy '{policy}'; valid options: {}",
                valid.join(", ")
            ))
            .into());
        }
        if !v.is_none() {
            set(&key, &v)?;
        }
    }
    Ok(())
}

fn count_mode(name: &str) -> PyResult<CountMode> {
    match name {
        "exact" => Ok(CountMode::Exact),
        "full_matrix" => Ok(CountMode::FullMatrix),
        _ => Err(KvmixError::Config(format!(
            "`count_mode` must be 'exact' or 'full_matrix', got {name:?}"
        ))
        .into()),
    }
}

fn selection(name: &str) -> PyResult<Selection> {
    match name {
        "layer" => Ok(Selection::Layer),
        "kv_head" => Ok(Selection::KvHead),
        _ => Err(KvmixError::Config(format!(
            "`selection` must be 'layer' or 'kv_head', got {name:?}"
        ))
        .into()),
    }
}

fn parse_policy(name: &str, config: Option<&Bound<'_, PyDict>>) -> PyResult<Policy> {
    Ok(match name {
        "full" => {
            read_config(config, name, &[], |_, _| Ok(()))?;
            Policy::Full
        }
        "mikv" => {
            let mut c = MikvConfig::default();
            let keys = ["ratio", "recent_share", "high_bits", "low_bits", "group_size", "key_balancer", "streaming_gap"];
            read_config(config, name, &keys, |k, v| {
                match k {
                    "ratio" => c.ratio = v.extract()?,
                    "recent_share" => c.recent_share = v.extract()?,
                    "high_bits" => c.high_bits = Some(v.extract()?),
                    "low_bits" => c.low_bits = v.extract()?,
                    "group_size" => c.group_size = Some(v.extract()?),
                    "key_balancer" => c.key_balancer = v.extract()?,
                    _ => c.streaming_gap = v.extract()?,
                }
                Ok(())
            })?;
            Policy::Mikv(c)
        }
        "zipcache" => {
            let mut c = ZipCacheConfig::default();
            let keys = [
                "salient_ratio", "high_bits", "low_bits", "low_key_bits", "probe_recent",
                "probe_random", "count_mode", "normalized", "channel_separable", "selection",
                "streaming_gap",
            ];
            read_config(config, name, &keys, |k, v| {
                match k {
                    "salient_ratio" => c.salient_ratio = v.extract()?,
                    "high_bits" => c.high_bits = v.extract()?,
                    "low_bits" => c.low_bits = v.extract()?,
                    "low_key_bits" => c.low_key_bits = v.extract()?,
                    "probe_recent" => c.probe_recent = v.extract()?,
                    "probe_random" => c.probe_random = v.extract()?,
                    "count_mode" => c.count_mode = count_mode(&v.extract::<String>()?)?,
                    "normalized" => c.normalized = v.extract()?,
                    "channel_separable" => c.channel_separable = v.extract()?,
                    "selection" => c.selection = selection(&v.extract::<String>()?)?,
                    _ => c.streaming_gap = v.extract()?,
                }
                Ok(())
            })?;
            Policy::ZipCache(c)
        }
        "uniform" => {
            let mut c = UniformConfig::default();
            read_config(config, name, &["bits", "residual", "group_size"], |k, v| {
                match k {
                    "bits" => c.bits = v.extract()?,
                    "residual" => c.residual = v.extract()?,
                    _ => c.group_size = Some(v.extract()?),
                }
                Ok(())
            })?;
            Policy::Uniform(c)
        }
        "eviction" => {
            let mut c = EvictionConfig::default();
            read_config(config, name, &["budget", "recent_share", "streaming_gap"], |k, v| {
                match k {
                    "budget" => c.budget = v.extract()?,
                    "recent_share" => c.recent_share = v.extract()?,
                    _ => c.streaming_gap = v.extract()?,
                }
                Ok(())
            })?;
            Policy::Eviction(c)
        }
        _ => {
            return Err(KvmixError::Config(format!(
                "`policy` must be one of 'full', 'mikv', 'zipcache', 'uniform', 'eviction', got {name:?}"
            ))
            .into())
        }
    })
}

/// The mixed-precision KV store of one attention layer (see `kvmix.store`).
#[pyclass(name = "LayerStore", module = "kvmix._kvmix")]
pub struct PyLayerStore {
    inner: LayerStore,
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
    #[pyo3(signature = (policy, kv_heads, head_dim, config = None, buffer_dtype = "float32"))]
    fn new(
        policy: &str,
        kv_heads: usize,
        head_dim: usize,
        config: Option<&Bound<'_, PyDict>>,
        buffer_dtype: &str,
    ) -> PyResult<Self> {
        let policy = parse_policy(policy, config)?;
        let inner = LayerStore::new(policy, kv_heads, head_dim, DenseDtype::parse(buffer_dtype)?)?;
        Ok(PyLayerStore { inner })
    }

    /// Tokens seen (positions assigned so far).
    #[getter]
    fn seen(&self) -> usize {
        self.inner.seen()
    }

    #[getter]
    fn batch(&self) -> usize {
        self.inner.batch
    }

    #[getter]
    fn kv_heads(&self) -> usize {
        self.inner.kv_heads
    }

    #[getter]
    fn head_dim(&self) -> usize {
        self.inner.head_dim
    }

    /// The resolved policy: its name, every option (defaults filled in), and the codec of
    /// each tier's keys and values for this head_dim. Another engine (the Triton device
    /// store) builds its tiers from this, so the policies are defined once, here.
    #[getter]
    fn layout<'py>(&self, py: Python<'py>) -> PyResult<Bound<'py, PyDict>> {
        layout_dict(py, &self.inner.policy, &self.inner.layout)
    }

    /// Whether the policy needs `set_key_balancer` before the first classification.
    #[getter]
    fn needs_balancer(&self) -> bool {
        self.inner.needs_balancer()
    }

    /// Append keys and values `[batch, kv_heads, tokens, head_dim]` to the buffer.
    #[pyo3(signature = (keys, values, bfloat16 = false))]
    fn append(
        &mut self,
        py: Python<'_>,
        keys: &Bound<'_, PyAny>,
        values: &Bound<'_, PyAny>,
        bfloat16: bool,
    ) -> PyResult<()> {
        let k = FloatArray::extract(keys, "keys", bfloat16)?;
        let v = FloatArray::extract(values, "values", bfloat16)?;
        let (kd, vd) = (k.shape(), v.shape());
        if kd != vd {
            return Err(KvmixError::Shape(format!(
                "keys {kd:?} and values {vd:?} must have the same shape"
            ))
            .into());
        }
        let store = &mut self.inner;
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
    fn set_first_valid(&mut self, first_valid: Vec<usize>) -> PyResult<()> {
        Ok(self.inner.set_first_valid(&first_valid)?)
    }

    /// MiKV's key balancer `[batch, kv_heads, head_dim]` (from `kvmix.key_balancer`).
    fn set_key_balancer(&mut self, balancer: PyReadonlyArrayDyn<'_, f32>) -> PyResult<()> {
        Ok(self.inner.set_key_balancer(&f32_vec(&balancer))?)
    }

    /// Add importance `acc`/`count` (`[batch, kv_heads, n]`) to positions `start..start+n`.
    fn add_scores(
        &mut self,
        start: usize,
        acc: PyReadonlyArrayDyn<'_, f32>,
        count: PyReadonlyArrayDyn<'_, f32>,
    ) -> PyResult<()> {
        Ok(self
            .inner
            .add_scores(start, &f32_vec(&acc), &f32_vec(&count))?)
    }

    /// Add attention probabilities `[batch, q_heads, q_len, tokens]` over the tokens in
    /// `dense()` order; `query_positions` are the positions of the `q_len` queries.
    fn accumulate_dense(
        &mut self,
        py: Python<'_>,
        probs: PyReadonlyArrayDyn<'_, f32>,
        query_positions: Vec<usize>,
    ) -> PyResult<()> {
        let dims = probs.shape().to_vec();
        let p = f32_vec(&probs);
        let store = &mut self.inner;
        detached(py, || store.accumulate_dense(&p, &dims, &query_positions))
    }

    /// Attention of `q` (`[batch, q_heads, q_len, head_dim]`, float32) at positions
    /// `q_positions` over everything the store holds, computed on the compressed data.
    /// With `track`, the attention each token received feeds its importance score.
    #[pyo3(signature = (q, q_positions, scale, track = true))]
    fn attend<'py>(
        &mut self,
        py: Python<'py>,
        q: &Bound<'py, PyAny>,
        q_positions: Vec<i64>,
        scale: f32,
        track: bool,
    ) -> PyResult<Bound<'py, PyArrayDyn<f32>>> {
        let q: PyReadonlyArrayDyn<'py, f32> = q.extract().map_err(|_| {
            KvmixError::DType(format!(
                "`q` must be a float32 numpy array, got {}",
                q.getattr("dtype")
                    .map(|d| d.to_string())
                    .unwrap_or_else(|_| q.get_type().to_string())
            ))
        })?;
        let q_positions = q_positions
            .into_iter()
            .map(|p| super::quant::non_negative("q_positions", p))
            .collect::<PyResult<Vec<usize>>>()?;
        let dims = q.shape().to_vec();
        let qs = match q.as_slice() {
            Ok(s) if q.is_c_contiguous() => std::borrow::Cow::Borrowed(s),
            _ => std::borrow::Cow::Owned(f32_vec(&q)),
        };
        let store = &mut self.inner;
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
    fn maybe_classify(&mut self, py: Python<'_>, force: bool) -> PyResult<bool> {
        let store = &mut self.inner;
        detached(py, || store.maybe_classify(force))
    }

    fn crop(&mut self, length: usize) {
        self.inner.crop(length)
    }

    fn select_batch(&mut self, indices: Vec<usize>) -> PyResult<()> {
        Ok(self.inner.select_batch(&indices)?)
    }

    fn repeat_interleave(&mut self, repeats: usize) -> PyResult<()> {
        Ok(self.inner.repeat_interleave(repeats)?)
    }

    fn reset(&mut self) {
        self.inner.reset()
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
        if stream >= self.inner.streams.len() {
            return Err(KvmixError::Shape(format!(
                "stream {stream} out of range ({} streams)",
                self.inner.streams.len()
            ))
            .into());
        }
        let (p, k, v) = py.detach(|| self.inner.dense(stream));
        let (n, d) = (p.len(), self.inner.head_dim);
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
        &mut self,
        py: Python<'_>,
        keys: &Bound<'_, PyAny>,
        values: &Bound<'_, PyAny>,
        changed_only: bool,
    ) -> PyResult<usize> {
        let shape_of =
            |a: &PyReadwriteArrayDyn<'_, f32>, name: &str| -> PyResult<usize> {
                let dims = a.shape();
                let (b, h, d) = (self.inner.batch, self.inner.kv_heads, self.inner.head_dim);
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
        let store = &mut self.inner;
        detached(py, || store.dense_into(ks, vs, capacity, changed_only))
    }

    /// Positions held by each tier of stream `stream`: `{"buffer", "high", "low"}`.
    fn tier_positions<'py>(&self, py: Python<'py>, stream: usize) -> PyResult<Bound<'py, PyDict>> {
        let s = self.inner.streams.get(stream).ok_or_else(|| {
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
        memory_dict(py, &self.inner.memory())
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
fn probe_positions(length: usize, recent: f64, random: f64, seed: u64) -> PyResult<Vec<usize>> {
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
    let mode = self::count_mode(count_mode)?;
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

fn dtype_name(d: DenseDtype) -> &'static str {
    match d {
        DenseDtype::F16 => "float16",
        DenseDtype::BF16 => "bfloat16",
        DenseDtype::F32 => "float32",
    }
}

fn codec_dict<'py>(py: Python<'py>, c: &Codec) -> PyResult<Bound<'py, PyDict>> {
    let d = PyDict::new(py);
    match *c {
        Codec::Dense(dt) => {
            d.set_item("kind", "dense")?;
            d.set_item("dtype", dtype_name(dt))?;
        }
        Codec::TokenGroups {
            bits,
            group_size,
            factor,
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
        }
        Codec::Channel { bits } => {
            d.set_item("kind", "channel")?;
            d.set_item("bits", bits)?;
        }
    }
    Ok(d)
}

fn layout_dict<'py>(py: Python<'py>, p: &Policy, l: &Layout) -> PyResult<Bound<'py, PyDict>> {
    let d = PyDict::new(py);
    let o = PyDict::new(py);
    let name = match *p {
        Policy::Full => "full",
        Policy::Mikv(c) => {
            o.set_item("ratio", c.ratio)?;
            o.set_item("recent_share", c.recent_share)?;
            o.set_item("high_bits", c.high_bits)?;
            o.set_item("low_bits", c.low_bits)?;
            o.set_item("group_size", c.group_size)?;
            o.set_item("key_balancer", c.key_balancer)?;
            o.set_item("streaming_gap", c.streaming_gap)?;
            "mikv"
        }
        Policy::ZipCache(c) => {
            o.set_item("salient_ratio", c.salient_ratio)?;
            o.set_item("high_bits", c.high_bits)?;
            o.set_item("low_bits", c.low_bits)?;
            o.set_item("low_key_bits", c.low_key_bits)?;
            o.set_item("probe_recent", c.probe_recent)?;
            o.set_item("probe_random", c.probe_random)?;
            let cm = match c.count_mode {
                CountMode::Exact => "exact",
                CountMode::FullMatrix => "full_matrix",
            };
            o.set_item("count_mode", cm)?;
            o.set_item("normalized", c.normalized)?;
            o.set_item("channel_separable", c.channel_separable)?;
            let sel = match c.selection {
                Selection::Layer => "layer",
                Selection::KvHead => "kv_head",
            };
            o.set_item("selection", sel)?;
            o.set_item("streaming_gap", c.streaming_gap)?;
            "zipcache"
        }
        Policy::Uniform(c) => {
            o.set_item("bits", c.bits)?;
            o.set_item("residual", c.residual)?;
            o.set_item("group_size", c.group_size)?;
            "uniform"
        }
        Policy::Eviction(c) => {
            o.set_item("budget", c.budget)?;
            o.set_item("recent_share", c.recent_share)?;
            o.set_item("streaming_gap", c.streaming_gap)?;
            "eviction"
        }
    };
    d.set_item("policy", name)?;
    d.set_item("options", o)?;
    d.set_item("buffer", dtype_name(l.buffer))?;
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
