//! Training data for dinod: everything between image files and the host buffers a training step
//! consumes.
//!
//! This crate owns:
//! - **image sources** behind one trait ([`Source`]): a folder of JPEG/PNG/WebP files (ImageFolder
//!   labels), tar shards in the WebDataset layout, IDX files (Fashion-MNIST), procedural scenes with exact label maps (the default), and a
//!   copy-paste segmentation set built from real photo cut-outs, all named by a [`SourceSpec`] string;
//! - the **DINOv3 multi-crop augmentation** ([`Augmenter`]: 2 global + N local crops, Gram-teacher
//!   views, high-resolution size mixes) and the evaluation transform;
//! - the **iBOT masks** of the official collate ([`generate_masks`]);
//! - the **deterministic cursor** ([`Cursor`]): every random choice is a keyed ChaCha8 stream of
//!   (seed, epoch, position, crop) or (seed, batch), so a seed and a cursor fix every later batch,
//!   byte for byte, whatever the number of threads;
//! - **batch assembly on worker threads** ([`Loader`] → [`HostBatch`]) with a bounded prefetch queue,
//!   and the handling of bad input (skip, substitute deterministically, report once, count), plus
//!   `scan` and `bench` for the CLI.
//!
//! It must not know tensors or devices (candle), the model, the actors or async runtimes (tokio,
//! ractor), or storage (sled, checkpoints): it produces plain `Vec<f32>` / `Vec<u8>` host buffers in
//! the golden fixtures' crop-major layout, and its only state worth saving is the serde [`Cursor`].
//! It does no logging: unreadable files come back as [`BadInput`] records for the caller to log,
//! count and quarantine.
#![warn(missing_docs, unreachable_pub)]

mod augment;
mod bench;
mod config;
mod decode;
mod error;
mod loader;
mod mask;
mod rng;
mod scan;
mod source;

#[cfg(test)]
mod tests;

pub use augment::eval::{eval_transform, load_eval, EvalBatch, EvalImage, Normalizer};
pub use augment::{
    random_resized_crop, Augmenter, CropBox, CropRecord, JitterParams, MultiCrop, Photometric,
    SampleKey,
};
pub use bench::{bench_multicrop, BenchResult};
pub use config::{
    BlurConvention, ColorJitterConfig, CropConfig, CropSizes, DataConfig, EvalConfig,
    HighResConfig, MaskConfig, Order, DEFAULT_PIXEL_LIMIT, IMAGENET_MEAN, IMAGENET_STD,
};
pub use decode::{decode_rgb, probe_dimensions, to_rgb8};
pub use error::{BadInput, BadReason, DataError};
pub use loader::{Cursor, HostBatch, Loader, LoaderOptions, Part, SourceChange};
pub use mask::{
    generate_masks, mask_indices, masked_counts, masks_weight, n_masked, MaskGenerator,
};
pub use rng::KeyedRng;
pub use scan::{
    scan, scan_source, scan_source_with_progress, scan_with_progress, ClassCount, ScanOptions,
    ScanProgress, ScanReport, SizeBucket,
};
pub use source::copypaste::{
    build_copy_paste, CopyPasteConfig, CopyPasteEntry, CopyPasteManifest, CopyPasteSource,
    PastedObject,
};
pub use source::folder::FolderSource;
pub use source::idx::{IdxSource, FASHION_MNIST_CLASSES};
pub use source::synthetic::{SyntheticConfig, SyntheticScenes, SHAPE_CLASSES};
pub use source::tar::{nofile_limit, open_shard_bound, TarSource};
pub use source::{
    default_index_cache, Counted, LabelMap, OpenOptions, OpenProgress, Sample, Source, SourceSpec,
    Split,
};
