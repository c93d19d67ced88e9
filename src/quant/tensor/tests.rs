//! Invariants of whole-tensor quantization: error bounds, exact byte counts, per-row
//! statistics and refusal of bad input.

use super::*;
use half::{bf16, f16};
use proptest::prelude::*;

fn spec(bits: u8, grouping: Grouping, param_dtype: ParamDtype) -> QuantSpec {
    QuantSpec {
        bits,
        grouping,
        param_dtype,
        clip: Clip::MinMax,
    }
}

/// Largest error the quantizer may make on element `i`: half a stored step plus the shift
/// that rounding the parameters to their dtype caused, times the channel factor.
fn bound(q: &QuantizedTensor, x: &[f32], i: usize) -> f32 {
    let geo = q.geometry();
    let d = geo.channels;
    let (row, t, c) = (i / (geo.tokens * d), (i / d) % geo.tokens, i % d);
    let p = match q.spec.grouping {
        Grouping::TokenGroups { group_size } => {
            (row * geo.tokens + t) * (d / group_size) + c / group_size
        }
        Grouping::ChannelBlocks { token_block } => {
            (row * geo.tokens.div_ceil(token_block) + t / token_block) * d + c
        }
    };
    let f = q
        .channel_scale
        .as_ref()
        .map_or(1.0, |cs| cs.get(row * d + c));
    let rel = match q.spec.param_dtype {
        ParamDtype::F16 => 1.0 / 1024.0,
        ParamDtype::F32 => 1e-6,
    };
    let scale = q.scale.get(p);
    let top = crate::quant::affine::max_code(q.spec.bits);
    // |β−min| ≤ rel·|β|, |α−α_exact|·top ≤ rel·α·top, plus fp32 arithmetic slack.
    let shift = rel * q.offset.get(p).abs() + rel * scale * top;
    f * (scale / 2.0 + shift) + 1e-5 * (1.0 + x[i].abs())
}

fn check_error_bound(q: &QuantizedTensor, x: &[f32]) -> std::result::Result<(), TestCaseError> {
    let xh: Vec<f32> = q.dequantize();
    for i in 0..x.len() {
        let err = (xh[i] - x[i]).abs();
        let b = bound(q, x, i);
        prop_assert!(
            err <= b,
            "element {i}: x={} x̂={} err={err} bound={b}",
            x[i],
            xh[i]
        );
    }
    Ok(())
}

fn geometry_strategy() -> impl Strategy<Value = (usize, usize, usize)> {
    (
        1usize..4,
        1usize..40,
        prop_oneof![Just(1usize), Just(3), Just(8), Just(12), Just(64)],
    )
}

