"""Prefect isolation for flow tests: a private PREFECT_HOME, no analytics, generous start-up.

Set before Prefect is imported (flows/certify.py imports it), so the temporary local server
Prefect starts for a flow run without PREFECT_API_URL uses its own SQLite database.
"""

import os
import tempfile

_home = tempfile.mkdtemp(prefix="densepure-prefect-")
os.environ["PREFECT_HOME"] = _home
os.environ.setdefault("PREFECT_SERVER_ANALYTICS_ENABLED", "false")
os.environ.setdefault("PREFECT_SERVER_EPHEMERAL_STARTUP_TIMEOUT_SECONDS", "180")
os.environ.pop("PREFECT_API_URL", None)
