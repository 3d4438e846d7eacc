//! Injected faults: each configured fault fires at most `times` times in this process,
//! when its actor reaches its step. Used by the tests and for drills.

use std::sync::Mutex;

use crate::config::FaultSpec;

/// The pending faults of this process.
#[derive(Default, Debug)]
pub struct Faults {
    pending: Mutex<Vec<(FaultSpec, u32)>>,
}

impl Faults {
    /// Faults from the config.
    pub fn new(specs: &[FaultSpec]) -> Self {
        Self {
            pending: Mutex::new(specs.iter().map(|f| (f.clone(), f.times)).collect()),
        }
    }

    /// Takes one firing of a fault of `kind` for `actor` at `step`, if one is armed.
    pub fn take(&self, kind: &str, actor: Option<&str>, step: u64) -> Option<FaultSpec> {
        let mut p = match self.pending.lock() {
            Ok(g) => g,
            Err(e) => e.into_inner(),
        };
        for (f, left) in p.iter_mut() {
            if *left > 0
                && f.kind == kind
                && f.step == step
                && (f.actor.is_none() || f.actor.as_deref() == actor)
            {
                *left -= 1;
                return Some(f.clone());
            }
        }
        None
    }

    /// Takes one firing of a fault of `kind` armed at or before `step` (for work that only
    /// happens at some steps, like saves).
    pub fn take_since(&self, kind: &str, step: u64) -> Option<FaultSpec> {
        let mut p = match self.pending.lock() {
            Ok(g) => g,
            Err(e) => e.into_inner(),
        };
        for (f, left) in p.iter_mut() {
            if *left > 0 && f.kind == kind && f.step <= step {
                *left -= 1;
                return Some(f.clone());
            }
        }
        None
    }

    /// Panics if a `panic` fault is armed for `actor` at `step`.
    pub fn maybe_panic(&self, actor: &str, step: u64) {
        if self.take("panic", Some(actor), step).is_some() {
            panic!("injected fault: panic in {actor} at step {step}");
        }
    }

    /// For actors that only look now and then: panics if a `panic` fault for `actor` is
    /// armed at or before `step`.
    pub fn maybe_panic_since(&self, actor: &str, step: u64) {
        let mut p = match self.pending.lock() {
            Ok(g) => g,
            Err(e) => e.into_inner(),
        };
        let hit = p.iter_mut().find(|(f, left)| {
            *left > 0 && f.kind == "panic" && f.actor.as_deref() == Some(actor) && f.step <= step
        });
        if let Some((_, left)) = hit {
            *left -= 1;
            drop(p);
            panic!("injected fault: panic in {actor} at step {step}");
        }
    }

    /// Sleeps if a `slow` fault is armed for `actor` at `step` (blocking; call on a worker).
    pub fn maybe_slow(&self, actor: &str, step: u64) {
        if let Some(f) = self.take("slow", Some(actor), step) {
            std::thread::sleep(std::time::Duration::from_millis(f.duration_ms));
        }
    }
}
