//! The daemon's guarantees, each proved with real processes: determinism and bit-exact
//! resume, SIGKILL at random moments, injected actor panics, NaN steps, corrupt
//! checkpoints, a failing disk, device loss, hangs, and the live control socket.

use std::path::Path;
use std::sync::OnceLock;
use std::time::{Duration, Instant};

use serde_json::Value;

use crate::support::*;

const STEPS: u64 = 12;

fn kinds(evs: &[Value]) -> Vec<String> {
    evs.iter()
        .map(|e| e["kind"].as_str().unwrap_or("").to_string())
        .collect()
}

/// The fingerprint of a fault-free run of the tiny recipe to `STEPS`.
fn reference() -> &'static (u64, String) {
    static R: OnceLock<(u64, String)> = OnceLock::new();
    R.get_or_init(|| {
        let dir = TempDir::new("reference");
        let cfg = write_config(dir.path(), &tiny_config(""));
        let st = dir.path().join("state");
        let o = run_to(&cfg, &st, STEPS, &[]);
        assert_eq!(o.status.code(), Some(0), "{}", text(&o));
        let fp = fingerprint(&st);
        assert_eq!(fp.0, STEPS);
        assert_eq!(fp.1.len(), 64);
        fp
    })
}

/// A run that stops between periodic checkpoints writes a final one, and `status` (read
/// from the catalog once the daemon is gone) reports that one, not the periodic one
/// before it.
#[test]
fn a_stopped_run_reports_its_final_checkpoint() {
    let dir = TempDir::new("final-ck");
    let cfg = write_config(dir.path(), &tiny_config(""));
    let st = dir.path().join("state");
    // checkpoints every 3 steps: a periodic one at 3, the final one at 4
    let o = run_to(&cfg, &st, 4, &[]);
    assert_eq!(o.status.code(), Some(0), "{}", text(&o));
    let s = status(&st);
    assert_eq!(s["run"]["step"], 4);
    assert_eq!(s["run"]["last_checkpoint"], 4, "{}", s["run"]);
    assert!(s["run"]["last_checkpoint_durable_ms"].as_f64().unwrap() > 0.0);
}

#[test]
fn fresh_runs_are_bit_identical_and_resume_is_exact() {
    let dir = TempDir::new("determinism");
    let cfg = write_config(dir.path(), &tiny_config(""));
    let a = dir.path().join("a");
    assert_eq!(run_to(&cfg, &a, STEPS, &[]).status.code(), Some(0));
    assert_eq!(&fingerprint(&a), reference(), "two fresh runs differ");
    // stop at 5, resume to 12
    let b = dir.path().join("b");
    assert_eq!(run_to(&cfg, &b, 5, &[]).status.code(), Some(0));
    assert_eq!(fingerprint(&b).0, 5);
    let o = run_to(&cfg, &b, STEPS, &[]);
    assert_eq!(o.status.code(), Some(0), "{}", text(&o));
    assert_eq!(
        &fingerprint(&b),
        reference(),
        "stop + resume differs from an uninterrupted run"
    );
    // exported weights: same bytes, official names
    let (ea, eb) = (
        dir.path().join("a.safetensors"),
        dir.path().join("b.safetensors"),
    );
    for (st, out) in [(&a, &ea), (&b, &eb)] {
        let o = dinod(&[
            "export",
            "--state-dir",
            st.to_str().unwrap(),
            "--out",
            out.to_str().unwrap(),
        ]);
        assert_eq!(o.status.code(), Some(0), "{}", text(&o));
    }
    assert!(
        std::fs::read(&ea).unwrap() == std::fs::read(&eb).unwrap(),
        "exported files differ"
    );
    // the tiny model has depth 2 and 4 registers like the golden ViT: the names must match
    let ours = safetensors_names(&ea);
    let golden_names: Vec<String> = safetensors_names(&golden().join("vit_forward.safetensors"))
        .into_iter()
        .filter_map(|n| n.strip_prefix("param.backbone.").map(|s| s.to_string()))
        .collect();
    assert_eq!(ours, golden_names);
}

fn safetensors_names(p: &Path) -> Vec<String> {
    let bytes = std::fs::read(p).unwrap();
    let st = safetensors::SafeTensors::deserialize(&bytes).unwrap();
    let mut v: Vec<String> = st.names().into_iter().map(|s| s.to_string()).collect();
    v.sort();
    v
}

/// SIGKILL at random moments (during steps and during checkpoint writes), at least 10
/// times; every resume is exact and no committed checkpoint is ever lost.
#[test]
fn sigkill_at_random_moments_loses_nothing_and_resumes_exactly() {
    let dir = TempDir::new("sigkill");
    let cfg = write_config(dir.path(), &tiny_config(""));
    let st = dir.path().join("state");
    let seed = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .unwrap()
        .as_nanos() as u64;
    eprintln!("sigkill test seed {seed}");
    let mut rng = seed | 1;
    let mut next = || {
        rng ^= rng << 13;
        rng ^= rng >> 7;
        rng ^= rng << 17;
        rng
    };
    let mut committed_max = 0u64;
    let mut kills = 0;
    let mut rounds = 0;
    // (a kill lands only when the run is still going at the random moment: runs that
    // finish first are started over, so allow rounds enough for 10 on a fast machine)
    while kills < 10 && rounds < 100 {
        rounds += 1;
        let mut child = spawn(&[
            "run",
            "--config",
            cfg.to_str().unwrap(),
            "--state-dir",
            st.to_str().unwrap(),
            "--max-steps",
            &STEPS.to_string(),
            "--checkpoint-every",
            "1",
        ]);
        let wait_ms = 20 + next() % 300;
        std::thread::sleep(Duration::from_millis(wait_ms));
        if child.try_wait().unwrap().is_none() {
            unsafe { libc::kill(child.id() as i32, libc::SIGKILL) };
            kills += 1;
        }
        let _ = child.wait();
        if !st.join("catalog").exists() {
            continue;
        }
        // every checkpoint verifies; the latest never goes back
        let o = dinod(&[
            "checkpoints",
            "verify",
            "--json",
            "--state-dir",
            st.to_str().unwrap(),
        ]);
        assert_eq!(o.status.code(), Some(0), "after kill {kills}: {}", text(&o));
        let latest = checkpoint_rows(&st)
            .iter()
            .filter_map(|c| c["step"].as_u64())
            .max()
            .unwrap_or(0);
        assert!(
            latest >= committed_max,
            "checkpoint at step {committed_max} was lost (latest now {latest})"
        );
        committed_max = latest;
        if latest >= STEPS {
            // finished before the kill: start over to keep killing mid-run
            std::fs::remove_dir_all(&st).unwrap();
            committed_max = 0;
        }
    }
    assert!(kills >= 10, "only {kills} kills landed");
    let o = run_to(&cfg, &st, STEPS, &[]);
    assert_eq!(o.status.code(), Some(0), "{}", text(&o));
    assert_eq!(
        &fingerprint(&st),
        reference(),
        "resumed run differs from the uninterrupted one (seed {seed})"
    );
}

/// A panic injected into each actor kind is survived, and training reaches the target
/// with exactly the weights of a run without the fault.
#[test]
fn a_panic_in_any_actor_is_survived_with_identical_results() {
    for actor in [
        "data_loader",
        "teacher",
        "trainer",
        "ema",
        "coordinator",
        "checkpointer",
        "control",
        "evaluator",
    ] {
        let dir = TempDir::new(&format!("panic-{actor}"));
        let cfg = write_config(dir.path(), &tiny_config(""));
        let st = dir.path().join("state");
        // the checkpointer only works at checkpoint steps (the first is 3)
        let fault = if actor == "checkpointer" {
            format!("panic:{actor}@3")
        } else {
            format!("panic:{actor}@7")
        };
        let o = run_to(&cfg, &st, STEPS, &["--inject", &fault]);
        assert_eq!(o.status.code(), Some(0), "{actor}: {}", text(&o));
        assert_eq!(
            &fingerprint(&st),
            reference(),
            "{actor}: result differs from the fault-free run"
        );
        let ev = events(&st);
        assert!(
            ev.iter()
                .any(|e| e["kind"] == "actor.restarting" && e["actor"] == actor),
            "{actor}: no restart event in {:?}",
            kinds(&ev)
        );
    }
}

#[test]
fn a_nan_step_is_discarded_and_retried() {
    let dir = TempDir::new("nan");
    let cfg = write_config(dir.path(), &tiny_config(""));
    let st = dir.path().join("state");
    let o = run_to(&cfg, &st, STEPS, &["--inject", "nan@5"]);
    assert_eq!(o.status.code(), Some(0), "{}", text(&o));
    // the retry of the same batch succeeds: nothing was lost
    assert_eq!(&fingerprint(&st), reference());
    let k = kinds(&events(&st));
    assert!(k.contains(&"step.discarded".to_string()), "{k:?}");
    assert_eq!(status(&st)["run"]["bad_steps"], 1);
}

#[test]
fn a_repeatedly_bad_batch_is_quarantined_and_bad_streaks_roll_back() {
    let dir = TempDir::new("rollback");
    let cfg = write_config(
        dir.path(),
        &tiny_config("[runtime.bad_steps]\nmax_bad_in_window = 2\nwindow_steps = 10\n"),
    );
    let st = dir.path().join("state");
    let o = run_to(
        &cfg,
        &st,
        STEPS,
        &["--inject", "nan@4x2", "--inject", "nan@5x2"],
    );
    assert_eq!(o.status.code(), Some(0), "{}", text(&o));
    let k = kinds(&events(&st));
    assert!(k.contains(&"step.quarantined".to_string()), "{k:?}");
    assert!(k.contains(&"run.rollback".to_string()), "{k:?}");
    assert_eq!(fingerprint(&st).0, STEPS);
}

#[test]
fn a_corrupt_checkpoint_falls_back_to_the_previous_one() {
    let dir = TempDir::new("corrupt");
    let cfg = write_config(dir.path(), &tiny_config(""));
    let st = dir.path().join("state");
    assert_eq!(run_to(&cfg, &st, 9, &[]).status.code(), Some(0));
    // flip one byte in the middle of the latest student tensors
    corrupt_newest_checkpoint(&st);
    let o = dinod(&["checkpoints", "verify", "--state-dir", st.to_str().unwrap()]);
    assert_eq!(
        o.status.code(),
        Some(1),
        "verify must report the corruption: {}",
        text(&o)
    );
    let out = String::from_utf8_lossy(&o.stdout);
    assert!(
        out.contains("CORRUPT") && out.contains("1 corrupt"),
        "{}",
        text(&o)
    );
    let o = run_to(&cfg, &st, STEPS, &[]);
    assert_eq!(o.status.code(), Some(0), "{}", text(&o));
    // replay from the previous checkpoint is exact
    assert_eq!(&fingerprint(&st), reference());
    let k = kinds(&events(&st));
    assert!(k.iter().any(|x| x.contains("fallback")), "{k:?}");
}

