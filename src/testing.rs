//! Deterministic pseudo-random data for tests, examples and benchmarks, so that the library
//! itself needs no random-number crate.

/// `n` values spread uniformly over `[-amp, amp]`, from an xorshift64 stream seeded by `seed`.
pub fn uniform(n: usize, seed: u64, amp: f32) -> Vec<f32> {
    let mut s = seed | 1;
    (0..n)
        .map(|_| {
            s ^= s << 13;
            s ^= s >> 7;
            s ^= s << 17;
            ((s >> 40) as f32 / (1u64 << 24) as f32 * 2.0 - 1.0) * amp
        })
        .collect()
}
