//! Schedules: a hyperparameter's value as a function of the step.
//!
//! A [`Schedule`] gives a *factor* for each step `t` (1-based); the value a step uses is the
//! hyperparameter's base value times the factor, as torch's `LambdaLR` does. Schedules compose:
//! `warmup(100) then cosine(900, 0.1)` runs the warmup for 100 steps, then the cosine over the next
//! 900 with its own step count. The same text is accepted by [`Schedule::parse`], by
//! `optc run --schedule lr=...`, and stored in checkpoints.
//!
//! | text | factor at step t |
//! |---|---|
//! | `constant` | 1 |
//! | `warmup(n)`, `warmup(n, s)` | linear from `s` (default 0) at t = 0 to 1 at t = n, then 1 |
//! | `linear(a, b, n)` | linear from `a` at t = 0 to `b` at t = n, then `b` |
//! | `linear_decay(n)` | `max(0, 1 - t / n)` |
//! | `cosine(n)`, `cosine(n, m)` | `m + (1 - m) (1 + cos(pi min(t, n) / n)) / 2` |
//! | `step(k, g)` | `g ^ floor(t / k)` |
//! | `piecewise(t1: f1, t2: f2, ...)` | linear between the points, constant outside |
//! | `batch_scale(b, b0)`, `batch_scale(b, b0, sqrt)` | `b / b0`, or `sqrt(b / b0)` |
//! | `A * B` | `A`'s factor times `B`'s (binds tighter than `then`) |
//! | `A then B` | `A` for its length, then `B` counting from 1 again |
//!
//! `batch_scale` is the learning rate as a function of the batch size (Granziol et al., 2020,
//! "Learning Rates as a Function of Batch Size"): linear in `b / b0` for SGD, by its square root
//! for Adam-type rules, from a base learning rate tuned at batch size `b0`; it composes with any
//! schedule (`batch_scale(1024, 256, sqrt) * cosine(1000)`) and applies to any rule's `lr`.
//!
//! [`Schedule::refined`] computes the schedule of Defazio et al. (2023) from observed gradient
//! norms.

use std::fmt;

/// A factor per step.
#[derive(Debug, Clone, PartialEq)]
pub enum Schedule {
    /// Always 1.
    Constant,
    /// From `start` to 1 over `steps`.
    Warmup {
        /// Steps of the warmup.
        steps: u64,
        /// Factor at step 0.
        start: f64,
    },
    /// From `from` to `to` over `steps`.
    Linear {
        /// Factor at step 0.
        from: f64,
        /// Factor from step `steps` on.
        to: f64,
        /// Length.
        steps: u64,
    },
    /// `1 - t / total`, floored at 0.
    LinearDecay {
        /// The step where it reaches 0.
        total: u64,
    },
    /// Cosine from 1 to `min` over `total` steps.
    Cosine {
        /// Length.
        total: u64,
        /// Final factor.
        min: f64,
    },
    /// Multiply by `gamma` every `every` steps.
    Step {
        /// Period.
        every: u64,
        /// Factor per period.
        gamma: f64,
    },
    /// Linear interpolation between (step, factor) points, sorted by step.
    Piecewise(Vec<(u64, f64)>),
    /// The first schedule for its length, then the second (counting from 1 again).
    Then(Box<Schedule>, Box<Schedule>),
    /// The product of two schedules' factors.
    Times(Box<Schedule>, Box<Schedule>),
    /// The learning rate at batch size `batch` from one tuned at `base`: `batch / base`, or its
    /// square root.
    BatchScale {
        /// The batch size used.
        batch: f64,
        /// The batch size the base value was tuned at.
        base: f64,
        /// Scale by the square root (Adam-type rules) instead of linearly (SGD).
        sqrt: bool,
    },
}

/// A schedule that cannot be built.
#[derive(Debug, Clone, PartialEq, thiserror::Error)]
#[error("schedule `{text}`: {why}")]
pub struct ScheduleError {
    /// The text given.
    pub text: String,
    /// What is wrong.
    pub why: String,
}

