//! Sharded optimizer state: every standard-library rule (without a sample or particle axis),
//! sharded over 1 to 4 ranks (threads with a `LocalGroup`), gives bit for bit what one optimizer
//! over the whole tensors gives — params, per-element state and scalar state — with default and
//! all-options hyperparameters, tensors split across ranks (global and per-tensor reductions
//! over pieces), empty tensors and ranks that hold nothing; parameter groups; a rank that does
//! not come makes the others fail instead of hanging.

use optc::compiler::ir::{BufRole, Program};
use optc::runtime::{
    Backend, Collective, Inputs, LocalGroup, Optimizer, ShardLayout, ShardedOptimizer, TensorSpec,
};
use std::sync::Arc;
use std::time::Duration;

mod common;
use common::{fill, scalar_input, OPTIONS};

/// Tensors split across ranks at every world size (the task size is 16384), empty ones, small
/// ones.
const SIZES: &[usize] = &[1, 2 * 16384 + 5, 0, 17, 16384 + 3, 129, 3 * 16384];
const STEPS: usize = 3;
const BACKEND: Backend = Backend::Cranelift { threads: 2 };

fn specs(program: &Program) -> Vec<Vec<TensorSpec>> {
    program
        .info
        .spaces
        .iter()
        .map(|s| {
            SIZES
                .iter()
                .enumerate()
                .map(|(j, &n)| TensorSpec::new(format!("{s}{j}"), &[n]))
                .collect()
        })
        .collect()
}

fn init(program: &Program) -> Vec<Vec<Vec<f32>>> {
    (0..program.info.spaces.len())
        .map(|s| {
            SIZES
                .iter()
                .enumerate()
                .map(|(j, &n)| fill(1000 * s as u64 + j as u64, n))
                .collect()
        })
        .collect()
}

/// Every per-element input's whole tensors at `step`, by name.
fn input_data(program: &Program, step: usize) -> Vec<(String, Vec<Vec<f32>>)> {
    common::input_data(&program.info, SIZES, step)
}

fn inputs<'a>(
    program: &Program,
    data: &'a [(String, Vec<Vec<f32>>)],
    step: usize,
) -> Inputs<'a, f32> {
    let mut inputs = Inputs::default();
    for (name, ts) in data {
        inputs = inputs.tensor(name, ts.iter().map(Vec::as_slice).collect());
    }
    for name in &program.info.scalar_inputs {
        inputs = inputs.scalar(name, scalar_input(step as f64, STEPS as f64));
    }
    inputs
}

/// What a run ends with: params, per-element state and scalar state.
#[derive(Debug, PartialEq)]
struct End {
    params: Vec<Vec<Vec<u32>>>,
    state: Vec<(String, Vec<Vec<u32>>)>,
    scalars: Vec<u64>,
}

fn bits(v: &[f32]) -> Vec<u32> {
    v.iter().map(|x| x.to_bits()).collect()
}

/// Asserts two bit patterns are equal, naming the first element that differs.
fn same(got: &[u32], want: &[u32], what: impl Fn() -> String) {
    assert_eq!(got.len(), want.len(), "{}: lengths", what());
    if let Some(i) = (0..got.len()).find(|&i| got[i] != want[i]) {
        panic!(
            "{}: element {i} is {} where one optimizer gives {}",
            what(),
            f32::from_bits(got[i]),
            f32::from_bits(want[i])
        );
    }
}

/// Group 1: the odd tensors of every space, with their own values.
fn group(program: &Program) -> Vec<String> {
    specs(program)
        .iter()
        .flatten()
        .enumerate()
        .filter(|(i, _)| i % 2 == 1)
        .map(|(_, t)| t.name.clone())
        .collect()
}

fn group_values(program: &Program, shared: &[&str]) -> Vec<(&'static str, f64)> {
    [("lr", 0.5e-3), ("weight_decay", 0.03)]
        .into_iter()
        .filter(|(h, _)| program.info.hyper(h).is_some() && !shared.contains(h))
        .collect()
}

