//! The fused kernel against plain softmax attention over the store's dequantized contents.

use super::*;
use crate::store::policy::{EvictionConfig, MikvConfig, UniformConfig, ZipCacheConfig};
use crate::store::{DenseDtype, Policy};

fn data(n: usize, seed: u64) -> Vec<f32> {
    crate::testing::uniform(n, seed, 2.0)
}

/// Softmax attention over `store.dense()` with the same visibility rule.
fn reference(
    store: &LayerStore,
    q: &[f32],
    dims: [usize; 4],
    q_positions: &[usize],
    scale: f32,
) -> Vec<f32> {
    let [b, hq, tq, d] = dims;
    let rep = hq / store.kv_heads;
    let mut out = vec![0f32; q.len()];
    for bi in 0..b {
        for h in 0..hq {
            let (pos, k, v) = store.dense(bi * store.kv_heads + h / rep);
            for t in 0..tq {
                let qr = &q[((bi * hq + h) * tq + t) * d..][..d];
                let logits: Vec<f64> = (0..pos.len())
                    .map(|j| {
                        let visible = pos[j] as usize >= store.first_valid[bi]
                            && pos[j] as usize <= q_positions[t];
                        if !visible {
                            return f64::NEG_INFINITY;
                        }
                        qr.iter()
                            .zip(&k[j * d..(j + 1) * d])
                            .map(|(a, b)| (*a as f64) * (*b as f64))
                            .sum::<f64>()
                            * scale as f64
                    })
                    .collect();
                let m = logits.iter().copied().fold(f64::NEG_INFINITY, f64::max);
                if m == f64::NEG_INFINITY {
                    continue;
                }
                let e: Vec<f64> = logits.iter().map(|l| (l - m).exp()).collect();
                let s: f64 = e.iter().sum();
                let o = &mut out[((bi * hq + h) * tq + t) * d..][..d];
                for (j, w) in e.iter().enumerate() {
                    for c in 0..d {
                        o[c] += (w / s * v[j * d + c] as f64) as f32;
                    }
                }
            }
        }
    }
    out
}

fn policies() -> Vec<Policy> {
    vec![
        Policy::Full,
        Policy::Mikv(MikvConfig {
            streaming_gap: 3,
            ..Default::default()
        }),
        Policy::Mikv(MikvConfig {
            high_bits: Some(4),
            low_bits: 3,
            ..Default::default()
        }),
        Policy::ZipCache(ZipCacheConfig {
            streaming_gap: 5,
            ..Default::default()
        }),
        Policy::Uniform(UniformConfig {
            bits: 4,
            residual: 8,
            group_size: Some(16),
        }),
        Policy::Eviction(EvictionConfig {
            budget: 0.5,
            ..Default::default()
        }),
    ]
}

fn filled(
    policy: Policy,
    b: usize,
    hk: usize,
    d: usize,
    prompt: usize,
    steps: usize,
    seed: u64,
) -> LayerStore {
    let mut st = LayerStore::new(policy, hk, d, DenseDtype::F32).unwrap();
    let n = b * hk * prompt * d;
    st.append(&data(n, seed), &data(n, seed + 1), &[b, hk, prompt, d])
        .unwrap();
    if st.needs_balancer() {
        st.set_key_balancer(
            &data(b * hk * d, seed + 2)
                .iter()
                .map(|x| 0.5 + x.abs())
                .collect::<Vec<_>>(),
        )
        .unwrap();
    }
    let acc: Vec<f32> = data(b * hk * prompt, seed + 3)
        .iter()
        .map(|x| x.abs())
        .collect();
    st.add_scores(0, &acc, &vec![1.0; acc.len()]).unwrap();
    st.maybe_classify(false).unwrap();
    for i in 0..steps {
        let m = b * hk * d;
        st.append(
            &data(m, seed + 10 + i as u64),
            &data(m, seed + 50 + i as u64),
            &[b, hk, 1, d],
        )
        .unwrap();
        let q = data(b * hk * 2 * d, seed + 90 + i as u64);
        let pos = [st.seen() - 1];
        st.attend_and_track(&q, &[b, hk * 2, 1, d], &pos, 0.3)
            .unwrap();
        st.maybe_classify(false).unwrap();
    }
    st
}

