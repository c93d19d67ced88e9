//! Invariants of the layer store under every policy: no token is lost except by eviction,
//! positions stay consistent through every operation, and byte counts are the buffers' sizes.

use super::*;
use crate::store::policy::{EvictionConfig, MikvConfig, Selection, UniformConfig, ZipCacheConfig};
use proptest::prelude::*;

const H: usize = 2;
const D: usize = 16;

fn policies() -> Vec<Policy> {
    vec![
        Policy::Full,
        Policy::Mikv(MikvConfig {
            streaming_gap: 1,
            ..Default::default()
        }),
        Policy::Mikv(MikvConfig {
            high_bits: Some(8),
            low_bits: 3,
            key_balancer: false,
            streaming_gap: 3,
            ..Default::default()
        }),
        Policy::ZipCache(ZipCacheConfig {
            streaming_gap: 4,
            ..Default::default()
        }),
        Policy::Uniform(UniformConfig {
            bits: 2,
            residual: 8,
            group_size: None,
        }),
        Policy::Eviction(EvictionConfig {
            budget: 0.3,
            ..Default::default()
        }),
    ]
}

fn data(n: usize, seed: u64) -> Vec<f32> {
    crate::testing::uniform(n, seed, 2.0)
}

fn store(policy: Policy, batch: usize, prompt: usize, seed: u64) -> LayerStore {
    let mut st = LayerStore::new(policy, H, D, DenseDtype::F32).unwrap();
    let n = batch * H * prompt * D;
    st.append(&data(n, seed), &data(n, seed + 1), &[batch, H, prompt, D])
        .unwrap();
    if st.needs_balancer() {
        st.set_key_balancer(&vec![1.5; batch * H * D]).unwrap();
    }
    let acc = data(batch * H * prompt, seed + 2)
        .iter()
        .map(|x| x.abs())
        .collect::<Vec<_>>();
    st.add_scores(0, &acc, &vec![1.0; acc.len()]).unwrap();
    st.maybe_classify(false).unwrap();
    st
}

fn decode(st: &mut LayerStore, steps: usize, seed: u64) {
    let b = st.batch;
    for i in 0..steps {
        let n = b * H * D;
        st.append(
            &data(n, seed + i as u64),
            &data(n, seed + 100 + i as u64),
            &[b, H, 1, D],
        )
        .unwrap();
        let held = st.streams[0].len();
        let probs: Vec<f32> = data(b * 2 * H * held, seed + 7 * i as u64)
            .iter()
            .map(|x| x.abs() / held as f32)
            .collect();
        let q = [st.seen() - 1];
        st.accumulate_dense(&probs, &[b, 2 * H, 1, held], &q)
            .unwrap();
        st.maybe_classify(false).unwrap();
    }
}

fn positions(st: &LayerStore, s: usize) -> Vec<u32> {
    st.dense(s).0
}

fn evicts(p: &Policy) -> bool {
    matches!(p, Policy::Eviction(_))
}