impl Schedule {
    /// How many steps the schedule runs before a following one takes over (for `then`).
    pub fn length(&self) -> Option<u64> {
        match self {
            Schedule::Constant | Schedule::Step { .. } | Schedule::BatchScale { .. } => None,
            Schedule::Times(a, b) => match (a.length(), b.length()) {
                (Some(x), Some(y)) => Some(x.max(y)),
                (x, None) | (None, x) => x,
            },
            Schedule::Warmup { steps, .. } | Schedule::Linear { steps, .. } => Some(*steps),
            Schedule::LinearDecay { total } | Schedule::Cosine { total, .. } => Some(*total),
            Schedule::Piecewise(points) => points.last().map(|p| p.0),
            Schedule::Then(a, b) => Some(a.length()? + b.length()?),
        }
    }

    /// The factor at step `t` (1-based).
    pub fn factor(&self, t: u64) -> f64 {
        let tf = t as f64;
        match self {
            Schedule::Constant => 1.0,
            Schedule::Warmup { steps, start } => {
                if t >= *steps || *steps == 0 {
                    1.0
                } else {
                    start + (1.0 - start) * tf / *steps as f64
                }
            }
            Schedule::Linear { from, to, steps } => {
                if t >= *steps || *steps == 0 {
                    *to
                } else {
                    from + (to - from) * tf / *steps as f64
                }
            }
            Schedule::LinearDecay { total } => (1.0 - tf / *total as f64).max(0.0),
            Schedule::Cosine { total, min } => {
                let x = tf.min(*total as f64) / *total as f64;
                min + (1.0 - min) * 0.5 * (1.0 + (std::f64::consts::PI * x).cos())
            }
            Schedule::Step { every, gamma } => gamma.powf((t / every) as f64),
            Schedule::Piecewise(points) => {
                let Some(&(t0, f0)) = points.first() else {
                    return 1.0;
                };
                if t <= t0 {
                    return f0;
                }
                // The first point at or after `t` (binary search: refined schedules have a
                // point per step).
                let j = points.partition_point(|p| p.0 < t);
                match (points.get(j.wrapping_sub(1)), points.get(j)) {
                    (Some(&(a, fa)), Some(&(b, fb))) => {
                        fa + (fb - fa) * (t - a) as f64 / (b - a).max(1) as f64
                    }
                    _ => points.last().map_or(1.0, |p| p.1),
                }
            }
            Schedule::Then(a, b) => match a.length() {
                Some(n) if t > n => b.factor(t - n),
                _ => a.factor(t),
            },
            Schedule::Times(a, b) => a.factor(t) * b.factor(t),
            Schedule::BatchScale { batch, base, sqrt } => {
                let r = batch / base;
                if *sqrt {
                    r.sqrt()
                } else {
                    r
                }
            }
        }
    }

    /// The learning-rate factor for batch size `batch` from a value tuned at batch size `base`:
    /// `batch / base` (SGD), or with `sqrt` its square root (Adam-type rules). Both sizes must be
    /// positive and finite.
    pub fn batch_scale(batch: f64, base: f64, sqrt: bool) -> Result<Schedule, ScheduleError> {
        if !(batch.is_finite() && base.is_finite() && batch > 0.0 && base > 0.0) {
            return Err(ScheduleError {
                text: format!("batch_scale({batch}, {base})"),
                why: "batch sizes must be positive and finite".into(),
            });
        }
        Ok(Schedule::BatchScale { batch, base, sqrt })
    }

    /// This schedule's factor times `other`'s.
    pub fn times(self, other: Schedule) -> Schedule {
        Schedule::Times(Box::new(self), Box::new(other))
    }

