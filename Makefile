# The two commands: `make serve` runs the product, `make test` runs every test.
SHELL := /bin/bash
HOST ?= 127.0.0.1
PORT ?= 8000
UV ?= $(shell command -v uv 2>/dev/null || echo "python3 -m uv")

# The demo model: SSDlite320 trained from scratch on the built-in synthetic set by our own
# pipeline, exported with its validation mAP in the metadata. Committed, so that `make serve`
# needs no training; `make demo-model` rebuilds it (on this 2-core CPU, about four hours). Three
# stages: DEMO_STAGE1_EPOCHS from random weights, then two warm restarts (a fresh cosine cycle at a
# lower peak, from the best weights of the stage before) of DEMO_STAGE2_EPOCHS and
# DEMO_STAGE3_EPOCHS, which took mAP@0.5 from 0.714 to the figure in docs/benchmarks.md.
DEMO_MODEL ?= models/demo.onnx
DEMO_STAGE1_EPOCHS ?= 24
DEMO_STAGE2_EPOCHS ?= 16
DEMO_STAGE3_EPOCHS ?= 40
# What the three stages share; each adds its epochs, peak lr, starting weights and run folder.
DEMO_TRAIN = $(UV) run --frozen ssd train --model ssdlite320_mobilenet_v3_large --data data/synth \
	--batch-size 16 --precise-bn 16 --workers 1 --seed 0


.PHONY: uv install install-serving serve test test-fast test-bare test-one-core test-busy tritonclient-env labelstudio-env cvat-function proto openapi lint format bench bench-peers clean demo-model image-test

# uv itself, where it is missing.
uv:
	@command -v uv >/dev/null 2>&1 || python3 -m uv --version >/dev/null 2>&1 || python3 -m pip install --quiet uv

# The development install: every default group plus the benchmark's peers (BentoML), which the
# serving install never gets.
install: uv
	$(UV) sync --frozen --group peers

# What serving needs and no more (no torch): a fresh machine serves in a minute. --inexact keeps
# whatever else is already installed (a developer's training environment).
install-serving: uv
	$(UV) sync --frozen --inexact --no-default-groups --group serving

# CUDA first where a GPU driver is present; elsewhere straight to the CPU, without ONNX Runtime's
# failed attempt to load the CUDA libraries in the log.
SSD_PROVIDERS ?= $(shell command -v nvidia-smi >/dev/null 2>&1 && echo cuda,cpu || echo cpu)

# The Open Inference Protocol's gRPC beside HTTP (0: off).
GRPC_PORT ?= 8001

serve: install-serving $(DEMO_MODEL)
	SSD_MODEL_PATH=$(DEMO_MODEL) SSD_PROVIDERS=$(SSD_PROVIDERS) SSD_GRPC_PORT=$(GRPC_PORT) $(UV) run --frozen --no-sync ssd serve --host $(HOST) --port $(PORT)

# Built only where missing (a fresh clone has it committed).
$(DEMO_MODEL):
	$(MAKE) demo-model

demo-model: install
	rm -rf runs/demo-stage1 runs/demo-stage2 runs/demo
	$(UV) run --frozen ssd data synth --out data/synth --images 2000 --val-images 300 --seed 0
	$(DEMO_TRAIN) --epochs $(DEMO_STAGE1_EPOCHS) --lr 0.05 --out runs/demo-stage1
	$(DEMO_TRAIN) --epochs $(DEMO_STAGE2_EPOCHS) --lr 0.02 --init-from runs/demo-stage1/best.pt --out runs/demo-stage2
	$(DEMO_TRAIN) --epochs $(DEMO_STAGE3_EPOCHS) --lr 0.02 --init-from runs/demo-stage2/best.pt --out runs/demo
	$(UV) run --frozen ssd export --checkpoint runs/demo/best.pt --out $(DEMO_MODEL)

test: install tritonclient-env labelstudio-env
	$(UV) run --frozen pytest

test-fast: install tritonclient-env labelstudio-env
	$(UV) run --frozen pytest -m "not slow"

# The suite in a clone of the committed tree alone, in a folder with nothing beside it: whatever
# the repository needs, it carries. Then no skip may name missing data (photos, annotations).
# BARE: a name only (mktemp -u); nothing is made unless test-bare runs.
BARE := $(or $(BARE),$(shell mktemp -d -u))
test-bare:
	mkdir -p $(BARE) && git clone --quiet . $(BARE)/ssd
	set -o pipefail; $(MAKE) -C $(BARE)/ssd test 2>&1 | tee $(BARE)/test.log
	! grep -E "^SKIPPED .*(not found|absent|missing|coco-mini|photos)" $(BARE)/test.log

