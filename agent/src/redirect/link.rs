//! The bpf_link operations aya 0.14 does not offer for cgroup links: open a pinned link as
//! a plain fd, swap the program behind a link in place, force-detach a link whatever
//! holds it, and ask which cgroup a link is attached to. Each is one bpf(2) command.
//!
//! Why in place: an upgraded agent must replace the running programs without a moment in
//! which none is attached (connects in that moment would not be caught) and without one
//! in which both run. BPF_LINK_UPDATE swaps the program of an attached link atomically.
//! Why force-detach: `switchyard uninstall` must remove the programs even while an agent
//! process still holds an fd of the link, which would otherwise keep it attached.

use std::{
    ffi::CString,
    io,
    os::{
        fd::{AsRawFd as _, BorrowedFd, FromRawFd as _, OwnedFd},
        unix::ffi::OsStrExt as _,
    },
    path::Path,
};

/// bpf(2) commands, from include/uapi/linux/bpf.h (stable ABI).
const BPF_OBJ_GET: libc::c_long = 7;
const BPF_OBJ_GET_INFO_BY_FD: libc::c_long = 15;
const BPF_LINK_UPDATE: libc::c_long = 29;
const BPF_LINK_DETACH: libc::c_long = 34;

/// `bpf_attr` for BPF_OBJ_GET.
#[repr(C)]
struct ObjGet {
    pathname: u64,
    bpf_fd: u32,
    file_flags: u32,
}

/// `bpf_attr.link_update`.
#[repr(C)]
struct LinkUpdate {
    link_fd: u32,
    new_prog_fd: u32,
    flags: u32,
    old_prog_fd: u32,
}

/// `bpf_attr.link_detach`.
#[repr(C)]
struct LinkDetach {
    link_fd: u32,
}

/// `bpf_attr.info`.
#[repr(C)]
struct InfoByFd {
    bpf_fd: u32,
    info_len: u32,
    info: u64,
}

/// The head of `struct bpf_link_info` with its `cgroup` union member: the kernel fills in
/// as many bytes as we ask for, so this prefix is all we need.
#[repr(C)]
#[derive(Default)]
struct CgroupLinkInfo {
    type_: u32,
    _id: u32,
    _prog_id: u32,
    _pad: u32,
    cgroup_id: u64,
    _attach_type: u32,
    _pad2: u32,
}

/// BPF_LINK_TYPE_CGROUP.
const LINK_TYPE_CGROUP: u32 = 3;

fn bpf<T>(cmd: libc::c_long, attr: &mut T) -> io::Result<libc::c_long> {
    // SAFETY: `attr` is a live, properly sized #[repr(C)] prefix of `union bpf_attr`; the
    // kernel reads (and for info, writes) at most size_of::<T>() bytes of it, and any
    // pointer inside it points at memory that outlives the call.
    let rc = unsafe { libc::syscall(libc::SYS_bpf, cmd, attr as *mut T, std::mem::size_of::<T>() as libc::c_uint) };
    if rc < 0 { Err(io::Error::last_os_error()) } else { Ok(rc) }
}

/// An fd of the link pinned at `path`.
pub fn open_pinned(path: &Path) -> io::Result<OwnedFd> {
    let c_path =
        CString::new(path.as_os_str().as_bytes()).map_err(|e| io::Error::new(io::ErrorKind::InvalidInput, e))?;
    let mut attr = ObjGet { pathname: c_path.as_ptr() as u64, bpf_fd: 0, file_flags: 0 };
    let fd = bpf(BPF_OBJ_GET, &mut attr)?;
    // SAFETY: BPF_OBJ_GET returned a new fd that nothing else owns.
    Ok(unsafe { OwnedFd::from_raw_fd(fd as i32) })
}

/// Make `link` run `prog` from now on. The old program stops and the new one starts for
/// the next hook invocation; no invocation runs neither or both.
pub fn update(link: BorrowedFd<'_>, prog: BorrowedFd<'_>) -> io::Result<()> {
    let mut attr =
        LinkUpdate { link_fd: link.as_raw_fd() as u32, new_prog_fd: prog.as_raw_fd() as u32, flags: 0, old_prog_fd: 0 };
    bpf(BPF_LINK_UPDATE, &mut attr).map(drop)
}

/// Detach `link` now, even though other fds (a pin, a running agent) still refer to it.
pub fn detach(link: BorrowedFd<'_>) -> io::Result<()> {
    let mut attr = LinkDetach { link_fd: link.as_raw_fd() as u32 };
    bpf(BPF_LINK_DETACH, &mut attr).map(drop)
}

/// The id of the cgroup `link` is attached to (the cgroup directory's inode number), or
/// None for a link that is not a cgroup link or whose cgroup is gone.
pub fn cgroup_id(link: BorrowedFd<'_>) -> io::Result<Option<u64>> {
    let mut info = CgroupLinkInfo::default();
    let mut attr = InfoByFd {
        bpf_fd: link.as_raw_fd() as u32,
        info_len: std::mem::size_of::<CgroupLinkInfo>() as u32,
        info: &mut info as *mut CgroupLinkInfo as u64,
    };
    bpf(BPF_OBJ_GET_INFO_BY_FD, &mut attr)?;
    Ok((info.type_ == LINK_TYPE_CGROUP && info.cgroup_id != 0).then_some(info.cgroup_id))
}
