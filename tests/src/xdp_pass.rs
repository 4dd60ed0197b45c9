//! A pass-through XDP program for the far ends of the lab's veths.
//!
//! A veth only moves frames that XDP sent back out (XDP_TX) on to its peer when the peer's
//! receive side runs in XDP mode: with GRO alone the frames wait in the peer's ring until
//! some other packet wakes it. Real NICs have no such peer, so the lab gives every switch
//! port a two-instruction program that passes everything. It is loaded straight through the
//! bpf(2) system call (no eBPF toolchain needed, so xtask can build labs before set-up) and
//! attached through netlink, where it stays until the namespace goes.

use std::{
    os::fd::{AsRawFd, FromRawFd, OwnedFd},
    sync::OnceLock,
};

use lb_common::xdp_link;

const BPF_PROG_LOAD: libc::c_long = 5;
const BPF_PROG_TYPE_XDP: u32 = 6;
const XDP_PASS: i32 = 2;
/// BPF_F_XDP_HAS_FRAGS: the program takes frames bigger than a page, so a veth with a jumbo
/// MTU (9000) accepts it in driver mode.
const BPF_F_XDP_HAS_FRAGS: u32 = 1 << 5;

/// `r0 = XDP_PASS; exit`.
fn program() -> [u64; 2] {
    // struct bpf_insn { u8 code; u8 dst:4, src:4; s16 off; s32 imm; }, little-endian.
    let mov_r0 = 0xb7u64 | ((XDP_PASS as u32 as u64) << 32);
    let exit = 0x95u64;
    [mov_r0, exit]
}

fn load() -> std::io::Result<OwnedFd> {
    let insns = program();
    let license = b"GPL\0";
    let name = b"lab_pass";
    // union bpf_attr, BPF_PROG_LOAD part: prog_type, insn_cnt, insns, license, log_level,
    // log_size, log_buf, kern_version, prog_flags (at 44), prog_name[16] (at 48).
    let mut attr = [0u8; 128];
    attr[0..4].copy_from_slice(&BPF_PROG_TYPE_XDP.to_ne_bytes());
    attr[4..8].copy_from_slice(&(insns.len() as u32).to_ne_bytes());
    attr[8..16].copy_from_slice(&(insns.as_ptr() as u64).to_ne_bytes());
    attr[16..24].copy_from_slice(&(license.as_ptr() as u64).to_ne_bytes());
    attr[44..48].copy_from_slice(&BPF_F_XDP_HAS_FRAGS.to_ne_bytes());
    attr[48..48 + name.len()].copy_from_slice(name);
    // SAFETY: attr is a valid bpf_attr for BPF_PROG_LOAD; the pointers outlive the call.
    let fd = unsafe {
        libc::syscall(
            libc::SYS_bpf,
            BPF_PROG_LOAD,
            attr.as_ptr(),
            attr.len() as libc::c_uint,
        )
    };
    if fd < 0 {
        return Err(std::io::Error::last_os_error());
    }
    // SAFETY: the kernel returned a new fd we own.
    Ok(unsafe { OwnedFd::from_raw_fd(fd as i32) })
}

fn prog_fd() -> i32 {
    static FD: OnceLock<OwnedFd> = OnceLock::new();
    FD.get_or_init(|| load().unwrap_or_else(|e| panic!("loading the lab's XDP pass program: {e}")))
        .as_raw_fd()
}

/// Attaches the pass program in driver mode to interface `ifindex` of the calling thread's
/// network namespace.
pub fn attach(ifindex: u32) -> std::io::Result<()> {
    let socket = xdp_link::socket()?;
    xdp_link::set(&socket, ifindex, Some(prog_fd()), xdp_link::DRV_MODE)
}