fn single(program: &Arc<Program>, hypers: &[(&str, f64)], groups: bool) -> End {
    let mut opt = Optimizer::<f32>::lending(Arc::clone(program), specs(program))
        .expect("bind")
        .with_backend(BACKEND)
        .expect("backend");
    for (h, v) in hypers {
        if program.info.hyper(h).is_some() {
            opt.set_hyper(h, *v).expect("hyper");
        }
    }
    if groups {
        let names = group(program);
        let names: Vec<&str> = names.iter().map(String::as_str).collect();
        let shared: Vec<&str> = opt.shared_hypers();
        let values = group_values(program, &shared);
        opt.add_group(&names, &values).expect("group");
    }
    let mut params = init(program);
    for step in 0..STEPS {
        let data = input_data(program, step);
        let mut lent = lend(&mut params);
        opt.step_with(&mut lent, &inputs(program, &data, step))
            .expect("step");
    }
    let info = &program.info;
    End {
        params: params
            .iter()
            .map(|ts| ts.iter().map(|t| bits(t)).collect())
            .collect(),
        state: info
            .buffers
            .iter()
            .filter(|b| b.role == BufRole::State)
            .map(|b| {
                let ts = opt.buffer(&b.name).expect("state");
                (b.name.clone(), ts.iter().map(|t| bits(t)).collect())
            })
            .collect(),
        scalars: info
            .scalar_states
            .iter()
            .map(|n| opt.scalar_state(n).expect("scalar").to_bits())
            .collect(),
    }
}

/// One rank's run; returns its params (whole tensors, only its pieces updated), its pieces of
/// every state buffer and its scalar state.
fn rank(
    program: &Arc<Program>,
    hypers: &[(&str, f64)],
    groups: bool,
    member: Arc<dyn Collective>,
) -> (Vec<Vec<Vec<f32>>>, ShardedOptimizer<f32>) {
    let mut opt =
        ShardedOptimizer::<f32>::new(Arc::clone(program), specs(program), member, BACKEND)
            .expect("shard");
    for (h, v) in hypers {
        if program.info.hyper(h).is_some() {
            opt.set_hyper(h, *v).expect("hyper");
        }
    }
    if groups {
        let names = group(program);
        let names: Vec<&str> = names.iter().map(String::as_str).collect();
        let shared: Vec<String> = opt
            .inner()
            .shared_hypers()
            .iter()
            .map(|s| s.to_string())
            .collect();
        let shared: Vec<&str> = shared.iter().map(String::as_str).collect();
        let values = group_values(program, &shared);
        opt.add_group(&names, &values).expect("group");
    }
    let mut params = init(program);
    for step in 0..STEPS {
        let data = input_data(program, step);
        let mut lent = lend(&mut params);
        opt.step_with(&mut lent, &inputs(program, &data, step))
            .expect("step");
    }
    // Every rank's share back into this rank's whole params.
    let mut lent = lend(&mut params);
    opt.gather_params(&mut lent).expect("gather");
    (params, opt)
}

/// Checks one rank's share (its params and optimizer after the run) against the single run;
/// adds the elements it holds to `covered`.
#[allow(clippy::too_many_arguments)]
fn compare(
    name: &str,
    program: &Program,
    want: &End,
    world: usize,
    r: usize,
    params: &[Vec<Vec<f32>>],
    opt: &ShardedOptimizer<f32>,
    covered: &mut [Vec<usize>],
    gathered: bool,
) {
    let info = &program.info;
    if gathered {
        for (s, ts) in params.iter().enumerate() {
            for (j, t) in ts.iter().enumerate() {
                same(&bits(t), &want.params[s][j], || {
                    format!("{name}: world {world}, rank {r}: gathered param {s} tensor {j}")
                });
            }
        }
    }
    for (s, pieces) in opt.layout().pieces.iter().enumerate() {
        for (k, p) in pieces[r].iter().enumerate() {
            covered[s][p.tensor] += p.len;
            let got = bits(&params[s][p.tensor][p.start..p.start + p.len]);
            same(
                &got,
                &want.params[s][p.tensor][p.start..p.start + p.len],
                || {
                    format!(
                        "{name}: world {world}, rank {r}: param {s} tensor {} from {}",
                        p.tensor, p.start
                    )
                },
            );
            for (b, (sname, whole)) in info
                .buffers
                .iter()
                .filter(|b| b.role == BufRole::State)
                .zip(&want.state)
            {
                if b.space as usize != s {
                    continue;
                }
                let mine = &opt.inner().buffer(sname).expect("state")[k];
                same(
                    &bits(mine),
                    &whole[p.tensor][p.start..p.start + p.len],
                    || {
                        format!(
                            "{name}: world {world}, rank {r}: state {sname} of tensor {}",
                            p.tensor
                        )
                    },
                );
            }
        }
    }
    let scalars: Vec<u64> = info
        .scalar_states
        .iter()
        .map(|n| opt.inner().scalar_state(n).expect("scalar").to_bits())
        .collect();
    assert_eq!(
        scalars, want.scalars,
        "{name}: world {world}, rank {r}: scalar state"
    );
    assert_eq!(opt.inner().steps(), STEPS as u64);
}

