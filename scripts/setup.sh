#!/usr/bin/env bash
# Install everything sphere needs on a fresh Debian machine: system peers, then a venv.
set -euo pipefail
cd "$(dirname "$0")/.."

need=()
command -v Orthanc >/dev/null || need+=(orthanc)
[ -e /usr/share/orthanc/plugins/libOrthancDicomWeb.so ] || need+=(orthanc-dicomweb)
command -v storescp >/dev/null || need+=(dcmtk)
ls /usr/lib/postgresql/*/bin/initdb >/dev/null 2>&1 || need+=(postgresql)  # tests: PostgreSQL catalog
command -v npm >/dev/null || need+=(npm)  # fetches the OHIF viewer's prebuilt files
command -v chromium >/dev/null || need+=(chromium)  # tests: the viewer in a headless browser
command -v dcm2niix >/dev/null || need+=(dcm2niix)  # benchmarks/bench_export.py: the NIfTI baseline
if [ ${#need[@]} -gt 0 ]; then
  if [ "$(id -u)" = 0 ]; then SUDO=""; else SUDO="sudo"; fi
  echo "installing Debian packages: ${need[*]}"
  $SUDO apt-get update -qq
  DEBIAN_FRONTEND=noninteractive $SUDO apt-get install -y -qq --no-install-recommends "${need[@]}"
  # The system services these packages may start are not ours: tests start their own.
  command -v systemctl >/dev/null && $SUDO systemctl disable --now orthanc postgresql 2>/dev/null || true
fi

PY=${PYTHON:-python3}
[ -x .venv/bin/python ] || "$PY" -m venv .venv
.venv/bin/pip install -q --upgrade pip
# Pinned: an unpinned torch pulls GBs of CUDA wheels; 2.13.0 is the CPU build.
.venv/bin/pip install -q "torch==2.13.0"
.venv/bin/pip install -q -e ".[dev]"

# The OHIF viewer (`sphere serve` at /viewer/): npm's prebuilt dist, never committed. Only the
# tarball is fetched (no dependency tree); its onnxruntime models (dist/ort, ~136 MB) are left out.
OHIF_VERSION=3.13.2
if [ "$(cat .viewer/VERSION 2>/dev/null)" != "$OHIF_VERSION" ] || [ ! -f .viewer/dist/index.html ]; then
  command -v npm >/dev/null || { echo "setup: npm is missing (apt-get install npm)" >&2; exit 1; }
  echo "fetching the OHIF viewer @ohif/app@$OHIF_VERSION"
  rm -rf .viewer && mkdir -p .viewer/tmp
  (cd .viewer/tmp && npm pack --silent "@ohif/app@$OHIF_VERSION" >/dev/null) ||
    { echo "setup: npm pack @ohif/app@$OHIF_VERSION failed (is the npm registry reachable?)" >&2; exit 1; }
  tar -xzf .viewer/tmp/ohif-app-"$OHIF_VERSION".tgz -C .viewer/tmp --exclude='package/dist/ort'
  mv .viewer/tmp/package/dist .viewer/dist && rm -rf .viewer/tmp
  echo "$OHIF_VERSION" > .viewer/VERSION
fi
touch .venv/.installed
echo "sphere is installed in .venv"
