//! Embeds every `rules/*.opt` file, so a rule added to the folder is in the library.
use std::fmt::Write;

fn main() {
    // Read when the script runs, not when it was compiled: a build folder shared between
    // checkouts may run a script compiled in another one.
    let manifest = std::env::var_os("CARGO_MANIFEST_DIR").expect("cargo sets CARGO_MANIFEST_DIR");
    let dir = std::path::Path::new(&manifest).join("rules");
    println!("cargo:rerun-if-changed={}", dir.display());
    let mut names: Vec<String> = std::fs::read_dir(&dir)
        .expect("stdlib/rules exists")
        .filter_map(|e| e.ok())
        .map(|e| e.path())
        .filter(|p| p.extension().is_some_and(|x| x == "opt"))
        .map(|p| {
            p.file_stem()
                .expect("a file name")
                .to_string_lossy()
                .into_owned()
        })
        .collect();
    names.sort();
    let mut code = String::from("/// Every rule of the standard library: (name, source), sorted by name.\npub static RULES: &[(&str, &str)] = &[\n");
    for n in &names {
        println!(
            "cargo:rerun-if-changed={}",
            dir.join(format!("{n}.opt")).display()
        );
        let _ = writeln!(
            code,
            "    ({n:?}, include_str!(concat!(env!(\"CARGO_MANIFEST_DIR\"), \"/rules/{n}.opt\"))),"
        );
    }
    code.push_str("];\n");
    let out = std::path::Path::new(&std::env::var("OUT_DIR").expect("OUT_DIR")).join("rules.rs");
    std::fs::write(out, code).expect("write rules.rs");
}