/// Runs `world` ranks in threads and checks each rank's share against the single run.
fn check(name: &str, program: &Arc<Program>, hypers: &[(&str, f64)], groups: bool, world: usize) {
    let want = single(program, hypers, groups);
    let members = LocalGroup::members(world, Duration::from_secs(60));
    let handles: Vec<_> = members
        .into_iter()
        .map(|m| {
            let program = Arc::clone(program);
            let hypers: Vec<(String, f64)> =
                hypers.iter().map(|(h, v)| (h.to_string(), *v)).collect();
            std::thread::spawn(move || {
                let hypers: Vec<(&str, f64)> =
                    hypers.iter().map(|(h, v)| (h.as_str(), *v)).collect();
                rank(&program, &hypers, groups, m)
            })
        })
        .collect();
    let mut covered: Vec<Vec<usize>> = program
        .info
        .spaces
        .iter()
        .map(|_| vec![0; SIZES.len()])
        .collect();
    for (r, h) in handles.into_iter().enumerate() {
        let (params, opt) = h.join().expect("rank thread");
        compare(
            name,
            program,
            &want,
            world,
            r,
            &params,
            &opt,
            &mut covered,
            true,
        );
    }
    for (s, c) in covered.iter().enumerate() {
        assert_eq!(
            c.as_slice(),
            SIZES,
            "{name}: world {world}: space {s} is covered once"
        );
    }
}

/// Across processes: this test runs itself under `mpirun -n 1..4` (Open MPI, oversubscribed);
/// in each process every rule without an axis, default and all options, is sharded over the
/// MPI ranks and each rank's share is checked against one optimizer run in that process.
/// Without `mpirun` it says so and passes, unless `OPTC_REQUIRE_MPI=1`.
#[cfg(feature = "mpi")]
#[test]
fn sharded_over_mpi_processes_equals_one_process() {
    const CHILD: &str = "OPTC_SHARD_MPI_CHILD";
    if std::env::var_os(CHILD).is_some() {
        mpi_rank();
        return;
    }
    let have = std::process::Command::new("mpirun")
        .arg("--version")
        .output()
        .is_ok_and(|o| o.status.success());
    if !have {
        assert!(
            std::env::var("OPTC_REQUIRE_MPI").as_deref() != Ok("1"),
            "OPTC_REQUIRE_MPI=1 but there is no mpirun"
        );
        eprintln!(
            "skipped: no mpirun (install Open MPI: apt-get install openmpi-bin libopenmpi-dev)"
        );
        return;
    }
    let exe = std::env::current_exe().expect("test binary");
    for n in 1..=4 {
        let out = std::process::Command::new("mpirun")
            .args(["--oversubscribe", "-n", &n.to_string()])
            .arg(&exe)
            .args([
                "--exact",
                "sharded_over_mpi_processes_equals_one_process",
                "--nocapture",
                "--test-threads=1",
            ])
            .env(CHILD, "1")
            .env("OMPI_ALLOW_RUN_AS_ROOT", "1")
            .env("OMPI_ALLOW_RUN_AS_ROOT_CONFIRM", "1")
            .output()
            .expect("mpirun");
        let stdout = String::from_utf8_lossy(&out.stdout);
        let stderr = String::from_utf8_lossy(&out.stderr);
        assert!(
            out.status.success(),
            "mpirun -n {n} failed:\n{stdout}\n{stderr}"
        );
        let ok = stdout
            .lines()
            .filter(|l| l.contains("match one process"))
            .count();
        assert_eq!(
            ok, n,
            "mpirun -n {n}: every rank reports:\n{stdout}\n{stderr}"
        );
    }
}

