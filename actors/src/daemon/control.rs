//! The control actor: a Unix socket in the state directory (mode 0600) that answers the
//! CLI (`status`, `actors`, `events`, `checkpoints`, `pause`, `resume`, `stop`, `stage`)
//! with one JSON document per line, and the Prometheus endpoint.

use std::os::unix::fs::PermissionsExt;
use std::path::PathBuf;
use std::sync::Arc;
use std::time::Duration;

use anyhow::Result;
use ractor::{Actor, ActorProcessingErr, ActorRef};
use serde_json::{json, Value};
use tokio::io::{AsyncBufReadExt, AsyncWriteExt, BufReader};
use tokio::net::{UnixListener, UnixStream};

use super::coordinator::{self, CoordMsg};
use super::Ctx;

/// Actor name.
pub const NAME: &str = "control";

/// The socket of a state directory.
pub fn socket_path(state_dir: &std::path::Path) -> PathBuf {
    state_dir.join("control.sock")
}

/// Binds the control socket at `path`, readable and writable by its owner only from the
/// moment it appears (bound under a temporary name, restricted, then renamed into place).
/// The caller holds the state directory's lock, so a socket already there is stale.
pub fn bind_socket(path: &std::path::Path) -> std::io::Result<UnixListener> {
    let tmp = path.with_extension("sock.new");
    let _ = std::fs::remove_file(&tmp);
    let listener = UnixListener::bind(&tmp)?;
    std::fs::set_permissions(&tmp, std::fs::Permissions::from_mode(0o600))?;
    std::fs::rename(&tmp, path)?;
    Ok(listener)
}

/// Where this process serves its metrics (`{"url"}`), or why it does not
/// (`{"unavailable"}`); `None` with no `runtime.metrics_port`.
static ENDPOINT: std::sync::Mutex<Option<Value>> = std::sync::Mutex::new(None);

/// Installs the Prometheus exporter on 127.0.0.1:`port` (0: a free port, which the
/// `metrics.started` event names). A port it cannot listen on (another process holds
/// it) costs the endpoint, not the run: a `metrics.unavailable` warning says why and what
/// to change, and training goes on.
pub fn start_metrics(ctx: &Ctx, port: u16) {
    // once per process: a run that hands over to its students keeps the same endpoint
    static STARTED: std::sync::atomic::AtomicBool = std::sync::atomic::AtomicBool::new(false);
    if STARTED.load(std::sync::atomic::Ordering::SeqCst) {
        return;
    }
    let chosen = if port == 0 {
        std::net::TcpListener::bind(("127.0.0.1", 0))
            .and_then(|l| l.local_addr())
            .map(|a| a.port())
            .map_err(|e| format!("no free port: {e}"))
    } else {
        Ok(port)
    };
    let installed = chosen.and_then(|p| {
        metrics_exporter_prometheus::PrometheusBuilder::new()
            .with_http_listener(([127, 0, 0, 1], p))
            .install()
            .map(|()| p)
            .map_err(|e| format!("cannot listen on 127.0.0.1:{p}: {e}"))
    });
    *ENDPOINT.lock().unwrap_or_else(|e| e.into_inner()) = Some(match &installed {
        Ok(p) => json!({"url": format!("http://127.0.0.1:{p}/metrics")}),
        Err(why) => json!({"unavailable": why}),
    });
    match installed {
        Ok(p) => {
            STARTED.store(true, std::sync::atomic::Ordering::SeqCst);
            ctx.event(
                checkpoints::Level::Info,
                "metrics.started",
                Some(NAME),
                None,
                format!("Prometheus metrics on http://127.0.0.1:{p}/metrics"),
                json!({"port": p}),
            );
        }
        Err(why) => ctx.event(
            checkpoints::Level::Warn,
            "metrics.unavailable",
            Some(NAME),
            None,
            format!(
                "no Prometheus endpoint ({why}); training goes on without it. Another \
                 process may hold the port: set runtime.metrics_port to a free one, or 0 \
                 for any"
            ),
            json!({"port": port, "error": why}),
        ),
    }
}

/// Messages (the listener runs as a task owned by the actor).
pub enum ControlMsg {
    /// Periodic self-check (heartbeat; where an injected `panic:control` fires).
    Tick,
}

/// The actor.
pub struct ControlActor;

/// Its state: the listener task.
pub struct ControlState {
    task: tokio::task::JoinHandle<()>,
    path: PathBuf,
    ctx: Arc<Ctx>,
    /// When the service manager last got a `STATUS=` line from here.
    last_notified: std::time::Instant,
}

/// The status document (`dinod status`).
pub fn status_doc(ctx: &Ctx) -> Value {
    let run = ctx.board.run_status();
    json!({
        "run": run,
        "state_dir": ctx.state_dir,
        "config_hash": ctx.plan.config_hash,
        "stage": ctx.engine.lock().stage,
        "metrics": ENDPOINT.lock().unwrap_or_else(|e| e.into_inner()).clone(),
        "daemon": true,
    })
}

