//! The service manager's side channel (systemd's `sd_notify` protocol, `Type=notify`):
//! `READY=1` once the actor tree trains, `STATUS=` lines saying what the daemon does
//! (shown by `systemctl status`), `STOPPING=1` from a stop request on, and `WATCHDOG=1`
//! pings when the unit sets `WatchdogSec=`, sent from the control actor's heartbeat while
//! the tree runs, so a process whose actor system has stopped answering is killed and
//! restarted by the manager.
//!
//! Without `NOTIFY_SOCKET` in the environment (not started by a manager that asks for it)
//! every call does nothing. Datagrams are sent without waiting; a failed send is ignored
//! (the manager going away must not stop training).
//!
//! Owns: the notification socket and the watchdog's pace. Knows nothing of training.

use std::os::unix::net::{SocketAddr, UnixDatagram};
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::OnceLock;
use std::time::{Duration, Instant};

/// Where to send, and how often to ping the watchdog (`None`: no watchdog).
struct Channel {
    socket: UnixDatagram,
    addr: SocketAddr,
    ping_every: Option<Duration>,
}

fn channel() -> Option<&'static Channel> {
    static CH: OnceLock<Option<Channel>> = OnceLock::new();
    CH.get_or_init(|| {
        let path = std::env::var_os("NOTIFY_SOCKET")?;
        let addr = address(&path)?;
        let socket = UnixDatagram::unbound().ok()?;
        socket.set_nonblocking(true).ok()?;
        Some(Channel {
            socket,
            addr,
            ping_every: watchdog_interval(
                std::env::var("WATCHDOG_USEC").ok().as_deref(),
                std::env::var("WATCHDOG_PID").ok().as_deref(),
                std::process::id(),
            ),
        })
    })
    .as_ref()
}

/// The socket address of `NOTIFY_SOCKET`: a path, or `@NAME` in the abstract namespace.
fn address(path: &std::ffi::OsStr) -> Option<SocketAddr> {
    use std::os::unix::ffi::OsStrExt;
    let bytes = path.as_bytes();
    match bytes.first()? {
        b'@' => {
            #[cfg(target_os = "linux")]
            {
                use std::os::linux::net::SocketAddrExt;
                SocketAddr::from_abstract_name(&bytes[1..]).ok()
            }
            #[cfg(not(target_os = "linux"))]
            {
                None
            }
        }
        b'/' => SocketAddr::from_pathname(path).ok(),
        _ => None,
    }
}

/// How often to ping: half the watchdog period, as `sd_watchdog_enabled` advises; none
/// when the period is absent or zero, or when the watchdog is meant for another process
/// (`WATCHDOG_PID`).
pub fn watchdog_interval(usec: Option<&str>, pid: Option<&str>, me: u32) -> Option<Duration> {
    if let Some(p) = pid {
        if p.trim().parse::<u32>().ok()? != me {
            return None;
        }
    }
    let us = usec?.trim().parse::<u64>().ok().filter(|&u| u > 0)?;
    Some(Duration::from_micros(us / 2))
}

/// Sends one notification (newline-separated `KEY=VALUE` lines).
fn send(msg: &str) {
    if let Some(ch) = channel() {
        let _ = ch.socket.send_to_addr(msg.as_bytes(), &ch.addr);
    }
}

/// What the daemon is doing (`systemctl status` shows it).
pub fn status(text: &str) {
    // one line: a newline would start another assignment
    send(&format!("STATUS={}", text.replace('\n', " ")));
}

/// The tree trains: the service is up.
pub fn ready(text: &str) {
    send(&format!("READY=1\nSTATUS={}", text.replace('\n', " ")));
}

/// The daemon is stopping (on request, or at its end).
pub fn stopping(text: &str) {
    send(&format!("STOPPING=1\nSTATUS={}", text.replace('\n', " ")));
}

/// Pings the watchdog if one is set and half its period has passed since the last ping.
/// Called often (the control actor's heartbeat, the start's tick); sends rarely.
pub fn watchdog() {
    static LAST_MS: AtomicU64 = AtomicU64::new(0);
    static EPOCH: OnceLock<Instant> = OnceLock::new();
    let Some(every) = channel().and_then(|c| c.ping_every) else {
        return;
    };
    let now = EPOCH.get_or_init(Instant::now).elapsed().as_millis() as u64 + 1;
    let last = LAST_MS.load(Ordering::Relaxed);
    if last == 0 || now.saturating_sub(last) >= every.as_millis() as u64 {
        LAST_MS.store(now, Ordering::Relaxed);
        send("WATCHDOG=1");
    }
}

/// The tree's control actor has pinged the watchdog since the tree started: from then on
/// only its heartbeat does (a tree whose actors stop answering must starve the watchdog),
/// before that the start's tick goes on (building a large model's actors takes seconds).
static TREE_PINGS: std::sync::atomic::AtomicBool = std::sync::atomic::AtomicBool::new(false);

/// A tree is starting: the start's tick pings until its control actor does.
pub fn tree_starting() {
    TREE_PINGS.store(false, Ordering::SeqCst);
}

/// The control actor's heartbeat: pings, and takes the pinging over.
pub fn watchdog_from_tree() {
    TREE_PINGS.store(true, Ordering::SeqCst);
    watchdog();
}

/// Whether the tree's control actor pings the watchdog.
pub fn tree_pings() -> bool {
    TREE_PINGS.load(Ordering::SeqCst)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_watchdog_pings_at_half_its_period_and_only_for_this_process() {
        assert_eq!(
            watchdog_interval(Some("10000000"), None, 7),
            Some(Duration::from_secs(5))
        );
        assert_eq!(
            watchdog_interval(Some("10000000"), Some("7"), 7),
            Some(Duration::from_secs(5))
        );
        assert_eq!(watchdog_interval(Some("10000000"), Some("8"), 7), None);
        assert_eq!(watchdog_interval(Some("0"), None, 7), None);
        assert_eq!(watchdog_interval(Some("x"), None, 7), None);
        assert_eq!(watchdog_interval(None, None, 7), None);
    }

    #[test]
    fn notify_socket_names_are_paths_or_abstract() {
        assert!(address(std::ffi::OsStr::new("/run/systemd/notify")).is_some());
        assert!(address(std::ffi::OsStr::new("relative")).is_none());
        assert!(address(std::ffi::OsStr::new("")).is_none());
        #[cfg(target_os = "linux")]
        assert!(address(std::ffi::OsStr::new("@abstract")).is_some());
    }
}
