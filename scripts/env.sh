# Sourced by scripts/trainer and scripts/test: makes libtorch available to the build and to the
# binary, provisioning it on first use.
#
# - If LIBTORCH (a libtorch directory) or LIBTORCH_USE_PYTORCH (a Python with torch on PATH) is
#   already set, that is used as is.
# - Otherwise a project-local virtual environment `.venv` gets pip's torch==2.11.0 (the version
#   tch 0.24 is built for) once, and the build uses it (LIBTORCH_USE_PYTORCH=1).
set -euo pipefail

TRAINER_ROOT="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
TORCH_VERSION="2.11.0"
VENV="${TRAINER_VENV:-$TRAINER_ROOT/.venv}"

log() { echo "[trainer-setup] $*" >&2; }

provision_torch() {
    if [[ -n "${LIBTORCH:-}" ]]; then
        export LD_LIBRARY_PATH="$LIBTORCH/lib${LD_LIBRARY_PATH:+:$LD_LIBRARY_PATH}"
        return
    fi
    if [[ -z "${LIBTORCH_USE_PYTORCH:-}" ]]; then
        if [[ ! -x "$VENV/bin/python" ]]; then
            log "creating $VENV"
            python3 -m venv "$VENV"
        fi
        if ! "$VENV/bin/python" -c "import torch, sys; sys.exit(torch.__version__.split('+')[0] != '$TORCH_VERSION')" 2>/dev/null; then
            log "installing torch==$TORCH_VERSION into $VENV (first use only; a few GB)"
            "$VENV/bin/pip" install --quiet --disable-pip-version-check "torch==$TORCH_VERSION" numpy
        fi
        # CUDA headers that c10d's ProcessGroupNCCL.hpp includes and the torch wheel lacks (3 MB):
        # with them the shim compiles multi-GPU (NCCL) training in.
        if [[ ! -d "$("$VENV/bin/python" -c 'import os, torch; print(os.path.dirname(torch.__file__))')/../nvidia/cu13/include/crt" ]]; then
            log "installing the CUDA headers for NCCL (nvidia-cuda-crt, nvidia-cuda-cccl; first use only)"
            "$VENV/bin/pip" install --quiet --disable-pip-version-check "nvidia-cuda-crt==13.0.*" "nvidia-cuda-cccl==13.0.*" \
                || log "warning: could not install the NCCL headers; building without multi-GPU training"
        fi
        export PATH="$VENV/bin:$PATH"
        export LIBTORCH_USE_PYTORCH=1
    fi
    local torch_lib
    torch_lib="$(python3 -c 'import os, torch; print(os.path.join(os.path.dirname(torch.__file__), "lib"))')"
    export LD_LIBRARY_PATH="$torch_lib${LD_LIBRARY_PATH:+:$LD_LIBRARY_PATH}"
}

# Multi-process training (c10d's ProcessGroupGloo) needs gloo's headers at build time: the torch
# wheel has gloo's code but not its headers; Debian's libgloo-dev has them. Installed with apt-get
# when missing (as root, or through passwordless sudo). GLOO_INCLUDE_DIR points at another copy;
# TRAINER_SKIP_GLOO=1 builds without multi-process training instead.
provision_gloo() {
    local dir
    for dir in "${GLOO_INCLUDE_DIR:-}" /usr/include /usr/local/include; do
        [[ -n "$dir" && -f "$dir/gloo/config.h" ]] && return 0
    done
    [[ "${TRAINER_SKIP_GLOO:-}" == 1 ]] && return 0
    local apt=()
    if [[ "$(id -u)" == 0 ]]; then
        apt=(apt-get)
    elif command -v sudo >/dev/null 2>&1 && sudo -n true 2>/dev/null; then
        apt=(sudo -n apt-get)
    fi
    if [[ ${#apt[@]} -gt 0 ]] && command -v apt-get >/dev/null 2>&1; then
        log "installing libgloo-dev (gloo's headers, for multi-process training; first use only)"
        export DEBIAN_FRONTEND=noninteractive
        if "${apt[@]}" install -y -qq libgloo-dev >/dev/null 2>&1 \
            || { "${apt[@]}" update -qq >/dev/null 2>&1 && "${apt[@]}" install -y -qq libgloo-dev >/dev/null 2>&1; }; then
            [[ -f /usr/include/gloo/config.h ]] && return 0
        fi
    fi
    echo "error: gloo's headers are missing and could not be installed: run 'sudo apt-get install libgloo-dev' (or set GLOO_INCLUDE_DIR=DIR with DIR/gloo/config.h, or TRAINER_SKIP_GLOO=1 to build without multi-process training)" >&2
    exit 1
}

check_cargo() {
    if ! command -v cargo >/dev/null 2>&1; then
        echo "error: cargo not found; install Rust (https://rustup.rs) and retry" >&2
        exit 1
    fi
}
