"""Test support for the CSMS and for plugin authors: a scriptable OCPP-J test station and pytest fixtures.

Plugin authors get the same fixtures the project's own tests use (``csms``, ``csms_factory``): the
package is registered as a pytest plugin through the ``pytest11`` entry point.
"""
