//! Unit tests: every probe on synthetic features whose answer is known, the stage machine
//! on metric sequences, the pictures on features that do or do not encode a label map,
//! and one real run of a small random-init ViT on the built-in synthetic scenes.

mod dense;
mod features;
mod linalg;
mod locality;
mod probes;
mod real;
mod stage;
mod util;
mod viz;