# The suite on a slower machine (docs/testing.md): on one core, or beside a CPU-bound process on
# every core. TESTS narrows it: make test-one-core TESTS="-m timing".
TESTS ?=
test-one-core: install tritonclient-env labelstudio-env
	taskset -c 0 $(UV) run --frozen pytest $(TESTS)

test-busy: install tritonclient-env labelstudio-env
	$(UV) run --frozen python tests/busy.py $(UV) run --frozen pytest $(TESTS)

# Triton's own Python client for tests/test_tritonclient.py, in an environment of its own:
# tritonclient[grpc] pins protobuf<7 and the project locks protobuf 7 (tests/tritonclient/).
TRITONCLIENT_PYTHON := .venv/tritonclient/bin/python
tritonclient-env: $(TRITONCLIENT_PYTHON)
$(TRITONCLIENT_PYTHON): tests/tritonclient/requirements.txt | uv
	rm -rf .venv/tritonclient
	$(UV) venv --quiet --python 3.11 .venv/tritonclient
	$(UV) pip install --quiet --python $(TRITONCLIENT_PYTHON) --require-hashes -r tests/tritonclient/requirements.txt

# Label Studio's server for tests/test_labelstudio.py, in an environment of its own (its Django
# stack and pins stay out of the project's lock): tests/labelstudio/.
LABELSTUDIO := .venv/labelstudio/bin/label-studio
labelstudio-env: $(LABELSTUDIO)
$(LABELSTUDIO): tests/labelstudio/requirements.txt | uv
	rm -rf .venv/labelstudio
	$(UV) venv --quiet --python 3.11 .venv/labelstudio
	$(UV) pip install --quiet --python .venv/labelstudio/bin/python --require-hashes -r tests/labelstudio/requirements.txt

# CVAT's nuclio function (deploy/cvat/) for an artifact: its labels are the artifact's classes.
CVAT_MODEL ?= $(DEMO_MODEL)
cvat-function: install
	$(UV) run --frozen python deploy/cvat/make_function.py $(CVAT_MODEL) > deploy/cvat/function.yaml

# The OIP's gRPC messages and stubs, from the committed .proto (service/oip/proto/README.md).
proto: install
	$(UV) run --frozen python -m grpc_tools.protoc -I . --python_out=. --pyi_out=. --grpc_python_out=. \
		service/oip/proto/open_inference_grpc.proto
	$(UV) run --frozen python -m grpc_tools.protoc -I . --python_out=. --pyi_out=. \
		service/oip/proto/model_config.proto service/oip/proto/triton_repository.proto

# The OpenAPI schema the service serves, committed as docs/openapi.json (tests/test_reference.py
# fails when the two differ).
openapi: install
	$(UV) run --frozen python -c "import json; from service.app import create_app; \
		print(json.dumps(create_app().openapi(), indent=2))" > docs/openapi.json

lint: install
	$(UV) run --frozen ruff check .
	$(UV) run --frozen ruff format --check .

format: install
	$(UV) run --frozen ruff format .
	$(UV) run --frozen ruff check --fix .

# Every benchmark of docs/benchmarks.md, quiet machine please (about 40 minutes here); reports
# and plots go to runs/bench. The training convergence run (30+ min) is separate:
# `uv run ssd bench train --convergence`.
bench: install bench-peers
	$(UV) run --frozen ssd bench loss --json runs/bench/loss.json
	$(UV) run --frozen ssd bench train --json runs/bench/train.json
	$(UV) run --frozen ssd bench parity --json runs/bench/parity.json
	$(UV) run --frozen ssd bench export $(if $(wildcard runs/demo/best.pt),--checkpoint runs/demo/best.pt) --json runs/bench/export.json
	$(UV) run --frozen ssd bench serve
	$(UV) run --frozen ssd bench overload
	$(UV) run --frozen ssd bench soak

# PyTriton's own environment (.venv/pytriton): no PyTriton release installs beside the project's
# numpy 2 and protobuf 7 (see bench/peers/pytriton_server.py).
bench-peers: install
	test -x .venv/pytriton/bin/python || $(UV) run --frozen python -m bench.peers.pytriton_server --make-env

# The serving and trainer images built from the Dockerfile and run for real (deploy/image-test.sh):
# installs docker.io where missing and starts dockerd (root), builds on a local Debian base where the
# Dockerfile's bases cannot be pulled, and prints each step's time and the image sizes.
image-test: install
	deploy/image-test.sh

clean:
	rm -rf .venv .pytest_cache .ruff_cache
