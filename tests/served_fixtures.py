"""Real local servers for the served-model tests: a subprocess on a free loopback port, waited for and always
stopped; and a small HTTP proxy that answers chosen failures before forwarding to a real server."""

from __future__ import annotations

import contextlib
import os
import signal
import socket
import subprocess
import sys
import tempfile
import threading
import time
import urllib.error
import urllib.request
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from typing import Iterator


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@contextlib.contextmanager
def running_server(cmd: list[str], ready_url: str, timeout: float = 300.0) -> Iterator[Path]:
    """Start ``cmd`` (its own process group), wait until ``ready_url`` answers 200, yield its log file; the
    process group is terminated (then killed) on exit, whatever happened."""
    log = Path(tempfile.mkstemp(prefix="clinmega-served-", suffix=".log")[1])
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "TRANSFORMERS_OFFLINE": "1", "OMP_NUM_THREADS": "1"}
    with open(log, "wb") as out:
        proc = subprocess.Popen(cmd, stdout=out, stderr=subprocess.STDOUT, env=env, start_new_session=True)
    try:
        deadline = time.monotonic() + timeout
        while True:
            if proc.poll() is not None:
                raise RuntimeError(f"{cmd[:3]} exited with {proc.returncode} before it was ready:\n{log.read_text()[-3000:]}")
            try:
                with urllib.request.urlopen(ready_url, timeout=5) as answer:
                    if answer.status == 200:
                        break
            except OSError:
                pass
            if time.monotonic() > deadline:
                raise RuntimeError(f"{cmd[:3]} not ready at {ready_url} after {timeout:.0f} s:\n{log.read_text()[-3000:]}")
            time.sleep(0.5)
        yield log
    finally:
        with contextlib.suppress(ProcessLookupError):
            os.killpg(proc.pid, signal.SIGTERM)
        try:
            proc.wait(timeout=15)
        except subprocess.TimeoutExpired:
            os.killpg(proc.pid, signal.SIGKILL)
            proc.wait()
        log.unlink(missing_ok=True)


def transformers_serve_cmd(model_dir: Path, port: int) -> list[str]:
    exe = Path(sys.executable).with_name("transformers")
    return [str(exe), "serve", str(model_dir), "--host", "127.0.0.1", "--port", str(port), "--device", "cpu",
            "--dtype", "float32", "--log-level", "warning"]


class FlakyProxy:
    """A real HTTP server on a loopback port: the first ``fail`` POSTs are answered with ``status`` (after
    ``delay`` seconds), the rest forwarded to ``upstream``. Counts attempts and the most requests in flight."""

    def __init__(self, upstream: str, fail: int = 0, status: int = 503, delay: float = 0.0):
        self.upstream, self.fail, self.status, self.delay = upstream.rstrip("/"), fail, status, delay
        self.attempts, self.in_flight, self.max_in_flight = 0, 0, 0
        self.lock = threading.Lock()
        proxy = self

        class Handler(BaseHTTPRequestHandler):
            def log_message(self, *args):  # quiet
                pass

            def do_POST(self):
                body = self.rfile.read(int(self.headers.get("content-length", 0)))
                with proxy.lock:
                    proxy.attempts += 1
                    failing = proxy.attempts <= proxy.fail
                    proxy.in_flight += 1
                    proxy.max_in_flight = max(proxy.max_in_flight, proxy.in_flight)
                try:
                    if proxy.delay:
                        time.sleep(proxy.delay)
                    if failing:
                        payload, status = b'{"error": "injected"}', proxy.status
                    else:
                        request = urllib.request.Request(proxy.upstream + self.path, data=body, method="POST",
                                                         headers={"content-type": "application/json"})
                        try:
                            with urllib.request.urlopen(request, timeout=120) as answer:
                                payload, status = answer.read(), answer.status
                        except urllib.error.HTTPError as err:
                            payload, status = err.read(), err.code
                    self.send_response(status)
                    self.send_header("content-type", "application/json")
                    self.send_header("content-length", str(len(payload)))
                    self.end_headers()
                    self.wfile.write(payload)
                except (BrokenPipeError, ConnectionResetError):  # the client gave up (timeout test)
                    pass
                finally:
                    with proxy.lock:
                        proxy.in_flight -= 1

        self.server = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self.server.daemon_threads = True
        self.url = f"http://127.0.0.1:{self.server.server_address[1]}"
        self.thread = threading.Thread(target=self.server.serve_forever, daemon=True)

    def __enter__(self) -> "FlakyProxy":
        self.thread.start()
        return self

    def __exit__(self, *exc) -> None:
        self.server.shutdown()
        self.server.server_close()
