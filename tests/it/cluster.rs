//! A data-parallel group whose members are separate `dinod` processes talking over TCP
//! (`dinod bench dp --listen / --join`): what it computes, whom it admits, and what a
//! killed member does to the others.

use std::io::{BufRead, BufReader, Read};
use std::path::{Path, PathBuf};
use std::process::Child;
use std::sync::mpsc::{channel, Receiver};
use std::time::{Duration, Instant};

use crate::support::*;

/// A running `dinod` whose stderr lines arrive on a channel as they are written.
struct Proc {
    child: Child,
    lines: Receiver<String>,
    seen: Vec<String>,
    stdout: std::thread::JoinHandle<String>,
}

impl Proc {
    fn start(args: &[&str]) -> Proc {
        Proc::start_in(Path::new("."), args)
    }

    /// Starts `dinod ARGS` in the working directory `dir`.
    fn start_in(dir: &Path, args: &[&str]) -> Proc {
        let mut child = spawn_in(dir, args);
        let err = child.stderr.take().unwrap();
        let mut out = child.stdout.take().unwrap();
        let (tx, lines) = channel();
        std::thread::spawn(move || {
            for l in BufReader::new(err).lines().map_while(Result::ok) {
                if tx.send(l).is_err() {
                    break;
                }
            }
        });
        let stdout = std::thread::spawn(move || {
            let mut s = String::new();
            let _ = out.read_to_string(&mut s);
            s
        });
        Proc {
            child,
            lines,
            seen: vec![],
            stdout,
        }
    }

    /// Waits for a stderr line containing `what` and returns it.
    fn line_with(&mut self, what: &str, limit: Duration) -> String {
        let t0 = Instant::now();
        while t0.elapsed() < limit {
            if let Ok(l) = self.lines.recv_timeout(Duration::from_millis(100)) {
                self.seen.push(l.clone());
                if l.contains(what) {
                    return l;
                }
            }
        }
        panic!(
            "no line with {what:?} in {limit:?}; saw:\n{}",
            self.seen.join("\n")
        )
    }

    /// Waits for the exit; returns its code, all of stderr and stdout.
    fn finish(mut self, limit: Duration) -> (Option<i32>, String, String) {
        let Some(st) = wait_timeout(&mut self.child, limit) else {
            // killed by wait_timeout: its stderr is complete once the reader has it
            std::thread::sleep(Duration::from_millis(200));
            self.seen.extend(self.lines.try_iter());
            panic!(
                "did not exit in {limit:?}; its stderr:\n{}",
                self.seen.join("\n")
            )
        };
        self.seen.extend(self.lines.try_iter());
        // the reader thread may still hold the last lines
        std::thread::sleep(Duration::from_millis(50));
        self.seen.extend(self.lines.try_iter());
        (st.code(), self.seen.join("\n"), self.stdout.join().unwrap())
    }
}

fn listening_addr(p: &mut Proc) -> String {
    let l = p.line_with("listening on ", Duration::from_secs(60));
    l.split_whitespace().nth(2).unwrap().to_string()
}

/// `dinod run` on a `[runtime.cluster]` recipe to `steps`, and the address it listens on
/// for its workers (bound at its first step).
fn start_daemon(cfg: &str, state: &Path, steps: u64, extra: &[&str]) -> (Proc, String) {
    let steps = steps.to_string();
    let mut p = Proc::start(
        &[
            &[
                "run",
                "--config",
                cfg,
                "--state-dir",
                state.to_str().unwrap(),
                "--max-steps",
                &steps,
            ][..],
            extra,
        ]
        .concat(),
    );
    let addr = listening_addr(&mut p);
    (p, addr)
}

/// The fingerprint a group of threads (`recipe` has `data_parallel`) reaches at `steps`;
/// its state is `dir/s1`.
fn threads_fingerprint(dir: &Path, recipe: &str, steps: u64) -> (u64, String) {
    let threads_dir = dir.join("threads");
    std::fs::create_dir_all(&threads_dir).unwrap();
    let threads = write_config(&threads_dir, recipe);
    let o = run_to(&threads, &dir.join("s1"), steps, &[]);
    assert_eq!(o.status.code(), Some(0), "{}", text(&o));
    let want = fingerprint(&dir.join("s1"));
    assert_eq!(want.0, steps);
    assert!(!want.1.is_empty(), "no fingerprint to compare with");
    want
}

/// The fingerprint `threads` threads of one process reach at `steps` on `base`, and `base`
/// as the recipe of a group of `nodes` processes on a free port with the `extra` keys of
/// [`cluster_section`], written in `dir`.
fn threads_and_group(
    dir: &Path,
    base: &str,
    threads: usize,
    nodes: usize,
    extra: &str,
    steps: u64,
) -> ((u64, String), PathBuf) {
    let want = threads_fingerprint(
        dir,
        &format!("{base}\n[runtime]\ndata_parallel = {threads}\n"),
        steps,
    );
    let section = cluster_section(dir, "127.0.0.1:0", nodes, extra);
    let cfg = write_config(dir, &format!("{base}\n{section}"));
    (want, cfg)
}

/// A `[runtime.cluster]` section of `nodes` on `listen`, with a token file written in
/// `dir`, copies checked at every step, and `extra` keys.
fn cluster_section(dir: &Path, listen: &str, nodes: usize, extra: &str) -> String {
    let token = dir.join("token");
    std::fs::write(&token, "a-token-for-the-cluster-tests").unwrap();
    format!(
        "[runtime.cluster]\nlisten = \"{listen}\"\nnodes = {nodes}\ntoken_file = \"{}\"\nverify_every_steps = 1\n{extra}",
        token.display()
    )
}

/// The daemon on `cfg` to `steps` with `workers` `dinod worker` processes (each given
/// `worker_args` too), every one of them exiting 0: the daemon's stderr and the workers'.
fn run_group(
    cfg: &str,
    state: &Path,
    steps: u64,
    workers: usize,
    worker_args: &[&str],
) -> (String, Vec<String>) {
    let (daemon, addr) = start_daemon(cfg, state, steps, &[]);
    let workers: Vec<Proc> = (0..workers)
        .map(|_| {
            Proc::start(
                &[
                    &["worker", "--config", cfg, "--join", &addr][..],
                    worker_args,
                ]
                .concat(),
            )
        })
        .collect();
    let (code, err, _) = daemon.finish(Duration::from_secs(300));
    assert_eq!(code, Some(0), "{err}");
    let werrs = workers
        .into_iter()
        .map(|w| {
            let (code, werr, _) = w.finish(Duration::from_secs(30));
            assert_eq!(code, Some(0), "{werr}");
            werr
        })
        .collect();
    (err, werrs)
}

