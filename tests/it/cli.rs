//! The CLI's offline commands: parity against the golden fixtures, config errors, data
//! scan on real broken files, the step benchmark's output.

use crate::support::*;

#[test]
fn parity_passes_on_the_golden_fixtures() {
    let g = golden();
    let files: Vec<String> = ["vit_forward", "losses", "train_step"]
        .iter()
        .map(|f| g.join(format!("{f}.safetensors")).display().to_string())
        .collect();
    let mut args = vec!["parity"];
    args.extend(files.iter().map(|s| s.as_str()));
    let o = dinod(&args);
    assert_eq!(o.status.code(), Some(0), "{}", text(&o));
    let out = String::from_utf8_lossy(&o.stdout);
    assert_eq!(out.matches("PASS").count(), 6, "{out}");
}

/// A one-shot command whose reader has gone (`dinod checkpoints | head -1`) ends the way
/// Unix tools do, by SIGPIPE, not with a panic about a broken pipe.
#[test]
fn a_closed_stdout_ends_a_command_quietly() {
    use std::os::unix::process::ExitStatusExt;
    let (reader, writer) = std::io::pipe().unwrap();
    drop(reader);
    let fixture = golden().join("losses.safetensors");
    let o = std::process::Command::new(bin())
        .args(["parity", &fixture.display().to_string()])
        .env("RUST_BACKTRACE", "0")
        .stdout(writer)
        .stderr(std::process::Stdio::piped())
        .output()
        .unwrap();
    let err = String::from_utf8_lossy(&o.stderr);
    assert!(!err.contains("panicked"), "{err}");
    assert_eq!(
        o.status.signal(),
        Some(libc::SIGPIPE),
        "{:?}: {err}",
        o.status
    );
}

/// A copy of a fixture with one reference value changed must fail, naming the tensor.
#[test]
fn parity_fails_on_a_tampered_fixture() {
    let dir = TempDir::new("parity");
    let bytes = std::fs::read(golden().join("losses.safetensors")).unwrap();
    let (_, meta) = safetensors::SafeTensors::read_metadata(&bytes).unwrap();
    let n = u64::from_le_bytes(bytes[..8].try_into().unwrap()) as usize;
    let info = meta.info("expect.loss.koleo").unwrap();
    let off = 8 + n + info.data_offsets.0;
    let mut tampered = bytes.clone();
    let v = f64::from_le_bytes(tampered[off..off + 8].try_into().unwrap());
    tampered[off..off + 8].copy_from_slice(&(v * 1.001).to_le_bytes());
    let p = dir.path().join("tampered.safetensors");
    std::fs::write(&p, tampered).unwrap();
    let o = dinod(&["parity", "--dtype", "f64", p.to_str().unwrap()]);
    assert_eq!(o.status.code(), Some(1), "{}", text(&o));
    let out = String::from_utf8_lossy(&o.stdout);
    assert!(
        out.contains("expect.loss.koleo") && out.contains("FAIL"),
        "{out}"
    );
}

/// An export that cannot be written completely (here the file-size limit: EFBIG, as a
/// full disk gives ENOSPC) fails with the path, leaves the previous export as it was and
/// no partial file; the next export replaces it.
#[test]
fn a_failed_export_leaves_the_previous_file_whole() {
    let dir = TempDir::new("export-full");
    let cfg = write_config(dir.path(), &tiny_config(""));
    let st = dir.path().join("state");
    let o = run_to(&cfg, &st, 2, &[]);
    assert_eq!(o.status.code(), Some(0), "{}", text(&o));
    let out = dir.path().join("out").join("w.safetensors");
    std::fs::create_dir(out.parent().unwrap()).unwrap();
    std::fs::write(&out, b"the previous export").unwrap();
    let args = [
        "export",
        "--state-dir",
        st.to_str().unwrap(),
        "--out",
        out.to_str().unwrap(),
    ];
    // SIGXFSZ ignored, so the write fails with EFBIG instead of killing the process
    let o = std::process::Command::new("sh")
        .arg("-c")
        .arg("trap '' XFSZ; ulimit -f 16; exec \"$0\" \"$@\"")
        .arg(bin())
        .args(args)
        .env("RUST_BACKTRACE", "0")
        .output()
        .unwrap();
    assert_eq!(o.status.code(), Some(1), "{}", text(&o));
    let t = text(&o);
    assert!(
        t.contains(&format!("writing {}", out.display())) && t.contains("too large"),
        "{t}"
    );
    assert_eq!(std::fs::read(&out).unwrap(), b"the previous export");
    let names = |d: &std::path::Path| -> Vec<String> {
        std::fs::read_dir(d)
            .unwrap()
            .map(|e| e.unwrap().file_name().to_string_lossy().into_owned())
            .collect()
    };
    assert_eq!(names(out.parent().unwrap()), ["w.safetensors"]);
    let o = dinod(&args);
    assert_eq!(o.status.code(), Some(0), "{}", text(&o));
    let bytes = std::fs::read(&out).unwrap();
    assert!(safetensors::SafeTensors::deserialize(&bytes).is_ok());
    assert_eq!(names(out.parent().unwrap()), ["w.safetensors"]);
}

