//! Whether this kernel runs compat (32-bit) system calls. Their `setsockopt` never reaches
//! the `cgroup/setsockopt` hook (`do_sock_setsockopt` runs it for native calls only), so
//! where they run, a sandbox process can set the options that hook refuses (`IP_FREEBIND`,
//! `IP_TRANSPARENT`, multicast memberships and their IPv6 forms) with `int $0x80`, from a
//! 64-bit binary, without any capability. The daemon does not refuse them; it says so
//! (`egressctl status`, the daemon's log).
use std::io;

/// `Ok(())` when compat calls cannot set socket options unseen here (the kernel runs none);
/// `Err(why)` when they can.
pub fn compat_setsockopt_coverage() -> Result<(), String> {
    match compat_calls_run() {
        Ok(false) => Ok(()),
        Ok(true) => Err(
            "the kernel runs 32-bit (IA-32) system calls, whose setsockopt no cgroup hook \
             sees: a sandbox can set source-address and multicast options with int $0x80 \
             (boot with ia32_emulation=0, or refuse 32-bit calls by seccomp)"
                .to_owned(),
        ),
        Err(e) => Err(format!(
            "cannot tell whether the kernel runs 32-bit calls: {e}"
        )),
    }
}

/// Whether a 32-bit call works here: a child process makes the i386 `getpid` (20) with
/// `int $0x80`. It answers the child's pid where the kernel runs 32-bit calls; where it
/// runs none the instruction faults (SIGSEGV) or the call answers ENOSYS. Anything else
/// (the daemon's own seccomp filter killing the child with SIGSYS, or refusing the call
/// with another error, as systemd's `SystemCallArchitectures=native` does) says nothing
/// about what sandboxes, which are not under that filter, can do: an error.
#[cfg(target_arch = "x86_64")]
fn compat_calls_run() -> io::Result<bool> {
    /// The child's exit statuses.
    const RUNS: i32 = 0;
    const ENOSYS: i32 = 3;
    const OTHER: i32 = 4;
    // SAFETY: the child runs only the system calls below before `_exit`, all of them
    // async-signal-safe, as a child of a multi-threaded process must.
    let pid = unsafe { libc::fork() };
    if pid < 0 {
        return Err(io::Error::last_os_error());
    }
    if pid == 0 {
        let answer: i64;
        // SAFETY: i386 getpid has no arguments and no effect; `int $0x80` in 64-bit mode
        // may clear r8-r11.
        unsafe {
            core::arch::asm!(
                "int 0x80",
                inlateout("rax") 20i64 => answer,
                out("r8") _, out("r9") _, out("r10") _, out("r11") _,
                options(nostack),
            );
            let own = i64::from(libc::getpid());
            libc::_exit(match answer {
                a if a == own => RUNS,
                a if a == -i64::from(libc::ENOSYS) => ENOSYS,
                _ => OTHER,
            });
        }
    }
    let mut status = 0;
    // SAFETY: waits for the child just made.
    if unsafe { libc::waitpid(pid, &mut status, 0) } < 0 {
        return Err(io::Error::last_os_error());
    }
    match (libc::WIFEXITED(status), libc::WIFSIGNALED(status)) {
        (true, _) if libc::WEXITSTATUS(status) == RUNS => Ok(true),
        (true, _) if libc::WEXITSTATUS(status) == ENOSYS => Ok(false),
        (_, true) if libc::WTERMSIG(status) == libc::SIGSEGV => Ok(false),
        (_, true) => Err(io::Error::other(format!(
            "a 32-bit call was stopped by signal {} in the daemon (its own seccomp filter, \
             which sandboxes are not under)",
            libc::WTERMSIG(status)
        ))),
        _ => Err(io::Error::other(
            "a 32-bit call was refused in the daemon (its own seccomp filter, which \
             sandboxes are not under)",
        )),
    }
}

/// No other architecture this daemon builds for has 32-bit calls that skip the hook.
#[cfg(not(target_arch = "x86_64"))]
fn compat_calls_run() -> io::Result<bool> {
    Ok(false)
}

#[cfg(test)]
mod tests {
    /// The answer is one or the other, never an error, and asking twice agrees.
    #[test]
    fn compat_calls_are_told_apart() {
        let first = super::compat_calls_run();
        assert!(first.is_ok(), "{first:?}");
        assert_eq!(first.ok(), super::compat_calls_run().ok());
    }
}