fn recipe(extra: &str) -> String {
    // KoLeo and drop path are per member (as officially); off, the group step is the
    // one-member step on the whole batch up to rounding
    tiny_config(&format!("[model.loss]\nkoleo_loss_weight = 0.0\n{extra}"))
        .replace("drop_path = 0.2", "drop_path = 0.0")
}

/// Two processes train what two threads of one process train, bit for bit (the same
/// fingerprint), and what one member trains on the whole batch up to rounding. Before
/// that, the coordinator refuses a node with the wrong token and one with another recipe,
/// each with the reason on both sides, and goes on waiting.
#[test]
fn a_group_of_processes_trains_what_a_group_of_threads_trains() {
    let dir = TempDir::new("cluster-equal");
    let cfg = write_config(dir.path(), &recipe(""));
    let cfg = cfg.to_str().unwrap();
    let other_dir = dir.path().join("other");
    std::fs::create_dir_all(&other_dir).unwrap();
    let other = write_config(&other_dir, &recipe("").replace("seed = 3", "seed = 4"));
    let token = dir.path().join("token");
    std::fs::write(&token, "correct-horse-battery-staple\n").unwrap();
    let bad_token = dir.path().join("bad-token");
    std::fs::write(&bad_token, "incorrect-horse-battery-staple\n").unwrap();
    let (token, bad_token) = (token.to_str().unwrap(), bad_token.to_str().unwrap());
    let common = ["bench", "dp", "--config", cfg, "--iters", "2"];

    let o = dinod(&[&common[..], &["--members", "2", "--check"]].concat());
    assert_eq!(o.status.code(), Some(0), "{}", text(&o));
    let threads: serde_json::Value = serde_json::from_slice(&o.stdout).unwrap();
    assert_eq!(threads["transport"], "threads");

    let mut coord = Proc::start(
        &[
            &common[..],
            &[
                "--check",
                "--listen",
                "127.0.0.1:0",
                "--nodes",
                "2",
                "--token-file",
                token,
            ],
        ]
        .concat(),
    );
    let addr = listening_addr(&mut coord);
    let join = |cfg: &str, tok: &str| {
        dinod(&[
            "bench",
            "dp",
            "--config",
            cfg,
            "--iters",
            "2",
            "--join",
            &addr,
            "--token-file",
            tok,
        ])
    };
    let o = join(cfg, bad_token);
    assert_eq!(o.status.code(), Some(1), "{}", text(&o));
    assert!(
        text(&o).contains("refused this node: wrong cluster token"),
        "{}",
        text(&o)
    );
    coord.line_with("refused the node at 127.0.0.1:", Duration::from_secs(10));
    let o = join(other.to_str().unwrap(), token);
    assert_eq!(o.status.code(), Some(1), "{}", text(&o));
    assert!(text(&o).contains("its recipe differs"), "{}", text(&o));

    let worker = Proc::start(&[&common[..], &["--join", &addr, "--token-file", token]].concat());
    let (code, err, out) = coord.finish(Duration::from_secs(120));
    assert_eq!(code, Some(0), "{err}");
    assert!(
        err.contains("joined as rank 1 of 2") && err.contains("all 2 nodes joined"),
        "{err}"
    );
    let c: serde_json::Value = serde_json::from_str(&out).unwrap();
    let (code, err, out) = worker.finish(Duration::from_secs(60));
    assert_eq!(code, Some(0), "{err}");
    assert!(
        err.contains(&format!("joined {addr} as rank 1 of 2")),
        "{err}"
    );
    let w: serde_json::Value = serde_json::from_str(&out).unwrap();

    assert_eq!(
        (c["transport"].as_str(), c["rank"].as_u64()),
        (Some("tcp"), Some(0))
    );
    assert_eq!(
        (w["rank"].as_u64(), w["members"].as_u64()),
        (Some(1), Some(2))
    );
    assert_eq!(c["members_identical"], true, "{c}");
    assert_eq!(w["members_identical"], true, "{w}");
    assert_eq!(c["fingerprint"], w["fingerprint"]);
    // the same sums in the same order: the same bits as the threads
    assert_eq!(c["fingerprint"], threads["fingerprint"], "{c}\n{threads}");
    assert_eq!(c["max_rel_vs_single"], threads["max_rel_vs_single"]);
    assert!(c["max_rel_vs_single"].as_f64().unwrap() < 1e-5, "{c}");
    assert!(w["max_rel_vs_single"].is_null(), "{w}");
}

/// `dinod bench allreduce` between 4 processes: every member's sums are right, the
/// workers sum the size rank 0 was given, and rank 0's traffic per sum is what each way
/// of summing sends: the whole vector to each of 3 workers in a star, 3/4 of it twice in
/// a mesh (its chunk-mates' values of theirs, then its sums to all).
#[test]
fn bench_allreduce_checks_the_sums_and_shows_what_each_way_sends() {
    let dir = TempDir::new("cluster-allreduce");
    let token = dir.path().join("token");
    std::fs::write(&token, "a-token-for-the-allreduce-bench").unwrap();
    let token = token.to_str().unwrap();
    let values: usize = 100_003;
    for reduce in ["star", "mesh"] {
        let n = values.to_string();
        let mut coord = Proc::start(&[
            "bench",
            "allreduce",
            "--listen",
            "127.0.0.1:0",
            "--nodes",
            "4",
            "--token-file",
            token,
            "--reduce",
            reduce,
            "--values",
            &n,
            "--iters",
            "3",
        ]);
        let addr = listening_addr(&mut coord);
        let workers: Vec<Proc> = (0..3)
            .map(|_| Proc::start(&["bench", "allreduce", "--join", &addr, "--token-file", token]))
            .collect();
        let (code, err, out) = coord.finish(Duration::from_secs(120));
        assert_eq!(code, Some(0), "{err}");
        let r: serde_json::Value = serde_json::from_str(&out).unwrap();
        assert_eq!(
            (
                r["nodes"].as_u64(),
                r["reduce"].as_str(),
                r["values"].as_u64()
            ),
            (Some(4), Some(reduce), Some(values as u64)),
            "{r}"
        );
        assert_eq!(r["all_members_correct"], true, "{r}");
        assert_eq!(r["device"], "cpu", "{r}");
        for w in workers {
            let (code, err, out) = w.finish(Duration::from_secs(60));
            assert_eq!(code, Some(0), "{err}");
            let w: serde_json::Value = serde_json::from_str(&out).unwrap();
            assert_eq!(
                (w["values"].as_u64(), w["sums_correct"].as_bool()),
                (Some(values as u64), Some(true)),
                "{w}"
            );
        }
        // payload bytes of f32, plus a 9-byte frame head per message
        let bytes = 4.0 * values as f64;
        let sent = r["sent_bytes_per_sum"].as_f64().unwrap();
        let want = if reduce == "star" {
            3.0 * (bytes + 9.0)
        } else {
            // its values of 3 chunks, then its chunk's sums to 3 members
            let chunk = |c: usize| (((c + 1) * values / 4) - (c * values / 4)) as f64 * 4.0;
            (chunk(1) + 9.0) + (chunk(2) + 9.0) + (chunk(3) + 9.0) + 3.0 * (chunk(0) + 9.0)
        };
        assert_eq!(sent, want, "{reduce}: {r}");
        assert_eq!(
            r["received_bytes_per_sum"].as_f64().unwrap(),
            want,
            "{reduce}: {r}"
        );
    }
    // a member whose vector would live on a GPU it cannot open fails alone, at once
    let o = dinod(&[
        "bench",
        "allreduce",
        "--join",
        "127.0.0.1:9",
        "--token-file",
        token,
        "--device",
        "cuda:0",
    ]);
    assert_eq!(o.status.code(), Some(1), "{}", text(&o));
    assert!(
        text(&o).contains("built without CUDA support"),
        "{}",
        text(&o)
    );
}

