//! The daemon's life around its actor tree: signals for the whole process, and the start
//! before the tree runs (verifying and restoring the checkpoint, opening the data source,
//! loading a distillation teacher). On real runs that start takes seconds to minutes (a
//! first walk of ImageNet-sized tar shards, a large checkpoint read from a network disk),
//! and a daemon that neither answered nor stopped during it looked hung.
//!
//! While starting, the daemon answers its control socket (`status` says what it is doing
//! and for how long; `events` and `checkpoints` read the catalog it holds), and SIGTERM,
//! SIGINT or `dinod stop` end the process at once and cleanly: nothing has been trained, so
//! nothing is saved, and a `run.stopped` event tells the next start that this process
//! stopped and was not killed. While the tree runs, a signal asks the coordinator to drain,
//! checkpoint and stop, as before.
//!
//! Owns: the signal handlers, the start-time control listener, the lifecycle mode. Knows
//! nothing of training: it reads the catalog and sends `Stop` to the coordinator by name.

use std::path::PathBuf;
use std::sync::atomic::{AtomicU8, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use checkpoints::{Event, Level, Store};
use ractor::ActorRef;
use serde_json::{json, Value};
use tokio::io::{AsyncBufReadExt, AsyncWriteExt, BufReader};
use tokio::net::UnixStream;

use super::coordinator::{self, CoordMsg};

/// Before the tree: a signal ends the process.
const STARTING: u8 = 0;
/// The tree runs: a signal asks the coordinator to stop.
const TRAINING: u8 = 1;
/// A signal during the start is ending the process.
const EXITING: u8 = 2;
/// The tree has stopped; the process is finishing (a signal changes nothing).
const FINISHING: u8 = 3;

/// What the daemon is doing before its tree runs.
struct Phase {
    what: String,
    since: Instant,
    /// The checkpoint the run resumes from, once known.
    resume_step: Option<u64>,
    /// How far the phase's work has got, where it counts (the checkpoint's bytes read, a
    /// `tar:` source's shards indexed).
    progress: Option<Progress>,
}

/// Says how far a phase has got (`None`: nothing counted yet).
type Progress = Box<dyn Fn() -> Option<String> + Send + Sync>;

impl Phase {
    /// `opening the data source tar:/x (85 of 147 shards indexed)`.
    fn line(&self) -> String {
        match self.progress.as_ref().and_then(|p| p()) {
            Some(p) => format!("{} ({p})", self.what),
            None => self.what.clone(),
        }
    }
}

/// Whether the start has stalled: what it shows (its phase and progress) has not changed
/// for `after`.
struct StallClock<K> {
    after: Duration,
    last: Option<K>,
    moved: Instant,
    told: bool,
}

impl<K: PartialEq> StallClock<K> {
    fn new(after: Duration) -> Self {
        StallClock {
            after,
            last: None,
            moved: Instant::now(),
            told: false,
        }
    }

    /// Looks at what the start shows now: `None` while it moves, `Some(first)` once it
    /// has stalled (`first`: this is the first look that finds it stalled).
    fn look(&mut self, now: K) -> Option<bool> {
        if self.last.as_ref() != Some(&now) {
            self.last = Some(now);
            self.moved = Instant::now();
            self.told = false;
        }
        if self.moved.elapsed() < self.after {
            return None;
        }
        let first = !self.told;
        self.told = true;
        Some(first)
    }

    fn stalled_for(&self) -> f64 {
        self.moved.elapsed().as_secs_f64()
    }

    fn reset(&mut self) {
        self.last = None;
        self.moved = Instant::now();
        self.told = false;
    }
}

/// The process's lifecycle: one per `dinod run`.
pub struct Lifecycle {
    store: Arc<Store>,
    socket: PathBuf,
    rt: tokio::runtime::Handle,
    started: Instant,
    mode: AtomicU8,
    phase: Mutex<Phase>,
    listener: Mutex<Option<tokio::task::JoinHandle<()>>>,
    /// The running tree's status board (a stop request shows there at once).
    board: Mutex<Option<Arc<super::board::Board>>>,
    /// A stop was asked for while a tree ran: a start after it (the hand-over to the
    /// students) ends at once instead of training on.
    stop_asked: std::sync::atomic::AtomicBool,
}

impl Lifecycle {
    /// Takes over SIGTERM and SIGINT for the process and starts answering the control
    /// socket of `state_dir` (whose catalog `store` holds, and with it the directory's
    /// lock). The daemon is starting: `what` says with what.
    pub fn begin(
        rt: &tokio::runtime::Runtime,
        store: Arc<Store>,
        state_dir: &std::path::Path,
        what: &str,
        stall_after: Duration,
    ) -> Arc<Self> {
        let me = Arc::new(Self {
            store,
            socket: super::control::socket_path(state_dir),
            rt: rt.handle().clone(),
            started: Instant::now(),
            mode: AtomicU8::new(STARTING),
            phase: Mutex::new(Phase {
                what: what.to_string(),
                since: Instant::now(),
                resume_step: None,
                progress: None,
            }),
            listener: Mutex::new(None),
            board: Mutex::new(None),
            stop_asked: std::sync::atomic::AtomicBool::new(false),
        });
        let (term, int) = {
            let _g = rt.enter();
            use tokio::signal::unix::{signal, SignalKind};
            (
                signal(SignalKind::terminate()),
                signal(SignalKind::interrupt()),
            )
        };
        match (term, int) {
            (Ok(mut term), Ok(mut int)) => {
                let m = me.clone();
                rt.spawn(async move {
                    loop {
                        let name = tokio::select! {
                            _ = term.recv() => "SIGTERM",
                            _ = int.recv() => "SIGINT",
                        };
                        m.on_stop_request(name);
                    }
                });
            }
            (Err(e), _) | (_, Err(e)) => {
                tracing::warn!("cannot handle SIGTERM/SIGINT ({e}): a signal kills the daemon without a final checkpoint")
            }
        }
        me.listen();
        super::notify::status(&format!("starting: {what}"));
        // the service manager's watchdog, while no tree's control actor pings it; not
        // while the start has not moved on for `stall_after` (a hung read must starve it)
        let m = me.clone();
        rt.spawn(async move {
            let mut told = Instant::now();
            let mut stall = StallClock::new(stall_after);
            loop {
                let mode = m.mode.load(Ordering::SeqCst);
                let starting = mode == STARTING;
                let (line, stalled) = if starting {
                    let (line, since) = {
                        let p = m.phase();
                        (p.line(), p.since)
                    };
                    let stalled = stall.look((since, line.clone()));
                    (line, stalled)
                } else {
                    stall.reset();
                    (String::new(), None)
                };
                if stalled == Some(true) {
                    let for_s = stall.stalled_for();
                    let message = format!(
                        "the start has not moved on for {for_s:.0} s ({line}): the service manager's watchdog is no longer pinged, so it restarts the daemon"
                    );
                    tracing::error!(kind = "run.start_stalled", "{message}");
                    let _ = m.store.append_event(&Event::new(Level::Error, "run.start_stalled", message.clone()));
                    super::notify::status(&format!("starting: stalled: {line}"));
                }
                if (mode != TRAINING || !super::notify::tree_pings()) && stalled.is_none() {
                    super::notify::watchdog();
                }
                if starting && stalled.is_none() && told.elapsed() >= Duration::from_secs(5) {
                    told = Instant::now();
                    super::notify::status(&format!("starting: {line}"));
                }
                tokio::time::sleep(Duration::from_millis(250)).await;
            }
        });
        me
    }

    fn phase(&self) -> std::sync::MutexGuard<'_, Phase> {
        self.phase.lock().unwrap_or_else(|e| e.into_inner())
    }

    /// The daemon starts (again) on `what`: it answers as starting, and a signal ends it.
    pub fn enter(self: &Arc<Self>, what: &str) {
        {
            let mut p = self.phase();
            p.what = what.to_string();
            p.since = Instant::now();
            p.progress = None;
        }
        super::notify::status(&format!("starting: {what}"));
        let _ = self
            .mode
            .compare_exchange(FINISHING, STARTING, Ordering::SeqCst, Ordering::SeqCst);
        self.listen();
        if self.stop_asked.load(Ordering::SeqCst) {
            self.exit_now("a stop request during the previous tree");
        }
    }

    /// The current phase's progress, as `progress` says it (shown by `status` and in the
    /// service manager's status line).
    pub fn observe(&self, progress: impl Fn() -> Option<String> + Send + Sync + 'static) {
        self.phase().progress = Some(Box::new(progress));
    }

    /// Records the checkpoint step the run resumes from (shown by `status` while starting).
    pub fn resumes_from(&self, step: Option<u64>) {
        self.phase().resume_step = step;
    }

    /// The tree is about to start: the control actor takes the socket over and signals go
    /// to the coordinator (and show on `board` at once). Never returns if a signal is
    /// ending the process.
    pub fn training(&self, board: &Arc<super::board::Board>) {
        *self.board.lock().unwrap_or_else(|e| e.into_inner()) = Some(board.clone());
        if self
            .mode
            .compare_exchange(STARTING, TRAINING, Ordering::SeqCst, Ordering::SeqCst)
            .is_err()
            && self.mode.load(Ordering::SeqCst) == EXITING
        {
            // the signal handler is recording the stop and exits the process
            loop {
                std::thread::sleep(Duration::from_secs(1));
            }
        }
        super::notify::tree_starting();
        self.mode.store(TRAINING, Ordering::SeqCst);
        super::notify::ready("training");
        if let Some(t) = self
            .listener
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .take()
        {
            t.abort();
        }
    }

    /// The tree has stopped.
    pub fn tree_ended(&self) {
        self.mode.store(FINISHING, Ordering::SeqCst);
        // the control actor's own removal (its `post_stop`) does not always run before
        // the process ends; a next start (the hand-over) binds the socket again
        let _ = std::fs::remove_file(&self.socket);
    }

    /// A signal or `dinod stop`: while starting, the process ends now; while training, the
    /// coordinator drains, checkpoints and stops.
    fn on_stop_request(self: &Arc<Self>, by: &str) {
        match self.mode.load(Ordering::SeqCst) {
            STARTING => self.exit_now(by),
            TRAINING => {
                self.stop_asked.store(true, Ordering::SeqCst);
                tracing::info!("{by} received: draining, checkpointing and stopping");
                super::notify::stopping(&format!(
                    "stopping: stop requested by {by}; finishing the step in flight, then the final checkpoint"
                ));
                if let Some(b) = self
                    .board
                    .lock()
                    .unwrap_or_else(|e| e.into_inner())
                    .as_ref()
                {
                    stop_requested(b, by);
                }
                // the coordinator may not be registered yet (the tree is starting): retry
                // while the tree runs
                let m = self.clone();
                self.rt.spawn(async move {
                    // (a tree that ends first leaves `stop_asked` to the next start)
                    while m.mode.load(Ordering::SeqCst) == TRAINING {
                        if let Some(c) = ractor::registry::where_is(coordinator::NAME) {
                            let _ =
                                ActorRef::<CoordMsg>::from(c).cast(CoordMsg::Stop { reply: None });
                            return;
                        }
                        tokio::time::sleep(Duration::from_millis(50)).await;
                    }
                });
            }
            _ => {
                // between trees (a hand-over), the next start must not train on
                self.stop_asked.store(true, Ordering::SeqCst);
                tracing::info!("{by} received: the daemon is already stopping");
            }
        }
    }

    /// Ends the process during the start: records `run.stopped` (exit 0; nothing was
    /// trained, so nothing is saved), flushes the catalog, removes the socket and exits.
    fn exit_now(&self, by: &str) {
        if self
            .mode
            .compare_exchange(STARTING, EXITING, Ordering::SeqCst, Ordering::SeqCst)
            .is_err()
        {
            return;
        }
        let (what, secs, step) = {
            let p = self.phase();
            (
                p.what.clone(),
                p.since.elapsed().as_secs_f64(),
                p.resume_step,
            )
        };
        let message =
            format!("stopped by {by} while {what} ({secs:.1} s), before training: nothing to save");
        tracing::info!(kind = "run.stopped", "{message}");
        super::notify::stopping(&message);
        let mut e = Event::new(Level::Info, "run.stopped", message).fields(json!({
            "exit_code": super::EXIT_OK,
            "during_start": what,
            "seconds_into_start": self.started.elapsed().as_secs_f64(),
        }));
        if let Some(s) = step {
            e = e.step(s);
        }
        let _ = self.store.append_event(&e);
        let _ = self.store.flush();
        let _ = std::fs::remove_file(&self.socket);
        std::process::exit(super::EXIT_OK);
    }

    /// `dinod status` while starting.
    fn status_doc(&self) -> Value {
        let p = self.phase();
        json!({
            "daemon": true,
            "starting": {
                "phase": p.what,
                "progress": p.progress.as_ref().and_then(|p| p()),
                "seconds": p.since.elapsed().as_secs_f64(),
                "since_start_s": self.started.elapsed().as_secs_f64(),
            },
            "run": {
                "pid": std::process::id(),
                "step": p.resume_step.unwrap_or(0),
                "resumes_from": p.resume_step,
            },
        })
    }

    /// Binds the socket (if not bound) and answers on it while starting.
    fn listen(self: &Arc<Self>) {
        let mut slot = self.listener.lock().unwrap_or_else(|e| e.into_inner());
        if slot.is_some() {
            return;
        }
        let listener = {
            let _g = self.rt.enter();
            super::control::bind_socket(&self.socket)
        };
        let listener = match listener {
            Ok(l) => l,
            Err(e) => {
                tracing::warn!(
                    "cannot bind the control socket {} while starting: {e}",
                    self.socket.display()
                );
                return;
            }
        };
        let m = self.clone();
        *slot = Some(self.rt.spawn(async move {
            loop {
                match listener.accept().await {
                    Ok((s, _)) => {
                        tokio::spawn(serve(m.clone(), s));
                    }
                    Err(e) => {
                        tracing::warn!("control socket accept failed: {e}");
                        tokio::time::sleep(Duration::from_millis(100)).await;
                    }
                }
            }
        }));
    }
}

