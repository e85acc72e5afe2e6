//! Compiles `csrc/shim.cpp` against the same libtorch that torch-sys links, and tells the crates
//! that depend on this one (through `links = "torch_ext"`) where libtorch's libraries live, so
//! that the binary can force-link libtorch_cuda (see DESIGN.md, the `--as-needed` trap).
use std::path::PathBuf;
use std::process::Command;

fn torch_root() -> PathBuf {
    if let Ok(dir) = std::env::var("LIBTORCH") {
        return PathBuf::from(dir);
    }
    let python = std::env::var("PYTHON_SYS_EXECUTABLE").unwrap_or_else(|_| "python3".to_string());
    let out = Command::new(&python)
        .args([
            "-c",
            "import os, torch; print(os.path.dirname(torch.__file__))",
        ])
        .output()
        .unwrap_or_else(|e| panic!("torch-ext: cannot run {python} to find torch: {e}"));
    if !out.status.success() {
        panic!(
            "torch-ext: `{python} -c 'import torch'` failed; set LIBTORCH or install torch==2.11.0: {}",
            String::from_utf8_lossy(&out.stderr)
        );
    }
    PathBuf::from(String::from_utf8_lossy(&out.stdout).trim().to_string())
}

fn main() {
    println!("cargo:rerun-if-changed=csrc/shim.cpp");
    println!("cargo:rerun-if-env-changed=LIBTORCH");
    println!("cargo:rerun-if-env-changed=PYTHON_SYS_EXECUTABLE");
    let root = torch_root();
    let include = root.join("include");
    let lib = root.join("lib");
    cc::Build::new()
        .cpp(true)
        .file("csrc/shim.cpp")
        .include(&include)
        .include(include.join("torch/csrc/api/include"))
        .flag("-std=c++17")
        .flag("-D_GLIBCXX_USE_CXX11_ABI=1")
        .flag("-w")
        .compile("torch_ext_shim");
    println!("cargo:rustc-link-search=native={}", lib.display());
    println!("cargo:rustc-link-lib=dylib=c10");
    println!("cargo:rustc-link-lib=dylib=torch_cpu");
    // Read by dependents' build scripts as DEP_TORCH_EXT_LIB_DIR.
    println!("cargo:lib_dir={}", lib.display());
}
