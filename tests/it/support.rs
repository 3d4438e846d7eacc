//! Helpers for the end-to-end tests: the binary, temporary state directories, configs.

use std::path::{Path, PathBuf};
use std::process::{Child, Command, Output, Stdio};
use std::time::{Duration, Instant};

/// The `dinod` binary under test.
pub fn bin() -> PathBuf {
    PathBuf::from(env!("CARGO_BIN_EXE_dinod"))
}

/// Repository root.
pub fn root() -> PathBuf {
    PathBuf::from(env!("CARGO_MANIFEST_DIR"))
}

/// The golden fixtures directory.
pub fn golden() -> PathBuf {
    std::env::var_os("DINOD_GOLDEN")
        .map(PathBuf::from)
        .unwrap_or_else(|| root().join("../shared/golden"))
}

/// A fresh temporary directory (removed on drop).
pub struct TempDir(pub PathBuf);

impl TempDir {
    /// Creates `/tmp/dinod-it-<name>-<pid>-<n>`.
    pub fn new(name: &str) -> Self {
        static N: std::sync::atomic::AtomicU32 = std::sync::atomic::AtomicU32::new(0);
        let n = N.fetch_add(1, std::sync::atomic::Ordering::SeqCst);
        let p = std::env::temp_dir().join(format!("dinod-it-{name}-{}-{n}", std::process::id()));
        let _ = std::fs::remove_dir_all(&p);
        std::fs::create_dir_all(&p).unwrap();
        Self(p)
    }
    /// The path.
    pub fn path(&self) -> &Path {
        &self.0
    }
}

impl Drop for TempDir {
    fn drop(&mut self) {
        let _ = std::fs::remove_dir_all(&self.0);
    }
}

/// A tiny recipe for fast end-to-end runs (a few ms per step).
pub fn tiny_config(extra: &str) -> String {
    format!(
        r#"
seed = 3
precision = "f32"
[model]
preset = "vit_pico"
[model.backbone]
embed_dim = 32
depth = 2
num_heads = 2
patch_size = 8
drop_path = 0.2
rope_rescale = 2.0
[model.dino_head]
hidden_dim = 32
bottleneck_dim = 16
n_prototypes = 64
[model.ibot_head]
hidden_dim = 32
bottleneck_dim = 16
n_prototypes = 64
[train]
batch_size = 4
lr = 1e-3
warmup_steps = 3
freeze_last_layer_steps = 2
teacher_temp_warmup_steps = 5
[data]
source = "synthetic:0:32"
prefetch = 2
n_workers = 1
[data.crops]
global_size = 32
local_size = 16
n_local = 2
[data.masks]
patch_size = 8
[checkpoint]
every_steps = 3
keep_last = 2
{extra}
"#
    )
}

/// Writes a config file into `dir`.
pub fn write_config(dir: &Path, text: &str) -> PathBuf {
    let p = dir.join("config.toml");
    std::fs::write(&p, text).unwrap();
    p
}

/// Runs `dinod ARGS` to completion.
pub fn dinod(args: &[&str]) -> Output {
    Command::new(bin())
        .args(args)
        .env("RUST_LOG", "warn")
        .env("RUST_BACKTRACE", "0")
        // no tar-shard index cache in the user's home; the tests that want one set it
        .env("DINOD_CACHE_DIR", "off")
        .output()
        .unwrap()
}

/// Starts `dinod ARGS` in the background.
pub fn spawn(args: &[&str]) -> Child {
    spawn_in(Path::new("."), args)
}

/// Starts `dinod ARGS` in the background, in the working directory `dir` (where the
/// relative paths of a recipe point).
pub fn spawn_in(dir: &Path, args: &[&str]) -> Child {
    Command::new(bin())
        .current_dir(dir)
        .args(args)
        .env("RUST_LOG", "info")
        .env("RUST_BACKTRACE", "0")
        .env("DINOD_CACHE_DIR", "off")
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .unwrap()
}

/// Waits for a child with a timeout; kills it if it overruns.
pub fn wait_timeout(child: &mut Child, limit: Duration) -> Option<std::process::ExitStatus> {
    let t0 = Instant::now();
    loop {
        if let Some(s) = child.try_wait().unwrap() {
            return Some(s);
        }
        if t0.elapsed() > limit {
            let _ = child.kill();
            let _ = child.wait();
            return None;
        }
        std::thread::sleep(Duration::from_millis(20));
    }
}

