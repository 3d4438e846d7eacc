#!/usr/bin/env bash
# Builds `dinod` with the `cuda` feature on a machine without a GPU and without a CUDA
# install, for NVIDIA Hopper GPUs (compute capability 9.0, H100 / H200) driven by an
# NVIDIA driver that supports CUDA 13.0 (driver 580 or newer).
#
#   scripts/build-cuda.sh            # build (about 20 minutes on 2 cores the first time)
#   scripts/build-cuda.sh --check    # `cargo check`, and a link of the CUDA libraries
#                                    # (what CI's compile check does)
#   scripts/build-cuda.sh --bundle DIR  # build, then pack what scripts/gpu-check.sh needs
#                                       # besides the checkout: DIR/dinod.xz (stripped,
#                                       # about 10 MB instead of 200) and DIR/golden/
#
# What it does:
#  1. installs the CUDA 13.0 toolkit from PyPI, pinned (nvcc, its headers, cicc, CCCL,
#     cudart, cuBLAS, cuRAND, NVRTC, and NCCL for data parallel over GPUs), into a Python venv: $DINOD_CUDA_VENV
#     (default ${XDG_CACHE_HOME:-~/.cache}/dinod/venv-cuda-13.0). The toolkit is pinned
#     to 13.0 because the PTX that nvcc 13.0 embeds (ISA 9.0) is what a CUDA 13.0 driver
#     can JIT, and because cudarc 0.19.10 knows CUDA 13.0-13.4 only;
#  2. assembles a CUDA_HOME in $VENV/cudaroot: bin/, include/ and nvvm/ link to the
#     wheels' tree; lib/ holds links to the libraries under their unversioned names (the
#     wheels ship only libcublas.so.13 etc., the linker wants libcublas.so) and
#     lib/stubs/libcuda.so, a stub of the driver library generated from the list of
#     driver functions in cudarc's bindings (no wheel ships the driver);
#  3. runs `cargo build --release --locked --features cuda -p dinod` with
#     CUDA_COMPUTE_CAP=90 and CUDARC_CUDA_VERSION=13000 into its own target directory,
#     $DINOD_CUDA_TARGET (default target-cuda/ in the checkout), under `nice`;
#  4. prints the binary's path, size and the shared libraries it needs;
#  5. with --bundle DIR: strips a copy of the binary, compresses it with xz into
#     DIR/dinod.xz and copies the golden fixtures ($DINOD_GOLDEN, default ../shared/golden)
#     to DIR/golden. On the GPU machine, in a checkout:
#       DINOD=DIR/dinod.xz DINOD_GOLDEN=DIR/golden scripts/gpu-check.sh
#
# At run time the binary needs the driver's libcuda.so.1 and the CUDA 13 libraries
# libcudart.so.13, libcublas.so.13 (+ libcublasLt.so.13), libcurand.so.10 and libnccl.so.2, e.g. from
# PyTorch's nvidia-* wheels on the GPU machine (scripts/gpu-check.sh sets LD_LIBRARY_PATH).
# The binary does not start without libcuda.so.1: CPU-only machines use the normal build.
set -euo pipefail

ROOT=$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)
MODE=build
BUNDLE=
case "${1:-}" in
  "") ;;
  --check) MODE=check ;;
  --bundle) [ -n "${2:-}" ] || { echo "usage: $0 --bundle DIR" >&2; exit 2; }; BUNDLE=$2 ;;
  -h|--help) sed -n '2,36p' "$0"; exit 0 ;;
  *) echo "usage: $0 [--check | --bundle DIR]" >&2; exit 2 ;;
esac

VENV=${DINOD_CUDA_VENV:-${XDG_CACHE_HOME:-$HOME/.cache}/dinod/venv-cuda-13.0}
TARGET=${DINOD_CUDA_TARGET:-$ROOT/target-cuda}
PYTHON=${PYTHON:-python3}
# The toolkit, pinned: every package at its CUDA 13.0 release.
WHEELS=(
  nvidia-cuda-nvcc==13.0.88
  nvidia-cuda-crt==13.0.88
  nvidia-nvvm==13.0.88
  nvidia-cuda-runtime==13.0.96
  nvidia-cuda-cccl==13.0.85
  nvidia-cublas==13.0.2.14
  nvidia-curand==10.4.0.35
  nvidia-cuda-nvrtc==13.0.88
  nvidia-nccl-cu13==2.28.9
)

say() { printf '== %s\n' "$*"; }
die() { printf 'build-cuda: error: %s\n' "$*" >&2; exit 1; }

