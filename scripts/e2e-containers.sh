#!/usr/bin/env bash
# make e2e-containers: build the CPU image with podman on a locally bootstrapped Debian base, then run a tiny
# pipeline through the compose executor, one container per step (tests/containers/test_e2e_containers.py).
#
#   scripts/e2e-containers.sh          # build + run (make e2e-containers)
#   scripts/e2e-containers.sh build    # build only  (make image)
#
# Environment (all optional; the defaults suit a machine with only PyPI and Debian mirrors reachable):
#   IMAGE            tag to build and test                 [ghcr.io/asr-ft/asr-ft:<asr-ft --version>]
#   BASE_IMAGE       base image                            [localhost/debian:bookworm-min, made with debootstrap
#                                                           when missing; python:3.11-slim-bookworm also works]
#   DEBIAN_MIRROR    for debootstrap                       [http://deb.debian.org/debian]
#   TORCH_SPEC       torch to install                      [the venv's torch, e.g. torch==2.13.0+cpu]
#   TORCH_WHEEL_DIR  folder holding that torch wheel, bind-mounted into the build
#                                                          [pip's find-links setting, when it holds the wheel]
#   TORCH_INDEX_URL  torch index when no wheel folder      [https://download.pytorch.org/whl/cpu]
#   CA_BUNDLE        CA bundle for pip behind a TLS-intercepting proxy (a build secret) [pip's cert setting]
#   PYTHON           the project's Python                  [.venv/bin/python]
# Needs root (or sudo) for apt-get, debootstrap and rootful podman. podman runs with runc and explicit
# ulimits (containers.conf written to a temporary folder): crun fails on some cgroup setups.
set -euo pipefail
cd "$(dirname "$0")/.."