/// A member killed with SIGKILL in the middle of the steps fails the other's next
/// all-reduce at once (its connection closes), far inside the 10-minute collective
/// timeout, whichever side dies; and a coordinator whose nodes never come gives up after
/// its wait with how many came.
#[test]
fn a_killed_member_fails_the_group_at_once_instead_of_hanging() {
    let dir = TempDir::new("cluster-kill");
    let cfg = write_config(
        dir.path(),
        &recipe("[runtime]\ncollective_timeout_s = 600.0\n"),
    );
    let cfg = cfg.to_str().unwrap();
    let token = dir.path().join("token");
    std::fs::write(&token, "a-token-for-the-kill-test").unwrap();
    let token = token.to_str().unwrap();
    let long = [
        "bench", "dp", "--config", cfg, "--warmup", "0", "--iters", "1000000",
    ];

    for victim in ["worker", "coordinator"] {
        let mut coord = Proc::start(
            &[
                &long[..],
                &[
                    "--listen",
                    "127.0.0.1:0",
                    "--nodes",
                    "2",
                    "--token-file",
                    token,
                ],
            ]
            .concat(),
        );
        let addr = listening_addr(&mut coord);
        let mut worker =
            Proc::start(&[&long[..], &["--join", &addr, "--token-file", token]].concat());
        coord.line_with("all 2 nodes joined", Duration::from_secs(30));
        worker.line_with("joined", Duration::from_secs(30));
        // well into the steps
        std::thread::sleep(Duration::from_millis(1500));
        let (dead, survivor, says) = if victim == "worker" {
            (&mut worker.child, coord, "member 1's connection closed")
        } else {
            (
                &mut coord.child,
                worker,
                "the coordinator's connection closed",
            )
        };
        dead.kill().unwrap();
        let _ = dead.wait();
        let t0 = Instant::now();
        let (code, err, _) = survivor.finish(Duration::from_secs(60));
        let took = t0.elapsed();
        assert_eq!(code, Some(1), "{victim} killed: {err}");
        assert!(err.contains(says), "{victim} killed: {err}");
        assert!(
            took < Duration::from_secs(30),
            "{victim} killed: the other took {took:?}"
        );
    }

    let t0 = Instant::now();
    let o = dinod(
        &[
            &long[..],
            &[
                "--batch-size",
                "6",
                "--listen",
                "127.0.0.1:0",
                "--nodes",
                "3",
                "--token-file",
                token,
                "--join-wait-s",
                "1",
            ],
        ]
        .concat(),
    );
    assert_eq!(o.status.code(), Some(1), "{}", text(&o));
    assert!(
        text(&o).contains("1 of 3 nodes joined within 1 s"),
        "{}",
        text(&o)
    );
    assert!(t0.elapsed() < Duration::from_secs(30));
    // a worker's recipe must describe the group it joins
    let o = dinod(&["worker", "--config", cfg, "--join", "127.0.0.1:1"]);
    assert_eq!(o.status.code(), Some(1), "{}", text(&o));
    assert!(
        text(&o).contains("has no [runtime.cluster]"),
        "{}",
        text(&o)
    );
    // a worker needs a token file, and a node cannot both listen and join
    let o = dinod(&[&long[..], &["--join", "127.0.0.1:1"]].concat());
    assert_eq!(o.status.code(), Some(2), "{}", text(&o));
    assert!(text(&o).contains("--token-file"), "{}", text(&o));
}