#[test]
fn config_errors_are_all_reported_with_their_keys() {
    let dir = TempDir::new("cfg");
    let cfg = tiny_config("")
        .replace("batch_size = 4", "batch_size = 1\nbatch_sizee = 3")
        .replace("lr = 1e-3", "lr = -1.0")
        .replace("n_local = 2", "n_local = 2\nglobal_scalee = 1");
    let p = write_config(dir.path(), &cfg);
    let o = dinod(&[
        "run",
        "--config",
        p.to_str().unwrap(),
        "--state-dir",
        dir.path().join("s").to_str().unwrap(),
    ]);
    assert_eq!(o.status.code(), Some(2), "{}", text(&o));
    let err = String::from_utf8_lossy(&o.stderr);
    for key in ["train.batch_sizee", "data.crops.global_scalee"] {
        assert!(err.contains(key), "missing {key} in:\n{err}");
    }
    assert!(
        !dir.path().join("s").exists(),
        "a bad config must not create state"
    );
}

#[test]
fn config_value_errors_are_listed_together() {
    let dir = TempDir::new("cfg2");
    let cfg = tiny_config("")
        .replace("batch_size = 4", "batch_size = 1")
        .replace("lr = 1e-3", "lr = -1.0")
        .replace(
            "patch_size = 8\n[checkpoint]",
            "patch_size = 16\n[checkpoint]",
        );
    let p = write_config(dir.path(), &cfg);
    let o = dinod(&[
        "run",
        "--config",
        p.to_str().unwrap(),
        "--state-dir",
        dir.path().join("s").to_str().unwrap(),
    ]);
    assert_eq!(o.status.code(), Some(2), "{}", text(&o));
    let err = String::from_utf8_lossy(&o.stderr);
    for key in ["train.batch_size", "train.lr", "data.masks.patch_size"] {
        assert!(err.contains(key), "missing {key} in:\n{err}");
    }
}

