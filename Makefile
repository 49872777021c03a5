# One entry point per job. `make test` sets up .venv on a fresh machine and runs the suite.
PYTHON ?= python3
VENV ?= .venv
PY := $(VENV)/bin/python
# The CPU build of PyTorch that the tests pin (a looser spec pulls a multi-GB CUDA build).
TORCH_VERSION ?= 2.13.0
# The reference CARL implementation, used only as a test oracle (installed without its dependencies).
REFERENCE ?= icon_registration==1.1.9

.PHONY: demo test bench bench-forward bench-precision bench-retina bench-brain bench-equivariance bench-known-warp bench-unicarl bench-inverse clean

$(VENV)/.installed: pyproject.toml Makefile
	$(PYTHON) -m venv $(VENV)
	$(PY) -m pip install --quiet --upgrade pip
	$(PY) -m pip install --quiet torch==$(TORCH_VERSION)
	$(PY) -m pip install --quiet -e '.[test]'
	$(PY) -m pip install --quiet --no-deps $(REFERENCE)
	touch $@

# The first command of the README: the engine, the MNI152 template (nilearn) and a registration.
$(VENV)/.demo-installed: pyproject.toml Makefile
	$(PYTHON) -m venv $(VENV)
	$(PY) -m pip install --quiet --upgrade pip
	$(PY) -m pip install --quiet torch==$(TORCH_VERSION)
	$(PY) -m pip install --quiet -e '.[demo]'
	touch $@

demo: $(VENV)/.demo-installed
	$(PY) -m carlreg demo --out demo-output

test: $(VENV)/.installed
	$(PY) -m pytest Testing --durations=15

# Benchmarks (not part of CI): results land in bench/results/.
bench: bench-forward bench-precision bench-retina bench-brain bench-equivariance bench-known-warp bench-unicarl bench-inverse

$(VENV)/.bench-installed: $(VENV)/.installed
	$(PY) -m pip install --quiet -e '.[test,bench]'
	touch $@

bench-forward: $(VENV)/.installed
	$(PY) bench/forward.py

bench-precision: $(VENV)/.installed
	$(PY) bench/precision.py | tee bench/results/precision.txt

bench-retina: $(VENV)/.installed
	$(PY) bench/retina.py

bench-brain: $(VENV)/.bench-installed
	$(PY) bench/brain.py
	$(PY) bench/brain.py --sweep

bench-equivariance: $(VENV)/.installed
	$(PY) bench/equivariance.py

bench-known-warp: $(VENV)/.bench-installed
	$(PY) bench/known_warp.py

bench-unicarl: $(VENV)/.installed
	$(PY) bench/unicarl.py

bench-inverse: $(VENV)/.installed
	$(PY) bench/inverse.py

clean:
	rm -rf $(VENV) build *.egg-info
