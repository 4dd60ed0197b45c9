//! Connection state kept in a BPF filesystem across the daemon's restarts
//! (docs/DATAPLANE.md, "Kept across restarts"). The maps that say where each connection
//! goes (`connections`, with the NAT legs; `persistence`; the per-server open and close
//! counts the least-connection schedulers read) are pinned under a directory of their own,
//! named for the network namespace, the interface and the layout of their keys and values.
//! A daemon that loads with the same directory takes the pinned maps instead of new empty
//! ones, so the connections of the daemon before it (killed, or re-executed as an upgrade)
//! go on. Everything else (services, servers, rows, settings, counters) the daemon writes
//! afresh from its config, as at any start.

use std::{
    os::unix::fs::MetadataExt,
    path::{Path, PathBuf},
};

use aya::maps::MapData;
use lb_common::{Connection, FlowKey, Persist, PersistKey, ServerLoad, maps};

use super::{Capacities, Error};

/// The maps kept, with the size of their key and value as this build lays them out.
pub const KEPT: [(&str, usize, usize); 4] = [
    (
        maps::CONNECTIONS,
        size_of::<FlowKey>(),
        size_of::<Connection>(),
    ),
    (
        maps::PERSISTENCE,
        size_of::<PersistKey>(),
        size_of::<Persist>(),
    ),
    (maps::SERVER_LOAD, 4, size_of::<ServerLoad>()),
    (maps::SERVER_GONE, 4, 8),
];

/// The version of the kept maps' meaning: raise it whenever a kept key or value changes
/// what its bytes say (a change of size alone is caught without it). A daemon never adopts
/// maps of another version.
pub const KEPT_ABI: u32 = 1;

/// The BPF filesystem's magic number (`statfs`'s `f_type`).
const BPF_FS_MAGIC: i64 = 0xcafe_4a11;

/// Where this build keeps the maps of the dataplane on `interface`, in the calling thread's
/// network namespace, under the BPF filesystem at `root`:
/// `root/lb/<netns inode>-<interface>/abi<KEPT_ABI>`.
pub fn kept_dir(root: &Path, interface: &str) -> Result<PathBuf, Error> {
    let ns = std::fs::metadata("/proc/thread-self/ns/net").map_err(|source| Error::Io {
        what: "reading this network namespace's inode".into(),
        source,
    })?;
    Ok(root
        .join("lb")
        .join(format!("{}-{interface}", ns.ino()))
        .join(format!("abi{KEPT_ABI}")))
}

/// Mounts a BPF filesystem at `root` unless one is there (as `ip` and `bpftool` do).
pub fn ensure_bpffs(root: &Path) -> Result<(), Error> {
    let io = |what: &str| {
        let what = format!("{what} {}", root.display());
        move |e: nix::Error| Error::Io {
            what,
            source: e.into(),
        }
    };
    if nix::sys::statfs::statfs(root).is_ok_and(|s| s.filesystem_type().0 == BPF_FS_MAGIC) {
        return Ok(());
    }
    std::fs::create_dir_all(root).map_err(|source| Error::Io {
        what: format!("creating {}", root.display()),
        source,
    })?;
    nix::mount::mount(
        Some("bpf"),
        root,
        Some("bpf"),
        nix::mount::MsFlags::empty(),
        None::<&str>,
    )
    .map_err(io("mounting a BPF filesystem at"))
}

/// What a directory holds of the kept maps.
#[derive(Debug, PartialEq, Eq)]
pub enum Pinned {
    /// None of them.
    Nothing,
    /// All of them, with this build's key and value sizes and the capacities asked for.
    Adoptable,
    /// Some, but they cannot be taken: why.
    Unusable(String),
}

/// What the maps pinned in `dir` are to a dataplane of capacities `caps`.
pub fn check(dir: &Path, caps: Capacities) -> Pinned {
    let pinned: Vec<bool> = KEPT.iter().map(|(n, ..)| dir.join(n).exists()).collect();
    if !pinned.iter().any(|p| *p) {
        return Pinned::Nothing;
    }
    for ((name, key, value), there) in KEPT.iter().zip(&pinned) {
        if !there {
            return Pinned::Unusable(format!("{name} is not pinned"));
        }
        let info = match MapData::from_pin(dir.join(name)).and_then(|m| m.info()) {
            Ok(i) => i,
            Err(e) => return Pinned::Unusable(format!("{name}: {e}")),
        };
        let want = if *name == maps::CONNECTIONS || *name == maps::PERSISTENCE {
            caps.connections
        } else {
            caps.servers
        };
        if info.key_size() as usize != *key || info.value_size() as usize != *value {
            return Pinned::Unusable(format!(
                "{name} holds {}-byte keys and {}-byte values, this build {key} and {value}",
                info.key_size(),
                info.value_size()
            ));
        }
        if info.max_entries() != want {
            return Pinned::Unusable(format!(
                "{name} holds {} entries, the [tables] now {want}",
                info.max_entries()
            ));
        }
    }
    Pinned::Adoptable
}

/// Other ABI versions' directories beside `dir` (left by another build of the daemon).
pub fn other_versions(dir: &Path) -> Vec<PathBuf> {
    let (Some(parent), Some(own)) = (dir.parent(), dir.file_name()) else {
        return Vec::new();
    };
    std::fs::read_dir(parent)
        .map(|entries| {
            entries
                .flatten()
                .filter(|e| e.file_name() != own)
                .map(|e| e.path())
                .collect()
        })
        .unwrap_or_default()
}

/// Removes the pins in `dir` (the maps go when nothing else holds them), and `dir` itself.
pub fn unpin(dir: &Path) -> Result<(), Error> {
    match std::fs::remove_dir_all(dir) {
        Err(e) if e.kind() != std::io::ErrorKind::NotFound => Err(Error::Io {
            what: format!("removing {}", dir.display()),
            source: e,
        }),
        _ => Ok(()),
    }
}
