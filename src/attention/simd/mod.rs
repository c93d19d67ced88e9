//! The vector primitives the attention kernel is made of, behind a [`Simd`] trait with three
//! implementations: [`Portable`] (plain Rust that the compiler vectorizes for the baseline
//! target) and, on x86-64, [`Avx2`] (AVX2 + FMA intrinsics) and [`Avx512`] (AVX-512
//! F/BW/VL/VBMI, sixteen lanes). The kernel is generic over the trait and dispatched once per
//! call after CPU feature detection (AVX-512 first), so one binary is both portable and fast.
//!
//! The two operations on packed codes (keys: dot products with the queries; values: weighted
//! sums of rows) take a [`CodeBlock`] of rows and strided views of the floats they read and
//! write; [`Simd::code_kernels`] picks them once per run of rows for its bit width.
//!
//! Rejected: relying on auto-vectorization alone. LLVM splits an `[f32; 8]` accumulator into
//! shuffled halves when it reduces it, which made the dot product 3x slower than intrinsics.

use std::ops::Range;

/// A block of rows of packed codes, the unit every code kernel works on: row `r`'s `width`
/// codes of `bits` bits start at byte `r·row_bytes` of `codes`. A row may hold more than
/// `width` codes (a kernel on one token group reads that group's span of each row), and
/// `codes` may end right after the last row's `width·bits/8` bytes.
#[derive(Clone, Copy, Debug)]
pub struct CodeBlock<'a> {
    pub codes: &'a [u8],
    pub row_bytes: usize,
    pub rows: usize,
    pub bits: u8,
    /// Codes read per row.
    pub width: usize,
}

impl<'a> CodeBlock<'a> {
    /// Rows `rows` of a tier whose rows of `dim` codes of `bits` bits are packed back to back
    /// in `all`, reading `width` codes from code `first` of each row (one token group, or
    /// the whole row).
    #[inline(always)]
    pub fn of_rows(
        all: &'a [u8],
        bits: u8,
        dim: usize,
        rows: Range<usize>,
        first: usize,
        width: usize,
    ) -> Self {
        let row_bytes = dim * bits as usize / 8;
        CodeBlock {
            codes: &all[rows.start * row_bytes + first * bits as usize / 8..],
            row_bytes,
            rows: rows.len(),
            bits,
            width,
        }
    }

    /// Whether every row's codes lie inside `codes` (for `rows > 0`).
    #[inline(always)]
    fn in_bounds(&self) -> bool {
        self.codes.len() >= (self.rows - 1) * self.row_bytes + self.width * self.bits as usize / 8
    }

    /// The bytes of row `r`'s `width` codes.
    #[inline(always)]
    fn row(&self, r: usize) -> &[u8] {
        let at = r * self.row_bytes;
        &self.codes[at..at + self.width * self.bits as usize / 8]
    }
}

/// `count` vectors of floats (queries, weights), vector `i` from `data[i·stride]`.
#[derive(Clone, Copy, Debug)]
pub struct Strided<'a> {
    pub data: &'a [f32],
    pub stride: usize,
    pub count: usize,
}

impl<'a> Strided<'a> {
    #[inline(always)]
    pub fn new(data: &'a [f32], stride: usize, count: usize) -> Self {
        Strided {
            data,
            stride,
            count,
        }
    }

    /// The vectors from `i` on.
    #[inline(always)]
    pub fn skip(&self, i: usize) -> Strided<'a> {
        Strided {
            data: &self.data[i * self.stride..],
            stride: self.stride,
            count: self.count - i,
        }
    }
}

impl Strided<'_> {
    /// Whether each of the `count` vectors holds `len` floats (for `count > 0`).
    #[inline(always)]
    fn holds(&self, len: usize) -> bool {
        self.data.len() >= (self.count - 1) * self.stride + len
    }
}

/// Vectors of floats that a kernel writes (logits, accumulators), vector `i` from
/// `data[i·stride]`; as many as the kernel's input [`Strided`] has.
#[derive(Debug)]
pub struct StridedMut<'a> {
    pub data: &'a mut [f32],
    pub stride: usize,
}

