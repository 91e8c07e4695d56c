"""Shared fixtures. Real peers (Orthanc, SeaweedFS S3) are started on loopback by their modules."""

pytest_plugins = ["tests.orthanc_fixture", "tests.s3server", "tests.pg_server"]