/// `[runtime.cluster]`: the daemon and a `dinod worker` process train, bit for bit, what
/// the daemon trains with `data_parallel = 2` threads (KoLeo and drop path on: they are
/// per member either way), and the worker exits 0 when the run ends. A worker killed with
/// SIGKILL mid-run fails the daemon's step as a recoverable device fault; the daemon
/// admits the worker started in its place and redoes the step exactly.
#[test]
fn a_daemon_trains_over_a_group_of_processes_what_it_trains_over_threads() {
    let dir = TempDir::new("cluster-daemon");
    let steps = 12;
    let want = threads_fingerprint(
        dir.path(),
        &tiny_config("[runtime]\ndata_parallel = 2\n"),
        steps,
    );
    let cluster = write_config(
        dir.path(),
        &tiny_config(&cluster_section(
            dir.path(),
            "127.0.0.1:0",
            2,
            "join_wait_s = 60.0\n",
        )),
    );
    let cluster = cluster.to_str().unwrap();

    let run = |state: &Path, steps: u64, extra: &[&str]| start_daemon(cluster, state, steps, extra);
    let s2 = dir.path().join("s2");
    // (the worker comes 600 ms late into the sums of step 10: a straggler)
    let (_, werrs) = run_group(cluster, &s2, steps, 1, &["--inject", "slow:trainer@10+600"]);
    let err = &werrs[0];
    assert!(
        err.contains("joined") && err.contains("the daemon ended the run"),
        "{err}"
    );
    assert_eq!(fingerprint(&s2), want, "processes and threads differ");
    assert!(
        !s2.join("control.sock").exists(),
        "the daemon left its socket behind"
    );

    // a daemon waiting for its workers stops at once when asked, not after the wait
    let s5 = dir.path().join("s5");
    let (daemon, _addr) = run(&s5, steps, &[]);
    let t0 = Instant::now();
    let o = dinod(&["stop", "--wait", "--state-dir", s5.to_str().unwrap()]);
    assert_eq!(o.status.code(), Some(0), "{}", text(&o));
    assert!(text(&o).contains("stopped at step 0"), "{}", text(&o));
    assert!(t0.elapsed() < Duration::from_secs(20), "{:?}", t0.elapsed());
    assert_eq!(daemon.finish(Duration::from_secs(30)).0, Some(0));
    let c = status(&s5)["run"]["cluster"].clone();
    assert_eq!(c["state"], "stopped", "{c}");
    assert!(
        c["line"]
            .as_str()
            .unwrap_or("")
            .contains("stopped waiting for workers"),
        "{c}"
    );

    let st = status(&s2);
    let c = &st["run"]["cluster"];
    assert_eq!(
        (c["state"].as_str(), c["nodes"].as_u64()),
        (Some("complete"), Some(2)),
        "{st}"
    );
    assert_eq!(c["joined"][0]["rank"], 1, "{st}");
    assert_eq!(c["joined"][0]["device"], "cpu", "{st}");
    assert!(
        c["listen"].as_str().unwrap_or("").starts_with("127.0.0.1:"),
        "{st}"
    );
    let line = c["line"].as_str().unwrap_or("");
    assert!(
        line.starts_with("2 nodes on 127.0.0.1:")
            && line.contains("sums over a mesh")
            && line.contains("as rank 1"),
        "{st}"
    );
    assert_eq!(c["reduce"], "mesh", "{st}");
    let o = dinod(&["status", "--state-dir", s2.to_str().unwrap()]);
    assert!(
        text(&o).contains(&format!("cluster      {line}")),
        "{}",
        text(&o)
    );
    // the copies got the whole state once, were checked at every step, and the gradients
    // and batches crossed
    let cp = &c["copies"];
    assert_eq!(
        (
            cp["whole_states"].as_u64(),
            cp["whole_state_step"].as_u64(),
            cp["verified_step"].as_u64()
        ),
        (Some(1), Some(0), Some(steps - 1)),
        "{st}"
    );
    assert!(cp["sent_bytes"].as_u64().unwrap_or(0) > 0, "{st}");
    assert!(cp["received_bytes"].as_u64().unwrap_or(0) > 0, "{st}");
    assert_eq!(cp["worker_data"], "sent", "{st}");
    assert!(
        text(&o).contains("GB received; the workers' images sent from here"),
        "{}",
        text(&o)
    );
    // how long the backward pass waited for the gradient sums after it ended
    // how long the daemon waited for its worker to enter the sums: a mean over about 10
    // steps, so the 600 ms of step 10 weigh about 60 at step 10 and 54 at step 11
    let late = cp["member_wait_ms"][1].as_f64().expect("member_wait_ms");
    assert_eq!(cp["member_wait_ms"][0].as_f64(), Some(0.0), "{st}");
    assert!((35.0..400.0).contains(&late), "{st}");
    assert!(
        text(&o).contains(&format!(
            "waits per step for each member to enter the sums: member 1 {late:.1} ms"
        )),
        "{}",
        text(&o)
    );
    let wait = cp["grad_wait_ms"].as_f64().expect("grad_wait_ms");
    assert!((0.0..60_000.0).contains(&wait), "{st}");
    assert!(
        text(&o).contains(&format!(
            "the backward pass waits {wait:.1} ms per step for the gradient sums after it ends"
        )),
        "{}",
        text(&o)
    );
    assert!(
        text(&o).contains(&format!(
            "copies       whole state sent 1 time(s) (last at step 0); checked against this process at step {}",
            steps - 1
        )),
        "{}",
        text(&o)
    );
    assert!(
        st["run"]["device"]
            .as_str()
            .unwrap_or("")
            .contains("2 data-parallel processes"),
        "{st}"
    );

    // stopped half-way and resumed with a new worker: the same run (a new worker gets the whole state)
    let s4 = dir.path().join("s4");
    for to in [steps / 2, steps] {
        let (daemon, addr) = run(&s4, to, &[]);
        // a worker on another recipe is refused with the reason, and the daemon waits on
        let other = dir.path().join("other.toml");
        std::fs::write(
            &other,
            std::fs::read_to_string(cluster)
                .unwrap()
                .replace("seed = 3", "seed = 4"),
        )
        .unwrap();
        let o = dinod(&[
            "worker",
            "--config",
            other.to_str().unwrap(),
            "--join",
            &addr,
        ]);
        assert_eq!(o.status.code(), Some(1), "{}", text(&o));
        assert!(text(&o).contains("its recipe differs"), "{}", text(&o));
        let worker = Proc::start(&["worker", "--config", cluster, "--join", &addr]);
        let (code, err, _) = daemon.finish(Duration::from_secs(120));
        assert_eq!(code, Some(0), "{err}");
        assert_eq!(worker.finish(Duration::from_secs(30)).0, Some(0));
    }
    assert_eq!(fingerprint(&s4), want, "the resumed run differs");

    // the worker's copy of the state drifts after step 4: the check at step 5 fails the
    // group, the worker joins again and gets the whole state, and the run is the same
    let s6 = dir.path().join("s6");
    let (_, werrs) = run_group(cluster, &s6, steps, 1, &["--inject", "drift@4"]);
    let werr = &werrs[0];
    assert!(
        werr.contains("drifted from rank 0's at step 5") && werr.contains("joining again"),
        "{werr}"
    );
    assert_eq!(fingerprint(&s6), want, "the run after the drift differs");
    let ev = events(&s6);
    assert!(
        ev.iter().any(|e| {
            let m = e["message"].as_str().unwrap_or("");
            e["kind"] == "actor.restarting" && m.contains("drifted from rank 0's")
        }),
        "{ev:?}"
    );
    // the daemon refuses the drill (it fires in a worker)
    let o = dinod(&[
        "run",
        "--config",
        cluster,
        "--state-dir",
        s6.to_str().unwrap(),
        "--inject",
        "drift@4",
    ]);
    assert_eq!(o.status.code(), Some(2), "{}", text(&o));
    assert!(
        text(&o).contains("dinod worker --inject drift@STEP"),
        "{}",
        text(&o)
    );

    // the worker is killed while step 6 is held; one started in its place takes over
    let s3 = dir.path().join("s3");
    let (daemon, addr) = run(&s3, steps, &["--inject", "slow:teacher@6+2500"]);
    let mut first = Proc::start(&["worker", "--config", cluster, "--join", &addr]);
    first.line_with("joined", Duration::from_secs(30));
    // into the hold of step 6 (steps take milliseconds here)
    let t0 = Instant::now();
    while t0.elapsed() < Duration::from_secs(30) {
        if status(&s3)["run"]["step"].as_u64().unwrap_or(0) >= 6 {
            break;
        }
        std::thread::sleep(Duration::from_millis(50));
    }
    first.child.kill().unwrap();
    let _ = first.child.wait();
    let second = Proc::start(&["worker", "--config", cluster, "--join", &addr]);
    let (code, err, _) = daemon.finish(Duration::from_secs(120));
    assert_eq!(code, Some(0), "{err}");
    assert!(err.contains("joined as rank 1 of 2"), "{err}");
    let (code, err2, _) = second.finish(Duration::from_secs(30));
    assert_eq!(code, Some(0), "{err2}");
    assert_eq!(fingerprint(&s3), want, "the redone step differs");
    let ev = events(&s3);
    assert!(
        ev.iter().any(|e| {
            let m = e["message"].as_str().unwrap_or("");
            e["kind"] == "actor.restarting"
                && m.contains("the group of processes failed")
                && m.contains("member 1's connection closed")
        }),
        "{ev:?}"
    );
}

