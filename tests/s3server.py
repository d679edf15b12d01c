"""A throwaway S3 server on 127.0.0.1 for the S3-remote tests: moto's standalone server.

moto keeps every bucket in the memory of this (the test) process and answers the real S3 HTTP
API on a port of its own, so the `dvc` subprocesses talk to it exactly as they would to AWS,
MinIO or R2 through `endpointurl`. Nothing leaves 127.0.0.1, and nothing outlives the test
session: the server stops when the `with` block ends, or at the latest after `lifetime_s`.

    with S3Server.start() as server:
        server.create_bucket("dvc")
        server.endpoint_url               # http://127.0.0.1:40123
        server.env                        # AWS_* variables holding the fake credentials

`hold_uploads()` makes the server accept the first upload and hold every further one (then refuse
it), so that a test can kill a `dvc push` mid-transfer at a deterministic point.
"""

from __future__ import annotations

import logging
import threading
from collections.abc import Callable, Iterator
from contextlib import contextmanager

import boto3
from moto.server import ThreadedMotoServer

# moto accepts any credentials; these only have to exist, and must never be real ones.
ACCESS_KEY_ID = "testing-access-key"
SECRET_ACCESS_KEY = "testing-secret-key"
REGION = "us-east-1"


class UploadGate:
    """WSGI middleware: lets `allowed` object uploads through, then holds the rest until opened and
    refuses them."""

    def __init__(self, app: Callable, allowed: int):
        self.app = app
        self.allowed = allowed
        self.passed = 0
        self.held = threading.Event()  # set once a request is being held: the client is mid-push
        self.opened = threading.Event()
        self.lock = threading.Lock()

    def __call__(self, environ, start_response):
        if environ["REQUEST_METHOD"] == "PUT" and environ.get("QUERY_STRING", "") == "":
            with self.lock:
                self.passed += 1
                hold = self.passed > self.allowed
            if hold:
                self.held.set()
                self.opened.wait(timeout=120)
                # The client was killed meanwhile. Refuse rather than store what arrived: a real S3
                # server never keeps a partial PUT (it checks Content-Length), while moto might.
                start_response("503 Service Unavailable", [("Content-Length", "0")])
                return [b""]
        return self.app(environ, start_response)


class S3Server:
    def __init__(self, lifetime_s: float):
        # Port 0: the OS picks a free port when the server binds, so no other process can take it
        # between choosing and binding.
        self._moto = ThreadedMotoServer(ip_address="127.0.0.1", port=0, verbose=False)
        self._timer = threading.Timer(lifetime_s, self.stop)
        self._timer.daemon = True
        self._stopped = False
        self.gate: UploadGate | None = None

    @classmethod
    def start(cls, lifetime_s: float = 900) -> S3Server:
        server = cls(lifetime_s)
        # werkzeug logs every request to stderr; a push is dozens of them.
        logging.getLogger("werkzeug").setLevel(logging.WARNING)
        server._moto.start()
        server._timer.start()
        return server

    @property
    def endpoint_url(self) -> str:
        host, port = self._moto.get_host_and_port()
        return f"http://{host}:{port}"

    @property
    def env(self) -> dict[str, str]:
        """The standard AWS variables: how DVC (through boto) finds credentials without any config."""
        return {"AWS_ACCESS_KEY_ID": ACCESS_KEY_ID, "AWS_SECRET_ACCESS_KEY": SECRET_ACCESS_KEY,
                "AWS_DEFAULT_REGION": REGION}

    def client(self):
        return boto3.client("s3", endpoint_url=self.endpoint_url, region_name=REGION,
                            aws_access_key_id=ACCESS_KEY_ID, aws_secret_access_key=SECRET_ACCESS_KEY)

    def create_bucket(self, name: str) -> None:
        self.client().create_bucket(Bucket=name)

    def keys(self, bucket: str) -> list[str]:
        pages = self.client().get_paginator("list_objects_v2").paginate(Bucket=bucket)
        return [item["Key"] for page in pages for item in page.get("Contents", [])]

    def read(self, bucket: str, key: str) -> bytes:
        return self.client().get_object(Bucket=bucket, Key=key)["Body"].read()

    def write(self, bucket: str, key: str, data: bytes) -> None:
        self.client().put_object(Bucket=bucket, Key=key, Body=data)

    @contextmanager
    def hold_uploads(self, allowed: int = 1) -> Iterator[UploadGate]:
        """Within the block, uploads after the first `allowed` wait (up to 120 s), then fail: none lands."""
        server = self._moto._server
        assert server is not None, "start() first"
        self.gate = UploadGate(server.app, allowed)
        server.app = self.gate
        try:
            yield self.gate
        finally:
            self.gate.opened.set()
            server.app = self.gate.app
            self.gate = None

    def stop(self) -> None:
        if not self._stopped:
            self._stopped = True
            self._timer.cancel()
            self._moto.stop()

    def __enter__(self) -> S3Server:
        return self

    def __exit__(self, *exc) -> None:
        self.stop()
