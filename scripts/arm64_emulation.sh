#!/usr/bin/env bash
# Set up a 64-bit ARM Python with plain onnxruntime, run under qemu-user emulation, so the
# portable adaptation step can be checked for aarch64 on an x86-64 machine (root needed).
#   bash scripts/arm64_emulation.sh [ROOT=/opt/edgetta-arm64]
# then: python -m pytest -m slow tests/test_arm64.py tests/test_platforms.py
set -euo pipefail
ROOT="${1:-/opt/edgetta-arm64}"
DEBS="python3.11-minimal libpython3.11-minimal libpython3.11-stdlib libc6 libexpat1 zlib1g libffi8
      libssl3 libbz2-1.0 liblzma5 libstdc++6 libgcc-s1 libsqlite3-0 libuuid1 libncursesw6 libtinfo6
      libreadline8 libcrypt1 libnsl2 libtirpc3 libdb5.3 libgdbm6"
dpkg --add-architecture arm64
apt-get update -qq
DEBIAN_FRONTEND=noninteractive apt-get install -y -qq qemu-user-static >/dev/null
work="$(mktemp -d)"
( cd "$work" && apt-get download $(for d in $DEBS; do echo "$d:arm64"; done) >/dev/null 2>&1 )
mkdir -p "$ROOT/sysroot" "$ROOT/site"
for f in "$work"/*.deb; do dpkg -x "$f" "$ROOT/sysroot"; done
# onnxruntime 1.19.2: 1.3x aarch64 wheels crash on import under qemu-user (an emulation limit)
python3 -m pip download -q --only-binary=:all: --no-deps --python-version 3.11 --implementation cp \
  --platform manylinux_2_28_aarch64 --platform manylinux_2_27_aarch64 --platform manylinux2014_aarch64 \
  -d "$work/wheels" onnxruntime==1.19.2 numpy packaging protobuf flatbuffers pillow psutil
for w in "$work"/wheels/*.whl; do python3 -m zipfile -e "$w" "$ROOT/site"; done
# pip itself (pure Python), run from its wheel by the arm64 Python: tests/test_platforms.py
# installs the edgetta wheel with it, letting pip resolve the aarch64 wheels natively
mkdir -p "$ROOT/pip"
python3 -m pip download -q --only-binary=:all: --no-deps -d "$ROOT/pip" pip
rm -rf "$work"
echo "arm64 Python: qemu-aarch64-static -L $ROOT/sysroot $ROOT/sysroot/usr/bin/python3.11 (PYTHONPATH=$ROOT/site)"
