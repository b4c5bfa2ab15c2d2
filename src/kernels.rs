//! PTX of every `cuda/*.cu` file, compiled by `build.rs` (feature `cuda` only).
include!(concat!(env!("OUT_DIR"), "/ptx.rs"));