    /// Parses the text form (see the module documentation).
    pub fn parse(text: &str) -> Result<Schedule, ScheduleError> {
        let bad = |why: String| ScheduleError {
            text: text.to_string(),
            why,
        };
        let parts: Vec<&str> = text.split(" then ").map(str::trim).collect();
        let mut schedules = parts
            .iter()
            .map(|p| {
                let mut factors = p
                    .split(" * ")
                    .map(|f| Self::parse_one(f.trim()))
                    .collect::<Result<Vec<_>, _>>()?;
                let mut out = factors.pop().expect("split gives at least one part");
                while let Some(f) = factors.pop() {
                    out = Schedule::Times(Box::new(f), Box::new(out));
                }
                Ok(out)
            })
            .collect::<Result<Vec<_>, String>>()
            .map_err(&bad)?;
        for s in &schedules[..schedules.len() - 1] {
            if s.length().is_none() {
                return Err(bad(format!(
                    "`{s}` never ends, so nothing can follow it with `then`"
                )));
            }
        }
        let mut out = schedules.pop().expect("split gives at least one part");
        while let Some(s) = schedules.pop() {
            out = Schedule::Then(Box::new(s), Box::new(out));
        }
        Ok(out)
    }

    fn parse_one(text: &str) -> Result<Schedule, String> {
        let (name, args) = match text.split_once('(') {
            Some((n, rest)) => {
                let inner = rest
                    .strip_suffix(')')
                    .ok_or_else(|| format!("`{text}`: missing `)`"))?;
                (
                    n.trim(),
                    inner
                        .split(',')
                        .map(str::trim)
                        .filter(|a| !a.is_empty())
                        .collect::<Vec<_>>(),
                )
            }
            None => (text.trim(), Vec::new()),
        };
        let num = |s: &str| {
            s.parse::<f64>()
                .ok()
                .filter(|v| v.is_finite())
                .ok_or_else(|| format!("`{s}` is not a number"))
        };
        let steps = |s: &str| {
            s.parse::<u64>()
                .ok()
                .filter(|&v| v > 0)
                .ok_or_else(|| format!("`{s}` is not a positive whole number of steps"))
        };
        let arity = |lo: usize, hi: usize| {
            if args.len() < lo || args.len() > hi {
                Err(format!(
                    "`{name}` takes {} argument(s), got {}",
                    if lo == hi {
                        lo.to_string()
                    } else {
                        format!("{lo} to {hi}")
                    },
                    args.len()
                ))
            } else {
                Ok(())
            }
        };
        Ok(match name {
            "constant" => {
                arity(0, 0)?;
                Schedule::Constant
            }
            "warmup" => {
                arity(1, 2)?;
                Schedule::Warmup { steps: steps(args[0])?, start: args.get(1).map_or(Ok(0.0), |a| num(a))? }
            }
            "linear" => {
                arity(3, 3)?;
                Schedule::Linear { from: num(args[0])?, to: num(args[1])?, steps: steps(args[2])? }
            }
            "linear_decay" => {
                arity(1, 1)?;
                Schedule::LinearDecay { total: steps(args[0])? }
            }
            "cosine" => {
                arity(1, 2)?;
                Schedule::Cosine { total: steps(args[0])?, min: args.get(1).map_or(Ok(0.0), |a| num(a))? }
            }
            "step" => {
                arity(2, 2)?;
                Schedule::Step { every: steps(args[0])?, gamma: num(args[1])? }
            }
            "piecewise" => {
                if args.is_empty() {
                    return Err("`piecewise` needs at least one `step: factor` point".into());
                }
                let mut points = Vec::new();
                for a in &args {
                    let (t, f) = a.split_once(':').ok_or_else(|| format!("`{a}`: expected `step: factor`"))?;
                    let t = t.trim().parse::<u64>().map_err(|_| format!("`{t}` is not a step"))?;
                    points.push((t, num(f.trim())?));
                }
                if points.windows(2).any(|w| w[1].0 <= w[0].0) {
                    return Err("`piecewise` points must have increasing steps".into());
                }
                Schedule::Piecewise(points)
            }
            "batch_scale" => {
                arity(2, 3)?;
                let sqrt = match args.get(2).copied() {
                    None | Some("linear") => false,
                    Some("sqrt") => true,
                    Some(other) => return Err(format!("`{other}`: the scaling is `linear` or `sqrt`")),
                };
                let (b, b0) = (num(args[0])?, num(args[1])?);
                if b <= 0.0 || b0 <= 0.0 {
                    return Err("batch sizes must be positive".into());
                }
                Schedule::BatchScale { batch: b, base: b0, sqrt }
            }
            other => return Err(format!("unknown schedule `{other}` (known: constant, warmup, linear, linear_decay, cosine, step, piecewise, batch_scale)")),
        })
    }