/// One MPI rank of `sharded_over_mpi_processes_equals_one_process`.
#[cfg(feature = "mpi")]
fn mpi_rank() {
    use optc::runtime::mpi::traits::Communicator;
    use optc::runtime::MpiCollective;
    let universe =
        optc::runtime::mpi::initialize_with_threading(optc::runtime::mpi::Threading::Serialized)
            .expect("MPI")
            .0;
    let world = universe.world().size() as usize;
    let r = universe.world().rank() as usize;
    let mut n = 0;
    for (name, program) in rules() {
        for hypers in [&[][..], OPTIONS] {
            let want = single(&program, hypers, false);
            let member: Arc<dyn Collective> = Arc::new(MpiCollective::new(universe.world()));
            let (params, opt) = rank(&program, hypers, false, member);
            let mut covered: Vec<Vec<usize>> =
                vec![vec![0; SIZES.len()]; program.info.spaces.len()];
            compare(
                name,
                &program,
                &want,
                world,
                r,
                &params,
                &opt,
                &mut covered,
                true,
            );
            n += 1;
        }
    }
    println!("rank {r} of {world}: {n} rule configurations match one process");
}

fn rules() -> Vec<(&'static str, Arc<Program>)> {
    optc::stdlib::names()
        .filter_map(|n| {
            let p = optc::stdlib_rule(n).expect("stdlib");
            p.axis_form.is_none().then(|| (n, Arc::new(p)))
        })
        .collect()
}

#[test]
fn every_rule_sharded_equals_one_optimizer_bit_for_bit() {
    let rules = rules();
    assert!(rules.len() >= 20, "{} rules", rules.len());
    for (name, program) in &rules {
        for world in 1..=4 {
            check(name, program, &[], false, world);
            check(name, program, OPTIONS, false, world);
        }
    }
}

#[test]
fn parameter_groups_follow_whole_tensors() {
    for name in ["adamw", "lamb", "sgd", "adagrad_norm", "lion"] {
        let program = Arc::new(optc::stdlib_rule(name).expect("stdlib"));
        for world in [2, 3] {
            check(name, &program, OPTIONS, true, world);
        }
    }
}

#[test]
fn layout_cuts_on_task_boundaries_and_balances() {
    let lens = vec![SIZES.to_vec()];
    let total: usize = SIZES.iter().sum();
    for world in 1..=6 {
        let l = ShardLayout::new(lens.clone(), world);
        assert_eq!(l.ranks(), world);
        let mut next = vec![0usize; SIZES.len()];
        for r in 0..world {
            let mut last_tensor = None;
            for p in &l.pieces[0][r] {
                assert_eq!(p.start % 16384, 0, "a piece starts on a task boundary");
                assert_eq!(p.start, next[p.tensor], "pieces are in order, without gaps");
                assert!(
                    Some(p.tensor) > last_tensor,
                    "one piece per tensor per rank"
                );
                last_tensor = Some(p.tensor);
                next[p.tensor] += p.len;
            }
            // no rank holds more than its share plus one task
            assert!(
                l.elements(r) <= total / world + 16384,
                "rank {r} of {world}: {}",
                l.elements(r)
            );
        }
        assert_eq!(next, SIZES);
    }
}

#[test]
fn a_missing_rank_is_an_error_not_a_hang() {
    let program = Arc::new(optc::stdlib_rule("lamb").expect("stdlib"));
    let members = LocalGroup::members(2, Duration::from_millis(300));
    let mut opt = ShardedOptimizer::<f32>::new(
        Arc::clone(&program),
        specs(&program),
        Arc::clone(&members[0]) as Arc<dyn Collective>,
        BACKEND,
    )
    .expect("shard");
    let mut params = init(&program);
    let data = input_data(&program, 0);
    let mut lent = lend(&mut params);
    // rank 1 never steps: lamb's norms need its partials
    let err = opt
        .step_with(&mut lent, &inputs(&program, &data, 0))
        .expect_err("rank 1 is missing");
    assert!(err.to_string().contains("timed out"), "{err}");
}

#[test]
fn bad_whole_tensors_are_refused_before_anything_runs() {
    let program = Arc::new(optc::stdlib_rule("adam").expect("stdlib"));
    let members = LocalGroup::members(1, Duration::from_secs(5));
    let mut opt = ShardedOptimizer::<f32>::new(
        Arc::clone(&program),
        specs(&program),
        Arc::clone(&members[0]) as Arc<dyn Collective>,
        BACKEND,
    )
    .expect("shard");
    let mut params = init(&program);
    params[0][3].pop();
    let data = input_data(&program, 0);
    let mut lent = lend(&mut params);
    let err = opt
        .step_with(&mut lent, &inputs(&program, &data, 0))
        .expect_err("short tensor");
    assert!(err.to_string().contains("theta3"), "{err}");
    assert_eq!(opt.inner().steps(), 0);
    let err = ShardedOptimizer::<f32>::new(
        Arc::clone(&program),
        specs(&program),
        Arc::clone(&members[0]) as Arc<dyn Collective>,
        Backend::Interpreter,
    )
    .expect_err("interpreter");
    assert!(err.to_string().contains("cranelift or native"), "{err}");
}

