# Two commands do all set-up (see README.md):
#   make demo   install into .venv and run the quickstart sweep
#   make test   install into .venv and run the whole test suite
PYTHON ?= python3
VENV   ?= .venv
BIN    := $(VENV)/bin
# pinned: these install from local disk on the reference machines; other versions download GBs
TORCH  ?= torch==2.14.1 torchvision==0.29.1

.PHONY: install browser demo test test-all bench lint clean

$(BIN)/python:
	$(PYTHON) -m venv $(VENV)

$(VENV)/.installed: $(BIN)/python pyproject.toml setup.py $(wildcard csrc/*)
	$(BIN)/python -m pip install -q --upgrade pip
	$(BIN)/python -m pip install -q $(TORCH) setuptools wheel ninja pybind11
	$(BIN)/python -m pip install -q --no-build-isolation -e '.[test,hf,timm,diffusion,slurm,ray,robustness,plot,wandb,mlflow,browser]'
	touch $@

install: $(VENV)/.installed browser

# the browser that tests/test_report_html.py drives: Debian's chromium, installed when missing
# and we are root; otherwise a note, and those tests skip
browser:
	@if command -v chromium >/dev/null 2>&1 || command -v chromium-browser >/dev/null 2>&1; then :; \
	elif [ "$$(id -u)" = 0 ] && command -v apt-get >/dev/null 2>&1; then \
	  DEBIAN_FRONTEND=noninteractive apt-get install -y -q chromium \
	  || (apt-get update -q && DEBIAN_FRONTEND=noninteractive apt-get install -y -q chromium) \
	  || echo "note: apt-get install chromium failed: the browser tests will skip"; \
	else echo "note: no chromium, and not root to install it (apt-get install -y chromium):" \
	  "the browser tests will skip"; fi

demo: install
	$(BIN)/kdbench run examples/quickstart.yaml

# the fast tests plus the slow end-to-end tests listed in tests/conftest.py (CI runs this)
test: install
	$(BIN)/python -m pytest -q -m "not slow or ci"

# every test, all end-to-end ones included
test-all: install
	$(BIN)/python -m pytest -q

bench: install
	$(BIN)/kdbench bench --quick

# the GPU check (benchmarks/gpu_check.py): kernel tests + opcheck, kernel benchmarks, grid
# throughput at fp32 / bf16 / bf16+channels_last, a 2-GPU DDP cell; DEVICE=cpu is the dry run
DEVICE ?= cuda
.PHONY: gpu-check
gpu-check: install
	$(BIN)/python benchmarks/gpu_check.py --device $(DEVICE)

lint: install
	$(BIN)/ruff check kdbench tests benchmarks

clean:
	rm -rf build *.egg-info kdbench/*.so runs
