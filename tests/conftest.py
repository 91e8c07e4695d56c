"""Shared fixtures. Real peers (Orthanc, SeaweedFS S3) are started on loopback by their modules."""

import os

import pytest

pytest_plugins = ["tests.orthanc_fixture", "tests.s3server", "tests.pg_server"]


@pytest.fixture
def umask_022():
    """A permissive umask for the processes a test starts (a shell's usual): a check that
    sphere's files are owner-only then shows that sphere set its own."""
    before = os.umask(0o022)
    yield
    os.umask(before)
