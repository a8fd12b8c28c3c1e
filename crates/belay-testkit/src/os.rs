//! The few raw Unix calls the test kit needs: user lookup, dropping privileges and
//! arming a parent-death signal in the child before `exec`, signalling process groups and
//! registering an exit hook. Everything `unsafe` in the crate lives here, behind safe wrappers.

// The workspace denies unsafe code; this module is the one place that needs it, because std
// has no safe API for getpwnam_r, setuid/setgid/setgroups, prctl(PR_SET_PDEATHSIG), kill
// and atexit. Each block is a direct libc call with checked arguments.
#![allow(unsafe_code)]

use std::ffi::CString;
use std::io;
use std::os::unix::process::CommandExt;
use std::process::Command;

/// The OS identity a PostgreSQL process runs as when the test process itself is root.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) struct RunAs {
    pub(crate) uid: u32,
    pub(crate) gid: u32,
}

pub(crate) fn euid() -> u32 {
    // SAFETY: geteuid has no preconditions and cannot fail.
    unsafe { libc::geteuid() }
}

/// Looks up an OS user by name; `Ok(None)` when it does not exist.
pub(crate) fn lookup_user(name: &str) -> io::Result<Option<RunAs>> {
    let cname = CString::new(name).map_err(io::Error::other)?;
    let mut buf: Vec<libc::c_char> = vec![0; 16 * 1024];
    loop {
        // SAFETY: zeroed passwd is a valid out-parameter; getpwnam_r only writes into `pwd`
        // and `buf` (whose true length we pass) and sets `result` to null or to `&pwd`.
        let (rc, found, ids) = unsafe {
            let mut pwd: libc::passwd = std::mem::zeroed();
            let mut result: *mut libc::passwd = std::ptr::null_mut();
            let rc = libc::getpwnam_r(
                cname.as_ptr(),
                &mut pwd,
                buf.as_mut_ptr(),
                buf.len(),
                &mut result,
            );
            (
                rc,
                !result.is_null(),
                RunAs {
                    uid: pwd.pw_uid,
                    gid: pwd.pw_gid,
                },
            )
        };
        match rc {
            0 => return Ok(found.then_some(ids)),
            libc::ERANGE if buf.len() < 1024 * 1024 => buf.resize(buf.len() * 2, 0),
            // Some libcs report "no such user" as an error code instead of a null result.
            libc::ENOENT | libc::ESRCH | libc::EBADF | libc::EPERM => return Ok(None),
            code => return Err(io::Error::from_raw_os_error(code)),
        }
    }
}

/// Prepares `cmd` so that the child:
/// - leads its own process group (so [`signal_group`] reaches the postmaster and all its
///   backends, and a terminal's Ctrl-C reaches the test process, not the server directly);
/// - runs as `run_as` when given (PostgreSQL refuses to run as root);
/// - when `die_with_parent`, receives SIGQUIT (PostgreSQL's immediate shutdown) when the
///   spawning *thread* exits, so a crashed or killed test process never leaks a server.
pub(crate) fn prepare_child(cmd: &mut Command, run_as: Option<RunAs>, die_with_parent: bool) {
    let parent = std::process::id();
    let hook = move || -> io::Result<()> {
        // Only async-signal-safe calls below (we are between fork and exec), and no
        // allocation: errors are built from raw errno values.
        // SAFETY: plain syscalls on the calling (child) process with valid arguments.
        unsafe {
            if libc::setpgid(0, 0) != 0 {
                return Err(io::Error::last_os_error());
            }
            if let Some(ids) = run_as
                && (libc::setgroups(1, &ids.gid) != 0
                    || libc::setgid(ids.gid) != 0
                    || libc::setuid(ids.uid) != 0)
            {
                return Err(io::Error::last_os_error());
            }
            #[cfg(target_os = "linux")]
            if die_with_parent {
                // Must come after setuid/setgid: changing credentials clears the setting.
                if libc::prctl(libc::PR_SET_PDEATHSIG, libc::SIGQUIT) != 0 {
                    return Err(io::Error::last_os_error());
                }
                // The parent may have died before prctl took effect.
                if libc::getppid() as u32 != parent {
                    return Err(io::Error::from_raw_os_error(libc::ESRCH));
                }
            }
        }
        let _ = (parent, die_with_parent);
        Ok(())
    };
    // SAFETY: the hook only performs async-signal-safe syscalls and does not allocate.
    unsafe {
        cmd.pre_exec(hook);
    }
}

/// Sends `sig` to one process. A process that is already gone is not an error.
pub(crate) fn signal(pid: u32, sig: libc::c_int) -> io::Result<()> {
    send(pid as libc::pid_t, sig)
}

/// Sends `sig` to every process in the group led by `pgid`.
pub(crate) fn signal_group(pgid: u32, sig: libc::c_int) -> io::Result<()> {
    send(-(pgid as libc::pid_t), sig)
}

fn send(target: libc::pid_t, sig: libc::c_int) -> io::Result<()> {
    // Never signal "every process we can" (0 or -1): a bug must not become a mass kill.
    if target == 0 || target == -1 {
        return Err(io::Error::from_raw_os_error(libc::EINVAL));
    }
    // SAFETY: kill has no memory-safety preconditions.
    if unsafe { libc::kill(target, sig) } == 0 {
        return Ok(());
    }
    let err = io::Error::last_os_error();
    match err.raw_os_error() {
        Some(libc::ESRCH) => Ok(()),
        _ => Err(err),
    }
}

/// Whether a process with this pid exists (zombies included).
pub(crate) fn alive(pid: u32) -> bool {
    exists(pid as libc::pid_t)
}

/// Whether any process remains in the group led by `pgid`.
pub(crate) fn group_alive(pgid: u32) -> bool {
    exists(-(pgid as libc::pid_t))
}

fn exists(target: libc::pid_t) -> bool {
    if target == 0 || target == -1 {
        return false;
    }
    // SAFETY: signal 0 only checks for existence and permission.
    if unsafe { libc::kill(target, 0) } == 0 {
        return true;
    }
    io::Error::last_os_error().raw_os_error() == Some(libc::EPERM)
}

/// Registers `hook` to run when the process exits normally (after `main` returns, which is
/// how the test harness ends).
pub(crate) fn at_exit(hook: extern "C" fn()) -> io::Result<()> {
    // SAFETY: `hook` is a plain `extern "C" fn` with 'static lifetime.
    if unsafe { libc::atexit(hook) } == 0 {
        Ok(())
    } else {
        Err(io::Error::other("atexit registration failed"))
    }
}

pub(crate) use libc::{SIGINT, SIGKILL};
