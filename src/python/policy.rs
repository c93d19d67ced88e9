//! The policies' options as Python sees them: one typed parser per policy, reading a dict
//! into the Rust configuration whose `Default` impl is the only place a default is written,
//! and the reverse (a configuration back into a dict) for `kvmix.policy_defaults` and
//! `LayerStore.options`.
//!
//! Every parser matches each of its options by name and refuses anything else; there is no
//! catch-all arm that would let a listed option without its own arm set another field.

use crate::error::KvmixError;
use crate::importance::CountMode;
use crate::quant::Clip;
use crate::store::{
    DenseDtype, EvictionConfig, MikvConfig, Policy, Selection, UniformConfig, ZipCacheConfig,
};
use pyo3::prelude::*;
use pyo3::types::{PyBool, PyDict, PyString, PyTuple};

pub fn register(m: &Bound<'_, PyModule>) -> PyResult<()> {
    m.add("POLICIES", PyTuple::new(m.py(), Policy::NAMES)?)?;
    m.add("BUFFER_DTYPES", PyTuple::new(m.py(), DenseDtype::NAMES)?)?;
    m.add_function(wrap_pyfunction!(policy_defaults, m)?)?;
    m.add_function(wrap_pyfunction!(default_buffer_dtype, m)?)?;
    Ok(())
}

/// Every option of `policy` at its default, as `LayerStore(policy, ..., config)` reads them.
#[pyfunction]
fn policy_defaults<'py>(py: Python<'py>, policy: &str) -> PyResult<Bound<'py, PyDict>> {
    options_dict(py, &Policy::default_of(policy)?)
}

/// The buffer dtype `LayerStore` uses for `policy` when none is given.
#[pyfunction]
fn default_buffer_dtype(policy: &str) -> PyResult<&'static str> {
    Ok(Policy::default_of(policy)?.default_buffer().name())
}

pub const MIKV_OPTIONS: [&str; 7] = [
    "ratio",
    "recent_share",
    "high_bits",
    "low_bits",
    "group_size",
    "key_balancer",
    "streaming_gap",
];
pub const ZIPCACHE_OPTIONS: [&str; 15] = [
    "salient_ratio",
    "high_bits",
    "low_bits",
    "low_key_bits",
    "probe_recent",
    "probe_random",
    "count_mode",
    "normalized",
    "channel_separable",
    "selection",
    "streaming_gap",
    "sink_tokens",
    "key_block",
    "key_clip",
    "value_clip",
];
pub const UNIFORM_OPTIONS: [&str; 3] = ["bits", "residual", "group_size"];
pub const EVICTION_OPTIONS: [&str; 3] = ["budget", "recent_share", "streaming_gap"];

const COUNT_MODES: [(&str, CountMode); 2] = [
    ("exact", CountMode::Exact),
    ("full_matrix", CountMode::FullMatrix),
];
const CLIPS: [(&str, Clip); 3] = [
    ("minmax", Clip::MinMax),
    ("mse", Clip::Mse),
    ("mse_unbiased", Clip::MseUnbiased),
];
const SELECTIONS: [(&str, Selection); 2] =
    [("layer", Selection::Layer), ("kv_head", Selection::KvHead)];

/// The configuration of policy `name` from `config` (`None` values keep the default).
pub fn parse(name: &str, config: Option<&Bound<'_, PyDict>>) -> PyResult<Policy> {
    let mut policy = Policy::default_of(name)?;
    let Some(config) = config else {
        return Ok(policy);
    };
    for (k, v) in config.iter() {
        let key: String = k.extract().map_err(|_| {
            KvmixError::Config(format!(
                "option names of policy '{name}' must be strings, got {}",
                describe(&k)
            ))
        })?;
        if v.is_none() {
            // Unknown names are refused even with `None`.
            if !valid_options(&policy).contains(&key.as_str()) {
                return Err(unknown(&policy, &key));
            }
            continue;
        }
        let o = Opt {
            policy: name,
            key: &key,
            value: &v,
        };
        match &mut policy {
            Policy::Full => return Err(unknown(&Policy::Full, &key)),
            Policy::Mikv(c) => set_mikv(c, &o)?,
            Policy::ZipCache(c) => set_zipcache(c, &o)?,
            Policy::Uniform(c) => set_uniform(c, &o)?,
            Policy::Eviction(c) => set_eviction(c, &o)?,
        }
    }
    Ok(policy)
}

