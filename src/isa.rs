//! The one place the crate asks the CPU which instruction sets it has. Detection runs once
//! (cached), so the attention kernels, the decoders and the parallel helpers all agree and no
//! hot path repeats the `cpuid` checks.

use std::sync::OnceLock;

/// The x86 feature groups kvmix's kernels are compiled for.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct CpuFeatures {
    /// AVX2, FMA and F16C (the AVX2 kernels need all three).
    pub avx2: bool,
    /// AVX-512 F/BW/VL, on top of `avx2`.
    pub avx512: bool,
    /// AVX-512 VBMI (`vpmultishiftqb`, `vpermb`), on top of `avx512`.
    pub avx512_vbmi: bool,
}

/// The CPU's features, detected on the first call and cached.
#[inline]
pub fn cpu() -> CpuFeatures {
    static CELL: OnceLock<CpuFeatures> = OnceLock::new();
    *CELL.get_or_init(detect)
}

fn detect() -> CpuFeatures {
    #[cfg(target_arch = "x86_64")]
    {
        use std::arch::is_x86_feature_detected as has;
        let avx2 = has!("avx2") && has!("fma") && has!("f16c");
        let avx512 = avx2 && has!("avx512f") && has!("avx512bw") && has!("avx512vl");
        let avx512_vbmi = avx512 && has!("avx512vbmi");
        CpuFeatures {
            avx2,
            avx512,
            avx512_vbmi,
        }
    }
    #[cfg(not(target_arch = "x86_64"))]
    CpuFeatures::default()
}
