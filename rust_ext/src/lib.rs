//! hw's Rust core. Plain-Rust modules hold the algorithms (and their unit tests, which run
//! with `cargo test`, no Python needed); `bindings` is the only module that knows PyO3 and is
//! compiled only with the `python` feature that maturin turns on.

pub mod bucket;
pub mod decode;
pub mod error;
pub mod groups;
pub mod header;
pub mod limits;
pub mod mih;
pub mod parquet_out;
pub mod phash;
pub mod pool;
pub mod quality;
pub mod rows;
pub mod scan;
pub mod status;
pub mod tar;
pub mod walk;

#[cfg(feature = "python")]
mod bindings;
#[cfg(feature = "python")]
mod bindings_shards;
