#!/usr/bin/env bash
# One entry point for a fresh machine: creates or refreshes the project's virtual environment,
# installs everything (apt packages, torch pinned, pip packages, this package), then runs a job.
#   bash tools/dev.sh demo            the main job on the embedded default (demo world + model)
#   bash tools/dev.sh test [ARGS]     the whole test suite (ARGS go to pytest)
#   bash tools/dev.sh setup           only the installation
#   bash tools/dev.sh bench [ARGS]    the benchmarks (`geozoom bench ARGS`)
set -euo pipefail
cd "$(dirname "$0")/.."
ROOT=$(pwd)
VENV=${GEOZOOM_VENV:-$ROOT/.venv}
TORCH_VERSION=2.13.0
APT_PACKAGES="libegl1 libgl1 libegl-mesa0 libgl1-mesa-dri"

log() { printf '[geozoom setup] %s\n' "$*" >&2; }

# pip, without the notices about local package folders that this machine's pip.conf names.
pip_q() {
    "$VENV/bin/python" -m pip install -q "$@" 2>&1 | { grep -v '^WARNING: Location' || true; }
    return "${PIPESTATUS[0]}"
}

install_apt() {
    local missing=()
    for p in $APT_PACKAGES; do
        dpkg -s "$p" >/dev/null 2>&1 || missing+=("$p")
    done
    [ ${#missing[@]} -eq 0 ] && return 0
    if [ "$(id -u)" -ne 0 ]; then
        log "missing Debian packages: ${missing[*]} (run as root or install them: apt-get install ${missing[*]})"
        return 0
    fi
    log "installing Debian packages: ${missing[*]}"
    apt-get update -qq && DEBIAN_FRONTEND=noninteractive apt-get install -y -qq "${missing[@]}" >/dev/null
}

install_venv() {
    [ -x "$VENV/bin/python" ] || { log "creating $VENV"; python3 -m venv "$VENV"; }
    local py="$VENV/bin/python" stamp="$VENV/.geozoom-requirements"
    local want
    want="torch==$TORCH_VERSION $(sha256sum requirements.txt | cut -c1-16)"
    if [ "$(cat "$stamp" 2>/dev/null)" != "$want" ]; then
        log "installing torch==$TORCH_VERSION and requirements.txt (first run: about 2 minutes)"
        pip_q --upgrade pip
        pip_q "torch==$TORCH_VERSION"
        pip_q -r requirements.txt "torch==$TORCH_VERSION"
        echo "$want" > "$stamp"
    fi
    log "installing geozoom_ros into $VENV"
    pip_q --no-deps --force-reinstall --no-build-isolation .
}

setup_env() {
    export AMENT_PREFIX_PATH="$VENV${AMENT_PREFIX_PATH:+:$AMENT_PREFIX_PATH}"
    export PATH="$VENV/bin:$PATH"
    export ROS_AUTOMATIC_DISCOVERY_RANGE=LOCALHOST
    export MPLBACKEND=Agg
}

cmd=${1:-setup}
shift || true
install_apt
install_venv
setup_env
case "$cmd" in
    setup) log "ready: $VENV" ;;
    demo) exec "$VENV/bin/geozoom" demo "$@" ;;
    test)
        export ROS_DOMAIN_ID=${ROS_DOMAIN_ID:-$(( (RANDOM % 100) + 100 ))}
        # Run against the installed copy, as a user would; the source tree is not on sys.path.
        cd "$ROOT/test"
        exec "$VENV/bin/python" -m pytest -c "$ROOT/setup.cfg" --rootdir "$ROOT" -p no:cacheprovider "$@" "$ROOT/test"
        ;;
    bench) exec "$VENV/bin/geozoom" bench "$@" ;;
    *) log "unknown command '$cmd' (use: setup, demo, test, bench)"; exit 2 ;;
esac
