# Every target sets itself up: a fresh clone needs only `make convert-bit` and `make test`.
PYTHON ?= python3
VENV   := .venv
PY     := $(VENV)/bin/python
STAMP  := $(VENV)/.installed
export TF_CPP_MIN_LOG_LEVEL := 2
export TF_ENABLE_ONEDNN_OPTS := 0

CKPT ?=
OUT  ?= out
DTYPE ?= float32

.PHONY: setup test test-all fuzz convert-bit convert-data2vec parity eval bench bench-eval publish catalog clean

setup: $(STAMP)

$(STAMP): pyproject.toml
	$(PYTHON) -m venv $(VENV)
	$(PY) -m pip install --quiet --upgrade pip
	$(PY) -m pip install --quiet -e ".[jax,tensorflow,test]"
	touch $(STAMP)

test: setup
	$(PY) -m pytest -q

test-all: setup
	$(PY) -m pytest -q -m "" 

fuzz: setup
	$(PY) -m pytest -q -m fuzz_long tests

# The checkpoint extensions the readers take: only these are cut from SRC's name, so a catalog name
# with a dot in it (fixture-BiT-R14x0.5-shapes10) keeps it.
CKPT_EXTENSIONS := .npz .h5 .pth .pt
folder_name = $(notdir $(or $(firstword $(foreach e,$(CKPT_EXTENSIONS),$(filter-out $(1),$(patsubst %$(e),%,$(1))))),$(1)))

# SRC into OUT/NAME, or OUT/NAME-DTYPE for a half precision, which then sits beside the float32 folder
convert = $(VENV)/bin/parityport convert $(1) --out $(OUT)/$(call folder_name,$(1))$(if $(filter-out float32,$(DTYPE)),-$(DTYPE)) --dtype $(DTYPE) $(if $(FORCE),--force) --synthetic-if-offline

convert-bit: setup
	$(call convert,$(or $(CKPT),BiT-M-R50x1-ILSVRC2012))

convert-data2vec: setup
	$(call convert,$(or $(CKPT),data2vec-vision-base-ft1k))

parity: setup
	$(VENV)/bin/parityport parity $(SRC) $(DIR)

eval: setup
	$(VENV)/bin/parityport eval --model $(MODEL) --data $(DATA) $(if $(PROTOCOL),--protocol $(PROTOCOL)) $(if $(EXPECT),--expect $(EXPECT))

bench: setup
	$(PY) -m parity.bench_convert

bench-eval: setup
	$(PY) -m parity.bench_eval

publish: setup
	$(VENV)/bin/parityport publish $(DIR) --repo-id $(REPO) $(if $(DRY_RUN),--dry-run)

catalog: setup
	$(VENV)/bin/parityport catalog

clean:
	rm -rf $(OUT) .pytest_cache
