//! The vector primitives the attention kernel is made of, behind a [`Simd`] trait with three
//! implementations: [`Portable`] (plain Rust that the compiler vectorizes for the baseline
//! target) and, on x86-64, [`Avx2`] (AVX2 + FMA intrinsics) and [`Avx512`] (AVX-512
//! F/BW/VL/VBMI, sixteen lanes). The kernel is generic over the trait and dispatched once per
//! call after CPU feature detection (AVX-512 first), so one binary is both portable and fast.
//!
//! Rejected: relying on auto-vectorization alone. LLVM splits an `[f32; 8]` accumulator into
//! shuffled halves when it reduces it, which made the dot product 3x slower than intrinsics.

pub trait Simd: Copy + Send + Sync {
    /// `Σ a_i b_i`.
    fn dot(self, a: &[f32], b: &[f32]) -> f32;

    /// `dst[i] = src[i]` for `i < min(src.len(), dst.len())` (the per-row scales and offsets
    /// of a run, converted once per call).
    fn f16_to_f32(self, src: &[half::f16], dst: &mut [f32]) {
        use half::slice::HalfFloatSliceExt;
        let n = src.len().min(dst.len());
        src[..n].convert_to_f32_slice(&mut dst[..n]);
    }
    /// `acc_i += a·x_i`.
    fn axpy(self, acc: &mut [f32], a: f32, x: &[f32]);
    /// `acc_i += a·x_i + b`.
    fn axpb(self, acc: &mut [f32], a: f32, x: &[f32], b: f32);

    /// `row ← e^(row − max(row))` in place, returning the sum: softmax without the final
    /// division, which the attention kernel applies to each query's output instead of to
    /// every probability. A row that is all `-inf` (a query that sees nothing) becomes all
    /// zeros and returns 0.
    fn exp_shifted(self, row: &mut [f32]) -> f32 {
        let m = row.iter().copied().fold(f32::NEG_INFINITY, f32::max);
        if m == f32::NEG_INFINITY {
            row.fill(0.0);
            return 0.0;
        }
        let mut sum = 0f32;
        for l in row.iter_mut() {
            *l = (*l - m).exp();
            sum += *l;
        }
        sum
    }

    /// Softmax of `row` in place (max-subtracted); a row that is all `-inf` becomes all zeros.
    fn softmax(self, row: &mut [f32]) {
        let sum = self.exp_shifted(row);
        if sum > 0.0 {
            let inv = 1.0 / sum;
            row.iter_mut().for_each(|l| *l *= inv);
        }
    }

    /// For each query `i < nq`: `out[i] = Σ_{c<n} q[i·stride + c] · code_c`, with the `n`
    /// codes of `bits` bits packed in `codes`. Fusing the unpacking into the dot products
    /// keeps the codes in registers.
    #[allow(clippy::too_many_arguments)]
    fn code_dots(
        self,
        q: &[f32],
        stride: usize,
        nq: usize,
        codes: &[u8],
        bits: u8,
        n: usize,
        out: &mut [f32],
    ) {
        let mut buf = [0f32; 512];
        for (k, chunk) in (0..n).step_by(512).enumerate() {
            let m = (n - chunk).min(512);
            let bytes = &codes[k * 512 * bits as usize / 8..];
            unpack_f32(&bytes[..m * bits as usize / 8], bits, &mut buf[..m]);
            for i in 0..nq {
                let add = self.dot(&q[i * stride + chunk..i * stride + chunk + m], &buf[..m]);
                out[i] = if k == 0 { add } else { out[i] + add };
            }
        }
    }

    /// `code_dots` over `rows` rows: row `r`'s `n` codes start at `codes[r·row_bytes]` and its
    /// dot with query `i` goes to `out[i·out_stride + r]` (query-major, so a caller can
    /// point `out` straight at its logits). One call per block of rows, not per row: the
    /// call and its setup cost as much as a row's arithmetic.
    #[allow(clippy::too_many_arguments)]
    fn code_rows_dots(
        self,
        q: &[f32],
        stride: usize,
        nq: usize,
        codes: &[u8],
        row_bytes: usize,
        rows: usize,
        bits: u8,
        n: usize,
        out: &mut [f32],
        out_stride: usize,
    ) {
        let nb = n * bits as usize / 8;
        let mut dots = [0f32; 16];
        for i0 in (0..nq).step_by(16) {
            let m = (nq - i0).min(16);
            for r in 0..rows {
                let c = &codes[r * row_bytes..r * row_bytes + nb];
                self.code_dots(&q[i0 * stride..], stride, m, c, bits, n, &mut dots[..m]);
                for (j, &x) in dots[..m].iter().enumerate() {
                    out[(i0 + j) * out_stride + r] = x;
                }
            }
        }
    }

