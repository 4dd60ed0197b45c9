//! The Debian package (`cargo xtask package`), installed as an operator installs it, with
//! `apt-get install ./lb_*.deb`: the binaries run from their installed places, `man` finds
//! every page, the completions load, and `systemd-analyze verify` passes on the installed
//! unit. The package is purged afterwards, whatever happens. Nothing is started by systemd:
//! there is no systemd to start it here (docs/DAEMON.md, "systemd").

use std::{
    path::{Path, PathBuf},
    process::{Command, Output},
};

use std::time::Duration;

use lb_tests::{cluster, lab::Lab, netns::unique_name, procs::Daemon};

fn run(cmd: &mut Command) -> Output {
    let out = cmd
        .output()
        .unwrap_or_else(|e| panic!("cannot run {cmd:?}: {e}"));
    assert!(
        out.status.success(),
        "{cmd:?} failed ({}):\n{}{}",
        out.status,
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
    out
}

fn stdout(cmd: &mut Command) -> String {
    String::from_utf8_lossy(&run(cmd).stdout).into_owned()
}

/// Purges the package on drop, and the directory the .deb was written to.
struct Installed {
    dir: PathBuf,
}

impl Drop for Installed {
    fn drop(&mut self) {
        let _ = Command::new("dpkg").args(["--purge", "lb"]).output();
        let _ = std::fs::remove_dir_all(&self.dir);
    }
}

#[test]
fn the_package_installs_with_apt_and_brings_man_pages_completions_and_a_valid_unit() {
    let workspace = Path::new(env!("CARGO_MANIFEST_DIR")).parent().unwrap();
    let dir = std::env::temp_dir().join(unique_name("package"));
    let installed = Installed { dir: dir.clone() };
    // The debug build the tests run: a release build would take minutes more.
    let cargo = std::env::var("CARGO").unwrap_or_else(|_| "cargo".into());
    run(Command::new(cargo)
        .args(["xtask", "package", "--debug", "--output"])
        .arg(&dir)
        .current_dir(workspace));
    let debs: Vec<PathBuf> = std::fs::read_dir(&dir)
        .unwrap()
        .map(|e| e.unwrap().path())
        .filter(|p| p.extension().is_some_and(|e| e == "deb"))
        .collect();
    assert_eq!(debs.len(), 1, "one .deb in {}: {debs:?}", dir.display());
    let name = debs[0].file_name().unwrap().to_string_lossy().into_owned();
    assert!(name.starts_with("lb_") && name.ends_with(".deb"), "{name}");

    // As the README says: apt resolves its dependencies (all present here).
    run(Command::new("apt-get")
        .args(["install", "-y", "--no-install-recommends"])
        .arg(format!("./{name}"))
        .current_dir(&dir)
        .env("DEBIAN_FRONTEND", "noninteractive"));
    let status =
        stdout(Command::new("dpkg-query").args(["-W", "-f", "${Status} ${Version}", "lb"]));
    assert!(status.starts_with("install ok installed "), "{status}");

    // The binaries, from their installed places.
    let version = stdout(Command::new("/usr/sbin/lb-daemon").arg("--version"));
    assert!(version.starts_with("lb-daemon "), "{version}");
    let checked = stdout(
        Command::new("/usr/bin/lb-cli")
            .args(["check-config", "/usr/share/doc/lb/examples/direct.toml"]),
    );
    assert!(
        checked.contains("OK") || checked.contains("ok"),
        "{checked}"
    );

    // man finds lb-cli's page, a command's, and the daemon's.
    for (args, needle) in [
        (&["lb-cli"][..], "Operate an lb cluster"),
        (&["lb-cli-status"][..], "crm_mon"),
        (&["8", "lb-daemon"][..], "Advanced Traffic Manager"),
    ] {
        let page = stdout(
            Command::new("man")
                .args(["-P", "cat"])
                .args(args)
                .env("MANWIDTH", "200"),
        );
        assert!(page.contains(needle), "man {args:?}:\n{page}");
    }

    // bash loads the completion and completes lb-cli's commands.
    let completed = stdout(Command::new("bash").args([
        "-c",
        "source /usr/share/bash-completion/completions/lb-cli && \
         f=$(complete -p lb-cli | sed 's/.* -F \\([^ ]*\\) .*/\\1/') && \
         COMP_WORDS=(lb-cli sta) COMP_CWORD=1 COMP_LINE='lb-cli sta' COMP_POINT=10 && \
         \"$f\" lb-cli sta lb-cli && printf '%s\\n' \"${COMPREPLY[@]}\"",
    ]));
    assert!(
        completed.lines().any(|l| l == "status") && completed.lines().any(|l| l == "stat"),
        "{completed}"
    );

    // The installed unit names the installed daemon and verifies without a word about it.
    let unit = Path::new("/lib/systemd/system/lb-daemon.service");
    let text = std::fs::read_to_string(unit).unwrap();
    assert!(
        text.contains("\nExecStart=/usr/sbin/lb-daemon --config /etc/lb/lb.toml\n"),
        "{text}"
    );
    let verify = Command::new("systemd-analyze")
        .args(["verify", "--recursive-errors=no"])
        .arg(unit)
        .env("SYSTEMD_COLORS", "0")
        .env("SYSTEMD_PAGER", "")
        .output()
        .unwrap();
    let said = format!(
        "{}{}",
        String::from_utf8_lossy(&verify.stdout),
        String::from_utf8_lossy(&verify.stderr)
    );
    assert!(verify.status.success(), "{said}");
    let ours: Vec<&str> = said.lines().filter(|l| l.contains("lb-daemon")).collect();
    assert!(
        ours.is_empty(),
        "systemd-analyze verify:\n{}",
        ours.join("\n")
    );

    // The unit's program starts as an ATM and forwards (with a lab's config: the unit's
    // own, /etc/lb/lb.toml, is the host's to write).
    let program = text
        .lines()
        .find_map(|l| l.strip_prefix("ExecStart="))
        .and_then(|c| c.split(' ').next())
        .unwrap();
    served_by(Path::new(program));

    // The OCF agent where docs/HA.md says Pacemaker looks for ocf:lb:atm.
    let meta = stdout(
        Command::new("/usr/lib/ocf/resource.d/lb/atm")
            .arg("meta-data")
            .env("OCF_ROOT", "/usr/lib/ocf"),
    );
    assert!(meta.contains("<resource-agent"), "{meta}");

    // Removal takes every file with it.
    drop(installed);
    assert!(!Path::new("/usr/sbin/lb-daemon").exists());
    assert!(!unit.exists());
}

/// `program` runs as the ATM of a lab with one nginx server (direct routing), and a request
/// to the VIP is answered through it.
fn served_by(program: &Path) {
    let mut lab = Lab::new();
    cluster::build(&mut lab, 1, 1);
    let ns = cluster::server(1);
    lab.nginx(&ns, &ns, &[80]);
    cluster::hold_vip_on_lo(&lab, &ns, cluster::VIP);
    let config = lab.dir().join("lb.toml");
    std::fs::write(
        &config,
        format!(
            "[cluster]\nname = \"lab\"\n\n[[atm]]\nname = \"atm1\"\naddress = \"{}\"\n\
             interface = \"eth0\"\n\n[[service]]\nname = \"http\"\nvip = \"{}\"\nport = 80\n\
             [[service.server]]\nname = \"web1\"\naddress = \"{}\"\n",
            cluster::atm_addr(1),
            cluster::VIP,
            cluster::server_addr(1)
        ),
    )
    .unwrap();
    let mut d = Daemon::start_program(&mut lab, &cluster::atm(1), program, &config, &[]);
    d.wait_log("This ATM is primary", Duration::from_secs(20));
    let _in = lab.ns("client").enter();
    let body = cluster::request(Duration::from_secs(5)).unwrap();
    assert_eq!(body.trim(), ns, "answered through {}", program.display());
}
