//! The bodies of the CLI commands (everything but `parity` and `bench step`).

use std::path::{Path, PathBuf};

use anyhow::{anyhow, bail, Context, Result};
use serde_json::{json, Value};

use crate::cli::{load_plan, usage, EXIT_FAILED};
use crate::client;
use crate::config::FaultSpec;
use crate::daemon::{self, RunOptions};

/// `dinod run`.
pub fn run(
    config: Option<&PathBuf>,
    state_dir: &Path,
    max_steps: Option<u64>,
    data: Option<&str>,
    inject: &[String],
    checkpoint_every: Option<u64>,
) -> Result<i32> {
    let tty = crate::logging::init();
    let mut plan = load_plan(config)?;
    if let Some(spec) = data {
        let spec: data::SourceSpec = spec
            .parse()
            .map_err(|e| usage(format!("--data {spec}: {e}")))?;
        plan.config.data.source = spec;
    }
    for f in inject {
        let f: FaultSpec = f
            .parse()
            .map_err(|e: String| usage(format!("--inject: {e}")))?;
        f.check_daemon()
            .map_err(|e| usage(format!("--inject: {e}")))?;
        plan.config.runtime.faults.push(f);
    }
    if let Some(n) = checkpoint_every {
        if n == 0 {
            return Err(usage("--checkpoint-every must be at least 1"));
        }
        plan.config.checkpoint.every_steps = n;
    }
    let code = daemon::run(
        plan,
        RunOptions {
            state_dir: state_dir.to_path_buf(),
            max_steps,
            progress: tty,
        },
    )?;
    Ok(code)
}

fn print_json(v: &Value) {
    println!("{}", serde_json::to_string_pretty(v).unwrap_or_default());
}

/// `dinod status`.
pub fn status(state_dir: &Path, json_out: bool) -> Result<i32> {
    let (doc, live) = match client::request(state_dir, &json!({"cmd": "status"}))? {
        Some(v) => (v, true),
        None => {
            let store = client::open_offline(state_dir)?;
            let mut doc = store
                .status_all()?
                .remove("run")
                .unwrap_or_else(|| json!({}));
            doc["daemon"] = json!(false);
            doc["latest_checkpoint"] = json!(store.latest_step()?);
            doc["checkpoints"] = json!(store.list()?.len());
            doc["latest_probes"] = json!(store.latest_probes()?);
            (doc, false)
        }
    };
    if json_out {
        print_json(&doc);
        return Ok(0);
    }
    let r = &doc["run"];
    if let Some(st) = doc.get("starting").filter(|s| !s.is_null()) {
        // before its actor tree runs: what it is doing, and what it resumes from
        println!(
            "daemon       starting (pid {}): {}, {:.0} s so far",
            r["pid"],
            st["phase"].as_str().unwrap_or("?"),
            st["seconds"].as_f64().unwrap_or(0.0)
        );
        if let Some(p) = st["progress"].as_str() {
            println!("progress     {p}");
        }
        match r["resumes_from"].as_u64() {
            Some(s) => println!("resumes from the checkpoint at step {s}"),
            None if st["phase"] == "reading the checkpoints" => {}
            None => println!("resumes from nothing: a new run"),
        }
        return Ok(0);
    }
    println!(
        "daemon       {}",
        if live {
            match r["stopping"].as_str() {
                Some(why) => format!(
                    "running (pid {}), STOPPING ({why}): finishing the step in flight, then writing the final checkpoint",
                    r["pid"]
                ),
                None => format!("running (pid {})", r["pid"]),
            }
        } else {
            "not running (from the catalog)".to_string()
        }
    );
    println!("stage        {}", r["stage"].as_str().unwrap_or("?"));
    if live {
        if let Some(url) = doc["metrics"]["url"].as_str() {
            println!("metrics      {url}");
        } else if let Some(why) = doc["metrics"]["unavailable"].as_str() {
            println!("metrics      UNAVAILABLE ({why})");
        }
    }
    if let Some(i) = r.get("init").filter(|i| !i.is_null()) {
        println!(
            "started from {} ({})",
            i["spec"].as_str().unwrap_or("?"),
            i["source"].as_str().unwrap_or("?")
        );
    }
    println!(
        "step         {}{}",
        r["step"],
        r["max_steps"]
            .as_u64()
            .map(|m| format!(" / {m}"))
            .unwrap_or_default()
    );
    if r["paused"].as_bool() == Some(true) {
        println!("state        PAUSED");
    }
    if let Some(l) = r.get("losses").filter(|l| !l.is_null()) {
        println!(
            "losses       total {:.4}  dino_local {:.4}  dino_global {:.4}  ibot {:.4}  koleo {:.4}  gram {:.4}",
            l["total"].as_f64().unwrap_or(f64::NAN),
            l["dino_local"].as_f64().unwrap_or(f64::NAN),
            l["dino_global"].as_f64().unwrap_or(f64::NAN),
            l["ibot"].as_f64().unwrap_or(f64::NAN),
            l["koleo"].as_f64().unwrap_or(f64::NAN),
            l["gram"].as_f64().unwrap_or(f64::NAN)
        );
    }
    if let Some(d) = r["device"].as_str().filter(|d| !d.is_empty()) {
        println!(
            "device       {d}{}",
            r["batch_size"]
                .as_u64()
                .filter(|b| *b > 0)
                .map(|b| format!("  (batch {b})"))
                .unwrap_or_default()
        );
    }
    if let Some(c) = r["cluster"]["line"].as_str() {
        println!("cluster      {c}");
    }
    if let Some(c) = r["cluster"]["copies"].as_object() {
        let at = |k: &str| c.get(k).and_then(|v| v.as_u64());
        let gb = |k: &str| at(k).unwrap_or(0) as f64 / 1e9;
        println!(
            "copies       whole state sent {} time(s){}; {}; {:.2} GB sent, {:.2} GB received; {}",
            at("whole_states").unwrap_or(0),
            at("whole_state_step")
                .map(|s| format!(" (last at step {s})"))
                .unwrap_or_default(),
            at("verified_step")
                .map(|s| format!("checked against this process at step {s}"))
                .unwrap_or_else(|| "not checked yet".into()),
            gb("sent_bytes"),
            gb("received_bytes"),
            match c.get("worker_data").and_then(|v| v.as_str()) {
                Some("local") => "each worker loads its own images",
                _ => "the workers' images sent from here",
            }
        );
        if let Some(w) = c.get("grad_wait_ms").and_then(|v| v.as_f64()) {
            println!(
                "             the backward pass waits {w:.1} ms per step for the gradient sums after it ends"
            );
        }
        let waits: Vec<f64> = c
            .get("member_wait_ms")
            .and_then(|v| v.as_array())
            .map(|a| a.iter().filter_map(|x| x.as_f64()).collect())
            .unwrap_or_default();
        if waits.len() > 1 {
            println!("             {}", member_waits_line(&waits));
        }
    }
    println!("lr           {:.3e}", r["lr"].as_f64().unwrap_or(0.0));
    println!(
        "throughput   {:.1} images/s ({:.0} ms/step)",
        r["images_per_s"].as_f64().unwrap_or(0.0),
        r["step_ms"].as_f64().unwrap_or(0.0)
    );
    let lc = r["last_checkpoint"]
        .as_u64()
        .or_else(|| doc["latest_checkpoint"].as_u64());
    println!(
        "checkpoint   {}  (blocking {:.0} ms, durable {:.0} ms)",
        lc.map(|s| format!("step {s}"))
            .unwrap_or_else(|| "none".into()),
        r["last_checkpoint_blocking_ms"].as_f64().unwrap_or(0.0),
        r["last_checkpoint_durable_ms"].as_f64().unwrap_or(0.0)
    );
    if let Some(f) = failing_saves(&r["failed_saves"]) {
        println!("             {f}");
    }
    println!(
        "bad          {} inputs skipped, {} steps discarded, {} rollbacks",
        r["bad_inputs"], r["bad_steps"], r["rollbacks"]
    );
    if let Some(p) = r
        .get("probes")
        .filter(|p| p.is_object() && !p.as_object().is_some_and(|o| o.is_empty()))
    {
        println!("probes       {p}");
    }
    if let Some(st) = r
        .get("students")
        .and_then(|v| v.as_object())
        .filter(|o| !o.is_empty())
    {
        for (name, l) in st {
            println!(
                "student      {name:<10} step {:<7} loss {:>8.4}  {:>7.1} images/s  queue {}",
                l["step"],
                l["losses"]["total"].as_f64().unwrap_or(f64::NAN),
                l["images_per_s"].as_f64().unwrap_or(0.0),
                l["queue"]
            );
            if let Some(f) = failing_saves(&l["failed_saves"]) {
                println!("             {:<10} {f}", "");
            }
            if let Some(m) = l["probes"]["metrics"].as_object() {
                let shown: Vec<String> = m
                    .iter()
                    .filter_map(|(k, v)| Some(format!("{k} {:.4}", v.as_f64()?)))
                    .collect();
                println!(
                    "             {:<10} probes at step {}: {}",
                    "",
                    l["probes"]["step"],
                    shown.join("  ")
                );
            }
        }
    }
    Ok(0)
}