proptest! {
    #![proptest_config(ProptestConfig::with_cases(96))]

    #[test]
    fn token_groups_error_within_half_step(
        (rows, tokens, d) in geometry_strategy(),
        bits in 1u8..=8,
        f16_params: bool,
        seed in any::<u64>(),
        div_idx in 0usize..4,
    ) {
        let divisors: Vec<usize> = (1..=d).filter(|g| d % g == 0).collect();
        let g = divisors[div_idx % divisors.len()];
        let x = random(rows * tokens * d, seed, 10.0);
        let dtype = if f16_params { ParamDtype::F16 } else { ParamDtype::F32 };
        let q = quantize(&x, &[rows, tokens, d], spec(bits, Grouping::TokenGroups { group_size: g }, dtype), None).unwrap();
        check_error_bound(&q, &x)?;
    }

    #[test]
    fn channel_blocks_error_within_half_step(
        (rows, tokens, d) in geometry_strategy(),
        bits in 1u8..=8,
        block in 1usize..50,
        seed in any::<u64>(),
    ) {
        let x = random(rows * tokens * d, seed, 3.0);
        let q = quantize(&x, &[rows, tokens, d], spec(bits, Grouping::ChannelBlocks { token_block: block }, ParamDtype::F16), None).unwrap();
        check_error_bound(&q, &x)?;
    }

    #[test]
    fn channel_separable_error_scaled_by_factor(
        (rows, tokens, d) in geometry_strategy(),
        bits in 2u8..=4,
        seed in any::<u64>(),
    ) {
        let x = random(rows * tokens * d, seed, 5.0);
        let dims = [rows, tokens, d];
        let cs = crate::quant::separable_channel_scale(&x, &dims).unwrap();
        let q = quantize(&x, &dims, spec(bits, Grouping::TokenGroups { group_size: d }, ParamDtype::F16), Some(&cs)).unwrap();
        check_error_bound(&q, &x)?;
    }

    #[test]
    fn byte_counts_are_exact(
        (rows, tokens, d) in geometry_strategy(),
        bits in 1u8..=8,
        f16_params: bool,
        with_cs: bool,
    ) {
        let x = random(rows * tokens * d, 7, 1.0);
        let dims = [rows, tokens, d];
        let dtype = if f16_params { ParamDtype::F16 } else { ParamDtype::F32 };
        let cs = vec![1.5f32; rows * d];
        let q = quantize(&x, &dims, spec(bits, Grouping::TokenGroups { group_size: d }, dtype), with_cs.then_some(cs.as_slice())).unwrap();
        let n = rows * tokens * d;
        let nb = q.nbytes();
        prop_assert_eq!(nb.codes, (n * bits as usize).div_ceil(8));
        prop_assert_eq!(nb.scale, rows * tokens * dtype.size());
        prop_assert_eq!(nb.offset, rows * tokens * dtype.size());
        prop_assert_eq!(nb.channel_scale, if with_cs { rows * d * dtype.size() } else { 0 });
        prop_assert_eq!(nb.total(), nb.codes + nb.scale + nb.offset + nb.channel_scale);
    }

    #[test]
    fn codes_round_trip_through_packing(
        (rows, tokens, d) in geometry_strategy(),
        bits in 1u8..=8,
        seed in any::<u64>(),
    ) {
        // Dequantizing from unpacked codes by hand equals the packed path.
        let x = random(rows * tokens * d, seed, 1.0);
        let q = quantize(&x, &[rows, tokens, d], spec(bits, Grouping::TokenGroups { group_size: d }, ParamDtype::F32), None).unwrap();
        let codes = q.unpacked_codes();
        let xh: Vec<f32> = q.dequantize();
        for (i, (&c, &v)) in codes.iter().zip(&xh).enumerate() {
            prop_assert!((c as u32) < (1u32 << bits));
            let p = i / d;
            prop_assert_eq!(q.scale.get(p) * c as f32 + q.offset.get(p), v);
        }
    }
}

use crate::testing::uniform as random;

#[test]
fn statistics_are_per_row() {
    // Row 1 has a huge range; row 0's reconstruction must not notice it.
    let mut x = random(2 * 16 * 8, 3, 1.0);
    for v in &mut x[16 * 8..] {
        *v *= 1000.0;
    }
    let q = quantize(
        &x,
        &[2, 16, 8],
        spec(
            4,
            Grouping::ChannelBlocks { token_block: 16 },
            ParamDtype::F32,
        ),
        None,
    )
    .unwrap();
    let xh: Vec<f32> = q.dequantize();
    let err0 = x[..128]
        .iter()
        .zip(&xh)
        .map(|(a, b)| (a - b).abs())
        .fold(0f32, f32::max);
    assert!(err0 < 2.0 / 15.0, "row 0 error {err0}");
}

#[test]
fn half_precision_inputs_match_their_f32_values() {
    let x32 = random(4 * 64, 11, 2.0);
    let x16: Vec<f16> = x32.iter().map(|&v| f16::from_f32(v)).collect();
    let xb: Vec<bf16> = x32.iter().map(|&v| bf16::from_f32(v)).collect();
    let s = spec(2, Grouping::TokenGroups { group_size: 32 }, ParamDtype::F16);
    let from16: Vec<f32> = x16.iter().map(|v| v.to_f32()).collect();
    let fromb: Vec<f32> = xb.iter().map(|v| v.to_f32()).collect();
    assert_eq!(
        quantize(&x16, &[4, 64], s, None).unwrap(),
        quantize(&from16, &[4, 64], s, None).unwrap()
    );
    assert_eq!(
        quantize(&xb, &[4, 64], s, None).unwrap(),
        quantize(&fromb, &[4, 64], s, None).unwrap()
    );
}

