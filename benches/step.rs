//! The Cranelift step of adam and adan against the same rules written by hand in Rust and
//! compiled by rustc (release), over 16M elements, on 1 and 2 threads.
//!
//! Run: `cargo bench --bench step`

use criterion::{criterion_group, criterion_main, Criterion, Throughput};
use optc::runtime::{Backend, Inputs, Optimizer};
use rayon::prelude::*;
use std::sync::Arc;

const N: usize = 1 << 24;
const CHUNK: usize = 1 << 14;

fn pool(threads: usize) -> rayon::ThreadPool {
    rayon::ThreadPoolBuilder::new()
        .num_threads(threads)
        .build()
        .expect("pool")
}

/// torch.optim.Adam's later-step arithmetic (no weight decay), as in stdlib/rules/adam.opt.
fn adam_by_hand(
    pool: &rayon::ThreadPool,
    theta: &mut [f32],
    m: &mut [f32],
    v: &mut [f32],
    g: &[f32],
    t: f64,
) {
    let (lr, b1, b2, eps) = (1e-3f64, 0.9f64, 0.999f64, 1e-8f64);
    let step_size = (lr / (1.0 - b1.powf(t))) as f32;
    let bc2 = ((1.0 - b2.powf(t)).sqrt()) as f32;
    let (c1, b2f, c2, eps) = ((1.0 - b1) as f32, b2 as f32, (1.0 - b2) as f32, eps as f32);
    pool.install(|| {
        theta
            .par_chunks_mut(CHUNK)
            .zip(m.par_chunks_mut(CHUNK))
            .zip(v.par_chunks_mut(CHUNK))
            .zip(g.par_chunks(CHUNK))
            .for_each(|(((th, m), v), g)| {
                for i in 0..th.len() {
                    let gi = g[i];
                    m[i] += c1 * (gi - m[i]);
                    v[i] = b2f * v[i] + c2 * gi * gi;
                    let denom = v[i].sqrt() / bc2 + eps;
                    th[i] -= step_size * (m[i] / denom);
                }
            })
    });
}

/// Adan's later-step arithmetic (no clipping, no weight decay), as in stdlib/rules/adan.opt.
#[allow(clippy::too_many_arguments)]
fn adan_by_hand(
    pool: &rayon::ThreadPool,
    theta: &mut [f32],
    m: &mut [f32],
    v: &mut [f32],
    n: &mut [f32],
    gp: &mut [f32],
    g: &[f32],
    t: f64,
) {
    let (lr, b1, b2, b3, eps) = (1e-3f64, 0.98f64, 0.92f64, 0.99f64, 1e-8f32);
    let s1 = (lr / (1.0 - b1.powf(t))) as f32;
    let s2 = (lr * b2 / (1.0 - b2.powf(t))) as f32;
    let bc3 = (1.0 - b3.powf(t)).sqrt() as f32;
    let (c1, c2, b2f, b3f, c3) = (
        (1.0 - b1) as f32,
        (1.0 - b2) as f32,
        b2 as f32,
        b3 as f32,
        (1.0 - b3) as f32,
    );
    pool.install(|| {
        theta
            .par_chunks_mut(CHUNK)
            .zip(m.par_chunks_mut(CHUNK))
            .zip(v.par_chunks_mut(CHUNK))
            .zip(n.par_chunks_mut(CHUNK))
            .zip(gp.par_chunks_mut(CHUNK))
            .zip(g.par_chunks(CHUNK))
            .for_each(|(((((th, m), v), n), gp), g)| {
                for i in 0..th.len() {
                    let gc = g[i];
                    let diff = gc - gp[i];
                    m[i] += c1 * (gc - m[i]);
                    v[i] += c2 * (diff - v[i]);
                    let ng = b2f * diff + gc;
                    n[i] = b3f * n[i] + c3 * ng * ng;
                    let denom = n[i].sqrt() / bc3 + eps;
                    th[i] -= s1 * (m[i] / denom);
                    th[i] -= s2 * (v[i] / denom);
                    gp[i] = gc;
                }
            })
    });
}

fn bench(c: &mut Criterion) {
    let g = vec![1e-3f32; N];
    for (rule, buffers) in [("adam", 7u64), ("adan", 9u64)] {
        let mut group = c.benchmark_group(rule);
        group
            .sample_size(10)
            .measurement_time(std::time::Duration::from_secs(4))
            .throughput(Throughput::Bytes(buffers * 4 * N as u64));
        for threads in [1, 2] {
            let program = optc::stdlib_rule(rule).expect("stdlib rule");
            let mut opt = Optimizer::new(Arc::new(program), vec![vec![vec![0.5f32; N]]])
                .expect("bind")
                .with_backend(Backend::Cranelift { threads })
                .expect("jit");
            let inputs = Inputs::default().tensor("g", vec![&g]);
            opt.step(&inputs).expect("first step");
            group.bench_function(format!("optc cranelift, {threads} thread(s)"), |b| {
                b.iter(|| opt.step(&inputs).expect("step"))
            });
            let p = pool(threads);
            let (mut th, mut m, mut v, mut n, mut gp) = (
                vec![0.5f32; N],
                vec![0f32; N],
                vec![0f32; N],
                vec![0f32; N],
                vec![0f32; N],
            );
            let mut t = 1.0;
            group.bench_function(format!("rustc loop, {threads} thread(s)"), |b| {
                b.iter(|| {
                    t += 1.0;
                    if rule == "adam" {
                        adam_by_hand(&p, &mut th, &mut m, &mut v, &g, t);
                    } else {
                        adan_by_hand(&p, &mut th, &mut m, &mut v, &mut n, &mut gp, &g, t);
                    }
                })
            });
        }
        group.finish();
    }
}

criterion_group!(benches, bench);
criterion_main!(benches);
