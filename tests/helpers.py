"""Small builders shared by the tests."""

from __future__ import annotations

import json
import threading
from collections.abc import Callable
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path


def write_png(path: Path, size: tuple[int, int] = (64, 64), color: tuple[int, int, int] = (200, 10, 10),
              text: str = "") -> Path:
    from PIL import Image, ImageDraw

    image = Image.new("RGB", size, color)
    if text:
        ImageDraw.Draw(image).text((4, 4), text, fill=(255, 255, 255))
    path.parent.mkdir(parents=True, exist_ok=True)
    image.save(path, format="PNG")
    return path


class HTTPPeer:
    """A real HTTP server on loopback whose answers come from ``handler(path, body) ->
    (status, json_body)``; it records every request it received."""

    def __init__(self, handler: Callable[[str, dict], tuple[int, dict]]) -> None:
        self.requests: list[tuple[str, dict]] = []
        peer = self

        class Handler(BaseHTTPRequestHandler):
            def do_POST(self) -> None:  # noqa: N802 - http.server API
                length = int(self.headers.get("Content-Length", 0))
                raw = self.rfile.read(length)
                try:
                    body = json.loads(raw or b"{}")
                except ValueError:
                    body = {"_raw": raw.decode("latin-1")}
                peer.requests.append((self.path, body))
                status, payload = handler(self.path, body)
                data = json.dumps(payload).encode()
                self.send_response(status)
                self.send_header("Content-Type", "application/json")
                self.send_header("Content-Length", str(len(data)))
                self.end_headers()
                self.wfile.write(data)

            def log_message(self, *args: object) -> None:
                pass

        self._server = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self._server.daemon_threads = True
        self.base_url = f"http://127.0.0.1:{self._server.server_address[1]}/v1"
        self._thread = threading.Thread(target=self._server.serve_forever, daemon=True)
        self._thread.start()

    def close(self) -> None:
        self._server.shutdown()
        self._server.server_close()


def load_bench(name: str):
    """A ``bench/<name>.py`` script imported as a module (benchmarks are scripts, not a package)."""
    import importlib.util
    import sys

    spec = importlib.util.spec_from_file_location(name, Path(__file__).resolve().parents[1] / "bench" / f"{name}.py")
    module = importlib.util.module_from_spec(spec)
    sys.modules[name] = module  # its dataclasses look their module up
    spec.loader.exec_module(module)
    return module


def policy_requests(images, ns=(2, 3, 1)):
    """Three rollout requests of different prompt lengths (a root and two continuations) for the
    policy tests, ``ns[i]`` samples each."""
    from mmprm_tasks.policy import GenerationRequest

    questions = ["What is the sum of the numbers?", "What is the product?", "What is it?"]
    prefixes = [(), ("The numbers are 5, 1 and 2.",), ("Read 9.", "9 is odd.")]
    return [GenerationRequest(q, img, p, n) for q, img, p, n in zip(questions, images, prefixes, ns)]


def chat_prompts(requests):
    """The transformers chat prompts of rollout requests (the platform preset)."""
    from mmprm_tasks.policy import chat_messages
    from mmprm_tasks.policy.hf import ChatPrompt

    return [ChatPrompt(chat_messages(r.prompt), [r.image]) for r in requests]


