//! Tier 2: connection state kept in a BPF filesystem across loads of the dataplane
//! (`lb_daemon::dataplane::kept`). On a BPF filesystem of the test's own, mounted in a
//! scratch directory: a first load pins new maps; a connection and a persistence entry
//! written through it are there for the next load, which adopts them; a load whose
//! capacities differ replaces them and says why; unpinning leaves nothing.

use std::path::PathBuf;

use lb_common::{Addr, Connection, FlowKey, Persist, PersistKey};
use lb_daemon::dataplane::{Capacities, Dataplane, Kept, kept};

/// A BPF filesystem mounted at a scratch directory, unmounted and removed when dropped.
struct BpfFs(PathBuf);

impl BpfFs {
    fn mount() -> BpfFs {
        let dir = std::env::temp_dir().join(format!("lbt{}-bpffs", std::process::id()));
        std::fs::create_dir_all(&dir).unwrap();
        let fs = BpfFs(dir);
        kept::ensure_bpffs(&fs.0).expect("mount a BPF filesystem");
        fs
    }
}

impl Drop for BpfFs {
    fn drop(&mut self) {
        let _ = nix::mount::umount(&self.0);
        let _ = std::fs::remove_dir(&self.0);
    }
}

#[test]
fn connections_pinned_by_one_load_are_adopted_by_the_next_and_replaced_when_they_do_not_fit() {
    let fs = BpfFs::mount();
    // Mounting again where one is finds it there.
    kept::ensure_bpffs(&fs.0).unwrap();
    let dir = kept::kept_dir(&fs.0, "eth0").unwrap();
    assert!(
        dir.to_string_lossy()
            .ends_with(&format!("-eth0/abi{}", kept::KEPT_ABI)),
        "{}",
        dir.display()
    );
    let caps = Capacities {
        services: 4,
        servers: 16,
        connections: 1024,
    };
    let key = FlowKey {
        src: Addr::v4_raw(u32::from_ne_bytes([198, 51, 100, 7])),
        dst: Addr::v4_raw(u32::from_ne_bytes([192, 0, 2, 100])),
        sport: 40000u16.to_be(),
        dport: 80u16.to_be(),
        proto: 6,
        _pad: [0; 3],
    };
    let conn = Connection {
        last_seen_ns: 1,
        packets: 7,
        bytes: 700,
        server: 3,
        ..Default::default()
    };
    let pkey = PersistKey {
        client: key.src,
        service: 2,
    };
    let persist = Persist {
        last_seen_ns: 1,
        server: 3,
        _pad: 0,
    };

    let (mut dp, found) = Dataplane::load_kept(caps, &dir).expect("first load");
    assert_eq!(found, Kept::Fresh);
    dp.set_connection(&key, &conn).unwrap();
    dp.set_persist(&pkey, &persist).unwrap();
    drop(dp);
    for (name, ..) in kept::KEPT {
        assert!(dir.join(name).exists(), "{name} pinned");
    }

    // The next load takes them, with what they hold.
    let (dp, found) = Dataplane::load_kept(caps, &dir).expect("second load");
    assert_eq!(found, Kept::Adopted { connections: 1 });
    assert_eq!(dp.connection_entry(&key), Some(conn));
    assert_eq!(dp.persist(&pkey), Some(persist));
    drop(dp);

    // Other tables: the pinned maps do not fit, and are replaced.
    let bigger = Capacities {
        connections: 2048,
        ..caps
    };
    let (dp, found) = Dataplane::load_kept(bigger, &dir).expect("third load");
    assert_eq!(
        found,
        Kept::Replaced("connections holds 1024 entries, the [tables] now 2048".into())
    );
    assert_eq!(dp.connection_entry(&key), None);
    drop(dp);

    kept::unpin(&dir).unwrap();
    assert!(!dir.exists());
    let (_dp, found) = Dataplane::load_kept(bigger, &dir).expect("fourth load");
    assert_eq!(found, Kept::Fresh);
    kept::unpin(&dir).unwrap();
}
