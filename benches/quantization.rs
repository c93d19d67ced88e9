//! Criterion benchmarks of the quantization core: quantize+pack and unpack+dequantize of a
//! `[8 heads, 4096 tokens, 128 channels]` fp32 tensor at the granularities the methods use.
//! Run with `cargo bench --bench quantization`.

use criterion::{criterion_group, criterion_main, Criterion, Throughput};
use kvmix::quant::{quantize, Clip, Grouping, ParamDtype, QuantSpec};

fn data(n: usize) -> Vec<f32> {
    // A cheap deterministic pseudo-random signal with a few outlier channels.
    (0..n)
        .map(|i| {
            let h = (i as u64).wrapping_mul(0x9E37_79B9_7F4A_7C15) >> 40;
            let v = (h as f32 / (1u64 << 24) as f32) - 0.5;
            if i % 128 == 7 {
                v * 20.0
            } else {
                v
            }
        })
        .collect()
}

fn bench(c: &mut Criterion) {
    let dims = [8usize, 4096, 128];
    let x = data(dims.iter().product());
    let mut group = c.benchmark_group("quantization");
    group.throughput(Throughput::Bytes((x.len() * 4) as u64));
    let specs = [
        (
            "token_groups_g64_2bit",
            Grouping::TokenGroups { group_size: 64 },
            2u8,
        ),
        (
            "token_groups_g128_4bit",
            Grouping::TokenGroups { group_size: 128 },
            4,
        ),
        (
            "token_groups_g64_3bit",
            Grouping::TokenGroups { group_size: 64 },
            3,
        ),
        (
            "channel_all_tokens_2bit",
            Grouping::ChannelBlocks { token_block: 4096 },
            2,
        ),
    ];
    for (name, grouping, bits) in specs {
        let spec = QuantSpec {
            bits,
            grouping,
            param_dtype: ParamDtype::F16,
            clip: Clip::MinMax,
        };
        group.bench_function(format!("quantize/{name}"), |b| {
            b.iter(|| quantize(&x, &dims, spec, None).map(|q| q.codes.len()))
        });
        // The range search of `clip="mse"`: 12 candidate grids per group.
        let mse = QuantSpec {
            clip: Clip::Mse,
            ..spec
        };
        group.bench_function(format!("quantize_mse/{name}"), |b| {
            b.iter(|| quantize(&x, &dims, mse, None).map(|q| q.codes.len()))
        });
        let q = quantize(&x, &dims, spec, None).expect("benchmark data is finite");
        let mut out = vec![0f32; x.len()];
        group.bench_function(format!("dequantize/{name}"), |b| {
            b.iter(|| q.dequantize_into(&mut out))
        });
    }
    group.finish();
}

criterion_group!(benches, bench);
criterion_main!(benches);