#[test]
fn matches_dense_reference_for_every_policy_and_gqa_ratio() {
    for policy in policies() {
        for rep in [1usize, 3, 4, 8] {
            let (b, hk, d) = (2, 2, 32);
            let mut st = filled(policy, b, hk, d, 37, 6, rep as u64);
            st.set_first_valid(&[0, 5]).unwrap();
            let seen = st.seen();
            for tq in [1usize, 3] {
                let dims = [b, hk * rep, tq, d];
                let q = data(dims.iter().product(), 7 + tq as u64);
                // Multi-query: the last tq positions (causal among themselves).
                let qpos: Vec<usize> = (seen - tq..seen).collect();
                let got = attend(&st, &q, &dims, &qpos, 0.25).unwrap().out;
                let want = reference(&st, &q, dims, &qpos, 0.25);
                let err = got
                    .iter()
                    .zip(&want)
                    .map(|(a, b)| (a - b).abs())
                    .fold(0f32, f32::max);
                assert!(err < 1e-4, "{policy:?} rep={rep} tq={tq}: max error {err}");
            }
        }
    }
}

#[test]
fn received_attention_sums_to_queries() {
    let st = filled(
        Policy::ZipCache(ZipCacheConfig {
            streaming_gap: 100,
            ..Default::default()
        }),
        1,
        1,
        16,
        20,
        3,
        1,
    );
    let q = data(4 * 16, 3);
    let a = attend(&st, &q, &[1, 4, 1, 16], &[st.seen() - 1], 0.25).unwrap();
    // Only the buffer tracks scores for ZipCache after prefill: its share of 4 query heads.
    let buffer_share: f32 = a.received[0][0].iter().sum();
    assert!(buffer_share > 0.0 && buffer_share < 4.0);
    assert_eq!(a.seen_by[0][0], vec![1.0; 3]);
    // Without tracking, the same output bit for bit.
    let out = attend_untracked(&st, &q, &[1, 4, 1, 16], &[st.seen() - 1], 0.25).unwrap();
    assert_eq!(out, a.out);
}

#[test]
fn long_runs_match_dense_reference() {
    // Runs past one block of the blocked key and value kernels: 256 rows with more than four
    // queries per kv-head (rep 8), and with four or fewer (a decode step) 4096 rows for
    // per-channel keys, 1024 for values (9000 tokens: 5400 low-tier rows).
    for policy in [
        Policy::ZipCache(ZipCacheConfig::default()),
        Policy::Mikv(MikvConfig {
            key_balancer: false,
            ..Default::default()
        }),
    ]
    .into_iter()
    .flat_map(|p| [(p, 700, 8), (p, 700, 4), (p, 9000, 4), (p, 9000, 1)])
    {
        let (policy, tokens, rep) = policy;
        let (b, hk, d) = (1, 2, 64);
        let st = filled(policy, b, hk, d, tokens, 0, 11);
        let dims = [b, hk * rep, 1, d];
        let q = data(dims.iter().product(), 5);
        let qpos = [st.seen() - 1];
        let got = attend(&st, &q, &dims, &qpos, 0.125).unwrap().out;
        let want = reference(&st, &q, dims, &qpos, 0.125);
        let err = got
            .iter()
            .zip(&want)
            .map(|(a, b)| (a - b).abs())
            .fold(0f32, f32::max);
        assert!(
            err < 1e-4,
            "{policy:?} {tokens} tokens rep {rep}: max error {err}"
        );
    }
}

#[test]
fn split_streams_match_whole_streams() {
    // Streams cut into parts (split softmax, for calls with fewer streams than threads) give
    // the outputs, received attention and counts of whole streams: parts that cut tiers
    // mid-way, parts of one row, queries that see nothing in some parts (padding, causal).
    for policy in policies() {
        let (b, hk, rep, d) = (2, 2, 3, 32);
        let mut st = filled(policy, b, hk, d, 45, 7, 3);
        st.set_first_valid(&[0, 9]).unwrap();
        let seen = st.seen();
        for tq in [1usize, 4] {
            let dims = [b, hk * rep, tq, d];
            let q = data(dims.iter().product(), 21 + tq as u64);
            let qpos: Vec<usize> = (seen - tq..seen).collect();
            let whole = attend_impl(&st, &q, &dims, &qpos, 0.3, true, Some(1)).unwrap();
            assert_eq!(whole.out, attend(&st, &q, &dims, &qpos, 0.3).unwrap().out);
            for k in [2usize, 3, 7, 200] {
                let split = attend_impl(&st, &q, &dims, &qpos, 0.3, true, Some(k)).unwrap();
                let what = format!("{policy:?} tq={tq} parts={k}");
                assert!(
                    max_abs_diff(&split.out, &whole.out) < 1e-5,
                    "{what}: outputs"
                );
                for (s, (r, c)) in split.received.iter().zip(&split.seen_by).enumerate() {
                    for t in 0..3 {
                        let (rw, cw) = (&whole.received[s][t], &whole.seen_by[s][t]);
                        assert_eq!(r[t].len(), rw.len(), "{what}: stream {s} tier {t}");
                        assert!(max_abs_diff(&r[t], rw) < 1e-5, "{what}: received");
                        assert_eq!(&c[t], cw, "{what}: seen_by");
                    }
                }
            }
        }
    }
}

