# Two commands do all the set-up:  `make run`  and  `make test`.
PYTHON ?= python3
VENV   ?= .venv
BIN    := $(VENV)/bin
STAMP  := $(VENV)/.installed

.PHONY: run test install clean

# The worked example of a vendor plugin (examples/acme-plugin) is installed too: its tests run with ours.
# twistd finds `twistd csms` through twisted/plugins/csms_plugin.py in a `twisted/plugins` directory on
# sys.path, which an editable install does not provide (a wheel needs nothing). The .pth written below
# adds a directory of the venv holding only a link to that file: putting the checkout itself on sys.path
# would also make its plugins/ importable as a bare `plugins` package, a second copy of csms_plugins
# (csms-checkout.pth, which earlier versions of this file wrote, did that).
TWISTD_PLUGINS := $(abspath $(VENV))/twistd-plugins

$(STAMP): setup.cfg pyproject.toml Makefile examples/acme-plugin/pyproject.toml
	$(PYTHON) -m venv $(VENV)
	$(BIN)/pip install --quiet --upgrade pip
	$(BIN)/pip install --quiet -e '.[test,postgresql,bench]'
	$(BIN)/pip install --quiet -e examples/acme-plugin
	mkdir -p $(TWISTD_PLUGINS)/twisted/plugins
	ln -sf $(CURDIR)/twisted/plugins/csms_plugin.py $(TWISTD_PLUGINS)/twisted/plugins/csms_plugin.py
	site=$$($(BIN)/python -c 'import site; print(site.getsitepackages()[0])') && \
	    rm -f "$$site/csms-checkout.pth" && \
	    echo '$(TWISTD_PLUGINS)' > "$$site/csms-twistd-plugins.pth"
	touch $(STAMP)

install: $(STAMP)

## Set everything up and run the CSMS in the foreground on the embedded SQLite database (var/).
run: $(STAMP)
	mkdir -p var
	$(BIN)/twistd --pidfile= -n csms --config etc/csms.ini

## Set everything up and run the tests, the example plugin's too (PostgreSQL too when CSMS_TEST_POSTGRES_URL is set).
# In parallel (pytest-xdist): one worker per core, as the suite is CPU-bound (more workers measured
# slower); worksteal keeps every worker busy to the end, test durations ranging from milliseconds to a
# minute. PYTEST_WORKERS=0 runs serially, as `pytest` alone does.
PYTEST_WORKERS ?= auto
test: $(STAMP)
	$(BIN)/pytest -n $(PYTEST_WORKERS) --dist worksteal $(PYTEST_ARGS)

clean:
	rm -rf $(VENV) var build *.egg-info
