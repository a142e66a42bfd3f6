# Two entry points on a fresh machine: `make demo` and `make test`.
# Each installs what it needs: Debian packages when root, a virtualenv, pip.
PYTHON ?= python3
VENV   ?= .venv
PY     := $(VENV)/bin/python
APT_PACKAGES := wordnet-base wordnet-sense-index dataset-fashion-mnist

.PHONY: demo test test-all setup system venv bench-ontology clean

demo: setup
	$(VENV)/bin/dmde demo $(ARGS)

test: setup
	$(PY) -m pytest -q $(PYTEST_ARGS)

setup: system venv

# Debian's WordNet 3.0 and Fashion-MNIST; skipped quietly when not root or not Debian.
system:
	@if [ ! -f /usr/share/wordnet/data.noun ] || [ ! -d /usr/share/datasets/fashion-mnist ]; then \
	  if [ "$$(id -u)" = "0" ] && command -v apt-get >/dev/null; then \
	    apt-get update -qq && DEBIAN_FRONTEND=noninteractive apt-get install -y -qq --no-install-recommends $(APT_PACKAGES); \
	  else \
	    echo "note: not root; install $(APT_PACKAGES) yourself or set DMDE_WORDNET"; \
	  fi; \
	fi

venv: $(VENV)/.stamp-install

$(VENV)/.stamp-install: pyproject.toml
	@test -x $(PY) || $(PYTHON) -m venv $(VENV)
	$(PY) -m pip install -q --upgrade pip
	# torch first, pinned, so pip takes the CPU build instead of a multi-GB CUDA one.
	$(PY) -m pip install -q torch==2.13.0
	$(PY) -m pip install -q -e '.[dev]'
	@touch $@

bench-ontology: setup
	$(PY) benchmarks/ontology.py

clean:
	rm -rf $(VENV) build *.egg-info src/*.egg-info