#[test]
fn streams_split_only_when_threads_would_idle() {
    let st = filled(Policy::Full, 1, 3, 16, 5000, 0, 1);
    let count = |threads| split_streams(&st, threads, None).len();
    assert_eq!(count(1), 3);
    assert_eq!(count(2), 6); // three streams on two threads: two parts each
    assert_eq!(count(8), 6); // at most len / MIN_PART_ROWS parts per stream
    let short = filled(Policy::Full, 1, 3, 16, 100, 0, 1);
    assert_eq!(split_streams(&short, 2, None).len(), 3);
    let parts = split_streams(&st, 2, None);
    assert!(parts.iter().all(|p| p.hi - p.lo == 2500));
}

#[test]
fn refuses_mismatched_queries() {
    let st = filled(Policy::Full, 1, 2, 16, 4, 0, 1);
    assert!(matches!(
        attend(&st, &[0.0; 48], &[1, 3, 1, 16], &[3], 1.0),
        Err(KvmixError::Shape(_))
    ));
    assert!(matches!(
        attend(&st, &[0.0; 64], &[1, 4, 1, 16], &[3, 4], 1.0),
        Err(KvmixError::Shape(_))
    ));
}

/// The output of every stream computed with one `Simd` implementation (the dispatch in
/// `attend` always picks the best one the CPU has).
fn attend_with<S: simd::Simd>(
    simd: S,
    store: &LayerStore,
    q: &[f32],
    dims: [usize; 4],
    q_positions: &[usize],
    scale: f32,
) -> Vec<f32> {
    let [_, hq, tq, d] = dims;
    let queries = Queries::new(q, [hq, tq, d], store.kv_heads, q_positions, scale, true);
    let parts = split_streams(store, 1, None);
    let results = parts
        .iter()
        .map(|p| attend_part(simd, store, p, &queries))
        .collect();
    merge_parts(store, &parts, results, &queries).out
}

fn max_abs_diff(a: &[f32], b: &[f32]) -> f32 {
    a.iter()
        .zip(b)
        .map(|(x, y)| (x - y).abs())
        .fold(0f32, f32::max)
}

/// Every vector implementation against the portable one and the dense reference: head_dims
/// with and without a tail of eight channels per sixteen (80, and 40/48-channel groups of
/// the uniform codec), every bit width the codecs allow, GQA groups of 1–8 queries and
/// token counts that leave partial blocks and partial groups of rows.
#[test]
fn vector_paths_match_portable_for_every_width_and_head_dim() {
    let mut policies = vec![Policy::Full];
    for (high_bits, low_bits) in [(4, 2), (8, 1), (3, 3), (2, 4)] {
        policies.push(Policy::ZipCache(ZipCacheConfig {
            high_bits,
            low_bits,
            streaming_gap: 7,
            ..Default::default()
        }));
    }
    for low_bits in [1, 2, 3, 4, 8] {
        policies.push(Policy::Mikv(MikvConfig {
            high_bits: Some(if low_bits == 8 { 8 } else { 4 }),
            low_bits,
            key_balancer: false,
            ..Default::default()
        }));
    }
    for bits in [2, 4, 8] {
        policies.push(Policy::Uniform(UniformConfig {
            bits,
            residual: 16,
            group_size: None,
        }));
    }
    for d in [64usize, 80, 96, 128, 256] {
        for policy in &policies {
            let (b, hk) = (1, 2);
            let st = filled(*policy, b, hk, d, 301, 3, d as u64);
            let qpos = [st.seen() - 1];
            for rep in [1usize, 4, 8] {
                let dims = [b, hk * rep, 1, d];
                let q = data(dims.iter().product(), 3 + rep as u64);
                let scale = 1.0 / (d as f32).sqrt();
                let want = attend_with(simd::Portable, &st, &q, dims, &qpos, scale);
                let reference = reference(&st, &q, dims, &qpos, scale);
                let err = max_abs_diff(&want, &reference);
                assert!(err < 1e-4, "portable {policy:?} d={d} rep={rep}: {err}");
                #[cfg(target_arch = "x86_64")]
                {
                    if let Some(avx) = simd::Avx2::detect() {
                        let got = attend_with(avx, &st, &q, dims, &qpos, scale);
                        let err = max_abs_diff(&got, &want);
                        assert!(err < 1e-5, "avx2 {policy:?} d={d} rep={rep}: {err}");
                    }
                    if let Some(avx512) = simd::Avx512::detect() {
                        let got = attend_with(avx512, &st, &q, dims, &qpos, scale);
                        let err = max_abs_diff(&got, &want);
                        assert!(err < 1e-5, "avx512 {policy:?} d={d} rep={rep}: {err}");
                    }
                }
            }
        }
    }
}