proptest! {
    #![proptest_config(ProptestConfig::with_cases(24))]

    #[test]
    fn no_token_lost_and_positions_consistent(prompt in 1usize..40, steps in 0usize..12, batch in 1usize..3, seed in any::<u64>()) {
        for policy in policies() {
            let mut st = store(policy, batch, prompt, seed);
            decode(&mut st, steps, seed);
            let seen = (prompt + steps) as u32;
            for s in 0..st.streams.len() {
                let pos = positions(&st, s);
                prop_assert!(pos.windows(2).all(|w| w[0] < w[1]), "positions unique and ordered");
                prop_assert!(pos.iter().all(|&p| p < seen));
                if !evicts(&policy) {
                    prop_assert_eq!(pos, (0..seen).collect::<Vec<_>>(), "{:?} lost a token", policy);
                }
            }
        }
    }

    #[test]
    fn bytes_are_the_sum_of_the_buffers(prompt in 1usize..40, steps in 0usize..6, seed in any::<u64>()) {
        for policy in policies() {
            let mut st = store(policy, 1, prompt, seed);
            decode(&mut st, steps, seed);
            let m = st.memory();
            let mut total = 0;
            for s in &st.streams {
                for t in s.tiers() {
                    for rows in [&t.keys, &t.values] {
                        let data = match &rows.data {
                            crate::store::rows::RowData::F16(v) => v.len() * 2,
                            crate::store::rows::RowData::BF16(v) => v.len() * 2,
                            crate::store::rows::RowData::F32(v) => v.len() * 4,
                            crate::store::rows::RowData::Packed(v) => v.len(),
                        };
                        let seg: usize = rows.segments.iter().map(|g| 2 * (g.factor.len() + g.scale.len() + g.offset.len())).sum();
                        total += data + seg + 2 * (rows.row_scale.len() + rows.row_offset.len() + rows.fixed_factor.len()) + 4 * rows.segment_start.len();
                    }
                    total += t.positions.nbytes() + t.scores.as_ref().map_or(0, |x| 4 * (x.acc.len() + x.count.len()));
                }
            }
            prop_assert_eq!(m.total(), total);
            prop_assert_eq!(m.fp16_bytes, st.streams.len() * st.seen() * 2 * D * 2);
            if !evicts(&policy) {
                prop_assert_eq!(m.tokens, st.streams.len() * st.seen());
            }
        }
    }

    #[test]
    fn crop_and_batch_ops_keep_positions(prompt in 2usize..30, steps in 0usize..8, cut in 0usize..40, seed in any::<u64>()) {
        for policy in policies() {
            let mut st = store(policy, 2, prompt, seed);
            decode(&mut st, steps, seed);
            let before: Vec<Vec<u32>> = (0..st.streams.len()).map(|s| positions(&st, s)).collect();
            let mut sel = st.clone();
            sel.select_batch(&[1, 0]).unwrap();
            prop_assert_eq!(positions(&sel, 0), before[H].clone());
            prop_assert_eq!(positions(&sel, H), before[0].clone());
            let mut rep = st.clone();
            rep.repeat_interleave(2).unwrap();
            prop_assert_eq!(rep.batch, 4);
            prop_assert_eq!(rep.dense(2 * H), st.dense(H));
            st.crop(cut);
            for (s, b) in before.iter().enumerate() {
                let want: Vec<u32> = b.iter().copied().filter(|&p| (p as usize) < cut).collect();
                prop_assert_eq!(positions(&st, s), want);
            }
        }
    }
}

#[test]
fn mikv_keeps_budget_at_high_precision() {
    let policy = Policy::Mikv(MikvConfig {
        key_balancer: false,
        ..Default::default()
    });
    let mut st = store(policy, 1, 50, 3);
    decode(&mut st, 10, 5);
    for s in &st.streams {
        assert_eq!(s.high.len(), 12, "round(0.2 * 60) tokens stay in fp16");
        assert_eq!(s.len(), 60);
        // The 6 most recent tokens are among them.
        let high: Vec<u32> = s.high.positions.to_vec();
        assert!((54..60).all(|p| high.contains(&p)), "{high:?}");
    }
}

#[test]
fn demotion_quantizes_from_high_precision_values() {
    // A token demoted from the fp16 tier decodes to Q(fp16(x)), not to a twice-quantized value.
    let policy = Policy::Mikv(MikvConfig {
        key_balancer: false,
        ratio: 0.5,
        streaming_gap: 1,
        ..Default::default()
    });
    let mut st = LayerStore::new(policy, 1, D, DenseDtype::F32).unwrap();
    let k = data(4 * D, 1);
    st.append(&k, &k, &[1, 1, 4, D]).unwrap();
    st.add_scores(0, &[0.0, 10.0, 0.0, 0.0], &[1.0; 4]).unwrap();
    st.maybe_classify(false).unwrap();
    assert_eq!(st.streams[0].high.positions.to_vec(), vec![1, 3]);
    // Newer, better-scored tokens push position 1 out of the important set.
    for i in 0..4 {
        st.append(&data(D, 10 + i), &data(D, 20 + i), &[1, 1, 1, D])
            .unwrap();
        st.add_scores(4 + i as usize, &[20.0], &[1.0]).unwrap();
        st.maybe_classify(false).unwrap();
    }
    let low = &st.streams[0].low;
    let r = (0..low.len())
        .find(|&r| low.positions.get(r) == 1)
        .expect("position 1 demoted");
    let mut got = vec![0f32; D];
    low.keys.decode_row(r, &mut got);
    let fp16: Vec<f32> = k[D..2 * D]
        .iter()
        .map(|&x| half::f16::from_f32(x).to_f32())
        .collect();
    let spec = crate::quant::QuantSpec {
        bits: 2,
        grouping: crate::quant::Grouping::TokenGroups { group_size: D / 2 },
        param_dtype: crate::quant::ParamDtype::F16,
        clip: crate::quant::Clip::MinMax,
    };
    let want: Vec<f32> = crate::quant::quantize(&fp16, &[1, D], spec, None)
        .unwrap()
        .dequantize();
    assert_eq!(got, want);
}

