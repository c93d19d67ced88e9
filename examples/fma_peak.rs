//! Peak fp32 FMA throughput of this CPU, one thread, for AVX2 (8 lanes) and AVX-512
//! (16 lanes): `cargo run --release --example fma_peak -- [seconds]`.
//!
//! The arithmetic floor of the attention kernel is its FMA count divided by these figures.
//! Twelve independent accumulators cover the FMA latency (4 cycles) on two ports.

use std::time::Instant;

#[cfg(target_arch = "x86_64")]
mod x86 {
    use std::arch::x86_64::*;

    /// `iters` rounds of twelve independent 8-lane FMAs; returns a checksum.
    #[target_feature(enable = "avx2,fma")]
    pub fn avx2(iters: u64) -> f32 {
        let (a, b) = (_mm256_set1_ps(0.999_999), _mm256_set1_ps(1e-7));
        let mut acc = [_mm256_set1_ps(1.0); 12];
        for _ in 0..iters {
            for v in acc.iter_mut() {
                *v = _mm256_fmadd_ps(*v, a, b);
            }
        }
        let mut s = _mm256_setzero_ps();
        for v in acc {
            s = _mm256_add_ps(s, v);
        }
        let mut lanes = [0f32; 8];
        // SAFETY: `lanes` holds eight floats.
        unsafe { _mm256_storeu_ps(lanes.as_mut_ptr(), s) };
        lanes.iter().sum()
    }

    /// `iters` rounds of twelve independent 16-lane FMAs; returns a checksum.
    #[target_feature(enable = "avx512f")]
    pub fn avx512(iters: u64) -> f32 {
        let (a, b) = (_mm512_set1_ps(0.999_999), _mm512_set1_ps(1e-7));
        let mut acc = [_mm512_set1_ps(1.0); 12];
        for _ in 0..iters {
            for v in acc.iter_mut() {
                *v = _mm512_fmadd_ps(*v, a, b);
            }
        }
        let mut s = _mm512_setzero_ps();
        for v in acc {
            s = _mm512_add_ps(s, v);
        }
        _mm512_reduce_add_ps(s)
    }
}

/// Lane-FMAs per second of `f` (`lanes` lanes, twelve per round): the best and the median run.
/// On a shared machine the best is the hardware's figure (being descheduled only lowers a
/// run's rate).
fn measure(lanes: u64, secs: f64, f: impl Fn(u64) -> f32) -> (f64, f64) {
    let iters = 5_000_000u64;
    let mut rates = Vec::new();
    let start = Instant::now();
    while start.elapsed().as_secs_f64() < secs || rates.len() < 5 {
        let t = Instant::now();
        std::hint::black_box(f(std::hint::black_box(iters)));
        rates.push((iters * 12 * lanes) as f64 / t.elapsed().as_secs_f64());
    }
    rates.sort_by(f64::total_cmp);
    (rates[rates.len() - 1], rates[rates.len() / 2])
}

fn main() {
    let secs: f64 = std::env::args()
        .nth(1)
        .and_then(|a| a.parse().ok())
        .unwrap_or(2.0);
    #[cfg(target_arch = "x86_64")]
    {
        if is_x86_feature_detected!("avx2") && is_x86_feature_detected!("fma") {
            // SAFETY: the CPU has AVX2 and FMA.
            let (best, med) = measure(8, secs, |n| unsafe { x86::avx2(n) });
            println!(
                "AVX2+FMA: {:.1} G lane-FMA/s per thread (median run {:.1})",
                best / 1e9,
                med / 1e9
            );
        }
        if is_x86_feature_detected!("avx512f") {
            // SAFETY: the CPU has AVX-512F.
            let (best, med) = measure(16, secs, |n| unsafe { x86::avx512(n) });
            println!(
                "AVX-512F: {:.1} G lane-FMA/s per thread (median run {:.1})",
                best / 1e9,
                med / 1e9
            );
        }
    }
    #[cfg(not(target_arch = "x86_64"))]
    println!(
        "x86-64 only; nothing to measure on {}",
        std::env::consts::ARCH
    );
}
