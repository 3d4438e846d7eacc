//! Process-level guarantees of the checkpoint store, with real processes:
//!
//! - SIGKILL at random moments (during saves, commits, retention and open) never loses a
//!   committed checkpoint and never leaves a latest that does not verify;
//! - a real full disk: `RLIMIT_FSIZE` (EFBIG, works unprivileged everywhere) and, where the
//!   process may create a mount namespace (root with CAP_SYS_ADMIN), a full tmpfs (ENOSPC);
//! - a read-only state directory (a read-only remount of a private tmpfs, same condition);
//! - a second process gets "in use by pid …", also after the first was SIGKILLed.
//!
//! This binary is its own child: with `CKPT_CHILD=<mode>` set, `main` runs a child role instead
//! of the tests (`harness = false`, so no test is a no-op in the parent run).

use std::ffi::CString;
use std::fs;
use std::io::{BufRead, BufReader, Write};
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::sync::mpsc;
use std::time::{Duration, Instant};

use checkpoints::{
    event_kind, CheckpointPayload, Error, Retention, SaveStage, Store, StoreOptions, TensorBlob,
    TensorGroup,
};
use serde_json::json;

const CHILD_ENV: &str = "CKPT_CHILD";
/// Exit code of a child that cannot run its scenario here (no mount namespace).
const SKIP: i32 = 77;

// ---- shared helpers ----------------------------------------------------------------------------

fn splitmix(state: &mut u64) -> u64 {
    *state = state.wrapping_add(0x9e37_79b9_7f4a_7c15);
    let mut z = *state;
    z = (z ^ (z >> 30)).wrapping_mul(0xbf58_476d_1ce4_e5b9);
    z = (z ^ (z >> 27)).wrapping_mul(0x94d0_49bb_1331_11eb);
    z ^ (z >> 31)
}

/// Deterministic content of step `step`, about `kib` KiB over three groups.
fn payload(step: u64, kib: usize) -> CheckpointPayload {
    let n = kib * 256 / 3;
    let group = |name: &str, salt: u64| {
        let mut s = step.wrapping_mul(1_000_003) ^ salt;
        let data: Vec<f32> = (0..n).map(|_| (splitmix(&mut s) >> 40) as f32).collect();
        TensorGroup::new(
            name,
            vec![
                TensorBlob::from_f32("w", &[n], &data).unwrap(),
                TensorBlob::from_u64("step", &[], &[step]).unwrap(),
            ],
        )
    };
    CheckpointPayload::new(step)
        .with_group(group("student", 1))
        .with_group(group("teacher", 2))
        .with_group(group("optimizer", 3))
        .with_versions("cfg", "process-test")
        .with_meta(json!({ "step": step }))
}

fn assert_content(ckpt: &checkpoints::LoadedCheckpoint, kib: usize) {
    let expected = payload(ckpt.step(), kib);
    for g in &expected.groups {
        let got = ckpt.group(&g.name).expect("group present");
        for t in &g.tensors {
            assert!(
                got.get(&t.name) == Some(t),
                "step {} {}/{} differs",
                ckpt.step(),
                g.name,
                t.name
            );
        }
    }
    assert_eq!(ckpt.meta(), &json!({ "step": ckpt.step() }));
}

fn options(keep_last: usize) -> StoreOptions {
    StoreOptions::new(Retention::keep_last(keep_last))
}

fn child(mode: &str, args: &[&str]) -> Command {
    let mut cmd = Command::new(std::env::current_exe().unwrap());
    cmd.env(CHILD_ENV, mode).args(args);
    cmd
}

fn dir_names(dir: &Path) -> Vec<String> {
    let mut v: Vec<String> = fs::read_dir(dir)
        .unwrap()
        .map(|e| e.unwrap().file_name().to_string_lossy().into_owned())
        .collect();
    v.sort();
    v
}

// ---- harness -----------------------------------------------------------------------------------

type TestFn = fn() -> Outcome;

enum Outcome {
    Pass,
    Skip(String),
}

