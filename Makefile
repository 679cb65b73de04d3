# Quick start: `make serve` (set up, build the demo bundle if missing, serve) and `make test`.
PYTHON ?= python3
VENV ?= .venv
BIN := $(VENV)/bin
BUNDLE ?= models/demo
HOST ?= 127.0.0.1
PORT ?= 8000
PYTEST_ARGS ?=

.PHONY: setup serve test lint bundle bench-bundle bench-service bench-load bench-gpu system-deps

$(BIN)/python:
	$(PYTHON) -m venv $(VENV)
	$(BIN)/python -m pip install --quiet --upgrade pip

# One environment for the developer loop: the serving install plus the export (TensorFlow) and test extras.
# The service itself never imports TensorFlow (tests/test_import_boundaries.py); the Dockerfile installs without it.
$(VENV)/.installed: pyproject.toml | $(BIN)/python
	$(BIN)/python -m pip install --quiet -e '.[train,test,load]'
	touch $@

setup: $(VENV)/.installed

# Debian packages some tests drive for real (they skip, loudly, without them): PostgreSQL for the results
# store, Chromium for the web page, Xvfb for the desktop client, Orthanc with its DICOMweb plugin as the PACS
# for the DICOM node (C-STORE and STOW-RS), DCMTK's storescu and friends as an independent DICOM peer,
# dicom3tools' dciodvfy, the standard's validator, for the node's result objects, and podman with runc, buildah,
# netavark and aardvark-dns (name resolution between Compose services) and iptables (published ports) for the
# container tests, debootstrap for their stand-in base image (deploy/podman/, deploy/README.md), and HAProxy in
# front of replicas for the failover test.
# Needs root or sudo.
SYSTEM_PACKAGES := postgresql chromium xvfb orthanc orthanc-dicomweb dcmtk dicom3tools \
	podman buildah runc netavark aardvark-dns iptables debootstrap haproxy
system-deps:
	@missing=""; \
	command -v initdb >/dev/null 2>&1 || ls /usr/lib/postgresql/*/bin/initdb >/dev/null 2>&1 || missing="$$missing postgresql"; \
	command -v chromium >/dev/null 2>&1 || missing="$$missing chromium"; \
	command -v Xvfb >/dev/null 2>&1 || missing="$$missing xvfb"; \
	command -v Orthanc >/dev/null 2>&1 || [ -x /usr/sbin/Orthanc ] || missing="$$missing orthanc"; \
	ls /usr/share/orthanc/plugins/libOrthancDicomWeb.so* /usr/lib/orthanc/libOrthancDicomWeb.so* 2>/dev/null \
		| grep -q . || missing="$$missing orthanc-dicomweb"; \
	command -v storescu >/dev/null 2>&1 || missing="$$missing dcmtk"; \
	command -v dciodvfy >/dev/null 2>&1 || missing="$$missing dicom3tools"; \
	for tool in podman buildah runc iptables debootstrap haproxy; do \
		command -v $$tool >/dev/null 2>&1 || [ -x /usr/sbin/$$tool ] || missing="$$missing $$tool"; \
	done; \
	[ -x /usr/lib/podman/netavark ] || missing="$$missing netavark"; \
	[ -x /usr/lib/podman/aardvark-dns ] || missing="$$missing aardvark-dns"; \
	if [ -n "$$missing" ]; then \
		SUDO=$$( [ "$$(id -u)" = 0 ] || echo sudo ); \
		$$SUDO apt-get update -qq && DEBIAN_FRONTEND=noninteractive $$SUDO apt-get install -y -qq --no-install-recommends $$missing; \
	fi

$(BUNDLE)/manifest.json: | $(VENV)/.installed
	$(BIN)/bfd export --demo --out $(BUNDLE)

bundle: $(BUNDLE)/manifest.json

serve: setup bundle
	$(BIN)/bfd serve --bundle $(BUNDLE) --host $(HOST) --port $(PORT)

lint: setup
	$(BIN)/ruff check .
	$(BIN)/ruff format --check .
	$(BIN)/mypy inference dicom_node service clients training desktop export
	$(BIN)/mypy -p loadtest

# The TensorFlow conversions keep memory in the process that ran them (TensorFlow's and tf2onnx's caches), so
# the four modules that export real ResNet50 models run in a pytest process each, after the rest: the peak of
# any one process stays under 6 GB (README "Measured performance"), where one process for all reached 6.4 GB.
HEAVY_TESTS := tests/test_export.py tests/test_export_int8.py tests/test_export_legacy.py tests/test_training_chain.py
# The demo bundle first (built if missing, as for `make serve`): the tests that run on it then run, not skip.
test: lint bundle
	$(BIN)/pytest $(PYTEST_ARGS) $(addprefix --ignore=,$(HEAVY_TESTS))
	@for module in $(HEAVY_TESTS); do $(BIN)/pytest $(PYTEST_ARGS) $$module || exit 1; done

# fp32 vs INT8 throughput of the demo bundle, in one run (figures in loadtest/results/).
bench-bundle: setup bundle
	test -f models/demo-int8/manifest.json || $(BIN)/bfd export --demo --int8 --calibration tests/data/xray --out models/demo-int8
	$(BIN)/python -m loadtest.bench_bundle --bundle $(BUNDLE) --bundle models/demo-int8 --images tests/data/xray

# In-process ceiling, then HTTP throughput and latency at concurrency 1, 8, 32 (figures in loadtest/results/).
bench-service: setup bundle
	$(BIN)/python -m loadtest.bench_service --bundle $(BUNDLE) --images tests/data/xray

# Under load: ours vs the naive ONNX endpoint vs the original-style Keras pipeline at concurrency 1, 8, 32, then
# open-loop arrivals at 50% and 90% of capacity and 2x overload for 60 s (figures in loadtest/results/).
bench-load: setup bundle
	$(BIN)/python -m loadtest.bench_load --bundle $(BUNDLE) --images tests/data/xray --duration-s 20 --warmup-s 5 \
		--concurrency 1 8 32 --overload-s 60 --naive-tuned --out loadtest/results

# On a machine with an NVIDIA GPU and onnxruntime-gpu: CUDA provider, IOBinding, fp16 vs fp32, batch 1 to 64.
bench-gpu: setup bundle
	$(BIN)/python -m loadtest.bench_gpu --bundle $(BUNDLE) --images tests/data/xray --out loadtest/results