/// Four processes in a mesh (the workers linked to each other; the heads' gradients of
/// 4 096 prototypes summed by their chunks' owners): a worker SIGKILLed while step 5 is
/// held closes its links to every other member. The daemon redoes the step on a group
/// admitted again; the two other workers join again by themselves and, with the one
/// started in the killed one's place, form the mesh again. The run ends with the
/// fingerprint of 4 threads.
#[test]
fn a_killed_worker_of_a_mesh_fails_the_group_and_the_others_join_again() {
    let dir = TempDir::new("cluster-mesh-kill");
    let steps = 10;
    let base = tiny_config("")
        .replace("batch_size = 4", "batch_size = 8")
        .replace("n_prototypes = 64", "n_prototypes = 4096");
    let (want, cfg) = threads_and_group(dir.path(), &base, 4, 4, "join_wait_s = 60.0\n", steps);
    let cfg = cfg.to_str().unwrap();
    let s2 = dir.path().join("s2");
    let (daemon, addr) = start_daemon(cfg, &s2, steps, &["--inject", "slow:teacher@5+2500"]);
    let worker = || Proc::start(&["worker", "--config", cfg, "--join", &addr]);
    let mut ws: Vec<Proc> = (0..3).map(|_| worker()).collect();
    for w in &mut ws {
        w.line_with(
            "with links to the other 2 worker(s)",
            Duration::from_secs(30),
        );
    }
    // into the hold of step 5 (steps take milliseconds here)
    let t0 = Instant::now();
    while t0.elapsed() < Duration::from_secs(30) {
        if status(&s2)["run"]["step"].as_u64().unwrap_or(0) >= 5 {
            break;
        }
        std::thread::sleep(Duration::from_millis(50));
    }
    let mut victim = ws.remove(1);
    victim.child.kill().unwrap();
    let _ = victim.child.wait();
    let stand_in = worker();
    let (code, err, _) = daemon.finish(Duration::from_secs(120));
    assert_eq!(code, Some(0), "{err}");
    assert_eq!(err.matches("all 4 nodes joined").count(), 2, "{err}");
    for w in ws.into_iter().chain([stand_in]) {
        let (code, werr, _) = w.finish(Duration::from_secs(30));
        assert_eq!(code, Some(0), "{werr}");
        assert!(werr.contains("the daemon ended the run"), "{werr}");
    }
    assert_eq!(fingerprint(&s2), want, "the mesh's redone step differs");
    let ev = events(&s2);
    assert!(
        ev.iter().any(|e| e["kind"] == "step.redo"
            && e["message"]
                .as_str()
                .unwrap_or("")
                .contains("connection closed")),
        "{ev:?}"
    );
}

/// A worker's GPU failing, drilled on the CPU (`dinod worker --inject`): a recoverable
/// error (an out-of-memory) fails the group, the worker joins again by itself and the
/// step is redone; a lost context (a sticky CUDA error, a GPU gone) ends the worker with
/// 75, the daemon redoes the step on a group admitted again, and the worker its
/// supervisor restarts joins it. The run ends where three threads end, bit for bit.
#[test]
fn a_workers_device_faults_make_it_join_again_or_exit_75_for_a_restart() {
    let dir = TempDir::new("cluster-worker-device");
    let steps = 10;
    let base = tiny_config("").replace("batch_size = 4", "batch_size = 6");
    let (want, cfg) = threads_and_group(dir.path(), &base, 3, 3, "join_wait_s = 60.0\n", steps);
    let cfg = cfg.to_str().unwrap();
    let s2 = dir.path().join("s2");
    let (daemon, addr) = start_daemon(cfg, &s2, steps, &[]);
    let worker = |extra: &[&str]| {
        Proc::start(&[&["worker", "--config", cfg, "--join", &addr][..], extra].concat())
    };
    let flaky = worker(&["--inject", "device_error@3"]);
    let mut lost = worker(&["--inject", "device_lost@6"]);
    // the supervisor's part: the worker that exits 75 is started again
    lost.line_with("this worker's device is unusable", Duration::from_secs(60));
    let (code, lerr, _) = lost.finish(Duration::from_secs(30));
    assert_eq!(code, Some(75), "{lerr}");
    assert!(
        lerr.contains("injected loss of this worker's device context at step 6"),
        "{lerr}"
    );
    let restarted = worker(&[]);
    let (code, err, _) = daemon.finish(Duration::from_secs(120));
    assert_eq!(code, Some(0), "{err}");
    // the first group, again after the recoverable error, again with the restarted worker
    assert_eq!(err.matches("all 3 nodes joined").count(), 3, "{err}");
    let (code, ferr, _) = flaky.finish(Duration::from_secs(30));
    assert_eq!(code, Some(0), "{ferr}");
    assert!(
        ferr.contains("injected device error at step 3") && ferr.contains("joining again"),
        "{ferr}"
    );
    let (code, rerr, _) = restarted.finish(Duration::from_secs(30));
    assert_eq!(code, Some(0), "{rerr}");
    assert_eq!(fingerprint(&s2), want, "the redone steps differ");
    // both failures were steps redone on the daemon's side, with the worker's reason
    let redos: Vec<String> = events(&s2)
        .into_iter()
        .filter(|e| e["kind"] == "step.redo")
        .map(|e| e["message"].as_str().unwrap_or("").to_string())
        .collect();
    for why in ["injected device error at step 3", "device context"] {
        assert!(redos.iter().any(|m| m.contains(why)), "{why}: {redos:?}");
    }
}

