//! Tests of the vector primitives: every implementation against the portable one and
//! against naive arithmetic, for every bit width, tail and query count.

use super::*;

fn check<S: Simd>(s: S) {
    for n in 0..70 {
        let a: Vec<f32> = (0..n).map(|i| i as f32 * 0.5 - 3.0).collect();
        let b: Vec<f32> = (0..n).map(|i| (i % 7) as f32 - 2.0).collect();
        let naive: f32 = a.iter().zip(&b).map(|(x, y)| x * y).sum();
        assert!((s.dot(&a, &b) - naive).abs() < 1e-3, "n={n}");
        let mut acc = vec![1f32; n];
        s.axpy(&mut acc, 2.0, &a);
        for (o, x) in acc.iter().zip(&a) {
            assert_eq!(*o, 1.0 + 2.0 * x);
        }
    }
}

#[test]
fn primitives_match_naive_for_every_tail() {
    check(Portable);
    #[cfg(target_arch = "x86_64")]
    if let Some(avx) = Avx2::detect() {
        check(avx);
    }
    #[cfg(target_arch = "x86_64")]
    if let Some(avx512) = Avx512::detect() {
        check(avx512);
    }
}

/// `n` floats from `data`, `stride` apart, as the kernels' [`Strided`] input.
fn strided(data: &[f32], stride: usize, count: usize) -> Strided<'_> {
    Strided {
        data,
        stride,
        count,
    }
}

fn block(codes: &[u8], row_bytes: usize, rows: usize, bits: u8, width: usize) -> CodeBlock<'_> {
    CodeBlock {
        codes,
        row_bytes,
        rows,
        bits,
        width,
    }
}

fn out(data: &mut [f32], stride: usize) -> StridedMut<'_> {
    StridedMut { data, stride }
}

fn check_codes<S: Simd>(s: S) {
    for bits in [2u8, 3, 4, 8] {
        for n in [8usize, 16, 24, 64, 128] {
            let codes: Vec<u8> = (0..n).map(|i| (i * 5 % (1 << bits)) as u8).collect();
            let mut packed = vec![0u8; crate::quant::packed_len(n, bits)];
            crate::quant::pack(&codes, bits, &mut packed);
            let nq = 5;
            let q: Vec<f32> = (0..nq * n).map(|i| (i % 11) as f32 * 0.25 - 1.0).collect();
            // Query-major: out2[i * 2 + r]; two rows holding the same codes.
            let mut out2 = vec![0f32; 2 * nq];
            let rows2: Vec<u8> = packed.iter().chain(&packed).copied().collect();
            let q2 = strided(&q, n, nq);
            let b2 = block(&rows2, packed.len(), 2, bits, n);
            s.code_kernels(bits, n).dots(q2, b2, out(&mut out2, 2), &[]);
            for i in 0..nq {
                let want: f32 = (0..n).map(|c| q[i * n + c] * codes[c] as f32).sum();
                assert!((out2[2 * i] - want).abs() < 1e-3, "bits={bits} n={n}");
                assert_eq!(out2[2 * i], out2[2 * i + 1]);
            }
            let w: Vec<f32> = (0..nq).map(|i| i as f32 * 0.5).collect();
            // Three rows: the same codes, weights w, 2w, 3w.
            let rows3: Vec<u8> = packed
                .iter()
                .chain(&packed)
                .chain(&packed)
                .copied()
                .collect();
            // Query-major weights: w3[i * 3 + r].
            let w3: Vec<f32> = w
                .iter()
                .flat_map(|x| (1..=3).map(move |m| x * m as f32))
                .collect();
            let mut acc3 = vec![1f32; nq * n];
            let b3 = block(&rows3, packed.len(), 3, bits, n);
            s.code_kernels(bits, n)
                .axpy(out(&mut acc3, n), strided(&w3, 3, nq), b3);
            for i in 0..nq {
                for c in 0..n {
                    assert_eq!(acc3[i * n + c], 1.0 + 6.0 * w[i] * codes[c] as f32);
                }
            }
        }
    }
}

#[test]
fn fused_code_ops_match_naive() {
    check_codes(Portable);
    #[cfg(target_arch = "x86_64")]
    if let Some(avx) = Avx2::detect() {
        check_codes(avx);
    }
    #[cfg(target_arch = "x86_64")]
    if let Some(avx512) = Avx512::detect() {
        check_codes(avx512);
    }
}

