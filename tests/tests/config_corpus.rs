//! Tier 1: the corpus of invalid config files. Each file's first line says the line and the
//! message the checker must report (`# expect LINE: MESSAGE`); the daemon's parser and
//! `lb-cli check-config` must both give it.

use std::path::{Path, PathBuf};

use lb_daemon::config;
use lb_tests::procs::bin;

fn corpus() -> Vec<(PathBuf, usize, String)> {
    let dir = Path::new(env!("CARGO_MANIFEST_DIR")).join("configs/bad");
    let mut files: Vec<PathBuf> = std::fs::read_dir(&dir)
        .unwrap()
        .map(|e| e.unwrap().path())
        .filter(|p| p.extension().is_some_and(|e| e == "toml"))
        .collect();
    files.sort();
    files
        .into_iter()
        .map(|p| {
            let text = std::fs::read_to_string(&p).unwrap();
            let first = text.lines().next().unwrap();
            let rest = first.strip_prefix("# expect ").unwrap_or_else(|| {
                panic!(
                    "{}: first line must be `# expect LINE: MESSAGE`",
                    p.display()
                )
            });
            let (line, msg) = rest.split_once(": ").unwrap();
            (p.clone(), line.parse().unwrap(), msg.to_string())
        })
        .collect()
}

#[test]
fn every_bad_file_is_reported_with_its_line_and_problem() {
    let cases = corpus();
    assert!(cases.len() >= 30, "only {} invalid configs", cases.len());
    let mut failures = Vec::new();
    for (path, line, msg) in &cases {
        match config::load(path) {
            Ok(_) => failures.push(format!("{}: accepted", path.display())),
            Err(problems) => {
                if !problems
                    .iter()
                    .any(|p| p.line == *line && p.message.contains(msg.as_str()))
                {
                    failures.push(format!(
                        "{}: wanted line {line}: {msg}\n  got: {}",
                        path.display(),
                        problems
                            .iter()
                            .map(|p| p.to_string())
                            .collect::<Vec<_>>()
                            .join("\n       ")
                    ));
                }
            }
        }
    }
    assert!(failures.is_empty(), "{}", failures.join("\n"));
}

#[test]
fn check_config_gives_the_same_answers_offline() {
    let cli = bin("lb-cli");
    for (path, line, msg) in corpus() {
        let out = std::process::Command::new(&cli)
            .arg("check-config")
            .arg(&path)
            .output()
            .unwrap();
        let stdout = String::from_utf8_lossy(&out.stdout);
        assert_eq!(out.status.code(), Some(1), "{}: {stdout}", path.display());
        let want = format!("{}:{line}: ", path.display());
        assert!(
            stdout
                .lines()
                .any(|l| l.starts_with(&want) && l.contains(msg.as_str())),
            "{}: wanted {want}{msg}\n{stdout}",
            path.display()
        );
    }
    let good = Path::new(env!("CARGO_MANIFEST_DIR")).join("configs/good.toml");
    let out = std::process::Command::new(&cli)
        .arg("check-config")
        .arg(&good)
        .output()
        .unwrap();
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stdout)
    );
    assert!(String::from_utf8_lossy(&out.stdout).contains("OK"));
}

#[test]
fn the_example_configs_are_valid() {
    let dir = Path::new(env!("CARGO_MANIFEST_DIR")).join("../examples");
    let mut n = 0;
    for e in std::fs::read_dir(&dir).unwrap() {
        let p = e.unwrap().path();
        if p.extension().is_some_and(|e| e == "toml") {
            if let Err(problems) = config::load(&p) {
                panic!("{}: {problems:?}", p.display());
            }
            n += 1;
        }
    }
    assert!(n >= 3, "one example per forwarding method");
}

/// `lb-cli ... | head` ends lb-cli quietly, as SIGPIPE ends any Unix tool, rather than with
/// a panic about a broken pipe.
#[test]
fn lb_cli_writing_to_a_closed_pipe_ends_quietly() {
    use std::os::unix::process::ExitStatusExt;
    let (read, write) = nix::unistd::pipe().unwrap();
    drop(read); // the reader is gone before lb-cli writes a byte
    let example = Path::new(env!("CARGO_MANIFEST_DIR")).join("../examples/direct.toml");
    let out = std::process::Command::new(bin("lb-cli"))
        .arg("check-config")
        .arg(&example)
        .stdout(std::process::Stdio::from(write))
        .output()
        .unwrap();
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(stderr.is_empty(), "lb-cli said: {stderr}");
    assert_eq!(out.status.signal(), Some(libc::SIGPIPE), "{:?}", out.status);
}

/// `check-config /dev/zero` once read until memory ran out; now it refuses at once.
#[test]
fn check_config_refuses_a_device_at_once() {
    let start = std::time::Instant::now();
    let out = std::process::Command::new(bin("lb-cli"))
        .arg("check-config")
        .arg("/dev/zero")
        .output()
        .unwrap();
    let stdout = String::from_utf8_lossy(&out.stdout);
    assert_eq!(out.status.code(), Some(1), "{stdout}");
    assert!(
        stdout.contains("/dev/zero:0: /dev/zero is not a regular file"),
        "{stdout}"
    );
    assert!(
        start.elapsed() < std::time::Duration::from_secs(5),
        "took {:?}",
        start.elapsed()
    );
}

/// Usage errors exit 2 with the usage on standard error, as documented; the daemon's
/// refusals exit 1 (see tests/tests/daemon.rs).
#[test]
fn lb_cli_usage_errors_exit_2() {
    for args in [
        &["nosuchverb"][..],
        &["write", "timeout"],
        &["cat"],
        &["--bogus", "status"],
    ] {
        let out = std::process::Command::new(bin("lb-cli"))
            .args(args)
            .output()
            .unwrap();
        assert_eq!(out.status.code(), Some(2), "lb-cli {args:?}");
        assert!(
            String::from_utf8_lossy(&out.stderr).contains("Usage"),
            "lb-cli {args:?}: {}",
            String::from_utf8_lossy(&out.stderr)
        );
    }
    let help = std::process::Command::new(bin("lb-cli"))
        .arg("--help")
        .output()
        .unwrap();
    assert!(String::from_utf8_lossy(&help.stdout).contains("Exit status: 0 done; 1"));
}
