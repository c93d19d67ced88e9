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

    /// `row ← e^(row − max(row))` in place, returning `(max, sum)`: softmax without the
    /// final division, which the attention kernel applies to each query's output instead of
    /// to every probability (and, for a stream split in parts, after rescaling each part to
    /// the common max). A row that is all `-inf` (a query that sees nothing) becomes all
    /// zeros and returns `(-inf, 0)`.
    fn exp_shifted(self, row: &mut [f32]) -> (f32, f32) {
        let m = row.iter().copied().fold(f32::NEG_INFINITY, f32::max);
        if m == f32::NEG_INFINITY {
            row.fill(0.0);
            return (m, 0.0);
        }
        let mut sum = 0f32;
        for l in row.iter_mut() {
            *l = (*l - m).exp();
            sum += *l;
        }
        (m, sum)
    }

    /// Softmax of `row` in place (max-subtracted); a row that is all `-inf` becomes all zeros.
    fn softmax(self, row: &mut [f32]) {
        let (_, sum) = self.exp_shifted(row);
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

    /// [`Simd::code_rows_dots`] plus `bias[i]` on every dot of query `i` (`bias` holds `nq`
    /// values): the per-channel codec's offset term, added where the dots are stored instead
    /// of in a second pass over the logits (which cost 3% of a 16k-token step).
    #[allow(clippy::too_many_arguments)]
    fn code_rows_dots_biased(
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
        bias: &[f32],
    ) {
        self.code_rows_dots(
            q, stride, nq, codes, row_bytes, rows, bits, n, out, out_stride,
        );
        for (i, &b) in bias.iter().enumerate().take(nq) {
            let o = &mut out[i * out_stride..i * out_stride + rows];
            o.iter_mut().for_each(|l| *l += b);
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
pub use avx2::Avx2;

#[cfg(target_arch = "x86_64")]
mod avx2;

#[cfg(target_arch = "x86_64")]
pub use avx512::Avx512;

#[cfg(target_arch = "x86_64")]
mod avx512;

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
mod tests;
