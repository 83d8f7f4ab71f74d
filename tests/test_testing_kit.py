"""The testing kit a plugin author gets: ``csms.testing``, its pytest plugin, and docs/testing.md.

The examples of docs/testing.md and the plugin's behaviour without the test extras are checked the
way a vendor meets them: in a separate pytest run, outside this project's conftest.
"""
from __future__ import annotations

import os
import re
import subprocess
import sys
import textwrap

import pytest
# Imported here, before any pytester fixture snapshots sys.modules: a module first imported inside a
# pytester test is dropped from sys.modules at its teardown, and importing treq a second time registers
# its Twisted adapters twice (ValueError in every later test that uses it).
import pytest_twisted
import treq  # noqa: F401
from twisted.internet import defer
from zope.interface import implementer

import conftest
import csms.testing
from csms.hookspecs import hookimpl
from csms.interfaces import ICSMSPlugin

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
TESTING_MD = os.path.join(ROOT, "docs", "testing.md")
#: A fenced Python block whose first line names a file (``# test_acme.py``) is a runnable example.
EXAMPLE = re.compile(r"^```python\n# ((?:test_\w+|conftest)\.py)\n(.*?)^```$", re.MULTILINE | re.DOTALL)
#: Inner pytest runs start a Python with Twisted, SQLAlchemy and the CSMS: allow for a slow machine.
INNER_RUN_TIMEOUT = 100
#: The guide's examples start a dozen Central Systems per backend.
EXAMPLES_RUN_TIMEOUT = 280

PLUGIN_AUTHOR_NAMES = ["EventProbe", "within", "booted", "PythonOperator", "HttpOperator", "HttpOperatorError",
                       "db_settled", "table_contents", "clock_now", "station_time", "as_stored", "TIMEOUT"]


@pytest.mark.parametrize("name", PLUGIN_AUTHOR_NAMES)
def test_helpers_live_in_csms_testing_and_conftest_only_reexports_them(name):
    helper = getattr(csms.testing, name)
    assert getattr(conftest, name) is helper
    if callable(helper):
        assert helper.__module__.startswith("csms.testing."), helper.__module__


def test_csms_testing_lists_what_it_exports():
    assert set(PLUGIN_AUTHOR_NAMES) <= set(csms.testing.__all__)
    for name in csms.testing.__all__:
        assert getattr(csms.testing, name) is not None
    with pytest.raises(AttributeError):
        csms.testing.no_such_helper


# -- docs/testing.md ------------------------------------------------------------------------------------


def documented_examples() -> dict[str, str]:
    """File name -> source, for every runnable example of docs/testing.md."""
    with open(TESTING_MD, encoding="utf-8") as f:
        text = f.read()
    examples: dict[str, str] = {}
    for name, source in EXAMPLE.findall(text):
        assert name not in examples, f"docs/testing.md has two examples named {name}"
        examples[name] = source
    return examples


def test_testing_guide_has_a_complete_example_with_its_plugin_inline():
    examples = documented_examples()
    assert "test_acme.py" in examples
    acme = examples["test_acme.py"]
    assert "@implementer(ICSMSPlugin)" in acme and "csms_factory" in acme and "def test_" in acme


@pytest.mark.timeout(EXAMPLES_RUN_TIMEOUT + 20)
def test_testing_guide_examples_pass_in_a_project_of_their_own(pytester):
    examples = documented_examples()
    pytester.makepyfile(**{name[:-len(".py")]: source for name, source in examples.items()})
    result = pytester.runpytest_subprocess("-v", "-p", "no:cacheprovider", timeout=EXAMPLES_RUN_TIMEOUT)
    outcomes = result.parseoutcomes()
    assert result.ret == 0, result.stdout.str()
    assert set(outcomes) <= {"passed", "warnings", "deselected"}, outcomes
    tests = sorted({test for source in examples.values() for test in re.findall(r"^(?:async )?def (test_\w+)",
                                                                                 source, re.MULTILINE)})
    assert tests
    for test in tests:
        result.stdout.fnmatch_lines([f"*::{test}* PASSED*"])


# -- the pytest plugin without the test extras ----------------------------------------------------------

#: Runs pytest as in an environment where csms is installed without its [test] extra: the extras'
#: modules cannot be imported, and their pytest plugins (entry points) are not there.
WITHOUT_TEST_EXTRAS = '''
import sys
from importlib.abc import MetaPathFinder

HIDDEN = {"pytest_twisted", "treq", "hypothesis", "websockets", "pytest_timeout", "schemathesis"}


class HideTestExtras(MetaPathFinder):
    def find_spec(self, name, path=None, target=None):
        if name.partition(".")[0] in HIDDEN:
            raise ModuleNotFoundError(f"No module named {name!r}", name=name)
        return None


sys.meta_path.insert(0, HideTestExtras())
import pytest

# --assert=plain: pytest's assertion rewriter would otherwise sit before HideTestExtras and import the
# modules of installed pytest plugins itself.
sys.exit(pytest.main(["--assert=plain", "-p", "no:twisted", "-p", "no:timeout", "-p", "no:hypothesispytest",
                      "-p", "no:schemathesis", *sys.argv[1:]]))
'''