mode=${1:-all}
PYTHON=${PYTHON:-.venv/bin/python}
BASE_IMAGE=${BASE_IMAGE:-localhost/debian:bookworm-min}
DEBIAN_MIRROR=${DEBIAN_MIRROR:-http://deb.debian.org/debian}
VERSION=$("$PYTHON" -c 'from common.core.stage import code_version; print(code_version())')
IMAGE=${IMAGE:-ghcr.io/asr-ft/asr-ft:$VERSION}
as_root() {  # apt-get, debootstrap and (rootful) podman
    if [ "$(id -u)" = 0 ]; then "$@"; else sudo --preserve-env=CONTAINERS_CONF,ASRFT_E2E_IMAGE,HF_HUB_OFFLINE "$@"; fi
}
work=$(mktemp -d)
cleanup() { as_root rm -rf "$work"; }
trap cleanup EXIT
say() { printf '\n== %s\n' "$*" >&2; }

# --- tools --------------------------------------------------------------------------------------------------
missing=""
for tool in podman:podman runc:runc debootstrap:debootstrap; do
    command -v "${tool%%:*}" >/dev/null 2>&1 || missing="$missing ${tool##*:}"
done
if [ -n "$missing" ]; then
    say "installing$missing"
    as_root apt-get update -qq
    as_root env DEBIAN_FRONTEND=noninteractive apt-get install -y -qq $missing >/dev/null
fi
cat > "$work/containers.conf" <<'EOF'
[engine]
runtime = "runc"
[containers]
default_ulimits = ["nofile=1024:1024", "nproc=1024:1024"]
EOF
export CONTAINERS_CONF="$work/containers.conf"

# --- base image ---------------------------------------------------------------------------------------------
if [ "$BASE_IMAGE" = localhost/debian:bookworm-min ] && ! as_root podman image exists "$BASE_IMAGE"; then
    say "bootstrapping $BASE_IMAGE (debootstrap --variant=minbase bookworm)"
    t0=$SECONDS
    as_root debootstrap --variant=minbase bookworm "$work/rootfs" "$DEBIAN_MIRROR" >"$work/debootstrap.log" 2>&1 \
        || { tail -20 "$work/debootstrap.log" >&2; exit 1; }
    as_root tar -C "$work/rootfs" -c . | as_root podman import - "$BASE_IMAGE" >/dev/null
    as_root rm -rf "$work/rootfs"
    echo "base image in $((SECONDS - t0)) s" >&2
fi

# --- where torch comes from ---------------------------------------------------------------------------------
TORCH_SPEC=${TORCH_SPEC:-$("$PYTHON" -c 'import torch; print("torch==" + torch.__version__)')}
torch_version=${TORCH_SPEC#torch==}
if [ -z "${TORCH_WHEEL_DIR:-}" ]; then
    for dir in ${PIP_FIND_LINKS:-} $("$PYTHON" -m pip config get global.find-links 2>/dev/null || true); do
        if compgen -G "$dir/torch-$torch_version-*.whl" >/dev/null; then TORCH_WHEEL_DIR=$dir; break; fi
    done
fi
build_args=(--build-arg "BASE_IMAGE=$BASE_IMAGE" --build-arg "TORCH_SPEC=$TORCH_SPEC" --build-arg "VERSION=$VERSION"
            --build-arg "REVISION=$(git rev-parse HEAD 2>/dev/null || echo unknown)"
            --build-arg "CREATED=$(date -u +%Y-%m-%dT%H:%M:%SZ)")
if [ -n "${TORCH_WHEEL_DIR:-}" ]; then
    # Bind-mounted into the RUN steps at a fixed path: the build args (hence the layer cache) stay the same.
    build_args+=(--volume "$(realpath "$TORCH_WHEEL_DIR"):/torch-wheels:ro"
                 --build-arg "TORCH_FIND_LINKS=/torch-wheels" --build-arg "TORCH_INDEX_URL=")
    echo "torch: $TORCH_SPEC from the wheel folder $TORCH_WHEEL_DIR" >&2
else
    build_args+=(--build-arg "TORCH_INDEX_URL=${TORCH_INDEX_URL:-https://download.pytorch.org/whl/cpu}")
    echo "torch: $TORCH_SPEC from ${TORCH_INDEX_URL:-https://download.pytorch.org/whl/cpu}" >&2
fi
CA_BUNDLE=${CA_BUNDLE:-${PIP_CERT:-$("$PYTHON" -m pip config get global.cert 2>/dev/null || true)}}
if [ -n "$CA_BUNDLE" ] && [ -f "$CA_BUNDLE" ]; then build_args+=(--secret "id=ca_bundle,src=$CA_BUNDLE"); fi

# --- build --------------------------------------------------------------------------------------------------
say "building $IMAGE (images/Dockerfile on $BASE_IMAGE)"
t0=$SECONDS
set +o pipefail  # the build's own status, not grep's
as_root podman build --network host -f images/Dockerfile -t "$IMAGE" "${build_args[@]}" . 2>&1 \
    | tee "$work/build.log" | grep --line-buffered -E '^(STEP [0-9]+/[0-9]+: (RUN|FROM)|COMMIT|Successfully tagged)' >&2
status=${PIPESTATUS[0]}
set -o pipefail
if [ "$status" != 0 ] || ! grep -q '^Successfully tagged' "$work/build.log"; then
    tail -40 "$work/build.log" >&2
    echo "podman build failed (exit $status); its last lines are above" >&2
    exit 1
fi
build_s=$((SECONDS - t0))
echo "image $IMAGE built in ${build_s} s ($(as_root podman image inspect "$IMAGE" --format '{{.Size}}' | numfmt --to=si)B)" >&2
[ "$mode" = build ] && exit 0

# --- run ----------------------------------------------------------------------------------------------------
say "running the tiny pipeline in containers (tests/containers)"
t0=$SECONDS
export ASRFT_E2E_IMAGE=$IMAGE HF_HUB_OFFLINE=1
as_root "$PYTHON" -m pytest -m containers tests/containers -q -s -p no:cacheprovider
run_s=$((SECONDS - t0))
echo "e2e-containers: image build ${build_s} s + pipeline test ${run_s} s = $((build_s + run_s)) s" >&2