/// `runtime.cluster.min_nodes`: a group of 3 whose third node never comes forms with 2
/// once `join_wait_s` has run out and trains what 2 threads train, bit for bit (the
/// daemon's part of the batch, loaded for 3, loaded again for 2); when the third node
/// comes later, the next step forms the group of 3 again and the run goes on with it,
/// every copy checked against the daemon's at every step.
#[test]
fn a_short_group_trains_on_with_the_nodes_that_came_and_takes_back_the_one_that_returns() {
    let dir = TempDir::new("cluster-elastic");
    let steps = 8;
    let base = tiny_config("").replace("batch_size = 4", "batch_size = 6");
    // (2 threads: the group that forms without the third node)
    let (want, cfg) = threads_and_group(
        dir.path(),
        &base,
        2,
        3,
        "join_wait_s = 4.0\nmin_nodes = 2\nworker_data = \"local\"\n",
        steps,
    );
    let cfg = cfg.to_str().unwrap();
    let s2 = dir.path().join("s2");
    let (daemon, addr) = start_daemon(cfg, &s2, steps, &[]);
    let worker = || Proc::start(&["worker", "--config", cfg, "--join", &addr]);
    let w1 = worker();
    let (code, err, _) = daemon.finish(Duration::from_secs(120));
    assert_eq!(code, Some(0), "{err}");
    assert!(
        err.contains("2 of 3 nodes joined within 4 s: the group trains on without the others"),
        "{err}"
    );
    let (code, werr, _) = w1.finish(Duration::from_secs(30));
    assert_eq!(code, Some(0), "{werr}");
    assert!(werr.contains("as rank 1 of 2"), "{werr}");
    assert_eq!(fingerprint(&s2), want, "2 of 3 nodes differ from 2 threads");
    let ev = events(&s2);
    assert!(
        ev.iter().any(|e| e["kind"] == "cluster.short"
            && e["level"] == "warn"
            && e["fields"]["nodes"] == 2
            && e["fields"]["planned"] == 3),
        "{ev:?}"
    );
    let st = status(&s2);
    assert_eq!(
        st["run"]["device"], "cpu (2 of 3 data-parallel processes over TCP)",
        "{st}"
    );
    let c = &st["run"]["cluster"];
    assert_eq!(
        (c["nodes"].as_u64(), c["planned"].as_u64()),
        (Some(2), Some(3)),
        "{c}"
    );
    assert!(
        c["line"]
            .as_str()
            .unwrap_or("")
            .starts_with("2 of 3 nodes on 127.0.0.1:"),
        "{c}"
    );

    // resumed: the group forms short again, then the third node comes (during a held
    // step: it waits in the listener's backlog, for less than its join_wait_s) and the
    // next step's start admits it
    let more = steps + 8;
    // (a second, shorter hold at step 14: a worker slow to start on a loaded machine
    // still comes before the run ends, and waits less than its join_wait_s)
    let (mut daemon, addr) = start_daemon(
        cfg,
        &s2,
        more,
        &[
            "--inject",
            "slow:teacher@12+2000",
            "--inject",
            "slow:teacher@14+1500",
        ],
    );
    let worker = || Proc::start(&["worker", "--config", cfg, "--join", &addr]);
    let w1 = worker();
    daemon.line_with("2 of 3 nodes joined within", Duration::from_secs(60));
    let t0 = Instant::now();
    while status(&s2)["run"]["step"].as_u64().unwrap_or(0) < 12 {
        assert!(
            t0.elapsed() < Duration::from_secs(60),
            "never reached step 12"
        );
        std::thread::sleep(Duration::from_millis(50));
    }
    let w2 = worker();
    let (code, err, _) = daemon.finish(Duration::from_secs(120));
    assert_eq!(code, Some(0), "{err}");
    assert!(err.contains("is back"), "{err}");
    assert!(err.contains("all 3 nodes joined"), "{err}");
    for w in [w1, w2] {
        let (code, werr, _) = w.finish(Duration::from_secs(30));
        assert_eq!(code, Some(0), "{werr}");
        assert!(werr.contains("the daemon ended the run"), "{werr}");
    }
    let ev = events(&s2);
    let kinds: Vec<&str> = ev
        .iter()
        .filter_map(|e| e["kind"].as_str())
        .filter(|k| k.starts_with("cluster."))
        .collect();
    assert!(
        kinds.ends_with(&["cluster.short", "cluster.regroup", "cluster.complete"]),
        "{kinds:?}"
    );
    let st = status(&s2);
    assert_eq!(st["run"]["step"], more, "{st}");
    assert_eq!(st["run"]["cluster"]["nodes"], 3, "{st}");
    // (checked at every step: a copy that differed would have failed its step)
    assert_eq!(
        st["run"]["cluster"]["copies"]["verified_step"].as_u64(),
        Some(more - 1),
        "{st}"
    );
    assert!(
        !ev.iter()
            .any(|e| e["message"].as_str().unwrap_or("").contains("drifted")),
        "{ev:?}"
    );
}