def test_pytest_plugin_loads_without_test_extras_and_names_them_when_a_fixture_needs_them(pytester, monkeypatch):
    monkeypatch.delenv("CSMS_TEST_POSTGRES_URL", raising=False)  # one backend, one error
    runner = pytester.makepyfile(run_without_test_extras=WITHOUT_TEST_EXTRAS)
    pytester.makepyfile(
        test_plain="def test_unrelated_to_csms():\n    assert 1 + 1 == 2\n",
        test_needs_csms="def test_uses_a_running_csms(csms):\n    pass\n",
    )
    result = pytester.run(sys.executable, str(runner), "-v", "-rE", "-p", "no:cacheprovider",
                          timeout=INNER_RUN_TIMEOUT)
    result.assert_outcomes(passed=1, errors=1)
    result.stdout.fnmatch_lines(["*test_plain.py::test_unrelated_to_csms PASSED*"])
    result.stdout.fnmatch_lines(["*ERROR at setup of test_uses_a_running_csms*",
                                 "the csms test fixtures need pytest-twisted, treq: pip install 'csms[test]'"])


def test_runner_without_test_extras_really_hides_them(pytester):
    """The check above means something only if the hidden modules are installed here and hidden there."""
    runner = pytester.makepyfile(run_without_test_extras=WITHOUT_TEST_EXTRAS)
    pytester.makepyfile(test_hidden=textwrap.dedent('''
        import importlib, pytest

        @pytest.mark.parametrize("module", ["pytest_twisted", "treq"])
        def test_hidden(module):
            with pytest.raises(ImportError):
                importlib.import_module(module)
    '''))
    result = pytester.run(sys.executable, str(runner), "-p", "no:cacheprovider", timeout=INNER_RUN_TIMEOUT)
    result.assert_outcomes(passed=2)


# -- the environment `make` builds ----------------------------------------------------------------------


def run_python(code: str, cwd) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-c", code], cwd=cwd, capture_output=True, text=True,
                          timeout=INNER_RUN_TIMEOUT)


def test_checkouts_plugins_directory_is_importable_only_as_csms_plugins(tmp_path):
    """A bare ``plugins`` package would load each plugin file a second time, as a different module."""
    done = run_python("import csms_plugins.localauth.lists\nimport plugins\n", cwd=tmp_path)
    assert "ModuleNotFoundError: No module named 'plugins'" in done.stderr, done.stderr


def test_twistd_finds_csms_from_any_directory(tmp_path):
    twistd = os.path.join(os.path.dirname(sys.executable), "twistd")
    done = subprocess.run([twistd, "--help"], cwd=tmp_path, capture_output=True, text=True,
                          timeout=INNER_RUN_TIMEOUT)
    assert done.returncode == 0, done.stderr
    assert re.search(r"^\s+csms\s+An OCPP 1\.6J Central System", done.stdout, re.MULTILINE), done.stdout


# -- the fixtures hold API answers to the OpenAPI document ----------------------------------------------

DRIFTING_PLUGIN_TEST = '''
import pytest_twisted
from zope.interface import implementer

from csms.api.types import INTEGER, record
from csms.hookspecs import hookimpl
from csms.interfaces import ICSMSPlugin


@implementer(ICSMSPlugin)
class Counter:
    name = "counter"
    profile = None
    inbound_actions = ()
    outbound_actions = ()

    @hookimpl
    def csms_api_routes(self, app, router):
        router.add("GET", "/counter", lambda request: {"count": 1, "unit": "apples"}, "The count",
                   response=record({"count": INTEGER}))


@pytest_twisted.ensureDeferred
async def test_reads_the_counter(csms_factory):
    csms = await csms_factory(plugins=[], extra_plugins=[Counter()])
    status, body, _ = await csms.api("GET", "/counter")
    assert status == 200 and body["count"] == 1
'''


def test_a_plugin_test_whose_answer_strays_from_its_declared_schema_fails(pytester, monkeypatch):
    monkeypatch.delenv("CSMS_TEST_POSTGRES_URL", raising=False)  # one backend, one error
    pytester.makepyfile(test_counter=DRIFTING_PLUGIN_TEST)
    result = pytester.runpytest_subprocess("-p", "no:cacheprovider", timeout=INNER_RUN_TIMEOUT)
    result.assert_outcomes(passed=1, errors=1)
    result.stdout.fnmatch_lines(["*operator API answers that break the OpenAPI document:*",
                                 "GET /counter answered 200 with a body that breaks its schema at (the body): "
                                 "Additional properties are not allowed ('unit' was unexpected)*"])



@implementer(ICSMSPlugin)
class _SlowListener:
    """A plugin whose ``csms_on_station_connected`` is done only when the test says so."""

    name = "slowlistener"
    profile = None
    inbound_actions = ()
    outbound_actions = ()

    def __init__(self):
        self.called, self.release = defer.Deferred(), defer.Deferred()

    @hookimpl
    def csms_on_station_connected(self, station_id, station):
        self.called.callback(station_id)
        return self.release


@pytest_twisted.ensureDeferred
@pytest.mark.parametrize("settled", [True, False])
async def test_connect_fires_once_the_connected_listeners_are_done_unless_not_settled(csms_factory, settled):
    """What a listener writes for a new connection is committed when a test's ``connect`` returns (a test
    comparing tables before and after a call must not see it arrive in between); ``settled=False`` returns
    at the handshake."""
    listener = _SlowListener()
    running = await csms_factory(extra_plugins=[listener])
    connected = []
    connecting = running.connect("CP-SLOW", settled=settled).addCallback(lambda station: connected.append(station))
    assert await conftest.within(listener.called) == "CP-SLOW"
    if settled:
        await conftest.within(running.app.db.barrier())  # the handshake is long done; the listener is not
        assert connected == []
        listener.release.callback(None)
    await conftest.within(connecting)
    assert connected == [running.stations[-1]]
    if not settled:
        listener.release.callback(None)
