//! The tables as files under `[control] mount`, as TCL has them under /proc/net/cluster:
//! `cat` reads a table, `echo VALUE >` writes one. Each open takes a snapshot of the table
//! (so one `cat` sees one consistent table); a write is applied as it arrives and a bad
//! value fails the write with EINVAL, changing nothing.

use std::{
    collections::HashMap,
    ffi::OsStr,
    path::Path,
    sync::{
        Mutex,
        atomic::{AtomicU64, Ordering},
    },
    time::{Duration, SystemTime},
};

use fuser::{
    Config, Errno, FileAttr, FileHandle, FileType, Filesystem, FopenFlags, INodeNo, LockOwner,
    MountOption, OpenFlags, ReplyAttr, ReplyData, ReplyDirectory, ReplyEmpty, ReplyEntry,
    ReplyOpen, ReplyWrite, Request as FuseRequest, WriteFlags,
};
use tokio::sync::mpsc;

use crate::{
    control::{Call, Request, ask_blocking},
    tables::{MAX_WRITE, Table},
};

/// A mounted table directory; unmounted when dropped.
pub struct Mount {
    _session: fuser::BackgroundSession,
}

/// Mounts the tables at `path` (created if missing; a stale mount left by a killed daemon is
/// detached first).
pub fn mount(path: &Path, tx: mpsc::Sender<Call>) -> std::io::Result<Mount> {
    std::fs::create_dir_all(path).or_else(|e| {
        // A dead FUSE mount answers ENOTCONN: detach it and try again.
        detach(path);
        std::fs::create_dir_all(path).map_err(|_| e)
    })?;
    detach(path);
    let fs = Tables {
        tx,
        snapshots: Mutex::new(HashMap::new()),
        next: AtomicU64::new(1),
    };
    let mut config = Config::default();
    config.mount_options = vec![
        MountOption::FSName("lb".into()),
        MountOption::Subtype("lb".into()),
        MountOption::DefaultPermissions,
        MountOption::NoDev,
        MountOption::NoSuid,
        MountOption::NoExec,
    ];
    config.n_threads = Some(1);
    let session = fuser::spawn_mount(fs, path, &config)?;
    Ok(Mount { _session: session })
}

/// Lazily unmounts whatever is mounted at `path` (ignored if nothing is).
fn detach(path: &Path) {
    if let Ok(c) = std::ffi::CString::new(path.as_os_str().as_encoded_bytes()) {
        // SAFETY: a valid C string; the call only affects mounts.
        unsafe { libc::umount2(c.as_ptr(), libc::MNT_DETACH) };
    }
}

const ROOT: u64 = 1;

fn ino_of(t: Table) -> u64 {
    ROOT + 1 + Table::ALL.iter().position(|x| *x == t).expect("a table") as u64
}

fn table_of(ino: u64) -> Option<Table> {
    Table::ALL.get(ino.checked_sub(ROOT + 1)? as usize).copied()
}

fn attr(ino: u64) -> FileAttr {
    let now = SystemTime::now();
    let (kind, perm, nlink) = match table_of(ino) {
        None => (FileType::Directory, 0o755, 2),
        Some(t) if t.writable() => (FileType::RegularFile, 0o644, 1),
        Some(_) => (FileType::RegularFile, 0o444, 1),
    };
    FileAttr {
        ino: INodeNo(ino),
        // The content is made at open; direct I/O makes the kernel read until EOF anyway.
        size: 0,
        blocks: 0,
        atime: now,
        mtime: now,
        ctime: now,
        crtime: now,
        kind,
        perm,
        nlink,
        uid: 0,
        gid: 0,
        rdev: 0,
        flags: 0,
        blksize: 4096,
    }
}

struct Tables {
    tx: mpsc::Sender<Call>,
    /// Open file handle -> the table's text when it was opened.
    snapshots: Mutex<HashMap<u64, Vec<u8>>>,
    next: AtomicU64,
}

impl Filesystem for Tables {
    fn lookup(&self, _req: &FuseRequest, parent: INodeNo, name: &OsStr, reply: ReplyEntry) {
        crate::background_thread();
        // The ATM's tables only: a real server's (decap) is not mounted.
        let t = name
            .to_str()
            .and_then(Table::from_name)
            .filter(|t| Table::ALL.contains(t));
        match (u64::from(parent), t) {
            (ROOT, Some(t)) => reply.entry(&Duration::ZERO, &attr(ino_of(t)), fuser::Generation(0)),
            _ => reply.error(Errno::ENOENT),
        }
    }

    fn getattr(&self, _req: &FuseRequest, ino: INodeNo, _fh: Option<FileHandle>, reply: ReplyAttr) {
        crate::background_thread();
        let ino = u64::from(ino);
        if ino == ROOT || table_of(ino).is_some() {
            reply.attr(&Duration::ZERO, &attr(ino));
        } else {
            reply.error(Errno::ENOENT);
        }
    }