/// Persists the status snapshot in the catalog (read by `dinod status` when no daemon runs).
pub fn write_final_status(ctx: &Ctx) -> Result<()> {
    let mut doc = status_doc(ctx);
    doc["daemon"] = json!(false);
    doc["actors"] = json!(ctx.board.actors());
    ctx.store.put_status("run", &doc)?;
    ctx.store.flush()?;
    Ok(())
}

async fn coordinator_cast(msg: CoordMsg) -> Result<(), String> {
    match ractor::registry::where_is(coordinator::NAME) {
        Some(c) => ActorRef::<CoordMsg>::from(c)
            .cast(msg)
            .map_err(|e| format!("{e}")),
        None => Err("the coordinator is not running (restarting?)".into()),
    }
}

/// The `events` request, on the live socket and on the one a starting daemon answers:
/// the recent events, or those after `since`; with `follow`, streams new ones until the
/// client leaves (an `Err`: the connection is gone).
pub async fn answer_events(
    store: &checkpoints::Store,
    req: &Value,
    w: &mut tokio::net::unix::OwnedWriteHalf,
) -> Result<Result<Value, String>> {
    let since = req.get("since").and_then(|v| v.as_u64());
    let limit = req.get("limit").and_then(|v| v.as_u64()).unwrap_or(50) as usize;
    let follow = req.get("follow").and_then(|v| v.as_bool()).unwrap_or(false);
    let evs = match since {
        Some(s) => store.events_since(s, limit),
        None => store.recent_events(limit),
    };
    let evs = match evs {
        Ok(evs) => evs,
        Err(e) => return Ok(Err(e.to_string())),
    };
    if follow {
        let mut last = evs
            .last()
            .map(|e| e.seq)
            .unwrap_or_else(|| since.unwrap_or(0));
        for e in &evs {
            w.write_all(format!("{}\n", json!({"ok": true, "data": e})).as_bytes())
                .await?;
        }
        loop {
            tokio::time::sleep(Duration::from_millis(300)).await;
            let more = store.events_since(last, 100).unwrap_or_default();
            for e in &more {
                last = e.seq;
                w.write_all(format!("{}\n", json!({"ok": true, "data": e})).as_bytes())
                    .await?;
            }
        }
    }
    Ok(Ok(json!(evs)))
}

/// The `checkpoints` request (`verify` reads every file), on the live socket and on the
/// one a starting daemon answers: the rows of each store, the run's first (`None`).
pub async fn answer_checkpoints(
    stores: Vec<(Option<String>, Arc<checkpoints::Store>)>,
    req: &Value,
) -> Result<Value, String> {
    let verify = req.get("verify").and_then(|v| v.as_bool()).unwrap_or(false);
    tokio::task::spawn_blocking(move || {
        let refs: Vec<(Option<String>, &checkpoints::Store)> = stores
            .iter()
            .map(|(n, s)| (n.clone(), s.as_ref()))
            .collect();
        crate::commands::checkpoint_rows(&refs, verify)
            .map(|v| json!(v))
            .map_err(|e| format!("{e:#}"))
    })
    .await
    .unwrap_or_else(|e| Err(e.to_string()))
}

async fn answer(
    ctx: &Arc<Ctx>,
    req: &Value,
    w: &mut tokio::net::unix::OwnedWriteHalf,
) -> Result<()> {
    let cmd = req.get("cmd").and_then(|v| v.as_str()).unwrap_or("");
    let reply: Result<Value, String> = match cmd {
        "status" => Ok(status_doc(ctx)),
        "actors" => Ok(json!(ctx.board.actors())),
        "events" => answer_events(&ctx.store, req, w).await?,
        "checkpoints" => {
            let mut stores = vec![(None, ctx.store.clone())];
            stores.extend(
                ctx.students
                    .iter()
                    .map(|s| (Some(s.name.clone()), s.store.clone())),
            );
            answer_checkpoints(stores, req).await
        }
        "history" => {
            // a distillation student's own history (`STATE/students/NAME`, which a running
            // daemon holds open), or the run's
            let whose = match req.get("student").and_then(|v| v.as_str()) {
                Some(name) => ctx
                    .students
                    .iter()
                    .find(|s| s.name == name)
                    .map(|s| (s.store.clone(), s.engine.lock().stage.clone()))
                    .ok_or_else(|| format!("this run has no student `{name}`")),
                None => Ok((ctx.store.clone(), ctx.engine.lock().stage.clone())),
            };
            match whose {
                Ok((store, stage)) => {
                    tokio::task::spawn_blocking(move || history_doc(&store, &stage))
                        .await
                        .unwrap_or_else(|e| Err(e.to_string()))
                }
                Err(e) => Err(e),
            }
        }
        "pause" => coordinator_cast(CoordMsg::Pause)
            .await
            .map(|_| json!("paused")),
        "resume" => coordinator_cast(CoordMsg::Resume)
            .await
            .map(|_| json!("resumed")),
        "stop" => {
            super::startup::stop_requested(&ctx.board, "`dinod stop`");
            coordinator_cast(CoordMsg::Stop { reply: None })
                .await
                .map(|_| {
                    json!("stopping: draining the current step and writing a final checkpoint")
                })
        }
        "stage" => {
            let (state, step) = {
                let e = ctx.engine.lock();
                (e.stage.clone(), e.ts.step)
            };
            let mut doc = crate::stages::stage_doc(ctx.plan(), &state, step);
            doc["run_stage"] = json!(ctx.board.run_status().stage);
            Ok(doc)
        }
        "stage_set" => {
            let stage = req
                .get("stage")
                .and_then(|v| v.as_str())
                .unwrap_or("")
                .to_string();
            coordinator::call(&ctx.board, coordinator::NAME, move |reply| {
                CoordMsg::SetStage { stage, reply }
            })
            .await
            .and_then(|r| r)
            .map(|s| json!(s))
        }
        "" => Err("request without `cmd`".into()),
        other => Err(format!("unknown command `{other}`")),
    };
    let line = match reply {
        Ok(v) => json!({"ok": true, "data": v}),
        Err(e) => json!({"ok": false, "error": e}),
    };
    w.write_all(format!("{line}\n").as_bytes()).await?;
    Ok(())
}

