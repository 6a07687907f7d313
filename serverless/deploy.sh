#!/usr/bin/env bash
# Deploy tapmask's CVAT functions to nuclio (the `cvat` project, local platform, as CVAT's own
# serverless/deploy_*.sh do).
#
#   serverless/deploy.sh [--gpu] [--dry-run] [all | FUNCTION...]
#
# FUNCTION is a folder of serverless/ with a nuclio/function.yaml (default: all of them); the
# folders are generated from the table in serverless/functions.py (make cvat-functions).
# --gpu deploys function-gpu.yaml where a function has one (grabcut is CPU only).
# --dry-run prints the commands instead of running them.
#
# Each function is staged in a temporary directory: its nuclio/ folder plus a wheel of this
# checkout in wheels/, which the YAML's build directives install (`pip install --find-links
# /opt/nuclio/wheels 'tapmask[extra]'`, then the wheel itself over any installed tapmask, so the
# function always runs the code being deployed). Then:
#   nuctl deploy --project-name cvat --path <stage> --file <stage>/<yaml> --platform local
#
# Base image: the YAMLs name tapmask/tapmask-cpu:latest / tapmask/tapmask-gpu:latest (built from
# docker/, with tapmask and its extras preinstalled, so builds are fast and offline). When that
# image is not present locally, python:3.11-slim is used instead and the directives install
# everything from PyPI (CPU builds take torch from the PyTorch CPU index).
#
# Environment:
#   MODELS_DIR   host folder with the checkpoints, mounted read-only at /models
#                (default /opt/tapmask/models; `tapmask weights sam-vit_h --dest DIR` fills it)
#   BASE_IMAGE   force a base image (skips the local-image check)
#   NUCTL        nuctl binary (default nuctl); PLATFORM (default local); PROJECT (default cvat)
#   PYTHON       python used to build the wheel (default: .venv/bin/python, else python3)
set -euo pipefail

HERE="$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)"
REPO="$(cd "$HERE/.." && pwd)"
FUNCTIONS=()
for yaml in "$HERE"/*/nuclio/function.yaml; do
    function_dir="${yaml%/nuclio/function.yaml}"
    FUNCTIONS+=("${function_dir##*/}")
done
FALLBACK_BASE_IMAGE="python:3.11-slim"
DEFAULT_MODELS_DIR="/opt/tapmask/models"

NUCTL="${NUCTL:-nuctl}"
PLATFORM="${PLATFORM:-local}"
PROJECT="${PROJECT:-cvat}"
MODELS_DIR="${MODELS_DIR:-$DEFAULT_MODELS_DIR}"
if [[ -z "${PYTHON:-}" ]]; then
    if [[ -x "$REPO/.venv/bin/python" ]]; then PYTHON="$REPO/.venv/bin/python"; else PYTHON=python3; fi
fi

gpu=0
dry=0
selected=()
for arg in "$@"; do
    case "$arg" in
        --gpu) gpu=1 ;;
        --dry-run) dry=1 ;;
        -h|--help) sed -n '2,${/^#/!q;p;}' "${BASH_SOURCE[0]}" | sed 's/^# \{0,1\}//'; exit 0 ;;
        all) selected+=("${FUNCTIONS[@]}") ;;
        -*) echo "deploy.sh: unknown option $arg" >&2; exit 2 ;;
        *)
            if [[ ! -f "$HERE/$arg/nuclio/function.yaml" ]]; then
                echo "deploy.sh: no function '$arg' (known: ${FUNCTIONS[*]})" >&2
                exit 2
            fi
            selected+=("$arg") ;;
    esac
done
[[ ${#selected[@]} -gt 0 ]] || selected=("${FUNCTIONS[@]}")

run() {
    printf '+'; printf ' %q' "$@"; printf '\n'
    if [[ $dry -eq 0 ]]; then "$@"; fi
}

stage_root="$(mktemp -d "${TMPDIR:-/tmp}/tapmask-nuclio.XXXXXX")"
trap 'rm -rf "$stage_root"' EXIT

# Build the wheel from a copy, so the checkout gets no build/ or *.egg-info litter.
wheels="$stage_root/wheels"
src="$stage_root/src"
mkdir -p "$src"
cp -R "$REPO/pyproject.toml" "$REPO/README.md" "$REPO/backends" "$src/"
run "$PYTHON" -m pip wheel --quiet --no-deps --wheel-dir "$wheels" "$src"

if [[ $dry -eq 0 ]]; then
    "$NUCTL" create project "$PROJECT" --platform "$PLATFORM" >/dev/null 2>&1 || true
else
    run "$NUCTL" create project "$PROJECT" --platform "$PLATFORM"
fi

for name in "${selected[@]}"; do
    source_dir="$HERE/$name/nuclio"
    yaml="function.yaml"
    if [[ $gpu -eq 1 ]]; then
        if [[ -f "$source_dir/function-gpu.yaml" ]]; then
            yaml="function-gpu.yaml"
        else
            echo "deploy.sh: $name has no GPU variant; deploying $yaml (CPU)" >&2
        fi
    fi

    stage="$stage_root/$name"
    mkdir -p "$stage"
    cp -R "$source_dir/." "$stage/"
    rm -rf "$stage/__pycache__"
    if [[ $dry -eq 0 ]]; then
        cp -R "$wheels" "$stage/wheels"
    fi
    if [[ "$MODELS_DIR" != "$DEFAULT_MODELS_DIR" ]]; then
        sed -i.orig "s#path: $DEFAULT_MODELS_DIR\$#path: $MODELS_DIR#" "$stage/$yaml"
        rm -f "$stage/$yaml.orig"
    fi

    base_args=()
    yaml_base="$(sed -n 's/^ *baseImage: *//p' "$stage/$yaml" | head -n 1)"
    if [[ -n "${BASE_IMAGE:-}" ]]; then
        base_args=(--base-image "$BASE_IMAGE")
    elif [[ $dry -eq 0 ]] && docker image inspect "$yaml_base" >/dev/null 2>&1; then
        base_args=(--no-pull)  # a locally built image: there is no registry to pull it from
    else
        [[ $dry -eq 1 ]] && echo "# if $yaml_base is not built locally:"
        base_args=(--base-image "$FALLBACK_BASE_IMAGE")
    fi

    run "$NUCTL" deploy --project-name "$PROJECT" --path "$stage" --file "$stage/$yaml" \
        --platform "$PLATFORM" "${base_args[@]}"
done