/// `s` against [`Portable`] on the blocked kernels: every bit width, row lengths with a
/// tail of eight codes (40, 80) or none, row counts that leave partial groups of rows,
/// query counts around the group of four, a row of a whole-row slice (`row_bytes` equal to
/// the codes) or one group of a wider row, and a codes slice that ends exactly at the last
/// row, so the kernels' tail reads are exercised at the end of memory.
fn check_against_portable<S: Simd>(s: S) {
    let close = |a: f32, b: f32| (a - b).abs() <= 1e-5 * (1.0 + b.abs());
    for bits in 1u8..=8 {
        for n in [8usize, 16, 24, 40, 64, 80, 96, 128, 256] {
            // Rows of n codes, or the second group of n codes in rows of 2n.
            for (row_n, at) in [(n, 0usize), (2 * n, n)] {
                let row_bytes = row_n * bits as usize / 8;
                for rows in [1usize, 2, 3, 5, 16, 17, 35] {
                    for nq in [1usize, 3, 4, 5, 8] {
                        let seed = (bits as usize) * 7 + n + rows * 3 + nq;
                        let codes: Vec<u8> = (0..rows * row_n)
                            .map(|i| ((i * 31 + seed) % 251 % (1 << bits)) as u8)
                            .collect();
                        let mut packed = vec![0u8; rows * row_bytes];
                        for (r, row) in codes.chunks_exact(row_n).enumerate() {
                            let dst = &mut packed[r * row_bytes..(r + 1) * row_bytes];
                            crate::quant::pack(row, bits, dst);
                        }
                        let first = at * bits as usize / 8;
                        let tail = &packed[first..];
                        let stride = n + 3;
                        let q: Vec<f32> = (0..nq * stride)
                            .map(|i| ((i * 13 + seed) % 29) as f32 * 0.125 - 1.5)
                            .collect();
                        // Dots, query-major with a stride wider than the rows.
                        let os = rows + 2;
                        let mut want = vec![7f32; nq * os];
                        let mut got = want.clone();
                        let (qs, bl) = (
                            strided(&q, stride, nq),
                            block(tail, row_bytes, rows, bits, n),
                        );
                        Portable
                            .code_kernels(bits, n)
                            .dots(qs, bl, out(&mut want, os), &[]);
                        s.code_kernels(bits, n).dots(qs, bl, out(&mut got, os), &[]);
                        let what = format!("bits={bits} n={n} row_n={row_n} rows={rows} nq={nq}");
                        for (g, w) in got.iter().zip(&want) {
                            assert!(close(*g, *w), "dots {what}: {g} vs {w}");
                        }
                        // The same with a per-query offset added as the dots are stored.
                        let bias: Vec<f32> = (0..nq).map(|i| i as f32 * 0.75 - 1.0).collect();
                        Portable
                            .code_kernels(bits, n)
                            .dots(qs, bl, out(&mut want, os), &bias);
                        s.code_kernels(bits, n)
                            .dots(qs, bl, out(&mut got, os), &bias);
                        for (g, w) in got.iter().zip(&want) {
                            assert!(close(*g, *w), "biased dots {what}: {g} vs {w}");
                        }
                        // Axpy, weights query-major with a stride wider than the rows.
                        let ws = rows + 1;
                        let w: Vec<f32> = (0..nq * ws)
                            .map(|i| ((i * 7 + seed) % 17) as f32 * 0.0625 - 0.5)
                            .collect();
                        let mut want = vec![0.5f32; nq * stride];
                        let mut got = want.clone();
                        let wq = strided(&w, ws, nq);
                        Portable
                            .code_kernels(bits, n)
                            .axpy(out(&mut want, stride), wq, bl);
                        s.code_kernels(bits, n).axpy(out(&mut got, stride), wq, bl);
                        for (g, w) in got.iter().zip(&want) {
                            assert!(close(*g, *w), "axpy {what}: {g} vs {w}");
                        }
                    }
                }
            }
        }
    }
}

#[cfg(target_arch = "x86_64")]
#[test]
fn avx2_matches_portable_for_every_width_and_tail() {
    if let Some(avx) = Avx2::detect() {
        check_against_portable(avx);
    }
}

#[cfg(target_arch = "x86_64")]
#[test]
fn avx512_matches_portable_for_every_width_and_tail() {
    if let Some(avx512) = Avx512::detect() {
        check_against_portable(avx512);
    }
}

/// Softmax of `row` in place from [`Simd::exp_shifted`], as the attention kernel's merge
/// normalises it.
fn softmax<S: Simd>(s: S, row: &mut [f32]) {
    let (_, sum) = s.exp_shifted(row);
    if sum > 0.0 {
        let inv = 1.0 / sum;
        row.iter_mut().for_each(|l| *l *= inv);
    }
}