/// Whole params, `[space][tensor]`.
type Params = Vec<Vec<Vec<f32>>>;

/// The whole params as the slices a step borrows.
fn lend(params: &mut [Vec<Vec<f32>>]) -> Vec<Vec<&mut [f32]>> {
    params
        .iter_mut()
        .map(|ts| ts.iter_mut().map(Vec::as_mut_slice).collect())
        .collect()
}

/// Runs steps `from..to` of `opt` over the whole `params`.
fn steps(
    program: &Program,
    opt: &mut ShardedOptimizer<f32>,
    params: &mut [Vec<Vec<f32>>],
    from: usize,
    to: usize,
) {
    for step in from..to {
        let data = input_data(program, step);
        let mut lent = lend(params);
        opt.step_with(&mut lent, &inputs(program, &data, step))
            .expect("step");
    }
}

/// `world` ranks in threads, each running `f(rank optimizer, whole params)`; returns what they
/// return, in rank order.
fn ranks<R: Send + 'static>(
    program: &Arc<Program>,
    world: usize,
    f: impl Fn(&mut ShardedOptimizer<f32>, &mut Vec<Vec<Vec<f32>>>) -> R + Send + Sync + 'static,
) -> Vec<(R, Params, ShardedOptimizer<f32>)> {
    let f = Arc::new(f);
    let handles: Vec<_> = LocalGroup::members(world, Duration::from_secs(60))
        .into_iter()
        .map(|m| {
            let program = Arc::clone(program);
            let f = Arc::clone(&f);
            std::thread::spawn(move || {
                let mut opt =
                    ShardedOptimizer::<f32>::new(Arc::clone(&program), specs(&program), m, BACKEND)
                        .expect("shard");
                for (h, v) in OPTIONS {
                    if program.info.hyper(h).is_some() {
                        opt.set_hyper(h, *v).expect("hyper");
                    }
                }
                let names = group(&program);
                let names: Vec<&str> = names.iter().map(String::as_str).collect();
                let shared: Vec<String> = opt
                    .inner()
                    .shared_hypers()
                    .iter()
                    .map(|s| s.to_string())
                    .collect();
                let shared: Vec<&str> = shared.iter().map(String::as_str).collect();
                opt.add_group(&names, &group_values(&program, &shared))
                    .expect("group");
                let mut params = init(&program);
                let r = f(&mut opt, &mut params);
                (r, params, opt)
            })
        })
        .collect();
    handles
        .into_iter()
        .map(|h| h.join().expect("rank"))
        .collect()
}

#[test]
fn checkpoints_per_rank_reshard_to_any_world_size() {
    for name in ["lamb", "adan", "adagrad_norm", "spsa"] {
        let program = Arc::new(optc::stdlib_rule(name).expect("stdlib"));
        let want = single(&program, OPTIONS, true);
        for (before, after) in [(4, 2), (4, 1), (2, 4), (3, 3), (1, 3)] {
            // `before` ranks take two steps and save; their pieces of the params are the params.
            let p = Arc::clone(&program);
            let saved = ranks(&program, before, move |opt, params| {
                steps(&p, opt, params, 0, 2);
                opt.checkpoint_bytes().expect("save")
            });
            let mut params = init(&program);
            let mut files = Vec::new();
            for (r, (file, ps, opt)) in saved.into_iter().enumerate() {
                for (s, pieces) in opt.layout().pieces.iter().enumerate() {
                    for piece in &pieces[r] {
                        let range = piece.start..piece.start + piece.len;
                        params[s][piece.tensor][range.clone()]
                            .copy_from_slice(&ps[s][piece.tensor][range]);
                    }
                }
                files.push(file);
            }
            // `after` ranks load every file and take the last step.
            let files = Arc::new(files);
            let whole = Arc::new(params);
            let p = Arc::clone(&program);
            let resumed = ranks(&program, after, move |opt, params| {
                *params = (*whole).clone();
                let refs: Vec<&[u8]> = files.iter().map(Vec::as_slice).collect();
                opt.load_checkpoints(&refs).expect("load");
                assert_eq!(opt.inner().steps(), 2);
                steps(&p, opt, params, 2, 3);
            });
            let mut covered: Vec<Vec<usize>> = program
                .info
                .spaces
                .iter()
                .map(|_| vec![0; SIZES.len()])
                .collect();
            for (r, ((), params, opt)) in resumed.into_iter().enumerate() {
                let what = format!("{name} saved at {before} ranks, resumed at {after}");
                compare(
                    &what,
                    &program,
                    &want,
                    after,
                    r,
                    &params,
                    &opt,
                    &mut covered,
                    false,
                );
            }
        }
    }
}

