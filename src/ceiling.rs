//! The bandwidth ceiling of a rule's access pattern: a trivial kernel over as many streams as a
//! step of the rule reads, updates in place and writes, each of its element size, on the same
//! threads. `optc bench` and `examples/native_bench.rs` report a step against it (and against
//! `a += s * b`), measured in the same process.

use optc_compiler::ir::{BufId, Node, Program};
use std::collections::BTreeSet;

/// A step's streams: the element size in bytes (4 or 2) of each buffer it only reads, reads and
/// writes, and only writes.
#[derive(Debug, Clone, PartialEq, Eq, Default)]
pub struct Streams {
    /// Buffers read, not written.
    pub read: Vec<usize>,
    /// Buffers read and written (in place).
    pub inplace: Vec<usize>,
    /// Buffers written, not read.
    pub write: Vec<usize>,
}

impl Streams {
    /// The streams of a later step of `p` (over every pass), `bytes(b)` the element size of
    /// buffer `b`.
    pub fn of(p: &Program, bytes: impl Fn(BufId) -> usize) -> Streams {
        let (mut read, mut written) = (BTreeSet::new(), BTreeSet::new());
        for s in &p.variants[1].stages {
            for ph in &s.phases {
                for k in &ph.kernels {
                    for &n in &k.loads {
                        if let Node::Load { buf, .. } = p.graph.node(n) {
                            read.insert(buf);
                        }
                    }
                    written.extend(k.stores.iter().map(|s| s.0));
                }
            }
        }
        Streams {
            read: read.difference(&written).map(|&b| bytes(b)).collect(),
            inplace: read.intersection(&written).map(|&b| bytes(b)).collect(),
            write: written.difference(&read).map(|&b| bytes(b)).collect(),
        }
    }

    /// Bytes moved per element: each stream once, in-place ones twice.
    pub fn bytes_per_element(&self) -> usize {
        self.read.iter().sum::<usize>()
            + 2 * self.inplace.iter().sum::<usize>()
            + self.write.iter().sum::<usize>()
    }
}

enum Stream {
    F32(Vec<f32>),
    Bits(Vec<u16>),
}

impl Stream {
    fn new(bytes: usize, n: usize, v: f32) -> Stream {
        if bytes == 2 {
            Stream::Bits(vec![(v.to_bits() >> 16) as u16; n])
        } else {
            Stream::F32(vec![v; n])
        }
    }
}

enum Part<'a> {
    F32(&'a mut [f32]),
    Bits(&'a mut [u16]),
}

/// Elements per task of the trivial kernel.
const TASK: usize = 1 << 14;
/// Elements per block of its running sum: small, so that every stream is read and written
/// about at once (a few cache lines of each in turn), as a fused kernel does, and the hardware
/// prefetchers follow all of them.
const BLOCK: usize = 64;

/// The trivial kernel of some [`Streams`] over `n` elements: per element, the sum of the read
/// streams, each in-place stream replaced by `0.5 * itself + sum`, each write stream set to it.
pub struct Ceiling {
    pool: rayon::ThreadPool,
    n: usize,
    streams: Streams,
    read: Vec<Stream>,
    inplace: Vec<Stream>,
    write: Vec<Stream>,
}

impl std::fmt::Debug for Ceiling {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "Ceiling({:?} over {})", self.streams, self.n)
    }
}

impl Ceiling {
    /// The kernel of `streams` over `n` elements on `threads` threads.
    pub fn new(
        streams: &Streams,
        n: usize,
        threads: usize,
    ) -> Result<Ceiling, rayon::ThreadPoolBuildError> {
        let make = |v: &[usize], x: f32| v.iter().map(|&b| Stream::new(b, n, x)).collect();
        Ok(Ceiling {
            pool: rayon::ThreadPoolBuilder::new()
                .num_threads(threads.max(1))
                .build()?,
            n,
            streams: streams.clone(),
            read: make(&streams.read, 1e-3),
            inplace: make(&streams.inplace, 0.5),
            write: make(&streams.write, 0.0),
        })
    }

    /// Bytes one run moves.
    pub fn bytes(&self) -> usize {
        self.streams.bytes_per_element() * self.n
    }

    /// One pass of the kernel.
    pub fn run(&mut self) {
        use rayon::prelude::*;
        let (n, ninplace) = (self.n, self.inplace.len());
        let tasks = n.div_ceil(TASK);
        let mut parts: Vec<Vec<Part<'_>>> = (0..tasks).map(|_| Vec::new()).collect();
        for s in self.inplace.iter_mut().chain(self.write.iter_mut()) {
            match s {
                Stream::F32(v) => {
                    for (p, c) in parts.iter_mut().zip(v.chunks_mut(TASK)) {
                        p.push(Part::F32(c));
                    }
                }
                Stream::Bits(v) => {
                    for (p, c) in parts.iter_mut().zip(v.chunks_mut(TASK)) {
                        p.push(Part::Bits(c));
                    }
                }
            }
        }
        let read = &self.read;
        self.pool.install(|| {
            parts.into_par_iter().enumerate().for_each(|(t, mut mine)| {
                let start = t * TASK;
                let len = mine.first().map_or(TASK.min(n - start), |p| match p {
                    Part::F32(c) => c.len(),
                    Part::Bits(c) => c.len(),
                });
                let mut sum = [0f32; BLOCK];
                let mut b = 0;
                while b < len {
                    let m = BLOCK.min(len - b);
                    let sum = &mut sum[..m];
                    sum.fill(0.0);
                    for r in read {
                        match r {
                            Stream::F32(v) => {
                                for (s, x) in sum.iter_mut().zip(&v[start + b..start + b + m]) {
                                    *s += x;
                                }
                            }
                            Stream::Bits(v) => {
                                for (s, &h) in sum.iter_mut().zip(&v[start + b..start + b + m]) {
                                    *s += f32::from_bits(u32::from(h) << 16);
                                }
                            }
                        }
                    }
                    for (i, p) in mine.iter_mut().enumerate() {
                        let inplace = i < ninplace;
                        match p {
                            Part::F32(c) if inplace => {
                                for (w, s) in c[b..b + m].iter_mut().zip(sum.iter()) {
                                    *w = 0.5 * *w + s;
                                }
                            }
                            Part::F32(c) => c[b..b + m].copy_from_slice(sum),
                            Part::Bits(c) if inplace => {
                                for (w, s) in c[b..b + m].iter_mut().zip(sum.iter()) {
                                    *w ^= (s.to_bits() >> 16) as u16;
                                }
                            }
                            Part::Bits(c) => {
                                for (w, s) in c[b..b + m].iter_mut().zip(sum.iter()) {
                                    *w = (s.to_bits() >> 16) as u16;
                                }
                            }
                        }
                    }
                    b += m;
                }
            })
        });
        std::hint::black_box(&self.inplace);
        std::hint::black_box(&self.write);
    }

    /// The median bandwidth of `runs` runs after one warm-up, in GB/s.
    pub fn measure(&mut self, runs: usize) -> f64 {
        self.run();
        let mut times: Vec<f64> = (0..runs.max(1))
            .map(|_| {
                let start = std::time::Instant::now();
                self.run();
                start.elapsed().as_secs_f64()
            })
            .collect();
        times.sort_by(f64::total_cmp);
        self.bytes() as f64 / times[times.len() / 2] / 1e9
    }
}