command -v cargo >/dev/null || die "cargo is not on PATH"
command -v "$PYTHON" >/dev/null || die "$PYTHON is not on PATH (set PYTHON=...)"
command -v g++ >/dev/null || die "g++ is needed as nvcc's host compiler"
command -v gcc >/dev/null || die "gcc is needed to build the libcuda stub"

# ---------------------------------------------------------------- 1. the toolkit wheels
if [ ! -x "$VENV/bin/python" ]; then
  say "creating the venv $VENV"
  mkdir -p "$(dirname "$VENV")"
  "$PYTHON" -m venv "$VENV"
fi
stamp="$VENV/.dinod-wheels"
if [ "$(cat "$stamp" 2>/dev/null)" != "${WHEELS[*]}" ]; then
  say "installing the CUDA 13.0 toolkit wheels (about 1.2 GB)"
  "$VENV/bin/python" -m pip install --quiet --disable-pip-version-check "${WHEELS[@]}"
  echo "${WHEELS[*]}" >"$stamp"
else
  say "toolkit wheels already installed in $VENV"
fi
CU=$("$VENV/bin/python" - <<'EOF'
import os, sysconfig
print(os.path.join(sysconfig.get_paths()["purelib"], "nvidia", "cu13"))
EOF
)
[ -x "$CU/bin/nvcc" ] || die "no nvcc in $CU/bin: the wheels did not install the expected layout"

# ---------------------------------------------------------------- 2. CUDA_HOME
CUDA_ROOT="$VENV/cudaroot"
say "assembling CUDA_HOME=$CUDA_ROOT"
mkdir -p "$CUDA_ROOT/lib/stubs"
for d in bin include nvvm; do ln -sfn "$CU/$d" "$CUDA_ROOT/$d"; done
ln -sfn lib "$CUDA_ROOT/lib64"
shopt -s nullglob
# NCCL's wheel keeps its library outside the cu13 tree (nvidia/nccl/lib)
for f in "$CU"/lib/*.so* "$CU"/../nccl/lib/*.so*; do
  base=$(basename "$f")
  ln -sfn "$f" "$CUDA_ROOT/lib/$base"
  # libfoo.so.13[.x.y] -> libfoo.so
  plain=${base%%.so*}.so
  [ -e "$CUDA_ROOT/lib/$plain" ] || ln -sfn "$f" "$CUDA_ROOT/lib/$plain"
done
shopt -u nullglob
for l in cudart cublas cublasLt curand nvrtc nccl; do
  [ -e "$CUDA_ROOT/lib/lib$l.so" ] || die "lib$l.so is missing from $CU/lib"
done

export CUDA_HOME="$CUDA_ROOT" CUDA_PATH="$CUDA_ROOT" CUDA_ROOT="$CUDA_ROOT"
export PATH="$CUDA_HOME/bin:$PATH"
export CUDA_COMPUTE_CAP=90 CUDARC_CUDA_VERSION=13000
nvcc_version=$(nvcc --version | sed -n 's/.*release \([0-9.]*\).*/\1/p')
[ "$nvcc_version" = "13.0" ] || die "nvcc reports release '$nvcc_version', expected 13.0"
say "nvcc $nvcc_version, compute capability $CUDA_COMPUTE_CAP, cudarc CUDA version $CUDARC_CUDA_VERSION"

# the driver stub: every cu* function cudarc's driver bindings declare, returning
# CUDA_ERROR_UNKNOWN (999); it exists only to satisfy `-lcuda` at link time
cd "$ROOT"
cargo fetch --locked >/dev/null
cudarc_dir=$(cargo metadata --locked --format-version 1 --features cuda 2>/dev/null |
  "$VENV/bin/python" -c 'import json,os,sys; m=json.load(sys.stdin); print(next(os.path.dirname(p["manifest_path"]) for p in m["packages"] if p["name"]=="cudarc"))') ||
  die "cudarc is not in the dependency graph of --features cuda"
sys_rs="$cudarc_dir/src/driver/sys/mod.rs"
[ -f "$sys_rs" ] || die "no driver bindings at $sys_rs"
stub_c="$CUDA_ROOT/lib/stubs/libcuda_stub.c"
grep -oE 'pub (unsafe )?fn cu[A-Za-z0-9_]+' "$sys_rs" | awk '{print $NF}' | sort -u |
  awk '{printf "int %s(void) { return 999; }\n", $1}' >"$stub_c"
n_sym=$(wc -l <"$stub_c")
[ "$n_sym" -gt 100 ] || die "found only $n_sym driver functions in $sys_rs"
gcc -shared -fPIC -Wl,-soname,libcuda.so.1 -o "$CUDA_ROOT/lib/stubs/libcuda.so" "$stub_c"
ln -sfn libcuda.so "$CUDA_ROOT/lib/stubs/libcuda.so.1"
say "libcuda stub with $n_sym driver functions (cudarc $(basename "$cudarc_dir"))"

