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

/// The directory holding `gloo/config.h`: GLOO_INCLUDE_DIR, else the system include directory.
fn gloo_include() -> Option<PathBuf> {
    std::env::var("GLOO_INCLUDE_DIR")
        .map(PathBuf::from)
        .into_iter()
        .chain([
            PathBuf::from("/usr/include"),
            PathBuf::from("/usr/local/include"),
        ])
        .find(|dir| dir.join("gloo/config.h").exists())
}

/// The include directories for c10d's ProcessGroupNCCL.hpp, when every header it needs is found:
/// `nccl.h` (pip's nvidia-nccl), CUDA's `cuda_runtime_api.h` (pip's nvidia-cuda-runtime), and
/// what that includes, `crt/host_config.h` (nvidia-cuda-crt) and `nv/target` (nvidia-cuda-cccl).
/// Searched in CUDA_INCLUDE_DIRS (':'-separated), pip's nvidia packages beside torch,
/// CUDA_HOME/include and /usr/local/cuda/include. Without them the shim is built without NCCL
/// and a CUDA multi-process run says so.
fn nccl_includes(torch_root: &std::path::Path) -> Option<Vec<PathBuf>> {
    let nvidia = torch_root
        .parent()
        .map(|p| p.join("nvidia"))
        .unwrap_or_default();
    let mut dirs: Vec<PathBuf> = std::env::var("CUDA_INCLUDE_DIRS")
        .map(|v| {
            v.split(':')
                .filter(|d| !d.is_empty())
                .map(PathBuf::from)
                .collect()
        })
        .unwrap_or_default();
    for sub in ["nccl", "cu13", "cuda_runtime", "cu12"] {
        dirs.push(nvidia.join(sub).join("include"));
    }
    dirs.push(nvidia.join("cu13/include/cccl"));
    if let Ok(cuda) = std::env::var("CUDA_HOME") {
        dirs.push(PathBuf::from(cuda).join("include"));
    }
    dirs.push(PathBuf::from("/usr/local/cuda/include"));
    let mut found = Vec::new();
    for header in [
        "nccl.h",
        "cuda_runtime_api.h",
        "crt/host_config.h",
        "nv/target",
    ] {
        let dir = dirs.iter().find(|d| d.join(header).exists())?;
        if !found.contains(dir) {
            found.push(dir.clone());
        }
    }
    Some(found)
}

fn main() {
    println!("cargo:rerun-if-changed=csrc/shim.cpp");
    println!("cargo:rerun-if-changed=csrc/linear_cross_entropy.cpp");
    println!("cargo:rerun-if-changed=csrc/recompute.cpp");
    for var in ["GLOO_INCLUDE_DIR", "CUDA_INCLUDE_DIRS", "CUDA_HOME"] {
        println!("cargo:rerun-if-env-changed={var}");
    }
    println!("cargo:rerun-if-env-changed=LIBTORCH");
    println!("cargo:rerun-if-env-changed=PYTHON_SYS_EXECUTABLE");
    let root = torch_root();
    let include = root.join("include");
    let lib = root.join("lib");
    let mut build = cc::Build::new();
    build
        .cpp(true)
        .file("csrc/shim.cpp")
        .file("csrc/linear_cross_entropy.cpp")
        .file("csrc/recompute.cpp")
        .include(&include)
        .include(include.join("torch/csrc/api/include"))
        .flag("-std=c++17")
        .flag("-D_GLIBCXX_USE_CXX11_ABI=1")
        .flag("-w");
    // c10d's ProcessGroupGloo: the gloo code is inside libtorch_cpu, but the wheel ships no gloo
    // headers; Debian's libgloo-dev has them (scripts/env.sh installs it). Without them the shim
    // is built without c10d and a multi-process run says so.
    match gloo_include() {
        Some(dir) => {
            if dir != std::path::Path::new("/usr/include") {
                build.include(dir);
            }
            build.define("USE_C10D_GLOO", None).define("TE_HAVE_GLOO", None);
        }
        None => println!(
            "cargo:warning=torch-ext: gloo headers not found (apt-get install libgloo-dev, or set GLOO_INCLUDE_DIR): built without multi-process training"
        ),
    }
    // c10d's ProcessGroupNCCL lives in libtorch_cuda; its header needs nccl.h (pip's
    // nvidia-nccl) and CUDA's runtime headers (pip's nvidia cuda runtime, or CUDA_HOME).
    let nccl = lib
        .join("libtorch_cuda.so")
        .exists()
        .then(|| nccl_includes(&root))
        .flatten();
    // Installing the header packages later must rebuild the shim: watch pip's nvidia folder.
    let nvidia = root.parent().map(|p| p.join("nvidia")).unwrap_or_default();
    if nvidia.is_dir() {
        println!("cargo:rerun-if-changed={}", nvidia.display());
    }
    if nccl.is_none() && lib.join("libtorch_cuda.so").exists() {
        println!(
            "cargo:warning=torch-ext: CUDA libtorch but no NCCL/CUDA headers (pip install \"nvidia-cuda-crt==13.0.*\" \"nvidia-cuda-cccl==13.0.*\", or set CUDA_INCLUDE_DIRS): built without multi-GPU training"
        );
    }
    if let Some(dirs) = &nccl {
        for d in dirs {
            build.include(d);
        }
        build
            .define("USE_C10D_NCCL", None)
            .define("USE_CUDA", None)
            .define("TE_HAVE_NCCL", None);
    }
    build.compile("torch_ext_shim");
    println!("cargo:rustc-link-search=native={}", lib.display());
    println!("cargo:rustc-link-lib=dylib=c10");
    println!("cargo:rustc-link-lib=dylib=torch_cpu");
    if nccl.is_some() {
        println!("cargo:rustc-link-lib=dylib=torch_cuda");
        println!("cargo:rustc-link-lib=dylib=c10_cuda");
    }
    // Read by dependents' build scripts as DEP_TORCH_EXT_LIB_DIR.
    println!("cargo:lib_dir={}", lib.display());
}