#[test]
fn zipcache_salient_ratio_and_chunks() {
    let mut st = store(
        Policy::ZipCache(ZipCacheConfig {
            streaming_gap: 5,
            ..Default::default()
        }),
        1,
        100,
        9,
    );
    for s in &st.streams {
        assert_eq!((s.high.len(), s.low.len(), s.buffer.len()), (40, 60, 0));
    }
    decode(&mut st, 4, 1);
    assert_eq!(st.streams[0].buffer.len(), 4, "waits for the streaming gap");
    decode(&mut st, 1, 2);
    assert_eq!(st.streams[0].buffer.len(), 0);
    assert_eq!(st.streams[0].high.len(), 42);
}

/// Salient sets after classifying `acc` and `count` (`[batch, H, n]`), per stream.
fn salient_sets(selection: Selection, batch: usize, acc: &[f32], count: &[f32]) -> Vec<Vec<u32>> {
    let policy = Policy::ZipCache(ZipCacheConfig {
        salient_ratio: 0.25,
        selection,
        ..Default::default()
    });
    let mut st = LayerStore::new(policy, H, D, DenseDtype::F32).unwrap();
    let n = acc.len() / (batch * H);
    let rows = batch * H * n * D;
    st.append(&data(rows, 1), &data(rows, 2), &[batch, H, n, D])
        .unwrap();
    st.add_scores(0, acc, count).unwrap();
    st.maybe_classify(true).unwrap();
    st.streams
        .iter()
        .map(|s| s.high.positions.to_vec())
        .collect()
}

#[test]
fn layer_selection_ranks_the_sum_over_a_sequences_kv_heads() {
    // Sequence 0: head 0 favours tokens 0 and 1, head 1 tokens 2 and 3; summed, 0 and 2 win.
    // Sequence 1: the same scores reversed, so pooling across sequences would show.
    let seq0 = [
        [8.0, 5.0, 1.0, 0.0, 0.0, 0.0, 0.0, 0.0],
        [0.0, 1.0, 6.0, 5.0, 0.0, 0.0, 0.0, 0.0],
    ];
    let mut acc: Vec<f32> = seq0.iter().flatten().copied().collect();
    acc.extend(seq0.iter().rev().flat_map(|h| h.iter().rev()).copied());
    let ones = vec![1.0; acc.len()];
    let layer = salient_sets(Selection::Layer, 2, &acc, &ones);
    assert_eq!(layer, vec![vec![0, 2], vec![0, 2], vec![5, 7], vec![5, 7]]);
    let per_head = salient_sets(Selection::KvHead, 2, &acc, &ones);
    assert_eq!(
        per_head,
        vec![vec![0, 1], vec![2, 3], vec![4, 5], vec![6, 7]]
    );
}

#[test]
fn layer_selection_normalizes_by_the_summed_counts() {
    // Equal attention everywhere, so the counts decide. Summed, token 0 was seen by the fewest
    // queries (1 + 4); by head 0's counts alone it would be token 2, by head 1's token 1.
    let acc = vec![1.0; H * 4];
    let count = [1.0, 5.0, 1.0, 5.0, 4.0, 1.0, 5.0, 2.0];
    let sets = salient_sets(Selection::Layer, 1, &acc, &count);
    assert_eq!(sets, vec![vec![0], vec![0]]);
    let per_head = salient_sets(Selection::KvHead, 1, &acc, &count);
    assert_eq!(per_head, vec![vec![2], vec![1]]);
}

