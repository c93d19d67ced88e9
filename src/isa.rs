//! The one place the crate asks the CPU which instruction sets it has. Detection runs once
//! (cached), so the attention kernels, the decoders and the parallel helpers all agree and no
//! hot path repeats the `cpuid` checks.
//!
//! The levels are nested (each needs every feature of the one below), so one ordered value
//! says what a kernel may use: a kernel compiled for level `L` runs when `best() >= L`.

use std::sync::OnceLock;

/// The x86 feature levels kvmix's kernels are compiled for, in increasing order.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, PartialOrd, Ord)]
pub enum Isa {
    /// Plain Rust for the baseline target (any CPU, any architecture).
    #[default]
    Portable,
    /// AVX2, FMA and F16C (the AVX2 kernels need all three).
    Avx2,
    /// AVX-512 F/BW/VL on top of [`Isa::Avx2`] (the dequantization kernels).
    Avx512,
    /// AVX-512 VBMI (`vpmultishiftqb`, `vpermb`) on top of [`Isa::Avx512`] (the attention
    /// kernels).
    Avx512Vbmi,
}

/// The best level this CPU supports, detected on the first call and cached.
#[inline]
pub fn best() -> Isa {
    static CELL: OnceLock<Isa> = OnceLock::new();
    *CELL.get_or_init(detect)
}

fn detect() -> Isa {
    #[cfg(target_arch = "x86_64")]
    {
        use std::arch::is_x86_feature_detected as has;
        if !(has!("avx2") && has!("fma") && has!("f16c")) {
            return Isa::Portable;
        }
        if !(has!("avx512f") && has!("avx512bw") && has!("avx512vl")) {
            return Isa::Avx2;
        }
        if !has!("avx512vbmi") {
            return Isa::Avx512;
        }
        Isa::Avx512Vbmi
    }
    #[cfg(not(target_arch = "x86_64"))]
    Isa::Portable
}
