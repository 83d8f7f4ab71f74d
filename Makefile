# Two commands do all the set-up:  `make run`  and  `make test`.
PYTHON ?= python3
VENV   ?= .venv
BIN    := $(VENV)/bin
STAMP  := $(VENV)/.installed

.PHONY: run test install clean

# An editable install does not put twisted/plugins/csms_plugin.py where twistd looks; the .pth
# written below puts the checkout on sys.path so that `twistd csms` finds it (a wheel needs nothing).
# The worked example of a vendor plugin (examples/acme-plugin) is installed too: its tests run with ours.
$(STAMP): setup.cfg pyproject.toml examples/acme-plugin/pyproject.toml
	$(PYTHON) -m venv $(VENV)
	$(BIN)/pip install --quiet --upgrade pip
	$(BIN)/pip install --quiet -e '.[test,postgresql,bench]'
	$(BIN)/pip install --quiet -e examples/acme-plugin
	$(BIN)/python -c "import os, site; open(os.path.join(site.getsitepackages()[0], 'csms-checkout.pth'), 'w').write(os.getcwd() + '\\n')"
	touch $(STAMP)

install: $(STAMP)

## Set everything up and run the CSMS in the foreground on the embedded SQLite database (var/).
run: $(STAMP)
	mkdir -p var
	$(BIN)/twistd --pidfile= -n csms --config etc/csms.ini

## Set everything up and run the tests, the example plugin's too (PostgreSQL too when CSMS_TEST_POSTGRES_URL is set).
test: $(STAMP)
	$(BIN)/pytest $(PYTEST_ARGS)

clean:
	rm -rf $(VENV) var build *.egg-info
