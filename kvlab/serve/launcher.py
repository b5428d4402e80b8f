"""ServerProcess: `kvlab serve` in a child process on 127.0.0.1, for tests, notebooks and benchmarks.

    with ServerProcess(["--model", "tiny-llama-random"]) as server:
        httpx.get(server.url + "/health")
    # stopped: SIGTERM, graceful shutdown, exit status 0 (killed only if it hangs)

The child listens on a port the OS picked (--port 0) and prints it on its first line; its
output goes to a log file (`server.log()`), so nothing blocks on a full pipe. The child also
watches this process: if the parent dies without stopping it, it shuts itself down.
"""

from __future__ import annotations

import atexit
import os
import re
import signal
import subprocess
import sys
import tempfile
import time
import urllib.error
import urllib.request
from pathlib import Path

from kvlab.serve.cli import PARENT_PID_ENV

URL_LINE = re.compile(r"kvlab serve: (http://127\.0\.0\.1:(\d+))")


class ServerProcess:
    def __init__(self, args: list[str] = (), *, startup_timeout: float = 180.0, env: dict | None = None):
        self.args = [str(a) for a in args]
        self.startup_timeout = startup_timeout
        self.env = env
        self.url: str | None = None
        self.port: int | None = None
        self.process: subprocess.Popen | None = None
        self.returncode: int | None = None
        self._log_path: Path | None = None

    def start(self) -> "ServerProcess":
        """Launch the server and wait until /health answers 200."""
        return self.launch().wait_ready()

    def launch(self) -> "ServerProcess":
        """Start the child process and return at once (the model loads meanwhile); then wait_ready()."""
        fd, path = tempfile.mkstemp(prefix="kvlab-serve-", suffix=".log")
        self._log_path = Path(path)
        env = {**os.environ, **(self.env or {}), PARENT_PID_ENV: str(os.getpid()), "PYTHONUNBUFFERED": "1"}
        with os.fdopen(fd, "wb") as log:
            self.process = subprocess.Popen(
                [sys.executable, "-m", "kvlab.serve", "--host", "127.0.0.1", "--port", "0", *self.args],
                stdin=subprocess.DEVNULL, stdout=log, stderr=subprocess.STDOUT, env=env)
        atexit.register(self.stop)
        return self

    def wait_ready(self) -> "ServerProcess":
        try:
            self._wait_until_healthy()
        except BaseException:
            self.stop()
            raise
        return self

    def _wait_until_healthy(self) -> None:
        deadline = time.monotonic() + self.startup_timeout
        while time.monotonic() < deadline:
            if self.process.poll() is not None:
                raise RuntimeError(f"kvlab serve exited with status {self.process.returncode} before it was "
                                   f"ready:\n{self.log()[-3000:]}")
            if self.url is None:
                m = URL_LINE.search(self.log())
                if m:
                    self.url, self.port = m.group(1), int(m.group(2))
            elif self.is_healthy(timeout=1.0):
                return
            time.sleep(0.1)
        raise TimeoutError(f"kvlab serve was not healthy after {self.startup_timeout:.0f} s:\n{self.log()[-3000:]}")

    def is_healthy(self, timeout: float = 2.0) -> bool:
        try:
            with urllib.request.urlopen(self.url + "/health", timeout=timeout) as r:
                return r.status == 200
        except (urllib.error.URLError, OSError):
            return False

    def log(self) -> str:
        """Everything the server printed so far."""
        if self._log_path is None or not self._log_path.exists():
            return ""
        return self._log_path.read_text(errors="replace")

    def stop(self, timeout: float = 60.0) -> int | None:
        """SIGTERM, then wait for the graceful shutdown (kill after `timeout` s). Returns the exit status."""
        if self.process is None:
            return self.returncode
        atexit.unregister(self.stop)
        if self.process.poll() is None:
            self.process.send_signal(signal.SIGTERM)
            try:
                self.process.wait(timeout)
            except subprocess.TimeoutExpired:
                self.process.kill()
                self.process.wait()
        self.returncode = self.process.returncode
        self.process = None
        return self.returncode

    def close(self) -> None:
        """Stop the server if it runs, and delete its log file."""
        self.stop()
        if self._log_path is not None:
            self._log_path.unlink(missing_ok=True)

    def __enter__(self) -> "ServerProcess":
        return self.start() if self.process is None else self

    def __exit__(self, *exc) -> None:
        self.close()
