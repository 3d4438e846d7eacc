//! The CLI side of the control socket, and the offline fallbacks that read the catalog
//! directly when no daemon runs (`status`, `checkpoints`, `events`).

use std::io::{BufRead, BufReader, Write};
use std::os::unix::net::UnixStream;
use std::path::Path;
use std::time::Duration;

use anyhow::{anyhow, bail, Context, Result};
use serde_json::{json, Value};

use crate::daemon::control::socket_path;

/// How long a command waits for a state directory that is held but has no socket.
const HELD_WAIT: Duration = Duration::from_secs(3);

/// Sends one request to the daemon of `state_dir`; `None` when no daemon listens.
pub fn request(state_dir: &Path, req: &Value) -> Result<Option<Value>> {
    let path = socket_path(state_dir);
    // No socket while the state directory is held: a daemon between taking the directory
    // and binding its socket, or between closing it and exiting; or another command
    // reading the catalog. Each lasts moments: wait for the socket or the lock's release
    // (then the caller reads the catalog itself) rather than fail on the locked catalog.
    let give_up = std::time::Instant::now() + HELD_WAIT;
    let mut s = loop {
        match UnixStream::connect(&path) {
            Ok(s) => break s,
            Err(e)
                if matches!(
                    e.kind(),
                    std::io::ErrorKind::NotFound | std::io::ErrorKind::ConnectionRefused
                ) =>
            {
                if std::time::Instant::now() < give_up
                    && checkpoints::lock_holder(state_dir).is_some()
                {
                    std::thread::sleep(Duration::from_millis(25));
                    continue;
                }
                return Ok(None);
            }
            Err(e) => return Err(anyhow!("cannot connect to {}: {e}", path.display())),
        }
    };
    s.set_read_timeout(Some(Duration::from_secs(120)))?;
    s.write_all(format!("{req}\n").as_bytes())?;
    let mut line = String::new();
    BufReader::new(&s)
        .read_line(&mut line)
        .context("reading the daemon's answer")?;
    let v: Value = serde_json::from_str(&line)
        .with_context(|| format!("bad answer from the daemon: {line:?}"))?;
    if v.get("ok").and_then(|b| b.as_bool()) == Some(true) {
        Ok(Some(v.get("data").cloned().unwrap_or(Value::Null)))
    } else {
        bail!(
            "{}",
            v.get("error")
                .and_then(|e| e.as_str())
                .unwrap_or("the daemon refused the request")
        )
    }
}

/// Streams events, across the daemon's restarts, until interrupted (as `journalctl -f`
/// does): from the daemon's socket while one runs; when it goes away, the events it wrote
/// after the stream's last (its final ones) from the catalog; then it waits for the next
/// daemon and goes on from there. Each event is printed once, in order.
pub fn follow_events(state_dir: &Path, since: Option<u64>, json_out: bool) -> Result<()> {
    let path = socket_path(state_dir);
    // the last sequence number printed; `None`: nothing yet (start from the recent ones)
    let mut last = since;
    let mut waiting_said = false;
    // when the catalog was last read here (a daemon that came and went between two looks
    // at the socket is read from it)
    let mut read_at: Option<std::time::Instant> = None;
    loop {
        match UnixStream::connect(&path) {
            Ok(mut s) => {
                waiting_said = false;
                read_at = None;
                let req = json!({"cmd": "events", "follow": true, "since": last, "limit": 20});
                s.write_all(format!("{req}\n").as_bytes())?;
                for line in BufReader::new(s).lines() {
                    let Ok(line) = line else { break };
                    let Ok(v) = serde_json::from_str::<Value>(&line) else {
                        break;
                    };
                    let seq = v["data"]["seq"].as_u64();
                    if seq.is_some_and(|q| last.is_some_and(|l| q <= l)) {
                        continue;
                    }
                    print_event(&v["data"], json_out);
                    last = seq.or(last);
                }
            }
            Err(_) => {
                // no daemon answers: once it has let the directory go, print what it wrote
                // after the stream's last event (or the recent ones, at the first look)
                let due = read_at.is_none_or(|t| t.elapsed() >= Duration::from_secs(2));
                if due && checkpoints::lock_holder(state_dir).is_none() {
                    if let Ok(store) = open_offline(state_dir) {
                        let evs = match last {
                            Some(l) => store.events_since(l, usize::MAX)?,
                            None => store.recent_events(20)?,
                        };
                        for e in &evs {
                            print_event(&json!(e), json_out);
                            last = Some(e.seq);
                        }
                    }
                    read_at = Some(std::time::Instant::now());
                    if !waiting_said {
                        waiting_said = true;
                        eprintln!(
                            "(no daemon runs in {}: waiting for one; Ctrl-C to stop)",
                            state_dir.display()
                        );
                    }
                }
                std::thread::sleep(Duration::from_millis(250));
            }
        }
        std::io::stdout().flush()?;
    }
}

