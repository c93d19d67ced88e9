//! The one place the crate asks the CPU which instruction sets it has. Detection runs once
//! (cached), so the attention kernels, the decoders and the parallel helpers all agree and no
//! hot path repeats the `cpuid` checks.
//!
//! The levels are nested (each needs every feature of the one below), so one ordered value
//! says what a kernel may use: a kernel compiled for level `L` runs when `best() >= L`.
//!
//! `KVMIX_ISA` (`portable`, `avx2`, `avx512`, `avx512vbmi`), read once with the detection,
//! caps the level below what the CPU has: the fallback kernels can then be tested and
//! benchmarked on a machine that would never pick them. It never raises the level.

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

/// The best level this CPU supports (capped by `KVMIX_ISA`), detected on the first call and
/// cached.
#[inline]
pub fn best() -> Isa {
    static CELL: OnceLock<Isa> = OnceLock::new();
    *CELL.get_or_init(|| detect().min(cap()))
}

/// The level `KVMIX_ISA` allows: the highest when it is unset; a value that names no level
/// is reported once on stderr and ignored (detection runs inside kernels, which have no
/// error to return).
fn cap() -> Isa {
    let Ok(name) = std::env::var("KVMIX_ISA") else {
        return Isa::Avx512Vbmi;
    };
    Isa::parse(&name).unwrap_or_else(|| {
        eprintln!(
            "kvmix: KVMIX_ISA={name:?} is not one of portable, avx2, avx512, avx512vbmi; ignored"
        );
        Isa::Avx512Vbmi
    })
}

impl Isa {
    /// The level named `name` (as `KVMIX_ISA` spells it), if any.
    pub fn parse(name: &str) -> Option<Isa> {
        match name.trim().to_ascii_lowercase().as_str() {
            "portable" => Some(Isa::Portable),
            "avx2" => Some(Isa::Avx2),
            "avx512" => Some(Isa::Avx512),
            "avx512vbmi" => Some(Isa::Avx512Vbmi),
            _ => None,
        }
    }
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

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn names_parse_to_their_levels_in_order() {
        let names = ["portable", "avx2", "avx512", "avx512vbmi"];
        let levels: Vec<Isa> = names.iter().map(|n| Isa::parse(n).unwrap()).collect();
        assert!(levels.windows(2).all(|w| w[0] < w[1]), "{levels:?}");
        assert_eq!(Isa::parse(" AVX2 "), Some(Isa::Avx2));
        assert_eq!(Isa::parse("sse4"), None);
    }

    #[test]
    fn best_never_exceeds_the_cpu() {
        assert!(best() <= detect());
    }
}