impl<'a> StridedMut<'a> {
    #[inline(always)]
    pub fn new(data: &'a mut [f32], stride: usize) -> Self {
        StridedMut { data, stride }
    }

    /// Whether each of `count > 0` vectors holds `len` floats.
    #[inline(always)]
    fn holds(&self, count: usize, len: usize) -> bool {
        self.data.len() >= (count - 1) * self.stride + len
    }

    /// The same vectors, borrowed for one kernel call.
    #[inline(always)]
    pub fn reborrow(&mut self) -> StridedMut<'_> {
        self.skip(0)
    }

    /// The vectors from `i` on, borrowed for one kernel call.
    #[inline(always)]
    pub fn skip(&mut self, i: usize) -> StridedMut<'_> {
        StridedMut {
            data: &mut self.data[i * self.stride..],
            stride: self.stride,
        }
    }
}

/// The operations of the attention kernel, one implementation per instruction set.
///
/// The two that read packed codes come as a pair of [`CodeKernels`] (keys, values) for a
/// bit width and row width, chosen once per run of rows: the default unpacks each row into
/// floats, and an implementation returns kernels that keep the codes in registers for the
/// widths it specialises, and a lower instruction set's kernels for the others.
pub trait Simd: Copy + Send + Sync {
    /// `Σ a_i b_i`.
    fn dot(self, a: &[f32], b: &[f32]) -> f32;

    /// `acc_i += a·x_i`.
    fn axpy(self, acc: &mut [f32], a: f32, x: &[f32]);

    /// `dst[i] = src[i]` for `i < min(src.len(), dst.len())` (the per-row scales and offsets
    /// of a run, converted once per call).
    fn f16_to_f32(self, src: &[half::f16], dst: &mut [f32]) {
        use half::slice::HalfFloatSliceExt;
        let n = src.len().min(dst.len());
        src[..n].convert_to_f32_slice(&mut dst[..n]);
    }

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

    /// The code kernels for rows of `width` codes of `bits` bits, chosen once per run of
    /// rows (the widths an implementation specialises are matched here, not at every block;
    /// the others fall back to a lower instruction set, down to [`Portable`]).
    fn code_kernels(self, bits: u8, width: usize) -> CodeKernels {
        CodeKernels::portable(bits, width)
    }
}