/// Through the stage machine: probes every 2 steps switch the run to Gram anchoring (the
/// Gram teacher loaded from the best-dense checkpoint, refreshed on a schedule) and then
/// to high-resolution adaptation (larger crops). The daemon sends the Gram teacher to its
/// worker, which loads its own images at each stage's crops (`worker_data = "local"`), and
/// the group of processes follows the same stage path to the same bits as the group of
/// threads.
#[test]
fn a_group_of_processes_follows_the_stage_machine_as_threads_do() {
    let dir = TempDir::new("cluster-stages");
    // as tests/it/stages.rs: the stage machine reacts at once; with seed 5 a group's
    // locality drops early, so the run reaches Gram anchoring and high resolution
    let stages = crate::stages::eval().replace(
        "max_refreshes = 2",
        "max_refreshes = 2\nmin_steps = 0\nmax_steps = 3",
    ) + "[stages.high_res]\nsteps = 3\nlr_warmup_steps = 1\n";
    let base = tiny_config(&stages).replace("seed = 3", "seed = 5");
    let steps = 20;
    let want = threads_fingerprint(
        dir.path(),
        &format!("{base}\n[runtime]\ndata_parallel = 2\n"),
        steps,
    );
    let s1 = dir.path().join("s1");
    // the worker loads its own images: its part of each batch at the crops of each
    // stage, the Gram views included, as rank 0 cuts it from the whole batch (checked
    // against rank 0's digest of that part at every step)
    let cluster = write_config(
        dir.path(),
        &format!(
            "{base}\n{}",
            cluster_section(dir.path(), "127.0.0.1:0", 2, "worker_data = \"local\"\n")
        ),
    );
    let s2 = dir.path().join("s2");
    let (err, werrs) = run_group(cluster.to_str().unwrap(), &s2, steps, 1, &[]);
    assert!(
        werrs[0].contains("opening the data source synthetic"),
        "{}",
        werrs[0]
    );
    let path = |s: &Path| -> Vec<(u64, String)> {
        events(s)
            .into_iter()
            .filter(|e| e["kind"] == "stage.transition" || e["kind"] == "stage.gram_refresh")
            .map(|e| {
                (
                    e["step"].as_u64().unwrap_or(0),
                    e["message"].as_str().unwrap_or("").to_string(),
                )
            })
            .collect()
    };
    let (p1, p2) = (path(&s1), path(&s2));
    assert!(
        p1.iter().any(|(_, m)| m.contains("-> high_res")),
        "the threads never reached high resolution: {p1:?}"
    );
    assert_eq!(p1, p2, "the stage paths differ");
    // the workers' copies follow rank 0 by themselves (checked against rank 0's digest
    // at every step), a Gram teacher copied from the EMA teacher included: they make it
    // from their own teachers. The whole state goes at the start and for a Gram teacher
    // loaded from a checkpoint.
    let ev = events(&s2);
    let from_checkpoint = ev
        .iter()
        .filter(|e| {
            e["kind"] == "stage.transition"
                && !e["fields"]["gram_teacher"]["best_dense_checkpoint"].is_null()
        })
        .count();
    let from_teacher = ev
        .iter()
        .filter(|e| {
            e["kind"] == "stage.gram_refresh"
                || (e["kind"] == "stage.transition"
                    && !e["fields"]["gram_teacher"]["ema_teacher"].is_null())
        })
        .count();
    assert!(
        from_checkpoint >= 1 && from_teacher >= 1,
        "the run made no Gram teacher of each kind: {p2:?}"
    );
    let syncs = err.matches("sending the workers the whole state").count();
    assert_eq!(
        syncs,
        1 + from_checkpoint,
        "whole states sent for {p2:?} ({from_teacher} Gram teachers from the EMA teacher)"
    );
    assert_eq!(fingerprint(&s2), want, "processes and threads differ");
}

/// Three processes in bf16 (the device code path on the host: the copies' AdamW moments
/// are tensors) train what three threads train, bit for bit, with the workers' copies
/// checked against the daemon's digest at every step.
#[test]
fn three_processes_in_bf16_train_what_three_threads_train() {
    let dir = TempDir::new("cluster-three");
    // (4 096 prototypes: the heads' gradients are large enough for the mesh, and the
    // Sinkhorn-Knopp sums small enough for the star)
    let base = tiny_config("")
        .replace("precision = \"f32\"", "precision = \"bf16\"")
        .replace("batch_size = 4", "batch_size = 6")
        .replace("n_prototypes = 64", "n_prototypes = 4096");
    let steps = 8;
    let want = threads_fingerprint(
        dir.path(),
        &format!("{base}\n[runtime]\ndata_parallel = 3\n"),
        steps,
    );
    // the mesh (the default: the two workers link to each other and each member sums a
    // third of every gradient bucket), then the star
    for reduce in ["mesh", "star"] {
        let rdir = dir.path().join(reduce);
        std::fs::create_dir_all(&rdir).unwrap();
        let cluster = write_config(
            &rdir,
            &format!(
                "{base}\n{}",
                cluster_section(&rdir, "127.0.0.1:0", 3, &format!("reduce = \"{reduce}\"\n"))
            ),
        );
        let cluster = cluster.to_str().unwrap();
        let s2 = rdir.join("s2");
        // (the mesh's workers listen everywhere for each other, on ephemeral ports)
        let args: &[&str] = if reduce == "mesh" {
            &["--mesh-listen", "0.0.0.0"]
        } else {
            &[]
        };
        let (err, werrs) = run_group(cluster, &s2, steps, 2, args);
        assert!(
            err.contains("joined as rank 1 of 3") && err.contains("joined as rank 2 of 3"),
            "{err}"
        );
        for w in &werrs {
            assert_eq!(
                w.contains("with links to the other 1 worker(s)"),
                reduce == "mesh",
                "{reduce}: {w}"
            );
        }
        assert_eq!(
            err.matches("sending the workers the whole state").count(),
            1,
            "the copies were sent again: {err}"
        );
        assert_eq!(
            fingerprint(&s2),
            want,
            "three processes ({reduce}) and three threads differ"
        );
    }
}

/// The daemon of a group is SIGKILLed mid-run. Its worker stays up and
/// joins the daemon started again on the same address; the resumed run ends where the
/// fault-free group of threads ends, bit for bit, and the worker exits 0 with it. The
/// worker loads its own images: its loader, which had gone ahead, starts again at the
/// resumed batch.
#[test]
fn a_worker_outlives_a_killed_daemon_and_joins_its_restart() {
    let dir = TempDir::new("cluster-daemon-kill");
    let steps = 12;
    let want = threads_fingerprint(
        dir.path(),
        &tiny_config("[runtime]\ndata_parallel = 2\n"),
        steps,
    );
    // a fixed port: the restarted daemon must listen where the worker looks for it
    let port = std::net::TcpListener::bind("127.0.0.1:0")
        .unwrap()
        .local_addr()
        .unwrap()
        .port();
    let addr = format!("127.0.0.1:{port}");
    let metrics_port = std::net::TcpListener::bind("127.0.0.1:0")
        .unwrap()
        .local_addr()
        .unwrap()
        .port();
    let cluster = write_config(
        dir.path(),
        &tiny_config(&format!(
            "[runtime]\nmetrics_port = {metrics_port}\n{}",
            cluster_section(
                dir.path(),
                &addr,
                2,
                "join_wait_s = 60.0\nworker_data = \"local\"\n"
            )
        )),
    );
    let cluster = cluster.to_str().unwrap();
    let s2 = dir.path().join("s2");
    let (mut first, _) = start_daemon(cluster, &s2, steps, &["--inject", "slow:teacher@7+5000"]);
    let mut worker = Proc::start(&["worker", "--config", cluster, "--join", &addr]);
    worker.line_with("joined", Duration::from_secs(30));
    // into the hold of step 7: the checkpoint of step 6 is written
    let t0 = Instant::now();
    while status(&s2)["run"]["step"].as_u64().unwrap_or(0) < 7 {
        assert!(
            t0.elapsed() < Duration::from_secs(30),
            "the run never reached step 7"
        );
        std::thread::sleep(Duration::from_millis(50));
    }
    // Prometheus sees the group
    let m = scrape(metrics_port).unwrap();
    assert!(m.lines().any(|l| l == "dinod_cluster_nodes 2"), "{m}");
    first.child.kill().unwrap();
    let _ = first.child.wait();
    worker.line_with("joining again", Duration::from_secs(30));
    let (second, _) = start_daemon(cluster, &s2, steps, &[]);
    let (code, err, _) = second.finish(Duration::from_secs(60));
    assert_eq!(code, Some(0), "{err}");
    let (code, err, _) = worker.finish(Duration::from_secs(30));
    assert_eq!(code, Some(0), "{err}");
    assert_eq!(
        err.matches(&format!("joined {addr} as rank 1 of 2"))
            .count(),
        2,
        "{err}"
    );
    assert_eq!(fingerprint(&s2), want, "the resumed group run differs");
}

