//! The handwritten-digits data (examples/data/digits.csv) and a multinomial logistic regression
//! over it, with per-sample gradients: what the examples with a sample axis train.

pub const CLASSES: usize = 10;
/// 64 pixels (scaled to [0, 1]) and a constant 1.
pub const FEATURES: usize = 65;
/// Elements of the weight matrix W, [CLASSES, FEATURES] row by row.
pub const WEIGHTS: usize = CLASSES * FEATURES;

const DATA: &str = include_str!("../data/digits.csv");

/// Images and labels.
pub struct Set {
    pub x: Vec<[f32; FEATURES]>,
    pub label: Vec<usize>,
}

/// A small deterministic generator (SplitMix64).
pub struct Rng(pub u64);
impl Rng {
    pub fn next(&mut self) -> u64 {
        self.0 = self.0.wrapping_add(0x9E37_79B9_7F4A_7C15);
        let mut z = self.0;
        z = (z ^ (z >> 30)).wrapping_mul(0xBF58_476D_1CE4_E5B9);
        z = (z ^ (z >> 27)).wrapping_mul(0x94D0_49BB_1331_11EB);
        z ^ (z >> 31)
    }
    /// Uniform in 0..n.
    pub fn below(&mut self, n: usize) -> usize {
        (self.next() % n as u64) as usize
    }
}

/// The data shuffled (a fixed permutation), split into `train` training images and the rest.
pub fn load(train: usize) -> (Set, Set) {
    let mut rows: Vec<([f32; FEATURES], usize)> = DATA
        .lines()
        .filter(|l| !l.starts_with('#') && !l.trim().is_empty())
        .map(|line| {
            let v: Vec<f32> = line
                .split(',')
                .map(|s| s.trim().parse().expect("a number"))
                .collect();
            let mut x = [1.0; FEATURES];
            for (d, s) in x.iter_mut().zip(&v[..64]) {
                *d = s / 16.0;
            }
            (x, v[64] as usize)
        })
        .collect();
    let mut rng = Rng(7);
    for i in (1..rows.len()).rev() {
        let j = rng.below(i + 1);
        rows.swap(i, j);
    }
    let split = |r: &[([f32; FEATURES], usize)]| Set {
        x: r.iter().map(|p| p.0).collect(),
        label: r.iter().map(|p| p.1).collect(),
    };
    (split(&rows[..train]), split(&rows[train..]))
}

/// Class probabilities of image `x` under weights `w`.
pub fn softmax(w: &[f32], x: &[f32; FEATURES]) -> [f32; CLASSES] {
    let mut z = [0f32; CLASSES];
    for (c, zc) in z.iter_mut().enumerate() {
        *zc = w[c * FEATURES..(c + 1) * FEATURES]
            .iter()
            .zip(x)
            .map(|(a, b)| a * b)
            .sum();
    }
    let m = z.iter().cloned().fold(f32::NEG_INFINITY, f32::max);
    let s: f32 = z.iter().map(|v| (v - m).exp()).sum();
    z.map(|v| (v - m).exp() / s)
}

/// The cross-entropy gradient of one sample, written into `out` (WEIGHTS values).
pub fn sample_grad(w: &[f32], x: &[f32; FEATURES], label: usize, out: &mut [f32]) {
    let p = softmax(w, x);
    for c in 0..CLASSES {
        let d = p[c] - f32::from(u8::from(c == label));
        for (o, xi) in out[c * FEATURES..(c + 1) * FEATURES].iter_mut().zip(x) {
            *o = d * xi;
        }
    }
}

/// Mean cross-entropy and accuracy on a set.
pub fn evaluate(w: &[f32], set: &Set) -> (f64, f64) {
    let mut loss = 0.0;
    let mut right = 0;
    for (x, &y) in set.x.iter().zip(&set.label) {
        let p = softmax(w, x);
        loss -= f64::from(p[y].max(1e-12)).ln();
        let best = (0..CLASSES)
            .max_by(|&a, &b| p[a].total_cmp(&p[b]))
            .expect("classes");
        right += usize::from(best == y);
    }
    let n = set.x.len() as f64;
    (loss / n, right as f64 / n)
}

/// The per-sample gradients of a batch, [batch, WEIGHTS] one sample after another.
pub fn batch_grads(w: &[f32], set: &Set, batch: &[usize]) -> Vec<f32> {
    let mut g = vec![0f32; batch.len() * WEIGHTS];
    for (k, &i) in batch.iter().enumerate() {
        sample_grad(
            w,
            &set.x[i],
            set.label[i],
            &mut g[k * WEIGHTS..(k + 1) * WEIGHTS],
        );
    }
    g
}