/// Text of an output.
pub fn text(o: &Output) -> String {
    format!(
        "status {:?}\nstdout:\n{}\nstderr:\n{}",
        o.status.code(),
        String::from_utf8_lossy(&o.stdout),
        String::from_utf8_lossy(&o.stderr)
    )
}

/// The F32 tensors of a safetensors file's bytes, by name, as f64.
pub fn f32_tensors(bytes: &[u8]) -> std::collections::BTreeMap<String, Vec<f64>> {
    let st = safetensors::SafeTensors::deserialize(bytes).unwrap();
    st.tensors()
        .into_iter()
        .map(|(n, t)| {
            assert_eq!(t.dtype(), safetensors::Dtype::F32, "{n}");
            let v = t
                .data()
                .chunks_exact(4)
                .map(|b| f32::from_le_bytes([b[0], b[1], b[2], b[3]]) as f64)
                .collect();
            (n, v)
        })
        .collect()
}

/// The largest absolute difference between two sets of tensors with the same names and
/// shapes, relative to the largest magnitude in `a`.
pub fn max_rel_diff(
    a: &std::collections::BTreeMap<String, Vec<f64>>,
    b: &std::collections::BTreeMap<String, Vec<f64>>,
) -> f64 {
    assert_eq!(
        a.keys().collect::<Vec<_>>(),
        b.keys().collect::<Vec<_>>(),
        "different tensors"
    );
    let scale = a.values().flatten().fold(0.0f64, |m, v| m.max(v.abs()));
    let diff = a
        .iter()
        .map(|(n, x)| {
            assert_eq!(x.len(), b[n].len(), "{n}");
            x.iter()
                .zip(&b[n])
                .fold(0.0f64, |m, (p, q)| m.max((p - q).abs()))
        })
        .fold(0.0f64, f64::max);
    diff / scale
}