    /// The refined schedule of Defazio et al. (2023), "When, Why and How Much", from the gradient
    /// norms `norms[t-1]` observed at steps `t = 1..=T` of an earlier run: median-filter the norms
    /// with width `2 floor(tau T / 2) + 1`, weight each step by `w_t = g_t^-2` (`l1`: `g_t^-1`, for
    /// Adam-like rules), set `eta_t = w_t * sum_{p > t} w_p`, and normalize to a maximum of 1
    /// (so `eta_T = 0`). Constant norms give exactly a linear decay.
    pub fn refined(norms: &[f64], tau: f64, l1: bool) -> Result<Schedule, ScheduleError> {
        let bad = |why: &str| ScheduleError {
            text: "refined".into(),
            why: why.into(),
        };
        if norms.is_empty() {
            return Err(bad("needs at least one gradient norm"));
        }
        if norms.iter().any(|n| !n.is_finite() || *n <= 0.0) {
            return Err(bad("gradient norms must be positive and finite"));
        }
        let t_total = norms.len();
        let half = ((tau * t_total as f64 / 2.0).floor() as usize).min(t_total);
        let smoothed = sliding_medians(norms, half);
        let w: Vec<f64> = smoothed
            .iter()
            .map(|g| if l1 { 1.0 / g } else { 1.0 / (g * g) })
            .collect();
        let mut eta = vec![0.0; t_total];
        let mut tail = 0.0;
        for t in (0..t_total).rev() {
            eta[t] = w[t] * tail;
            tail += w[t];
        }
        let max = eta.iter().cloned().fold(0.0, f64::max);
        if max <= 0.0 {
            return Ok(Schedule::Piecewise(vec![(1, 1.0)]));
        }
        Ok(Schedule::Piecewise(
            eta.iter()
                .enumerate()
                .map(|(i, e)| (i as u64 + 1, e / max))
                .collect(),
        ))
    }
}

/// The median of `v[i - half ..= i + half]` (clipped to `v`) for every `i`, in O(n log n): the
/// window's values are counted in a Fenwick tree over their ranks, and each median is found by
/// descending the tree.
fn sliding_medians(v: &[f64], half: usize) -> Vec<f64> {
    let n = v.len();
    let mut order: Vec<usize> = (0..n).collect();
    order.sort_by(|&a, &b| v[a].total_cmp(&v[b]).then(a.cmp(&b)));
    let mut rank = vec![0usize; n];
    for (r, &i) in order.iter().enumerate() {
        rank[i] = r;
    }
    let mut tree = vec![0i64; n + 1];
    let update = |tree: &mut [i64], r: usize, d: i64| {
        let mut k = r + 1;
        while k <= n {
            tree[k] += d;
            k += k & k.wrapping_neg();
        }
    };
    // The value of rank k (0-based) among those counted.
    let kth = |tree: &[i64], k: usize| -> f64 {
        let (mut pos, mut left) = (0usize, k as i64);
        let mut step = n.next_power_of_two();
        while step > 0 {
            if pos + step <= n && tree[pos + step] <= left {
                pos += step;
                left -= tree[pos];
            }
            step /= 2;
        }
        v[order[pos]]
    };
    let (mut lo, mut hi) = (0usize, 0usize);
    (0..n)
        .map(|i| {
            let (want_lo, want_hi) = (i.saturating_sub(half), (i + half + 1).min(n));
            while hi < want_hi {
                update(&mut tree, rank[hi], 1);
                hi += 1;
            }
            while lo < want_lo {
                update(&mut tree, rank[lo], -1);
                lo += 1;
            }
            let m = hi - lo;
            if m % 2 == 1 {
                kth(&tree, m / 2)
            } else {
                0.5 * (kth(&tree, m / 2 - 1) + kth(&tree, m / 2))
            }
        })
        .collect()
}

