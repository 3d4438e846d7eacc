//! `model`: the DINOv3 student/teacher networks and the training step.
//!
//! Owns: the ViT and its heads with the official `state_dict` names (`vit`, `head`,
//! `params`), the SSL objective assembled as `SSLMetaArch` does (`ssl`), our saveable
//! AdamW with the official parameter groups, clipping and the EMA (`optim`), `TrainState`
//! and `train_step` (`state`), configs (`config`), and reading the golden fixtures
//! (`fixture`, parsing bytes handed in by the caller), and the data-parallel step over a
//! group of members that all-reduce through a `Collective` (`dist`).
//!
//! Must not know: files, sockets, clocks, threads, actors, checkpoints, the data pipeline
//! (batches arrive as tensors), or how the stage machine decides. The step is a pure
//! function of `(TrainState, Batch, StepHparams)`.

pub mod config;
pub mod dist;
pub mod fixture;
pub mod flops;
pub mod head;
pub mod optim;
pub mod params;
pub mod parity;
pub mod ssl;
pub mod state;
pub mod vit;

pub use config::{HeadConfig, LossConfig, OptimConfig, SslConfig, VitConfig};
pub use state::{
    apply_step, apply_step_observed, clip_gradients, compute_step, compute_step_observed,
    distill_student_phase, distill_teacher_phase, finish_step, frozen_teacher_targets,
    student_phase, student_phase_split, teacher_phase, teacher_phase_in, train_step,
    BackboneBackward, BackboneDone, Batch, Phase, Side, StepError, StepHparams, StepOutcome,
    StepReport, TeacherOutput, TrainState,
};

#[cfg(test)]
mod tests;
