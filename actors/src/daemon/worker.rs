//! A dedicated OS thread that runs an actor's heavy work (tensor compute, file IO) so the
//! tokio workers never block. The actor sends a closure and awaits its result; if the
//! thread panics, the await returns an error and the actor fails (its supervisor decides).

use std::sync::mpsc;
use std::thread;

use anyhow::{anyhow, Result};
use tokio::sync::oneshot;

type Job = Box<dyn FnOnce() + Send + 'static>;

/// A named worker thread with a job queue.
pub struct Worker {
    tx: Option<mpsc::Sender<Job>>,
    name: String,
}

impl Worker {
    /// Starts a thread called `name`.
    pub fn spawn(name: &str) -> Result<Self> {
        let (tx, rx) = mpsc::channel::<Job>();
        thread::Builder::new()
            .name(name.to_string())
            .spawn(move || {
                while let Ok(job) = rx.recv() {
                    job();
                }
            })
            .map_err(|e| anyhow!("cannot start worker thread {name}: {e}"))?;
        Ok(Self {
            tx: Some(tx),
            name: name.to_string(),
        })
    }

    /// Runs `f` on the worker thread and waits for its result. A panic inside `f` is
    /// caught on the worker and returned as an error carrying the panic message, so the
    /// worker stays usable; the calling actor turns it into a failure.
    pub async fn run<T: Send + 'static>(
        &self,
        f: impl FnOnce() -> T + Send + 'static,
    ) -> Result<T> {
        let (tx, rx) = oneshot::channel();
        let job: Job = Box::new(move || {
            let r = std::panic::catch_unwind(std::panic::AssertUnwindSafe(f));
            let _ = tx.send(r);
        });
        self.tx
            .as_ref()
            .ok_or_else(|| anyhow!("worker {} is shut down", self.name))?
            .send(job)
            .map_err(|_| anyhow!("worker thread {} is gone", self.name))?;
        match rx.await {
            Ok(Ok(v)) => Ok(v),
            Ok(Err(p)) => Err(anyhow!(
                "panic on worker {}: {}",
                self.name,
                panic_message(&p)
            )),
            Err(_) => Err(anyhow!("worker thread {} dropped the job", self.name)),
        }
    }
}

impl Drop for Worker {
    fn drop(&mut self) {
        // closing the channel ends the thread once its current job (if any) returns
        self.tx.take();
    }
}

/// The text of a panic payload.
pub fn panic_message(p: &Box<dyn std::any::Any + Send>) -> String {
    if let Some(s) = p.downcast_ref::<&str>() {
        s.to_string()
    } else if let Some(s) = p.downcast_ref::<String>() {
        s.clone()
    } else {
        "(non-string panic payload)".into()
    }
}