/// A command line `run` or `worker` cannot act on is a usage error (exit 2, as a bad
/// config), said with the flag, and creates no state.
#[test]
fn bad_run_and_worker_flags_are_usage_errors() {
    let dir = TempDir::new("usage");
    let p = write_config(dir.path(), &tiny_config(""));
    let (cfg, state) = (p.to_str().unwrap(), dir.path().join("s"));
    let run = |extra: &[&str]| {
        dinod(
            &[
                &[
                    "run",
                    "--config",
                    cfg,
                    "--state-dir",
                    state.to_str().unwrap(),
                ],
                extra,
            ]
            .concat(),
        )
    };
    for (extra, says) in [
        (&["--inject", "melt@3"][..], "--inject: "),
        (&["--inject", "nan@x"][..], "--inject: "),
        (&["--inject", "drift@4"][..], "--inject: "),
        (&["--data", "nowhere:at/all"][..], "--data nowhere:at/all"),
        (
            &["--checkpoint-every", "0"][..],
            "--checkpoint-every must be at least 1",
        ),
    ] {
        let o = run(extra);
        assert_eq!(o.status.code(), Some(2), "{extra:?}: {}", text(&o));
        assert!(text(&o).contains(says), "{extra:?}: {}", text(&o));
        assert!(!state.exists(), "{extra:?} created state");
    }
    // a worker takes only the drills of its copy and of its device
    let group_recipe = |sub: &str, extra: &str| {
        let c = dir.path().join(sub);
        std::fs::create_dir_all(&c).unwrap();
        write_config(
            &c,
            &format!(
                "{}\n[runtime.cluster]\nlisten = \"127.0.0.1:0\"\nnodes = 2\ntoken_file = \"{}\"\n",
                tiny_config(extra),
                dir.path().join("token").display()
            ),
        )
    };
    let cluster = group_recipe("c", "");
    std::fs::write(dir.path().join("token"), "a-token-for-the-usage-test").unwrap();
    // (and where it listens for the other workers is a numeric address)
    for (flag, bad, says) in [
        ("--inject", "nan@3", "--inject: "),
        ("--inject", "drift@", "--inject: "),
        (
            "--inject",
            "device_error:trainer@3",
            "not `device_error:trainer`",
        ),
        ("--inject", "slow:ema@3+100", "not `slow:ema`"),
        ("--mesh-listen", "node-3:7710", "not IP or IP:PORT"),
        ("--mesh-advertise", "node-3", "not HOST:PORT"),
        // another GPU, for a recipe on GPUs only: every member on the daemon's kind
        ("--device", "cuda:1", "the recipe computes on `cpu`"),
        ("--device", "gpu1", "`cuda` or `cuda:N`, not `gpu1`"),
        ("--device", "cpu", "`cuda` or `cuda:N`, not `cpu`"),
    ] {
        let o = dinod(&[
            "worker",
            "--config",
            cluster.to_str().unwrap(),
            "--join",
            "127.0.0.1:9",
            flag,
            bad,
        ]);
        assert_eq!(o.status.code(), Some(2), "{bad}: {}", text(&o));
        assert!(text(&o).contains(says), "{bad}: {}", text(&o));
    }
    // a GPU recipe is a group's recipe too; a worker that cannot open its GPU ends at
    // once, before it joins, with the reason (here: a build without CUDA)
    let gpu = group_recipe("g", "[runtime]\ndevice = \"cuda\"");
    let o = dinod(&[
        "worker",
        "--config",
        gpu.to_str().unwrap(),
        "--join",
        "127.0.0.1:9",
        "--device",
        "cuda:1",
    ]);
    assert_eq!(o.status.code(), Some(1), "{}", text(&o));
    assert!(
        text(&o).contains("device `cuda:1`: this dinod was built without CUDA support"),
        "{}",
        text(&o)
    );
}

#[test]
fn data_scan_reports_every_bad_file() {
    let dir = TempDir::new("scan");
    let imgs = dir.path().join("imgs/cats");
    std::fs::create_dir_all(&imgs).unwrap();
    // two real images, then broken ones
    let good = image::RgbImage::from_fn(40, 30, |x, y| {
        image::Rgb([(x * 6) as u8, (y * 8) as u8, 90])
    });
    good.save(imgs.join("a.png")).unwrap();
    good.save(imgs.join("b.jpg")).unwrap();
    let jpg = std::fs::read(imgs.join("b.jpg")).unwrap();
    std::fs::write(imgs.join("truncated.jpg"), &jpg[..jpg.len() / 3]).unwrap();
    std::fs::write(imgs.join("garbage.png"), b"this is not a png at all").unwrap();
    std::fs::write(imgs.join("empty.jpg"), b"").unwrap();
    let spec = format!("folder:{}", dir.path().join("imgs").display());
    let o = dinod(&["data", "scan", &spec]);
    assert_eq!(o.status.code(), Some(1), "{}", text(&o));
    let out = String::from_utf8_lossy(&o.stdout);
    for f in ["truncated.jpg", "garbage.png", "empty.jpg"] {
        assert!(out.contains(f), "scan does not name {f}:\n{out}");
    }
    assert!(out.contains("2 readable"), "{out}");
    // a quick check: 2 samples spread over the 5, so the last file is read too
    let o = dinod(&[
        "data",
        "scan",
        &spec,
        "--limit",
        "2",
        "--workers",
        "1",
        "--json",
    ]);
    assert_eq!(o.status.code(), Some(1), "{}", text(&o));
    let r: serde_json::Value = serde_json::from_slice(&o.stdout).expect("json");
    assert_eq!(
        (r["scanned"].as_u64(), r["spread"].as_bool()),
        (Some(2), Some(true)),
        "{r}"
    );
    assert_eq!(r["listed"].as_u64(), Some(5), "{r}");
    let o = dinod(&["data", "scan", &spec, "--limit", "0"]);
    assert_eq!(o.status.code(), Some(2), "{}", text(&o));
}