/// Signature of a key kernel: [`CodeKernels::dots`].
type DotsFn = unsafe fn(Strided<'_>, CodeBlock<'_>, StridedMut<'_>, &[f32]);
/// Signature of a value kernel: [`CodeKernels::axpy`].
type AxpyFn = unsafe fn(StridedMut<'_>, Strided<'_>, CodeBlock<'_>);

/// The two operations on packed codes, for one bit width and row width, as the instruction
/// set that made them implements them: the key kernel (dot products with queries) and the
/// value kernel (weighted sums of rows).
#[derive(Clone, Copy)]
pub struct CodeKernels {
    bits: u8,
    width: usize,
    dots: DotsFn,
    axpy: AxpyFn,
}

impl CodeKernels {
    /// Kernels for `bits`-bit codes, `width` per row.
    ///
    /// # Safety
    /// The CPU has every feature `dots` and `axpy` are compiled for, and both are sound for
    /// any block of `bits`-bit codes, `width` per row, whose bounds they assert.
    pub(crate) unsafe fn new(bits: u8, width: usize, dots: DotsFn, axpy: AxpyFn) -> Self {
        CodeKernels {
            bits,
            width,
            dots,
            axpy,
        }
    }

    /// The plain-Rust kernels (unpack a row to floats, then [`Portable`]'s `dot` / `axpy`).
    pub(crate) fn portable(bits: u8, width: usize) -> Self {
        // SAFETY: plain Rust, bounds-checked.
        unsafe { CodeKernels::new(bits, width, portable_dots, portable_axpy) }
    }

    /// `out[i·out.stride + r] = q_i · codes_r + bias[i]` for every query `i < q.count` and
    /// row `r` of `block` (query-major, so a caller can point `out` straight at its logits;
    /// an empty `bias` adds nothing). The bias is the per-channel codec's offset term, added
    /// where the dots are stored instead of in a second pass over the logits (which cost 3%
    /// of a 16k-token step). One call per block of rows, not per row: the call and its setup
    /// cost as much as a row's arithmetic.
    #[inline(always)]
    pub fn dots(&self, q: Strided<'_>, block: CodeBlock<'_>, out: StridedMut<'_>, bias: &[f32]) {
        self.check(&block);
        // SAFETY: `new`'s contract, and the block has the codes the kernel was chosen for.
        unsafe { (self.dots)(q, block, out, bias) }
    }

    /// `acc[i·acc.stride + c] += Σ_r w[i·w.stride + r] · code_{r,c}` for every query
    /// `i < w.count` and channel `c < block.width` (weights query-major, so probabilities
    /// can be passed as they are). Blocking over rows keeps the accumulators in registers
    /// instead of loading and storing them for every row.
    #[inline(always)]
    pub fn axpy(&self, acc: StridedMut<'_>, w: Strided<'_>, block: CodeBlock<'_>) {
        self.check(&block);
        // SAFETY: as in `dots`.
        unsafe { (self.axpy)(acc, w, block) }
    }

    /// A kernel compiled for one bit width reads its bytes by that width: a block of another
    /// would be read out of its bounds.
    #[inline(always)]
    fn check(&self, block: &CodeBlock<'_>) {
        assert!(
            block.bits == self.bits && block.width == self.width,
            "kernels for {}-bit codes, {} per row, given {}-bit codes, {} per row",
            self.bits,
            self.width,
            block.bits,
            block.width
        );
    }
}

/// [`CodeKernels::dots`] in plain Rust.
fn portable_dots(q: Strided<'_>, block: CodeBlock<'_>, out: StridedMut<'_>, bias: &[f32]) {
    let mut dots = [0f32; 16];
    for i0 in (0..q.count).step_by(16) {
        let m = (q.count - i0).min(16);
        let qi = Strided {
            data: &q.data[i0 * q.stride..],
            count: m,
            ..q
        };
        for r in 0..block.rows {
            code_dots(qi, block.row(r), block.bits, block.width, &mut dots[..m]);
            for (j, &x) in dots[..m].iter().enumerate() {
                out.data[(i0 + j) * out.stride + r] = x;
            }
        }
    }
    add_bias(out, block.rows, bias);
}

/// [`CodeKernels::axpy`] in plain Rust.
fn portable_axpy(acc: StridedMut<'_>, w: Strided<'_>, block: CodeBlock<'_>) {
    let mut wr = [0f32; 16];
    for i0 in (0..w.count).step_by(16) {
        let m = (w.count - i0).min(16);
        for r in 0..block.rows {
            for (j, x) in wr[..m].iter_mut().enumerate() {
                *x = w.data[(i0 + j) * w.stride + r];
            }
            let a = StridedMut {
                data: &mut acc.data[i0 * acc.stride..],
                stride: acc.stride,
            };
            code_axpys(a, &wr[..m], block.row(r), block.bits, block.width);
        }
    }
}

/// The bounds of a [`CodeKernels::dots`] call, asserted before a kernel's unchecked
/// accesses: the block's rows, `q.count` queries of `width` floats, and as many outputs of
/// `rows` floats. `false`: nothing to compute.
#[cfg(target_arch = "x86_64")]
#[inline(always)]
pub(crate) fn dots_in_bounds(q: &Strided<'_>, block: &CodeBlock<'_>, out: &StridedMut<'_>) -> bool {
    if block.rows == 0 || q.count == 0 {
        return false;
    }
    assert!(block.in_bounds() && q.holds(block.width) && out.holds(q.count, block.rows));
    true
}

/// [`dots_in_bounds`] for a [`CodeKernels::axpy`] call: `w.count` weight vectors of `rows`
/// floats and as many accumulators of `width` floats.
#[cfg(target_arch = "x86_64")]
#[inline(always)]
pub(crate) fn axpy_in_bounds(acc: &StridedMut<'_>, w: &Strided<'_>, block: &CodeBlock<'_>) -> bool {
    if block.rows == 0 || w.count == 0 {
        return false;
    }
    assert!(block.in_bounds() && w.holds(block.rows) && acc.holds(w.count, block.width));
    true
}

/// `out[i·out.stride + r] += bias[i]` for the `rows` first entries of each query's output.
#[inline(always)]
fn add_bias(out: StridedMut<'_>, rows: usize, bias: &[f32]) {
    for (i, &b) in bias.iter().enumerate() {
        let o = &mut out.data[i * out.stride..i * out.stride + rows];
        o.iter_mut().for_each(|l| *l += b);
    }
}

/// For each query `i < q.count`: `out[i] = Σ_{c<n} q_i[c] · code_c`, with the `n` codes of
/// `bits` bits packed in `codes`, unpacked 512 at a time.
#[inline(always)]
fn code_dots(q: Strided<'_>, codes: &[u8], bits: u8, n: usize, out: &mut [f32]) {
    let mut buf = [0f32; 512];
    for (k, chunk) in (0..n).step_by(512).enumerate() {
        let m = (n - chunk).min(512);
        let bytes = &codes[k * 512 * bits as usize / 8..];
        unpack_f32(&bytes[..m * bits as usize / 8], bits, &mut buf[..m]);
        for (i, o) in out.iter_mut().enumerate().take(q.count) {
            let qi = &q.data[i * q.stride + chunk..i * q.stride + chunk + m];
            let add = Portable.dot(qi, &buf[..m]);
            *o = if k == 0 { add } else { *o + add };
        }
    }
}

/// For each query `i < w.len()`: `acc[i·acc.stride + c] += w[i] · code_c` for `c < n`.
#[inline(always)]
fn code_axpys(acc: StridedMut<'_>, w: &[f32], codes: &[u8], bits: u8, n: usize) {
    let mut buf = [0f32; 512];
    for (k, chunk) in (0..n).step_by(512).enumerate() {
        let m = (n - chunk).min(512);
        let bytes = &codes[k * 512 * bits as usize / 8..];
        unpack_f32(&bytes[..m * bits as usize / 8], bits, &mut buf[..m]);
        for (i, &wi) in w.iter().enumerate() {
            if wi != 0.0 {
                let at = i * acc.stride + chunk;
                Portable.axpy(&mut acc.data[at..at + m], wi, &buf[..m]);
            }
        }
    }
}

/// `$f::<$consts…, M>($args…)` with `M = min(m, 4)` as a constant: the SIMD kernels take the
/// queries of a GQA group four at a time, and a constant count lets their per-query loops
/// unroll and keep every accumulator in a register. Defined before the ISA modules, which
/// see it by textual scope.
#[cfg(target_arch = "x86_64")]
macro_rules! by_query_count {
    ($m:expr, $f:ident::<$($c:tt),*>($($a:expr),* $(,)?)) => {
        match $m {
            1 => $f::<$($c,)* 1>($($a),*),
            2 => $f::<$($c,)* 2>($($a),*),
            3 => $f::<$($c,)* 3>($($a),*),
            _ => $f::<$($c,)* 4>($($a),*),
        }
    };
}

/// [`by_query_count`] for each group of four of `$n` queries, the group's first query
/// bound to `$i`.
#[cfg(target_arch = "x86_64")]
macro_rules! for_query_groups {
    ($n:expr, |$i:ident| $f:ident::<$($c:tt),*>($($a:expr),* $(,)?)) => {
        for $i in (0..$n).step_by(4) {
            by_query_count!($n - $i, $f::<$($c),*>($($a),*))
        }
    };
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
pub(crate) fn unpack_f32(bytes: &[u8], bits: u8, out: &mut [f32]) {
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