/// The status line of a streak of failed saves (`board::FailedSaves`), if there is one.
/// `dinod status`'s line of how long the daemon waits per step for each member to enter
/// the group's sums (`waits[r]` for rank r; its own, rank 0, is left out), the slowest
/// of two or more workers named when it stands out (more than twice the next, over 1 ms).
fn member_waits_line(waits: &[f64]) -> String {
    let each = waits
        .iter()
        .enumerate()
        .skip(1)
        .map(|(r, w)| format!("member {r} {w:.1} ms"))
        .collect::<Vec<_>>()
        .join(", ");
    let mut by: Vec<(usize, f64)> = waits.iter().copied().enumerate().skip(1).collect();
    by.sort_by(|a, b| b.1.total_cmp(&a.1));
    let slowest = match by.as_slice() {
        [(r, w), next, ..] if *w > 1.0 && *w > 2.0 * next.1 => {
            format!(" (slowest: member {r})")
        }
        _ => String::new(),
    };
    format!("waits per step for each member to enter the sums: {each}{slowest}")
}

fn failing_saves(f: &Value) -> Option<String> {
    let count = f["count"].as_u64()?;
    Some(format!(
        "SAVES FAILING: {count} in a row since step {}, the steps since the last checkpoint are at risk; at step {}: {}",
        f["since_step"],
        f["last_step"],
        f["last_error"].as_str().unwrap_or("")
    ))
}

