//! The accelerator's health as the compute actors saw it, and the probe that tells
//! whether a lost device is back. The compute actors mark the device lost when a step
//! fails with a context-losing error (or an injected `device_lost`); the coordinator
//! applies `runtime.on_gpu_loss` before it runs another step.

use std::sync::Mutex;
use std::time::{Duration, Instant};

use anyhow::{bail, Result};

/// Why and since when the device is lost.
#[derive(Clone, Debug)]
pub struct Lost {
    /// The error that lost it.
    pub why: String,
    /// When it was reported.
    pub since: Instant,
    /// An injected loss keeps probes failing until this time.
    pub injected_until: Option<Instant>,
}

/// Shared by the compute actors (who report) and the coordinator (who acts).
#[derive(Default, Debug)]
pub struct DeviceHealth {
    lost: Mutex<Option<Lost>>,
    /// The last loss a compute actor reported, and when: the supervisor's later report
    /// of the same failure (it sees the actor die after the coordinator may already have
    /// handled the loss) must not start a second episode.
    reported: Mutex<Vec<(String, Instant)>>,
}

/// How long a compute actor's report covers the supervisor's report of the same failure.
const SAME_FAILURE: Duration = Duration::from_secs(60);

impl DeviceHealth {
    fn slot(&self) -> std::sync::MutexGuard<'_, Option<Lost>> {
        match self.lost.lock() {
            Ok(g) => g,
            Err(e) => e.into_inner(),
        }
    }

    /// Records a loss; the first report of an episode wins (a second actor failing on the
    /// same dead context adds nothing). `injected_for`: an injected loss keeps the device
    /// away this long.
    pub fn mark_lost(&self, why: &str, injected_for: Option<Duration>) {
        if let Ok(mut r) = self.reported.lock() {
            r.retain(|(_, at)| at.elapsed() < SAME_FAILURE);
            r.push((why.to_string(), Instant::now()));
        }
        let mut g = self.slot();
        if g.is_none() {
            let now = Instant::now();
            *g = Some(Lost {
                why: why.to_string(),
                since: now,
                injected_until: injected_for.map(|d| now + d),
            });
        }
    }

    /// The supervisor's report of an actor that failed with a lost context, `why` being
    /// the fault's own message (`DeviceFault::Lost`). A failure a compute actor reported
    /// in the last minute with the same message is the same episode and is not reported
    /// again; anything else is marked as `mark_lost` does.
    pub fn mark_lost_by_supervisor(&self, why: &str) {
        let known = self.reported.lock().is_ok_and(|r| {
            r.iter()
                .any(|(m, at)| m == why && at.elapsed() < SAME_FAILURE)
        });
        if known {
            return;
        }
        let mut g = self.slot();
        if g.is_none() {
            *g = Some(Lost {
                why: why.to_string(),
                since: Instant::now(),
                injected_until: None,
            });
        }
    }

    /// The current loss, if the device is lost.
    pub fn lost(&self) -> Option<Lost> {
        self.slot().clone()
    }

    /// The device is usable again.
    pub fn clear(&self) {
        *self.slot() = None;
    }

    /// Whether the device named `spec` works again: opens it afresh and runs a checked
    /// matmul on it (blocking; call off the async runtime).
    pub fn probe(&self, spec: &str) -> Result<()> {
        if let Some(until) = self.slot().as_ref().and_then(|l| l.injected_until) {
            if Instant::now() < until {
                bail!("{spec} is still unavailable (injected)");
            }
        }
        crate::runtime::reopen(spec).map(|_| ())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_first_report_wins_and_an_injected_loss_lasts_its_time() {
        let h = DeviceHealth::default();
        assert!(h.lost().is_none());
        h.mark_lost("first", Some(Duration::from_millis(150)));
        h.mark_lost("second", None);
        assert_eq!(h.lost().unwrap().why, "first");
        assert!(h.probe("cpu").is_err(), "injected: still away");
        std::thread::sleep(Duration::from_millis(200));
        h.probe("cpu")
            .expect("the CPU answers once the injected loss is over");
        h.clear();
        assert!(h.lost().is_none());
        // the supervisor reports the same failure after it was handled: nothing new
        h.mark_lost_by_supervisor("first");
        h.mark_lost_by_supervisor("second");
        assert!(h.lost().is_none());
        // a failure no compute actor reported is a loss, even if its text contains an
        // earlier report's
        h.mark_lost_by_supervisor("CUDA_ERROR_LAUNCH_FAILED after first");
        assert_eq!(
            h.lost().unwrap().why,
            "CUDA_ERROR_LAUNCH_FAILED after first"
        );
    }
}