    /// `code_axpys` over `rows` rows: row `r`'s `n` codes start at `codes[r·row_bytes]` and
    /// its weight for query `i` is `w[i·w_stride + r]` (query-major, so probabilities can be
    /// passed as they are). Blocking over rows keeps the accumulators in registers instead of
    /// loading and storing them for every row.
    #[allow(clippy::too_many_arguments)]
    fn code_rows_axpy(
        self,
        acc: &mut [f32],
        stride: usize,
        nq: usize,
        w: &[f32],
        w_stride: usize,
        codes: &[u8],
        row_bytes: usize,
        rows: usize,
        bits: u8,
        n: usize,
    ) {
        let nb = n * bits as usize / 8;
        let mut wr = [0f32; 16];
        for i0 in (0..nq).step_by(16) {
            let m = (nq - i0).min(16);
            for r in 0..rows {
                let c = &codes[r * row_bytes..r * row_bytes + nb];
                for (j, x) in wr[..m].iter_mut().enumerate() {
                    *x = w[(i0 + j) * w_stride + r];
                }
                self.code_axpys(&mut acc[i0 * stride..], stride, m, &wr[..m], c, bits, n);
            }
        }
    }

    /// For each query `i < nq`: `acc[i·stride + c] += w[i] · code_c` for `c < n`.
    #[allow(clippy::too_many_arguments)]
    fn code_axpys(
        self,
        acc: &mut [f32],
        stride: usize,
        nq: usize,
        w: &[f32],
        codes: &[u8],
        bits: u8,
        n: usize,
    ) {
        let mut buf = [0f32; 512];
        for (k, chunk) in (0..n).step_by(512).enumerate() {
            let m = (n - chunk).min(512);
            let bytes = &codes[k * 512 * bits as usize / 8..];
            unpack_f32(&bytes[..m * bits as usize / 8], bits, &mut buf[..m]);
            for i in 0..nq {
                if w[i] != 0.0 {
                    self.axpy(
                        &mut acc[i * stride + chunk..i * stride + chunk + m],
                        w[i],
                        &buf[..m],
                    );
                }
            }
        }
    }
}

/// Plain Rust, for any target.
#[derive(Clone, Copy)]
pub struct Portable;

impl Simd for Portable {
    #[inline(always)]
    fn dot(self, a: &[f32], b: &[f32]) -> f32 {
        let mut acc = [0f32; 4];
        let n = a.len().min(b.len()) / 4 * 4;
        for (x, y) in a[..n].chunks_exact(4).zip(b[..n].chunks_exact(4)) {
            for l in 0..4 {
                acc[l] += x[l] * y[l];
            }
        }
        let mut s = (acc[0] + acc[2]) + (acc[1] + acc[3]);
        for (x, y) in a[n..].iter().zip(&b[n..]) {
            s += x * y;
        }
        s
    }

    #[inline(always)]
    fn axpy(self, acc: &mut [f32], a: f32, x: &[f32]) {
        for (o, &v) in acc.iter_mut().zip(x) {
            *o += a * v;
        }
    }

    #[inline(always)]
    fn axpb(self, acc: &mut [f32], a: f32, x: &[f32], b: f32) {
        for (o, &v) in acc.iter_mut().zip(x) {
            *o += a * v + b;
        }
    }
}

#[cfg(target_arch = "x86_64")]
pub use x86::Avx2;

#[cfg(target_arch = "x86_64")]
#[path = "simd_x86.rs"]
mod x86;

#[cfg(target_arch = "x86_64")]
pub use x86_512::Avx512;

#[cfg(target_arch = "x86_64")]
#[path = "simd_x86_512.rs"]
mod x86_512;

/// Byte → its four 2-bit codes as `f32`, least significant first.
static UNPACK2: [[f32; 4]; 256] = {
    let mut t = [[0f32; 4]; 256];
    let mut b = 0;
    while b < 256 {
        t[b] = [
            (b & 3) as f32,
            ((b >> 2) & 3) as f32,
            ((b >> 4) & 3) as f32,
            (b >> 6) as f32,
        ];
        b += 1;
    }
    t
};

/// Byte → its two 4-bit codes as `f32`.
static UNPACK4: [[f32; 2]; 256] = {
    let mut t = [[0f32; 2]; 256];
    let mut b = 0;
    while b < 256 {
        t[b] = [(b & 15) as f32, (b >> 4) as f32];
        b += 1;
    }
    t
};

