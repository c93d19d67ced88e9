//! Attention over the dequantized tiers, computed plainly in f64: the path for geometries the
//! fused kernels do not read (token groups whose codes do not fill whole bytes, e.g. 3-bit
//! codes in groups of 4), so every configuration the options accept attends correctly.

use super::LayerStore;
use crate::attention::Attention;

/// `softmax(q·Kᵀ·scale + mask)·V` as [`crate::attention::attend`] defines it (same masking,
/// same `received` / `seen_by` bookkeeping), from each tier's decoded rows.
pub fn attend(
    store: &LayerStore,
    q: &[f32],
    hq: usize,
    tq: usize,
    q_positions: &[usize],
    scale: f32,
    track: bool,
) -> Attention {
    let (hk, d) = (store.kv_heads, store.head_dim);
    let rep = hq / hk;
    let mut out = vec![0f32; q.len()];
    let mut received = Vec::with_capacity(store.streams.len());
    let mut seen_by = Vec::with_capacity(store.streams.len());
    for (s, stream) in store.streams.iter().enumerate() {
        let (bi, h) = (s / hk, s % hk);
        let fv = store.first_valid[bi] as u32;
        // (tier, row, position, key, value) of every held token.
        let mut rows = Vec::new();
        for (t, tier) in stream.tiers().iter().enumerate() {
            let n = tier.len();
            let dest: Vec<u32> = (0..n as u32).collect();
            let (mut k, mut v) = (vec![0f32; n * d], vec![0f32; n * d]);
            tier.keys.decode_all_into(&dest, None, &mut k);
            tier.values.decode_all_into(&dest, None, &mut v);
            for r in 0..n {
                let kr = k[r * d..(r + 1) * d].to_vec();
                let vr = v[r * d..(r + 1) * d].to_vec();
                rows.push((t, r, tier.positions.get(r), kr, vr));
            }
        }
        let tiers = stream.tiers();
        let tracked = |t: usize| track && tiers[t].scores.is_some();
        let mut rec: [Vec<f32>; 3] = Default::default();
        let mut cnt: [Vec<f32>; 3] = Default::default();
        for t in 0..3 {
            if tracked(t) {
                rec[t] = vec![0.0; tiers[t].len()];
                cnt[t] = (0..tiers[t].len())
                    .map(|r| {
                        let p = tiers[t].positions.get(r);
                        if p < fv {
                            return 0.0;
                        }
                        q_positions.iter().filter(|&&qp| qp as u32 >= p).count() as f32
                    })
                    .collect();
            }
        }
        for r in 0..rep {
            for (qi, &qp) in q_positions.iter().enumerate().take(tq) {
                let o = ((bi * hq + h * rep + r) * tq + qi) * d;
                let qrow = &q[o..o + d];
                let visible: Vec<usize> = (0..rows.len())
                    .filter(|&j| rows[j].2 >= fv && rows[j].2 as usize <= qp)
                    .collect();
                let logits: Vec<f64> = visible
                    .iter()
                    .map(|&j| {
                        let k = &rows[j].3;
                        let dot: f64 = qrow.iter().zip(k).map(|(&a, &b)| a as f64 * b as f64).sum();
                        dot * scale as f64
                    })
                    .collect();
                let max = logits.iter().copied().fold(f64::NEG_INFINITY, f64::max);
                let e: Vec<f64> = logits.iter().map(|&l| (l - max).exp()).collect();
                let sum: f64 = e.iter().sum();
                if sum <= 0.0 {
                    continue; // a query that sees nothing gets zeros, as in the fused path
                }
                let mut acc = vec![0f64; d];
                for (&j, &w) in visible.iter().zip(&e) {
                    let p = w / sum;
                    acc.iter_mut()
                        .zip(&rows[j].4)
                        .for_each(|(a, &x)| *a += p * x as f64);
                    let (t, row) = (rows[j].0, rows[j].1);
                    if tracked(t) {
                        rec[t][row] += p as f32;
                    }
                }
                out[o..o + d]
                    .iter_mut()
                    .zip(&acc)
                    .for_each(|(a, &x)| *a = x as f32);
            }
        }
        received.push(rec);
        seen_by.push(cnt);
    }
    Attention {
        out,
        received,
        seen_by,
    }
}
