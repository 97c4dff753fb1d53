#!/usr/bin/env bash
# make image-test: build the serving and trainer images from the Dockerfile and run them for real.
#   1. a Docker engine: docker.io and docker-compose from apt where missing, dockerd started
#      where it is not running (both need root);
#   2. the bases: the Dockerfile's own where they can be pulled, else a Debian bookworm made here
#      from Debian's packages (mmdebstrap, installed where missing), which trusts the CAs this
#      machine trusts;
#   3. both images built, tagged as docker-compose.yml names them;
#   4. the serving image, as the user it declares, with the demo model in a volume: healthy,
#      /detect on a photo alike to `ssd serve` outside the container, /metrics, gRPC ServerLive;
#   5. the trainer image: --help, then deploy/retrain.sh on a small synthetic set into the same
#      volume, and the running detector serving what the promotion gate decided;
#   6. SIGTERM (docker stop, the compose grace period): exit 0 within it, having drained;
#   7. `docker compose --profile cpu up detector-cpu` (docker-compose 1.29 where the client has no
#      compose plugin) with the built image: healthy, /detect.
# Each step's time, the build times and the image sizes are printed at the end.
# IMAGE_TEST_EPOCHS (2) and IMAGE_TEST_IMAGES (48) size the retraining.
set -euo pipefail
cd "$(dirname "$0")/.."

prefix=ssd-image-test
local_base=ssd-local/debian:bookworm
serving_image=ssd-detector:latest
trainer_image=ssd-detector-trainer:latest
photo=photos/val2017/000000183709.jpg
grace_s=45 # docker-compose.yml's stop_grace_period
epochs="${IMAGE_TEST_EPOCHS:-2}"
images="${IMAGE_TEST_IMAGES:-48}"
started=$SECONDS
step_started=$SECONDS
report=()

step() {
    printf '\n==> %s\n' "$1"
    step_started=$SECONDS
}

done_step() {
    report+=("$(printf '%-46s %5d s' "$1" $((SECONDS - step_started)))")
    echo "${report[-1]}"
}

fail() {
    echo "image-test: FAILED: $*" >&2
    exit 1
}

local_server_pid=""
compose_cmd=(docker-compose)
cleanup() {
    if [ -n "$local_server_pid" ]; then kill "$local_server_pid" 2>/dev/null || true; fi
    docker rm -f "$prefix-serving" >/dev/null 2>&1 || true
    "${compose_cmd[@]}" -p "$prefix" --profile cpu down --volumes >/dev/null 2>&1 || true
    docker volume rm -f "$prefix-models" "$prefix-runs" "$prefix-data" >/dev/null 2>&1 || true
}
trap cleanup EXIT

# The Dockerfile's defaults, read from it, so that the two never disagree.
dockerfile_arg() {
    sed -n "s/^ARG $1=//p" Dockerfile
}

wait_healthy() { # container, seconds
    local deadline=$((SECONDS + $2)) status
    while [ $SECONDS -lt $deadline ]; do
        status=$(docker inspect -f '{{if .State.Health}}{{.State.Health.Status}}{{end}} {{.State.Status}}' "$1")
        case "$status" in
        "healthy running") return 0 ;;
        *exited* | *dead*) docker logs "$1" 2>&1 | tail -30 >&2 && fail "$1 exited before it was healthy" ;;
        esac
        sleep 2
    done
    docker logs "$1" 2>&1 | tail -30 >&2
    fail "$1 not healthy within $2 s (last: $status)"
}

host_url() { # container, port inside it
    echo "http://$(docker port "$1" "$2/tcp" | sed -n 1p)"
}

probe() {
    uv run --frozen python deploy/image_probe.py "$@"
}

# ---- 1. the engine ------------------------------------------------------------------------------
step "Docker engine"
# Compose v2 (`docker compose`) where the client has it; else Debian's docker-compose 1.29, since
# Debian packages no v2 plugin.
if docker compose version >/dev/null 2>&1; then compose_cmd=(docker compose); fi
missing=()
command -v dockerd >/dev/null || missing+=(docker.io)
if [ "${compose_cmd[0]}" = docker-compose ] && ! command -v docker-compose >/dev/null; then
    missing+=(docker-compose)