fn main() {
    if let Ok(mode) = std::env::var(CHILD_ENV) {
        let args: Vec<String> = std::env::args().skip(1).collect();
        std::process::exit(run_child(&mode, &args));
    }
    let tests: &[(&str, TestFn)] = &[
        (
            "sigkill_at_random_moments_never_loses_a_committed_checkpoint",
            sigkill_loop,
        ),
        ("file_size_limit_efbig_fails_the_save_cleanly", efbig),
        ("full_tmpfs_enospc_fails_the_save_cleanly", full_tmpfs),
        (
            "read_only_state_directory_is_a_typed_error",
            read_only_mount,
        ),
        (
            "a_second_process_is_refused_with_the_holders_pid",
            second_process,
        ),
    ];
    let args: Vec<String> = std::env::args().skip(1).collect();
    if args.iter().any(|a| a == "--list") {
        for (name, _) in tests {
            println!("{name}: test");
        }
        return;
    }
    let filters: Vec<&String> = args.iter().filter(|a| !a.starts_with('-')).collect();
    let selected: Vec<&(&str, TestFn)> = tests
        .iter()
        .filter(|(name, _)| filters.is_empty() || filters.iter().any(|f| name.contains(f.as_str())))
        .collect();
    println!("\nrunning {} tests", selected.len());
    let mut failed = Vec::new();
    for (name, test) in selected {
        let t = Instant::now();
        match std::panic::catch_unwind(test) {
            Ok(Outcome::Pass) => {
                println!("test {name} ... ok ({:.1} s)", t.elapsed().as_secs_f64())
            }
            Ok(Outcome::Skip(why)) => println!("test {name} ... SKIPPED: {why}"),
            Err(_) => {
                println!("test {name} ... FAILED");
                failed.push(*name);
            }
        }
    }
    if failed.is_empty() {
        println!("\ntest result: ok\n");
    } else {
        println!("\ntest result: FAILED: {failed:?}\n");
        std::process::exit(101);
    }
}

fn run_child(mode: &str, args: &[String]) -> i32 {
    let dir = PathBuf::from(&args[0]);
    match mode {
        "saver" => child_saver(&dir),
        "efbig" => child_efbig(&dir),
        "holder" => child_holder(&dir),
        "tmpfs_full" => in_private_tmpfs(&dir, child_tmpfs_full),
        "read_only" => in_private_tmpfs(&dir, child_read_only),
        other => {
            eprintln!("unknown child mode {other}");
            2
        }
    }
}

// ---- SIGKILL loop ------------------------------------------------------------------------------

const KILL_KIB: usize = 3 * 1024;

/// Saves forever, continuing after `latest`. Prints `BEGIN s` before and `COMMITTED s` after
/// each save, flushing stdout each time, so the parent knows what was committed before the kill.
fn child_saver(dir: &Path) -> i32 {
    let store = Store::open(dir, options(2)).unwrap();
    let mut step = store.latest_step().unwrap().unwrap_or(0) + 1;
    let mut out = std::io::stdout().lock();
    loop {
        let p = payload(step, KILL_KIB);
        writeln!(out, "BEGIN {step}").unwrap();
        out.flush().unwrap();
        store.save(&p).unwrap();
        writeln!(out, "COMMITTED {step}").unwrap();
        out.flush().unwrap();
        step += 1;
    }
}