/// Prints one stored event.
pub fn print_event(e: &Value, json_out: bool) {
    if json_out {
        println!("{e}");
        return;
    }
    let ts = e["event"]["ts_ms"]
        .as_u64()
        .or_else(|| e["ts_ms"].as_u64())
        .unwrap_or(0);
    let ev = if e.get("event").is_some() {
        &e["event"]
    } else {
        e
    };
    println!(
        "#{:<6} {} {:<5} {:<24} {:<13} {}",
        e["seq"].as_u64().unwrap_or(0),
        fmt_time(ts),
        ev["level"].as_str().unwrap_or(""),
        ev["kind"].as_str().unwrap_or(""),
        ev["actor"].as_str().unwrap_or("-"),
        ev["message"].as_str().unwrap_or("")
    );
}

/// `HH:MM:SS` (UTC) of a millisecond timestamp.
pub fn fmt_time(ms: u64) -> String {
    let s = ms / 1000;
    format!("{:02}:{:02}:{:02}", (s / 3600) % 24, (s / 60) % 60, s % 60)
}

/// Opens the catalog of a state directory for reading when no daemon runs.
pub fn open_offline(state_dir: &Path) -> Result<checkpoints::Store> {
    if !state_dir.join("catalog").exists() {
        bail!("{} holds no dinod run (no catalog)", state_dir.display());
    }
    checkpoints::Store::open(
        state_dir,
        checkpoints::StoreOptions::new(checkpoints::Retention::keep_last(2)),
    )
    .map_err(|e| {
        anyhow!(
            "cannot open the catalog of {} ({e}); {}",
            state_dir.display(),
            holder_hint(state_dir)
        )
    })
}

/// Who holds `state_dir`, for a person: a daemon that is starting or stopping, or another
/// command reading the catalog (with its command line), and what to do about it.
fn holder_hint(state_dir: &Path) -> String {
    let Some(holder) = checkpoints::lock_holder(state_dir) else {
        return "nobody holds it now: try again".into();
    };
    let Some(pid) = holder else {
        return "another process holds it: is a daemon starting or stopping?".into();
    };
    let cmdline = std::fs::read(format!("/proc/{pid}/cmdline"))
        .map(|b| {
            b.split(|c| *c == 0)
                .filter(|a| !a.is_empty())
                .map(|a| String::from_utf8_lossy(a).into_owned())
                .collect::<Vec<_>>()
        })
        .unwrap_or_default();
    let sub = cmdline.get(1).map(String::as_str).unwrap_or("");
    let shown = if cmdline.is_empty() {
        String::new()
    } else {
        let mut c = cmdline.clone();
        if let Some(first) = c.first_mut() {
            if let Some(name) = Path::new(first.as_str()).file_name() {
                *first = name.to_string_lossy().into_owned();
            }
        }
        format!(" (`{}`)", c.join(" "))
    };
    if sub == "run" {
        format!("a daemon, pid {pid}{shown}, holds it without a control socket: it is starting or stopping; try again in a moment")
    } else {
        format!("pid {pid}{shown} holds it: another command is reading the catalog; try again when it has finished")
    }
}
