//! Links the `trainer` binary so that it really loads libtorch_cuda when the libtorch it was built
//! against has one. Without this the linker's `--as-needed` drops libtorch_cuda (no symbol of it
//! is referenced directly) and `tch::Cuda::is_available()` is false even on a GPU box.
use std::path::PathBuf;

fn main() {
    println!("cargo:rerun-if-env-changed=DEP_TORCH_EXT_LIB_DIR");
    let Ok(lib_dir) = std::env::var("DEP_TORCH_EXT_LIB_DIR") else {
        return;
    };
    let lib = PathBuf::from(&lib_dir);
    if lib.join("libtorch_cuda.so").exists() {
        println!("cargo:rustc-link-arg-bins=-Wl,--no-as-needed,-ltorch_cuda,--as-needed");
    }
    // A RUNPATH to the libtorch we built against, so the binary runs here without
    // LD_LIBRARY_PATH; elsewhere (a GPU box with its own torch) LD_LIBRARY_PATH, which the loader
    // searches before RUNPATH, points at that box's torch/lib.
    println!("cargo:rustc-link-arg-bins=-Wl,-rpath,{lib_dir}");
}
