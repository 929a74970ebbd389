"""A local S3-protocol server for tests, benchmarks and the kill soak: moto's server on 127.0.0.1, in its own process.

    python -m tools.s3_server [--port 0]          # prints one line `ready http://127.0.0.1:PORT`, serves until killed

    with S3Server() as server:                     # from Python: a subprocess, its URL and credentials
        env = server.env()                         # AWS_ENDPOINT_URL, AWS_ACCESS_KEY_ID, ... as a user's cluster sets
        server.make_bucket("data")
        server.counts(reset=True)                  # {"requests": n, "bytes_out": b, "by_method": {...}}

It is moto's own server (`moto.server`'s WSGI app, werkzeug's threaded HTTP server), reached over HTTP exactly as
an S3 endpoint is: kt talks to it through s3fs with nothing kt-specific. Two small additions, for what moto does
not offer over HTTP:
- a count of requests and response bytes (`GET /_kt/counts`), so a benchmark can price a student step in requests
  and bytes across every process and DataLoader worker that reads (no client-side hook sees forked workers);
- `POST /_kt/enforce-auth`, which turns on moto's IAM enforcement (its INITIAL_NO_AUTH_ACTION_COUNT set to 0) after
  a test has made its users and policies without credentials: from then on an unknown key, a wrong secret or a
  user without a policy for the bucket is refused as S3 refuses them (InvalidAccessKeyId, SignatureDoesNotMatch,
  AccessDenied).
A process of its own, not moto's ThreadedMotoServer inside the test process: the server then never competes for
the test's GIL, a test can SIGKILL clients freely, and its settings (auth) are its own.
"""

from __future__ import annotations

import argparse
import contextlib
import json
import os
import subprocess
import sys
import threading
from pathlib import Path

CREDENTIALS = {"AWS_ACCESS_KEY_ID": "kt-test", "AWS_SECRET_ACCESS_KEY": "kt-test-secret",
               "AWS_DEFAULT_REGION": "us-east-1"}


# ------------------------------------------------------------------------------------------- the server
class _Counting:
    """WSGI middleware: counts requests and response body bytes, answers /_kt/* itself."""

    def __init__(self, app):
        self.app, self.lock = app, threading.Lock()
        self.reset()

    def reset(self) -> None:
        self.requests, self.bytes_out, self.by_method = 0, 0, {}

    def snapshot(self) -> dict:
        return {"requests": self.requests, "bytes_out": self.bytes_out, "by_method": dict(self.by_method)}

    def __call__(self, environ, start_response):
        path = environ.get("PATH_INFO", "")
        if path.startswith("/_kt/"):
            return self._control(environ, start_response, path)
        method = environ.get("REQUEST_METHOD", "?")
        with self.lock:
            self.requests += 1
            self.by_method[method] = self.by_method.get(method, 0) + 1
        return self._counted(self.app(environ, start_response))

    def _counted(self, body):
        for chunk in body:
            with self.lock:
                self.bytes_out += len(chunk)
            yield chunk

    def _control(self, environ, start_response, path: str):
        if path == "/_kt/counts":
            with self.lock:
                body = self.snapshot()
                if "reset=1" in environ.get("QUERY_STRING", ""):
                    self.reset()
        elif path == "/_kt/enforce-auth" and environ.get("REQUEST_METHOD") == "POST":
            from moto import settings

            settings.INITIAL_NO_AUTH_ACTION_COUNT = 0
            body = {"auth": "enforced"}
        else:
            start_response("404 Not Found", [("Content-Type", "text/plain")])
            return [b"unknown /_kt/ path"]
        data = json.dumps(body).encode()
        start_response("200 OK", [("Content-Type", "application/json"), ("Content-Length", str(len(data)))])
        return [data]


def serve(port: int = 0, quiet: bool = True) -> None:
    from moto.moto_server.werkzeug_app import DomainDispatcherApplication, MotoRequestHandler, create_backend_app
    from werkzeug.serving import make_server

    if quiet:  # werkzeug logs a line per request: thousands in a soak
        import logging

        logging.getLogger("werkzeug").setLevel(logging.ERROR)
    app = _Counting(DomainDispatcherApplication(create_backend_app))
    server = make_server("127.0.0.1", port, app, threaded=True, request_handler=MotoRequestHandler)
    print(f"ready http://127.0.0.1:{server.server_address[1]}", flush=True)
    server.serve_forever()