#[test]
fn layer_selection_holds_while_decoding() {
    let layer = Policy::ZipCache(ZipCacheConfig {
        streaming_gap: 5,
        ..Default::default()
    });
    let mut st = store(layer, 2, 60, 3);
    decode(&mut st, 10, 4);
    let sets: Vec<Vec<u32>> = st
        .streams
        .iter()
        .map(|s| s.high.positions.to_vec())
        .collect();
    for seq in sets.chunks(H) {
        assert!(
            seq.iter().all(|h| *h == seq[0]),
            "kv-heads of a sequence differ"
        );
        assert_eq!(
            seq[0].len(),
            24 + 4,
            "40% of the prompt and of each 5 decoded tokens"
        );
    }
    assert_ne!(sets[0], sets[H], "each sequence has its own set");
}

#[test]
fn eviction_drops_to_budget() {
    let mut st = store(Policy::Eviction(EvictionConfig::default()), 1, 100, 4);
    assert!(st.streams.iter().all(|s| s.len() == 20));
    decode(&mut st, 10, 3);
    assert!(st.streams.iter().all(|s| s.len() == 22));
}

#[test]
fn uniform_keeps_residual_in_full_precision() {
    let st = store(
        Policy::Uniform(UniformConfig {
            bits: 4,
            residual: 16,
            group_size: None,
        }),
        1,
        40,
        4,
    );
    for s in &st.streams {
        assert_eq!((s.low.len(), s.buffer.len()), (32, 8));
        assert_eq!(
            s.low.keys.segments.len(),
            2,
            "one per-channel block per 16 tokens"
        );
    }
}

#[test]
fn padding_is_never_important() {
    let policy = Policy::ZipCache(ZipCacheConfig::default());
    let mut st = LayerStore::new(policy, 1, D, DenseDtype::F32).unwrap();
    st.append(&data(10 * D, 1), &data(10 * D, 2), &[1, 1, 10, D])
        .unwrap();
    st.set_first_valid(&[5]).unwrap();
    let mut acc = vec![0.0; 10];
    acc[..5].fill(100.0);
    st.add_scores(0, &acc, &[1.0; 10]).unwrap();
    st.maybe_classify(false).unwrap();
    assert!(st.streams[0]
        .high
        .positions
        .to_vec()
        .iter()
        .all(|&p| p >= 5));
}

#[test]
fn bad_input_leaves_the_store_untouched() {
    let mut st = store(Policy::ZipCache(ZipCacheConfig::default()), 1, 8, 1);
    let before = st.dense(0);
    let mut nan = data(H * D, 3);
    nan[3] = f32::NAN;
    assert!(matches!(
        st.append(&nan, &nan, &[1, H, 1, D]),
        Err(KvmixError::NonFinite(_))
    ));
    assert!(matches!(
        st.append(&data(H * D, 1), &data(H * D, 1), &[2, H, 1, D / 2]),
        Err(KvmixError::Shape(_))
    ));
    let big = vec![1e6f32; H * D];
    assert!(matches!(
        st.append(&big, &big, &[1, H, 1, D]),
        Err(KvmixError::NonFinite(_))
    ));
    // A long append is checked in parallel chunks: a bad value in the last chunk of the
    // values, or an infinity in the first of the keys, is still found first.
    let n = 2 * super::CHECK_CHUNK / (H * D) + 3;
    let (mut k, mut v) = (data(H * n * D, 4), data(H * n * D, 5));
    *v.last_mut().unwrap() = f32::NAN;
    assert!(matches!(
        st.append(&k, &v, &[1, H, n, D]),
        Err(KvmixError::NonFinite(m)) if m.contains("NaN")
    ));
    v = data(H * n * D, 5);
    k[0] = f32::NEG_INFINITY;
    assert!(matches!(
        st.append(&k, &v, &[1, H, n, D]),
        Err(KvmixError::NonFinite(m)) if m.contains("-inf")
    ));
    assert_eq!(st.dense(0), before);
    assert_eq!(st.seen(), 8);
}

