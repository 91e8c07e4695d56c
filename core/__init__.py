"""The core every edge stands on: settings, the catalog and its queries, the vault, the object
store, a project's keys and de-identifier, each opened once (`Core`), and the project rules
(approval, cohorts). No network stack, no web framework, no torch: a Dask worker, the web server
and the CLI all import it.
"""

from core.core import Core
from core.errors import NotSetUp, ProjectError, SphereError, Unavailable, VaultSealed
from core.settings import Settings

__all__ = [
    "Core",
    "NotSetUp",
    "ProjectError",
    "Settings",
    "SphereError",
    "Unavailable",
    "VaultSealed",
]
