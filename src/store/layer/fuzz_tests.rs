//! Fuzz targets, one per entry point of the store reachable from Python (issue 14): random
//! sequences of calls with hostile arguments (NaN/Inf, huge and tiny magnitudes, wrong shapes,
//! out-of-range indices, sizes past the limits, zero heads, sub-byte token groups). Properties:
//! no call panics; a refused call leaves the store exactly as it was; attention stays finite.
//! `make fuzz` runs them long (`PROPTEST_CASES`); `cargo test` runs a short pass.

use super::*;
use crate::importance;
use crate::store::policy::{EvictionConfig, MikvConfig, UniformConfig, ZipCacheConfig};
use proptest::prelude::*;

fn policy(i: usize) -> Policy {
    match i % 8 {
        0 => Policy::Full,
        1 => Policy::Mikv(MikvConfig {
            key_balancer: false,
            low_bits: 3,
            group_size: Some(4),
            ..Default::default()
        }),
        2 => Policy::Mikv(MikvConfig {
            streaming_gap: 2,
            ..Default::default()
        }),
        3 => Policy::ZipCache(ZipCacheConfig {
            low_bits: 1,
            streaming_gap: 2,
            ..Default::default()
        }),
        4 => Policy::ZipCache(ZipCacheConfig::default()),
        5 => Policy::Uniform(UniformConfig {
            bits: 2,
            residual: 3,
            group_size: Some(2),
        }),
        6 => Policy::Uniform(UniformConfig {
            bits: 4,
            residual: 4,
            group_size: None,
        }),
        _ => Policy::Eviction(EvictionConfig {
            budget: 0.5,
            ..Default::default()
        }),
    }
}

/// Everything observable about a store.
fn state(s: &LayerStore) -> (usize, usize, Vec<usize>, Vec<Stream>, MemoryReport) {
    (
        s.seen(),
        s.batch,
        s.first_valid.clone(),
        s.streams.clone(),
        s.memory(),
    )
}

#[derive(Clone, Debug)]
enum Op {
    Append {
        b: usize,
        h: usize,
        n: usize,
        d: usize,
        magnitude: f32,
        poison: Option<f32>,
        seed: u64,
    },
    Classify(bool),
    Balancer(f32),
    Scores {
        start: usize,
        n: usize,
        poison: bool,
    },
    Attend {
        hq: usize,
        tq: usize,
        scale: f32,
        qmag: f32,
        track: bool,
    },
    Crop(usize),
    Select(Vec<usize>),
    Repeat(usize),
    FirstValid(Vec<usize>),
    Reset,
}

fn magnitude() -> impl Strategy<Value = f32> {
    prop::sample::select(vec![1.0f32, 1.0, 100.0, 1e-30, 3e4, 4e4, 1e5, 1e38])
}

fn op() -> impl Strategy<Value = Op> {
    prop_oneof![
        4 => (1usize..3, 1usize..3, 0usize..6, prop::sample::select(vec![8usize, 16, 15]),
              magnitude(), prop::option::weighted(0.1, prop::sample::select(vec![f32::NAN, f32::INFINITY])),
              any::<u64>())
            .prop_map(|(b, h, n, d, magnitude, poison, seed)| Op::Append { b, h, n, d, magnitude, poison, seed }),
        2 => any::<bool>().prop_map(Op::Classify),
        1 => prop::sample::select(vec![0.5f32, 1.0, 0.0, -1.0, f32::NAN, 1e-6, 1e6]).prop_map(Op::Balancer),
        1 => (0usize..20, 0usize..8, any::<bool>()).prop_map(|(start, n, poison)| Op::Scores { start, n, poison }),
        3 => (0usize..5, 0usize..3, prop::sample::select(vec![0.25f32, 1.0, f32::NAN, f32::INFINITY, 0.0, -2.0]),
              prop::sample::select(vec![1.0f32, 1e20, 1e38]), any::<bool>())
            .prop_map(|(hq, tq, scale, qmag, track)| Op::Attend { hq, tq, scale, qmag, track }),
        1 => (0usize..30).prop_map(Op::Crop),
        1 => prop::collection::vec(0usize..4, 0..4).prop_map(Op::Select),
        1 => prop::sample::select(vec![0usize, 1, 2, 1 << 17, usize::MAX]).prop_map(Op::Repeat),
        1 => prop::collection::vec(0usize..8, 0..3).prop_map(Op::FirstValid),
        1 => Just(Op::Reset),
    ]
}

