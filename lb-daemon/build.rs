//! Builds the eBPF objects (the `lb-ebpf` crate's two binaries: `lb-ebpf`, the balancer, and
//! `lb-bench-progs`, the benchmarks' instruments) for `bpfel-unknown-none` and leaves them in
//! OUT_DIR for `include_bytes_aligned!`, so that a plain `cargo build` or `cargo test` of the
//! workspace is enough. The recipe (Debian's rustc with its prebuilt BPF `core`, bpf-linker)
//! is described in docs/TOOLCHAIN.md; `cargo xtask setup` installs it.

use std::{
    env,
    path::{Path, PathBuf},
    process::Command,
};

/// Debian's compiler, which has a precompiled `core` for the BPF targets (rustup's has none).
const BPF_RUSTC: &str = "/usr/bin/rustc";
const BPF_CORE: &str = "/usr/lib/rustlib/bpfel-unknown-none";

fn main() {
    println!("cargo:rustc-env=LB_BUILD_DATE={}", build_date());
    let manifest_dir = PathBuf::from(env::var_os("CARGO_MANIFEST_DIR").unwrap());
    let workspace = manifest_dir.parent().unwrap().to_path_buf();
    for p in [
        "lb-ebpf/src",
        "lb-ebpf/Cargo.toml",
        "lb-common/src",
        "lb-common/Cargo.toml",
    ] {
        println!("cargo:rerun-if-changed={}", workspace.join(p).display());
    }
    println!("cargo:rerun-if-env-changed=LB_BPF_LINKER");

    let linker = find_linker();
    let mut missing = Vec::new();
    if !Path::new(BPF_RUSTC).exists() {
        missing.push(format!("{BPF_RUSTC} (Debian package rustc-web)"));
    }
    if !Path::new(BPF_CORE).exists() {
        missing.push(format!(
            "{BPF_CORE} (Debian package libstd-rust-web-dev-bpf)"
        ));
    }
    if linker.is_none() {
        missing.push("bpf-linker (cargo install bpf-linker)".to_string());
    }
    if !missing.is_empty() {
        panic!(
            "\n\nthe eBPF toolchain is missing: {}.\nrun `cargo xtask setup` (as root) to install it.\n\n",
            missing.join(", ")
        );
    }
    let linker = linker.unwrap();

    // A target directory of its own: the outer cargo holds the lock on its profile directory,
    // and sharing one BPF build between dev, release and clippy builds saves a minute each.
    let target_root = env::var_os("CARGO_TARGET_DIR")
        .map(PathBuf::from)
        .unwrap_or_else(|| workspace.join("target"));
    let target_dir = target_root.join("bpf");

    let cargo = env::var_os("CARGO").unwrap_or_else(|| "cargo".into());
    let mut cmd = Command::new(cargo);
    cmd.current_dir(&workspace)
        .args(["build", "--package", "lb-ebpf", "--profile", "bpf"])
        .args(["--target", "bpfel-unknown-none", "--target-dir"])
        .arg(&target_dir)
        .env("RUSTC", BPF_RUSTC)
        // The stable Debian compiler must accept the feature gates aya-ebpf uses.
        .env("RUSTC_BOOTSTRAP", "1")
        .env("CARGO_TARGET_BPFEL_UNKNOWN_NONE_LINKER", &linker)
        .env("RUSTFLAGS", "-C debuginfo=2 -C link-arg=--btf");
    // Whatever the outer build was run with (clippy's wrapper, coverage flags) must not reach
    // the BPF compiler.
    for var in [
        "RUSTC_WRAPPER",
        "RUSTC_WORKSPACE_WRAPPER",
        "CARGO_ENCODED_RUSTFLAGS",
        "CARGO_BUILD_RUSTFLAGS",
        "CARGO_TARGET_DIR",
        "CARGO_BUILD_TARGET",
        "RUSTDOCFLAGS",
    ] {
        cmd.env_remove(var);
    }
    let out = cmd
        .output()
        .unwrap_or_else(|e| panic!("failed to run cargo to build lb-ebpf: {e}"));
    if !out.status.success() {
        panic!(
            "building the eBPF object (lb-ebpf) failed:\n{}\n{}",
            String::from_utf8_lossy(&out.stdout),
            String::from_utf8_lossy(&out.stderr)
        );
    }
    // Two objects: the balancer's, and the benchmarks' instruments (kept out of it).
    let out_dir = PathBuf::from(env::var_os("OUT_DIR").unwrap());
    for bin in ["lb-ebpf", "lb-bench-progs"] {
        let object = target_dir.join("bpfel-unknown-none/bpf").join(bin);
        let dest = out_dir.join(format!("{bin}.o"));
        std::fs::copy(&object, &dest)
            .unwrap_or_else(|e| panic!("copying {} to {}: {e}", object.display(), dest.display()));
    }
}

/// bpf-linker from `LB_BPF_LINKER`, PATH, or cargo's bin directory (which a build script's
/// PATH may lack).
fn find_linker() -> Option<PathBuf> {
    if let Some(p) = env::var_os("LB_BPF_LINKER") {
        return Some(PathBuf::from(p));
    }
    let mut dirs: Vec<PathBuf> = env::var_os("PATH")
        .map(|p| env::split_paths(&p).collect())
        .unwrap_or_default();
    if let Some(home) = env::var_os("CARGO_HOME") {
        dirs.push(PathBuf::from(home).join("bin"));
    }
    if let Some(home) = env::var_os("HOME") {
        dirs.push(PathBuf::from(home).join(".cargo/bin"));
    }
    dirs.into_iter()
        .map(|d| d.join("bpf-linker"))
        .find(|p| p.is_file())
}

/// Today's date (UTC) as YYYY-MM-DD, or SOURCE_DATE_EPOCH's for reproducible builds.
fn build_date() -> String {
    println!("cargo:rerun-if-env-changed=SOURCE_DATE_EPOCH");
    let secs = env::var("SOURCE_DATE_EPOCH")
        .ok()
        .and_then(|s| s.parse::<i64>().ok())
        .unwrap_or_else(|| {
            std::time::SystemTime::now()
                .duration_since(std::time::UNIX_EPOCH)
                .map(|d| d.as_secs() as i64)
                .unwrap_or(0)
        });
    // Howard Hinnant's civil_from_days.
    let z = secs.div_euclid(86_400) + 719_468;
    let era = z.div_euclid(146_097);
    let doe = z - era * 146_097;
    let yoe = (doe - doe / 1460 + doe / 36_524 - doe / 146_096) / 365;
    let doy = doe - (365 * yoe + yoe / 4 - yoe / 100);
    let mp = (5 * doy + 2) / 153;
    let d = doy - (153 * mp + 2) / 5 + 1;
    let m = if mp < 10 { mp + 3 } else { mp - 9 };
    let y = yoe + era * 400 + i64::from(m <= 2);
    format!("{y:04}-{m:02}-{d:02}")
}
