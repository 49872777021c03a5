# One entry point per job. `make test` sets up .venv on a fresh machine and runs the suite.
PYTHON ?= python3
VENV ?= .venv
PY := $(VENV)/bin/python
# The CPU build of PyTorch that the tests pin (a looser spec pulls a multi-GB CUDA build).
TORCH_VERSION ?= 2.13.0
# The reference CARL implementation, used only as a test oracle (installed without its dependencies).
REFERENCE ?= icon_registration==1.1.9

.PHONY: demo test bench ship-brain bench-forward bench-precision bench-retina bench-brain bench-equivariance bench-known-warp bench-unicarl bench-inverse bench-landmarks gpu-check gpu-carry clean

# Packages install without byte-compiling (pip compiles one file at a time) and Python writes the
# caches of what is imported at its first import, also where the environment says not to
# (PYTHONDONTWRITEBYTECODE): .venv is the project's own. Compiling every installed file up front
# took as long as the install itself (62 s on 2 cores); caching what the suite imports, about 10 s.
export PYTHONDONTWRITEBYTECODE :=

# PyTorch and the test dependencies in one resolver pass.
$(VENV)/.installed: pyproject.toml Makefile
	$(PYTHON) -m venv $(VENV)
	$(PY) -m pip install --quiet --upgrade pip
	$(PY) -m pip install --quiet --no-compile torch==$(TORCH_VERSION) -e '.[test]'
	$(PY) -m pip install --quiet --no-compile --no-deps $(REFERENCE)
	touch $@

# The first command of the README: the engine, the MNI152 template (nilearn) and a registration.
$(VENV)/.demo-installed: pyproject.toml Makefile
	$(PYTHON) -m venv $(VENV)
	$(PY) -m pip install --quiet --upgrade pip
	$(PY) -m pip install --quiet --no-compile torch==$(TORCH_VERSION)
	$(PY) -m pip install --quiet --no-compile -e '.[demo]'
	touch $@

demo: $(VENV)/.demo-installed
	$(PY) -m carlreg demo --out demo-output

# pytest-xdist workers: two overlap one test's process starts, file IO and single-threaded Python
# with another's tensor work (on 2 cores: 758 s serially, 507 s on two workers of one thread
# each); each module stays on one worker, so that its fixtures are computed once.
TEST_WORKERS ?= 2

test: $(VENV)/.installed
	$(PY) -m pytest Testing -n $(TEST_WORKERS) --dist loadscope --durations=15

# Benchmarks (not part of CI): results land in bench/results/.
bench: bench-forward bench-precision bench-retina bench-brain bench-equivariance bench-known-warp bench-unicarl bench-inverse bench-landmarks

$(VENV)/.bench-installed: $(VENV)/.installed
	$(PY) -m pip install --quiet -e '.[test,bench]'
	touch $@

bench-forward: $(VENV)/.installed
	$(PY) bench/forward.py | tee bench/results/forward.txt

bench-precision: $(VENV)/.installed
	$(PY) bench/precision.py | tee bench/results/precision.txt

bench-retina: $(VENV)/.installed
	$(PY) bench/retina.py

bench-brain: $(VENV)/.bench-installed
	$(PY) bench/brain.py
	$(PY) bench/brain.py --methods none,ours,ours_svf,ours_svf_4mm,ants,elastix --output brain_refine
	$(PY) bench/brain.py --sweep
	$(PY) bench/brain.py --sweep --split --methods ours,displacement_only
	$(PY) bench/brain.py --sweep --together --methods ours,displacement_only
	$(PY) bench/brain.py --sweep --uncut --methods none,ours,ours_cover

bench-equivariance: $(VENV)/.installed
	$(PY) bench/equivariance.py

bench-known-warp: $(VENV)/.bench-installed
	$(PY) bench/known_warp.py

bench-unicarl: $(VENV)/.installed
	$(PY) bench/unicarl.py

bench-inverse: $(VENV)/.installed
	$(PY) bench/inverse.py

bench-landmarks: $(VENV)/.bench-installed
	$(PY) bench/landmarks.py

# New brain weights (the runs named in weights/ship.py): ship both, rerun every result that names
# them (the sweep's peers keep their committed rows: their figures do not depend on our weights),
# then ship again with the figures. About 1.5 hours on 2 cores, and 40 minutes more for the split,
# together and uncut sweeps (the untimed sweeps, equivariance, known warps and inverse may run beside one
# another, the timed tables alone); commit weights, cards and results. The network's instance
# optimization (ours_io: 50 steps on the trained box) is left to bench-brain and bench-landmarks,
# which run every method.
ship-brain: $(VENV)/.bench-installed
	$(PY) weights/ship.py carl-brain-3d
	$(PY) weights/ship.py unet-brain-3d
	$(PY) bench/brain.py --sweep --keep none,ants,elastix
	$(PY) bench/brain.py --sweep --split --methods ours,displacement_only
	$(PY) bench/brain.py --sweep --together --methods ours,displacement_only
	$(PY) bench/brain.py --sweep --uncut --methods none,ours,ours_cover
	$(PY) bench/brain.py --methods none,ours,displacement_only,ants,elastix
	$(PY) bench/brain.py --methods none,ours,ours_svf,ours_svf_4mm,ants,elastix --output brain_refine
	$(PY) bench/landmarks.py --methods none,ours,ours_svf,ours_svf_4mm,ants,elastix
	$(PY) bench/equivariance.py
	$(PY) bench/known_warp.py
	$(PY) bench/inverse.py
	$(PY) weights/ship.py carl-brain-3d
	$(PY) weights/ship.py unet-brain-3d

# On an NVIDIA GPU: the tests marked cuda, then forward, uniCARL and instance-optimization timings
# with peak GPU memory (bench/gpu_check.py). Without CUDA it says so in one line and measures nothing.
GPU_OUT ?= bench/results/gpu
gpu-check: $(VENV)/.installed
	$(PY) bench/gpu_check.py --out $(GPU_OUT)

# The git-ignored folder a lent GPU machine needs beside the working tree: SimpleITK packed to fit,
# the reference's wheel, the test data and a training config (bench/gpu_carry.py; downloads wheels).
GPU_CARRY ?= .gpu-carry
gpu-carry: $(VENV)/.installed
	$(PY) bench/gpu_carry.py --out $(GPU_CARRY) --reference $(REFERENCE)

clean:
	rm -rf $(VENV) build *.egg-info