/// An error says its cause once: the crates' errors carry their causes in their messages,
/// so they do not also chain them (which `dinod: error: {:#}` would print again).
#[test]
fn an_error_names_its_cause_once() {
    let dir = TempDir::new("cause-once");
    let missing = dir.path().join("missing");
    let fixture = dir.path().join("missing.safetensors");
    let folder = format!("folder:{}", missing.display());
    for args in [
        vec!["data", "scan", folder.as_str()],
        vec!["parity", fixture.to_str().unwrap()],
    ] {
        let o = dinod(&args);
        let err = String::from_utf8_lossy(&o.stderr);
        assert_ne!(o.status.code(), Some(0), "{args:?}");
        assert_eq!(
            err.matches("No such file or directory").count(),
            1,
            "{args:?}: {err}"
        );
    }
}

#[test]
fn bench_step_reports_the_fields_benchmarks_need() {
    let dir = TempDir::new("bench");
    let p = write_config(dir.path(), &tiny_config(""));
    let o = dinod(&[
        "bench",
        "step",
        "--config",
        p.to_str().unwrap(),
        "--warmup",
        "1",
        "--iters",
        "3",
        "--json",
    ]);
    assert_eq!(o.status.code(), Some(0), "{}", text(&o));
    let v: serde_json::Value = serde_json::from_slice(&o.stdout).unwrap();
    for k in ["median_ms", "images_per_s", "gflops", "peak_rss_mib"] {
        assert!(
            v[k].as_f64().is_some_and(|x| x > 0.0),
            "{k} missing or not positive in {v}"
        );
    }
    let phases: Vec<String> = v["phases_ms"]
        .as_array()
        .unwrap()
        .iter()
        .map(|p| p[0].as_str().unwrap().to_string())
        .collect();
    assert_eq!(
        phases,
        [
            "teacher",
            "gram_teacher",
            "student_forward",
            "losses",
            "backward",
            "optimizer",
            "ema"
        ]
    );
}

#[test]
fn bench_dp_keeps_the_members_identical_and_equal_to_one_member() {
    let dir = TempDir::new("bench-dp");
    // KoLeo and drop path are per member (as in the official code): off, the group step
    // is the one-member step on the whole batch up to rounding
    let recipe = tiny_config("[model.loss]\nkoleo_loss_weight = 0.0\n")
        .replace("drop_path = 0.2", "drop_path = 0.0");
    let p = write_config(dir.path(), &recipe);
    let cfg = p.to_str().unwrap();
    let o = dinod(&[
        "bench",
        "dp",
        "--config",
        cfg,
        "--members",
        "2",
        "--iters",
        "2",
        "--check",
    ]);
    assert_eq!(o.status.code(), Some(0), "{}", text(&o));
    let v: serde_json::Value = serde_json::from_slice(&o.stdout).unwrap();
    assert_eq!(v["members"], 2);
    assert_eq!(v["members_identical"], true, "{v}");
    let d = v["max_rel_vs_single"].as_f64().unwrap();
    assert!(d < 1e-5, "two members differ from one by {d:e}");
    assert!(v["median_ms"].as_f64().unwrap() > 0.0);
    // a batch that does not split, and a GPU group in a CPU build: clear refusals
    let o = dinod(&["bench", "dp", "--config", cfg, "--members", "3"]);
    assert_eq!(o.status.code(), Some(1), "{}", text(&o));
    assert!(
        text(&o).contains("does not split into 3 members"),
        "{}",
        text(&o)
    );
    let o = dinod(&["bench", "dp", "--config", cfg, "--device", "cuda"]);
    assert_ne!(o.status.code(), Some(0), "{}", text(&o));
    assert!(text(&o).contains("cuda"), "{}", text(&o));
}

