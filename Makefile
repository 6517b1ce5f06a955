# The two commands a newcomer needs:  make demo  and  make check
PYTHON ?= python3
VENV   := .venv
BIN    := $(VENV)/bin

.PHONY: demo check check-oldest lint install clean package-test pypy-venv check-pypy

# Runs "python ..." with .venv, or, as root in a clone that other users may
# not enter, with a copy that the agents' accounts can read (tools/runtime_copy.py).
RUN    := $(BIN)/python tools/runtime_copy.py --

$(BIN)/.installed: setup.cfg pyproject.toml
	$(PYTHON) -m venv $(VENV)
	$(BIN)/pip install --quiet --upgrade pip
	# compat mode: a plain path in a .pth, so twistd finds twisted/plugins here
	$(BIN)/pip install --quiet --config-settings editable_mode=compat -e '.[test,lint]'
	touch $@

install: $(BIN)/.installed

demo: install
	$(RUN) python -m pixelated_dispatcher.demo

check: lint
	$(RUN) python -m pytest -rs tests

# The style and type gate, run first by make check (settings in
# pyproject.toml): ruff (pyflakes, pycodestyle) and mypy with mypy-zope on the
# package.
lint: install
	$(BIN)/ruff check pixelated_dispatcher tests bench tools
	$(BIN)/mypy pixelated_dispatcher

# The proxy's tests once more on the oldest releases the dispatcher supports,
# Debian 12's: Twisted 22.4, treq 22.2, pyOpenSSL 23.0 (make check runs the
# newest). .ci/run runs it after make check.
OLDEST       := .venv-oldest
OLDEST_PINS  := 'twisted[tls]==22.4.0' 'treq==22.2.0' 'pyopenssl==23.0.0' 'cryptography==38.0.4'
OLDEST_TESTS := tests/test_proxy_*.py tests/test_fake_manager.py tests/test_fanout.py

$(OLDEST)/bin/.installed: setup.cfg pyproject.toml
	$(PYTHON) -m venv $(OLDEST)
	$(OLDEST)/bin/pip install --quiet --upgrade pip
	$(OLDEST)/bin/pip install --quiet --config-settings editable_mode=compat \
	    $(OLDEST_PINS) -e '.[test]'
	touch $@

check-oldest: $(OLDEST)/bin/.installed
	$(OLDEST)/bin/python tools/runtime_copy.py -- python -m pytest -rs $(OLDEST_TESTS)

# Debian packages: build, lintian, the suite on Debian's Python, install, log
# in with both providers, purge, and boot them in a Debian 12 container (root;
# about 6 minutes; see docs/packaging.rst). .ci/run runs it after make check.
package-test:
	bash .ci/debian.sh --unit-tests --docker --nspawn

# The proxy on PyPy, the faster way to run it on a busy host (docs/benchmarks.rst,
# "The proxy on PyPy"): Debian 12's pypy3 7.3.11 (apt-get install pypy3
# pypy3-venv pypy3-dev), with only what the proxy needs; the manager (argon2,
# psutil) stays on CPython. tools/pypy-constraints.txt keeps cryptography and
# pyOpenSSL at versions that have wheels for PyPy 3.9.
PYPY       ?= pypy3
PYPY_VENV  := .venv-pypy
PYPY_BIN   := $(PYPY_VENV)/bin
PROXY_DEPS := 'twisted[tls] >= 22.4' pyopenssl service-identity attrs zope.interface
# The proxy's tests; those that start the real manager need its dependencies.
PYPY_TESTS := $(filter-out tests/test_proxy_operations.py,$(wildcard tests/test_proxy_*.py))
PYPY_SKIP  := not RealDispatcherTests and not ProxyUnderMemoryDenyWriteExecuteTests \
              and not BodyWithoutSession and not StoppedAgentProcess

$(PYPY_BIN)/.installed: setup.cfg pyproject.toml tools/pypy-constraints.txt
	$(PYPY) -m venv $(PYPY_VENV)
	$(PYPY_BIN)/pip install --quiet --upgrade pip
	$(PYPY_BIN)/pip install --quiet -c tools/pypy-constraints.txt $(PROXY_DEPS) treq pytest hypothesis
	$(PYPY_BIN)/pip install --quiet --no-deps --config-settings editable_mode=compat -e .
	touch $@

pypy-venv: $(PYPY_BIN)/.installed

check-pypy: pypy-venv
	$(PYPY_BIN)/python -m pytest -rs -k "$(PYPY_SKIP)" $(PYPY_TESTS)

clean:
	rm -rf $(VENV) $(OLDEST) $(PYPY_VENV) build *.egg-info .hypothesis test-artifacts
	find . -name dropin.cache -delete
