//! Profile the fused attention kernel outside Python:
//! `cargo run --release --example attention_profile -- [tokens] [policy] [iters]`.

use kvmix::attention::attend;
use kvmix::store::{DenseDtype, LayerStore, MikvConfig, Policy, ZipCacheConfig};
use std::time::Instant;

fn data(n: usize, seed: u64) -> Vec<f32> {
    kvmix::testing::uniform(n, seed, 2.0)
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
    let (b, hq, hk, d) = (1, 32, 8, 128);
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
    for _ in 0..iters {
        let t = Instant::now();
        let out = attend(&st, &q, &[b, hq, 1, d], &[l - 1], 0.088).expect("attend");
        std::hint::black_box(out);
        times.push(t.elapsed().as_secs_f64());
    }
    times.sort_by(f64::total_cmp);
    let m = st.memory();
    let med = times[times.len() / 2];
    println!(
        "L={l} {:?}: median {:.3} ms, {:.2} GB/s of compressed bytes",
        policy,
        med * 1e3,
        m.total() as f64 / med / 1e9
    );
}