/// Shows a stop request on the status board (`dinod status`: STOPPING) from the moment it
/// is made; the first reason stays.
pub fn stop_requested(board: &super::board::Board, by: &str) {
    board.run(|r| {
        r.stopping
            .get_or_insert_with(|| format!("stop requested by {by}"));
    });
}

/// One client while starting. A connection outlives the start (an `events --follow` goes
/// on streaming from the catalog once the tree runs).
async fn serve(lc: Arc<Lifecycle>, stream: UnixStream) {
    let (r, mut w) = stream.into_split();
    let mut lines = BufReader::new(r).lines();
    while let Ok(Some(line)) = lines.next_line().await {
        let req: Value = serde_json::from_str(&line).unwrap_or_else(|_| json!({"cmd": ""}));
        let cmd = req.get("cmd").and_then(|v| v.as_str()).unwrap_or("");
        let reply: Result<Value, String> = match cmd {
            "status" => Ok(lc.status_doc()),
            "events" => match super::control::answer_events(&lc.store, &req, &mut w).await {
                Ok(v) => v,
                Err(_) => break,
            },
            "checkpoints" => {
                super::control::answer_checkpoints(vec![(None, lc.store.clone())], &req).await
            }
            // answered before it acts: while starting, acting ends the process
            "stop" if lc.mode.load(Ordering::SeqCst) == STARTING => Ok(json!(format!(
                "stopping: the daemon was starting ({}); it exits without training, nothing to save",
                lc.phase().what
            ))),
            "stop" => Ok(json!(
                "stopping: draining the current step and writing a final checkpoint"
            )),
            "" => Err("request without `cmd`".into()),
            other => {
                let p = lc.phase();
                Err(format!(
                    "the daemon is starting ({}, {:.0} s so far); `{other}` is answered once it trains",
                    p.what,
                    p.since.elapsed().as_secs_f64()
                ))
            }
        };
        let line = match reply {
            Ok(v) => json!({"ok": true, "data": v}),
            Err(e) => json!({"ok": false, "error": e}),
        };
        if w.write_all(format!("{line}\n").as_bytes()).await.is_err() {
            break;
        }
        if cmd == "stop" {
            let _ = w.flush().await;
            lc.on_stop_request("`dinod stop`");
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// The start counts as stalled once what it shows has not changed for the limit, is
    /// told so once, and moves again as soon as it shows something new.
    #[test]
    fn a_start_stalls_when_what_it_shows_stops_changing() {
        let mut c = StallClock::new(Duration::from_millis(60));
        assert_eq!(c.look("reading"), None);
        std::thread::sleep(Duration::from_millis(30));
        assert_eq!(c.look("reading"), None);
        std::thread::sleep(Duration::from_millis(40));
        assert_eq!(c.look("reading"), Some(true), "70 ms without change");
        assert!(c.stalled_for() >= 0.06);
        assert_eq!(c.look("reading"), Some(false), "told once");
        assert_eq!(c.look("reading (3 of 9)"), None, "progress moved");
        std::thread::sleep(Duration::from_millis(70));
        assert_eq!(c.look("reading (3 of 9)"), Some(true), "stalled again");
        c.reset();
        assert_eq!(c.look("reading (3 of 9)"), None, "a new start");
    }
}
