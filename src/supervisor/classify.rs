//! Why a server process ended, judged from its exit status and its last lines of output (pure).

use serde::Serialize;

/// How the process ended, as the OS reported it.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct ExitInfo {
    /// The exit code, when it exited by itself.
    pub code: Option<i32>,
    /// The signal that ended it, when one did.
    pub signal: Option<i32>,
}

/// Why the server exited.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize)]
#[serde(rename_all = "snake_case")]
pub enum ExitReason {
    /// Exit code 0: a stop the runner asked for, or one the server did by itself (`/stop` in game).
    Clean,
    /// A non-zero exit without a more specific cause.
    Crash,
    /// The JVM threw `java.lang.OutOfMemoryError`: the heap is too small.
    OutOfMemory,
    /// SIGKILL the runner did not send, which in a container is the kernel's OOM killer: the memory
    /// limit is too small for heap plus non-heap memory.
    OomKilled,
    /// Minecraft's watchdog stopped a server whose tick hung.
    Watchdog,
    /// The runner killed it after it ignored every gentler stop.
    KilledOnStop,
}

impl ExitReason {
    /// A short static word: metric label, status field and log field.
    pub fn category(self) -> &'static str {
        match self {
            Self::Clean => "clean",
            Self::Crash => "crash",
            Self::OutOfMemory => "oom",
            Self::OomKilled => "oom_killed",
            Self::Watchdog => "watchdog",
            Self::KilledOnStop => "killed_on_stop",
        }
    }

    /// Every reason, for pre-registering metric label values.
    pub const ALL: [ExitReason; 6] =
        [Self::Clean, Self::Crash, Self::OutOfMemory, Self::OomKilled, Self::Watchdog, Self::KilledOnStop];

    /// Whether this exit counts towards the crash limit.
    pub fn is_failure(self) -> bool {
        !matches!(self, Self::Clean | Self::KilledOnStop)
    }
}

const SIGKILL: i32 = 9;

/// Classifies an exit. `killed_by_runner` is true when the runner's stop escalation sent SIGKILL.
pub fn classify(exit: ExitInfo, tail: &[String], killed_by_runner: bool) -> ExitReason {
    if killed_by_runner {
        return ExitReason::KilledOnStop;
    }
    let said = |needle: &str| tail.iter().any(|line| line.contains(needle));
    if said("java.lang.OutOfMemoryError") {
        return ExitReason::OutOfMemory;
    }
    if exit.signal == Some(SIGKILL) {
        return ExitReason::OomKilled;
    }
    if said("The server has stopped responding") || said("Considering it to be crashed, server will forcibly shutdown")
    {
        return ExitReason::Watchdog;
    }
    if exit.code == Some(0) {
        return ExitReason::Clean;
    }
    ExitReason::Crash
}

#[cfg(test)]
mod tests {
    use super::*;

    fn lines(text: &str) -> Vec<String> {
        text.lines().map(str::to_owned).collect()
    }

    #[test]
    fn exits_are_classified_by_status_and_output() {
        let code = |c| ExitInfo { code: Some(c), signal: None };
        let signal = |s| ExitInfo { code: None, signal: Some(s) };
        let cases = [
            (code(0), "[Server thread/INFO]: Stopping the server", false, ExitReason::Clean),
            (code(1), "Exception in thread \"main\" java.lang.IllegalStateException", false, ExitReason::Crash),
            (
                code(1),
                "Exception in thread \"Server thread\" java.lang.OutOfMemoryError: Java heap space",
                false,
                ExitReason::OutOfMemory,
            ),
            (code(3), "Terminating due to java.lang.OutOfMemoryError: Java heap space", false, ExitReason::OutOfMemory),
            (signal(9), "[Server thread/INFO]: Done (3.2s)!", false, ExitReason::OomKilled),
            (signal(9), "[Server thread/INFO]: Stopping the server", true, ExitReason::KilledOnStop),
            (
                code(1),
                "[Server Watchdog/ERROR]: A single server tick took 60.00 seconds (should be max 0.05)\n[Server Watchdog/ERROR]: Considering it to be crashed, server will forcibly shutdown.",
                false,
                ExitReason::Watchdog,
            ),
            (signal(15), "", false, ExitReason::Crash),
        ];
        for (exit, output, killed, want) in cases {
            assert_eq!(classify(exit, &lines(output), killed), want, "{exit:?} {output}");
        }
    }

    #[test]
    fn only_unexpected_exits_count_as_failures() {
        assert!(!ExitReason::Clean.is_failure());
        assert!(!ExitReason::KilledOnStop.is_failure());
        assert!(ExitReason::OutOfMemory.is_failure() && ExitReason::Crash.is_failure());
        let categories: std::collections::HashSet<_> = ExitReason::ALL.iter().map(|r| r.category()).collect();
        assert_eq!(categories.len(), ExitReason::ALL.len());
    }
}
