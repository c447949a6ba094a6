//! Data-parallel training over MPI processes with sharded optimizer state: a softmax classifier
//! on 4096 fixed random ReLU features of the handwritten digits, trained with `adamw`. Each
//! rank computes the gradient of its share of every batch; the ranks combine the shares in rank
//! order, and each updates only its share of the weights and keeps optimizer state only for it
//! (`ShardedOptimizer`), then gathers the others' shares (`gather_params`). Rank 0 checks the
//! weights against one process running the same steps with an unsharded optimizer.
//!
//! ```sh
//! cargo build --release --features mpi --example digits_mpi
//! mpirun --oversubscribe -n 3 target/release/examples/digits_mpi
//! ```

#[path = "common/digits.rs"]
#[allow(dead_code)] // the helpers of the other digits examples
mod digits;

use digits::{load, Rng, CLASSES, FEATURES};
use optc::runtime::mpi::traits::Communicator;
use optc::runtime::{
    Backend, Collective, Inputs, MpiCollective, Optimizer, ShardedOptimizer, TensorSpec,
};
use std::sync::Arc;

const TRAIN: usize = 1400;
const D: usize = 4096;
const BATCH: usize = 64;
const EPOCHS: usize = 4;

/// Fixed random ReLU features of every sample.
fn features(x: &[[f32; FEATURES]]) -> Vec<Vec<f32>> {
    let mut rng = Rng(11);
    let proj: Vec<f32> = (0..D * FEATURES)
        .map(|_| (rng.next() >> 40) as f32 / (1u64 << 24) as f32 * 0.5 - 0.25)
        .collect();
    x.iter()
        .map(|xi| {
            (0..D)
                .map(|k| {
                    let z: f32 = proj[k * FEATURES..(k + 1) * FEATURES]
                        .iter()
                        .zip(xi)
                        .map(|(a, b)| a * b)
                        .sum();
                    z.max(0.0)
                })
                .collect()
        })
        .collect()
}

fn probs(w: &[f32], phi: &[f32]) -> [f32; CLASSES] {
    let mut z = [0f32; CLASSES];
    for (c, zc) in z.iter_mut().enumerate() {
        *zc = w[c * D..(c + 1) * D]
            .iter()
            .zip(phi)
            .map(|(a, b)| a * b)
            .sum();
    }
    let m = z.iter().cloned().fold(f32::NEG_INFINITY, f32::max);
    let s: f32 = z.iter().map(|v| (v - m).exp()).sum();
    z.map(|v| (v - m).exp() / s)
}

/// The summed gradient of samples `idx`, in order.
fn block_grad(w: &[f32], phi: &[Vec<f32>], label: &[usize], idx: &[usize]) -> Vec<f32> {
    let mut g = vec![0f32; CLASSES * D];
    for &i in idx {
        let p = probs(w, &phi[i]);
        for c in 0..CLASSES {
            let d = p[c] - f32::from(u8::from(c == label[i]));
            for (o, f) in g[c * D..(c + 1) * D].iter_mut().zip(&phi[i]) {
                *o += d * f;
            }
        }
    }
    g
}

/// The batch gradient from the blocks' sums, added in rank order.
fn combine(blocks: &[Vec<f32>]) -> Vec<f32> {
    let mut g = vec![0f32; CLASSES * D];
    for b in blocks {
        for (o, v) in g.iter_mut().zip(b) {
            *o += v;
        }
    }
    g.iter_mut().for_each(|v| *v /= BATCH as f32);
    g
}

fn loss_acc(w: &[f32], phi: &[Vec<f32>], label: &[usize]) -> (f64, f64) {
    let mut loss = 0.0;
    let mut right = 0;
    for (f, &y) in phi.iter().zip(label) {
        let p = probs(w, f);
        loss -= f64::from(p[y].max(1e-30)).ln();
        let best = (0..CLASSES)
            .max_by(|&a, &b| p[a].total_cmp(&p[b]))
            .unwrap_or(0);
        right += usize::from(best == y);
    }
    (loss / phi.len() as f64, right as f64 / phi.len() as f64)
}

