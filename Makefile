# Two commands on a fresh machine: `make run` (the README's main job) and `make test`.
# Both first set up .venv from requirements.lock, by the README's install route, when .venv is
# missing or older than requirements.lock / pyproject.toml (the stamp file below records it).
#
#   make run                                   # the Ray main job, demo preset (a lighter smoke), CIFAR-10 subset
#   make run ARGS='--preset smoke --data-dir ../shared/data/cifar10-subset --out runs --name try2'
#   make test                                  # every component end to end, within 10 minutes (README: Tests)
#   make test-all                              # everything but `long`, cluster and fault tests too (CI: .ci/run)
#   make test-long                             # the tests beyond CI's budget: pytest -m long
#   make test PYTEST_ARGS='-k pipeline'        # any pytest arguments
#   make test-cluster                          # the simulated multi-node cluster only: pytest -m cluster
#   make install                               # only set up .venv

PYTHON ?= python3
VENV := .venv
STAMP := $(VENV)/.installed
ARGS ?= --preset demo --data-dir ../shared/data/cifar10-subset --out runs
PYTEST_ARGS ?=

.PHONY: run test test-all test-long test-cluster install

run: $(STAMP)
	$(VENV)/bin/python jobs/pipeline.py $(ARGS)

test: $(STAMP)
	$(VENV)/bin/python -m pytest -q -m "not slow" $(PYTEST_ARGS)

test-all: $(STAMP)
	$(VENV)/bin/python -m pytest -q -m "not long" $(PYTEST_ARGS)

test-long: $(STAMP)
	$(VENV)/bin/python -m pytest -q -m long $(PYTEST_ARGS)

test-cluster: $(STAMP)
	$(VENV)/bin/python -m pytest -q -m cluster $(PYTEST_ARGS)

install: $(STAMP)

# The `env` prefix ignores a pip configuration that points find-links at a local CPU-only
# torch wheel, which PyPI's torchvision cannot be imported next to (README: Install). uv reads
# no pip configuration. It installs the same pinned packages as pip would, downloading and
# unpacking on every core, and compiles the bytecode as well: a fresh install in well under half
# of pip's time (docs/install.md). `PIP=1 make install` takes pip's route instead.
# `.[dev]` includes the `robustbench` extra: robustbench 1.1.1 and AutoAttack as PyPI has it
# (pyautoattack; the GitHub `autoattack` is not on PyPI), setuptools<82 for robustbench's
# pkg_resources import; pyproject.toml says why and how tests/test_export.py imports them.
UV_VERSION := 0.13.9
$(STAMP): requirements.lock pyproject.toml
	$(PYTHON) -m venv $(VENV)
ifeq ($(PIP),)
	env -u PIP_FIND_LINKS PIP_CONFIG_FILE=/dev/null $(VENV)/bin/pip install -q uv==$(UV_VERSION)
	$(VENV)/bin/uv pip install --python $(VENV)/bin/python --compile-bytecode -c requirements.lock -e '.[dev]'
else
	env -u PIP_FIND_LINKS PIP_CONFIG_FILE=/dev/null $(VENV)/bin/pip install --no-compile -c requirements.lock -e '.[dev]'
	$(VENV)/bin/python -m compileall -q -j 0 $(VENV)/lib > /dev/null || true
endif
	touch $@
