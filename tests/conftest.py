"""Fixtures several test modules share (each builds on hff_cache.testing, as users' own tests would)."""

from collections.abc import Iterator

import pytest


@pytest.fixture
def s3_endpoint(monkeypatch: pytest.MonkeyPatch) -> Iterator[str]:
    """A local moto S3 server (hff_cache.testing.s3_server) with test credentials in the environment."""
    pytest.importorskip("s3fs")
    pytest.importorskip("moto.server")
    from hff_cache.testing import s3_server

    for k in ("AWS_ACCESS_KEY_ID", "AWS_SECRET_ACCESS_KEY", "AWS_SESSION_TOKEN"):
        monkeypatch.setenv(k, "testing")
    monkeypatch.setenv("AWS_DEFAULT_REGION", "us-east-1")
    with s3_server() as server:
        yield server.endpoint
