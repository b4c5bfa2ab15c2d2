//! Compiles every `cuda/*.cu` file to PTX when the `cuda` feature is on; does nothing otherwise,
//! so CPU-only builds need no CUDA toolkit. `CUDA_COMPUTE_CAP` (e.g. `90`) must be set on machines
//! without a GPU. The generated `$OUT_DIR/ptx.rs` holds one `pub const NAME: &str` per file.

fn main() {
    println!("cargo::rerun-if-changed=build.rs");
    println!("cargo::rerun-if-changed=cuda");
    #[cfg(feature = "cuda")]
    cuda::build_ptx();
}

#[cfg(feature = "cuda")]
mod cuda {
    pub fn build_ptx() {
        let out_dir = std::path::PathBuf::from(std::env::var("OUT_DIR").expect("OUT_DIR"));
        let ptx = cudaforge::KernelBuilder::new()
            .source_glob("cuda/*.cu")
            .arg("-O3")
            .arg("-std=c++17")
            .arg("--expt-relaxed-constexpr")
            .arg("-lineinfo")
            // cudaforge's incremental mode lists only the re-compiled files in ptx.rs.
            .no_incremental()
            .build_ptx()
            .unwrap_or_else(|e| panic!("nvcc failed on cuda/*.cu: {e}"));
        ptx.write(out_dir.join("ptx.rs"))
            .unwrap_or_else(|e| panic!("cannot write ptx.rs: {e}"));
    }
}
