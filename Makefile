# Two commands for a newcomer: `make demo` (an image from the embedded tiny SDXL with a LoRA) and `make test`.
PYTHON ?= python3
VENV ?= .venv
PY := $(VENV)/bin/python
STAMP := $(VENV)/.installed
DEMO_CACHE := models/loras

.PHONY: setup model demo test bench-quick clean

setup: $(STAMP)

$(STAMP): requirements.txt requirements-dev.txt
	test -x $(PY) || $(PYTHON) -m venv $(VENV)
	$(PY) -m pip install --quiet --upgrade pip
	$(PY) -m pip install --quiet -r requirements-dev.txt
	touch $(STAMP)

model: setup
	$(PY) -m sdxl_worker.generation.tiny_model

demo: model
	LORA_CACHE_DIR=$(DEMO_CACHE) $(PY) -m tools.make_demo_loras
	SDXL_MODEL=tiny LORA_CACHE_DIR=$(DEMO_CACHE) $(PY) -m tools.run_job test_input_with_lora.json --out output

test: model
	$(PY) -m pytest -q

bench-quick: model
	$(PY) -m bench --quick

clean:
	rm -rf output models/tiny-sdxl .pytest_cache