/// A run killed before its first checkpoint has a catalog and nothing in it: `verify` and
/// `list` say so instead of printing nothing.
#[test]
fn checkpoint_commands_say_so_when_a_run_has_none_yet() {
    let dir = TempDir::new("nockpt");
    let cfg = write_config(dir.path(), &tiny_config(""));
    let st = dir.path().join("state");
    let state = st.to_str().unwrap();
    // step 1 stalls for a minute: long enough to find the daemon up and kill it
    let mut child = spawn(&[
        "run",
        "--config",
        cfg.to_str().unwrap(),
        "--state-dir",
        state,
        "--inject",
        "slow:teacher@1+60000",
    ]);
    let deadline = Instant::now() + Duration::from_secs(60);
    while !dinod(&["status", "--state-dir", state]).status.success() {
        assert!(Instant::now() < deadline, "the daemon never answered");
        std::thread::sleep(Duration::from_millis(100));
    }
    unsafe { libc::kill(child.id() as i32, libc::SIGKILL) };
    let _ = child.wait();
    for (action, says) in [
        ("verify", "no checkpoints in"),
        ("verify", "nothing to verify"),
        ("list", "no checkpoints in"),
    ] {
        let o = dinod(&["checkpoints", action, "--state-dir", state]);
        assert_eq!(o.status.code(), Some(0), "{action}: {}", text(&o));
        assert!(
            String::from_utf8_lossy(&o.stdout).contains(says),
            "{action}: {}",
            text(&o)
        );
    }
}

#[test]
fn a_disk_error_during_a_save_keeps_training_and_loses_nothing() {
    let dir = TempDir::new("ioerr");
    let cfg = write_config(dir.path(), &tiny_config(""));
    let st = dir.path().join("state");
    let o = run_to(&cfg, &st, STEPS, &["--inject", "io_error@6"]);
    assert_eq!(o.status.code(), Some(0), "{}", text(&o));
    assert_eq!(&fingerprint(&st), reference());
    let k = kinds(&events(&st));
    assert!(k.contains(&"checkpoint.failed".to_string()), "{k:?}");
    let o = dinod(&["checkpoints", "verify", "--state-dir", st.to_str().unwrap()]);
    assert_eq!(o.status.code(), Some(0), "{}", text(&o));
}

/// `checkpoint.min_free_gb`: a save that would eat into the space that must stay free is
/// refused before it writes anything, says why, and training goes on as without it; a
/// run whose final save is refused exits 74, not 0.
#[test]
fn saves_that_would_fill_the_disk_are_refused_and_training_goes_on() {
    let dir = TempDir::new("reserve");
    let cfg = write_config(dir.path(), &tiny_config("min_free_gb = 1e9"));
    let st = dir.path().join("state");
    let o = run_to(&cfg, &st, STEPS, &[]);
    // trained as without the saves, but the final one failed too: the status says the
    // steps are lost, and so does the stop event
    assert_eq!(o.status.code(), Some(74), "{}", text(&o));
    assert_eq!(&fingerprint(&st), reference());
    let ev = events(&st);
    let stopped = ev.iter().find(|e| e["kind"] == "run.stopped").unwrap();
    assert_eq!(stopped["level"], "error", "{stopped}");
    assert!(
        stopped["message"].as_str().is_some_and(
            |m| m.contains("the final checkpoint was not written (the newest is none)")
        ),
        "{stopped}"
    );
    let refused: Vec<&serde_json::Value> = ev
        .iter()
        .filter(|e| {
            e["kind"] == "checkpoint.failed"
                && e["message"].as_str().is_some_and(|m| {
                    m.contains("must stay free") && m.contains("checkpoint.min_free_gb")
                })
        })
        .collect();
    assert!(!refused.is_empty(), "no refusal in the events: {ev:?}");
    assert!(checkpoint_rows(&st).is_empty(), "nothing was written");
    // `dinod status` says the saves are failing, from the first failed one to the final
    let status_text = || {
        let o = dinod(&["status", "--state-dir", st.to_str().unwrap()]);
        assert_eq!(o.status.code(), Some(0), "{}", text(&o));
        String::from_utf8_lossy(&o.stdout).to_string()
    };
    let v = status(&st);
    let f = &v["run"]["failed_saves"];
    assert_eq!(f["since_step"], 3, "{f}");
    assert_eq!(f["last_step"], STEPS, "{f}");
    assert!(f["count"].as_u64().unwrap() >= 2, "{f}");
    assert!(
        f["last_error"].as_str().unwrap().contains("must stay free"),
        "{f}"
    );
    assert!(status_text().contains("SAVES FAILING"));
    // with the default reserve the same state directory trains from scratch and saves
    let cfg = write_config(dir.path(), &tiny_config(""));
    assert_eq!(run_to(&cfg, &st, 3, &[]).status.code(), Some(0));
    assert_eq!(checkpoint_rows(&st).len(), 1);
    let v = status(&st);
    assert!(v["run"]["failed_saves"].is_null(), "{v}");
    assert!(!status_text().contains("SAVES FAILING"));
}

/// `checkpoint.max_disk_gb`: over the budget the oldest checkpoints kept only by
/// `keep_every` are deleted; the newest `keep_last` stay, and training is unchanged.
#[test]
fn a_disk_budget_deletes_the_oldest_keep_every_checkpoints() {
    let dir = TempDir::new("budget");
    let st = dir.path().join("all");
    let cfg = write_config(dir.path(), &tiny_config("keep_every = 3"));
    // steps of 40 ms, so that a save (every 3 steps) is written before the next is due; a
    // save that still comes late (a loaded machine) is kept for its multiple
    let slow: Vec<String> = (1..STEPS)
        .flat_map(|s| ["--inject".to_string(), format!("slow:trainer@{s}+40")])
        .collect();
    let slow: Vec<&str> = slow.iter().map(String::as_str).collect();
    assert_eq!(run_to(&cfg, &st, STEPS, &slow).status.code(), Some(0));
    let rows = checkpoint_rows(&st);
    let steps = |rows: &[serde_json::Value]| -> Vec<u64> {
        rows.iter().map(|r| r["step"].as_u64().unwrap()).collect()
    };
    // one per multiple of 3: 3, 6, 9, 12, or a late save standing for its multiple
    let windows = |s: Vec<u64>| -> Vec<u64> { s.into_iter().map(|s| s / 3).collect() };
    assert_eq!(
        windows(steps(&rows)),
        [1, 2, 3, 4],
        "keep_every keeps them all"
    );
    assert_eq!(steps(&rows).last(), Some(&STEPS));
    let biggest = rows
        .iter()
        .map(|r| r["bytes"].as_u64().unwrap())
        .max()
        .unwrap();
    // room for three and a half: the oldest (step 3) goes
    let budget = 3.5 * biggest as f64 / 1e9;
    let st = dir.path().join("budget");
    let cfg = write_config(
        dir.path(),
        &tiny_config(&format!("keep_every = 3\nmax_disk_gb = {budget}")),
    );
    let o = run_to(&cfg, &st, STEPS, &slow);
    assert_eq!(o.status.code(), Some(0), "{}", text(&o));
    assert_eq!(windows(steps(&checkpoint_rows(&st))), [2, 3, 4]);
    assert_eq!(&fingerprint(&st), reference());
}

#[test]
fn an_unusable_state_directory_is_a_clear_error() {
    let dir = TempDir::new("unwritable");
    let cfg = write_config(dir.path(), &tiny_config(""));
    let file = dir.path().join("a-file");
    std::fs::write(&file, b"x").unwrap();
    let st = file.join("state");
    let o = run_to(&cfg, &st, 3, &[]);
    assert_ne!(o.status.code(), Some(0));
    let err = String::from_utf8_lossy(&o.stderr);
    assert!(
        err.contains(st.to_str().unwrap()),
        "the error must name the directory: {err}"
    );
}

#[test]
fn resuming_with_another_architecture_is_refused() {
    let dir = TempDir::new("arch");
    let cfg = write_config(dir.path(), &tiny_config(""));
    let st = dir.path().join("state");
    assert_eq!(run_to(&cfg, &st, 3, &[]).status.code(), Some(0));
    let other = dir.path().join("other.toml");
    std::fs::write(
        &other,
        tiny_config("").replace("embed_dim = 32", "embed_dim = 48"),
    )
    .unwrap();
    let o = run_to(&other, &st, 6, &[]);
    assert_eq!(o.status.code(), Some(1), "{}", text(&o));
    assert!(
        String::from_utf8_lossy(&o.stderr).contains("architecture differs"),
        "{}",
        text(&o)
    );
    assert_eq!(
        fingerprint(&st).0,
        3,
        "the refused run must not touch the state"
    );
}

#[test]
fn losing_the_device_checkpoints_and_exits_75() {
    let dir = TempDir::new("device");
    let cfg = write_config(dir.path(), &tiny_config(""));
    let st = dir.path().join("state");
    let o = run_to(&cfg, &st, STEPS, &["--inject", "device_lost@5"]);
    assert_eq!(o.status.code(), Some(75), "{}", text(&o));
    let v = checkpoint_rows(&st);
    assert!(
        v.iter().any(|c| c["step"] == 5),
        "no consistent checkpoint at the failing step: {v:?}"
    );
    // the restarted process continues exactly
    let o = run_to(&cfg, &st, STEPS, &[]);
    assert_eq!(o.status.code(), Some(0), "{}", text(&o));
    assert_eq!(&fingerprint(&st), reference());
}

#[test]
fn waiting_for_a_lost_device_resumes_when_it_answers() {
    let dir = TempDir::new("device-wait");
    let cfg = write_config(
        dir.path(),
        &tiny_config("[runtime]\non_gpu_loss = \"wait\"\ngpu_probe_every_s = 0.2\n"),
    );
    let st = dir.path().join("state");
    // the device stays away for 1.5 s after the loss at step 5 (the fault named by its
    // actor: that form once never fired)
    let o = run_to(
        &cfg,
        &st,
        STEPS,
        &["--inject", "device_lost:trainer@5+1500"],
    );
    assert_eq!(o.status.code(), Some(0), "{}", text(&o));
    let ev = events(&st);
    let k = kinds(&ev);
    for want in [
        "device.lost",
        "device.waiting",
        "device.probe_failed",
        "device.restored",
    ] {
        assert!(k.iter().any(|x| x == want), "no {want} in {k:?}");
    }
    let restored = ev.iter().find(|e| e["kind"] == "device.restored").unwrap();
    let waited = restored["fields"]["waited_s"].as_f64().unwrap();
    assert!(
        waited >= 1.4,
        "restored after {waited} s, before the device came back"
    );
    let probes = restored["fields"]["probes"].as_u64().unwrap();
    assert!(
        (2..=12).contains(&probes),
        "{probes} probes in {waited:.1} s at one per 0.2 s"
    );
    // the wait lost nothing: the run is the uninterrupted one
    assert_eq!(&fingerprint(&st), reference());
    assert_eq!(status(&st)["run"]["device"], "cpu");
}