fn main() -> Result<(), Box<dyn std::error::Error>> {
    let (universe, _) =
        optc::runtime::mpi::initialize_with_threading(optc::runtime::mpi::Threading::Serialized)
            .ok_or("MPI did not initialize")?;
    let world = universe.world();
    let (rank, size) = (world.rank() as usize, world.size() as usize);
    let (train, test) = load(TRAIN);
    let (phi, phi_test) = (features(&train.x), features(&test.x));
    let program = Arc::new(optc::stdlib_rule("adamw").ok_or("adamw")?);
    let specs = vec![vec![TensorSpec::new("w", &[CLASSES * D])]];
    let collective = Arc::new(MpiCollective::new(universe.world()));
    let cpu = Backend::Cranelift { threads: 1 };
    let mut opt = ShardedOptimizer::<f32>::new(
        Arc::clone(&program),
        specs.clone(),
        Arc::clone(&collective) as Arc<dyn Collective>,
        cpu,
    )?;
    opt.set_hyper("lr", 1e-3)?;
    // Rank 0 also runs one process's optimizer over the same gradients, for the check.
    let mut single = (rank == 0)
        .then(|| {
            Optimizer::<f32>::lending(Arc::clone(&program), specs.clone())
                .and_then(|o| o.with_backend(cpu))
        })
        .transpose()?;
    if let Some(s) = single.as_mut() {
        s.set_hyper("lr", 1e-3)?;
    }
    let mine: usize = opt.pieces(0).iter().map(|p| p.len).sum();
    let state = opt
        .inner()
        .program()
        .info
        .buffers
        .iter()
        .filter(|b| b.role == optc::compiler::ir::BufRole::State)
        .count();
    let sizes = collective.all_gather(&[mine as f64])?;
    if rank == 0 {
        println!(
            "{size} rank(s); adamw state of {} weights ({} buffers):",
            CLASSES * D,
            state
        );
        for (r, n) in sizes.iter().enumerate() {
            println!(
                "  rank {r}: {:>6} weights, {:>7.1} KiB of state",
                n[0],
                n[0] * state as f64 * 4.0 / 1024.0
            );
        }
    }
    let mut w = vec![0f32; CLASSES * D];
    let mut w_single = w.clone();
    let mut rng = Rng(5);
    let steps_per_epoch = TRAIN / BATCH;
    for epoch in 0..EPOCHS {
        for _ in 0..steps_per_epoch {
            let batch: Vec<usize> = (0..BATCH).map(|_| rng.below(TRAIN)).collect();
            let cut = |r: usize| r * BATCH / size;
            // This rank's block of the batch, then every rank's, in rank order.
            let local = block_grad(&w, &phi, &train.label, &batch[cut(rank)..cut(rank + 1)]);
            let local64: Vec<f64> = local.iter().map(|&v| f64::from(v)).collect();
            let blocks: Vec<Vec<f32>> = collective
                .all_gather(&local64)?
                .into_iter()
                .map(|b| b.into_iter().map(|v| v as f32).collect())
                .collect();
            let g = combine(&blocks);
            opt.step_with(
                &mut [vec![&mut w[..]]],
                &Inputs::default().tensor("g", vec![&g]),
            )?;
            opt.gather_params(&mut [vec![&mut w[..]]])?;
            if let Some(s) = single.as_mut() {
                let blocks: Vec<Vec<f32>> = (0..size)
                    .map(|r| block_grad(&w_single, &phi, &train.label, &batch[cut(r)..cut(r + 1)]))
                    .collect();
                let g = combine(&blocks);
                s.step_with(
                    &mut [vec![&mut w_single[..]]],
                    &Inputs::default().tensor("g", vec![&g]),
                )?;
            }
        }
        if rank == 0 {
            let (loss, _) = loss_acc(&w, &phi, &train.label);
            let (_, acc) = loss_acc(&w, &phi_test, &test.label);
            println!(
                "epoch {}: training loss {loss:.4}, test accuracy {acc:.3}",
                epoch + 1
            );
        }
    }
    if rank == 0 {
        let same = w
            .iter()
            .zip(&w_single)
            .all(|(a, b)| a.to_bits() == b.to_bits());
        println!(
            "the weights equal one process's run bit for bit: {}",
            if same { "yes" } else { "NO" }
        );
        if !same {
            return Err("sharded and single runs differ".into());
        }
    }
    Ok(())
}
