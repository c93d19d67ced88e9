//! The vector primitives the attention kernel is made of, behind a [`Simd`] trait with two
//! implementations: [`Portable`] (plain Rust that the compiler vectorizes for the baseline
//! target) and, on x86-64, [`Avx2`] (AVX2 + FMA intrinsics). The kernel is generic over the
//! trait and dispatched once per call after CPU feature detection, so one binary is both
//! portable and fast.
//!
//! Rejected: relying on auto-vectorization alone. LLVM splits an `[f32; 8]` accumulator into
//! shuffled halves when it reduces it, which made the dot product 3x slower than intrinsics.

pub trait Simd: Copy + Send + Sync {
    /// `Σ a_i b_i`.
    fn dot(self, a: &[f32], b: &[f32]) -> f32;
    /// `acc_i += a·x_i`.
    fn axpy(self, acc: &mut [f32], a: f32, x: &[f32]);
    /// `acc_i += a·x_i + b`.
    fn axpb(self, acc: &mut [f32], a: f32, x: &[f32], b: f32);
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
mod x86 {
    use super::{Portable, Simd};
    use std::arch::x86_64::*;

    /// AVX2 + FMA. Only [`Avx2::detect`] makes one, after checking the CPU.
    #[derive(Clone, Copy)]
    pub struct Avx2(());

    impl Avx2 {
        pub fn detect() -> Option<Avx2> {
            let ok = std::arch::is_x86_feature_detected!("avx2")
                && std::arch::is_x86_feature_detected!("fma")
                && std::arch::is_x86_feature_detected!("f16c");
            ok.then_some(Avx2(()))
        }
    }

    #[inline]
    #[target_feature(enable = "avx2,fma")]
    fn hsum(v: __m256) -> f32 {
        let lo = _mm256_castps256_ps128(v);
        let hi = _mm256_extractf128_ps::<1>(v);
        let s = _mm_add_ps(lo, hi);
        let s = _mm_add_ps(s, _mm_movehl_ps(s, s));
        let s = _mm_add_ss(s, _mm_movehdup_ps(s));
        _mm_cvtss_f32(s)
    }

    #[inline]
    #[target_feature(enable = "avx2,fma")]
    fn dot(a: &[f32], b: &[f32]) -> f32 {
        let n = a.len().min(b.len());
        let main = n / 16 * 16;
        let (mut s0, mut s1) = (_mm256_setzero_ps(), _mm256_setzero_ps());
        let mut i = 0;
        while i < main {
            // SAFETY: i + 16 <= main <= len of both slices.
            unsafe {
                s0 = _mm256_fmadd_ps(
                    _mm256_loadu_ps(a.as_ptr().add(i)),
                    _mm256_loadu_ps(b.as_ptr().add(i)),
                    s0,
                );
                s1 = _mm256_fmadd_ps(
                    _mm256_loadu_ps(a.as_ptr().add(i + 8)),
                    _mm256_loadu_ps(b.as_ptr().add(i + 8)),
                    s1,
                );
            }
            i += 16;
        }
        hsum(_mm256_add_ps(s0, s1)) + Portable.dot(&a[main..n], &b[main..n])
    }

    #[inline]
    #[target_feature(enable = "avx2,fma")]
    fn axpb(acc: &mut [f32], a: f32, x: &[f32], b: f32) {
        let n = acc.len().min(x.len());
        let main = n / 8 * 8;
        let (va, vb) = (_mm256_set1_ps(a), _mm256_set1_ps(b));
        let mut i = 0;
        while i < main {
            // SAFETY: i + 8 <= main <= len of both slices.
            unsafe {
                let p = acc.as_mut_ptr().add(i);
                let v = _mm256_fmadd_ps(
                    va,
                    _mm256_loadu_ps(x.as_ptr().add(i)),
                    _mm256_add_ps(_mm256_loadu_ps(p), vb),
                );
                _mm256_storeu_ps(p, v);
            }
            i += 8;
        }
        Portable.axpb(&mut acc[main..n], a, &x[main..n], b);
    }

    impl Simd for Avx2 {
        #[inline(always)]
        fn dot(self, a: &[f32], b: &[f32]) -> f32 {
            // SAFETY: an `Avx2` exists only on CPUs with AVX2 and FMA.
            unsafe { dot(a, b) }
        }

        #[inline(always)]
        fn axpy(self, acc: &mut [f32], a: f32, x: &[f32]) {
            // SAFETY: as above.
            unsafe { axpb(acc, a, x, 0.0) }
        }

        #[inline(always)]
        fn axpb(self, acc: &mut [f32], a: f32, x: &[f32], b: f32) {
            // SAFETY: as above.
            unsafe { axpb(acc, a, x, b) }
        }
    }
}

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
