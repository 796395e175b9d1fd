# edgecnn front door. `make export ARCH=mobilenet_v3 TARGET=onnx` and `make test` are all the set-up:
# the first use creates .venv and installs everything into it.
SHELL := /bin/bash
PYTHON ?= python3
VENV := .venv
PY := $(VENV)/bin/python
STAMP := $(VENV)/.installed

ARCH ?= mobilenet_v3
TARGET ?= onnx
PRECISION ?=
WEIGHTS ?= auto
CALIB ?=
EVAL ?=
OUT ?= artefacts
DIR ?=
EXTRA ?=
PYTEST_ARGS ?=
# matrix: empty = the defaults (focus nets x all targets x fp32/fp16/int8); lists are space or comma separated
ARCHS ?=
TARGETS ?=
PRECISIONS ?=
JOBS ?=
REPORTS ?= reports
SCORECARD ?= benchmarks/scorecard.json
# the default matrix writes its table into the docs; a partial one (ARCHS/TARGETS/PRECISIONS given) does not
RESULTS_DOC ?= $(if $(strip $(ARCHS)$(TARGETS)$(PRECISIONS)),,docs/results/matrix.md)

.PHONY: help install export validate verify list matrix test test-all bench clean data

help:
	@echo "make export ARCH=mobilenet_v3 TARGET=onnx|trt|coreml PRECISION=fp32|fp16|int8 [CALIB=<images>] [EVAL=<images>] [WEIGHTS=auto|imagenet|none|<file>] [OUT=artefacts]"
	@echo "make validate DIR=<artefact folder>   make verify DIR=<artefact folder>   make list"
	@echo "make matrix [ARCHS=...] [TARGETS=...] [PRECISIONS=...] [WEIGHTS=auto] [JOBS=n] [EXTRA=--update-scorecard]"
	@echo "make test (default suite)   make test-all (adds slow cases)   make bench   make clean"

# The venv takes ~6.2 GB: the only torch 2.14 on this machine's disk is the CUDA build (its NVIDIA
# libraries are 3.2 GB, needed even to import it on a CPU). Check the room first, so that a full disk
# stops here with a sentence instead of half-way through pip with "[Errno 28] No space left on device".
# MIN_FREE_GB=0 skips the check.
MIN_FREE_GB ?= 7

$(STAMP): pyproject.toml
	@free_gb=$$(df -P -k . | awk 'NR==2 {print int($$4 / 1048576)}'); \
	if [ -n "$$free_gb" ] && [ ! -f $(STAMP) ] && [ "$$free_gb" -lt "$(MIN_FREE_GB)" ]; then \
		echo "error: only $$free_gb GB free on the disk holding $$(pwd); installing .venv needs about $(MIN_FREE_GB) GB"; \
		echo "       (torch with its CUDA libraries is 5.5 GB, the rest 0.7 GB). Free some space, or set MIN_FREE_GB=0 to try anyway."; \
		exit 1; \
	fi
	@test -d $(VENV) || $(PYTHON) -m venv $(VENV)
	$(PY) -m pip install -q --upgrade pip
	# torch/torchvision first, from the wheels this machine serves (a CPU/CUDA build lies on its disk)
	$(PY) -m pip install -q "torch>=2.4" "torchvision>=0.19"
	$(PY) -m pip install -q -e ".[dev]"
	@touch $(STAMP)

install: $(STAMP)

# $(call q,VAR): VAR's raw text as one single-quoted shell word, expanded neither by make nor by the shell,
# so ARCH='x";rm -rf ~;"' or ARCH='`cmd`' reach edgecnn as a (wrong) name instead of running. EXTRA stays
# shell text on purpose: it is extra options. `unexport`: make would otherwise expand a command-line value
# such as ARCH='$(shell cmd)' when putting it in the recipe's environment.
unexport ARCH TARGET PRECISION WEIGHTS CALIB EVAL OUT DIR
q = '$(subst ','\'',$(value $(1)))'

export: $(STAMP)
	$(PY) -m edgecnn export $(call q,ARCH) --target $(call q,TARGET) $(if $(value PRECISION),--precision $(call q,PRECISION)) \
		--weights $(call q,WEIGHTS) $(if $(value CALIB),--calib $(call q,CALIB)) $(if $(value EVAL),--eval $(call q,EVAL)) \
		--out $(call q,OUT) $(EXTRA)

validate: $(STAMP)
	@test -n $(call q,DIR) || { echo "usage: make validate DIR=artefacts/<arch>/<target>-<precision>"; exit 2; }
	$(PY) -m edgecnn validate $(call q,DIR)

verify: $(STAMP)
	@test -n $(call q,DIR) || { echo "usage: make verify DIR=artefacts/<arch>/<target>-<precision>"; exit 2; }
	$(PY) -m edgecnn verify $(call q,DIR)

list: $(STAMP)
	$(PY) -m edgecnn list

# Every ARCHS x TARGETS x PRECISIONS cell exported, validated and scored; report in $(REPORTS)/latest/.
matrix: $(STAMP)
	$(PY) -m edgecnn matrix $(if $(strip $(ARCHS)),--archs $(ARCHS)) $(if $(strip $(TARGETS)),--targets $(TARGETS)) \
		$(if $(strip $(PRECISIONS)),--precisions $(PRECISIONS)) --weights "$(WEIGHTS)" $(if $(CALIB),--calib "$(CALIB)") \
		$(if $(EVAL),--eval "$(EVAL)") \
		--out "$(OUT)" --report-dir "$(REPORTS)" --scorecard "$(SCORECARD)" $(if $(JOBS),--jobs $(JOBS)) \
		$(if $(RESULTS_DOC),--results-doc "$(RESULTS_DOC)") $(EXTRA)

# Fashion-MNIST (MIT, Debian package) for the trained-weight tests; tests skip with a reason without it.
data:
	@if [ ! -d /usr/share/datasets/fashion-mnist ]; then \
		if [ "$$(id -u)" = 0 ] && command -v apt-get >/dev/null; then \
			(apt-get install -y -qq dataset-fashion-mnist >/dev/null 2>&1 || \
			 (apt-get update -qq >/dev/null 2>&1 && apt-get install -y -qq dataset-fashion-mnist >/dev/null 2>&1)) \
			 || echo "note: could not install dataset-fashion-mnist; its tests will be skipped"; \
		else echo "note: not root or no apt-get: Fashion-MNIST tests will be skipped"; fi; \
	fi

test: $(STAMP) data
	$(PY) -m pytest -m "not slow" $(PYTEST_ARGS)

test-all: $(STAMP) data
	$(PY) -m pytest $(PYTEST_ARGS)

BENCH_STAMP := $(VENV)/.installed-bench

$(BENCH_STAMP): $(STAMP) pyproject.toml
	$(PY) -m pip install -q -e ".[dev,bench]"
	@touch $(BENCH_STAMP)

# Every benchmark writes its table into docs/results/ (with commit, date and machine).
BENCHMARKS ?= int8 int8_vs_anchors int8_fmnist_gate speedup_check int8_fallback_curve coreml_ref coreml_precisions calib_memory
bench: $(BENCH_STAMP) data
	@for b in $(BENCHMARKS); do echo "== benchmarks/$$b.py"; $(PY) benchmarks/$$b.py || exit 1; done

clean:
	rm -rf artefacts reports .pytest_cache build *.egg-info
	find . -name __pycache__ -type d -prune -exec rm -rf {} +