/// `dinod actors`.
pub fn actors(state_dir: &Path, json_out: bool) -> Result<i32> {
    let doc = match client::request(state_dir, &json!({"cmd": "actors"}))? {
        Some(v) => v,
        None => {
            let store = client::open_offline(state_dir)?;
            let run = store
                .status_all()?
                .remove("run")
                .unwrap_or_else(|| json!({}));
            eprintln!("no daemon is running; last known actor states:");
            run.get("actors").cloned().unwrap_or_else(|| json!([]))
        }
    };
    if json_out {
        print_json(&doc);
        return Ok(0);
    }
    let now = daemon::board::now_ms();
    println!(
        "{:<14} {:<12} {:<11} {:<11} {:>8} {:>8} {:>7} {:>9}  last error",
        "actor", "kind", "state", "phase", "since", "restarts", "mailbox", "heartbeat"
    );
    for a in doc.as_array().cloned().unwrap_or_default() {
        let since = now.saturating_sub(a["phase_since_ms"].as_u64().unwrap_or(now)) as f64 / 1e3;
        let hb = now.saturating_sub(a["last_heartbeat_ms"].as_u64().unwrap_or(now)) as f64 / 1e3;
        println!(
            "{:<14} {:<12} {:<11} {:<11} {:>7.1}s {:>8} {:>7} {:>8.1}s  {}",
            a["name"].as_str().unwrap_or(""),
            a["kind"].as_str().unwrap_or(""),
            a["state"].as_str().unwrap_or(""),
            a["phase"].as_str().unwrap_or(""),
            since,
            a["restarts"],
            a["mailbox"],
            hb,
            a["last_error"].as_str().unwrap_or("")
        );
    }
    Ok(0)
}

/// `dinod events`.
pub fn events(
    state_dir: &Path,
    follow: bool,
    since: Option<u64>,
    limit: usize,
    json_out: bool,
) -> Result<i32> {
    if follow {
        client::follow_events(state_dir, since, json_out)?;
        return Ok(0);
    }
    let evs = match client::request(
        state_dir,
        &json!({"cmd": "events", "since": since, "limit": limit}),
    )? {
        Some(v) => v,
        None => {
            let store = client::open_offline(state_dir)?;
            match since {
                Some(s) => json!(store.events_since(s, limit)?),
                None => json!(store.recent_events(limit)?),
            }
        }
    };
    for e in evs.as_array().cloned().unwrap_or_default() {
        client::print_event(&e, json_out);
    }
    Ok(0)
}

/// The rows of `dinod checkpoints list|verify` for the run's store and every student's
/// (`None`: the run's own), in that order; a student's rows carry `"student": NAME`.
pub fn checkpoint_rows(
    stores: &[(Option<String>, &checkpoints::Store)],
    verify: bool,
) -> Result<Vec<Value>> {
    let mut rows = vec![];
    for (student, store) in stores {
        let v = if verify {
            json!(store.verify_all()?)
        } else {
            json!(store.list()?)
        };
        for mut r in v.as_array().cloned().unwrap_or_default() {
            if let Some(n) = student {
                r["student"] = json!(n);
            }
            rows.push(r);
        }
    }
    Ok(rows)
}

/// The students' stores of a stopped run (`STATE/students/NAME`), by name.
fn student_stores_offline(state_dir: &Path) -> Result<Vec<(String, checkpoints::Store)>> {
    let dir = state_dir.join("students");
    let mut names: Vec<String> = match std::fs::read_dir(&dir) {
        Ok(rd) => rd
            .filter_map(|e| e.ok())
            .filter(|e| e.path().join("catalog").exists())
            .map(|e| e.file_name().to_string_lossy().into_owned())
            .collect(),
        Err(_) => vec![],
    };
    names.sort();
    names
        .into_iter()
        .map(|n| Ok((n.clone(), client::open_offline(&dir.join(&n))?)))
        .collect()
}

/// `dinod checkpoints list|verify`: the run's checkpoints and every distillation
/// student's (`STATE/students/NAME`); `verify` exits 1 if any of them is corrupt.
pub fn checkpoints(state_dir: &Path, action: &str, json_out: bool) -> Result<i32> {
    let verify = action == "verify";
    let doc = match client::request(state_dir, &json!({"cmd": "checkpoints", "verify": verify}))? {
        Some(v) => v,
        None => {
            let store = client::open_offline(state_dir)?;
            let students = student_stores_offline(state_dir)?;
            let mut stores: Vec<(Option<String>, &checkpoints::Store)> = vec![(None, &store)];
            stores.extend(students.iter().map(|(n, s)| (Some(n.clone()), s)));
            json!(checkpoint_rows(&stores, verify)?)
        }
    };
    if json_out {
        print_json(&doc);
    }
    let items = doc.as_array().cloned().unwrap_or_default();
    if items.is_empty() && !json_out {
        println!(
            "no checkpoints in {} yet{}",
            state_dir.display(),
            if verify { ": nothing to verify" } else { "" }
        );
        return Ok(0);
    }
    // a heading before each student's rows
    let mut owner: Option<Option<String>> = None;
    let mut heading = |r: &Value| {
        let o = r["student"].as_str().map(str::to_string);
        if owner.as_ref() != Some(&o) {
            if let Some(n) = &o {
                println!("student {n}:");
            }
            owner = Some(o);
        }
    };
    if verify {
        let mut bad = 0;
        for r in &items {
            let ok = r["problems"]
                .as_array()
                .map(|p| p.is_empty())
                .unwrap_or(false);
            bad += usize::from(!ok);
            if !json_out {
                heading(r);
                println!(
                    "step {:<10} {}",
                    r["step"],
                    if ok {
                        "ok".to_string()
                    } else {
                        format!("CORRUPT: {}", r["problems"])
                    }
                );
            }
        }
        if !json_out {
            println!(
                "{} checkpoints, {}",
                items.len(),
                if bad == 0 {
                    "all ok".to_string()
                } else {
                    format!("{bad} corrupt")
                }
            );
        }
        return Ok(if bad == 0 { 0 } else { EXIT_FAILED });
    }
    if !json_out {
        println!(
            "{:<10} {:>10} {:<8} {:<30} scores",
            "step", "MB", "latest", "keep"
        );
        for c in &items {
            heading(c);
            // why retention keeps it: "latest, recent", "best dense", ...
            let keep: Vec<String> = c["keep"]
                .as_array()
                .into_iter()
                .flatten()
                .map(|k| match (k["reason"].as_str(), &k["metric"], &k["n"]) {
                    (Some(r), Value::String(m), _) => format!("{r} {m}"),
                    (Some(r), _, Value::Number(n)) => format!("{r} {n}"),
                    (Some(r), _, _) => r.to_string(),
                    (None, _, _) => k.to_string(),
                })
                .collect();
            println!(
                "{:<10} {:>10.1} {:<8} {:<30} {}",
                c["step"],
                c["bytes"].as_u64().unwrap_or(0) as f64 / 1e6,
                if c["is_latest"].as_bool() == Some(true) {
                    "*"
                } else {
                    ""
                },
                if keep.is_empty() {
                    "(deleted at the next save)".to_string()
                } else {
                    keep.join(", ")
                },
                c["scores"]
            );
        }
    }
    Ok(0)
}

