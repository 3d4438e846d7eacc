//! The data-loader actor: owns a `data::Loader` (decode and multi-crop on its worker
//! threads, bounded prefetch) and hands out batches converted to tensors. Its only state
//! is the cursor, which the coordinator owns; a restarted loader resumes from the
//! committed cursor, so it produces exactly the batches the run would have seen.

use std::sync::{Arc, Mutex};

use anyhow::{anyhow, Result};
use candle_core::{DType, Device, Tensor};
use ractor::{Actor, ActorProcessingErr, ActorRef, RpcReplyPort};

use super::board::ActorPhase;
use super::worker::Worker;
use super::Ctx;

/// Actor name.
pub const NAME: &str = "data_loader";

/// Reports the unreadable files met while building a batch (each was replaced by a
/// readable sample): an event naming the file, a quarantine record, the status count and
/// the metric. `actor` is whoever read the batch; `step` the step it is for.
pub fn report_bad_inputs(ctx: &Ctx, actor: &str, step: u64, bad: &[data::BadInput]) {
    for b in bad {
        let path = b.path.display().to_string();
        report_bad_file(ctx, actor, step, &path, &b.reason.to_string(), None);
    }
}

/// One unreadable file, read by this process or (`by`: the member, and the batch of
/// whose part it was) by a worker: the status count, the metric, a `data.bad_input`
/// event and a quarantine record.
pub fn report_bad_file(
    ctx: &Ctx,
    actor: &str,
    step: u64,
    path: &str,
    reason: &str,
    by: Option<(usize, u64)>,
) {
    ctx.board.run(|r| r.bad_inputs += 1);
    metrics::counter!("dinod_bad_inputs_total").increment(1);
    let (message, mut fields, mut record) = (
        format!("skipped unreadable input {path}: {reason}"),
        serde_json::json!({"path": path, "reason": reason}),
        serde_json::json!({"reason": reason, "step": step}),
    );
    let message = match by {
        None => message,
        Some((member, batch)) => {
            fields["member"] = member.into();
            fields["batch"] = batch.into();
            record["member"] = member.into();
            format!(
                "member {member} skipped unreadable input {path} in its part of batch {batch}: {reason}"
            )
        }
    };
    ctx.event(
        checkpoints::Level::Warn,
        "data.bad_input",
        Some(actor),
        Some(step),
        message,
        fields,
    );
    let _ = ctx.store.quarantine_add(&format!("file:{path}"), &record);
}

/// A batch ready for the step, plus its bookkeeping.
pub struct LoadedBatch {
    /// Index of the batch in the run.
    pub batch_index: u64,
    /// Cursor before it (where a loader starting at this batch starts).
    pub cursor_before: data::Cursor,
    /// Cursor after it.
    pub cursor_after: data::Cursor,
    /// The crops it was made with (the stage's).
    pub crops: Arc<data::CropConfig>,
    /// With `runtime.cluster.worker_data = "local"`: `batch` is only rank 0's part of
    /// the global batch (each worker loads its own); `None`: the whole batch.
    pub part: Option<data::Part>,
    /// The tensors.
    pub batch: model::Batch,
    /// Unreadable files met while building it.
    pub bad_inputs: Vec<data::BadInput>,
    /// Samples substituted because of bad input.
    pub n_substituted: usize,
}

/// Messages.
pub enum LoaderMsg {
    /// The next batch.
    Next(RpcReplyPort<Result<Arc<LoadedBatch>, String>>),
    /// Restart the stream at a cursor with these crops (after a rollback, a redo or a
    /// stage change).
    Reset(
        data::Cursor,
        Box<data::CropConfig>,
        RpcReplyPort<Result<(), String>>,
    ),
}

/// The actor.
pub struct LoaderActor;

/// Its state.
pub struct LoaderState {
    ctx: Arc<Ctx>,
    worker: Worker,
    loader: Arc<Mutex<Option<data::Loader>>>,
}

/// Converts a host batch to tensors of `dtype` on `dev`.
pub fn to_batch(
    h: &data::HostBatch,
    dtype: DType,
    with_gram: bool,
    dev: &Device,
) -> Result<model::Batch> {
    let dev = dev.clone();
    let b = h.batch_size;
    let (g, l) = (h.global_size as usize, h.local_size as usize);
    let global = Tensor::from_slice(&h.global_crops, (2 * b, 3, g, g), &dev)?.to_dtype(dtype)?;
    let local = if h.n_local > 0 {
        Some(Tensor::from_slice(&h.local_crops, (h.n_local * b, 3, l, l), &dev)?.to_dtype(dtype)?)
    } else {
        None
    };
    let gram = match (&h.gram_crops, h.gram_size, with_gram) {
        (Some(v), Some(s), true) => {
            Some(Tensor::from_slice(v, (2 * b, 3, s as usize, s as usize), &dev)?.to_dtype(dtype)?)
        }
        _ => None,
    };
    Ok(model::Batch::new(b, global, local, gram, h.masks.clone())?)
}

impl LoadedBatch {
    /// Member `rank`'s part of the global batch for a group of `world`: cut from the
    /// whole batch, or the batch itself when it is already that part.
    pub fn part_for(&self, rank: usize, world: usize) -> Result<model::Batch> {
        match self.part {
            None => Ok(self.batch.shard(rank, world)?),
            Some(p) if p == (data::Part { rank, world }) => Ok(self.batch.clone()),
            Some(p) => Err(anyhow!(
                "batch {} holds member {} of {}'s images only, not member {rank} of {world}'s",
                self.batch_index,
                p.rank,
                p.world
            )),
        }
    }
}

