"""An S3-compatible object store for the tests of the team extra (`make team-deps`): moto's S3 server
in this process, on 127.0.0.1 and a free port, with a key pair of its own (an IAM user). It can stop
(alone, or after a number of uploads, as if it failed mid-push) and start again on the same port with
its contents, as a real store comes back after an outage.

moto accepts any key pair unless its IAM authentication is on; `authenticating()` turns it on for
the tests of a wrong key. It stays off otherwise because moto's check cannot read a presigned URL
(it looks for an Authorization header), and MLflow's clients download a tracking server's S3
artifacts through presigned URLs. moto's state and that switch are this process's.

Imported only where the extra is installed: `missing_extra()` says first whether it is."""

from __future__ import annotations

import importlib.util
import json
import threading
from collections.abc import Callable, Iterable, Iterator
from contextlib import ExitStack, contextmanager
from dataclasses import dataclass, field
from typing import TYPE_CHECKING
from urllib.request import Request, urlopen

if TYPE_CHECKING:
    from botocore.client import BaseClient

BUCKET = "mnist-cnn"  # the bucket of docs/operations.md
# What the team extra brings (pyproject.toml `team`, `team-test`), by import name.
EXTRA_MODULES = ("dvc_s3", "boto3", "moto")


def missing_extra() -> str | None:
    """None where the team extra is installed, else one line naming what is missing."""
    missing = [name for name in EXTRA_MODULES if importlib.util.find_spec(name) is None]
    if not missing:
        return None
    return f"the team extra is not installed ({', '.join(missing)} missing): make team-deps"


@dataclass
class ObjectStore:
    endpoint: str  # http://127.0.0.1:<port>
    access_key: str
    secret_key: str
    _server: _Server = field(repr=False)

    def env(self) -> dict[str, str]:
        """A client's AWS variables: this store's key pair (before any from ~/.aws, for boto3 and DVC alike)."""
        return {"AWS_ACCESS_KEY_ID": self.access_key, "AWS_SECRET_ACCESS_KEY": self.secret_key}

    def client(self) -> BaseClient:
        import boto3

        return boto3.client(
            "s3",
            endpoint_url=self.endpoint,
            aws_access_key_id=self.access_key,
            aws_secret_access_key=self.secret_key,
            region_name="us-east-1",
        )

    def objects(self, prefix: str) -> dict[str, bytes]:
        """Every object under s3://BUCKET/prefix: key -> contents."""
        client = self.client()
        pages = client.get_paginator("list_objects_v2").paginate(Bucket=BUCKET, Prefix=prefix)
        keys = [item["Key"] for page in pages for item in page.get("Contents", [])]
        return {key: client.get_object(Bucket=BUCKET, Key=key)["Body"].read() for key in keys}

    @property
    def running(self) -> bool:
        return self._server.running

    def stop(self) -> None:
        """Stop answering: connections are refused until start(). The contents stay."""
        self._server.stop()

    def start(self) -> None:
        self._server.start()

    @contextmanager
    def authenticating(self) -> Iterator[None]:
        """Only this store's key pair is accepted while this runs (moto's IAM authentication)."""
        from moto.core.authorization import enable_iam_authentication

        with enable_iam_authentication():
            yield

    def stop_after_uploads(self, count: int) -> None:
        """Stop by itself once `count` more objects have been stored (a store that fails mid-push)."""
        self._server.stop_after = count


class _Server:
    """moto's WSGI application behind werkzeug's threaded server (what moto's ThreadedMotoServer
    runs), on a fixed port so that it can start again where its clients expect it; with a count of
    uploads after which it stops."""

    def __init__(self, port: int) -> None:
        from moto.moto_server.werkzeug_app import DomainDispatcherApplication, create_backend_app

        self.port = port
        self.app = DomainDispatcherApplication(create_backend_app)
        self.stop_after: int | None = None
        self._lock = threading.Lock()
        self._switch = threading.Lock()  # a start waits for a stop under way to release the port
        self._server = None
        self._thread: threading.Thread | None = None

    @property
    def running(self) -> bool:
        return self._server is not None

    def __call__(self, environ: dict, start_response: Callable) -> Iterable[bytes]:
        body = self.app(environ, start_response)
        if environ["REQUEST_METHOD"] == "PUT" and self.stop_after is not None:
            with self._lock:
                self.stop_after -= 1
                if self.stop_after == 0:
                    self.stop_after = None
                    # Not in this request's thread: stop() waits for the server loop, which would wait for it.
                    threading.Thread(target=self.stop, daemon=True).start()
        return body

    def start(self) -> None:
        from moto.moto_server.werkzeug_app import MotoRequestHandler
        from werkzeug.serving import make_server

        class Quiet(MotoRequestHandler):
            def log_request(self, *args: object) -> None:
                pass  # a line per request on the test's stderr

        with self._switch:
            server = make_server("127.0.0.1", self.port, self, threaded=True, request_handler=Quiet)
            self._thread = threading.Thread(target=server.serve_forever, daemon=True)
            self._thread.start()
            self._server = server

    def stop(self) -> None:
        with self._switch:
            server, self._server = self._server, None
            if server is not None:
                server.shutdown()
                server.server_close()  # the listening socket: new connections are refused, not left waiting


def _forget(server: _Server) -> None:
    """moto's state is this process's: drop the user and the bucket, so that a next store starts empty."""
    if not server.running:
        server.start()
    urlopen(Request(f"http://127.0.0.1:{server.port}/moto-api/reset", method="POST"), timeout=30).close()


@contextmanager
def object_store(port: int) -> Iterator[ObjectStore]:
    """The store on 127.0.0.1:port with the bucket BUCKET and one IAM user allowed everything on it,
    whose key pair is the store's."""
    server = _Server(port)
    server.start()
    with ExitStack() as stack:
        stack.callback(server.stop)
        stack.callback(_forget, server)
        import boto3

        setup = {"endpoint_url": f"http://127.0.0.1:{port}", "region_name": "us-east-1"}
        setup |= {"aws_access_key_id": "setup", "aws_secret_access_key": "setup"}
        iam = boto3.client("iam", **setup)
        iam.create_user(UserName="team")
        key = iam.create_access_key(UserName="team")["AccessKey"]
        policy = {"Version": "2012-10-17", "Statement": [{"Effect": "Allow", "Action": "s3:*", "Resource": "*"}]}
        iam.put_user_policy(UserName="team", PolicyName="bucket", PolicyDocument=json.dumps(policy))
        boto3.client("s3", **setup).create_bucket(Bucket=BUCKET)
        yield ObjectStore(setup["endpoint_url"], key["AccessKeyId"], key["SecretAccessKey"], server)