/// `dinod pause|resume|stop`.
pub fn simple(state_dir: &Path, cmd: &str) -> Result<i32> {
    match client::request(state_dir, &json!({"cmd": cmd}))? {
        Some(v) => {
            println!("{}", v.as_str().unwrap_or(&v.to_string()));
            Ok(0)
        }
        None => bail!("no daemon is running in {}", state_dir.display()),
    }
}

/// `dinod stop --wait`: waits until the daemon of `state_dir` has let its directory go
/// (it exited), then prints its last event and returns the status it recorded.
pub fn wait_stopped(state_dir: &Path) -> Result<i32> {
    // the daemon holds the directory's lock until it exits (a command reading the catalog
    // holds it for moments; its socket is gone before it lets go)
    let socket = crate::daemon::control::socket_path(state_dir);
    while checkpoints::lock_holder(state_dir).is_some()
        || std::os::unix::net::UnixStream::connect(&socket).is_ok()
    {
        std::thread::sleep(std::time::Duration::from_millis(100));
    }
    let store = client::open_offline(state_dir)?;
    let last = store.recent_events(1)?.into_iter().next();
    match last {
        Some(e) if e.event.kind == "run.stopped" => {
            println!("{}", e.event.message);
            Ok(e.event.fields["exit_code"].as_i64().unwrap_or(0) as i32)
        }
        Some(e) if e.event.kind == "run.fatal" || e.event.kind == "run.halted" => {
            println!("{}", e.event.message);
            Ok(EXIT_FAILED)
        }
        other => {
            println!(
                "the daemon exited without recording a stop (last event: {})",
                other.map_or("none".to_string(), |e| e.event.kind)
            );
            Ok(EXIT_FAILED)
        }
    }
}

/// `dinod stage [set STAGE]`.
pub fn stage(
    state_dir: &Path,
    action: Option<&str>,
    stage: Option<&str>,
    json_out: bool,
) -> Result<i32> {
    match action {
        None => {
            let doc = match client::request(state_dir, &json!({"cmd": "stage"}))? {
                Some(v) => v,
                None => {
                    let store = client::open_offline(state_dir)?;
                    let ck = store
                        .load_latest_valid()?
                        .ok_or_else(|| anyhow!("{} holds no checkpoint", state_dir.display()))?;
                    let meta = crate::engine::run_meta(&ck)?;
                    // the recipe stored with the checkpoint knows the thresholds
                    let recipe = ck.meta()["config_toml"].as_str().and_then(|t| {
                        crate::config::parse(t, "the config stored with the checkpoint").ok()
                    });
                    match recipe {
                        Some(plan) => crate::stages::stage_doc(&plan, &meta.stage, meta.step),
                        None => json!({"stage": meta.stage}),
                    }
                }
            };
            if json_out {
                print_json(&doc);
            } else {
                print!("{}", stage_text(&doc));
            }
            Ok(0)
        }
        Some("set") => {
            let s = stage.ok_or_else(|| anyhow!("usage: dinod stage set STAGE"))?;
            match client::request(state_dir, &json!({"cmd": "stage_set", "stage": s}))? {
                Some(v) => {
                    println!("{}", v.as_str().unwrap_or(&v.to_string()));
                    Ok(0)
                }
                None => bail!(
                    "no daemon is running in {}; start it, then set the stage",
                    state_dir.display()
                ),
            }
        }
        Some(other) => {
            bail!("unknown stage action `{other}` (use `dinod stage` or `dinod stage set STAGE`)")
        }
    }
}

/// `dinod history`: one row per evaluation (its probe metrics, the stage and the mean of
/// the losses logged since the previous evaluation), with the stage transitions between
/// the rows. Works on a running daemon and on a stopped run.
pub fn history(state_dir: &Path, json_out: bool) -> Result<i32> {
    let doc = crate::viz::history_of(state_dir)?;
    if json_out {
        print_json(&doc);
    } else {
        print!("{}", history_text(&doc));
    }
    Ok(0)
}

/// Probe metrics in the order people read them, with their column headers; others follow
/// alphabetically under their own names.
const METRIC_ORDER: [(&str, &str); 8] = [
    ("dense_miou", "miou"),
    ("dense_pixel_accuracy", "pixel_acc"),
    ("knn_top1", "knn"),
    ("linear_top1", "linear"),
    ("correspondence", "corresp"),
    ("locality", "locality"),
    ("effective_rank", "eff_rank"),
    ("cls_patch_cos", "cls_patch"),
];