#[test]
fn a_device_that_does_not_come_back_in_time_exits_75_and_the_restart_continues() {
    let dir = TempDir::new("device-wait-expired");
    let cfg = write_config(
        dir.path(),
        &tiny_config(
            "[runtime]\non_gpu_loss = \"wait\"\ngpu_probe_every_s = 0.1\ngpu_wait_max_s = 0.5\n",
        ),
    );
    let st = dir.path().join("state");
    let o = run_to(&cfg, &st, STEPS, &["--inject", "device_lost@5+60000"]);
    assert_eq!(o.status.code(), Some(75), "{}", text(&o));
    let k = kinds(&events(&st));
    assert!(k.iter().any(|x| x == "device.wait_expired"), "{k:?}");
    assert!(!k.iter().any(|x| x == "device.restored"), "{k:?}");
    let o = run_to(&cfg, &st, STEPS, &[]);
    assert_eq!(o.status.code(), Some(0), "{}", text(&o));
    assert_eq!(&fingerprint(&st), reference());
}

#[test]
fn losing_the_device_with_the_cpu_policy_goes_on_on_the_cpu_plan() {
    let dir = TempDir::new("device-cpu");
    let cfg = write_config(
        dir.path(),
        &tiny_config("[runtime]\non_gpu_loss = \"cpu\"\ncpu_batch_size = 2\n"),
    );
    let st = dir.path().join("state");
    let o = run_to(&cfg, &st, STEPS, &["--inject", "device_lost@5"]);
    assert_eq!(o.status.code(), Some(0), "{}", text(&o));
    let ev = events(&st);
    let fb = ev
        .iter()
        .find(|e| e["kind"] == "device.fallback")
        .unwrap_or_else(|| panic!("no device.fallback in {:?}", kinds(&ev)));
    assert_eq!(fb["fields"]["batch_size"], 2);
    assert_eq!(fb["fields"]["was_batch_size"], 4);
    // the LR follows the smaller batch by `train.lr_scaling`
    let (lr, was) = (
        fb["fields"]["lr"].as_f64().unwrap(),
        fb["fields"]["was_lr"].as_f64().unwrap(),
    );
    assert!(lr > 0.0 && lr < was, "lr {lr} was {was}");
    let s = status(&st);
    assert_eq!(s["run"]["step"], STEPS);
    assert_eq!(s["run"]["batch_size"], 2);
    assert!(
        s["run"]["device"].as_str().unwrap().contains("fallback"),
        "{}",
        s["run"]
    );
    // the steps after the fallback are not the uninterrupted run's
    assert_ne!(&fingerprint(&st), reference());
    // a restarted process goes back to the configured plan
    let o = run_to(&cfg, &st, STEPS + 3, &[]);
    assert_eq!(o.status.code(), Some(0), "{}", text(&o));
    let s = status(&st);
    assert_eq!(s["run"]["step"], STEPS + 3);
    assert_eq!(s["run"]["batch_size"], 4);
    assert_eq!(s["run"]["device"], "cpu");
}

#[test]
fn a_second_loss_on_the_cpu_fallback_exits_75() {
    let dir = TempDir::new("device-cpu-twice");
    let cfg = write_config(
        dir.path(),
        &tiny_config("[runtime]\non_gpu_loss = \"cpu\"\ncpu_batch_size = 2\n"),
    );
    let st = dir.path().join("state");
    let o = run_to(
        &cfg,
        &st,
        STEPS,
        &["--inject", "device_lost@5", "--inject", "device_lost@8"],
    );
    assert_eq!(o.status.code(), Some(75), "{}", text(&o));
    let ev = events(&st);
    let lost: Vec<&Value> = ev.iter().filter(|e| e["kind"] == "device.lost").collect();
    assert_eq!(lost.len(), 2, "{:?}", kinds(&ev));
    assert_eq!(lost[0]["fields"]["policy"], "cpu");
    assert_eq!(lost[1]["fields"]["policy"], "exit");
    assert_eq!(
        ev.iter().filter(|e| e["kind"] == "device.fallback").count(),
        1,
        "{:?}",
        kinds(&ev)
    );
}

/// `precision = "bf16"`: the step computes in bf16, the master weights, optimizer state
/// and checkpoints stay f32, a resume is exact, and the same state directory can go on in
/// f32 (the master type is what must match).
#[test]
fn bf16_mixed_precision_trains_keeps_f32_masters_and_resumes_exactly() {
    let dir = TempDir::new("bf16");
    let recipe = tiny_config("").replace("precision = \"f32\"", "precision = \"bf16\"");
    let cfg = write_config(dir.path(), &recipe);
    let whole = dir.path().join("whole");
    let o = run_to(&cfg, &whole, STEPS, &[]);
    assert_eq!(o.status.code(), Some(0), "{}", text(&o));
    let (step, fp) = fingerprint(&whole);
    assert_eq!(step, STEPS);
    assert_ne!(
        &(step, fp.clone()),
        reference(),
        "bf16 compute changed nothing"
    );
    let losses = &status(&whole)["run"]["losses"];
    assert!(
        losses["total"].as_f64().is_some_and(f64::is_finite),
        "{losses}"
    );
    let ck = whole.join(format!("checkpoints/step-{STEPS:012}"));
    for f in ["student", "teacher", "optimizer"] {
        let bytes = std::fs::read(ck.join(format!("{f}.safetensors"))).unwrap();
        let st = safetensors::SafeTensors::deserialize(&bytes).unwrap();
        for (name, t) in st.tensors() {
            assert_eq!(t.dtype(), safetensors::Dtype::F32, "{f}: {name}");
        }
    }
    // stopped half-way and resumed: the same run
    let split = dir.path().join("split");
    let o = run_to(&cfg, &split, STEPS / 2, &[]);
    assert_eq!(o.status.code(), Some(0), "{}", text(&o));
    let o = run_to(&cfg, &split, STEPS, &[]);
    assert_eq!(o.status.code(), Some(0), "{}", text(&o));
    assert_eq!(fingerprint(&split), (STEPS, fp));
    // the f32 recipe takes the bf16 run over
    let f32_cfg = write_config(&dir.path().join("whole"), &tiny_config(""));
    let o = run_to(&f32_cfg, &whole, STEPS + 3, &[]);
    assert_eq!(o.status.code(), Some(0), "{}", text(&o));
    assert_eq!(fingerprint(&whole).0, STEPS + 3);
}

/// A step that fails the same way every time is not retried forever: after
/// `max_redos` redos the run stops with the error (and a restart resumes it once the
/// cause is gone).
#[test]
fn a_step_that_keeps_failing_stops_the_run_after_max_redos() {
    let dir = TempDir::new("redos");
    let cfg = write_config(
        dir.path(),
        &tiny_config("[runtime.bad_steps]\nmax_redos = 3\n"),
    );
    let st = dir.path().join("state");
    let o = run_to(&cfg, &st, STEPS, &["--inject", "device_error:trainer@5x50"]);
    assert_eq!(o.status.code(), Some(70), "{}", text(&o));
    let ev = events(&st);
    let fatal = ev
        .iter()
        .find(|e| e["kind"] == "run.fatal")
        .unwrap_or_else(|| panic!("no run.fatal in {:?}", kinds(&ev)));
    let msg = fatal["message"].as_str().unwrap();
    assert!(
        msg.contains("step 5 failed 4 times in a row") && msg.contains("injected device error"),
        "{msg}"
    );
    let o = run_to(&cfg, &st, STEPS, &[]);
    assert_eq!(o.status.code(), Some(0), "{}", text(&o));
    assert_eq!(&fingerprint(&st), reference());
}

/// The exported weights of a state directory, by name, as f64.
fn exported(state: &Path, out: &Path) -> std::collections::BTreeMap<String, Vec<f64>> {
    let o = dinod(&[
        "export",
        "--state-dir",
        state.to_str().unwrap(),
        "--out",
        out.to_str().unwrap(),
    ]);
    assert_eq!(o.status.code(), Some(0), "{}", text(&o));
    f32_tensors(&std::fs::read(out).unwrap())
}

/// The tiny recipe without what is per member (KoLeo, drop path): a group of members
/// trains what one member trains.
fn dp_base() -> String {
    tiny_config("[model.loss]\nkoleo_loss_weight = 0.0\n")
        .replace("drop_path = 0.2", "drop_path = 0.0")
}

