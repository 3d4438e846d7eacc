//! Workspace end-to-end tests: one binary, modules by topic. They run the real `dinod`
//! binary, real files, the real sled catalog, and real processes killed with SIGKILL.

mod cli;
mod cluster;
mod daemon;
mod distill;
mod stages;
mod support;
mod tidy;
