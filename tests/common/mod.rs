//! Helpers shared by the integration tests: deterministic fills, ulp distances and the engines
//! a machine can run. Each test crate uses some of them.
#![allow(dead_code)]

/// Deterministic pseudo-random values in [-1, 1).
pub fn fill(seed: u64, n: usize) -> Vec<f32> {
    let mut x = seed
        .wrapping_mul(6364136223846793005)
        .wrapping_add(1442695040888963407);
    (0..n)
        .map(|_| {
            x = x
                .wrapping_mul(6364136223846793005)
                .wrapping_add(1442695040888963407);
            ((x >> 40) as f32 / (1u64 << 24) as f32) * 2.0 - 1.0
        })
        .collect()
}

/// Deterministic values on a grid of 1/500 in [-1, 1): `((i * 2654435761 + 97 * seed) % 1000) /
/// 500 - 1` for element `i`.
pub fn fill_grid(seed: u64, n: usize) -> Vec<f32> {
    (0..n)
        .map(|i| (((i as u64 * 2654435761 + seed * 97) % 1000) as f32 / 500.0) - 1.0)
        .collect()
}

/// Deterministic pseudo-random values in [-1, 1) from a xorshift generator.
pub fn fill_xorshift(seed: u64, n: usize) -> Vec<f32> {
    let mut x = seed.wrapping_mul(0x9e37_79b9_7f4a_7c15).wrapping_add(7);
    (0..n)
        .map(|_| {
            x ^= x << 13;
            x ^= x >> 7;
            x ^= x << 17;
            (x >> 40) as f32 / (1u64 << 23) as f32 - 1.0
        })
        .collect()
}

/// A value's bit pattern as an integer that orders like the values (-0 and +0 adjacent).
fn ordered(x: f32) -> i64 {
    let i = x.to_bits() as i32;
    if i < 0 {
        i64::from(i32::MIN) - i64::from(i)
    } else {
        i64::from(i)
    }
}

/// Distance in units in the last place (0 for equal values, including two NaNs; a NaN against a
/// number counts the distance between their bit patterns).
pub fn ulps(a: f32, b: f32) -> u64 {
    if a == b || (a.is_nan() && b.is_nan()) {
        return 0;
    }
    (ordered(a) - ordered(b)).unsigned_abs()
}

/// [`ulps`], except that a NaN against a number is as far as can be (`u64::MAX`).
pub fn ulps_nan_max(a: f32, b: f32) -> u64 {
    if a == b || (a.is_nan() && b.is_nan()) {
        return 0;
    }
    if a.is_nan() || b.is_nan() {
        return u64::MAX;
    }
    (ordered(a) - ordered(b)).unsigned_abs()
}

/// Hyperparameters that switch on every option whose code would otherwise be dead (where a rule
/// has them).
pub const OPTIONS: &[(&str, f64)] = &[
    ("max_grad_norm", 0.5),
    ("weight_decay", 0.01),
    ("momentum", 0.9),
    ("nesterov", 1.0),
    ("centered", 1.0),
    ("amsgrad", 1.0),
    ("cautious", 1.0),
    ("x_ball", 0.5),
    ("y_ball", 0.5),
    ("x_box", 0.3),
];

/// The value every scalar input (a loss) takes at step `s` of `steps`: 0.25 rising to 0.75.
pub fn scalar_input(s: f64, steps: f64) -> f64 {
    0.25 + 0.5 * (s / steps)
}

/// Whether the native engine can run here (a C compiler); without one the native checks print
/// why and pass, unless `OPTC_REQUIRE_CC=1`.
pub fn have_cc() -> bool {
    match optc::runtime::engine::native::Toolchain::find() {
        Ok(_) => true,
        Err(e) => {
            assert!(
                std::env::var("OPTC_REQUIRE_CC").as_deref() != Ok("1"),
                "OPTC_REQUIRE_CC=1 but {e}"
            );
            println!("skipping the native engine: {e}");
            false
        }
    }
}

/// The CUDA backend: a GPU when there is one, else the emulator (the generated CUDA C built by
/// the host's C++ compiler); neither prints why and passes unless `OPTC_REQUIRE_GPU=1` (a GPU)
/// or the emulator is expected (`OPTC_SKIP_CUDA_RUNTIME` unset and a C++ compiler present).
#[cfg(feature = "cuda")]
pub fn cuda_backend() -> Option<optc::runtime::Backend> {
    use optc::runtime::device::Device;
    use optc::runtime::Backend;
    if optc::runtime::cuda::driver_present().is_ok() && Device::open(0).is_ok() {
        return Some(Backend::Cuda { device: 0 });
    }
    assert!(
        std::env::var("OPTC_REQUIRE_GPU").as_deref() != Ok("1"),
        "OPTC_REQUIRE_GPU=1 but no GPU"
    );
    match Device::emulator() {
        Ok(_) => Some(Backend::CudaEmulator),
        Err(e) => {
            assert!(
                std::env::var("OPTC_SKIP_CUDA_RUNTIME").as_deref() == Ok("1"),
                "no GPU and no CUDA emulator ({e}); set OPTC_SKIP_CUDA_RUNTIME=1 to skip"
            );
            println!("skipping the CUDA backend: {e}");
            None
        }
    }
}

/// Every per-element input's tensors (of `sizes`) at step `step`, by name: deterministic fills.
pub fn input_data(
    info: &optc::compiler::ir::RuleInfo,
    sizes: &[usize],
    step: usize,
) -> Vec<(String, Vec<Vec<f32>>)> {
    info.buffers
        .iter()
        .enumerate()
        .filter(|(_, b)| b.role == optc::compiler::ir::BufRole::Input)
        .map(|(bi, b)| {
            let ts = sizes
                .iter()
                .enumerate()
                .map(|(j, &n)| fill((step * 7919 + bi * 104729 + j) as u64 + 17, n))
                .collect();
            (b.name.clone(), ts)
        })
        .collect()
}