/// `runtime.data_parallel = 2`: two members (threads here) on half the batch each train
/// what one member trains on the whole batch (KoLeo and drop path, which are per member,
/// off), a resume of the group run is exact, and the checkpoint is written once.
#[test]
fn a_data_parallel_daemon_trains_what_one_member_trains() {
    let dir = TempDir::new("dp-daemon");
    let base = dp_base();
    let one = write_config(dir.path(), &base);
    let two_dir = dir.path().join("two");
    std::fs::create_dir_all(&two_dir).unwrap();
    let two = write_config(&two_dir, &format!("{base}\n[runtime]\ndata_parallel = 2\n"));
    let (s1, s2) = (dir.path().join("s1"), dir.path().join("s2"));
    let o = run_to(&one, &s1, STEPS, &[]);
    assert_eq!(o.status.code(), Some(0), "{}", text(&o));
    let o = run_to(&two, &s2, STEPS, &[]);
    assert_eq!(o.status.code(), Some(0), "{}", text(&o));
    let (a, b) = (
        exported(&s1, &dir.path().join("one.safetensors")),
        exported(&s2, &dir.path().join("two.safetensors")),
    );
    let diff = max_rel_diff(&a, &b);
    assert!(diff < 1e-5, "two members vs one: {diff:e}");
    assert!(
        diff > 0.0,
        "the group run is the one-member run: nothing was split"
    );
    let (l1, l2) = (
        status(&s1)["run"]["losses"].clone(),
        status(&s2)["run"]["losses"].clone(),
    );
    for k in ["dino_local", "dino_global", "ibot"] {
        let (x, y) = (l1[k].as_f64().unwrap(), l2[k].as_f64().unwrap());
        assert!((x - y).abs() < 1e-5 * x.abs(), "{k}: {x} vs {y}");
    }
    // stopped half-way and resumed: the same group run, bit for bit
    let s3 = dir.path().join("s3");
    let o = run_to(&two, &s3, STEPS / 2, &[]);
    assert_eq!(o.status.code(), Some(0), "{}", text(&o));
    let o = run_to(&two, &s3, STEPS, &[]);
    assert_eq!(o.status.code(), Some(0), "{}", text(&o));
    assert_eq!(fingerprint(&s3), fingerprint(&s2));
    // the second start resumed after a clean stop, and says so
    let starts: Vec<Value> = events(&s3)
        .into_iter()
        .filter(|e| e["kind"] == "run.started")
        .collect();
    assert_eq!(starts.len(), 2, "{starts:?}");
    assert_eq!(starts[1]["level"], "info", "{}", starts[1]);
    assert_eq!(starts[1]["fields"]["previous_stopped"], true);
    assert_eq!(starts[1]["fields"]["resumed_from"], STEPS / 2);
    // one member's device fails mid-step: the others stop waiting for it at once, the
    // trainer restarts as after a device error of its own, and the step is redone exactly
    let s4 = dir.path().join("s4");
    let o = run_to(&two, &s4, STEPS, &["--inject", "device_error:member:1@5"]);
    assert_eq!(o.status.code(), Some(0), "{}", text(&o));
    let ev = events(&s4);
    assert!(
        ev.iter().any(|e| e["kind"] == "actor.restarting"
            && e["actor"] == "trainer"
            && e["message"]
                .as_str()
                .unwrap_or("")
                .contains("injected device error in data-parallel member 1")),
        "{:?}",
        kinds(&ev)
    );
    assert_eq!(fingerprint(&s4), fingerprint(&s2));
    // one member stalls (a hung GPU) longer than the collective timeout: the others give
    // up waiting, the group is dropped and the step redone on a fresh one, exactly
    let stall_dir = dir.path().join("stall");
    std::fs::create_dir_all(&stall_dir).unwrap();
    let stall = write_config(
        &stall_dir,
        &format!("{base}\n[runtime]\ndata_parallel = 2\ncollective_timeout_s = 1.0\n"),
    );
    let s5 = dir.path().join("s5");
    let o = run_to(&stall, &s5, STEPS, &["--inject", "slow:member:1@5+3000"]);
    assert_eq!(o.status.code(), Some(0), "{}", text(&o));
    let ev = events(&s5);
    let restart = ev
        .iter()
        .find(|e| e["kind"] == "actor.restarting" && e["actor"] == "trainer")
        .unwrap_or_else(|| panic!("no trainer restart in {:?}", kinds(&ev)));
    let why = restart["message"].as_str().unwrap_or("");
    assert!(
        why.contains("collective timed out") && why.contains("waited 1.0 s"),
        "{why}"
    );
    assert_eq!(fingerprint(&s5), fingerprint(&s2));
}

/// A group that loses its device under `on_gpu_loss = "wait"` probes every member's
/// device, rebuilds the group when they answer and goes on from the last checkpoint: the
/// run is the uninterrupted group run.
#[test]
fn a_data_parallel_run_waits_for_its_devices_and_goes_on_exactly() {
    let dir = TempDir::new("dp-wait");
    let group = "\n[runtime]\ndata_parallel = 2\n";
    let plain = write_config(dir.path(), &format!("{}{group}", dp_base()));
    let wait_dir = dir.path().join("wait");
    std::fs::create_dir_all(&wait_dir).unwrap();
    let wait = write_config(
        &wait_dir,
        &format!(
            "{}{group}on_gpu_loss = \"wait\"\ngpu_probe_every_s = 0.1\n",
            dp_base()
        ),
    );
    let (s1, s2) = (dir.path().join("s1"), dir.path().join("s2"));
    let o = run_to(&plain, &s1, STEPS, &[]);
    assert_eq!(o.status.code(), Some(0), "{}", text(&o));
    let o = run_to(
        &wait,
        &s2,
        STEPS,
        &["--inject", "device_lost:trainer@5+500"],
    );
    assert_eq!(o.status.code(), Some(0), "{}", text(&o));
    let k = kinds(&events(&s2));
    for want in ["device.lost", "device.waiting", "device.restored"] {
        assert!(k.iter().any(|x| x == want), "no {want} in {k:?}");
    }
    assert_eq!(fingerprint(&s2), fingerprint(&s1));
}

/// Unreadable images in a real folder: the run goes on (each bad sample is replaced),
/// every bad file is named in an event and in the quarantine, and `status` counts them.
#[test]
fn corrupt_images_are_reported_and_skipped() {
    let dir = TempDir::new("bad-images");
    let (spec, bad) = image_folder_with_bad_files(dir.path(), 10);
    let cfg = write_config(dir.path(), &tiny_config(""));
    let st = dir.path().join("state");
    // 12 files, 4 per batch: 6 steps read every file at least once
    let o = run_to(&cfg, &st, 6, &["--data", &spec]);
    assert_eq!(o.status.code(), Some(0), "{}", text(&o));
    let ev = events(&st);
    for name in bad {
        assert!(
            ev.iter().any(|e| e["kind"] == "data.bad_input"
                && e["message"].as_str().unwrap_or("").contains(name)),
            "no data.bad_input event names {name}: {:?}",
            kinds(&ev)
        );
    }
    let s = status(&st);
    assert_eq!(s["run"]["step"], 6, "{s}");
    assert!(s["run"]["bad_inputs"].as_u64().unwrap() >= 2, "{s}");
}

/// The same images as tar shards (GNU tar, `--sort=name`, one shard per class) train
/// exactly as the folder does: same samples in the same order, the same bad files
/// replaced and reported (named inside their shard), the same weights. `data scan` names
/// the bad members and a damaged shard.
#[test]
fn a_run_on_tar_shards_is_the_run_on_the_folder_they_hold() {
    let dir = TempDir::new("tar-shards");
    let (folder, bad) = image_folder_with_bad_files(dir.path(), 10);
    let root = dir.path().join("imgs");
    let shards = dir.path().join("shards");
    std::fs::create_dir(&shards).unwrap();
    for (k, class) in ["cats", "dogs"].iter().enumerate() {
        let out = shards.join(format!("part-{k}.tar"));
        let o = std::process::Command::new("tar")
            .args(["--sort=name", "-cf", out.to_str().unwrap(), class])
            .current_dir(&root)
            .output()
            .expect("GNU tar runs");
        assert!(o.status.success(), "{}", text(&o));
    }
    let spec = format!("tar:{}/part-{{0..1}}.tar", shards.display());
    let cfg = write_config(dir.path(), &tiny_config(""));
    let (from_folder, from_tar) = (dir.path().join("folder"), dir.path().join("tar"));
    for (st, data) in [(&from_folder, &folder), (&from_tar, &spec)] {
        let o = run_to(&cfg, st, 6, &["--data", data]);
        assert_eq!(o.status.code(), Some(0), "{}", text(&o));
    }
    assert_eq!(fingerprint(&from_tar), fingerprint(&from_folder));
    let ev = events(&from_tar);
    // the open is recorded: what the source holds and how long opening took
    let opened = ev
        .iter()
        .find(|e| e["kind"] == "data.opened")
        .unwrap_or_else(|| panic!("no data.opened event: {:?}", kinds(&ev)));
    assert_eq!(opened["fields"]["source"], spec.as_str(), "{opened}");
    // while it opens, the daemon's status counts the shards indexed (the open is held at
    // its end by an injected slow start)
    let st = from_tar.to_str().unwrap();
    let mut child = spawn(&[
        "run",
        "--config",
        cfg.to_str().unwrap(),
        "--state-dir",
        st,
        "--data",
        &spec,
        "--inject",
        "slow:startup@0+60000",
    ]);
    let counted = |v: &Value| v["starting"]["progress"] == "2 of 2 shards indexed";
    assert!(
        wait_for(
            || live(&from_tar).is_some_and(|v| counted(&v)),
            Duration::from_secs(30)
        ),
        "{:?}",
        live(&from_tar)
    );
    let o = dinod(&["status", "--state-dir", st]);
    assert!(
        text(&o).contains(&format!("opening the data source {spec}"))
            && text(&o).contains("progress     2 of 2 shards indexed"),
        "{}",
        text(&o)
    );
    unsafe { libc::kill(child.id() as i32, libc::SIGTERM) };
    let code = wait_timeout(&mut child, Duration::from_secs(30)).expect("SIGTERM ignored");
    assert_eq!(code.code(), Some(0));
    assert_eq!(opened["fields"]["classes"], 2, "{opened}");
    assert!(opened["fields"]["seconds"].as_f64().is_some(), "{opened}");
    assert!(
        opened["message"]
            .as_str()
            .unwrap_or("")
            .contains("2 shard(s)"),
        "{opened}"
    );
    for (name, shard) in bad.iter().zip(["part-0.tar", "part-1.tar"]) {
        assert!(
            ev.iter().any(|e| e["kind"] == "data.bad_input"
                && e["message"].as_str().unwrap_or("").contains(&format!(
                    "{shard}/{}",
                    ["cats", "dogs"][usize::from(shard == "part-1.tar")]
                ))
                && e["message"].as_str().unwrap_or("").contains(name)),
            "no data.bad_input event names {shard}/.../{name}: {:?}",
            kinds(&ev)
        );
    }
    let o = dinod(&["data", "scan", &spec]);
    assert_eq!(o.status.code(), Some(1), "{}", text(&o));
    let out = String::from_utf8_lossy(&o.stdout);
    assert!(out.contains("10 readable"), "{out}");
    // with an index cache: a run writes one entry per shard, and a scan through them
    // reports what the walk does
    let cache = dir.path().join("cache");
    let with_cache = |args: &[&str]| {
        std::process::Command::new(bin())
            .args(args)
            .env("RUST_LOG", "warn")
            .env("DINOD_CACHE_DIR", &cache)
            .output()
            .unwrap()
    };
    let st = dir.path().join("tar-cached");
    let (c, s) = (cfg.to_str().unwrap(), st.to_str().unwrap());
    let o = with_cache(&[
        "run",
        "--config",
        c,
        "--state-dir",
        s,
        "--max-steps",
        "6",
        "--data",
        &spec,
    ]);
    assert_eq!(o.status.code(), Some(0), "{}", text(&o));
    assert_eq!(fingerprint(&st), fingerprint(&from_folder));
    assert_eq!(
        std::fs::read_dir(cache.join("tar-index")).unwrap().count(),
        2
    );
    let cached = with_cache(&["data", "scan", &spec]);
    assert_eq!(cached.stdout, dinod(&["data", "scan", &spec]).stdout);
    // a shard cut short: reported with where, the members before the cut still read
    let whole = std::fs::read(shards.join("part-1.tar")).unwrap();
    std::fs::write(shards.join("part-1.tar"), &whole[..whole.len() / 2]).unwrap();
    let o = dinod(&["data", "scan", &spec]);
    assert_eq!(o.status.code(), Some(1), "{}", text(&o));
    let out = String::from_utf8_lossy(&o.stdout);
    assert!(
        out.contains("part-1.tar") && out.contains("truncated"),
        "{out}"
    );
}