fn check_softmax<S: Simd>(s: S) {
    for n in [0usize, 1, 7, 8, 9, 15, 16, 17, 33, 300] {
        let mut row: Vec<f32> = (0..n)
            .map(|i| ((i * 37) % 101) as f32 * 0.9 - 50.0)
            .collect();
        // Masked entries and a tail that underflows must give exactly 0.
        if n > 3 {
            row[1] = f32::NEG_INFINITY;
            row[2] = -1e4;
        }
        let mut want = row.clone();
        softmax(Portable, &mut want);
        let mut got = row.clone();
        softmax(s, &mut got);
        for (i, (g, w)) in got.iter().zip(&want).enumerate() {
            assert!(
                (g - w).abs() <= 1e-6 * w.max(1e-30) + 1e-30,
                "n={n} i={i}: {g} vs {w}"
            );
        }
        if n > 3 {
            assert_eq!((got[1], got[2]), (0.0, 0.0));
        }
        // The shift it reports is the row's max (a split stream rescales parts with it).
        let max = row.iter().copied().fold(f32::NEG_INFINITY, f32::max);
        let (m, sum) = s.exp_shifted(&mut row.clone());
        assert_eq!(m, max, "n={n}");
        assert_eq!(sum == 0.0, n == 0, "n={n}");
    }
    for n in [1usize, 20] {
        let mut masked = vec![f32::NEG_INFINITY; n];
        softmax(s, &mut masked);
        assert_eq!(masked, vec![0.0; n]);
        let (m, sum) = s.exp_shifted(&mut vec![f32::NEG_INFINITY; n]);
        assert_eq!((m, sum), (f32::NEG_INFINITY, 0.0));
    }
}

#[cfg(target_arch = "x86_64")]
#[test]
fn softmax_matches_libm() {
    if let Some(avx) = Avx2::detect() {
        check_softmax(avx);
    }
    if let Some(avx512) = Avx512::detect() {
        check_softmax(avx512);
    }
}

/// `exp8` and `exp16`, lane by lane, over the range softmax feeds them.
#[cfg(target_arch = "x86_64")]
#[test]
fn vector_exp_matches_libm() {
    use std::arch::x86_64::*;
    let (avx, avx512) = (Avx2::detect(), Avx512::detect());
    for k in 0..2000 {
        let x = -87.0 + k as f32 * 0.0437;
        let want = x.exp();
        let mut lanes = [0f32; 16];
        if avx.is_some() {
            // SAFETY: the CPU has the features (`Avx2::detect`).
            unsafe { _mm256_storeu_ps(lanes.as_mut_ptr(), avx2::exp8(_mm256_set1_ps(x))) };
            assert!(
                (lanes[0] - want).abs() <= 3e-7 * want,
                "exp8({x}) = {}",
                lanes[0]
            );
        }
        if avx512.is_some() {
            // SAFETY: the CPU has the features (`Avx512::detect`).
            unsafe { _mm512_storeu_ps(lanes.as_mut_ptr(), avx512::exp16(_mm512_set1_ps(x))) };
            assert!(
                (lanes[0] - want).abs() <= 3e-7 * want,
                "exp16({x}) = {}",
                lanes[0]
            );
        }
    }
}

/// The AVX-512 conversion (sixteen at a time, masked tail) against `half`'s, for every
/// tail length and for slices of different lengths.
#[cfg(target_arch = "x86_64")]
#[test]
fn f16_to_f32_matches_half_for_every_tail() {
    let Some(avx512) = Avx512::detect() else {
        return;
    };
    for n in 0..70 {
        let src: Vec<half::f16> = (0..n)
            .map(|i| half::f16::from_f32(i as f32 * 0.37 - 9.0))
            .collect();
        let mut want = vec![7f32; n + 3];
        let mut got = want.clone();
        Portable.f16_to_f32(&src, &mut want);
        avx512.f16_to_f32(&src, &mut got);
        assert_eq!(got, want, "n={n}");
        let (mut short_want, mut short_got) = (vec![7f32; n / 2], vec![7f32; n / 2]);
        Portable.f16_to_f32(&src, &mut short_want);
        avx512.f16_to_f32(&src, &mut short_got);
        assert_eq!(short_got, short_want, "n={n}, short destination");
    }
}

#[test]
fn unpack_f32_matches_unpack() {
    for bits in 1u8..=8 {
        let n = 64;
        let codes: Vec<u8> = (0..n).map(|i| (i * 7 % (1 << bits)) as u8).collect();
        let mut packed = vec![0u8; crate::quant::packed_len(n, bits)];
        crate::quant::pack(&codes, bits, &mut packed);
        let mut out = vec![0f32; n];
        unpack_f32(&packed, bits, &mut out);
        let want: Vec<f32> = codes.iter().map(|&c| c as f32).collect();
        assert_eq!(out, want, "bits={bits}");
    }
}

/// Kernels chosen for one bit width refuse a block of another: they would read its bytes by
/// the wrong width, past the block's bounds.
#[test]
#[should_panic(expected = "kernels for 2-bit codes, 64 per row, given 4-bit codes")]
fn kernels_refuse_a_block_of_another_width() {
    let codes = vec![0u8; 32];
    let q = vec![0f32; 64];
    let mut o = vec![0f32; 1];
    let best = |bits: u8, width: usize| {
        #[cfg(target_arch = "x86_64")]
        if let Some(s) = Avx512::detect() {
            return s.code_kernels(bits, width);
        }
        Portable.code_kernels(bits, width)
    };
    best(2, 64).dots(
        strided(&q, 64, 1),
        block(&codes, 32, 1, 4, 64),
        out(&mut o, 1),
        &[],
    );
}