#[test]
fn missing_balancer_is_a_clear_error() {
    let mut st =
        LayerStore::new(Policy::Mikv(MikvConfig::default()), 1, D, DenseDtype::F32).unwrap();
    st.append(&data(4 * D, 1), &data(4 * D, 2), &[1, 1, 4, D])
        .unwrap();
    let e = st.maybe_classify(false).unwrap_err();
    assert!(e.to_string().contains("set_key_balancer"));
}

#[test]
fn invalid_configuration_is_refused() {
    let bad = [
        Policy::Mikv(MikvConfig {
            ratio: 1.5,
            ..Default::default()
        }),
        Policy::Mikv(MikvConfig {
            high_bits: Some(3),
            ..Default::default()
        }),
        Policy::ZipCache(ZipCacheConfig {
            streaming_gap: 0,
            ..Default::default()
        }),
        Policy::Uniform(UniformConfig {
            bits: 3,
            ..Default::default()
        }),
        Policy::Eviction(EvictionConfig {
            budget: -0.1,
            ..Default::default()
        }),
    ];
    for p in bad {
        assert!(
            matches!(
                LayerStore::new(p, 2, 64, DenseDtype::F32),
                Err(KvmixError::Config(_))
            ),
            "{p:?}"
        );
    }
}

#[test]
fn dense_into_writes_every_stream_like_dense() {
    for policy in policies().into_iter().filter(|p| !evicts(p)) {
        let mut st = store(policy, 2, 30, 7);
        decode(&mut st, 5, 8);
        let (streams, n, cap) = (st.streams.len(), st.seen(), st.seen() + 3);
        let mut k = vec![9.0f32; streams * cap * D];
        let mut v = k.clone();
        assert_eq!(st.dense_into(&mut k, &mut v, cap, false).unwrap(), n);
        for s in 0..streams {
            let (_, dk, dv) = st.dense(s);
            assert_eq!(&k[s * cap * D..s * cap * D + n * D], dk.as_slice());
            assert_eq!(&v[s * cap * D..s * cap * D + n * D], dv.as_slice());
            assert!(k[s * cap * D + n * D..(s + 1) * cap * D]
                .iter()
                .all(|&x| x == 9.0));
        }
        let mut small = vec![0f32; streams * (n - 1) * D];
        let mut small_v = small.clone();
        assert!(st
            .dense_into(&mut small, &mut small_v, n - 1, false)
            .is_err());
    }
}

/// Every stream of `st` written by `dense_into` into `k`/`v` (capacity `cap`) equals `dense`.
fn assert_dense(st: &LayerStore, k: &[f32], v: &[f32], cap: usize, what: &str) {
    let n = st.streams[0].len();
    for s in 0..st.streams.len() {
        let (_, dk, dv) = st.dense(s);
        let at = s * cap * D;
        assert_eq!(&k[at..at + n * D], dk.as_slice(), "{what}, stream {s}");
        assert_eq!(&v[at..at + n * D], dv.as_slice(), "{what}, stream {s}");
    }
}

#[test]
fn dense_into_changed_only_tracks_appends_classifications_crops_and_batch_ops() {
    for policy in policies().into_iter().filter(|p| !evicts(p)) {
        let mut st = store(policy, 2, 30, 11);
        let cap = 64;
        let mut k = vec![0f32; st.streams.len() * cap * D];
        let mut v = k.clone();
        st.dense_into(&mut k, &mut v, cap, true).unwrap();
        assert_dense(&st, &k, &v, cap, &format!("{policy:?} first call"));
        // Steps that append, classify (MiKV demotes every step) and move tokens between tiers.
        for step in 0..12 {
            decode(&mut st, 1, 40 + step);
            st.dense_into(&mut k, &mut v, cap, true).unwrap();
            assert_dense(&st, &k, &v, cap, &format!("{policy:?} step {step}"));
        }
        st.crop(35);
        decode(&mut st, 3, 90);
        st.dense_into(&mut k, &mut v, cap, true).unwrap();
        assert_dense(&st, &k, &v, cap, &format!("{policy:?} after crop"));
        st.select_batch(&[1, 0]).unwrap();
        st.dense_into(&mut k, &mut v, cap, true).unwrap();
        assert_dense(&st, &k, &v, cap, &format!("{policy:?} after select_batch"));
    }
}