/// A run resumed on a folder that lost most of its files since the checkpoint: the epoch
/// ends at the saved position, the next begins, a `data.changed` warning says so, and the
/// run trains on. Before, the saved position lay past the new end, the loader hung, and
/// the watchdog ended the process (exit 76) at every restart.
#[test]
fn a_run_resumes_on_a_data_source_that_shrank() {
    let dir = TempDir::new("shrunk");
    let (spec, _) = image_folder_with_bad_files(dir.path(), 10);
    let cfg = write_config(dir.path(), &tiny_config(""));
    let st = dir.path().join("state");
    let o = run_to(&cfg, &st, 2, &["--data", &spec]);
    assert_eq!(o.status.code(), Some(0), "{}", text(&o));
    // 12 files, batches of 4: the cursor is at position 8; keep 3 files
    let root = dir.path().join("imgs");
    for class in ["cats", "dogs"] {
        for e in std::fs::read_dir(root.join(class)).unwrap() {
            let p = e.unwrap().path();
            let name = p.file_name().unwrap().to_string_lossy().into_owned();
            if !["img00.jpg", "img01.png", "img03.jpg"].contains(&name.as_str()) {
                std::fs::remove_file(p).unwrap();
            }
        }
    }
    let o = run_to(&cfg, &st, 4, &["--data", &spec]);
    assert_eq!(o.status.code(), Some(0), "{}", text(&o));
    assert_eq!(fingerprint(&st).0, 4);
    let ev = events(&st);
    let changed = ev
        .iter()
        .find(|e| e["kind"] == "data.changed")
        .unwrap_or_else(|| panic!("no data.changed event: {:?}", kinds(&ev)));
    let msg = changed["message"].as_str().unwrap_or("");
    assert!(
        msg.contains("the data source has 3 samples, 12 when position 8 of epoch 0 was saved"),
        "{msg}"
    );
    assert_eq!(changed["level"], "warn");
    assert!(
        !ev.iter().any(|e| e["kind"] == "actor.hung"),
        "{:?}",
        kinds(&ev)
    );
}

/// The Prometheus endpoint serves the run's metrics; a second daemon configured with the
/// same port (a second run on one machine) trains anyway, with a warning that says why
/// there is no endpoint and what to change; port 0 takes a free port and names it.
#[test]
fn the_metrics_endpoint_serves_the_run_and_a_taken_port_stops_nothing() {
    let dir = TempDir::new("metrics");
    let port = std::net::TcpListener::bind(("127.0.0.1", 0))
        .unwrap()
        .local_addr()
        .unwrap()
        .port();
    let cfg = write_config(
        dir.path(),
        &tiny_config(&format!("[runtime]\nmetrics_port = {port}\n")),
    );
    let first = dir.path().join("first");
    let sd = first.to_str().unwrap().to_string();
    let mut child = spawn(&["run", "--config", cfg.to_str().unwrap(), "--state-dir", &sd]);
    let mut body = String::new();
    let served = wait_for(
        || {
            body = scrape(port).unwrap_or_default();
            body.contains("dinod_step_seconds")
        },
        Duration::from_secs(60),
    );
    assert!(served, "no step metrics on port {port}:\n{body}");
    for name in [
        "dinod_step ",
        "dinod_loss",
        "dinod_lr",
        "dinod_images_per_second",
    ] {
        assert!(body.contains(name), "{name} missing:\n{body}");
    }

    // a second run with the same port, while the first holds it
    let second = dir.path().join("second");
    let o = run_to(&cfg, &second, 4, &[]);
    assert_eq!(o.status.code(), Some(0), "{}", text(&o));
    assert_eq!(fingerprint(&second).0, 4);
    let ev = events(&second);
    let warned = ev
        .iter()
        .find(|e| e["kind"] == "metrics.unavailable")
        .unwrap_or_else(|| panic!("no metrics.unavailable event: {:?}", kinds(&ev)));
    let msg = warned["message"].as_str().unwrap_or("");
    assert_eq!(warned["level"], "warn", "{warned}");
    assert!(
        msg.contains(&format!("127.0.0.1:{port}")) && msg.contains("runtime.metrics_port"),
        "{msg}"
    );
    // the first still serves
    assert!(scrape(port).unwrap().contains("dinod_step"));
    let o = dinod(&["status", "--state-dir", &sd]);
    let shown = String::from_utf8_lossy(&o.stdout);
    assert!(
        shown.contains(&format!("metrics      http://127.0.0.1:{port}/metrics")),
        "{shown}"
    );
    let o = dinod(&["stop", "--state-dir", &sd]);
    assert_eq!(o.status.code(), Some(0), "{}", text(&o));
    let status = wait_timeout(&mut child, Duration::from_secs(60));
    assert_eq!(status.and_then(|s| s.code()), Some(0));
    assert!(events(&first).iter().any(|e| e["kind"] == "metrics.started"
        && e["message"]
            .as_str()
            .unwrap_or("")
            .contains(&port.to_string())));

    // port 0: a free one, named
    let cfg0 = write_config(dir.path(), &tiny_config("[runtime]\nmetrics_port = 0\n"));
    let third = dir.path().join("third");
    let o = run_to(&cfg0, &third, 1, &[]);
    assert_eq!(o.status.code(), Some(0), "{}", text(&o));
    let ev = events(&third);
    let started = ev
        .iter()
        .find(|e| e["kind"] == "metrics.started")
        .unwrap_or_else(|| panic!("no metrics.started event: {:?}", kinds(&ev)));
    let p = started["fields"]["port"].as_u64().unwrap_or(0);
    assert!(p > 0, "{started}");
}

#[test]
fn a_hung_actor_is_detected_and_restarted() {
    let dir = TempDir::new("hang");
    let cfg = write_config(
        dir.path(),
        &tiny_config("[runtime.heartbeat]\nstep_s = 1.0\ncheck_every_ms = 100\n"),
    );
    let st = dir.path().join("state");
    let o = run_to(&cfg, &st, STEPS, &["--inject", "slow:teacher@5+4000"]);
    assert_eq!(o.status.code(), Some(0), "{}", text(&o));
    let ev = events(&st);
    assert!(
        ev.iter()
            .any(|e| e["kind"] == "actor.hung" && e["actor"] == "teacher"),
        "{:?}",
        kinds(&ev)
    );
    assert_eq!(&fingerprint(&st), reference());
}

fn wait_for(mut f: impl FnMut() -> bool, limit: Duration) -> bool {
    let t0 = Instant::now();
    while t0.elapsed() < limit {
        if f() {
            return true;
        }
        std::thread::sleep(Duration::from_millis(50));
    }
    false
}

#[test]
fn the_cli_inspects_and_controls_a_running_daemon() {
    let dir = TempDir::new("live");
    let cfg = write_config(dir.path(), &tiny_config(""));
    let st = dir.path().join("state");
    let sd = st.to_str().unwrap().to_string();
    let mut child = spawn(&["run", "--config", cfg.to_str().unwrap(), "--state-dir", &sd]);
    let sock = st.join("control.sock");
    assert!(
        wait_for(|| sock.exists(), Duration::from_secs(30)),
        "no control socket"
    );
    use std::os::unix::fs::PermissionsExt;
    assert_eq!(
        std::fs::metadata(&sock).unwrap().permissions().mode() & 0o777,
        0o600
    );
    let live_step = || -> u64 {
        let o = dinod(&["status", "--json", "--state-dir", &sd]);
        let v: Value = serde_json::from_slice(&o.stdout).unwrap_or(Value::Null);
        assert_eq!(v["daemon"], true, "{}", text(&o));
        v["run"]["step"].as_u64().unwrap_or(0)
    };
    assert!(wait_for(|| live_step() >= 3, Duration::from_secs(30)));
    let o = dinod(&["actors", "--json", "--state-dir", &sd]);
    let actors: Value = serde_json::from_slice(&o.stdout).unwrap();
    let names: Vec<&str> = actors
        .as_array()
        .unwrap()
        .iter()
        .map(|a| a["name"].as_str().unwrap())
        .collect();
    for n in [
        "data_loader",
        "teacher",
        "trainer",
        "ema",
        "evaluator",
        "checkpointer",
        "control",
        "coordinator",
    ] {
        assert!(names.contains(&n), "{n} missing from {names:?}");
    }
    // pause: the step stops moving
    assert_eq!(dinod(&["pause", "--state-dir", &sd]).status.code(), Some(0));
    std::thread::sleep(Duration::from_millis(500));
    let a = live_step();
    std::thread::sleep(Duration::from_millis(500));
    assert_eq!(live_step(), a, "paused daemon kept stepping");
    assert_eq!(
        dinod(&["resume", "--state-dir", &sd]).status.code(),
        Some(0)
    );
    assert!(
        wait_for(|| live_step() > a, Duration::from_secs(30)),
        "resumed daemon does not step"
    );
    let o = dinod(&["events", "--json", "--state-dir", &sd]);
    assert!(
        String::from_utf8_lossy(&o.stdout).contains("run.paused"),
        "{}",
        text(&o)
    );
    // stop: drain, final checkpoint, exit 0; `--wait` returns once the daemon has exited,
    // with how it stopped
    let o = dinod(&["stop", "--wait", "--state-dir", &sd]);
    assert_eq!(o.status.code(), Some(0), "{}", text(&o));
    assert!(
        child.try_wait().unwrap().is_some(),
        "`stop --wait` returned before the daemon exited"
    );
    let out = String::from_utf8_lossy(&o.stdout).to_string();
    assert!(
        out.contains("stopped at step") && out.contains("stop requested by `dinod stop`"),
        "{out}"
    );
    let code = wait_timeout(&mut child, Duration::from_secs(60)).expect("daemon did not stop");
    assert_eq!(code.code(), Some(0));
    let s = status(&st);
    assert_eq!(s["daemon"], false);
    let step = s["run"]["step"].as_u64().unwrap();
    let v = checkpoint_rows(Path::new(&sd));
    assert!(
        v.iter().any(|c| c["step"] == step),
        "no final checkpoint at step {step}: {v:?}"
    );
}

#[test]
fn sigterm_drains_and_checkpoints() {
    let dir = TempDir::new("sigterm");
    let cfg = write_config(dir.path(), &tiny_config(""));
    let st = dir.path().join("state");
    let mut child = spawn(&[
        "run",
        "--config",
        cfg.to_str().unwrap(),
        "--state-dir",
        st.to_str().unwrap(),
    ]);
    // trained a step (a signal during the start ends the process before training: the
    // test below)
    assert!(wait_for(
        || live(&st)
            .is_some_and(|v| v["starting"].is_null() && v["run"]["step"].as_u64() >= Some(1)),
        Duration::from_secs(60)
    ));
    unsafe { libc::kill(child.id() as i32, libc::SIGTERM) };
    let code = wait_timeout(&mut child, Duration::from_secs(60)).expect("daemon ignored SIGTERM");
    assert_eq!(code.code(), Some(0));
    let s = status(&st);
    let step = s["run"]["step"].as_u64().unwrap();
    assert!(step > 0);
    assert!(checkpoint_rows(&st).iter().any(|c| c["step"] == step));
}

