//! Tests of the row container under every codec.

use super::*;
use crate::quant::Clip;

fn rows(n: usize, d: usize, seed: u32) -> Vec<f32> {
    (0..n * d)
        .map(|i| {
            (((i as u32).wrapping_mul(2654435761).wrapping_add(seed) >> 8) as f32 / 16777216.0)
                - 0.5
        })
        .collect()
}

#[test]
fn dense_rows_round_trip() {
    let mut r = EncodedRows::new(Codec::Dense(DenseDtype::F32), 8).unwrap();
    let x = rows(3, 8, 1);
    r.push_segment(&x).unwrap();
    let mut out = [0f32; 8];
    r.decode_row(2, &mut out);
    assert_eq!(&out[..], &x[16..24]);
    assert_eq!(r.nbytes().total(), 3 * 8 * 4);
}

#[test]
fn segments_follow_rows_through_retain() {
    let mut r = EncodedRows::new(
        Codec::Channel {
            bits: 4,
            clip: Clip::MinMax,
        },
        8,
    )
    .unwrap();
    let (a, b) = (rows(4, 8, 1), rows(3, 8, 2));
    r.push_segment(&a).unwrap();
    r.push_segment(&b).unwrap();
    assert_eq!(r.segments.len(), 2);
    let mut before = [0f32; 8];
    r.decode_row(5, &mut before);
    r.retain(&[false, false, false, false, true, true, true]);
    assert_eq!(r.segments.len(), 1, "the emptied segment is dropped");
    let mut after = [0f32; 8];
    r.decode_row(1, &mut after);
    assert_eq!(before, after);
}

#[test]
fn fixed_factor_is_required_and_applied() {
    let codec = Codec::TokenGroups {
        bits: 8,
        group_size: 4,
        factor: Factor::Fixed,
        clip: Clip::MinMax,
    };
    let mut r = EncodedRows::new(codec, 8).unwrap();
    assert!(r.push_segment(&rows(1, 8, 0)).is_err());
    r.set_fixed_factor(&[0.5; 8]).unwrap();
    let x = rows(2, 8, 3);
    r.push_segment(&x).unwrap();
    let mut out = [0f32; 8];
    r.decode_row(1, &mut out);
    for (o, v) in out.iter().zip(&x[8..]) {
        assert!((o - v).abs() < 0.01, "{o} vs {v}");
    }
}

#[test]
fn bulk_decode_equals_row_by_row_for_every_codec() {
    let d = 16;
    let tg = |bits, group_size, factor| Codec::TokenGroups {
        bits,
        group_size,
        factor,
        clip: Clip::Mse,
    };
    let codecs = [
        Codec::Dense(DenseDtype::F16),
        Codec::Dense(DenseDtype::BF16),
        Codec::Dense(DenseDtype::F32),
        Codec::Channel {
            bits: 2,
            clip: Clip::MinMax,
        },
        Codec::Channel {
            bits: 3,
            clip: Clip::Mse,
        },
        tg(2, 8, Factor::None),
        tg(4, 16, Factor::Separable),
        tg(3, 8, Factor::Fixed),
    ];
    for codec in codecs {
        let mut r = EncodedRows::new(codec, d).unwrap();
        r.set_fixed_factor(&[0.75; 16]).unwrap();
        for (n, seed) in [(5, 1), (1, 2), (7, 3)] {
            r.push_segment(&rows(n, d, seed)).unwrap();
        }
        // Rows scattered in reverse order, as tiers interleave in position order.
        let dest: Vec<u32> = (0..r.len as u32).rev().collect();
        let mut bulk = vec![f32::NAN; r.len * d];
        r.decode_all_into(&dest, None, &mut bulk);
        for (i, &j) in dest.iter().enumerate() {
            let mut one = vec![0f32; d];
            r.decode_row(i, &mut one);
            let j = j as usize;
            assert_eq!(&bulk[j * d..(j + 1) * d], &one[..], "{codec:?} row {i}");
        }
    }
}

#[test]
fn unaligned_rows_are_refused() {
    assert!(EncodedRows::new(
        Codec::Channel {
            bits: 3,
            clip: Clip::Mse
        },
        12
    )
    .is_err());
    assert!(EncodedRows::new(
        Codec::Channel {
            bits: 3,
            clip: Clip::Mse
        },
        16
    )
    .is_ok());
}