fn apply(s: &mut LayerStore, op: &Op) -> crate::error::Result<()> {
    match op.clone() {
        Op::Append {
            b,
            h,
            n,
            d,
            magnitude,
            poison,
            seed,
        } => {
            let len = b * h * n * d;
            let mut k: Vec<f32> = crate::testing::uniform(len, seed, magnitude);
            let v: Vec<f32> = crate::testing::uniform(len, seed.wrapping_add(1), magnitude);
            if let (Some(p), true) = (poison, len > 0) {
                k[seed as usize % len] = p;
            }
            s.append(&k, &v, &[b, h, n, d])
        }
        Op::Classify(force) => s.maybe_classify(force).map(|_| ()),
        Op::Balancer(x) => s.set_key_balancer(&vec![x; s.batch * s.kv_heads * s.head_dim]),
        Op::Scores { start, n, poison } => {
            let len = s.streams.len() * n;
            let mut acc = vec![0.5f32; len];
            if poison && len > 0 {
                acc[0] = f32::NAN;
            }
            s.add_scores(start, &acc, &vec![1.0; len])
        }
        Op::Attend {
            hq,
            tq,
            scale,
            qmag,
            track,
        } => {
            let (b, d) = (s.batch, s.head_dim);
            let q = crate::testing::uniform(b * hq * tq * d, 7, qmag);
            let pos: Vec<usize> = (0..tq).map(|i| s.seen().saturating_sub(i)).collect();
            let out = if track {
                s.attend_and_track(&q, &[b, hq, tq, d], &pos, scale)?
            } else {
                crate::attention::attend_untracked(s, &q, &[b, hq, tq, d], &pos, scale)?
            };
            assert!(
                out.iter().all(|x| x.is_finite()),
                "attention must stay finite"
            );
            Ok(())
        }
        Op::Crop(n) => {
            s.crop(n);
            Ok(())
        }
        Op::Select(idx) => s.select_batch(&idx),
        Op::Repeat(r) => s.repeat_interleave(r),
        Op::FirstValid(fv) => s.set_first_valid(&fv),
        Op::Reset => {
            s.reset();
            Ok(())
        }
    }
}

proptest! {
    #![proptest_config(ProptestConfig { failure_persistence: None, ..ProptestConfig::default() })]

    /// `LayerStore::{append, maybe_classify, set_key_balancer, add_scores, attend, crop,
    /// select_batch, repeat_interleave, set_first_valid, reset}` in any order, with any
    /// argument: no panic, refusals atomic, attention finite, dense() consistent.
    #[test]
    fn store_calls_never_panic_and_refusals_are_atomic(
        p in 0usize..8,
        h in 1usize..3,
        buffer in prop::sample::select(vec![DenseDtype::F32, DenseDtype::F16, DenseDtype::BF16]),
        ops in prop::collection::vec(op(), 1..25),
    ) {
        let d = 16;
        let mut s = LayerStore::new(policy(p), h, d, buffer).unwrap();
        for op in &ops {
            let before = state(&s);
            if apply(&mut s, op).is_err() {
                prop_assert!(state(&s) == before, "refused {op:?} changed the store");
            }
            for stream in 0..s.streams.len() {
                let (pos, k, v) = s.dense(stream);
                prop_assert_eq!(pos.len() * d, k.len());
                prop_assert!(k.iter().chain(&v).all(|x| x.is_finite()));
                prop_assert!(pos.windows(2).all(|w| w[0] < w[1]));
            }
            prop_assert_eq!(s.memory().fp16_bytes, s.streams.len() * s.seen() * 2 * d * 2);
        }
    }

    /// `importance::probe_positions`: any length and fractions; never panics, positions
    /// sorted, distinct, inside the length.
    #[test]
    fn probe_positions_never_panic(
        len in prop_oneof![0usize..5000, Just(1usize << 40), Just(usize::MAX)],
        recent in prop_oneof![0.0f64..=1.0, Just(f64::NAN), Just(-0.5), Just(2.0)],
        random in prop_oneof![0.0f64..=1.0, Just(f64::NAN)],
        seed in any::<u64>(),
    ) {
        if let Ok(p) = importance::probe_positions(len, recent, random, seed) {
            prop_assert!(p.windows(2).all(|w| w[0] < w[1]));
            prop_assert!(p.iter().all(|&x| x < len));
        }
    }

    /// `importance::probe_scores`: hostile shapes, probes, scales and values never panic;
    /// accepted calls give finite scores.
    #[test]
    fn probe_scores_never_panic(
        b in 0usize..3, hq in 0usize..4, hk in 0usize..3, len in 0usize..12, d in 0usize..9,
        probes in prop::collection::vec(0usize..14, 0..5),
        scale in prop::sample::select(vec![0.3f32, f32::NAN, f32::INFINITY, 1e38]),
        mag in magnitude(),
        short in any::<bool>(),
    ) {
        let qn = b * hq * len * d;
        let kn = (b * hk * len * d).saturating_sub(usize::from(short));
        let q = crate::testing::uniform(qn, 1, mag);
        let k = crate::testing::uniform(kn, 2, mag);
        let fv = vec![0; b];
        let r = importance::probe_scores(
            &q, &[b, hq, len, d], &k, &[b, hk, len, d], &probes, scale, &fv,
            importance::CountMode::Exact,
        );
        if let Ok((acc, count)) = r {
            prop_assert!(acc.iter().chain(&count).all(|x| x.is_finite()));
        }
    }
}