impl fmt::Display for Schedule {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            Schedule::Constant => write!(f, "constant"),
            Schedule::Warmup { steps, start } => write!(f, "warmup({steps}, {start:?})"),
            Schedule::Linear { from, to, steps } => write!(f, "linear({from:?}, {to:?}, {steps})"),
            Schedule::LinearDecay { total } => write!(f, "linear_decay({total})"),
            Schedule::Cosine { total, min } => write!(f, "cosine({total}, {min:?})"),
            Schedule::Step { every, gamma } => write!(f, "step({every}, {gamma:?})"),
            Schedule::Piecewise(points) => {
                write!(f, "piecewise(")?;
                for (i, (t, v)) in points.iter().enumerate() {
                    write!(f, "{}{t}: {v:?}", if i > 0 { ", " } else { "" })?;
                }
                write!(f, ")")
            }
            Schedule::Then(a, b) => write!(f, "{a} then {b}"),
            Schedule::Times(a, b) => write!(f, "{a} * {b}"),
            Schedule::BatchScale { batch, base, sqrt } => write!(
                f,
                "batch_scale({batch:?}, {base:?}, {})",
                if *sqrt { "sqrt" } else { "linear" }
            ),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn batch_scale_composes_with_any_schedule() {
        let s = Schedule::parse("batch_scale(1024, 256, sqrt) * cosine(10, 0.1)").unwrap();
        assert_eq!(s.factor(0), 2.0);
        assert!((s.factor(10) - 0.2).abs() < 1e-15);
        assert_eq!(Schedule::parse(&s.to_string()).unwrap(), s);
        let l = Schedule::parse("batch_scale(64, 256)").unwrap();
        assert_eq!(l.factor(5), 0.25);
        assert_eq!(l, Schedule::batch_scale(64.0, 256.0, false).unwrap());
        // A product that ends can be followed.
        let w = Schedule::parse("warmup(4) * batch_scale(2, 1) then constant").unwrap();
        assert_eq!([2, 4, 5].map(|t| w.factor(t)), [1.0, 2.0, 1.0]);
        assert!(Schedule::parse("batch_scale(0, 1)").is_err());
        assert!(Schedule::parse("batch_scale(4, 1, cube)").is_err());
        assert!(Schedule::parse("batch_scale(4) ").is_err());
        assert!(Schedule::parse("batch_scale(4, 1) then constant").is_err());
        assert!(Schedule::batch_scale(f64::NAN, 1.0, true).is_err());
    }

    #[test]
    fn factors() {
        let w = Schedule::parse("warmup(4)").unwrap();
        assert_eq!([1, 2, 4, 9].map(|t| w.factor(t)), [0.25, 0.5, 1.0, 1.0]);
        let c = Schedule::parse("cosine(10, 0.1)").unwrap();
        assert!(
            (c.factor(0) - 1.0).abs() < 1e-15
                && (c.factor(10) - 0.1).abs() < 1e-15
                && (c.factor(5) - 0.55).abs() < 1e-15
        );
        assert_eq!(Schedule::parse("step(3, 0.5)").unwrap().factor(7), 0.25);
        assert_eq!(Schedule::parse("linear_decay(4)").unwrap().factor(3), 0.25);
        let p = Schedule::parse("piecewise(2: 1, 4: 0.5)").unwrap();
        assert_eq!(
            [1, 2, 3, 4, 10].map(|t| p.factor(t)),
            [1.0, 1.0, 0.75, 0.5, 0.5]
        );
    }