/// The live status document, `None` while no daemon answers.
fn live(st: &Path) -> Option<Value> {
    let o = dinod(&["status", "--json", "--state-dir", st.to_str().unwrap()]);
    let v: Value = serde_json::from_slice(&o.stdout).ok()?;
    (v["daemon"] == true).then_some(v)
}

/// Before its actor tree runs (here held in the data source's open by an injected slow
/// fault, as a first walk of large tar shards holds it), the daemon says what it is doing,
/// serves the catalog, and a SIGTERM or `dinod stop` ends it at once with a clean
/// `run.stopped`: the next start does not report a killed process.
#[test]
fn a_daemon_that_is_starting_answers_and_stops_at_once() {
    let dir = TempDir::new("starting");
    let cfg = write_config(dir.path(), &tiny_config(""));
    let st = dir.path().join("state");
    let sd = st.to_str().unwrap().to_string();
    let start = || {
        spawn(&[
            "run",
            "--config",
            cfg.to_str().unwrap(),
            "--state-dir",
            &sd,
            "--inject",
            "slow:startup@0+60000",
        ])
    };
    let opening = |v: &Value| {
        v["starting"]["phase"]
            .as_str()
            .is_some_and(|p| p.starts_with("opening the data source synthetic:0:32"))
    };
    // 1: a new run, stopped by SIGTERM while it opens its data
    let mut child = start();
    assert!(
        wait_for(
            || live(&st).is_some_and(|v| opening(&v)),
            Duration::from_secs(30)
        ),
        "the starting daemon does not say what it does"
    );
    let v = live(&st).unwrap();
    assert_eq!(v["run"]["pid"], child.id());
    assert_eq!(v["run"]["resumes_from"], Value::Null);
    use std::os::unix::fs::PermissionsExt;
    assert_eq!(
        std::fs::metadata(st.join("control.sock"))
            .unwrap()
            .permissions()
            .mode()
            & 0o777,
        0o600
    );
    let o = dinod(&["status", "--state-dir", &sd]);
    let out = String::from_utf8_lossy(&o.stdout).to_string();
    assert!(
        out.contains(&format!("starting (pid {})", child.id()))
            && out.contains("opening the data source synthetic:0:32")
            && out.contains("a new run"),
        "{}",
        text(&o)
    );
    // the catalog is served while starting; requests for the training say it is starting
    assert!(kinds(&events(&st)).contains(&"run.started".to_string()));
    let o = dinod(&["checkpoints", "--json", "--state-dir", &sd]);
    assert_eq!(o.status.code(), Some(0), "{}", text(&o));
    let o = dinod(&["pause", "--state-dir", &sd]);
    assert_ne!(o.status.code(), Some(0));
    assert!(text(&o).contains("the daemon is starting"), "{}", text(&o));
    // a second daemon on the same state directory is refused (after waiting a few seconds
    // for what could be a CLI's short read) and changes nothing
    let o = dinod(&["run", "--config", cfg.to_str().unwrap(), "--state-dir", &sd]);
    assert_eq!(o.status.code(), Some(1), "{}", text(&o));
    assert!(
        text(&o).contains(&format!("in use by pid {}", child.id())),
        "{}",
        text(&o)
    );
    assert!(live(&st).is_some_and(|v| opening(&v)));
    let t = Instant::now();
    unsafe { libc::kill(child.id() as i32, libc::SIGTERM) };
    let code =
        wait_timeout(&mut child, Duration::from_secs(30)).expect("SIGTERM ignored while starting");
    assert_eq!(code.code(), Some(0));
    // at once, not after the 60 s the start is held
    assert!(t.elapsed() < Duration::from_secs(20), "{:?}", t.elapsed());
    assert!(!st.join("control.sock").exists());
    let ev = events(&st);
    let last = ev.last().unwrap();
    assert_eq!(last["kind"], "run.stopped", "{:?}", kinds(&ev));
    assert_eq!(last["fields"]["exit_code"], 0);
    assert!(
        last["message"].as_str().unwrap().contains("SIGTERM"),
        "{last}"
    );
    // 2: one that trains a few steps and stops
    let o = run_to(&cfg, &st, 3, &[]);
    assert_eq!(o.status.code(), Some(0), "{}", text(&o));
    let ev = events(&st);
    let starts: Vec<&Value> = ev.iter().filter(|e| e["kind"] == "run.started").collect();
    assert_eq!(starts.len(), 2);
    assert_eq!(starts[1]["level"], "info", "{}", starts[1]);
    assert_eq!(starts[1]["fields"]["previous_stopped"], true);
    // 3: a resume, stopped by `dinod stop` while it opens its data
    let mut child = start();
    assert!(
        wait_for(
            || live(&st).is_some_and(|v| opening(&v)),
            Duration::from_secs(30)
        ),
        "{:?} {}",
        live(&st),
        {
            let _ = child.kill();
            text(&child.wait_with_output().unwrap())
        }
    );
    assert_eq!(live(&st).unwrap()["run"]["resumes_from"], 3);
    let o = dinod(&["status", "--state-dir", &sd]);
    assert!(
        text(&o).contains("resumes from the checkpoint at step 3"),
        "{}",
        text(&o)
    );
    let o = dinod(&["stop", "--wait", "--state-dir", &sd]);
    assert_eq!(o.status.code(), Some(0), "{}", text(&o));
    assert!(
        text(&o).contains("without training")
            && text(&o).contains("stopped by `dinod stop` while opening the data source"),
        "{}",
        text(&o)
    );
    let code = wait_timeout(&mut child, Duration::from_secs(20))
        .expect("`dinod stop` ignored while starting");
    assert_eq!(code.code(), Some(0));
    let ev = events(&st);
    let last = ev.last().unwrap();
    assert_eq!(last["kind"], "run.stopped");
    assert_eq!(last["step"], 3);
    assert!(
        last["message"].as_str().unwrap().contains("`dinod stop`"),
        "{last}"
    );
    assert_eq!(fingerprint(&st).0, 3);
}

/// From the moment the coordinator stops stepping until the process ends, `dinod status`
/// says the run is stopping and why (here the final checkpoint is held by an injected slow
/// save, as a large model's is by its size); the catalog's status afterwards does not.
#[test]
fn status_says_a_run_is_stopping_while_its_final_checkpoint_is_written() {
    let dir = TempDir::new("stopping");
    let cfg = write_config(dir.path(), &tiny_config(""));
    let st = dir.path().join("state");
    let sd = st.to_str().unwrap().to_string();
    let mut child = spawn(&[
        "run",
        "--config",
        cfg.to_str().unwrap(),
        "--state-dir",
        &sd,
        "--max-steps",
        "4",
        "--inject",
        "slow:checkpointer@4+4000",
    ]);
    assert!(
        wait_for(
            || live(&st).is_some_and(|v| v["run"]["stopping"].is_string()),
            Duration::from_secs(60)
        ),
        "the stopping daemon does not say so"
    );
    let v = live(&st).unwrap();
    assert_eq!(v["run"]["stopping"], "reached the target step", "{v}");
    let o = dinod(&["status", "--state-dir", &sd]);
    assert!(
        text(&o).contains("STOPPING (reached the target step)"),
        "{}",
        text(&o)
    );
    let code = wait_timeout(&mut child, Duration::from_secs(60)).expect("did not stop");
    assert_eq!(code.code(), Some(0));
    let s = status(&st);
    assert_eq!(s["daemon"], false);
    assert_eq!(s["run"]["stopping"], Value::Null, "{s}");
    assert_eq!(s["run"]["step"], 4);
    // a stop request shows at once, while the step in flight (held 3 s) finishes
    let mut child = spawn(&[
        "run",
        "--config",
        cfg.to_str().unwrap(),
        "--state-dir",
        &sd,
        "--inject",
        "slow:trainer@6+3000",
    ]);
    assert!(wait_for(
        || live(&st).is_some_and(|v| v["run"]["step"] == 6),
        Duration::from_secs(60)
    ));
    let o = dinod(&["stop", "--state-dir", &sd]);
    assert_eq!(o.status.code(), Some(0), "{}", text(&o));
    let v = live(&st).expect("the daemon is gone before its step ended");
    assert_eq!(
        v["run"]["stopping"], "stop requested by `dinod stop`",
        "{v}"
    );
    assert_eq!(v["run"]["step"], 6, "{v}");
    let code = wait_timeout(&mut child, Duration::from_secs(60)).expect("did not stop");
    assert_eq!(code.code(), Some(0));
    assert_eq!(status(&st)["run"]["step"], 7);
    let ev = events(&st);
    let last = ev.last().unwrap();
    assert_eq!(last["kind"], "run.stopped");
    assert_eq!(
        last["message"], "stopped at step 7: stop requested by `dinod stop`",
        "{last}"
    );
}

/// `dinod run` under a service manager that asks for notifications: a datagram socket
/// of its own (`NOTIFY_SOCKET`) and a watchdog of 400 ms (`WATCHDOG_USEC`, and
/// `WATCHDOG_PID` when given). Every message the daemon sent, with when it came; the run
/// must end with status 0.
fn under_service_manager(
    sock_path: &Path,
    cfg: &Path,
    st: &Path,
    steps: &str,
    inject: &str,
    watchdog_pid: Option<&str>,
) -> Vec<(Instant, String)> {
    use std::os::unix::net::UnixDatagram;
    let _ = std::fs::remove_file(sock_path);
    let sock = UnixDatagram::bind(sock_path).unwrap();
    sock.set_read_timeout(Some(Duration::from_millis(200)))
        .unwrap();
    let mut c = std::process::Command::new(bin());
    c.args([
        "run",
        "--config",
        cfg.to_str().unwrap(),
        "--state-dir",
        st.to_str().unwrap(),
        "--max-steps",
        steps,
        "--inject",
        inject,
    ])
    .env("RUST_BACKTRACE", "0")
    .env("DINOD_CACHE_DIR", "off")
    .env("NOTIFY_SOCKET", sock_path)
    .env("WATCHDOG_USEC", "400000")
    .stdout(std::process::Stdio::null())
    .stderr(std::process::Stdio::null());
    if let Some(p) = watchdog_pid {
        c.env("WATCHDOG_PID", p);
    }
    let mut child = c.spawn().unwrap();
    let mut got: Vec<(Instant, String)> = vec![];
    let mut buf = vec![0u8; 4096];
    let end = loop {
        match sock.recv(&mut buf) {
            Ok(n) => got.push((Instant::now(), String::from_utf8_lossy(&buf[..n]).into())),
            Err(_) => {
                if let Some(code) = child.try_wait().unwrap() {
                    break code;
                }
            }
        }
    };
    while let Ok(n) = sock.recv(&mut buf) {
        got.push((Instant::now(), String::from_utf8_lossy(&buf[..n]).into()));
    }
    assert_eq!(end.code(), Some(0));
    got
}