fn history_text(doc: &Value) -> String {
    use std::fmt::Write;
    let probes = doc["probes"].as_array().cloned().unwrap_or_default();
    let train = doc["train"].as_array().cloned().unwrap_or_default();
    let transitions = doc["transitions"].as_array().cloned().unwrap_or_default();
    if probes.is_empty() {
        return "no evaluations yet\n".into();
    }
    let mut metrics: Vec<String> = vec![];
    for p in &probes {
        for k in p["metrics"].as_object().into_iter().flat_map(|m| m.keys()) {
            if !metrics.contains(k) {
                metrics.push(k.clone());
            }
        }
    }
    let rank = |k: &String| {
        METRIC_ORDER
            .iter()
            .position(|m| m.0 == k)
            .unwrap_or(usize::MAX)
    };
    metrics.sort_by(|a, b| rank(a).cmp(&rank(b)).then(a.cmp(b)));
    let header = |k: &String| {
        METRIC_ORDER
            .iter()
            .find(|m| m.0 == k)
            .map_or(k.clone(), |m| m.1.to_string())
    };
    let width = |k: &String| header(k).len().max(7);
    let losses = ["total", "gram"];
    let mut o = String::new();
    let _ = write!(o, "{:>8}  {:<14}", "step", "stage");
    for m in &metrics {
        let _ = write!(o, " {:>w$}", header(m), w = width(m));
    }
    for l in losses {
        let _ = write!(o, " {:>10}", format!("loss {l}"));
    }
    o.push('\n');
    // transitions and Gram-teacher refreshes between the rows: one at step S happened
    // after the evaluation at S (and a transition was decided by it), so below its row
    let mut marks: Vec<(u64, String)> = transitions
        .iter()
        .map(|t| (t["step"].as_u64().unwrap_or(0), transition_line(t)))
        .chain(
            doc["gram_refreshes"]
                .as_array()
                .into_iter()
                .flatten()
                .filter_map(|r| serde_json::from_value::<eval_probes::GramRefresh>(r.clone()).ok())
                .map(|r| (r.step, refresh_line(&r))),
        )
        .collect();
    marks.sort_by_key(|m| m.0);
    let mut prev: Option<u64> = None;
    for p in &probes {
        let step = p["step"].as_u64().unwrap_or(0);
        for (ts, line) in &marks {
            if prev.map_or(*ts < step, |p| p <= *ts && *ts < step) {
                let _ = writeln!(o, "{line}");
            }
        }
        // the losses logged since the previous evaluation: steps in (prev, step]
        let window: Vec<&Value> = train
            .iter()
            .filter(|r| {
                r["step"]
                    .as_u64()
                    .is_some_and(|s| prev.is_none_or(|p| s > p) && s <= step)
            })
            .collect();
        // the stage the steps before this evaluation ran in (a transition at step S is
        // the first step of the new stage)
        let stage = transitions
            .iter()
            .rfind(|t| t["step"].as_u64().is_some_and(|ts| ts < step))
            .and_then(|t| t["to"].as_str())
            .unwrap_or("pretrain");
        let _ = write!(o, "{step:>8}  {stage:<14}");
        for m in &metrics {
            let w = width(m);
            match p["metrics"][m].as_f64() {
                Some(v) => {
                    let _ = write!(o, " {v:>w$.4}");
                }
                None => {
                    let _ = write!(o, " {:>w$}", "-");
                }
            }
        }
        for l in losses {
            let vals: Vec<f64> = window
                .iter()
                .filter_map(|r| r["value"]["losses"][l].as_f64())
                .collect();
            if vals.is_empty() {
                let _ = write!(o, " {:>10}", "-");
            } else {
                let _ = write!(o, " {:>10.4}", vals.iter().sum::<f64>() / vals.len() as f64);
            }
        }
        o.push('\n');
        prev = Some(step);
    }
    for (ts, line) in &marks {
        if prev.is_none_or(|p| *ts >= p) {
            let _ = writeln!(o, "{line}");
        }
    }
    o
}

/// A Gram-teacher refresh between the rows of `dinod history`.
fn refresh_line(r: &eval_probes::GramRefresh) -> String {
    match r.ema_dense {
        Some(p) => format!(
            "  -- step {}: Gram teacher refreshed from the EMA teacher (its latest dense score {:.4}, step {})",
            r.step, p.value, p.step
        ),
        None => format!(
            "  -- step {}: Gram teacher refreshed from the EMA teacher",
            r.step
        ),
    }
}

/// A transition between the rows of `dinod history`.
fn transition_line(t: &Value) -> String {
    match serde_json::from_value::<eval_probes::Transition>(t.clone()) {
        Ok(t) => format!(
            "  -- step {}: {} -> {}: {}",
            t.step,
            t.from.as_str(),
            t.to.as_str(),
            t.describe()
        ),
        Err(_) => format!("  -- {t}"),
    }
}