/// The part of each batch rank 0 loads: its own when the cluster's workers load theirs,
/// of a group of the last size formed (`runtime.cluster.nodes` before the first, fewer
/// after a group formed with `min_nodes`).
pub fn own_part(ctx: &Ctx) -> Option<data::Part> {
    ctx.plan()
        .config
        .runtime
        .cluster
        .as_ref()
        .filter(|c| c.worker_data == crate::config::WorkerData::Local)
        .map(|c| data::Part {
            rank: 0,
            world: ctx.cluster.formed().unwrap_or(c.nodes),
        })
}

fn open_loader(ctx: &Ctx, cursor: data::Cursor, crops: data::CropConfig) -> Result<data::Loader> {
    let cfg = &ctx.plan().config;
    let mut dcfg = cfg.data.clone();
    dcfg.crops = crops;
    let mut opts = data::LoaderOptions::from_config(&dcfg, cfg.train.batch_size, cfg.seed);
    opts.part = own_part(ctx);
    let loader = data::Loader::new(ctx.source.clone(), opts, cursor)?;
    if let Some(change) = loader.source_change() {
        let step = ctx.engine.lock().ts.step;
        ctx.event(
            checkpoints::Level::Warn,
            "data.changed",
            Some(NAME),
            Some(step),
            change.to_string(),
            serde_json::to_value(change).unwrap_or_default(),
        );
    }
    Ok(loader)
}

/// The crops of the stage the engine is in.
pub fn current_crops(ctx: &Ctx) -> data::CropConfig {
    let (st, step) = {
        let e = ctx.engine.lock();
        (e.stage.clone(), e.ts.step)
    };
    let m = crate::stages::machine(ctx.plan(), &st);
    crate::stages::crops(ctx.plan(), &m.overrides(step))
}

/// The committed cursor of the engine.
pub fn committed_cursor(ctx: &Ctx) -> data::Cursor {
    let v = ctx.engine.lock().ts.data_cursor.clone();
    serde_json::from_value(v).unwrap_or_default()
}

impl Actor for LoaderActor {
    type Msg = LoaderMsg;
    type State = LoaderState;
    type Arguments = Arc<Ctx>;

    async fn pre_start(
        &self,
        _me: ActorRef<Self::Msg>,
        ctx: Arc<Ctx>,
    ) -> Result<Self::State, ActorProcessingErr> {
        ctx.board.register(NAME, "data_loader");
        let worker = Worker::spawn("dinod-loader")?;
        // the loader starts lazily at the first request, at the committed cursor
        Ok(LoaderState {
            ctx,
            worker,
            loader: Arc::new(Mutex::new(None)),
        })
    }

    async fn handle(
        &self,
        _me: ActorRef<Self::Msg>,
        msg: Self::Msg,
        st: &mut Self::State,
    ) -> Result<(), ActorProcessingErr> {
        st.ctx.board.handled(NAME);
        match msg {
            LoaderMsg::Reset(cursor, crops, reply) => {
                let ctx = st.ctx.clone();
                let slot = st.loader.clone();
                let r = st
                    .worker
                    .run(move || -> Result<()> {
                        let mut g = slot.lock().map_err(|_| anyhow!("loader lock poisoned"))?;
                        *g = None; // stop the old threads first
                        *g = Some(open_loader(&ctx, cursor, *crops)?);
                        Ok(())
                    })
                    .await?;
                let _ = reply.send(r.map_err(|e| format!("{e:#}")));
            }
            LoaderMsg::Next(reply) => {
                let ctx = st.ctx.clone();
                let slot = st.loader.clone();
                let step = ctx.engine.lock().ts.step;
                ctx.faults.maybe_panic(NAME, step);
                ctx.board.phase(NAME, ActorPhase::Load);
                let dtype = ctx.plan().config.precision.compute_dtype();
                let r = st
                    .worker
                    .run(move || -> Result<LoadedBatch> {
                        ctx.faults.maybe_slow(NAME, step);
                        let mut g = slot.lock().map_err(|_| anyhow!("loader lock poisoned"))?;
                        if g.is_none() {
                            *g = Some(open_loader(
                                &ctx,
                                committed_cursor(&ctx),
                                current_crops(&ctx),
                            )?);
                        }
                        let loader = g.as_mut().expect("opened above");
                        let cursor_before = loader.cursor();
                        let crops = Arc::new(loader.options().crops.clone());
                        let part = loader.options().part;
                        let h = loader.next_batch()?;
                        let with_gram = h.gram_crops.is_some();
                        Ok(LoadedBatch {
                            batch_index: h.batch_index,
                            cursor_before,
                            cursor_after: h.cursor_after,
                            crops,
                            part,
                            batch: to_batch(
                                &h,
                                dtype,
                                with_gram,
                                &crate::runtime::device(&ctx.plan().config.runtime.device)?,
                            )?,
                            bad_inputs: h.bad_inputs.clone(),
                            n_substituted: h.n_substituted,
                        })
                    })
                    .await?;
                st.ctx.board.phase(NAME, ActorPhase::Idle);
                let _ = reply.send(r.map(Arc::new).map_err(|e| format!("{e:#}")));
            }
        }
        Ok(())
    }
}