/// `dinod bench linear`: every biased layer of the vit_base/16 step timed both ways, and
/// rounding once is what it claims: within bf16's unit roundoff of the f64 product (2^-8,
/// relative to the largest output) and closer on average than rounding twice.
#[test]
fn bench_linear_times_both_roundings_and_rounding_once_is_closer() {
    let o = dinod(&[
        "bench",
        "linear",
        "--rows-div",
        "256",
        "--warmup",
        "0",
        "--iters",
        "1",
    ]);
    assert_eq!(o.status.code(), Some(0), "{}", text(&o));
    let v: serde_json::Value = serde_json::from_slice(&o.stdout).unwrap();
    let layers = v["layers"].as_array().unwrap();
    assert_eq!(layers.len(), 7, "{v}");
    for l in layers {
        let f = |k: &str| {
            l[k].as_f64()
                .unwrap_or_else(|| panic!("{k} missing in {l}"))
        };
        assert!(f("bf16_ms") > 0.0 && f("f32_round_once_ms") > 0.0, "{l}");
        assert!(f("f32_round_once_err_max") <= 2f64.powi(-8), "{l}");
        assert!(f("f32_round_once_err_mean") < f("bf16_err_mean"), "{l}");
    }
}

/// `dinod bench probes`: every probe of a set with label maps and of a labelled folder
/// without them is timed, and the memory it reports is what the sets hold: one byte per
/// pixel and channel (the normalised floats are made batch by batch).
#[test]
fn bench_probes_times_every_probe_and_reports_the_sets_memory() {
    let dir = TempDir::new("bench-probes");
    let (folder, _) = image_folder_with_bad_files(dir.path(), 24);
    let recipe = format!(
        "{}{}\n[[eval.sets]]\nname = \"photos\"\ntrain = \"{folder}\"\nsize = 32\nn_train = 12\nn_test = 8\n",
        tiny_config(""),
        tiny_eval(10)
    );
    let p = write_config(dir.path(), &recipe);
    let o = dinod(&["bench", "probes", "--config", p.to_str().unwrap(), "--json"]);
    assert_eq!(o.status.code(), Some(0), "{}", text(&o));
    let v: serde_json::Value = serde_json::from_slice(&o.stdout).unwrap();
    let sets = v["sets"].as_array().unwrap();
    let names: Vec<&str> = sets.iter().map(|s| s["name"].as_str().unwrap()).collect();
    assert_eq!(names, ["scenes", "photos"], "{v}");
    let t = |i: usize, k: &str| sets[i]["timing"][k].as_f64().unwrap();
    for i in 0..2 {
        for k in [
            "extract_ms",
            "knn_ms",
            "linear_ms",
            "locality_ms",
            "correspondence_ms",
        ] {
            assert!(t(i, k) > 0.0, "{k} of set {i} in {v}");
        }
    }
    assert!(t(0, "dense_ms") > 0.0 && t(1, "dense_ms") == 0.0, "{v}");
    // the scenes with their label maps and the photos that could be read (the folder's
    // two bad files are left out), all 32 x 32: 4 bytes a pixel for the scenes (3 channels
    // and the map), 3 for the photos, 4 bytes per label
    let n = |i: usize| sets[i]["n_train"].as_u64().unwrap() + sets[i]["n_test"].as_u64().unwrap();
    assert_eq!(n(0), 48);
    let want =
        (n(0) * 32 * 32 * 4 + n(1) * 32 * 32 * 3 + 4 * (n(0) + n(1))) as f64 / (1 << 20) as f64;
    let got = v["sets_mib"].as_f64().unwrap();
    assert!(
        (got - want).abs() < 1e-9,
        "sets hold {got} MiB, want {want}"
    );
    for k in [
        "build_ms",
        "probe_ms",
        "rss_after_build_mib",
        "probe_peak_rss_mib",
    ] {
        assert!(v[k].as_f64().is_some_and(|x| x > 0.0), "{k} in {v}");
    }
    assert_eq!(
        (v["embed_dim"].as_u64(), v["device"].as_str()),
        (Some(32), Some("cpu"))
    );
    // a recipe without probe sets is refused by name
    let bare = write_config(dir.path(), &tiny_config(""));
    let o = dinod(&["bench", "probes", "--config", bare.to_str().unwrap()]);
    assert_ne!(o.status.code(), Some(0));
    assert!(text(&o).contains("no [[eval.sets]]"), "{}", text(&o));
}
