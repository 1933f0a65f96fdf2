//! PID 1 duty. In a container the agent is the first process, and PID 1 has two jobs no other
//! process has: orphans are re-parented to it (it must reap them, or they stay zombies), and the
//! kernel delivers it no signal it has not installed a handler for. So when the agent finds itself
//! PID 1 it becomes a small init: it starts the agent proper as its child (the same binary and
//! arguments), forwards the signals a container gets to it, reaps every child that exits, and exits
//! with the agent's status. The image then needs no init package.

use std::process::{Command, ExitCode};

use nix::sys::signal::{self, SigSet, Signal};
use nix::sys::wait::{WaitPidFlag, WaitStatus, waitpid};
use nix::unistd::Pid;

/// Set in the agent proper's environment, so it does not start another init.
const CHILD_ENV: &str = "ATLAS_INIT_CHILD";

/// The signals forwarded to the agent proper.
const FORWARDED: [Signal; 6] =
    [Signal::SIGTERM, Signal::SIGINT, Signal::SIGHUP, Signal::SIGQUIT, Signal::SIGUSR1, Signal::SIGUSR2];

/// Clears the signal mask this process inherited: the agent proper started by [`run`] inherits the
/// signals init blocked (the standard library does not reset the mask of a child it spawns), and a
/// blocked SIGTERM would never reach it. Call before any thread starts.
pub fn unblock_signals() {
    if let Err(e) = SigSet::empty().thread_set_mask() {
        eprintln!("atlas-runner: clearing the signal mask failed: {e}");
    }
}

/// Whether this process must act as init: it is PID 1 and not already the agent proper.
pub fn needed() -> bool {
    std::process::id() == 1 && std::env::var_os(CHILD_ENV).is_none()
}

/// Runs as init until the agent proper exits; returns its exit status. Call before any thread or
/// async runtime starts (the signal mask set here must be every thread's).
pub fn run() -> ExitCode {
    match supervise() {
        Ok(code) => code,
        Err(e) => {
            eprintln!("atlas-runner (init): {e}");
            ExitCode::FAILURE
        }
    }
}

fn supervise() -> Result<ExitCode, String> {
    let mut set = SigSet::empty();
    for signal in FORWARDED {
        set.add(signal);
    }
    set.add(Signal::SIGCHLD);
    // Blocked before the child starts, so none is lost; waited for below. The child inherits the
    // mask and clears it first thing ([`unblock_signals`]).
    set.thread_block().map_err(|e| format!("block signals: {e}"))?;
    let exe = std::env::current_exe().map_err(|e| format!("find this program: {e}"))?;
    let child = Command::new(&exe)
        .args(std::env::args_os().skip(1))
        .env(CHILD_ENV, "1")
        .spawn()
        .map_err(|e| format!("start the agent {}: {e}", exe.display()))?;
    let agent = Pid::from_raw(i32::try_from(child.id()).map_err(|e| format!("child pid: {e}"))?);
    loop {
        let signal = set.wait().map_err(|e| format!("wait for a signal: {e}"))?;
        if signal != Signal::SIGCHLD {
            // The agent may be gone already; its exit is collected below.
            let _ = signal::kill(agent, signal);
            continue;
        }
        // One SIGCHLD may stand for several children: reap all there are.
        loop {
            match waitpid(Pid::from_raw(-1), Some(WaitPidFlag::WNOHANG)) {
                Ok(WaitStatus::Exited(pid, code)) if pid == agent => {
                    return Ok(ExitCode::from(u8::try_from(code).unwrap_or(1)));
                }
                Ok(WaitStatus::Signaled(pid, signal, _)) if pid == agent => {
                    return Ok(ExitCode::from(128u8.saturating_add(u8::try_from(signal as i32).unwrap_or(0))));
                }
                Ok(WaitStatus::StillAlive) | Err(nix::errno::Errno::ECHILD) => break,
                Ok(_) => continue,
                Err(nix::errno::Errno::EINTR) => continue,
                Err(e) => return Err(format!("reap children: {e}")),
            }
        }
    }
}