#[test]
fn large_input_parallel_equals_small_chunks() {
    // Above the parallel threshold the result must equal quantizing each row alone.
    let (rows, tokens, d) = (4usize, 512usize, 64usize);
    let x = random(rows * tokens * d, 5, 4.0);
    let s = spec(3, Grouping::TokenGroups { group_size: 32 }, ParamDtype::F16);
    let whole = quantize(&x, &[rows, tokens, d], s, None).unwrap();
    let per_row = tokens * d;
    let row_bytes = packed_len(per_row, 3);
    for r in 0..rows {
        let part = quantize(&x[r * per_row..(r + 1) * per_row], &[tokens, d], s, None).unwrap();
        assert_eq!(
            &whole.codes[r * row_bytes..(r + 1) * row_bytes],
            part.codes.as_slice()
        );
    }
}

#[test]
fn large_outputs_stream_the_same_values() {
    // An output of STREAM_MIN_BYTES is written with streaming stores, and through a
    // misaligned slice also with joined lines: values must equal the fresh-output path.
    use crate::quant::STREAM_MIN_BYTES;
    let (rows, d) = (2usize, 128usize);
    let tokens = STREAM_MIN_BYTES / 4 / (rows * d);
    let x = random(rows * tokens * d, 9, 3.0);
    let dims = [rows, tokens, d];
    let cs: Vec<f32> = (0..rows * d).map(|i| 0.5 + (i % 7) as f32 / 4.0).collect();
    let specs = [
        (
            spec(2, Grouping::TokenGroups { group_size: 64 }, ParamDtype::F16),
            None,
        ),
        (
            spec(
                4,
                Grouping::TokenGroups { group_size: 128 },
                ParamDtype::F16,
            ),
            Some(&cs[..]),
        ),
        (
            spec(
                2,
                Grouping::ChannelBlocks {
                    token_block: tokens,
                },
                ParamDtype::F16,
            ),
            None,
        ),
    ];
    for (s, factor) in specs {
        let q = quantize(&x, &dims, s, factor).unwrap();
        let fresh: Vec<f32> = q.dequantize();
        let mut buf = vec![0f32; x.len() + 1];
        for start in [0, 1] {
            q.dequantize_into(&mut buf[start..start + x.len()]).unwrap();
            assert!(
                buf[start..start + x.len()] == fresh[..],
                "{s:?}, start {start}"
            );
        }
    }
}

#[test]
fn refuses_bad_input() {
    let x = vec![0.5f32; 2 * 3 * 8];
    let ok = spec(2, Grouping::TokenGroups { group_size: 4 }, ParamDtype::F16);
    assert!(matches!(
        quantize(&x, &[8], ok, None),
        Err(KvmixError::Shape(_))
    ));
    assert!(matches!(
        quantize(&x, &[2, 3, 7], ok, None),
        Err(KvmixError::Shape(_))
    ));
    let bad_group = spec(2, Grouping::TokenGroups { group_size: 3 }, ParamDtype::F16);
    assert!(matches!(
        quantize(&x, &[2, 3, 8], bad_group, None),
        Err(KvmixError::Config(_))
    ));
    let bad_bits = spec(9, Grouping::TokenGroups { group_size: 4 }, ParamDtype::F16);
    assert!(matches!(
        quantize(&x, &[2, 3, 8], bad_bits, None),
        Err(KvmixError::Config(_))
    ));
    let mut nan = x.clone();
    nan[17] = f32::NAN;
    assert!(matches!(
        quantize(&nan, &[2, 3, 8], ok, None),
        Err(KvmixError::NonFinite(_))
    ));
    let mut inf = x.clone();
    inf[0] = f32::NEG_INFINITY;
    let ch = spec(
        2,
        Grouping::ChannelBlocks { token_block: 2 },
        ParamDtype::F16,
    );
    assert!(matches!(
        quantize(&inf, &[2, 3, 8], ch, None),
        Err(KvmixError::NonFinite(_))
    ));
    assert!(matches!(
        quantize(&x, &[2, 3, 8], ok, Some(&[1.0; 3])),
        Err(KvmixError::Shape(_))
    ));
}

#[test]
fn empty_token_axis_is_fine() {
    let s = spec(2, Grouping::TokenGroups { group_size: 4 }, ParamDtype::F16);
    let q = quantize::<f32>(&[], &[2, 0, 8], s, None).unwrap();
    assert_eq!(q.nbytes().total(), 0);
    assert!(q.dequantize::<f32>().is_empty());
}