/// `dinod stage` for people: the stage, its Gram teacher and its refreshes, what the next
/// automatic transition waits for (from the recipe's thresholds: the daemon's, or the one
/// stored with the latest checkpoint) and the history with the reason of each transition.
fn stage_text(doc: &Value) -> String {
    use std::fmt::Write;
    let mut o = String::new();
    let Ok(st) = serde_json::from_value::<eval_probes::StageState>(doc["stage"].clone()) else {
        return "stage         pretrain (no evaluation yet)\n".into();
    };
    let _ = writeln!(
        o,
        "stage         {} since step {} ({} evaluations in all)",
        st.stage.as_str(),
        st.stage_start,
        st.evals
    );
    if let Some(b) = st.best_dense {
        let _ = writeln!(
            o,
            "best dense    {:.4} at step {} (pretraining)",
            b.value, b.step
        );
    }
    match &st.gram_teacher {
        Some(eval_probes::GramTeacherSource::BestDenseCheckpoint { step, value }) => {
            let _ = writeln!(
                o,
                "gram teacher  started from the EMA teacher of step {step} (the best dense checkpoint, {value:.4})"
            );
        }
        Some(eval_probes::GramTeacherSource::EmaTeacher { step }) => {
            let _ = writeln!(
                o,
                "gram teacher  started from the EMA teacher as of step {step}"
            );
        }
        None => {}
    }
    // the refreshes so far (with the EMA teacher's score when it was copied, where the
    // stage state recorded it), and what the next one waits for
    if let Some(steps) = doc["gram_refreshes"]["steps"]
        .as_array()
        .filter(|s| !s.is_empty())
    {
        let list: Vec<String> = steps
            .iter()
            .map(|s| {
                let at = s.as_u64();
                match st
                    .gram_refreshes
                    .iter()
                    .find(|r| Some(r.step) == at)
                    .and_then(|r| r.ema_dense)
                {
                    Some(p) => format!("{s} ({:.4} at step {})", p.value, p.step),
                    None => s.to_string(),
                }
            })
            .collect();
        let _ = writeln!(
            o,
            "              refreshed from the EMA teacher at step {} ({} of at most {})",
            list.join(", "),
            list.len(),
            doc["gram_refreshes"]["max"]
        );
    }
    if let Ok(Some(next)) = serde_json::from_value::<Option<eval_probes::RefreshOutlook>>(
        doc["gram_refreshes"]["next"].clone(),
    ) {
        let when = match &next.gate {
            Some(g) => format!(
                "due from step {}, then waits for [{}] {}",
                next.due_step,
                if g.met { "x" } else { " " },
                g.what
            ),
            None => format!("at step {}", next.due_step),
        };
        let _ = writeln!(
            o,
            "              next refresh ({} policy) {when}",
            next.policy.name()
        );
    }
    if doc["automatic"] == json!(false) {
        let _ = writeln!(o, "next          no automatic transitions (stages.automatic = false): dinod stage set STAGE");
    } else if let Ok(Some(out)) =
        serde_json::from_value::<Option<eval_probes::Outlook>>(doc["outlook"].clone())
    {
        if out.all_of.is_empty() {
            let _ = writeln!(o, "next          {}", out.next.as_str());
        } else {
            let _ = writeln!(
                o,
                "next          {} when all of these hold at an evaluation:",
                out.next.as_str()
            );
        }
        for c in &out.all_of {
            let _ = writeln!(o, "  [{}] {}", if c.met { "x" } else { " " }, c.what);
        }
        if let Some(c) = &out.or_when {
            let _ = writeln!(o, "  or [{}] {}", if c.met { "x" } else { " " }, c.what);
        }
        if let Some((steps, left)) = out.or_after {
            let _ = writeln!(
                o,
                "  {}after {steps} steps in the stage ({left} left)",
                if out.all_of.is_empty() { "" } else { "or " }
            );
        }
    }
    if !st.history.is_empty() {
        let _ = writeln!(o, "history");
    }
    for t in &st.history {
        let _ = writeln!(
            o,
            "  step {:<8} {} -> {}: {}",
            t.step,
            t.from.as_str(),
            t.to.as_str(),
            t.describe()
        );
    }
    o
}

