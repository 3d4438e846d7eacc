//! `actors`: the dinod daemon and everything that touches the outside world.
//!
//! Owns: config loading and validation (`config`), the supervision tree of actors and the
//! step protocol (`daemon`), the shared training state and its checkpoint form
//! (`engine`), the CLI and its client side of the control socket (`cli`, `commands`,
//! `client`), offline tools (`tools`: parity), benchmarks (`bench`; `chaos`: the daemon under failures), data-parallel groups (`dp`; across processes over TCP: `cluster`), logging and
//! process-wide tuning (`logging`, `runtime`).
//!
//! Must not know: tensor kernels or the loss maths (it calls `model` through
//! `train_step`'s phases), sled (it uses `checkpoints`). It is the only crate that knows
//! tokio and ractor.

pub mod bench;
pub mod chaos;
pub mod cli;
pub mod client;
pub mod cluster;
pub mod commands;
pub mod config;
pub mod daemon;
pub mod dp;
pub mod engine;
pub mod logging;
pub mod runtime;
pub mod stages;
pub mod tools;
pub mod viz;
pub mod weights;
