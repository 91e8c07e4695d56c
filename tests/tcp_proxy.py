"""The TCP proxy of the fault tests lives in the harness (`make chaos` uses it too)."""

from harness.tcpproxy import CountingProxy

__all__ = ["CountingProxy"]