fn sigkill_loop() -> Outcome {
    let dir = tempfile::tempdir().unwrap();
    let seed = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .unwrap()
        .as_nanos() as u64;
    println!("  seed {seed}");
    let mut rng = seed;
    let mut committed_ever: Vec<u64> = Vec::new();
    let (mut mid_save, mut between, mut before_first, mut reported) = (0, 0, 0, 0);
    let rounds = 14;
    for round in 0..rounds {
        let mut proc = child("saver", &[dir.path().to_str().unwrap()])
            .stdout(Stdio::piped())
            .spawn()
            .unwrap();
        let (tx, rx) = mpsc::channel::<String>();
        let stdout = proc.stdout.take().unwrap();
        let reader = std::thread::spawn(move || {
            for line in BufReader::new(stdout).lines() {
                let Ok(line) = line else { break };
                if tx.send(line).is_err() {
                    break;
                }
            }
        });
        let mut lines: Vec<String> = Vec::new();
        if round % 3 == 2 {
            // Kill early: during open/recovery or the first save.
            std::thread::sleep(Duration::from_millis(splitmix(&mut rng) % 150));
        } else {
            // Wait for one commit in this round, then a random delay within about one save.
            let deadline = Instant::now() + Duration::from_secs(60);
            while !lines.iter().any(|l| l.starts_with("COMMITTED")) {
                let left = deadline.saturating_duration_since(Instant::now());
                match rx.recv_timeout(left) {
                    Ok(l) => lines.push(l),
                    Err(_) => panic!("child made no commit within 60 s"),
                }
            }
            std::thread::sleep(Duration::from_micros(splitmix(&mut rng) % 120_000));
        }
        proc.kill().unwrap(); // SIGKILL
        let status = proc.wait().unwrap();
        assert!(!status.success(), "the child was killed");
        reader.join().unwrap();
        lines.extend(rx.try_iter());

        let commits: Vec<u64> = lines
            .iter()
            .filter_map(|l| l.strip_prefix("COMMITTED ").map(|s| s.parse().unwrap()))
            .collect();
        match lines.last() {
            Some(l) if l.starts_with("BEGIN") => mid_save += 1,
            Some(_) => between += 1,
            None => before_first += 1,
        }
        reported += commits.len();
        committed_ever.extend(&commits);

        // Reopen as the daemon would after a crash.
        let store = Store::open(dir.path(), options(2)).unwrap();
        let names = dir_names(store.checkpoints_dir());
        assert!(
            names.iter().all(|n| !n.ends_with(".tmp")),
            "round {round}: {names:?}"
        );
        let steps = store.steps().unwrap();
        assert_eq!(
            names.len(),
            steps.len(),
            "round {round}: every directory is committed: {names:?} {steps:?}"
        );
        // Known committed: reported by a child, or seen as `latest` at an earlier reopen (a
        // commit that happened just before a kill, without its report).
        let Some(&known) = committed_ever.iter().max() else {
            assert!(steps.is_empty(), "round {round}: {steps:?}");
            continue;
        };
        let latest = store.latest_step().unwrap().unwrap();
        // At most the save in flight at the kill may have committed without being reported.
        assert!(
            latest == known || latest == known + 1,
            "round {round}: latest {latest}, known committed {known}"
        );
        let ckpt = store.load_latest_valid().unwrap().unwrap();
        assert_eq!(ckpt.step(), latest, "round {round}");
        assert!(ckpt.skipped.is_empty(), "round {round}: {:?}", ckpt.skipped);
        assert_content(&ckpt, KILL_KIB);
        // The newest known commit is still there (keep_last 2) and verifies.
        assert!(
            steps.contains(&known),
            "round {round}: {known} lost; have {steps:?}"
        );
        assert_content(&store.load(known).unwrap(), KILL_KIB);
        assert!(
            store.verify_all().unwrap().iter().all(|r| r.ok()),
            "round {round}"
        );
        // Nothing committed is missing unless two newer checkpoints exist.
        committed_ever.push(latest);
        for c in &committed_ever {
            let newer = steps.iter().filter(|s| *s > c).count();
            assert!(
                steps.contains(c) || newer >= 2,
                "round {round}: committed {c} lost; have {steps:?}"
            );
        }
        // keep_last 2, plus one when the kill landed between a commit and its retention (the
        // next save deletes it).
        assert!(steps.len() <= 3, "round {round}: retention: {steps:?}");
    }
    println!(
        "  {rounds} SIGKILLs: {mid_save} during a save, {between} between saves, {before_first} before any output; {reported} commits reported"
    );
    assert!(
        mid_save >= 3,
        "too few kills landed during a save ({mid_save}); rerun with more rounds"
    );
    Outcome::Pass
}

// ---- full disk: RLIMIT_FSIZE -------------------------------------------------------------------

fn set_fsize_limit(bytes: Option<u64>) {
    // SAFETY: plain syscalls on a local struct.
    unsafe {
        let mut lim = libc::rlimit {
            rlim_cur: 0,
            rlim_max: 0,
        };
        assert_eq!(libc::getrlimit(libc::RLIMIT_FSIZE, &mut lim), 0);
        lim.rlim_cur = bytes.map_or(lim.rlim_max, |b| b as libc::rlim_t);
        assert_eq!(libc::setrlimit(libc::RLIMIT_FSIZE, &lim), 0);
    }
}

