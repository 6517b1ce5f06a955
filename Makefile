# The two commands a newcomer needs:  make demo  and  make check
PYTHON ?= python3
VENV   := .venv
BIN    := $(VENV)/bin

.PHONY: demo check install clean package-test

# Runs "python ..." with .venv, or, as root in a clone that other users may
# not enter, with a copy that the agents' accounts can read (tools/runtime_copy.py).
RUN    := $(BIN)/python tools/runtime_copy.py --

$(BIN)/.installed: setup.cfg pyproject.toml
	$(PYTHON) -m venv $(VENV)
	$(BIN)/pip install --quiet --upgrade pip
	# compat mode: a plain path in a .pth, so twistd finds twisted/plugins here
	$(BIN)/pip install --quiet --config-settings editable_mode=compat -e '.[test]'
	touch $@

install: $(BIN)/.installed

demo: install
	$(RUN) python -m pixelated_dispatcher.demo

check: install
	$(RUN) python -m pytest -rs tests

# Debian packages: build, lintian, the suite on Debian's Python, install, log
# in with both providers, purge, and boot them in a Debian 12 container (root;
# about 6 minutes; see docs/packaging.rst). .ci/run runs it after make check.
package-test:
	bash .ci/debian.sh --unit-tests --docker --nspawn

clean:
	rm -rf $(VENV) build *.egg-info .hypothesis test-artifacts
	find . -name dropin.cache -delete