/// Images in `dir/imgs`: `n` real PNG files of 40 x 36 pixels, and (with `bad`) a
/// truncated JPEG and a file that is not an image; `salt` changes every pixel.
fn image_folder(dir: &Path, n: usize, salt: u32, bad: bool) {
    let root = dir.join("imgs");
    std::fs::create_dir_all(&root).unwrap();
    for i in 0..n as u32 {
        let img = image::RgbImage::from_fn(40, 36, |x, y| {
            image::Rgb([(x * 6 + i * 11 + salt) as u8, (y * 7) as u8, (30 * i) as u8])
        });
        img.save(root.join(format!("img{i:02}.png"))).unwrap();
    }
    if bad {
        let jpg = root.join("img99.jpg");
        image::RgbImage::from_pixel(40, 36, image::Rgb([9, 9, 9]))
            .save(&jpg)
            .unwrap();
        let bytes = std::fs::read(&jpg).unwrap();
        std::fs::write(&jpg, &bytes[..bytes.len() / 3]).unwrap();
        std::fs::write(root.join("garbage.png"), b"not a png").unwrap();
    }
}

/// `worker_data = "local"`: each worker opens the recipe's `data.source` itself (a
/// relative folder, so each process reads the one under its working directory) and
/// builds its part of every batch, bad files substituted as rank 0 substitutes them.
/// Workers whose data is not rank 0's are refused with the reason and exit 1 without
/// harming the run: no source at that path (at their start), another number of samples
/// (at their first order), the same number of other images (by the digest of their
/// part). Then a worker with the daemon's images joins, and the run ends where two
/// threads end, bit for bit.
#[test]
fn workers_loading_their_own_images_train_what_threads_train_and_other_data_is_refused() {
    let dir = TempDir::new("cluster-own-data");
    let [good, fewer, other, none] = ["good", "fewer", "other", "none"].map(|d| {
        let p = dir.path().join(d);
        std::fs::create_dir_all(&p).unwrap();
        p
    });
    image_folder(&good, 8, 0, true);
    image_folder(&fewer, 6, 0, true);
    image_folder(&other, 8, 1, true);
    let base = recipe("").replace("source = \"synthetic:0:32\"", "source = \"folder:imgs\"");
    assert!(base.contains("folder:imgs"));
    let steps = 6;
    let threads = write_config(
        dir.path(),
        &format!("{base}\n[runtime]\ndata_parallel = 2\n"),
    );
    let s1 = dir.path().join("s1");
    let run = |cfg: &Path, state: &Path, steps: u64| {
        Proc::start_in(
            &good,
            &[
                "run",
                "--config",
                cfg.to_str().unwrap(),
                "--state-dir",
                state.to_str().unwrap(),
                "--max-steps",
                &steps.to_string(),
            ],
        )
    };
    let (code, err, _) = run(&threads, &s1, steps).finish(Duration::from_secs(300));
    assert_eq!(code, Some(0), "{err}");
    let want = fingerprint(&s1);
    assert!(
        events(&s1).iter().any(|e| e["kind"] == "data.bad_input"),
        "the threads met no bad file"
    );

    let cluster_dir = dir.path().join("cluster");
    std::fs::create_dir_all(&cluster_dir).unwrap();
    let cfg = write_config(
        &cluster_dir,
        &format!(
            "{base}\n{}",
            cluster_section(dir.path(), "127.0.0.1:0", 2, "worker_data = \"local\"\n")
        ),
    );
    let s2 = dir.path().join("s2");
    let mut daemon = run(&cfg, &s2, steps);
    let addr = listening_addr(&mut daemon);
    let worker = |cwd: &Path| {
        Proc::start_in(
            cwd,
            &["worker", "--config", cfg.to_str().unwrap(), "--join", &addr],
        )
    };
    let refused = |cwd: &Path, why: &str| {
        let (code, err, _) = worker(cwd).finish(Duration::from_secs(120));
        assert_eq!(code, Some(1), "{err}");
        assert!(err.contains(why), "{err}");
    };
    refused(&none, "this worker cannot open the data source folder:imgs");
    refused(&fewer, "holds 8 samples, rank 0's 10");
    refused(&other, "differ from rank 0's");
    let good_worker = worker(&good);
    let (code, err, _) = daemon.finish(Duration::from_secs(300));
    assert_eq!(code, Some(0), "{err}");
    let (code, werr, _) = good_worker.finish(Duration::from_secs(30));
    assert_eq!(code, Some(0), "{werr}");
    assert!(werr.contains("skipped unreadable input"), "{werr}");
    assert_eq!(fingerprint(&s2), want, "processes and threads differ");
    assert_eq!(
        status(&s2)["run"]["cluster"]["copies"]["worker_data"],
        "local"
    );
    // the files the worker skipped are reported by the daemon too, by name and member,
    // as it reports its own
    let from_worker: Vec<serde_json::Value> = events(&s2)
        .into_iter()
        .filter(|e| e["kind"] == "data.bad_input" && e["fields"]["member"] == 1)
        .collect();
    assert!(!from_worker.is_empty(), "{:?}", events(&s2));
    for e in &from_worker {
        let path = e["fields"]["path"].as_str().unwrap_or("");
        assert!(
            e["message"].as_str().unwrap_or("").starts_with(&format!(
                "member 1 skipped unreadable input {path} in its part of batch "
            )),
            "{e}"
        );
        assert!(
            werr.contains(&format!("skipped unreadable input {path}")),
            "{path}: {werr}"
        );
    }
    assert!(
        status(&s2)["run"]["bad_inputs"].as_u64().unwrap_or(0) >= from_worker.len() as u64,
        "{}",
        status(&s2)
    );
    // the daemon said why the refused workers left
    assert!(err.contains("differ from rank 0's"), "{err}");
}