fn child_efbig(dir: &Path) -> i32 {
    // Without this, exceeding the limit kills the process with SIGXFSZ instead of EFBIG.
    // SAFETY: setting a signal disposition to SIG_IGN.
    unsafe { libc::signal(libc::SIGXFSZ, libc::SIG_IGN) };
    let store = Store::open(dir, options(2)).unwrap();
    store.save(&payload(1, 256)).unwrap();

    set_fsize_limit(Some(2 << 20));
    let err = store.save(&payload(2, 8 * 1024)).unwrap_err();
    println!("error: {err}");
    assert_eq!(err.save_stage(), Some(SaveStage::WriteFiles), "{err}");
    assert!(err.is_disk_full(), "{err}");
    assert_eq!(
        err.io_error().and_then(|e| e.raw_os_error()),
        Some(libc::EFBIG)
    );
    assert!(
        err.to_string().contains("step-000000000002.tmp"),
        "names the file: {err}"
    );
    assert_eq!(store.latest_step().unwrap(), Some(1));
    assert_eq!(dir_names(store.checkpoints_dir()), ["step-000000000001"]);
    assert_eq!(store.load_latest_valid().unwrap().unwrap().step(), 1);

    // Space comes back: the same store saves again without a restart.
    set_fsize_limit(None);
    store.save(&payload(2, 8 * 1024)).unwrap();
    println!("OK");
    0
}

fn efbig() -> Outcome {
    let dir = tempfile::tempdir().unwrap();
    let out = child("efbig", &[dir.path().to_str().unwrap()])
        .output()
        .unwrap();
    let stdout = String::from_utf8_lossy(&out.stdout);
    println!("  {}", stdout.lines().next().unwrap_or_default());
    assert!(
        out.status.success() && stdout.contains("OK"),
        "child failed: {stdout}\n{}",
        String::from_utf8_lossy(&out.stderr)
    );
    let store = Store::open(dir.path(), options(2)).unwrap();
    assert_eq!(store.latest_step().unwrap(), Some(2));
    assert!(store.verify_all().unwrap().iter().all(|r| r.ok()));
    assert_content(&store.load_latest().unwrap().unwrap(), 8 * 1024);
    let failed: Vec<_> = store
        .recent_events(100)
        .unwrap()
        .into_iter()
        .filter(|e| e.event.kind == event_kind::SAVE_FAILED)
        .collect();
    assert_eq!(failed.len(), 1);
    assert_eq!(failed[0].event.fields["disk_full"], json!(true));
    Outcome::Pass
}

// ---- full disk and read-only: a private tmpfs --------------------------------------------------

fn cstr(s: &str) -> CString {
    CString::new(s).unwrap()
}

fn mount(
    src: &str,
    target: &Path,
    fstype: &str,
    flags: libc::c_ulong,
    data: &str,
) -> std::io::Result<()> {
    let target = cstr(target.to_str().unwrap());
    let (src, fstype, data) = (cstr(src), cstr(fstype), cstr(data));
    // SAFETY: all pointers are valid NUL-terminated strings for the duration of the call.
    let rc = unsafe {
        libc::mount(
            src.as_ptr(),
            target.as_ptr(),
            fstype.as_ptr(),
            flags,
            data.as_ptr().cast(),
        )
    };
    if rc == 0 {
        Ok(())
    } else {
        Err(std::io::Error::last_os_error())
    }
}

/// Runs `f` on a 32 MiB tmpfs mounted at `mnt` in a private mount namespace (gone when the
/// child exits). Exits with [`SKIP`] where that is not permitted.
fn in_private_tmpfs(mnt: &Path, f: fn(&Path) -> i32) -> i32 {
    // SAFETY: unshare affects only this (still single-threaded) process.
    if unsafe { libc::unshare(libc::CLONE_NEWNS) } != 0 {
        println!(
            "SKIP unshare(CLONE_NEWNS): {}",
            std::io::Error::last_os_error()
        );
        return SKIP;
    }
    if let Err(e) = mount(
        "none",
        Path::new("/"),
        "",
        libc::MS_REC | libc::MS_PRIVATE,
        "",
    ) {
        println!("SKIP make / private: {e}");
        return SKIP;
    }
    if let Err(e) = mount("tmpfs", mnt, "tmpfs", 0, "size=32m") {
        println!("SKIP mount tmpfs: {e}");
        return SKIP;
    }
    f(mnt)
}