/// Unpack `out.len()` codes of `bits` bits (LSB first) from `bytes` straight to `f32`.
#[inline(always)]
pub fn unpack_f32(bytes: &[u8], bits: u8, out: &mut [f32]) {
    match bits {
        2 => {
            for (o, &b) in out.chunks_exact_mut(4).zip(bytes) {
                o.copy_from_slice(&UNPACK2[b as usize]);
            }
        }
        4 => {
            for (o, &b) in out.chunks_exact_mut(2).zip(bytes) {
                o.copy_from_slice(&UNPACK4[b as usize]);
            }
        }
        8 => {
            for (o, &b) in out.iter_mut().zip(bytes) {
                *o = b as f32;
            }
        }
        _ => {
            let mut codes = [0u8; 512];
            for (o, chunk) in out
                .chunks_mut(512)
                .zip(bytes.chunks(512 * bits as usize / 8))
            {
                let c = &mut codes[..o.len()];
                crate::quant::unpack(chunk, bits, c);
                for (x, &v) in o.iter_mut().zip(c.iter()) {
                    *x = v as f32;
                }
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn check<S: Simd>(s: S) {
        for n in 0..70 {
            let a: Vec<f32> = (0..n).map(|i| i as f32 * 0.5 - 3.0).collect();
            let b: Vec<f32> = (0..n).map(|i| (i % 7) as f32 - 2.0).collect();
            let naive: f32 = a.iter().zip(&b).map(|(x, y)| x * y).sum();
            assert!((s.dot(&a, &b) - naive).abs() < 1e-3, "n={n}");
            let mut acc = vec![1f32; n];
            s.axpb(&mut acc, 2.0, &a, 0.5);
            for (o, x) in acc.iter().zip(&a) {
                assert_eq!(*o, 1.0 + 2.0 * x + 0.5);
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
    }

    fn check_codes<S: Simd>(s: S) {
        for bits in [2u8, 3, 4, 8] {
            for n in [8usize, 16, 24, 64, 128] {
                let codes: Vec<u8> = (0..n).map(|i| (i * 5 % (1 << bits)) as u8).collect();
                let mut packed = vec![0u8; crate::quant::packed_len(n, bits)];
                crate::quant::pack(&codes, bits, &mut packed);
                let nq = 5;
                let q: Vec<f32> = (0..nq * n).map(|i| (i % 11) as f32 * 0.25 - 1.0).collect();
                let mut out = vec![0f32; nq];
                s.code_dots(&q, n, nq, &packed, bits, n, &mut out);
                for i in 0..nq {
                    let want: f32 = (0..n).map(|c| q[i * n + c] * codes[c] as f32).sum();
                    assert!((out[i] - want).abs() < 1e-3, "bits={bits} n={n}");
                }
                // Query-major: out2[i * 2 + r].
                let mut out2 = vec![0f32; 2 * nq];
                let rows2: Vec<u8> = packed.iter().chain(&packed).copied().collect();
                s.code_rows_dots(&q, n, nq, &rows2, packed.len(), 2, bits, n, &mut out2, 2);
                for i in 0..nq {
                    assert_eq!([out2[2 * i], out2[2 * i + 1]], [out[i], out[i]]);
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
                s.code_rows_axpy(&mut acc3, n, nq, &w3, 3, &rows3, packed.len(), 3, bits, n);
                for i in 0..nq {
                    for c in 0..n {
                        assert_eq!(acc3[i * n + c], 1.0 + 6.0 * w[i] * codes[c] as f32);
                    }
                }
                let mut acc = vec![1f32; nq * n];
                s.code_axpys(&mut acc, n, nq, &w, &packed, bits, n);
                for i in 0..nq {
                    for c in 0..n {
                        assert_eq!(acc[i * n + c], 1.0 + w[i] * codes[c] as f32);
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
                            Portable.code_rows_dots(
                                &q, stride, nq, tail, row_bytes, rows, bits, n, &mut want, os,
                            );
                            s.code_rows_dots(
                                &q, stride, nq, tail, row_bytes, rows, bits, n, &mut got, os,
                            );
                            let what =
                                format!("bits={bits} n={n} row_n={row_n} rows={rows} nq={nq}");
                            for (g, w) in got.iter().zip(&want) {
                                assert!(close(*g, *w), "dots {what}: {g} vs {w}");
                            }
                            // Axpy, weights query-major with a stride wider than the rows.
                            let ws = rows + 1;
                            let w: Vec<f32> = (0..nq * ws)
                                .map(|i| ((i * 7 + seed) % 17) as f32 * 0.0625 - 0.5)
                                .collect();
                            let mut want = vec![0.5f32; nq * stride];
                            let mut got = want.clone();
                            Portable.code_rows_axpy(
                                &mut want, stride, nq, &w, ws, tail, row_bytes, rows, bits, n,
                            );
                            s.code_rows_axpy(
                                &mut got, stride, nq, &w, ws, tail, row_bytes, rows, bits, n,
                            );
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
            Portable.softmax(&mut want);
            let mut got = row.clone();
            s.softmax(&mut got);
            for (i, (g, w)) in got.iter().zip(&want).enumerate() {
                assert!(
                    (g - w).abs() <= 1e-6 * w.max(1e-30) + 1e-30,
                    "n={n} i={i}: {g} vs {w}"
                );
            }
            if n > 3 {
                assert_eq!((got[1], got[2]), (0.0, 0.0));
            }
        }
        for n in [1usize, 20] {
            let mut masked = vec![f32::NEG_INFINITY; n];
            s.softmax(&mut masked);
            assert_eq!(masked, vec![0.0; n]);
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
                unsafe { _mm256_storeu_ps(lanes.as_mut_ptr(), x86::exp8(_mm256_set1_ps(x))) };
                assert!(
                    (lanes[0] - want).abs() <= 3e-7 * want,
                    "exp8({x}) = {}",
                    lanes[0]
                );
            }
            if avx512.is_some() {
                // SAFETY: the CPU has the features (`Avx512::detect`).
                unsafe { _mm512_storeu_ps(lanes.as_mut_ptr(), x86_512::exp16(_mm512_set1_ps(x))) };
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
}