fn set_mikv(c: &mut MikvConfig, o: &Opt<'_, '_, '_>) -> PyResult<()> {
    match o.key {
        "ratio" => c.ratio = o.fraction()?,
        "recent_share" => c.recent_share = o.fraction()?,
        "high_bits" => c.high_bits = Some(o.bits()?),
        "low_bits" => c.low_bits = o.bits()?,
        "group_size" => c.group_size = Some(o.count()?),
        "key_balancer" => c.key_balancer = o.flag()?,
        "streaming_gap" => c.streaming_gap = o.count()?,
        _ => return Err(unknown(&Policy::Mikv(*c), o.key)),
    }
    Ok(())
}

fn set_zipcache(c: &mut ZipCacheConfig, o: &Opt<'_, '_, '_>) -> PyResult<()> {
    match o.key {
        "salient_ratio" => c.salient_ratio = o.fraction()?,
        "high_bits" => c.high_bits = o.bits()?,
        "low_bits" => c.low_bits = o.bits()?,
        "low_key_bits" => c.low_key_bits = Some(o.bits()?),
        "probe_recent" => c.probe_recent = o.fraction()?,
        "probe_random" => c.probe_random = o.fraction()?,
        "count_mode" => c.count_mode = o.choice(&COUNT_MODES)?,
        "normalized" => c.normalized = o.flag()?,
        "channel_separable" => c.channel_separable = o.flag()?,
        "selection" => c.selection = o.choice(&SELECTIONS)?,
        "streaming_gap" => c.streaming_gap = o.count()?,
        "sink_tokens" => c.sink_tokens = o.count()?,
        "key_block" => c.key_block = o.count()?,
        "key_clip" => c.key_clip = o.choice(&CLIPS)?,
        "value_clip" => c.value_clip = o.choice(&CLIPS)?,
        _ => return Err(unknown(&Policy::ZipCache(*c), o.key)),
    }
    Ok(())
}

fn set_uniform(c: &mut UniformConfig, o: &Opt<'_, '_, '_>) -> PyResult<()> {
    match o.key {
        "bits" => c.bits = o.bits()?,
        "residual" => c.residual = o.count()?,
        "group_size" => c.group_size = Some(o.count()?),
        _ => return Err(unknown(&Policy::Uniform(*c), o.key)),
    }
    Ok(())
}

fn set_eviction(c: &mut EvictionConfig, o: &Opt<'_, '_, '_>) -> PyResult<()> {
    match o.key {
        "budget" => c.budget = o.fraction()?,
        "recent_share" => c.recent_share = o.fraction()?,
        "streaming_gap" => c.streaming_gap = o.count()?,
        _ => return Err(unknown(&Policy::Eviction(*c), o.key)),
    }
    Ok(())
}

/// Every option of `policy` with its value (`None` for an unset optional one).
pub fn options_dict<'py>(py: Python<'py>, policy: &Policy) -> PyResult<Bound<'py, PyDict>> {
    let d = PyDict::new(py);
    match *policy {
        Policy::Full => {}
        Policy::Mikv(c) => {
            d.set_item("ratio", c.ratio)?;
            d.set_item("recent_share", c.recent_share)?;
            d.set_item("high_bits", c.high_bits)?;
            d.set_item("low_bits", c.low_bits)?;
            d.set_item("group_size", c.group_size)?;
            d.set_item("key_balancer", c.key_balancer)?;
            d.set_item("streaming_gap", c.streaming_gap)?;
        }
        Policy::ZipCache(c) => {
            d.set_item("salient_ratio", c.salient_ratio)?;
            d.set_item("high_bits", c.high_bits)?;
            d.set_item("low_bits", c.low_bits)?;
            d.set_item("low_key_bits", c.low_key_bits)?;
            d.set_item("probe_recent", c.probe_recent)?;
            d.set_item("probe_random", c.probe_random)?;
            d.set_item("count_mode", name_of(&COUNT_MODES, c.count_mode))?;
            d.set_item("normalized", c.normalized)?;
            d.set_item("channel_separable", c.channel_separable)?;
            d.set_item("selection", name_of(&SELECTIONS, c.selection))?;
            d.set_item("streaming_gap", c.streaming_gap)?;
            d.set_item("sink_tokens", c.sink_tokens)?;
            d.set_item("key_block", c.key_block)?;
            d.set_item("key_clip", name_of(&CLIPS, c.key_clip))?;
            d.set_item("value_clip", name_of(&CLIPS, c.value_clip))?;
        }
        Policy::Uniform(c) => {
            d.set_item("bits", c.bits)?;
            d.set_item("residual", c.residual)?;
            d.set_item("group_size", c.group_size)?;
        }
        Policy::Eviction(c) => {
            d.set_item("budget", c.budget)?;
            d.set_item("recent_share", c.recent_share)?;
            d.set_item("streaming_gap", c.streaming_gap)?;
        }
    }
    debug_assert_eq!(d.len(), valid_options(policy).len());
    Ok(d)
}

