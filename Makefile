# k2mini: `make lab` opens the notebooks, `make test` runs the whole suite.
# Both create .venv on first use and are no-ops for set-up on later runs.

PYTHON ?= python3
VENV   ?= .venv
PY     := $(VENV)/bin/python
STAMP  := $(VENV)/.k2mini-installed
# Where k2mini finds its data (corpora, cached runs), for every command below, whatever its working
# directory (the notebooks run in notebooks/). Without it k2mini looks for the checkout from the cwd.
export K2MINI_DATA ?= $(CURDIR)/data
CORPUS := $(K2MINI_DATA)/shakespeare/.complete

.PHONY: lab test test-fast setup corpus pytest nbval bench clean-venv

setup: $(STAMP)

$(STAMP): pyproject.toml constraints.txt
	test -x $(PY) || $(PYTHON) -m venv $(VENV)
	$(PY) -m pip install --quiet --disable-pip-version-check -c constraints.txt torch==2.13.0
	$(PY) -m pip install --quiet --disable-pip-version-check -c constraints.txt -e '.[lab,hf,test]'
	touch $(STAMP)

corpus: $(CORPUS)

$(CORPUS): | $(STAMP)
	$(PY) -m k2mini.data fetch

# Jupyter refuses to run as root unless told; containers often are root. LAB_ARGS adds options
# (e.g. LAB_ARGS="--no-browser --ip 0.0.0.0 --port 8888").
LAB_ARGS ?=
lab: $(STAMP) $(CORPUS)
	$(VENV)/bin/jupyter lab notebooks/ $(if $(filter 0,$(shell id -u)),--allow-root) $(LAB_ARGS)

# pytest runs twice: with this CPU's own float kernels, then under others (PYTEST_KERNELS, ATen's portable
# ones), so that a tolerance tuned to one machine's rounding fails here, not on a newcomer's CPU.
# PYTEST_JOBS processes share the tests (pytest-xdist). `make test-fast` is the quick loop (no slow tests).
PYTEST_KERNELS ?= ATEN_CPU_CAPABILITY=default
PYTEST_JOBS ?= 2
pytest: $(STAMP) $(CORPUS)
	OMP_NUM_THREADS=1 $(PY) -m pytest -q tests -n $(PYTEST_JOBS)
	$(PYTEST_KERNELS) OMP_NUM_THREADS=1 $(PY) -m pytest -q tests -n $(PYTEST_JOBS)

test-fast: $(STAMP) $(CORPUS)
	OMP_NUM_THREADS=1 $(PY) -m pytest -q tests -m "not slow" -n $(PYTEST_JOBS)

# nbval re-runs the notebooks under other float kernels than those that wrote their outputs (ATen's
# portable `default` kernels instead of the CPU's AVX2 / AVX-512 ones), as a newcomer's CPU would: the
# checked outputs are claims that hold on any machine, so they must pass here too.
# NBVAL_JOBS notebooks run side by side, one thread each (pytest-xdist; --dist loadscope keeps each
# notebook's cells in order on one kernel), so a notebook's own sweeps train in one process
# (K2MINI_JOBS=1; in JupyterLab they take every core).
NBVAL_KERNELS ?= ATEN_CPU_CAPABILITY=default
NBVAL_JOBS ?= 2
nbval: $(STAMP) $(CORPUS)
	$(NBVAL_KERNELS) OMP_NUM_THREADS=1 K2MINI_JOBS=1 $(PY) -m pytest -q --nbval notebooks/ --nbval-sanitize-with notebooks/sanitize.cfg -p no:randomly \
		-n $(NBVAL_JOBS) --dist loadscope

test: pytest nbval

bench: $(STAMP)
	for b in benchmarks/bench_*.py; do $(PY) $$b || exit 1; done

clean-venv:
	rm -rf $(VENV)