fn run_tmpfs_child(mode: &str) -> Outcome {
    let dir = tempfile::tempdir().unwrap();
    let out = child(mode, &[dir.path().to_str().unwrap()])
        .output()
        .unwrap();
    let stdout = String::from_utf8_lossy(&out.stdout).into_owned();
    for line in stdout.lines() {
        println!("  {line}");
    }
    if out.status.code() == Some(SKIP) {
        return Outcome::Skip(format!(
            "needs CAP_SYS_ADMIN for a private tmpfs ({})",
            stdout.trim()
        ));
    }
    assert!(
        out.status.success() && stdout.contains("OK"),
        "child failed: {stdout}\n{}",
        String::from_utf8_lossy(&out.stderr)
    );
    Outcome::Pass
}

fn full_tmpfs() -> Outcome {
    run_tmpfs_child("tmpfs_full")
}

fn child_tmpfs_full(mnt: &Path) -> i32 {
    let state = mnt.join("state");
    let store = Store::open(&state, options(2)).unwrap();
    store.save(&payload(1, 4 * 1024)).unwrap();
    // Another program fills the disk completely.
    let filler = mnt.join("filler");
    let mut f = fs::File::create(&filler).unwrap();
    let chunk = vec![0x5a_u8; 1 << 20];
    let fill_err = loop {
        if let Err(e) = f.write_all(&chunk) {
            break e;
        }
    };
    assert_eq!(fill_err.raw_os_error(), Some(libc::ENOSPC));
    drop(f);

    // The store sees that the checkpoint cannot fit and refuses it before writing.
    let err = store.save(&payload(2, 4 * 1024)).unwrap_err();
    println!("error: {err}");
    assert!(err.is_disk_full(), "{err}");
    assert_eq!(err.save_stage(), Some(SaveStage::Space), "{err}");
    assert_eq!(store.latest_step().unwrap(), Some(1));
    assert_eq!(dir_names(store.checkpoints_dir()), ["step-000000000001"]);

    // Room for the tensors' bytes and one page more passes that check, but the files'
    // headers, the manifest and the directories need more: the disk fills during the
    // write, which fails cleanly with the OS's ENOSPC.
    let needed: u64 = payload(2, 4 * 1024)
        .groups
        .iter()
        .map(|g| g.data_bytes())
        .sum();
    let len = fs::metadata(&filler).unwrap().len();
    let f = fs::OpenOptions::new().write(true).open(&filler).unwrap();
    f.set_len(len - (needed.div_ceil(4096) + 1) * 4096).unwrap();
    drop(f);
    let err = store.save(&payload(2, 4 * 1024)).unwrap_err();
    println!("error: {err}");
    assert!(err.is_disk_full(), "{err}");
    assert_eq!(
        err.io_error().and_then(|e| e.raw_os_error()),
        Some(libc::ENOSPC)
    );
    assert_eq!(store.latest_step().unwrap(), Some(1));
    assert_eq!(dir_names(store.checkpoints_dir()), ["step-000000000001"]);
    assert_eq!(store.load_latest_valid().unwrap().unwrap().step(), 1);

    // The operator frees space: the next save succeeds without a restart.
    fs::remove_file(&filler).unwrap();
    store.save(&payload(2, 4 * 1024)).unwrap();
    drop(store);
    let store = Store::open(&state, options(2)).unwrap();
    assert_eq!(store.load_latest_valid().unwrap().unwrap().step(), 2);
    assert!(store.verify_all().unwrap().iter().all(|r| r.ok()));
    println!("OK");
    0
}

fn read_only_mount() -> Outcome {
    run_tmpfs_child("read_only")
}