    #[allow(clippy::too_many_arguments)]
    fn setattr(
        &self,
        _req: &FuseRequest,
        ino: INodeNo,
        _mode: Option<u32>,
        _uid: Option<u32>,
        _gid: Option<u32>,
        _size: Option<u64>,
        _atime: Option<fuser::TimeOrNow>,
        _mtime: Option<fuser::TimeOrNow>,
        _ctime: Option<SystemTime>,
        _fh: Option<FileHandle>,
        _crtime: Option<SystemTime>,
        _chgtime: Option<SystemTime>,
        _bkuptime: Option<SystemTime>,
        _flags: Option<fuser::BsdFileFlags>,
        reply: ReplyAttr,
    ) {
        // `echo > file` truncates first; there is nothing to truncate.
        reply.attr(&Duration::ZERO, &attr(u64::from(ino)));
    }

    fn open(&self, _req: &FuseRequest, ino: INodeNo, flags: OpenFlags, reply: ReplyOpen) {
        crate::background_thread();
        let Some(t) = table_of(u64::from(ino)) else {
            reply.error(Errno::EISDIR);
            return;
        };
        let accmode = flags.0 & libc::O_ACCMODE;
        if accmode != libc::O_RDONLY && !t.writable() {
            reply.error(Errno::EACCES);
            return;
        }
        let fh = self.next.fetch_add(1, Ordering::Relaxed);
        if accmode != libc::O_WRONLY {
            let resp = ask_blocking(
                &self.tx,
                Request::Cat {
                    table: t.name().into(),
                },
            );
            let Some(text) = resp.text.filter(|_| resp.ok) else {
                reply.error(Errno::EIO);
                return;
            };
            self.snapshots
                .lock()
                .expect("snapshots lock")
                .insert(fh, text.into_bytes());
        }
        reply.opened(FileHandle(fh), FopenFlags::FOPEN_DIRECT_IO);
    }

    #[allow(clippy::too_many_arguments)]
    fn read(
        &self,
        _req: &FuseRequest,
        _ino: INodeNo,
        fh: FileHandle,
        offset: u64,
        size: u32,
        _flags: OpenFlags,
        _lock_owner: Option<LockOwner>,
        reply: ReplyData,
    ) {
        let snapshots = self.snapshots.lock().expect("snapshots lock");
        let Some(data) = snapshots.get(&fh.0) else {
            reply.error(Errno::EBADF);
            return;
        };
        let start = (offset as usize).min(data.len());
        let end = (start + size as usize).min(data.len());
        reply.data(&data[start..end]);
    }

    #[allow(clippy::too_many_arguments)]
    fn write(
        &self,
        _req: &FuseRequest,
        ino: INodeNo,
        _fh: FileHandle,
        offset: u64,
        data: &[u8],
        _write_flags: WriteFlags,
        _flags: OpenFlags,
        _lock_owner: Option<LockOwner>,
        reply: ReplyWrite,
    ) {
        let Some(t) = table_of(u64::from(ino)) else {
            reply.error(Errno::EISDIR);
            return;
        };
        // A value comes whole in one write (`echo 100 > timeout`). The kernel splits a big
        // write into pieces; applying the first piece alone would apply part of a value.
        if offset != 0 || data.len() > MAX_WRITE {
            tracing::warn!(
                "Refused write to {}: {} bytes at offset {offset}; a table takes one value \
                 of at most {MAX_WRITE} bytes in a single write",
                t.name(),
                data.len()
            );
            reply.error(Errno::EINVAL);
            return;
        }
        let Ok(value) = std::str::from_utf8(data) else {
            reply.error(Errno::EINVAL);
            return;
        };
        let resp = ask_blocking(
            &self.tx,
            Request::Write {
                table: t.name().into(),
                value: value.into(),
            },
        );
        if resp.ok {
            reply.written(data.len() as u32);
        } else if !t.writable() {
            reply.error(Errno::EACCES);
        } else {
            reply.error(Errno::EINVAL);
        }
    }

    fn flush(
        &self,
        _req: &FuseRequest,
        _ino: INodeNo,
        _fh: FileHandle,
        _lo: LockOwner,
        reply: ReplyEmpty,
    ) {
        reply.ok();
    }

    fn release(
        &self,
        _req: &FuseRequest,
        _ino: INodeNo,
        fh: FileHandle,
        _flags: OpenFlags,
        _lock_owner: Option<LockOwner>,
        _flush: bool,
        reply: ReplyEmpty,
    ) {
        self.snapshots.lock().expect("snapshots lock").remove(&fh.0);
        reply.ok();
    }

    fn readdir(
        &self,
        _req: &FuseRequest,
        ino: INodeNo,
        _fh: FileHandle,
        offset: u64,
        mut reply: ReplyDirectory,
    ) {
        if u64::from(ino) != ROOT {
            reply.error(Errno::ENOTDIR);
            return;
        }
        let mut entries = vec![
            (ROOT, FileType::Directory, "."),
            (ROOT, FileType::Directory, ".."),
        ];
        for t in Table::ALL {
            entries.push((ino_of(t), FileType::RegularFile, t.name()));
        }
        for (i, (ino, kind, name)) in entries.into_iter().enumerate().skip(offset as usize) {
            if reply.add(INodeNo(ino), (i + 1) as u64, kind, name) {
                break;
            }
        }
        reply.ok();
    }
}