# ------------------------------------------------------------------------------------------- the client
class S3Server:
    """`python -m tools.s3_server` as a subprocess; `url` once started (a context manager starts and stops it)."""

    def __init__(self, log: str | Path | None = None):
        self.log, self.proc, self.url = log, None, ""

    def start(self) -> "S3Server":
        root = Path(__file__).resolve().parent.parent
        env = {**os.environ, "PYTHONPATH": str(root)}
        env.pop("AWS_ENDPOINT_URL", None)
        stderr = open(self.log, "ab") if self.log else subprocess.DEVNULL
        self.proc = subprocess.Popen([sys.executable, "-m", "tools.s3_server"], stdout=subprocess.PIPE,
                                     stderr=stderr, env=env, cwd=root, text=True, start_new_session=True)
        line = self.proc.stdout.readline()  # blocks until the server listens (moto's import takes a few seconds)
        if not line.startswith("ready "):
            self.stop()
            raise RuntimeError(f"the S3 server did not start: {line!r}")
        self.url = line.split()[1]
        return self

    def stop(self) -> None:
        if self.proc is not None and self.proc.poll() is None:
            self.proc.terminate()
            try:
                self.proc.wait(10)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait()
        self.proc = None

    def __enter__(self) -> "S3Server":
        return self.start()

    def __exit__(self, *exc) -> None:
        self.stop()

    def env(self, **override: str) -> dict[str, str]:
        """The standard AWS variables a user's job sets to reach this endpoint (boto, s3fs and the AWS CLI read
        them), with test credentials; `override` replaces any of them."""
        return {"AWS_ENDPOINT_URL": self.url, **CREDENTIALS, **override}

    @contextlib.contextmanager
    def environ(self):
        """This process's environment set to reach the server (`env()`) for the block, restored after it."""
        before = {k: os.environ.get(k) for k in self.env()}
        os.environ.update(self.env())
        forget_s3_filesystems()
        try:
            yield
        finally:
            for k, v in before.items():
                if v is None:
                    os.environ.pop(k, None)
                else:
                    os.environ[k] = v
            forget_s3_filesystems()

    def client(self, **credentials):
        """A boto3 S3 client of this server (test setup: buckets, policies); `credentials` replace the defaults."""
        import boto3

        kw = {"aws_access_key_id": CREDENTIALS["AWS_ACCESS_KEY_ID"],
              "aws_secret_access_key": CREDENTIALS["AWS_SECRET_ACCESS_KEY"], **credentials}
        return boto3.client("s3", endpoint_url=self.url, region_name=CREDENTIALS["AWS_DEFAULT_REGION"], **kw)

    def iam(self):
        import boto3

        return boto3.client("iam", endpoint_url=self.url, region_name=CREDENTIALS["AWS_DEFAULT_REGION"],
                            aws_access_key_id=CREDENTIALS["AWS_ACCESS_KEY_ID"],
                            aws_secret_access_key=CREDENTIALS["AWS_SECRET_ACCESS_KEY"])

    def make_bucket(self, name: str) -> str:
        self.client().create_bucket(Bucket=name)
        return f"s3://{name}"

    def counts(self, reset: bool = False) -> dict:
        """Requests and response bytes the server has answered (since the last reset)."""
        import urllib.request

        with urllib.request.urlopen(f"{self.url}/_kt/counts{'?reset=1' if reset else ''}", timeout=10) as r:
            return json.loads(r.read())

    def enforce_auth(self) -> None:
        import urllib.request

        urllib.request.urlopen(urllib.request.Request(f"{self.url}/_kt/enforce-auth", method="POST"), timeout=10)


def forget_s3_filesystems() -> None:
    """Drop the s3fs instances fsspec caches in this process. fsspec keys its instance cache on the constructor's
    arguments, not on the endpoint and credentials read from the environment: a filesystem made for one server
    would otherwise answer for the next one started in the same process (a test session's), at a dead port."""
    import fsspec

    try:
        fsspec.get_filesystem_class("s3").clear_instance_cache()
    except ImportError:  # no s3fs: nothing cached
        pass


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(prog="python -m tools.s3_server", description=__doc__.split("\n")[0])
    parser.add_argument("--port", type=int, default=0, help="port on 127.0.0.1 (0: any free one)")
    parser.add_argument("--verbose", action="store_true", help="log every request (werkzeug)")
    args = parser.parse_args(argv)
    serve(args.port, quiet=not args.verbose)
    return 0


if __name__ == "__main__":
    sys.exit(main())
