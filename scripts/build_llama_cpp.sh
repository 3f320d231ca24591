#!/usr/bin/env bash
# Build llama.cpp's reference tools (llama-quantize, llama-perplexity, llama-imatrix) and libggml-base.so
# from the llama-cpp-python==0.3.36 sdist, cached outside the repo and reused (SPEC §7).
set -euo pipefail
VERSION=0.3.36
CACHE="${RAMP_CACHE:-$HOME/.cache/ramp}"
ROOT="$CACHE/llama-cpp-python-$VERSION"
SRC="$ROOT/src/llama_cpp_python-$VERSION/vendor/llama.cpp"
BUILD="$ROOT/build"
STAMP="$BUILD/.ramp-built"
PIP="${PIP:-pip}"

if [ -f "$STAMP" ]; then
  echo "llama.cpp tools already built in $BUILD/bin"
  exit 0
fi
mkdir -p "$ROOT/sdist" "$ROOT/src"
if [ ! -f "$ROOT/sdist/llama_cpp_python-$VERSION.tar.gz" ]; then
  echo "downloading llama-cpp-python==$VERSION sdist"
  $PIP download --quiet --no-deps --no-binary :all: "llama-cpp-python==$VERSION" -d "$ROOT/sdist"
fi
if [ ! -d "$SRC" ]; then
  echo "extracting sdist"
  tar xzf "$ROOT/sdist/llama_cpp_python-$VERSION.tar.gz" -C "$ROOT/src"
fi
echo "configuring llama.cpp in $BUILD"
cmake -S "$SRC" -B "$BUILD" -G Ninja -DCMAKE_BUILD_TYPE=Release -DGGML_NATIVE=OFF -DBUILD_SHARED_LIBS=ON \
  -DLLAMA_BUILD_SERVER=OFF -DLLAMA_BUILD_TESTS=OFF -DLLAMA_BUILD_EXAMPLES=OFF -DLLAMA_OPENSSL=OFF \
  -DLLAMA_CURL=OFF > "$ROOT/cmake-configure.log"
echo "building llama-perplexity llama-quantize llama-imatrix (several minutes on 2 cores)"
cmake --build "$BUILD" -j"${JOBS:-2}" --target llama-perplexity llama-quantize llama-imatrix
touch "$STAMP"
echo "llama.cpp tools built in $BUILD/bin"