class PolicyServerProcess:
    """``python -m mmprm_tasks.policy.server --model DIR`` in a subprocess on a free loopback port,
    as a user starts it; a context manager that waits for ``/health`` and stops it with SIGTERM
    (``output`` and ``returncode`` are set after).  PYTHONPATH is inherited, so the server runs
    this checkout's code."""

    def __init__(self, model_dir: Path, *args: str, start_timeout_s: float = 120) -> None:
        import socket
        import sys

        with socket.socket() as s:
            s.bind(("127.0.0.1", 0))
            self.port = s.getsockname()[1]
        self.command = [sys.executable, "-m", "mmprm_tasks.policy.server", "--model", str(model_dir),
                        "--port", str(self.port), *args]
        self.base_url = f"http://127.0.0.1:{self.port}"
        self.start_timeout_s = start_timeout_s
        self.output = ""
        self.returncode: int | None = None

    def __enter__(self) -> "PolicyServerProcess":
        import os
        import subprocess
        import time

        import httpx

        self.proc = subprocess.Popen(self.command, stdout=subprocess.PIPE, stderr=subprocess.STDOUT,
                                     env={**os.environ, "OMP_NUM_THREADS": "1"})
        deadline = time.monotonic() + self.start_timeout_s
        while True:
            if self.proc.poll() is not None:
                raise AssertionError(f"policy server exited: {self.proc.stdout.read().decode()}")
            try:
                if httpx.get(self.base_url + "/health", timeout=1).status_code == 200:
                    return self
            except httpx.TransportError:
                pass
            if time.monotonic() > deadline:
                self.__exit__(None, None, None)
                raise AssertionError(f"policy server did not come up: {self.output}")
            time.sleep(0.2)

    def __exit__(self, *exc: object) -> None:
        import signal
        import subprocess

        self.proc.send_signal(signal.SIGTERM)
        try:
            self.proc.wait(timeout=30)
        except subprocess.TimeoutExpired:
            self.proc.kill()
            self.proc.wait()
        self.output = self.proc.stdout.read().decode()
        self.returncode = self.proc.returncode


def cli_env(settings, **extra: str) -> dict[str, str]:
    """The environment a separate ``mmprm`` process needs to use ``settings``' Postgres and store."""
    import os

    env = {"PATH": os.environ.get("PATH", "/usr/bin:/bin"), "PYTHONPATH": os.environ.get("PYTHONPATH", ""),
           "OMP_NUM_THREADS": "1", "MMPRM_DATABASE_URL": settings.database_url, "MMPRM_HOME": str(settings.home)}
    store = settings.store
    if store.kind == "s3":
        env |= {"MMPRM_STORE__KIND": "s3", "MMPRM_STORE__ENDPOINT": store.endpoint,
                "MMPRM_STORE__BUCKET": store.bucket, "MMPRM_STORE__ACCESS_KEY": store.access_key or "",
                "MMPRM_STORE__SECRET_KEY": store.secret_key.get_secret_value() if store.secret_key else ""}
    else:
        env["MMPRM_STORE__ROOT"] = str(settings.store_root)
    return env | extra


def run_mmprm(settings, *args: str, timeout: float = 180, rss_limit_mb: float | None = None, **env: str):
    """``mmprm ARGS`` as its own process (as a user runs it); asserts it printed no traceback.
    The result's ``peak_rss_mb`` is the process's peak resident memory (the kernel's VmHWM, read
    while it runs); over ``rss_limit_mb`` it is killed (so a regression cannot take the box down)."""
    import subprocess
    import sys
    import tempfile
    import time
    from pathlib import Path

    with tempfile.TemporaryFile("w+") as out, tempfile.TemporaryFile("w+") as err:
        process = subprocess.Popen([sys.executable, "-m", "mmprm_tasks", *args], stdout=out, stderr=err, text=True,
                                   env=cli_env(settings, **env))
        peak_kb, deadline = 0, time.monotonic() + timeout
        while process.poll() is None:
            try:
                status = Path(f"/proc/{process.pid}/status").read_text()
                peak_kb = max(peak_kb, int(status.split("VmHWM:")[1].split()[0]))
            except (OSError, IndexError, ValueError):
                pass  # exiting
            if (rss_limit_mb and peak_kb > rss_limit_mb * 1024) or time.monotonic() > deadline:
                process.kill()
            time.sleep(0.02)
        out.seek(0)
        err.seek(0)
        done = subprocess.CompletedProcess(process.args, process.returncode, out.read(), err.read())
    done.peak_rss_mb = peak_kb / 1024
    assert "Traceback" not in done.stdout + done.stderr, done.stdout + done.stderr
    return done