fi
if [ ${#missing[@]} -gt 0 ]; then
    apt-get update -qq
    DEBIAN_FRONTEND=noninteractive apt-get install -y -qq "${missing[@]}"
fi
if ! docker info >/dev/null 2>&1; then
    nohup dockerd >/var/log/dockerd.log 2>&1 &
    for _ in $(seq 60); do
        if docker info >/dev/null 2>&1; then break; fi
        sleep 1
    done
    docker info >/dev/null 2>&1 || fail "dockerd did not start (see /var/log/dockerd.log)"
fi
docker version --format 'engine {{.Server.Version}}, client {{.Client.Version}}'
"${compose_cmd[@]}" version --short
cleanup
done_step "engine"

# ---- 2. the bases -------------------------------------------------------------------------------
step "Base images"
cuda_base=$(dockerfile_arg CUDA_BASE)
python_base=$(dockerfile_arg PYTHON_BASE)
python=$(dockerfile_arg PYTHON)
have_or_pull() {
    docker image inspect "$1" >/dev/null 2>&1 || timeout 900 docker pull "$1" >/dev/null 2>&1
}
if ! have_or_pull "$cuda_base" || ! have_or_pull "$python_base"; then
    echo "cannot pull $cuda_base and $python_base: building $local_base from Debian's packages"
    if ! docker image inspect "$local_base" >/dev/null 2>&1; then
        base_started=$SECONDS
        if ! command -v mmdebstrap >/dev/null; then
            DEBIAN_FRONTEND=noninteractive apt-get install -y -qq mmdebstrap
        fi
        # A TLS-inspecting proxy's CA, where this machine has one, so that pip and uv reach PyPI
        # from inside the build (uv reads SSL_CERT_FILE; pip, PIP_CERT). The hook's $1 is the new
        # root, expanded by mmdebstrap's shell, not this one.
        # shellcheck disable=SC2016
        mmdebstrap --quiet --variant=minbase --include=ca-certificates,python3,python3-venv \
            --customize-hook='if [ -n "$(ls -A /usr/local/share/ca-certificates)" ]; then
                cp -r /usr/local/share/ca-certificates/. "$1/usr/local/share/ca-certificates/"
                chroot "$1" update-ca-certificates; fi' \
            bookworm - |
            docker import \
                --change 'ENV PATH=/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin' \
                --change 'ENV SSL_CERT_FILE=/etc/ssl/certs/ca-certificates.crt PIP_CERT=/etc/ssl/certs/ca-certificates.crt' \
                --change 'CMD ["bash"]' - "$local_base" >/dev/null
        report+=("$(printf '%-46s %5d s' "  local base built (mmdebstrap)" $((SECONDS - base_started)))")
        echo "${report[-1]}"
    fi
    cuda_base=$local_base python_base=$local_base python=python3.11
fi
echo "serving base $cuda_base ($python), trainer base $python_base"
done_step "bases"

# ---- 3. the images ------------------------------------------------------------------------------
build_args=(--build-arg "CUDA_BASE=$cuda_base" --build-arg "PYTHON_BASE=$python_base" --build-arg "PYTHON=$python")
# The trainer first: the classic builder (docker.io has no buildx) builds every stage before the
# target, so the serving build then finds the trainer's layers cached.
previous=$(docker image inspect -f '{{.Id}}' "$trainer_image" "$serving_image" 2>/dev/null || true)
step "Build the trainer image"
docker build --quiet --target trainer "${build_args[@]}" -t "$trainer_image" .
done_step "build trainer"
step "Build the serving image"
docker build --quiet --target serving "${build_args[@]}" -t "$serving_image" .
done_step "build serving"
# The images these tags named before, where a build changed them (a cached build gives the same
# image back, which stays); those still in use as cache stay too.
current=$(docker image inspect -f '{{.Id}}' "$trainer_image" "$serving_image")
for id in $previous; do
    if ! grep -qx "$id" <<<"$current"; then docker rmi "$id" >/dev/null 2>&1 || true; fi
done

# ---- 4. the serving image -----------------------------------------------------------------------
step "Serving image: healthy, /detect as outside it, /metrics, gRPC"
user=$(docker image inspect -f '{{.Config.User}}' "$serving_image")
[ -n "$user" ] && [ "$user" != "0" ] && [ "$user" != "root" ] || fail "the serving image runs as root"
if docker run --rm --entrypoint python "$serving_image" -c "import torch" 2>/dev/null; then
    fail "torch is in the serving image"
fi
# A fresh named volume takes /models' owner from the image: the declared user can write it.
docker run --rm -v "$prefix-models:/models" -v "$PWD/models:/src:ro" --entrypoint cp "$serving_image" \
    /src/demo.onnx /models/model.onnx
docker run -d --name "$prefix-serving" -v "$prefix-models:/models" \
    -e SSD_PROVIDERS=cpu -e SSD_MODEL_POLL_S=2 -p 127.0.0.1::8000 -p 127.0.0.1::8001 "$serving_image" >/dev/null
wait_healthy "$prefix-serving" 120
[ "$(docker exec "$prefix-serving" id -u)" = "$user" ] || fail "the server does not run as $user"
url=$(host_url "$prefix-serving" 8000)
local_port=$(uv run --frozen python -c "import socket; s = socket.socket(); s.bind(('127.0.0.1', 0)); print(s.getsockname()[1])")
SSD_PROVIDERS=cpu SSD_GRPC_PORT=0 uv run --frozen ssd serve --model models/demo.onnx --port "$local_port" \
    >"${TMPDIR:-/tmp}/$prefix-local-serve.log" 2>&1 &
local_server_pid=$!
for _ in $(seq 120); do
    if curl -fs "http://127.0.0.1:$local_port/readyz" >/dev/null; then break; fi
    sleep 1
done
probe same-detections "$url" "http://127.0.0.1:$local_port" "$photo"
kill "$local_server_pid" && wait "$local_server_pid" || true
local_server_pid=""
probe metrics "$url"
grpc_target=$(docker port "$prefix-serving" 8001/tcp | sed -n 1p)
probe grpc-live "$grpc_target"
done_step "serving: health, detect, metrics, grpc"

# ---- 5. the trainer image -----------------------------------------------------------------------
step "Trainer image: --help, retrain.sh into the served volume"
docker run --rm "$trainer_image" --help >/dev/null
trainer_volumes=(-v "$prefix-models:/models" -v "$prefix-runs:/runs" -v "$prefix-data:/data")
docker run --rm "${trainer_volumes[@]}" "$trainer_image" \
    data synth --out /data/synth --images "$images" --val-images $((images / 4)) --seed 1
served_before=$(probe model-sha "$url" "$photo")
set +e
docker run --rm "${trainer_volumes[@]}" -e SSD_TRAIN_EPOCHS="$epochs" --entrypoint /app/deploy/retrain.sh \
    "$trainer_image" 2>&1 | tee "${TMPDIR:-/tmp}/$prefix-retrain.log"
retrain_rc=${PIPESTATUS[0]}
set -e
reloaded() { # the sha the detector should come to serve
    for _ in $(seq 30); do
        [ "$(probe model-sha "$url" "$photo")" = "$1" ] && return 0
        sleep 1
    done
    fail "the detector did not swap to $1 within 30 s"
}
candidate_sha() {
    docker run --rm -v "$prefix-models:/models" --entrypoint sha256sum "$trainer_image" /models/model.onnx | cut -d' ' -f1
}
if [ "$retrain_rc" = 0 ]; then
    echo "the gate promoted the candidate"
    reloaded "$(candidate_sha)"
elif [ "$retrain_rc" = 1 ] && grep -q "kept the served model" "${TMPDIR:-/tmp}/$prefix-retrain.log"; then
    echo "the gate kept the candidate out (above); the detector keeps the served model"
    [ "$(probe model-sha "$url" "$photo")" = "$served_before" ] || fail "the served model changed"
    # Then promoted anyway, so that the swap across containers is seen too.
    run=$(docker run --rm -v "$prefix-runs:/runs" --entrypoint ls "$trainer_image" /runs | tail -1)
    docker run --rm "${trainer_volumes[@]}" "$trainer_image" \
        promote "/runs/$run/model.onnx" --over /models/model.onnx --data /data/synth --force
    reloaded "$(candidate_sha)"
else
    fail "retrain.sh exited $retrain_rc"
fi
echo "served before: $served_before, now: $(probe model-sha "$url" "$photo")"
# Captured first: `grep -q` leaves the pipe early, and docker logs' SIGPIPE fails the pipeline.
logs=$(docker logs "$prefix-serving" 2>&1)
grep "changed; reloading" <<<"$logs" | tail -1 || fail "the log does not say it reloaded"
done_step "trainer: help, synth, retrain, reload"

# ---- 6. SIGTERM ---------------------------------------------------------------------------------
step "SIGTERM: docker stop -t $grace_s"
stop_started=$SECONDS
docker stop -t "$grace_s" "$prefix-serving" >/dev/null
stop_s=$((SECONDS - stop_started))
code=$(docker inspect -f '{{.State.ExitCode}}' "$prefix-serving")
logs=$(docker logs "$prefix-serving" 2>&1)
grep -E "draining|closing the listeners" <<<"$logs" | tail -2
[ "$code" = 0 ] || fail "exit code $code after SIGTERM"
[ "$stop_s" -lt "$grace_s" ] || fail "SIGTERM took $stop_s s, the grace period is $grace_s s"
grep -q "SIGTERM: draining" <<<"$logs" || fail "the log does not say it drained"
echo "stopped in $stop_s s, exit code 0"
done_step "SIGTERM stop ($stop_s s)"

# ---- 7. compose ---------------------------------------------------------------------------------
step "${compose_cmd[*]} --profile cpu up detector-cpu"
compose=("${compose_cmd[@]}" -p "$prefix" --profile cpu)
"${compose[@]}" up -d --no-build detector-cpu
container=$("${compose[@]}" ps -q detector-cpu)
# Alive but not ready until the artifact arrives, as the README says of a fresh volume.
docker run --rm -v "${prefix}_models:/models" -v "$PWD/models:/src:ro" --entrypoint cp "$serving_image" \
    /src/demo.onnx /models/model.onnx
wait_healthy "$container" 150
probe model-sha "$(host_url "$container" 8000)" "$photo" >/dev/null
echo "healthy, /detect answered"
"${compose[@]}" down --volumes
done_step "compose: up, healthy, detect"

printf '\n==> Figures\n'
for image in "$local_base" "$trainer_image" "$serving_image"; do
    if docker image inspect "$image" >/dev/null 2>&1; then
        printf '%-46s %5d MB\n' "$image" $(($(docker image inspect -f '{{.Size}}' "$image") / 1000000))
    fi
done
printf '%s\n' "${report[@]}"
printf '%-46s %5d s\n' "total" $((SECONDS - started))
echo "image-test: PASSED"