/// Under a service manager that asks for notifications (`NOTIFY_SOCKET`, systemd's
/// `Type=notify`), the daemon says what it does while it starts, `READY=1` once it trains,
/// `STOPPING=1` when it stops, and pings the watchdog at half of `WATCHDOG_USEC` while it
/// runs; a watchdog meant for another pid is not pinged.
#[test]
fn a_service_manager_hears_start_ready_watchdog_and_stop() {
    let dir = TempDir::new("notify");
    let cfg = write_config(dir.path(), &tiny_config(""));
    let st = dir.path().join("state");
    let sock_path = dir.path().join("notify.sock");
    let run = |steps: &str, watchdog_pid: Option<&str>| {
        under_service_manager(
            &sock_path,
            &cfg,
            &st,
            steps,
            "slow:startup@0+1000",
            watchdog_pid,
        )
    };
    let got = run("40", None);
    let msgs: Vec<&str> = got.iter().map(|(_, m)| m.as_str()).collect();
    let first = |pred: &dyn Fn(&str) -> bool| {
        msgs.iter()
            .position(|m| pred(m))
            .unwrap_or_else(|| panic!("{msgs:?}"))
    };
    let starting = first(&|m| m == "STATUS=starting: opening the data source synthetic:0:32");
    let ready = first(&|m| m.starts_with("READY=1\nSTATUS=training"));
    let stopping =
        first(&|m| m.starts_with("STOPPING=1\nSTATUS=stopping (reached the target step)"));
    assert!(starting < ready && ready < stopping, "{msgs:?}");
    // pings through the start (held 1 s) and the training, at about 200 ms
    let pings: Vec<Instant> = got
        .iter()
        .filter(|(_, m)| m == "WATCHDOG=1")
        .map(|(t, _)| *t)
        .collect();
    assert!(
        msgs[..ready].iter().filter(|m| **m == "WATCHDOG=1").count() >= 3,
        "{msgs:?}"
    );
    for w in pings.windows(2) {
        let gap = w[1] - w[0];
        assert!(
            gap >= Duration::from_millis(150) && gap < Duration::from_millis(2000),
            "{gap:?} {msgs:?}"
        );
    }
    // a watchdog meant for another process is not ours to ping
    let got = run("42", Some("1"));
    assert!(
        got.iter().all(|(_, m)| m != "WATCHDOG=1"),
        "{:?}",
        got.iter().map(|(_, m)| m).collect::<Vec<_>>()
    );
    assert!(got.iter().any(|(_, m)| m.starts_with("READY=1")));
}

/// A start that stops moving on (its phase and progress unchanged for
/// `runtime.heartbeat.start_s`) stops pinging the service manager's watchdog, so that
/// systemd restarts a daemon stuck in a hung read, and says so (status line, event);
/// once it moves on and trains, the pings resume.
#[test]
fn a_stalled_start_starves_the_service_managers_watchdog() {
    let dir = TempDir::new("notify-stall");
    let cfg = write_config(
        dir.path(),
        &tiny_config("[runtime.heartbeat]\nstart_s = 1.0\n"),
    );
    let st = dir.path().join("state");
    // the start is held 4 s after opening the data source, showing nothing new
    let got = under_service_manager(
        &dir.path().join("notify.sock"),
        &cfg,
        &st,
        "20",
        "slow:startup@0+4000",
        None,
    );
    let msgs: Vec<&str> = got.iter().map(|(_, m)| m.as_str()).collect();
    let at = |pred: &dyn Fn(&str) -> bool| {
        got.iter()
            .position(|(_, m)| pred(m))
            .unwrap_or_else(|| panic!("{msgs:?}"))
    };
    let stalled = at(&|m| m == "STATUS=starting: stalled: opening the data source synthetic:0:32");
    let ready = at(&|m| m.starts_with("READY=1"));
    assert!(stalled < ready, "{msgs:?}");
    let pings: Vec<Instant> = got
        .iter()
        .filter(|(_, m)| m == "WATCHDOG=1")
        .map(|(t, _)| *t)
        .collect();
    // pinged until the stall (about 1 s), then nothing for the rest of the hold (about
    // 3 s), then pinged again while training
    let gap = pings
        .windows(2)
        .map(|w| w[1] - w[0])
        .max()
        .unwrap_or_default();
    assert!(gap >= Duration::from_millis(2000), "{gap:?} {msgs:?}");
    assert!(
        pings.iter().any(|t| *t < got[stalled].0) && pings.iter().any(|t| *t > got[ready].0),
        "{msgs:?}"
    );
    let ev = events(&st);
    assert!(
        ev.iter().any(|e| e["kind"] == "run.start_stalled"
            && e["message"]
                .as_str()
                .unwrap_or("")
                .contains("the start has not moved on for")),
        "{ev:?}"
    );
}

/// A command that finds the state directory held but no socket (a daemon binding it or
/// about to exit, another command reading the catalog) waits for the one or the other
/// instead of failing on the locked catalog.
#[test]
fn a_command_waits_out_a_held_state_directory_instead_of_failing() {
    use std::os::fd::AsRawFd;
    let dir = TempDir::new("held");
    let cfg = write_config(dir.path(), &tiny_config(""));
    let st = dir.path().join("state");
    let o = run_to(&cfg, &st, 3, &[]);
    assert_eq!(o.status.code(), Some(0), "{}", text(&o));
    let lock = std::fs::File::open(st.join("LOCK")).unwrap();
    assert_eq!(
        unsafe { libc::flock(lock.as_raw_fd(), libc::LOCK_EX | libc::LOCK_NB) },
        0
    );
    let mut child = spawn(&["status", "--json", "--state-dir", st.to_str().unwrap()]);
    std::thread::sleep(Duration::from_millis(1000));
    assert!(
        child.try_wait().unwrap().is_none(),
        "status did not wait for the held directory"
    );
    drop(lock);
    let o = child.wait_with_output().unwrap();
    assert_eq!(o.status.code(), Some(0), "{}", text(&o));
    let v: Value = serde_json::from_slice(&o.stdout).unwrap();
    assert_eq!(v["daemon"], false);
    assert_eq!(v["run"]["step"], 3);
    // held for longer than the wait: the command fails, saying who holds the directory
    let lock = std::fs::File::open(st.join("LOCK")).unwrap();
    assert_eq!(
        unsafe { libc::flock(lock.as_raw_fd(), libc::LOCK_EX | libc::LOCK_NB) },
        0
    );
    let o = dinod(&["status", "--state-dir", st.to_str().unwrap()]);
    assert_eq!(o.status.code(), Some(1), "{}", text(&o));
    assert!(
        text(&o).contains("holds it") && text(&o).contains("try again"),
        "{}",
        text(&o)
    );
    drop(lock);
}

/// `dinod events --follow` goes on across the daemon's restarts, as `journalctl -f`
/// does: started before any run, it prints both runs' events, each once and in order,
/// the last ones of each run (written as it stops) included.
#[test]
fn following_events_spans_the_daemons_restarts() {
    let dir = TempDir::new("follow");
    let cfg = write_config(dir.path(), &tiny_config(""));
    let st = dir.path().join("state");
    let sd = st.to_str().unwrap().to_string();
    let mut follower = spawn(&["events", "--follow", "--json", "--state-dir", &sd]);
    // each run is held a moment at a step, so that the follower streams from its socket
    for (steps, hold) in [(3, "slow:trainer@1+1500"), (5, "slow:trainer@4+1500")] {
        let o = run_to(&cfg, &st, steps, &["--inject", hold]);
        assert_eq!(o.status.code(), Some(0), "{}", text(&o));
    }
    let all = events(&st);
    // the follower has printed everything the catalog holds (it reads it once no daemon
    // holds the directory, every 2 s at most)
    std::thread::sleep(Duration::from_millis(3000));
    let _ = follower.kill();
    let o = follower.wait_with_output().unwrap();
    let seen: Vec<Value> = String::from_utf8_lossy(&o.stdout)
        .lines()
        .filter_map(|l| serde_json::from_str(l).ok())
        .collect();
    let seqs = |v: &[Value]| {
        v.iter()
            .map(|e| e["seq"].as_u64().unwrap())
            .collect::<Vec<_>>()
    };
    assert_eq!(seqs(&seen), seqs(&all), "{}", text(&o));
    let k = kinds(&seen);
    assert_eq!(k.iter().filter(|k| *k == "run.started").count(), 2, "{k:?}");
    assert_eq!(k.iter().filter(|k| *k == "run.stopped").count(), 2, "{k:?}");
    assert!(
        String::from_utf8_lossy(&o.stderr).contains("waiting for one"),
        "{}",
        text(&o)
    );
}

/// `dinod bench chaos` drives the real daemon through SIGKILLs and in-process faults and
/// reports the step efficiency against a fault-free run of the same length; the chaos
/// run's checkpoints verify at the end, and a used work directory is refused.
#[test]
fn the_chaos_benchmark_kills_and_faults_the_daemon_and_reports_the_cost() {
    let dir = TempDir::new("chaos");
    let cfg = write_config(dir.path(), &tiny_config(""));
    let work = dir.path().join("work");
    let args = |work: &Path| {
        vec![
            "bench".to_string(),
            "chaos".into(),
            "--config".into(),
            cfg.to_str().unwrap().into(),
            "--seconds".into(),
            "4".into(),
            "--kill-every".into(),
            "1.5".into(),
            "--faults-per-kill".into(),
            "1".into(),
            "--workdir".into(),
            work.to_str().unwrap().into(),
            "--json".into(),
        ]
    };
    let a = args(&work);
    let o = dinod(&a.iter().map(String::as_str).collect::<Vec<_>>());
    assert_eq!(o.status.code(), Some(0), "{}", text(&o));
    let v: Value = serde_json::from_slice(&o.stdout).unwrap();
    assert!(v["baseline_steps"].as_u64().unwrap() > 0, "{v}");
    assert!(v["chaos_steps"].as_u64().unwrap() > 0, "{v}");
    let kills = v["kills"].as_array().unwrap();
    assert!(!kills.is_empty(), "{v}");
    for k in kills {
        assert!(
            k["resumed_at"].as_u64().unwrap() <= k["step_before"].as_u64().unwrap(),
            "{k}"
        );
        assert!(k["recovery_s"].as_f64().unwrap() > 0.0, "{k}");
    }
    assert!(!v["armed"].as_array().unwrap().is_empty(), "{v}");
    assert!(v["fired"].as_u64().unwrap() >= 1, "{v}");
    let eff = v["step_efficiency"].as_f64().unwrap();
    assert!(eff > 0.0 && eff < 1.5, "{v}");
    assert_eq!(v["checkpoints_verified"], true, "{v}");
    // the chaos run's log says what happened to it: each start after a kill is a warning
    // naming the checkpoint it resumed from
    let o = dinod(&[
        "events",
        "--json",
        "--since",
        "0",
        "--limit",
        "100000",
        "--state-dir",
        work.join("chaos").to_str().unwrap(),
    ]);
    let starts: Vec<Value> = String::from_utf8_lossy(&o.stdout)
        .lines()
        .filter_map(|l| serde_json::from_str::<Value>(l).ok())
        .filter(|e| e["kind"] == "run.started")
        .collect();
    assert_eq!(starts.len(), kills.len() + 1, "{starts:?}");
    assert_eq!(starts[0]["fields"]["previous_stopped"], Value::Null);
    for (s, k) in starts[1..].iter().zip(kills) {
        assert_eq!(s["level"], "warn", "{s}");
        assert_eq!(s["fields"]["previous_stopped"], false, "{s}");
        assert_eq!(s["fields"]["resumed_from"], k["resumed_at"], "{s} {k}");
        let m = s["message"].as_str().unwrap();
        assert!(m.contains("the previous process did not stop"), "{m}");
    }
    // the runs must start fresh
    let o = dinod(&a.iter().map(String::as_str).collect::<Vec<_>>());
    assert_ne!(o.status.code(), Some(0));
    assert!(text(&o).contains("give an empty --workdir"), "{}", text(&o));
}