# ---------------------------------------------------------------- 3. cargo
export CARGO_TARGET_DIR="$TARGET"
if [ "$MODE" = check ]; then
  say "cargo check --release --locked --features cuda -p dinod (target $TARGET)"
  nice -n 19 cargo check --release --locked --features cuda -p dinod
  # `cargo check` runs the build scripts but never links, so a library the final link
  # needs and this toolkit lacks (NCCL once) would show only in a full build: link an
  # empty program against every library the CUDA crates' build scripts ask for
  libs=() dirs=()
  for crate in cudarc candle-kernels; do
    out=$(ls -t "$TARGET"/release/build/"$crate"-*/output 2>/dev/null | head -1)
    [ -n "$out" ] || die "no build-script output of $crate under $TARGET (did cargo check run it?)"
    while IFS= read -r l; do libs+=("-l${l##*=}"); done < <(sed -n 's/^cargo::\{0,1\}rustc-link-lib=//p' "$out")
    while IFS= read -r d; do dirs+=("-L${d##*=}"); done < <(sed -n 's/^cargo::\{0,1\}rustc-link-search=//p' "$out")
  done
  echo 'int main(void) { return 0; }' >"$TARGET/link-check.c"
  gcc "$TARGET/link-check.c" -o "$TARGET/link-check" "${dirs[@]}" -Wl,--no-as-needed "${libs[@]}" ||
    die "the link would fail: a library above is missing from $CUDA_ROOT (libraries: ${libs[*]})"
  say "links against: ${libs[*]}"
  say "ok"
  exit 0
fi
say "cargo build --release --locked --features cuda -p dinod (target $TARGET)"
start=$(date +%s)
nice -n 19 cargo build --release --locked --features cuda -p dinod
took=$(($(date +%s) - start))

# ---------------------------------------------------------------- 4. report
BIN="$TARGET/release/dinod"
[ -x "$BIN" ] || die "the build produced no $BIN"
say "built in $((took / 60)) min $((took % 60)) s"
echo "binary:  $BIN"
echo "size:    $(du -h "$BIN" | cut -f1) ($(stat -c %s "$BIN") bytes)"
echo "NEEDED:"
if command -v readelf >/dev/null; then
  readelf -d "$BIN" | sed -n 's/.*(NEEDED).*\[\(.*\)\]/  \1/p'
else
  objdump -p "$BIN" | awk '/NEEDED/ {print "  " $2}'
fi
echo "ldd (with the toolkit's libraries and the driver stub on LD_LIBRARY_PATH):"
LD_LIBRARY_PATH="$CUDA_ROOT/lib:$CUDA_ROOT/lib/stubs${LD_LIBRARY_PATH:+:$LD_LIBRARY_PATH}" ldd "$BIN" | sed 's/^/  /'
echo "PTX / SASS targets embedded:"
if command -v cuobjdump >/dev/null; then
  cuobjdump --list-ptx --list-elf "$BIN" 2>/dev/null | sed -n 's/.*\(sm_[0-9a-z]*\).*/\1/p' | sort | uniq -c | sed 's/^/  /' || true
fi
echo "run it with: LD_LIBRARY_PATH=<dirs of libcudart.so.13, libcublas.so.13, libcublasLt.so.13, libcurand.so.10, libnccl.so.2>:<dir of the driver's libcuda.so.1> $BIN ..."

# ---------------------------------------------------------------- 5. the bundle
if [ -n "$BUNDLE" ]; then
  GOLDEN=${DINOD_GOLDEN:-$ROOT/../shared/golden}
  [ -f "$GOLDEN/train_step.safetensors" ] || die "no golden fixtures in $GOLDEN (set DINOD_GOLDEN)"
  command -v xz >/dev/null || die "xz is needed for --bundle"
  mkdir -p "$BUNDLE"
  tmp=$(mktemp)
  cp "$BIN" "$tmp" && strip "$tmp"
  xz -6 -T0 -c "$tmp" >"$BUNDLE/dinod.xz"
  rm -f "$tmp"
  rm -rf "$BUNDLE/golden" && cp -r "$GOLDEN" "$BUNDLE/golden" && chmod -R u+w "$BUNDLE/golden"
  say "bundle in $BUNDLE: dinod.xz $(du -h "$BUNDLE/dinod.xz" | cut -f1), golden/ $(du -sh "$BUNDLE/golden" | cut -f1)"
  echo "on the GPU machine, in a checkout: DINOD=$BUNDLE/dinod.xz DINOD_GOLDEN=$BUNDLE/golden scripts/gpu-check.sh"
fi