    #[test]
    fn composition_restarts_the_step_count() {
        let s = Schedule::parse("warmup(2) then cosine(4)").unwrap();
        assert_eq!(s.factor(1), 0.5);
        assert_eq!(s.factor(2), 1.0);
        assert!((s.factor(3) - Schedule::Cosine { total: 4, min: 0.0 }.factor(1)).abs() < 1e-15);
        assert!((s.factor(6)).abs() < 1e-15);
        assert_eq!(
            Schedule::parse(&s.to_string()).unwrap(),
            s,
            "the text form round-trips"
        );
    }

    #[test]
    fn bad_schedules_are_errors() {
        for t in [
            "cosine",
            "cosine(0)",
            "warmup(-3)",
            "step(2)",
            "sawtooth(3)",
            "constant then cosine(5)",
            "piecewise(3: 1, 2: 0)",
            "linear(1, x, 3)",
            "cosine(5",
        ] {
            assert!(Schedule::parse(t).is_err(), "{t}");
        }
    }

    #[test]
    fn sliding_medians_match_sorting_each_window() {
        let mut x = 0x2545_f491u64;
        let v: Vec<f64> = (0..300)
            .map(|_| {
                x ^= x << 13;
                x ^= x >> 7;
                x ^= x << 17;
                (x % 17) as f64 + 0.5
            })
            .collect();
        for half in [0, 1, 2, 7, 150, 400] {
            let want: Vec<f64> = (0..v.len())
                .map(|i| {
                    let mut w = v[i.saturating_sub(half)..(i + half + 1).min(v.len())].to_vec();
                    w.sort_by(|a, b| a.total_cmp(b));
                    let m = w.len();
                    if m % 2 == 1 {
                        w[m / 2]
                    } else {
                        0.5 * (w[m / 2 - 1] + w[m / 2])
                    }
                })
                .collect();
            assert_eq!(super::sliding_medians(&v, half), want, "half {half}");
        }
    }

    #[test]
    fn refined_over_a_long_log_is_fast() {
        // 200k steps with a window of half the run: quadratic work took minutes.
        let norms: Vec<f64> = (0..200_000).map(|i| 1.0 + (i % 97) as f64).collect();
        let start = std::time::Instant::now();
        let s = Schedule::refined(&norms, 0.5, false).unwrap();
        let total: f64 = (1..=200_000).map(|t| s.factor(t)).sum();
        assert!(total.is_finite());
        assert!(
            start.elapsed() < std::time::Duration::from_secs(10),
            "{:?}",
            start.elapsed()
        );
    }

    #[test]
    fn refined_schedule_of_constant_norms_is_a_linear_decay() {
        let s = Schedule::refined(&[2.5; 11], 0.1, false).unwrap();
        for t in 1..=11u64 {
            assert!(
                (s.factor(t) - (11 - t) as f64 / 10.0).abs() < 1e-12,
                "t = {t}: {}",
                s.factor(t)
            );
        }
    }

    #[test]
    fn refined_schedule_steps_less_where_gradients_are_large() {
        // Norms that grow late: the refined schedule decays faster there than a linear decay.
        let norms: Vec<f64> = (0..20).map(|i| if i < 10 { 1.0 } else { 4.0 }).collect();
        let s = Schedule::refined(&norms, 0.0, false).unwrap();
        assert_eq!(s.factor(1), 1.0);
        assert!(
            s.factor(12) < 0.1 * (20.0 - 12.0) / 19.0,
            "{}",
            s.factor(12)
        );
        assert_eq!(s.factor(20), 0.0);
        // A single outlier is removed by the median filter.
        let mut spiky = vec![1.0; 21];
        spiky[10] = 100.0;
        let smooth = Schedule::refined(&spiky, 0.2, true).unwrap();
        let flat = Schedule::refined(&[1.0; 21], 0.2, true).unwrap();
        assert!((smooth.factor(11) - flat.factor(11)).abs() < 1e-12);
    }
}