/// `count_mode` as `probe_scores` reads it.
pub fn count_mode(name: &str) -> PyResult<CountMode> {
    lookup(&COUNT_MODES, name).ok_or_else(|| {
        KvmixError::Config(format!(
            "`count_mode` must be one of {}, got {name:?}",
            quoted(&COUNT_MODES.map(|(n, _)| n))
        ))
        .into()
    })
}

fn valid_options(policy: &Policy) -> &'static [&'static str] {
    match policy {
        Policy::Full => &[],
        Policy::Mikv(_) => &MIKV_OPTIONS,
        Policy::ZipCache(_) => &ZIPCACHE_OPTIONS,
        Policy::Uniform(_) => &UNIFORM_OPTIONS,
        Policy::Eviction(_) => &EVICTION_OPTIONS,
    }
}

fn unknown(policy: &Policy, key: &str) -> PyErr {
    let valid = valid_options(policy);
    KvmixError::Config(format!(
        "unknown option `{key}` for policy '{}'; valid options: {}",
        policy.name(),
        if valid.is_empty() {
            "none".to_string()
        } else {
            valid.join(", ")
        }
    ))
    .into()
}

fn lookup<T: Copy>(table: &[(&str, T)], name: &str) -> Option<T> {
    table.iter().find(|(n, _)| *n == name).map(|(_, v)| *v)
}

fn name_of<T: Copy + PartialEq>(table: &[(&'static str, T)], value: T) -> &'static str {
    table
        .iter()
        .find(|(_, v)| *v == value)
        .map(|(n, _)| *n)
        .unwrap_or("?")
}

fn quoted(names: &[&str]) -> String {
    names
        .iter()
        .map(|n| format!("'{n}'"))
        .collect::<Vec<_>>()
        .join(", ")
}

/// `str '0.4'`: the type and the value, for messages.
fn describe(v: &Bound<'_, PyAny>) -> String {
    let ty = v
        .get_type()
        .name()
        .map(|n| n.to_string())
        .unwrap_or_else(|_| "?".into());
    let repr = v
        .repr()
        .map(|r| r.to_string())
        .unwrap_or_else(|_| "?".into());
    format!("{ty} {repr}")
}

/// One option's value, converted by what the option is.
struct Opt<'a, 'b, 'py> {
    policy: &'a str,
    key: &'a str,
    value: &'b Bound<'py, PyAny>,
}

impl Opt<'_, '_, '_> {
    fn wrong(&self, expected: &str) -> PyErr {
        KvmixError::Config(format!(
            "`{}` (policy '{}') must be {expected}, got {}",
            self.key,
            self.policy,
            describe(self.value)
        ))
        .into()
    }

    /// A real number (int or float; not bool, not str). The range is checked by the policy.
    fn fraction(&self) -> PyResult<f64> {
        if self.value.is_instance_of::<PyBool>() || self.value.is_instance_of::<PyString>() {
            return Err(self.wrong("a number"));
        }
        self.value.extract().map_err(|_| self.wrong("a number"))
    }

    /// A non-negative integer (anything with `__index__`, not bool).
    fn integer(&self, max: u64, expected: &str) -> PyResult<u64> {
        if self.value.is_instance_of::<PyBool>() {
            return Err(self.wrong(expected));
        }
        let v: i64 = self.value.extract().map_err(|_| self.wrong(expected))?;
        u64::try_from(v)
            .ok()
            .filter(|v| *v <= max)
            .ok_or_else(|| self.wrong(expected))
    }

    fn count(&self) -> PyResult<usize> {
        let v = self.integer(usize::MAX as u64, "a non-negative integer")?;
        usize::try_from(v).map_err(|_| self.wrong("a non-negative integer"))
    }

    /// A code width; which widths a tier accepts is checked by the policy.
    fn bits(&self) -> PyResult<u8> {
        let v = self.integer(u8::MAX as u64, "a bit width (an integer from 0 to 255)")?;
        u8::try_from(v).map_err(|_| self.wrong("an integer number of bits"))
    }

    fn flag(&self) -> PyResult<bool> {
        if !self.value.is_instance_of::<PyBool>() {
            return Err(self.wrong("True or False"));
        }
        self.value.extract()
    }

    fn choice<T: Copy>(&self, table: &[(&str, T)]) -> PyResult<T> {
        let names: Vec<&str> = table.iter().map(|(n, _)| *n).collect();
        let expected = format!("one of {}", quoted(&names));
        let name: String = self.value.extract().map_err(|_| self.wrong(&expected))?;
        lookup(table, &name).ok_or_else(|| self.wrong(&expected))
    }
}
