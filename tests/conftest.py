"""Fixtures come from csms.testing (registered as a pytest plugin); helpers shared by the tests live here."""