/// `checkpoint.every_seconds` saves at the first step boundary once that much time has
/// passed since the last save, whatever `every_steps` says: a slow step (injected) is
/// followed by a save, and without the key there is none before the final one.
#[test]
fn a_time_based_checkpoint_follows_a_slow_step() {
    let dir = TempDir::new("ckpt-seconds");
    let steps = |cfg: &str, name: &str| -> Vec<u64> {
        let sub = dir.path().join(name);
        std::fs::create_dir_all(&sub).unwrap();
        let cfg = write_config(&sub, cfg);
        let st = sub.join("state");
        let o = run_to(&cfg, &st, 10, &["--inject", "slow:trainer@5+1500"]);
        assert_eq!(o.status.code(), Some(0), "{}", text(&o));
        checkpoint_rows(&st)
            .iter()
            .map(|r| r["step"].as_u64().unwrap())
            .collect()
    };
    let base = tiny_config("");
    assert!(base.contains("every_steps = 3\n"));
    let rare = base.replace("every_steps = 3\n", "every_steps = 1000\n");
    assert_eq!(steps(&rare, "steps"), [10], "only the final save");
    let timed = base.replace(
        "every_steps = 3\n",
        "every_steps = 1000\nevery_seconds = 1.0\n",
    );
    let got = steps(&timed, "seconds");
    assert!(
        got.contains(&10) && got.iter().any(|&s| (5..10).contains(&s)),
        "a save after the slow step 5, then the final one: {got:?}"
    );
}

/// `[model] init`: a new run starts from exported weights (student and teacher equal to
/// them; the heads drawn from the seed unless the file has them) and says so; its resume
/// continues from its checkpoint, with the file gone; weights of another architecture are
/// refused, naming the parameter that does not fit.
#[test]
fn a_new_run_starts_from_exported_weights_and_resumes_without_them() {
    let dir = TempDir::new("init");
    let cfg = write_config(dir.path(), &tiny_config(""));
    let src = dir.path().join("src");
    let o = run_to(&cfg, &src, 4, &[]);
    assert_eq!(o.status.code(), Some(0), "{}", text(&o));
    let bare = dir.path().join("bare.safetensors");
    let with_heads = dir.path().join("heads.safetensors");
    let w = export_which(&src, "teacher", false, &bare);
    let wh = export_which(&src, "teacher", true, &with_heads);
    let init_config = |spec: String, name: &str, recipe: String| {
        let d = dir.path().join(name);
        std::fs::create_dir_all(&d).unwrap();
        let text = recipe.replace("[model]\n", &format!("[model]\ninit = \"{spec}\"\n"));
        assert!(text.contains("init = "));
        (write_config(&d, &text), d.join("state"))
    };
    let heads = |m: &std::collections::BTreeMap<String, Vec<f64>>| {
        m.iter()
            .filter(|(k, _)| k.starts_with("dino_head.") || k.starts_with("ibot_head."))
            .map(|(k, v)| (k.clone(), v.clone()))
            .collect::<Vec<_>>()
    };

    // the backbone from the file, the heads drawn as a run without init draws them
    let (c1, st) = init_config(
        format!("safetensors:{}", bare.display()),
        "backbone",
        tiny_config(""),
    );
    let o = run_to(&c1, &st, 0, &[]);
    assert_eq!(o.status.code(), Some(0), "{}", text(&o));
    for which in ["student", "teacher"] {
        let out = dir.path().join(format!("b-{which}.safetensors"));
        assert_eq!(export_which(&st, which, false, &out), w, "{which}");
    }
    let plain = dir.path().join("plain");
    assert_eq!(run_to(&cfg, &plain, 0, &[]).status.code(), Some(0));
    let drawn = heads(&export_which(
        &plain,
        "student",
        true,
        &dir.path().join("p.safetensors"),
    ));
    let ours = heads(&export_which(
        &st,
        "student",
        true,
        &dir.path().join("b.safetensors"),
    ));
    assert!(!drawn.is_empty());
    assert_eq!(ours, drawn);
    assert_ne!(heads(&wh), drawn);
    let ev = events(&st);
    let init: Vec<&Value> = ev
        .iter()
        .filter(|e| e["kind"] == "run.initialised")
        .collect();
    assert_eq!(init.len(), 1, "{:?}", kinds(&ev));
    let msg = init[0]["message"].as_str().unwrap();
    let hash = blake3::hash(&std::fs::read(&bare).unwrap())
        .to_hex()
        .to_string();
    assert!(
        msg.contains(&format!(
            "initialised from safetensors:{} (blake3 {hash})",
            bare.display()
        )) && msg.contains("dino_head drawn from the seed"),
        "{msg}"
    );

    // a resume continues from the checkpoint: the file is not read again
    std::fs::remove_file(&bare).unwrap();
    let o = run_to(&c1, &st, 3, &[]);
    assert_eq!(o.status.code(), Some(0), "{}", text(&o));
    assert_eq!(fingerprint(&st).0, 3);
    // where it started, kept in its checkpoints (the events are trimmed in a long run)
    let init = &status(&st)["run"]["init"];
    assert_eq!(
        init["spec"],
        format!("safetensors:{}", bare.display()),
        "{init}"
    );
    assert_eq!(init["source"], format!("blake3 {hash}"));
    let o = dinod(&["status", "--state-dir", st.to_str().unwrap()]);
    assert!(
        String::from_utf8_lossy(&o.stdout).contains("started from safetensors:"),
        "{}",
        text(&o)
    );
    let n = kinds(&events(&st))
        .iter()
        .filter(|k| *k == "run.initialised")
        .count();
    assert_eq!(n, 1);

    // a file with the heads: the whole model
    let (c2, st) = init_config(
        format!("safetensors:{}", with_heads.display()),
        "heads",
        tiny_config(""),
    );
    let o = run_to(&c2, &st, 0, &[]);
    assert_eq!(o.status.code(), Some(0), "{}", text(&o));
    let out = dir.path().join("h.safetensors");
    assert_eq!(export_which(&st, "student", true, &out), wh);

    // the same weights exported in bf16 (as large models are shipped): rounded to nearest
    // even on export, widened on load
    let half = dir.path().join("bf16.safetensors");
    let bf16 = |x: f32| -> u16 {
        let b = x.to_bits();
        ((b + 0x7fff + ((b >> 16) & 1)) >> 16) as u16
    };
    let rounded = |v: &Vec<f64>| -> Vec<f64> {
        v.iter()
            .map(|&x| f64::from(f32::from_bits(u32::from(bf16(x as f32)) << 16)))
            .collect()
    };
    let o = dinod(&[
        "export",
        "--state-dir",
        src.to_str().unwrap(),
        "--with-heads",
        "--dtype",
        "bf16",
        "--out",
        half.to_str().unwrap(),
    ]);
    assert_eq!(o.status.code(), Some(0), "{}", text(&o));
    let bytes = std::fs::read(&half).unwrap();
    let file = safetensors::SafeTensors::deserialize(&bytes).unwrap();
    assert_eq!(file.len(), wh.len());
    for (k, t) in file.tensors() {
        assert_eq!(t.dtype(), safetensors::Dtype::BF16, "{k}");
        let got: Vec<f64> = t
            .data()
            .chunks_exact(2)
            .map(|c| {
                f64::from(f32::from_bits(
                    u32::from(u16::from_le_bytes([c[0], c[1]])) << 16,
                ))
            })
            .collect();
        assert_eq!(got, rounded(&wh[&k]), "{k}");
    }
    let (c5, st) = init_config(
        format!("safetensors:{}", half.display()),
        "bf16",
        tiny_config(""),
    );
    let o = run_to(&c5, &st, 0, &[]);
    assert_eq!(o.status.code(), Some(0), "{}", text(&o));
    let got = export_which(&st, "student", true, &dir.path().join("f.safetensors"));
    for (k, v) in &wh {
        // the rope periods are a buffer: computed from the config, not read
        let want = if k == "rope_embed.periods" {
            v.clone()
        } else {
            rounded(v)
        };
        assert_eq!(got[k], want, "{k}");
    }
    assert_eq!(got.len(), wh.len());

    // another run's EMA teacher, heads included
    let (c4, st) = init_config(format!("state:{}", src.display()), "state", tiny_config(""));
    let o = run_to(&c4, &st, 0, &[]);
    assert_eq!(o.status.code(), Some(0), "{}", text(&o));
    let out = dir.path().join("s.safetensors");
    assert_eq!(export_which(&st, "teacher", true, &out), wh);

    // heads of another size: refused, saying how to start them afresh
    let (c6, st) = init_config(
        format!("safetensors:{}", with_heads.display()),
        "more-prototypes",
        tiny_config("").replace("n_prototypes = 64", "n_prototypes = 128"),
    );
    let o = run_to(&c6, &st, 2, &[]);
    assert_ne!(o.status.code(), Some(0), "{}", text(&o));
    let t = text(&o);
    assert!(
        t.contains("the source's dino_head does not fit") && t.contains("without --with-heads"),
        "{t}"
    );

    // another width: refused before anything is trained
    let (c3, st) = init_config(
        format!("safetensors:{}", with_heads.display()),
        "wider",
        tiny_config("").replace("embed_dim = 32", "embed_dim = 48"),
    );
    let o = run_to(&c3, &st, 2, &[]);
    assert_ne!(o.status.code(), Some(0), "{}", text(&o));
    let t = text(&o);
    assert!(
        t.contains("model.init") && t.contains("cls_token") && t.contains("expected [1, 1, 48]"),
        "{t}"
    );
}
