//! Profile the fused attention kernel outside Python:
//! `cargo run --release --example attention_profile -- [tokens] [policy] [iters] [batch]`
//! (`KVMIX_NUM_THREADS=1` for single-thread timings).

use kvmix::attention::attend;
use kvmix::store::{DenseDtype, LayerStore, MikvConfig, Policy, ZipCacheConfig};
use std::time::Instant;

fn data(n: usize, seed: u64) -> Vec<f32> {
    kvmix::testing::uniform(n, seed, 2.0)
}

/// CPU time of the calling thread in seconds (Linux), if available: on a shared machine it
/// counts only the time the kernel actually ran, unlike the wall clock. With
/// `KVMIX_NUM_THREADS=1` the kernel runs entirely on this thread. It may advance in whole
/// scheduler ticks, so only its mean over many calls is meaningful.
fn thread_cpu_seconds() -> Option<f64> {
    let s = std::fs::read_to_string("/proc/thread-self/schedstat").ok()?;
    let ns: f64 = s.split_whitespace().next()?.parse().ok()?;
    Some(ns * 1e-9)
}

fn main() {
    let args: Vec<String> = std::env::args().collect();
    let l: usize = args.get(1).and_then(|a| a.parse().ok()).unwrap_or(16384);
    let policy = match args.get(2).map(String::as_str) {
        Some("mikv") => Policy::Mikv(MikvConfig {
            key_balancer: false,
            ..Default::default()
        }),
        Some("full") => Policy::Full,
        _ => Policy::ZipCache(ZipCacheConfig::default()),
    };
    let iters: usize = args.get(3).and_then(|a| a.parse().ok()).unwrap_or(50);
    let b: usize = args.get(4).and_then(|a| a.parse().ok()).unwrap_or(1);
    let (hq, hk, d) = (32, 8, 128);
    let mut st = LayerStore::new(policy, hk, d, DenseDtype::F32).expect("valid policy");
    let n = b * hk * l * d;
    st.append(&data(n, 1), &data(n, 2), &[b, hk, l, d])
        .expect("finite data");
    let acc: Vec<f32> = data(b * hk * l, 3).iter().map(|x| x.abs()).collect();
    st.add_scores(0, &acc, &vec![1.0; acc.len()])
        .expect("shapes");
    st.maybe_classify(false).expect("classify");
    let q = data(b * hq * d, 4);
    let mut times = Vec::new();
    let cpu_start = thread_cpu_seconds();
    for _ in 0..iters {
        let t = Instant::now();
        let out = attend(&st, &q, &[b, hq, 1, d], &[l - 1], 0.088).expect("attend");
        std::hint::black_box(out);
        times.push(t.elapsed().as_secs_f64());
    }
    let cpu = cpu_start
        .zip(thread_cpu_seconds())
        .map(|(c0, c1)| (c1 - c0) / iters as f64);
    times.sort_by(f64::total_cmp);
    let m = st.memory();
    let med = times[times.len() / 2];
    println!(
        "B={b} L={l} {}: median {:.3} ms (min {:.3}), {:.2} GB/s of compressed bytes",
        args.get(2).map_or("zipcache", String::as_str),
        med * 1e3,
        times[0] * 1e3,
        m.total() as f64 / med / 1e9
    );
    // With more threads the work runs on the pool, not on this thread.
    if let (Some(c), 1) = (cpu, kvmix::parallel::num_threads()) {
        println!("  calling thread's CPU time: mean {:.3} ms", c * 1e3);
    }
}