fn child_read_only(mnt: &Path) -> i32 {
    let state = mnt.join("state");
    let store = Store::open(&state, options(2)).unwrap();
    store.save(&payload(1, 512)).unwrap();

    // The state directory goes read-only under a running store. A read-only remount of the
    // tmpfs itself is refused (EBUSY) while sled holds its file open for writing, so stack a
    // read-only bind mount on the same path: every new path lookup (mkdir, create, rename)
    // gets EROFS; descriptors opened before keep working.
    mount(mnt.to_str().unwrap(), mnt, "", libc::MS_BIND, "").unwrap();
    mount(
        "none",
        mnt,
        "",
        libc::MS_BIND | libc::MS_REMOUNT | libc::MS_RDONLY,
        "",
    )
    .unwrap();
    let err = store.save(&payload(2, 512)).unwrap_err();
    println!("save error: {err}");
    assert_eq!(err.save_stage(), Some(SaveStage::Prepare), "{err}");
    assert_eq!(
        err.io_error().and_then(|e| e.raw_os_error()),
        Some(libc::EROFS)
    );
    assert!(
        err.to_string().contains(&state.display().to_string()),
        "{err}"
    );
    assert_eq!(store.latest_step().unwrap(), Some(1));
    assert_eq!(
        store.load_latest_valid().unwrap().unwrap().step(),
        1,
        "still readable"
    );
    drop(store);

    // Opening a read-only state directory fails at open, naming the path.
    let err = Store::open(&state, options(2)).unwrap_err();
    println!("open error: {err}");
    assert!(matches!(&err, Error::Io { .. }), "{err}");
    assert_eq!(
        err.io_error().and_then(|e| e.raw_os_error()),
        Some(libc::EROFS)
    );
    assert!(
        err.to_string().contains(&state.display().to_string()),
        "{err}"
    );

    // Writable again: the store opens and saves.
    let target = cstr(mnt.to_str().unwrap());
    // SAFETY: valid NUL-terminated path.
    assert_eq!(
        unsafe { libc::umount2(target.as_ptr(), 0) },
        0,
        "{}",
        std::io::Error::last_os_error()
    );
    let store = Store::open(&state, options(2)).unwrap();
    store.save(&payload(2, 512)).unwrap();
    assert_eq!(store.load_latest_valid().unwrap().unwrap().step(), 2);
    println!("OK");
    0
}

// ---- a second process --------------------------------------------------------------------------

fn child_holder(dir: &Path) -> i32 {
    let _store = Store::open(dir, options(2)).unwrap();
    println!("READY");
    std::io::stdout().flush().unwrap();
    // Hold the store until stdin closes.
    let mut line = String::new();
    while std::io::stdin()
        .read_line(&mut line)
        .map(|n| n > 0)
        .unwrap_or(false)
    {}
    0
}

fn spawn_holder(dir: &Path) -> Child {
    let mut proc = child("holder", &[dir.to_str().unwrap()])
        .stdin(Stdio::piped())
        .stdout(Stdio::piped())
        .spawn()
        .unwrap();
    let mut ready = String::new();
    BufReader::new(proc.stdout.as_mut().unwrap())
        .read_line(&mut ready)
        .unwrap();
    assert_eq!(ready.trim(), "READY");
    proc
}

fn second_process() -> Outcome {
    let dir = tempfile::tempdir().unwrap();
    Store::open(dir.path(), options(2))
        .unwrap()
        .save(&payload(1, 64))
        .unwrap();

    let mut holder = spawn_holder(dir.path());
    let err = Store::open(dir.path(), options(2)).unwrap_err();
    println!("  {err}");
    assert!(
        matches!(&err, Error::InUse { pid: Some(p), .. } if *p == holder.id()),
        "{err}"
    );
    assert_eq!(
        err.to_string(),
        format!(
            "state directory {} is in use by pid {}",
            dir.path().display(),
            holder.id()
        )
    );
    drop(holder.stdin.take()); // clean exit
    assert!(holder.wait().unwrap().success());
    Store::open(dir.path(), options(2)).unwrap();

    // A SIGKILLed holder leaves no stale lock: the kernel drops the flock with the process.
    let mut holder = spawn_holder(dir.path());
    assert!(matches!(
        Store::open(dir.path(), options(2)),
        Err(Error::InUse { .. })
    ));
    holder.kill().unwrap();
    holder.wait().unwrap();
    let store = Store::open(dir.path(), options(2)).unwrap();
    assert_eq!(store.load_latest_valid().unwrap().unwrap().step(), 1);
    Outcome::Pass
}
