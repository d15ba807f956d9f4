"""Helpers test modules import (``from testkit import …``): conftest.py modules are not importable by name once
more than one exists (pytest loads each as ``conftest``)."""

from __future__ import annotations

import socket

S3_TEST_CREDENTIALS = {"access_key_id": "testing", "secret_access_key": "testing", "region": "us-east-1"}


def free_port() -> int:
    """A TCP port on 127.0.0.1 that was free a moment ago."""
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]
