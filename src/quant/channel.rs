//! Per-channel factors that make keys and values easier to quantize.
//!
//! * ZipCache's channel-separable tokenwise quantization divides each channel by
//!   `c_i = sqrt(max_t |x_{t,i}|)` before quantizing token by token, so one outlier channel
//!   no longer stretches every token's range; the factors are multiplied back afterwards.
//! * MiKV's key balancer `b_c = sqrt(max|q_c| / max|k_c|)` (from the prompt) moves key
//!   outliers into the queries: keys are stored as `Q(k·b)` and queries divided by `b`, so
//!   `q·k` is unchanged. As a reconstruction factor that is `1/b`.
//!
//! Both are computed per leading index (sequence, head), never across the batch. A channel
//! whose statistic is zero gets factor 1: any factor reconstructs an all-zero channel, and 1
//! avoids dividing by zero.

use crate::element::Element;
use crate::error::{KvmixError, Result};
use crate::quant::tensor::Geometry;

/// `max_t |x[row, t, c]|` for every (row, channel): shape `[rows, channels]`. Fails on NaN/Inf.
pub fn channel_absmax<T: Element>(x: &[T], dims: &[usize]) -> Result<Vec<f32>> {
    let geo = Geometry::from_dims(dims)?;
    if x.len() != geo.len() {
        return Err(KvmixError::Shape(format!(
            "data length {} does not match shape {dims:?}",
            x.len()
        )));
    }
    let d = geo.channels;
    let mut out = vec![0f32; geo.rows * d];
    let rows_ok = crate::parallel::run(geo.len(), |par| {
        let one = |(row, m): (usize, &mut [f32])| {
            crate::parallel::with_best_simd(
                #[inline(always)]
                || {
                    let block = &x[row * geo.tokens * d..(row + 1) * geo.tokens * d];
                    let mut probe = vec![0f32; d];
                    for tok in block.chunks_exact(d) {
                        for ((mc, p), v) in m.iter_mut().zip(probe.iter_mut()).zip(tok) {
                            let a = v.to_f32().abs();
                            *mc = if a > *mc { a } else { *mc };
                            *p += a * 0.0;
                        }
                    }
                    probe.iter().all(|&p| p == 0.0)
                },
            )
        };
        if par {
            use rayon::prelude::*;
            out.par_chunks_mut(d)
                .enumerate()
                .map(one)
                .collect::<Vec<bool>>()
        } else {
            out.chunks_mut(d)
                .enumerate()
                .map(one)
                .collect::<Vec<bool>>()
        }
    });
    if rows_ok.iter().any(|&ok| !ok) {
        return Err(KvmixError::NonFinite(
            "input contains NaN or Inf; channel statistics are undefined".into(),
        ));
    }
    Ok(out)
}

/// ZipCache's channel factors `c = sqrt(max|x|)` for `x` of shape `[..., tokens, channels]`.
pub fn separable_channel_scale<T: Element>(x: &[T], dims: &[usize]) -> Result<Vec<f32>> {
    let mut m = channel_absmax(x, dims)?;
    for v in m.iter_mut() {
        // Floored at fp16's smallest normal: the factor is stored in fp16, and the square
        // root of a channel of values below ~4e-9 underflowed to 0, which quantization then
        // refused after the store had accepted the values. A larger factor only scales the
        // channel's codes; reconstruction multiplies by the same stored factor.
        *v = if *v > 0.0 {
            v.sqrt().max(half::f16::MIN_POSITIVE.to_f32())
        } else {
            1.0
        };
    }
    Ok(m)
}

/// MiKV's key balancer `b` of shape `[batch, kv_heads, head_dim]` from queries
/// `[batch, q_heads, q_tokens, head_dim]` and keys `[batch, kv_heads, k_tokens, head_dim]`.
/// Query head `h` belongs to kv-head `h / (q_heads / kv_heads)` (transformers' `repeat_kv`);
/// `max|q_c|` is taken over the group's query heads and tokens.
pub fn key_balancer<T: Element>(
    q: &[T],
    q_dims: &[usize],
    k: &[T],
    k_dims: &[usize],
) -> Result<Vec<f32>> {
    if q_dims.len() != 4 || k_dims.len() != 4 {
        return Err(KvmixError::Shape(format!(
            "the key balancer needs queries [batch, q_heads, tokens, head_dim] and keys \
             [batch, kv_heads, tokens, head_dim]; got shapes {q_dims:?} and {k_dims:?}"
        )));
    }
    let (b, hq, d) = (q_dims[0], q_dims[1], q_dims[3]);
    let hk = k_dims[1];
    if k_dims[0] != b || k_dims[3] != d || hk == 0 || hq % hk != 0 {
        return Err(KvmixError::Shape(format!(
            "queries {q_dims:?} and keys {k_dims:?} must share batch and head_dim, and the \
             query heads must be a multiple of the kv heads"
        )));
    }
    let qmax = channel_absmax(q, q_dims)?; // [b*hq, d]
    let kmax = channel_absmax(k, k_dims)?; // [b*hk, d]
    let rep = hq / hk;
    let mut out = vec![1f32; b * hk * d];
    for (row, o) in out.chunks_exact_mut(d).enumerate() {
        let (bi, h) = (row / hk, row % hk);
        for (c, oc) in o.iter_mut().enumerate() {
            let qm = (0..rep)
                .map(|r| qmax[(bi * hq + h * rep + r) * d + c])
                .fold(0f32, f32::max);
            let km = kmax[row * d + c];
            if qm > 0.0 && km > 0.0 {
                *oc = (qm / km).sqrt();
            }
        }
    }
    Ok(out)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn separable_scale_is_sqrt_absmax_per_row() {
        // rows=2, tokens=2, channels=2
        let x = [1.0f32, -4.0, -9.0, 0.0, 0.0, 0.0, 16.0, 0.25];
        let c = separable_channel_scale(&x, &[2, 2, 2]).unwrap();
        assert_eq!(c, vec![3.0, 2.0, 4.0, 0.5]);
    }

    #[test]
    fn zero_channel_gets_unit_factor() {
        let x = [0.0f32, 1.0, 0.0, -1.0];
        let c = separable_channel_scale(&x, &[2, 2]).unwrap();
        assert_eq!(c, vec![1.0, 1.0]);
    }

    #[test]
    fn balancer_groups_query_heads() {
        // batch 1, 2 query heads -> 1 kv head, 1 token, 2 channels
        let q = [2.0f32, 1.0, -8.0, 1.0];
        let k = [2.0f32, 4.0];
        let b = key_balancer(&q, &[1, 2, 1, 2], &k, &[1, 1, 1, 2]).unwrap();
        assert_eq!(b, vec![2.0, 0.5]);
    }

    #[test]
    fn balancer_rejects_mismatched_heads() {
        let q = [0.0f32; 6];
        let k = [0.0f32; 4];
        assert!(key_balancer(&q, &[1, 3, 1, 2], &k, &[1, 2, 1, 2]).is_err());
    }
}
