//! Writes seed inputs for the `checkpoint` target: real checkpoints of the optimizer it loads
//! into, after zero, one and three steps.
use std::path::PathBuf;

fn main() {
    let dir = PathBuf::from(std::env::args().nth(1).expect("usage: seeds DIR"));
    std::fs::create_dir_all(&dir).expect("corpus folder");
    for (k, bytes) in optc_fuzz::checkpoint_seeds().into_iter().enumerate() {
        std::fs::write(dir.join(format!("seed-{k}")), bytes).expect("seed written");
    }
}