/// A folder of real images for `--data folder:DIR`: `good` small PNG and JPEG files in two
/// class sub-folders, plus a truncated JPEG and a file that is not an image at all. Returns
/// the `folder:` spec and the names of the two bad files.
pub fn image_folder_with_bad_files(dir: &Path, good: usize) -> (String, [&'static str; 2]) {
    let root = dir.join("imgs");
    for (i, class) in (0..good).map(|i| (i, ["cats", "dogs"][i % 2])) {
        let d = root.join(class);
        std::fs::create_dir_all(&d).unwrap();
        let img = image::RgbImage::from_fn(48, 40, |x, y| {
            image::Rgb([(x * 5 + i as u32 * 9) as u8, (y * 6) as u8, (40 * i) as u8])
        });
        let ext = if i % 3 == 0 { "jpg" } else { "png" };
        img.save(d.join(format!("img{i:02}.{ext}"))).unwrap();
    }
    let jpg = std::fs::read(root.join("cats/img00.jpg")).unwrap();
    std::fs::write(root.join("cats/truncated.jpg"), &jpg[..jpg.len() / 3]).unwrap();
    std::fs::write(root.join("dogs/garbage.png"), b"this is not a png at all").unwrap();
    (
        format!("folder:{}", root.display()),
        ["truncated.jpg", "garbage.png"],
    )
}

/// The tiny probe sets of the end-to-end tests (scenes of 32 px), probed every `every`
/// steps: an `[eval]` section to append to a recipe.
pub fn tiny_eval(every: u64) -> String {
    format!(
        r#"
[eval]
every_steps = {every}
[[eval.sets]]
name = "scenes"
train = "synthetic:11:32"
test = "synthetic:12:32"
size = 32
n_train = 32
n_test = 16
[eval.probes]
knn_k = 5
linear_iters = 10
dense_iters = 10
locality_images = 8
batch = 16
[eval.probes.correspondence]
images = 4
"#
    )
}

/// The directory of the newest checkpoint in a state directory (a run's, or a
/// distillation student's `STATE/students/NAME`).
pub fn newest_checkpoint(state: &Path) -> PathBuf {
    std::fs::read_dir(state.join("checkpoints"))
        .unwrap()
        .map(|e| e.unwrap().path())
        .filter(|p| {
            p.file_name()
                .unwrap()
                .to_str()
                .unwrap()
                .starts_with("step-")
        })
        .max()
        .unwrap()
}

/// Flips one byte in the middle of the student tensors of the newest checkpoint in a
/// state directory.
pub fn corrupt_newest_checkpoint(state: &Path) {
    let f = newest_checkpoint(state).join("student.safetensors");
    let mut bytes = std::fs::read(&f).unwrap();
    let i = bytes.len() / 2;
    bytes[i] ^= 0x40;
    std::fs::write(&f, bytes).unwrap();
}

/// `dinod checkpoints list --json` of a state directory: one row per checkpoint, the
/// run's and then each student's (with a `student` field).
pub fn checkpoint_rows(state: &Path) -> Vec<serde_json::Value> {
    let o = dinod(&[
        "checkpoints",
        "list",
        "--json",
        "--state-dir",
        state.to_str().unwrap(),
    ]);
    assert_eq!(o.status.code(), Some(0), "{}", text(&o));
    serde_json::from_slice(&o.stdout).unwrap()
}

/// `dinod run --config CFG --state-dir STATE --max-steps STEPS EXTRA...` to completion.
pub fn run_to(cfg: &Path, state: &Path, steps: u64, extra: &[&str]) -> std::process::Output {
    let mut args = vec![
        "run",
        "--config",
        cfg.to_str().unwrap(),
        "--state-dir",
        state.to_str().unwrap(),
    ];
    let s = steps.to_string();
    args.extend(["--max-steps", s.as_str()]);
    args.extend(extra);
    dinod(&args)
}

/// The tensors of `dinod export --which WHICH [--with-heads]` of a state directory.
pub fn export_which(
    state: &Path,
    which: &str,
    heads: bool,
    out: &Path,
) -> std::collections::BTreeMap<String, Vec<f64>> {
    let mut args = vec![
        "export",
        "--state-dir",
        state.to_str().unwrap(),
        "--which",
        which,
        "--out",
        out.to_str().unwrap(),
    ];
    if heads {
        args.push("--with-heads");
    }
    let o = dinod(&args);
    assert_eq!(o.status.code(), Some(0), "{}", text(&o));
    f32_tensors(&std::fs::read(out).unwrap())
}

/// `GET /metrics` on a port, as Prometheus scrapes it.
pub fn scrape(port: u16) -> std::io::Result<String> {
    use std::io::{Read, Write};
    let mut c = std::net::TcpStream::connect(("127.0.0.1", port))?;
    c.set_read_timeout(Some(Duration::from_secs(10)))?;
    c.write_all(b"GET /metrics HTTP/1.0\r\nHost: 127.0.0.1\r\n\r\n")?;
    let mut body = String::new();
    c.read_to_string(&mut body)?;
    Ok(body)
}

/// `dinod status --json` of a state directory (the daemon's answer, or the catalog's).
pub fn status(state: &Path) -> serde_json::Value {
    let o = dinod(&["status", "--json", "--state-dir", state.to_str().unwrap()]);
    assert_eq!(o.status.code(), Some(0), "{}", text(&o));
    serde_json::from_slice(&o.stdout).unwrap()
}

/// The step and the state's fingerprint at the last checkpoint ("" without one).
pub fn fingerprint(state: &Path) -> (u64, String) {
    let s = status(state);
    (
        s["run"]["step"].as_u64().unwrap(),
        s["run"]["fingerprint"].as_str().unwrap_or("").to_string(),
    )
}

/// Every event of a state directory's catalog (up to 1000), as JSON.
pub fn events(state: &Path) -> Vec<serde_json::Value> {
    let o = dinod(&[
        "events",
        "--json",
        "--limit",
        "1000",
        "--state-dir",
        state.to_str().unwrap(),
    ]);
    assert_eq!(o.status.code(), Some(0), "{}", text(&o));
    String::from_utf8_lossy(&o.stdout)
        .lines()
        .filter_map(|l| serde_json::from_str(l).ok())
        .collect()
}
