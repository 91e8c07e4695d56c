"""Fixture `s3_server` (session): one SeaweedFS S3 server (`harness.seaweed`) for the whole
run, with a default `bucket`; `new_bucket()` gives each test a fresh one."""

from __future__ import annotations

import shutil

import pytest

from harness.seaweed import SeaweedS3

__all__ = ["SeaweedS3", "s3_server"]


@pytest.fixture(scope="session")
def s3_server(tmp_path_factory: pytest.TempPathFactory):
    """A SeaweedFS S3 server on loopback for the whole test session."""
    root = tmp_path_factory.mktemp("seaweedfs")
    server = SeaweedS3(root)
    server.start()
    try:
        yield server
    finally:
        server.stop()
        shutil.rmtree(root, ignore_errors=True)
