//! A sharded optimizer over MPI ranks: each rank's state bytes, the bytes the ranks exchange per
//! step, and the step time, for one rule over whole tensors every rank holds (data parallel).
//!
//! ```sh
//! cargo build --release --features mpi --example shard_bench
//! mpirun --oversubscribe -n 4 target/release/examples/shard_bench [--rule lamb] [--elems 67108864] [--tensors 8] [--steps 5]
//! ```
//! Rank 0 prints one line per rank and a summary; the step time is the slowest rank's median.

use optc::runtime::mpi::traits::Communicator;
use optc::runtime::{
    Backend, Collective, Error, Inputs, MpiCollective, ShardedOptimizer, TensorSpec,
};
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Arc;
use std::time::Instant;

/// A collective that counts the bytes this rank sends and receives.
#[derive(Debug)]
struct Counting {
    inner: MpiCollective,
    sent: AtomicU64,
    received: AtomicU64,
}

impl Collective for Counting {
    fn rank(&self) -> usize {
        self.inner.rank()
    }
    fn size(&self) -> usize {
        self.inner.size()
    }
    fn all_gather(&self, local: &[f64]) -> Result<Vec<Vec<f64>>, Error> {
        let all = self.inner.all_gather(local)?;
        self.sent
            .fetch_add(8 * local.len() as u64, Ordering::Relaxed);
        let got: usize = all.iter().map(Vec::len).sum::<usize>() - local.len();
        self.received.fetch_add(8 * got as u64, Ordering::Relaxed);
        Ok(all)
    }
}

fn arg(args: &[String], name: &str, default: &str) -> String {
    args.iter()
        .position(|a| a == name)
        .and_then(|i| args.get(i + 1))
        .cloned()
        .unwrap_or_else(|| default.to_string())
}

fn main() -> Result<(), Box<dyn std::error::Error>> {
    let args: Vec<String> = std::env::args().collect();
    let rule = arg(&args, "--rule", "lamb");
    let elems: usize = arg(&args, "--elems", "67108864").parse()?;
    let tensors: usize = arg(&args, "--tensors", "8").parse::<usize>()?.max(1);
    let steps: usize = arg(&args, "--steps", "5").parse::<usize>()?.max(1);
    let (universe, _) =
        optc::runtime::mpi::initialize_with_threading(optc::runtime::mpi::Threading::Serialized)
            .ok_or("MPI did not initialize")?;
    let world = universe.world();
    let (rank, size) = (world.rank() as usize, world.size() as usize);
    let program = Arc::new(optc::stdlib_rule(&rule).ok_or("no such stdlib rule")?);
    let per = elems / tensors;
    let lens: Vec<usize> = (0..tensors)
        .map(|j| {
            if j + 1 == tensors {
                elems - per * (tensors - 1)
            } else {
                per
            }
        })
        .collect();
    let specs: Vec<Vec<TensorSpec>> = program
        .info
        .spaces
        .iter()
        .map(|s| {
            lens.iter()
                .enumerate()
                .map(|(j, &n)| TensorSpec::new(format!("{s}{j}"), &[n]))
                .collect()
        })
        .collect();
    let counting = Arc::new(Counting {
        inner: MpiCollective::new(universe.world()),
        sent: AtomicU64::new(0),
        received: AtomicU64::new(0),
    });
    let threads = std::thread::available_parallelism().map_or(1, |n| n.get()) / size;
    let mut opt = ShardedOptimizer::<f32>::new(
        Arc::clone(&program),
        specs,
        Arc::clone(&counting) as Arc<dyn Collective>,
        Backend::Auto {
            threads: threads.max(1),
        },
    )?;
    let mut params: Vec<Vec<Vec<f32>>> = program
        .info
        .spaces
        .iter()
        .map(|_| lens.iter().map(|&n| vec![0.5f32; n]).collect())
        .collect();
    let grads: Vec<Vec<f32>> = lens.iter().map(|&n| vec![1e-3f32; n]).collect();
    let info = &program.info;
    let state_buffers = info
        .buffers
        .iter()
        .filter(|b| b.role == optc::compiler::ir::BufRole::State)
        .count();
    let mut times = Vec::new();
    for step in 0..=steps {
        let mut inputs = Inputs::default();
        for b in info
            .buffers
            .iter()
            .filter(|b| b.role == optc::compiler::ir::BufRole::Input)
        {
            inputs = inputs.tensor(&b.name, grads.iter().map(Vec::as_slice).collect());
        }
        for s in &info.scalar_inputs {
            inputs = inputs.scalar(s, 0.5);
        }
        let mut lent: Vec<Vec<&mut [f32]>> = params
            .iter_mut()
            .map(|ts| ts.iter_mut().map(Vec::as_mut_slice).collect())
            .collect();
        counting.inner.all_gather(&[])?; // start together
        let t0 = Instant::now();
        opt.step_with(&mut lent, &inputs)?;
        if step > 0 {
            times.push(t0.elapsed().as_secs_f64() * 1e3);
        }
        if step == 0 {
            counting.sent.store(0, Ordering::Relaxed);
            counting.received.store(0, Ordering::Relaxed);
        }
    }
    times.sort_by(f64::total_cmp);
    let median = times[times.len() / 2];
    let mine: usize = (0..info.spaces.len())
        .map(|s| opt.pieces(s).iter().map(|p| p.len).sum::<usize>())
        .sum();
    let state_bytes = (mine * state_buffers * 4) as f64;
    let sent = counting.sent.load(Ordering::Relaxed) as f64 / steps as f64;
    let received = counting.received.load(Ordering::Relaxed) as f64 / steps as f64;
    let all = counting
        .inner
        .all_gather(&[mine as f64, state_bytes, sent, received, median])?;
    if rank == 0 {
        println!(
            "{rule}: {elems} f32 elements in {tensors} tensors, {size} rank(s), {} thread(s) each, median of {steps} steps",
            threads.max(1)
        );
        for (r, v) in all.iter().enumerate() {
            println!(
                "  rank {r}: {:>10} elements, state {:>8.1} MiB, sends {:>6.0} B and receives {:>6.0} B a step, step {:>8.2} ms",
                v[0],
                v[1] / (1 << 20) as f64,
                v[2],
                v[3],
                v[4]
            );
        }
        let slowest = all.iter().map(|v| v[4]).fold(0.0, f64::max);
        let total_state: f64 = all.iter().map(|v| v[1]).sum();
        println!(
            "  state in all {:.1} MiB ({:.1} MiB a rank at most); step {:.2} ms (the slowest rank)",
            total_state / (1 << 20) as f64,
            all.iter().map(|v| v[1]).fold(0.0, f64::max) / (1 << 20) as f64,
            slowest
        );
    }
    Ok(())
}
