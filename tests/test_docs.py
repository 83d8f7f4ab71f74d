"""docs/hooks.md documents every hook of csms/hookspecs.py, with the signature the code has."""
from __future__ import annotations

import inspect
import os
import re

import pytest

from csms import hookspecs

HOOKS_MD = os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))), "docs", "hooks.md")
HEADING = re.compile(r"^### (csms_\w+)(\(.*\))\s*$")
KIND = re.compile(r"^Kind: \*\*(firstresult|every plugin|event)\*\*")


def hook_specs() -> dict:
    """Hook name -> function, for every function marked with ``@hookspec`` in csms.hookspecs."""
    marker = f"{hookspecs.hookspec.project_name}_spec"
    return {name: function for name, function in inspect.getmembers(hookspecs, inspect.isfunction)
            if hasattr(function, marker)}


def is_firstresult(function) -> bool:
    return getattr(function, f"{hookspecs.hookspec.project_name}_spec").get("firstresult", False)


def documented_hooks() -> dict:
    """Hook name -> (signature text, the section's text) for every ``### csms_...(...)`` heading."""
    with open(HOOKS_MD, encoding="utf-8") as f:
        lines = f.read().splitlines()
    sections: dict = {}
    current = None
    for line in lines:
        if line.startswith("#"):
            current = None
            match = HEADING.match(line)
            if match is not None:
                name, signature = match.groups()
                assert name not in sections, f"{name} is documented twice"
                current = name
                sections[name] = (signature, [])
            continue
        if current is not None:
            sections[current][1].append(line)
    return {name: (signature, "\n".join(body).strip()) for name, (signature, body) in sections.items()}


HOOKS = hook_specs()


def test_hookspecs_are_found():
    assert len(HOOKS) >= 30
    assert "csms_handle_boot_notification" in HOOKS
    assert "csms_on_station_connected" in HOOKS


@pytest.mark.parametrize("name", sorted(HOOKS))
def test_hook_is_documented_with_its_signature(name):
    documented = documented_hooks()
    assert name in documented, f"{name} has no '### {name}(...)' heading in docs/hooks.md"
    signature = str(inspect.signature(HOOKS[name]))
    assert documented[name][0] == signature, \
        f"docs/hooks.md documents {name}{documented[name][0]}, the hookspec is {name}{signature}"


@pytest.mark.parametrize("name", sorted(HOOKS))
def test_hook_documentation_says_its_kind_and_explains_it(name):
    _, text = documented_hooks()[name]
    match = KIND.match(text)
    assert match is not None, f"the section of {name} must start with 'Kind: **...**'"
    assert (match.group(1) == "firstresult") == is_firstresult(HOOKS[name]), \
        f"docs/hooks.md says {name} is {match.group(1)!r}; the hookspec says firstresult={is_firstresult(HOOKS[name])}"
    assert len(text.split()) >= 25, f"the section of {name} is too short to explain what the hook is for"


def test_no_documented_hook_is_missing_from_the_hookspecs():
    stale = sorted(set(documented_hooks()) - set(HOOKS))
    assert stale == [], f"docs/hooks.md documents hooks that do not exist: {stale}"


def test_every_hook_docstring_exists():
    undocumented = sorted(name for name, function in HOOKS.items() if not inspect.getdoc(function))
    assert undocumented == []


def test_firstresult_hook_docstrings_say_so():
    # pytest's convention: "who handles this?" hooks say where they stop.
    silent = sorted(name for name, function in HOOKS.items()
                    if is_firstresult(function) and "Stops at first non-None result" not in inspect.getdoc(function))
    assert silent == []


def test_every_hook_has_the_project_prefix():
    assert all(name.startswith("csms_") for name in HOOKS)
    assert all(not name.startswith("csms_") or name in HOOKS
               for name, function in inspect.getmembers(hookspecs, inspect.isfunction))


def test_the_plugin_example_declares_and_reads_its_settings():
    """The example plugin of docs/hooks.md loads, and its section is checked against what it declares."""
    from csms.app import CentralSystem
    from csms.config import ConfigError, load_config

    with open(HOOKS_MD, encoding="utf-8") as f:
        example = re.search(r"```python\n(.*?)```", f.read(), re.S).group(1)
    namespace: dict = {}
    exec(compile(example, "docs/hooks.md", "exec"), namespace)  # noqa: S102 - our own documentation
    plugin = namespace["AcmePlugin"]()
    base = "[database]\nurl = sqlite://\n[plugins]\nenabled = core\n"
    CentralSystem(load_config(text=base + "[plugin:acme]\ngreeting = hi\n"), extra_plugins=[plugin])
    assert plugin.greeting == "hi"
    with pytest.raises(ConfigError, match=r"\[plugin:acme\] has no setting 'greting'"):
        CentralSystem(load_config(text=base + "[plugin:acme]\ngreting = hi\n"), extra_plugins=[namespace["AcmePlugin"]()])