async fn serve(ctx: Arc<Ctx>, stream: UnixStream) {
    let (r, mut w) = stream.into_split();
    let mut lines = BufReader::new(r).lines();
    while let Ok(Some(line)) = lines.next_line().await {
        let req: Value = match serde_json::from_str(&line) {
            Ok(v) => v,
            Err(e) => json!({"cmd": "", "parse_error": e.to_string()}),
        };
        if answer(&ctx, &req, &mut w).await.is_err() {
            break;
        }
    }
}

impl Actor for ControlActor {
    type Msg = ControlMsg;
    type State = ControlState;
    type Arguments = Arc<Ctx>;

    async fn pre_start(
        &self,
        _me: ActorRef<Self::Msg>,
        ctx: Arc<Ctx>,
    ) -> Result<Self::State, ActorProcessingErr> {
        ctx.board.register(NAME, "control");
        let path = socket_path(&ctx.state_dir);
        let listener = bind_socket(&path)
            .map_err(|e| format!("cannot bind the control socket {}: {e}", path.display()))?;
        let c2 = ctx.clone();
        let task = tokio::spawn(async move {
            loop {
                match listener.accept().await {
                    Ok((s, _)) => {
                        c2.board.phase(NAME, super::board::ActorPhase::Idle);
                        tokio::spawn(serve(c2.clone(), s));
                    }
                    Err(e) => {
                        tracing::warn!("control socket accept failed: {e}");
                        tokio::time::sleep(Duration::from_millis(100)).await;
                    }
                }
            }
        });
        _me.send_interval(Duration::from_millis(200), || ControlMsg::Tick);
        Ok(ControlState {
            task,
            path,
            ctx,
            last_notified: std::time::Instant::now(),
        })
    }

    async fn handle(
        &self,
        _me: ActorRef<Self::Msg>,
        msg: Self::Msg,
        st: &mut Self::State,
    ) -> Result<(), ActorProcessingErr> {
        match msg {
            ControlMsg::Tick => {
                st.ctx.board.phase(NAME, super::board::ActorPhase::Idle);
                // the actor system answers: the service manager's watchdog may know it
                super::notify::watchdog_from_tree();
                if st.last_notified.elapsed() >= Duration::from_secs(5) {
                    st.last_notified = std::time::Instant::now();
                    let r = st.ctx.board.run_status();
                    if r.stopping.is_none() {
                        super::notify::status(&format!(
                            "training: step {}, stage {}, {:.1} images/s",
                            r.step, r.stage, r.images_per_s
                        ));
                    }
                }
                let step = st.ctx.engine.lock().ts.step;
                st.ctx.faults.maybe_panic_since(NAME, step);
            }
        }
        Ok(())
    }

    async fn post_stop(
        &self,
        _me: ActorRef<Self::Msg>,
        st: &mut Self::State,
    ) -> Result<(), ActorProcessingErr> {
        st.task.abort();
        let _ = std::fs::remove_file(&st.path);
        Ok(())
    }
}

/// Loss and probe history plus stage transitions (`dinod viz curves`).
pub fn history_doc(store: &checkpoints::Store, stage: &Value) -> Result<Value, String> {
    let train = store.probe_history("train").map_err(|e| e.to_string())?;
    let probes: Vec<Value> = store
        .probe_history("probes")
        .map_err(|e| e.to_string())?
        .into_iter()
        .map(|r| json!({"step": r.step, "metrics": r.value.get("metrics").cloned().unwrap_or(Value::Null)}))
        .collect();
    let transitions = stage.get("history").cloned().unwrap_or_else(|| json!([]));
    // the Gram-teacher refreshes of every stage: those of stages left went with their
    // transition, the current stage's are in the state
    let refreshes: Vec<Value> = transitions
        .as_array()
        .into_iter()
        .flatten()
        .filter_map(|t| t.get("gram_refreshes_before")?.as_array())
        .chain(stage.get("gram_refreshes").and_then(Value::as_array))
        .flatten()
        .cloned()
        .collect();
    Ok(
        json!({"train": train, "probes": probes, "transitions": transitions, "gram_refreshes": refreshes}),
    )
}
