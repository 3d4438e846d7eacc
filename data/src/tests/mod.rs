//! Unit tests of the data crate. Everything runs on small images so the suite is fast in debug mode;
//! tests that need installed data (Fashion-MNIST, the fetched photos) say so and pass when it is absent.

mod augment;
mod bad_input;
mod copypaste;
mod idx;
mod loader;
mod masks;
mod sources;
mod spec;
mod tar;
mod util;