/// `dinod export`.
pub fn export(
    state_dir: &Path,
    out: &Path,
    which: &str,
    step: Option<u64>,
    with_heads: bool,
    dtype: Option<&str>,
) -> Result<i32> {
    let dtype = match dtype {
        None => None,
        Some("f32") => Some(checkpoints::Dtype::F32),
        Some("f64") => Some(checkpoints::Dtype::F64),
        Some("bf16") => Some(checkpoints::Dtype::BF16),
        Some("f16") => Some(checkpoints::Dtype::F16),
        Some(d) => bail!("unknown --dtype `{d}` (f32, f64, bf16 or f16)"),
    };
    // a distillation student's checkpoints live in STATE/students/NAME; its EMA (the
    // model that is evaluated and exported) is stored as the `teacher` group there
    let student_dir;
    let (dir, group, what) = match which {
        "teacher" => (state_dir, "teacher", "EMA teacher".to_string()),
        "student" => (state_dir, "student", "student".to_string()),
        w if w.starts_with("student:") => {
            let name = &w["student:".len()..];
            student_dir = state_dir.join("students").join(name);
            if !student_dir.exists() {
                bail!(
                    "`{w}`: {} has no student named `{name}`",
                    state_dir.display()
                );
            }
            (
                student_dir.as_path(),
                "teacher",
                format!("EMA of student {name}"),
            )
        }
        w => bail!(
            "unknown --which `{w}` (teacher, student, or student:NAME for a distillation run)"
        ),
    };
    let (manifest, blobs) = crate::weights::read_group(dir, step, group)?;
    let (s, vit) = (manifest.step, crate::weights::vit_config(&manifest)?);
    let f64_out = blobs
        .tensors
        .first()
        .is_some_and(|b| b.dtype == checkpoints::Dtype::F64);
    let mut tensors: Vec<(String, checkpoints::TensorBlob)> = vec![];
    for b in blobs.tensors {
        match b.name.split_once('.') {
            Some(("backbone", key)) => tensors.push((key.to_string(), b)),
            Some(_) if with_heads => tensors.push((b.name.clone(), b)),
            _ => {}
        }
    }
    // the official module's buffers: RoPE periods and the key-bias masks
    let periods = ops::attention::rope_periods(vit.head_dim(), vit.rope_base);
    tensors.push((
        "rope_embed.periods".into(),
        blob_f("rope_embed.periods", &[periods.len()], &periods, f64_out)?,
    ));
    if vit.qkv_bias && vit.mask_k_bias {
        let d = vit.embed_dim;
        let mask: Vec<f64> = (0..3 * d)
            .map(|i| if (d..2 * d).contains(&i) { 0.0 } else { 1.0 })
            .collect();
        for i in 0..vit.depth {
            let n = format!("blocks.{i}.attn.qkv.bias_mask");
            tensors.push((n.clone(), blob_f(&n, &[3 * d], &mask, f64_out)?));
        }
    }
    if let Some(d) = dtype {
        for (_, b) in &mut tensors {
            *b = cast_blob(b, d)?;
        }
    }
    let views: Vec<(String, safetensors::tensor::TensorView<'_>)> = tensors
        .iter()
        .map(|(n, b)| {
            let dt = match b.dtype {
                checkpoints::Dtype::F64 => safetensors::Dtype::F64,
                checkpoints::Dtype::BF16 => safetensors::Dtype::BF16,
                checkpoints::Dtype::F16 => safetensors::Dtype::F16,
                _ => safetensors::Dtype::F32,
            };
            Ok((
                n.clone(),
                safetensors::tensor::TensorView::new(dt, b.shape.clone(), b.bytes())?,
            ))
        })
        .collect::<Result<_>>()?;
    // one metadata key: a HashMap with several would serialise in a random order
    let meta = std::collections::HashMap::from([(
        "dinod".to_string(),
        format!("dinov3 DinoVisionTransformer state_dict; {what} of step {s}"),
    )]);
    write_atomically(out, |tmp| {
        Ok(safetensors::serialize_to_file(views, Some(meta), tmp)?)
    })?;
    println!(
        "wrote {} ({} tensors) from the {what} of step {s}",
        out.display(),
        tensors.len()
    );
    Ok(0)
}

/// Writes the file `out` through `write`, which writes the path it is given: a temporary
/// sibling (same extension, for writers that pick the format by it), synced and renamed over
/// `out` once complete. A failure (a full disk, a kill) leaves an earlier `out` as it was,
/// and no partial file where a reader would take it for the real one.
pub(crate) fn write_atomically(out: &Path, write: impl FnOnce(&Path) -> Result<()>) -> Result<()> {
    let name = out
        .file_name()
        .with_context(|| format!("{} does not name a file", out.display()))?;
    let ext = out
        .extension()
        .map(|e| format!(".{}", e.to_string_lossy()))
        .unwrap_or_default();
    let tmp = out.with_file_name(format!(
        ".{}.partial-{}{ext}",
        name.to_string_lossy(),
        std::process::id()
    ));
    let dir = match out.parent() {
        Some(d) if !d.as_os_str().is_empty() => d,
        _ => Path::new("."),
    };
    let done = write(&tmp).and_then(|()| {
        std::fs::File::open(&tmp)?.sync_all()?;
        std::fs::rename(&tmp, out)?;
        std::fs::File::open(dir)?.sync_all()?;
        Ok(())
    });
    if done.is_err() {
        let _ = std::fs::remove_file(&tmp);
    }
    done.with_context(|| format!("writing {}", out.display()))
}

/// The blob's values in `to` (f32 or f64 in; halves rounded to nearest even).
fn cast_blob(
    b: &checkpoints::TensorBlob,
    to: checkpoints::Dtype,
) -> Result<checkpoints::TensorBlob> {
    use checkpoints::{Dtype as D, TensorBlob};
    if b.dtype == to {
        return Ok(b.clone());
    }
    let xs: Vec<f64> = match b.dtype {
        D::F64 => b.to_f64_vec()?,
        _ => b.to_f32_vec()?.into_iter().map(f64::from).collect(),
    };
    let bytes: Vec<u8> = match to {
        D::F64 => return Ok(TensorBlob::from_f64(&b.name, &b.shape, &xs)?),
        D::F32 => {
            let v: Vec<f32> = xs.iter().map(|&x| x as f32).collect();
            return Ok(TensorBlob::from_f32(&b.name, &b.shape, &v)?);
        }
        // through f32 (exact for an f32 checkpoint): `half`'s f64 conversions drop the low
        // mantissa bits before rounding, its f32 ones round to nearest even
        D::BF16 => xs
            .iter()
            .flat_map(|&x| half::bf16::from_f32(x as f32).to_le_bytes())
            .collect(),
        D::F16 => xs
            .iter()
            .flat_map(|&x| half::f16::from_f32(x as f32).to_le_bytes())
            .collect(),
        d => bail!("cannot write {d:?}"),
    };
    Ok(TensorBlob::new(&b.name, to, b.shape.clone(), bytes)?)
}

fn blob_f(
    name: &str,
    shape: &[usize],
    v: &[f64],
    f64_out: bool,
) -> Result<checkpoints::TensorBlob> {
    Ok(if f64_out {
        checkpoints::TensorBlob::from_f64(name, shape, v)?
    } else {
        checkpoints::TensorBlob::from_f32(
            name,
            shape,
            &v.iter().map(|&x| x as f32).collect::<Vec<_>>(),
        )?
    })
}

/// `dinod data scan`. A scan that takes longer than [`SCAN_PROGRESS_EVERY`] says how far it
/// is on stderr at that interval (an ImageNet-sized source decodes for minutes).
pub fn data_scan(
    spec: &str,
    json_out: bool,
    limit: Option<u64>,
    workers: Option<usize>,
) -> Result<i32> {
    let spec: data::SourceSpec = spec.parse().map_err(|e| anyhow!("{spec}: {e}"))?;
    let mut opts = data::ScanOptions {
        max_images: limit,
        ..data::ScanOptions::default()
    };
    if let Some(w) = workers {
        opts.n_workers = w.max(1);
    }
    let progress = data::ScanProgress::default();
    let (stop, stopped) = std::sync::mpsc::channel::<()>();
    let report = std::thread::scope(|scope| {
        let progress = &progress;
        scope.spawn(move || {
            let start = std::time::Instant::now();
            while let Err(std::sync::mpsc::RecvTimeoutError::Timeout) =
                stopped.recv_timeout(SCAN_PROGRESS_EVERY)
            {
                eprintln!("{}", scan_progress_line(progress, start.elapsed()));
            }
        });
        let report = data::scan_with_progress(&spec, &opts, progress);
        drop(stop);
        report
    })?;
    if json_out {
        println!("{}", serde_json::to_string_pretty(&report)?);
    } else {
        print!("{report}");
    }
    Ok(if report.is_clean() { 0 } else { EXIT_FAILED })
}

/// How often a long `dinod data scan` reports progress.
const SCAN_PROGRESS_EVERY: std::time::Duration = std::time::Duration::from_secs(10);

/// `scan: 120000 of 1281167 samples (9.4%), 3 bad, 812/s, about 24 min left`.
fn scan_progress_line(p: &data::ScanProgress, elapsed: std::time::Duration) -> String {
    use std::sync::atomic::Ordering::Relaxed;
    let (done, total, bad) = (
        p.done.load(Relaxed),
        p.total.load(Relaxed),
        p.bad.load(Relaxed),
    );
    if total == 0 {
        return format!("scan: opening the source ({:.0} s)", elapsed.as_secs_f64());
    }
    let rate = done as f64 / elapsed.as_secs_f64().max(1e-9);
    let left = if rate > 0.0 {
        let s = (total - done.min(total)) as f64 / rate;
        if s >= 90.0 {
            format!(", about {:.0} min left", s / 60.0)
        } else {
            format!(", about {s:.0} s left")
        }
    } else {
        String::new()
    };
    format!(
        "scan: {done} of {total} samples ({:.1}%), {bad} bad, {rate:.0}/s{left}",
        100.0 * done as f64 / total as f64
    )
}

/// `dinod data build-copypaste`.
pub fn build_copypaste(from: &Path, out: &Path, seed: u64) -> Result<i32> {
    let cfg = data::CopyPasteConfig {
        seed,
        ..Default::default()
    };
    let m = data::build_copy_paste(&from.join("stamps"), &from.join("backgrounds"), out, &cfg)?;
    println!(
        "built {} into {}",
        serde_json::to_string(
            &json!({"classes": m.classes, "train": m.train.len(), "test": m.test.len()})
        )?,
        out.display()
    );
    Ok(0)
}

/// `dinod bench data`.
pub fn bench_data(
    spec: &str,
    workers: &[usize],
    samples: u64,
    config: Option<&PathBuf>,
    json_out: bool,
) -> Result<i32> {
    let spec: data::SourceSpec = spec.parse().map_err(|e| anyhow!("{spec}: {e}"))?;
    let crops = match config {
        Some(c) => load_plan(Some(c))?.config.data.crops,
        None => data::CropConfig::default(),
    };
    for &w in workers {
        let r = data::bench_multicrop(&spec, &crops, w, samples)?;
        if json_out {
            println!("{}", serde_json::to_string(&r)?);
        } else {
            println!("{r}");
        }
    }
    Ok(0)
}

#[cfg(test)]
mod tests {
    use super::member_waits_line;

    #[test]
    fn the_member_waits_line_names_a_straggler_only_when_one_stands_out() {
        assert_eq!(
            member_waits_line(&[0.0, 0.4, 212.0, 3.1]),
            "waits per step for each member to enter the sums: member 1 0.4 ms, member 2 212.0 ms, member 3 3.1 ms (slowest: member 2)"
        );
        // two as slow, or all quick: nobody is named
        assert!(!member_waits_line(&[0.0, 150.0, 120.0]).contains("slowest"));
        assert!(!member_waits_line(&[0.0, 0.6, 0.1]).contains("slowest"));
        // one worker: no one to compare it with
        assert_eq!(
            member_waits_line(&[0.0, 5.0]),
            "waits per step for each member to enter the sums: member 1 5.0 ms"
        );
    }

    use super::{cast_blob, scan_progress_line};
    use checkpoints::{Dtype, TensorBlob};

    #[test]
    fn scan_progress_says_how_far_how_fast_and_how_long() {
        use std::sync::atomic::Ordering::Relaxed;
        let p = data::ScanProgress::default();
        let t = std::time::Duration::from_secs(10);
        assert_eq!(scan_progress_line(&p, t), "scan: opening the source (10 s)");
        p.total.store(1_000_000, Relaxed);
        p.done.store(10_000, Relaxed);
        p.bad.store(3, Relaxed);
        assert_eq!(
            scan_progress_line(&p, t),
            "scan: 10000 of 1000000 samples (1.0%), 3 bad, 1000/s, about 16 min left"
        );
        p.done.store(999_500, Relaxed);
        assert!(
            scan_progress_line(&p, std::time::Duration::from_secs(1000))
                .ends_with("about 1 s left"),
            "{}",
            scan_progress_line(&p, std::time::Duration::from_secs(1000))
        );
    }

    /// Halves are rounded to nearest even, to the bit patterns IEEE and bfloat16 give.
    #[test]
    fn an_export_in_half_precision_rounds_to_nearest_even() {
        let xs = [1.0f32, 0.1, 65504.0, 2f32.powi(-24), -2.5];
        let b = TensorBlob::from_f32("w", &[5], &xs).unwrap();
        let bits = |b: &TensorBlob| -> Vec<u16> {
            b.bytes()
                .chunks_exact(2)
                .map(|c| u16::from_le_bytes([c[0], c[1]]))
                .collect()
        };
        let h = cast_blob(&b, Dtype::F16).unwrap();
        assert_eq!((h.dtype, h.shape.clone()), (Dtype::F16, vec![5]));
        assert_eq!(bits(&h), [0x3C00, 0x2E66, 0x7BFF, 0x0001, 0xC100]);
        let h = cast_blob(&b, Dtype::BF16).unwrap();
        assert_eq!(bits(&h), [0x3F80, 0x3DCD, 0x4780, 0x3380, 0xC020]);
        // f64 from f32 and back: exact
        let d = cast_blob(&b, Dtype::F64).unwrap();
        assert_eq!(cast_blob(&d, Dtype::F32).unwrap(), b);
    }
}