#[test]
fn a_partial_or_foreign_set_of_checkpoints_changes_nothing() {
    let program = Arc::new(optc::stdlib_rule("lamb").expect("stdlib"));
    let p = Arc::clone(&program);
    let saved = ranks(&program, 2, move |opt, params| {
        steps(&p, opt, params, 0, 1);
        opt.checkpoint_bytes().expect("save")
    });
    let files: Vec<Vec<u8>> = saved.into_iter().map(|(f, _, _)| f).collect();
    let adam = Arc::new(optc::stdlib_rule("adam").expect("stdlib"));
    let members = LocalGroup::members(1, Duration::from_secs(5));
    let mut opt = ShardedOptimizer::<f32>::new(
        Arc::clone(&program),
        specs(&program),
        Arc::clone(&members[0]) as Arc<dyn Collective>,
        BACKEND,
    )
    .expect("shard");
    // one rank's file of two: elements are missing
    let err = opt.load_checkpoints(&[&files[0]]).expect_err("partial");
    assert!(err.to_string().contains("pass every rank's file"), "{err}");
    // a damaged file
    let mut bad = files[1].clone();
    let at = bad.len() - 3;
    bad[at] ^= 1;
    let err = opt
        .load_checkpoints(&[&files[0], &bad])
        .expect_err("damaged");
    assert!(err.to_string().contains("checksum"), "{err}");
    assert_eq!(opt.inner().steps(), 0);
    // another rule's optimizer
    let mut other = ShardedOptimizer::<f32>::new(
        Arc::clone(&adam),
        specs(&adam),
        Arc::clone(&members[0]) as Arc<dyn Collective>,
        BACKEND,
    )
    .expect("shard");
    assert!(other.load_checkpoints(&[&files[0], &files[1]]).is_err());
    assert_eq!(other.inner().steps(), 0);
}

#[test]
fn a_rank_failing_its_checks_fails_every_rank_with_nothing_changed() {
    let program = Arc::new(optc::stdlib_rule("lamb").expect("stdlib"));
    // rank 1 gives a short tensor (the shard's own checks); rank 2 an input the rule does not
    // have (the optimizer's checks); rank 0 is fine.
    let handles: Vec<_> = LocalGroup::members(3, Duration::from_secs(30))
        .into_iter()
        .enumerate()
        .map(|(r, m)| {
            let program = Arc::clone(&program);
            std::thread::spawn(move || {
                let mut opt =
                    ShardedOptimizer::<f32>::new(Arc::clone(&program), specs(&program), m, BACKEND)
                        .expect("shard");
                let mut params = init(&program);
                let before = params.clone();
                let mut data = input_data(&program, 0);
                if r == 1 {
                    data[0].1[1].pop();
                }
                let mut inputs = inputs(&program, &data, 0);
                if r == 2 {
                    inputs = inputs.tensor("nope", vec![&[][..]; SIZES.len()]);
                }
                let mut lent = lend(&mut params);
                let err = opt.step_with(&mut lent, &inputs).expect_err("refused");
                assert_eq!(params, before, "rank {r}: params unchanged");
                assert_eq!(opt.inner().steps(), 0);
                for b in program
                    .info
                    .buffers
                    .iter()
                    .filter(|b| b.role == BufRole::State)
                {
                    let zero = opt
                        .inner()
                        .buffer(&b.name)
                        .expect("state")
                        .iter()
                        .flatten()
                        .all(|&x| x == 0.0);
                    assert!(zero, "rank {r}: state {} unchanged", b.name);
                }
                err.to_string()
            })
        })
        .collect();
    let errs: Vec<String> = handles
        .into_iter()
        .map(|h| h.join().expect("rank"))
        .collect();
    assert!(
        errs[0].contains("rank(s) 1, 2 refused the step"),
        "{}",
        errs[0]
    );
    assert!(errs[1].contains("g"), "{}", errs[1]);
    assert!(errs[2].contains("nope"), "{}", errs[2]);
}
