"""Alembic's environment for every migration history of the CSMS (the framework's and each plugin's).

It is not run with the ``alembic`` command: :mod:`csms.migrations` (``csms-admin db ...`` and start-up)
hands it the connection and the history through the Alembic config's attributes.
"""
from alembic import context

from csms.migrations import run_environment

run_environment(context)
