//! Process-wide settings applied once at start-up, and the process's devices.

use std::collections::HashMap;
use std::sync::{Mutex, OnceLock};

/// The process's open devices, by name.
static DEVICES: OnceLock<Mutex<HashMap<String, candle_core::Device>>> = OnceLock::new();

/// The device named `spec` (`cpu`, `cuda`, `cuda:N`), opened once per process: candle
/// gives every `Device::new_cuda` call its own context handle, and tensors of two handles
/// cannot meet in one op, so the engine, the loader and the Gram-teacher loads must share
/// this one. Fails with a clear message in a build without CUDA or without the device.
pub fn device(spec: &str) -> anyhow::Result<candle_core::Device> {
    let spec = if spec == "cuda" { "cuda:0" } else { spec };
    let mut map = DEVICES
        .get_or_init(|| Mutex::new(HashMap::new()))
        .lock()
        .map_err(|_| anyhow::anyhow!("device table poisoned"))?;
    if let Some(d) = map.get(spec) {
        return Ok(d.clone());
    }
    let d = ops::portable::device(spec)?;
    map.insert(spec.to_string(), d.clone());
    Ok(d)
}

/// The devices a run computes on: `device` itself, or `cuda:0` .. `cuda:N-1` for a
/// data-parallel group of N on GPUs (the members on the CPU share the one `cpu`). A lost
/// device is back only when every one of them answers.
pub fn run_devices(device: &str, data_parallel: usize) -> Vec<String> {
    if data_parallel > 1 && device.starts_with("cuda") {
        (0..data_parallel).map(|i| format!("cuda:{i}")).collect()
    } else {
        vec![device.to_string()]
    }
}

/// Probes the device named `spec` after it was lost: forgets the process's handle, opens
/// it again and runs a small matmul whose result is read back and checked. On success the
/// new handle is the one [`device`] returns from now on (state moved to it afterwards
/// works); on failure the error says why (no device, driver error, wrong result).
pub fn reopen(spec: &str) -> anyhow::Result<candle_core::Device> {
    let key = if spec == "cuda" { "cuda:0" } else { spec };
    if let Some(m) = DEVICES.get() {
        m.lock()
            .map_err(|_| anyhow::anyhow!("device table poisoned"))?
            .remove(key);
    }
    let d = device(spec)?;
    let a = candle_core::Tensor::ones((16, 16), candle_core::DType::F32, &d)?;
    let s = a.matmul(&a)?.sum_all()?.to_scalar::<f32>()?;
    anyhow::ensure!(
        s == 4096.0,
        "the device answered a test matmul wrongly ({s} instead of 4096)"
    );
    Ok(d)
}

/// Keeps glibc from returning freed memory to the kernel after every step: the step
/// allocates and frees large activation buffers, and by default glibc unmaps buffers over
/// 128 KiB and trims the heap, which costs millions of page faults per minute. Measured
/// here: AdamW 300 -> 70 ms per step from this alone. Equivalent to
/// `GLIBC_TUNABLES=glibc.malloc.mmap_threshold=...:glibc.malloc.trim_threshold=...`, but
/// without depending on the user's environment.
///
/// One arena: the compute threads (rayon) would otherwise each get their own glibc arena,
/// whose heaps are at most 64 MiB and are grown and shrunk by mmap; buffers freed on one
/// thread and allocated on another then went back to the kernel every step. Measured on
/// the vit_small step: 2.0 M -> 0.66 M page faults per 5-step benchmark (the rest is the
/// first touch of the working set), median step 4440 -> 3728 ms (BENCHMARKS.md). The
/// step does few, large allocations, so one arena's lock is not contended.
pub fn tune_allocator() {
    #[cfg(all(target_os = "linux", target_env = "gnu"))]
    // SAFETY: mallopt only changes allocator parameters; called before any threads start.
    unsafe {
        const M_TRIM_THRESHOLD: libc::c_int = -1;
        const M_MMAP_THRESHOLD: libc::c_int = -3;
        const M_ARENA_MAX: libc::c_int = -8;
        libc::mallopt(M_MMAP_THRESHOLD, 256 << 20);
        libc::mallopt(M_TRIM_THRESHOLD, 1 << 30);
        libc::mallopt(M_ARENA_MAX, 1);
    }
}

#[cfg(test)]
mod tests {
    use super::run_devices;

    #[test]
    fn a_group_on_gpus_runs_on_one_device_per_member() {
        assert_eq!(run_devices("cpu", 1), ["cpu"]);
        assert_eq!(run_devices("cpu", 4), ["cpu"]);
        assert_eq!(run_devices("cuda:1", 1), ["cuda:1"]);
        assert_eq!(run_devices("cuda", 1), ["cuda"]);
        assert_eq!(run_devices("cuda", 3), ["cuda:0", "cuda:1", "cuda:2"]);
        assert_eq!(run_devices("cuda:0", 2), ["cuda:0", "cuda:1"]);
    }
}
