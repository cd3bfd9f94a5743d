"""A real S3-compatible server on 127.0.0.1 (moto in server mode) for tests and benchmarks of URI outputs.

It needs the test extra (``pip install -e ".[test]"``: ``moto[server]``). Clients find it through the standard AWS
variables in ``env``, which pyarrow, boto3 and Ray read alike; the credentials are dummies and nothing leaves the
machine.

Example::

    >>> with LoopbackS3(bucket="runs") as s3:                           # doctest: +SKIP
    ...     os.environ.update(s3.env)
    ...     Location(s3.uri("a/summary.json")).write_json({"step": 1})
"""

from __future__ import annotations

import os
import shutil
import socket
import subprocess
import sys
import tempfile
import time
from pathlib import Path

from orchestration.errors import StorageError


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


class LoopbackS3:
    """``moto_server`` on a free loopback port with one bucket; ``stop()`` (or leaving the ``with``) ends it."""

    def __init__(self, bucket: str = "memtrain-test", log_dir: str | os.PathLike | None = None):
        self.bucket = bucket
        self.port = free_port()
        self.endpoint = f"http://127.0.0.1:{self.port}"
        self.env = {
            "AWS_ENDPOINT_URL": self.endpoint,
            "AWS_ACCESS_KEY_ID": "testing",
            "AWS_SECRET_ACCESS_KEY": "testing",
            "AWS_DEFAULT_REGION": "us-east-1",
            "AWS_REGION": "us-east-1",
            # no probing of 169.254.169.254 for instance credentials or region (seconds of timeouts per client)
            "AWS_EC2_METADATA_DISABLED": "true",
        }
        self._own_log_dir = log_dir is None
        self.log_dir = Path(log_dir or tempfile.mkdtemp(prefix="memtrain-s3-"))
        self._proc: subprocess.Popen | None = None

    def uri(self, path: str = "") -> str:
        """``s3://<bucket>/<path>``."""
        return f"s3://{self.bucket}/{path.lstrip('/')}".rstrip("/")

    def launch(self, prefix: tuple[str, ...] = ()) -> None:
        """Start the server process (``prefix``: a command that wraps it, e.g. ``setpriv --pdeathsig TERM --``)."""
        server = shutil.which("moto_server") or str(Path(sys.executable).with_name("moto_server"))
        if not os.path.exists(server):
            raise StorageError("moto_server is not installed; pip install -e \".[test]\" (it brings moto[server])")
        with open(self.log_dir / "moto.log", "ab") as log:  # the child keeps its own descriptor
            self._proc = subprocess.Popen([*prefix, server, "-H", "127.0.0.1", "-p", str(self.port)],
                                          stdin=subprocess.DEVNULL, stdout=log, stderr=subprocess.STDOUT)

    @property
    def pid(self) -> int | None:
        return self._proc.pid if self._proc is not None else None

    def wait_ready(self, timeout: float = 30.0) -> None:
        """Create the bucket as soon as the server answers (it takes a second or two to import)."""
        import boto3
        import botocore.exceptions

        client = boto3.client("s3", endpoint_url=self.endpoint, region_name="us-east-1",
                              aws_access_key_id="testing", aws_secret_access_key="testing")
        deadline = time.monotonic() + timeout
        while True:
            try:
                client.create_bucket(Bucket=self.bucket)
                return
            except botocore.exceptions.EndpointConnectionError:
                if self._proc.poll() is not None or time.monotonic() > deadline:
                    log = (self.log_dir / "moto.log").read_text()[-2000:]
                    self.stop()
                    raise StorageError(f"moto_server did not start: {log}") from None
                time.sleep(0.1)

    def start(self, timeout: float = 30.0) -> LoopbackS3:
        self.launch()
        self.wait_ready(timeout)
        return self

    def stop(self) -> None:
        if self._proc is not None and self._proc.poll() is None:
            self._proc.terminate()
            try:
                self._proc.wait(timeout=10)
            except subprocess.TimeoutExpired:
                self._proc.kill()
                self._proc.wait()
        self._proc = None
        if self._own_log_dir:
            shutil.rmtree(self.log_dir, ignore_errors=True)

    def __enter__(self) -> LoopbackS3:
        return self.start()

    def __exit__(self, *exc) -> None:
        self.stop()
