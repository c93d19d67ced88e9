//! One rayon pool for the whole library, sized by `KVMIX_NUM_THREADS` (default: all cores).
//!
//! Small jobs (a single decode step of a small model) run serially on the calling thread:
//! waking a pool costs microseconds, which is more than the work itself below
//! [`PARALLEL_MIN_ELEMENTS`].

use rayon::{ThreadPool, ThreadPoolBuilder};
use std::sync::OnceLock;

/// Below this many input elements a kernel runs serially.
pub const PARALLEL_MIN_ELEMENTS: usize = 1 << 15;

static POOL: OnceLock<Option<ThreadPool>> = OnceLock::new();

/// The number of threads `KVMIX_NUM_THREADS` asks for, if it is a positive integer.
fn requested_threads() -> Option<usize> {
    std::env::var("KVMIX_NUM_THREADS")
        .ok()
        .and_then(|v| v.trim().parse::<usize>().ok())
        .filter(|&n| n > 0)
}

fn pool() -> Option<&'static ThreadPool> {
    POOL.get_or_init(|| {
        let mut builder = ThreadPoolBuilder::new().thread_name(|i| format!("kvmix-{i}"));
        if let Some(n) = requested_threads() {
            builder = builder.num_threads(n);
        }
        // If the pool cannot be built (e.g. thread creation refused), run serially.
        builder.build().ok()
    })
    .as_ref()
}

/// Number of worker threads kernels may use.
pub fn num_threads() -> usize {
    pool().map_or(1, |p| p.current_num_threads())
}

/// Run `f` inside the kvmix pool when the job is big enough to pay for it; otherwise run it
/// on the current thread with parallel iterators still working (rayon falls back to the
/// global pool only if called outside `install`, so `parallel` also tells callers whether to
/// use `par_iter` at all).
pub fn run<R: Send>(elements: usize, f: impl FnOnce(bool) -> R + Send) -> R {
    match pool() {
        Some(p) if elements >= PARALLEL_MIN_ELEMENTS && p.current_num_threads() > 1 => {
            p.install(|| f(true))
        }
        _ => f(false),
    }
}

/// Whether the CPU has AVX2, FMA and F16C (the features of kvmix's fast kernels).
#[cfg(target_arch = "x86_64")]
#[inline]
pub fn has_avx2() -> bool {
    crate::isa::best() >= crate::isa::Isa::Avx2
}

/// Run `f` compiled for AVX2+FMA+F16C when the CPU has them (one binary, portable and fast).
/// `f` and what it inlines are generated twice by monomorphization; results are identical
/// because Rust never contracts `a * b + c` into an FMA on its own.
#[inline(always)]
pub fn with_best_simd<R>(f: impl FnOnce() -> R) -> R {
    #[cfg(target_arch = "x86_64")]
    {
        if has_avx2() {
            // SAFETY: the CPU supports every feature `run_avx2` is compiled for.
            return unsafe { run_avx2(f) };
        }
    }
    f()
}

#[cfg(target_arch = "x86_64")]
#[target_feature(enable = "avx2,fma,f16c")]
unsafe fn run_avx2<R>(f: impl FnOnce() -> R) -> R {
    f()
}
