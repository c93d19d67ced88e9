//! The few vector primitives the attention kernel is made of. Written so that LLVM
//! vectorizes them (eight independent accumulators break the serial dependency of a float
//! sum); the kernel is compiled twice — for AVX2+FMA, chosen at run time when the CPU has
//! it, and for the baseline target — so one binary is both portable and fast.

/// `Σ a_i b_i` with eight partial sums.
#[inline(always)]
pub fn dot(a: &[f32], b: &[f32]) -> f32 {
    let mut acc = [0f32; 8];
    let (ac, ar) = a.split_at(a.len() / 8 * 8);
    let (bc, br) = b.split_at(ac.len());
    for (x, y) in ac.chunks_exact(8).zip(bc.chunks_exact(8)) {
        for l in 0..8 {
            acc[l] += x[l] * y[l];
        }
    }
    let mut s = (acc[0] + acc[4]) + (acc[1] + acc[5]) + ((acc[2] + acc[6]) + (acc[3] + acc[7]));
    for (x, y) in ar.iter().zip(br) {
        s += x * y;
    }
    s
}

/// `acc_i += a·x_i + b`.
#[inline(always)]
pub fn axpb(acc: &mut [f32], a: f32, x: &[f32], b: f32) {
    for (o, &v) in acc.iter_mut().zip(x) {
        *o += a * v + b;
    }
}

/// `acc_i += a·x_i`.
#[inline(always)]
pub fn axpy(acc: &mut [f32], a: f32, x: &[f32]) {
    for (o, &v) in acc.iter_mut().zip(x) {
        *o += a * v;
    }
}

/// Unpack `out.len()` codes of `bits` bits (LSB first) from `bytes` straight to `f32`.
#[inline(always)]
pub fn unpack_f32(bytes: &[u8], bits: u8, out: &mut [f32]) {
    match bits {
        2 => {
            for (o, &b) in out.chunks_exact_mut(4).zip(bytes) {
                o[0] = (b & 3) as f32;
                o[1] = ((b >> 2) & 3) as f32;
                o[2] = ((b >> 4) & 3) as f32;
                o[3] = (b >> 6) as f32;
            }
        }
        4 => {
            for (o, &b) in out.chunks_exact_mut(2).zip(bytes) {
                o[0] = (b & 15) as f32;
                o[1] = (b >> 4) as f32;
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

    #[test]
    fn dot_matches_naive_for_every_tail() {
        for n in 0..40 {
            let a: Vec<f32> = (0..n).map(|i| i as f32 * 0.5 - 3.0).collect();
            let b: Vec<f32> = (0..n).map(|i| (i % 7) as f32 - 2.0).collect();
            let naive: f32 = a.iter().zip(&b).map(|(x, y)| x * y).sum();
            assert!((dot(&a, &b) - naive).abs() < 1e-3, "n={n}");
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
