"""``python -m csms_plugins.webhooks``: the delivery worker, as the CSMS starts it (see worker.py)."""
import sys

from .worker import main

sys.exit(main())
