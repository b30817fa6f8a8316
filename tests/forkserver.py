"""`batchtts` processes started warm: one process (the fork server) imports the package and the
libraries its commands load, then forks a child for each command, which runs the console script as
a new process would, with the command's arguments, environment, working folder and standard streams
(passed over a Unix socket). Each child is a process of its own, signalled by its own pid and reaped
by the server, which passes its exit status on (minus the signal that killed it). What a command no
longer pays is the interpreter's start and the imports, most of a second.

The tests start commands with `ForkServer.spawn` (a `Forked`, which does what the tests ask of a
subprocess.Popen); a shell, such as the documentation's examples, finds `command()` as the
`batchtts` in the server's `bindir`.

    python forkserver.py SOCKET SCRIPT   the server, listening at SOCKET at once (commands wait there
                                         until it has made its imports); SCRIPT is the console script
                                         each child runs

A child shows the server's command line (`ps`), as it was forked, not started afresh.

The shell's `batchtts` starts for every command, so this module imports no more at its top than
`command()` needs; what only the tests or the server use is imported where it is used.
"""

from __future__ import annotations

import marshal
import os
import signal
import socket
import struct
import sys
import tempfile
from typing import IO, TYPE_CHECKING

if TYPE_CHECKING:
    import selectors
    import subprocess
    import threading
    from collections.abc import Callable, Sequence

ADDRESS = "BATCHTTS_FORKSERVER"  # the variable that gives the server's socket (to the shell's `batchtts` too)
_INT = struct.Struct("!i")
_FORWARDED = (signal.SIGINT, signal.SIGTERM, signal.SIGHUP)
# Loaded on first use by commands (mastering, logs, `serve`): loaded once here too.
_LAZY = ("scipy.signal", "pyloudnorm", "structlog", "uvloop", "uvicorn.loops.uvloop", "uvicorn.lifespan.on",
         "uvicorn.protocols.http.httptools_impl")


def command() -> None:
    """The shell's `batchtts`: hand the command to the server, pass on the signals a shell would send
    it, and end as the child ended."""
    with socket.socket(socket.AF_UNIX, socket.SOCK_SEQPACKET) as conn:
        conn.connect(os.environ[ADDRESS])
        pid = _ask(conn, sys.argv, os.getcwd(), dict(os.environ), [0, 1, 2])
        for sig in _FORWARDED:
            signal.signal(sig, lambda signum, frame: os.kill(pid, signum))
        status = _status(conn)
    if status is None:
        sys.exit(f"batchtts: the fork server ended before the command (pid {pid}) did")
    if status < 0:  # killed by a signal: die of it too, as the shell expects of the process it ran
        if -status != signal.SIGKILL:  # whose action is fixed
            signal.signal(-status, signal.SIG_DFL)
        os.kill(os.getpid(), -status)
    sys.exit(status)


def _ask(conn: socket.socket, argv: Sequence[str], cwd: str, env: dict[str, str], fds: list[int]) -> int:
    """Send a command to the server; the pid of the child that runs it."""
    socket.send_fds(conn, [marshal.dumps((list(argv), cwd, env))], fds)
    reply = conn.recv(_INT.size)
    if not reply:
        raise RuntimeError(f"the fork server stopped: see {os.path.dirname(conn.getpeername())}/errors")
    return int(_INT.unpack(reply)[0])


def _status(conn: socket.socket) -> int | None:
    """The child's exit status (minus its signal) once it is reaped; None if the server went first."""
    reply = conn.recv(_INT.size)
    return int(_INT.unpack(reply)[0]) if reply else None


class ForkServer:
    """A fork server, reached at `address` (a socket in its folder, beside `bindir`, which holds the
    shell's `batchtts`): one this process `start`ed, or another's, which it shares."""

    def __init__(self, address: str, process: subprocess.Popen[str] | None = None) -> None:
        from pathlib import Path

        self.address, self.process = address, process
        self.folder = Path(address).parent
        self.bindir = self.folder / "bin"

    @classmethod
    def start(cls, env: dict[str, str], preexec_fn: Callable[[], None]) -> ForkServer:
        """Start a fork server with the environment `env`; it dies with the process that started it
        (`preexec_fn`), and its children with it."""
        import select
        import subprocess
        from pathlib import Path

        folder = Path(tempfile.mkdtemp(prefix="batchtts-forkserver-"))
        script = Path(sys.executable).parent / "batchtts"  # the console script of the environment under test
        with open(folder / "errors", "w") as errors:
            server = cls(str(folder / "socket"), subprocess.Popen(
                [sys.executable, __file__, str(folder / "socket"), str(script)], env=env, stdin=subprocess.DEVNULL,
                stdout=subprocess.PIPE, stderr=errors, text=True, preexec_fn=preexec_fn,
            ))
        process = server.process
        assert process is not None and process.stdout is not None
        ready, _, _ = select.select([process.stdout], [], [], 60)
        if not ready or process.stdout.readline() != "listening\n":
            process.kill()
            problem = (folder / "errors").read_text()
            server.stop()
            raise RuntimeError(f"the fork server did not start: {problem}")
        server.bindir.mkdir()
        shim = server.bindir / "batchtts"
        shim.write_text(f"#!{sys.executable} -IS\nimport sys\nsys.path.insert(0, {str(Path(__file__).parent)!r})\n"
                        "import forkserver\nforkserver.command()\n")
        shim.chmod(0o755)
        return server

    def spawn(self, argv: Sequence[str], env: dict[str, str], cwd: str | None = None) -> Forked:
        """Start `batchtts ARGV...` with the environment `env`, in the folder `cwd` (this process's by
        default), its stdin this process's, its output in pipes."""
        out_read, out_write = os.pipe()
        err_read, err_write = os.pipe()
        conn = socket.socket(socket.AF_UNIX, socket.SOCK_SEQPACKET)
        try:
            conn.connect(self.address)
            pid = _ask(conn, ["batchtts", *argv], cwd or os.getcwd(), env, [0, out_write, err_write])
        except BaseException:
            for fd in (out_read, err_read):
                os.close(fd)
            conn.close()
            raise
        finally:
            os.close(out_write)
            os.close(err_write)
        return Forked(list(argv), pid, conn, open(out_read), open(err_read))

    def stop(self) -> None:
        """Stop a server this process started."""
        import shutil

        assert self.process is not None and self.process.stdout is not None
        self.process.kill()
        self.process.wait(10)
        self.process.stdout.close()
        shutil.rmtree(self.folder, ignore_errors=True)


class Forked:
    """A command the server forked, as much of a subprocess.Popen as the tests use: signals go to its
    own pid, its output comes through pipes (text, as `text=True` reads it), and its return code
    is known once the server has reaped it, so a process waited for is gone."""

    def __init__(self, args: list[str], pid: int, conn: socket.socket, stdout: IO[str], stderr: IO[str]) -> None:
        self.args, self.pid, self.stdout, self.stderr = args, pid, stdout, stderr
        self.returncode: int | None = None
        self._conn = conn
        self._readers: list[threading.Thread] = []  # communicate()'s, which read the pipes to their end
        self._read: dict[int, str] = {}

    def poll(self) -> int | None:
        if self.returncode is None:
            self._conn.setblocking(False)
            try:
                self._ended(_status(self._conn))
            except BlockingIOError:
                pass
        return self.returncode

    def wait(self, timeout: float | None = None) -> int:
        import subprocess

        if self.returncode is None:
            self._conn.settimeout(timeout)
            try:
                self._ended(_status(self._conn))
            except TimeoutError:
                raise subprocess.TimeoutExpired(self.args, timeout) from None
        assert self.returncode is not None
        return self.returncode

    def _ended(self, status: int | None) -> None:
        if status is None:
            raise RuntimeError(f"the fork server ended before batchtts {self.args} (pid {self.pid}) did")
        self.returncode = status
        self._conn.close()

    def send_signal(self, sig: int) -> None:
        if self.poll() is None:  # not to a pid that may have been given to another process since
            os.kill(self.pid, sig)

    def kill(self) -> None:
        self.send_signal(signal.SIGKILL)

    def terminate(self) -> None:
        self.send_signal(signal.SIGTERM)

    def communicate(self, timeout: float | None = None) -> tuple[str, str]:
        """Read the output to its end and wait for the exit, as Popen.communicate does; after a
        timeout, a second call goes on reading where the first left off."""
        import subprocess
        import threading
        import time

        deadline = None if timeout is None else time.monotonic() + timeout
        if not self._readers:
            self._readers = [threading.Thread(target=lambda i=i, s=s: self._read.__setitem__(i, s.read()), daemon=True)
                             for i, s in enumerate((self.stdout, self.stderr))]
            for reader in self._readers:
                reader.start()
        for reader in self._readers:
            reader.join(None if deadline is None else max(0.0, deadline - time.monotonic()))
            if reader.is_alive():
                raise subprocess.TimeoutExpired(self.args, timeout)
        self.wait(None if deadline is None else max(0.0, deadline - time.monotonic()))
        self.stdout.close()
        self.stderr.close()
        return self._read[0], self._read[1]


def _listen(address: str) -> socket.socket:
    """Listen at `address`, and say so: commands that connect from now on wait in the backlog until
    the server has made its imports and accepts them."""
    listener = socket.socket(socket.AF_UNIX, socket.SOCK_SEQPACKET)
    listener.bind(address)
    listener.listen(64)
    print("listening", flush=True)
    return listener


def _serve(listener: socket.socket) -> tuple[list[str], str, dict[str, str], list[int]]:
    """Answer commands until the server is killed: fork a child for each, tell the command its pid,
    and its exit status once it is reaped (a command that goes away takes its child with it).
    Returns only in a child: the command's argv, folder, environment and standard streams."""
    import selectors

    wake_read, wake_write = os.pipe()
    os.set_blocking(wake_write, False)
    signal.set_wakeup_fd(wake_write)
    signal.signal(signal.SIGCHLD, lambda signum, frame: None)  # a handler, so the wakeup fd hears of it
    selector = selectors.DefaultSelector()
    selector.register(listener, selectors.EVENT_READ)
    selector.register(wake_read, selectors.EVENT_READ)
    children: dict[int, socket.socket] = {}
    while True:
        for key, _ in selector.select():
            if key.fileobj is listener:
                conn, _ = listener.accept()
                message, fds, _, _ = socket.recv_fds(conn, 1 << 20, 3)
                if not message:  # a command that went away before it asked
                    conn.close()
                    continue
                pid = os.fork()
                if pid == 0:
                    selector.close()
                    for open_socket in (listener, conn, *children.values()):
                        open_socket.close()
                    os.close(wake_read)
                    os.close(wake_write)
                    signal.set_wakeup_fd(-1)
                    signal.signal(signal.SIGCHLD, signal.SIG_DFL)
                    argv, cwd, env = marshal.loads(message)
                    return argv, cwd, env, fds
                for fd in fds:
                    os.close(fd)
                conn.send(_INT.pack(pid))
                children[pid] = conn
                selector.register(conn, selectors.EVENT_READ, pid)
            elif key.fileobj == wake_read:
                os.read(wake_read, 4096)
                _reap(children, selector)
            else:  # the command went away (EOF) before its child ended
                selector.unregister(key.fileobj)
                os.kill(key.data, signal.SIGKILL)


def _reap(children: dict[int, socket.socket], selector: selectors.BaseSelector) -> None:
    """Send each ended child's exit status (minus the signal that killed it) to its command."""
    while True:
        try:
            pid, status = os.waitpid(-1, os.WNOHANG)
        except ChildProcessError:
            return
        if pid == 0:
            return
        conn = children.pop(pid)
        try:
            selector.unregister(conn)
            conn.send(_INT.pack(os.waitstatus_to_exitcode(status)))
        except (KeyError, OSError):
            pass  # the command is gone, and nobody waits for the status
        conn.close()


def _preload() -> None:
    """Import every module of the package and what its commands load lazily, before any fork."""
    import gc
    import importlib
    import pkgutil

    import batchtts

    for module in pkgutil.walk_packages(batchtts.__path__, "batchtts."):
        if module.name != "batchtts.__main__":  # which would run the CLI
            importlib.import_module(module.name)
    for name in _LAZY:
        importlib.import_module(name)
    # Out of the collector's sight: a child's collections and its exit would otherwise go over every
    # object imported here, and copy each page they touch.
    gc.freeze()


def _become(argv: list[str], cwd: str, env: dict[str, str], fds: list[int], script: str) -> None:
    """Make this child the command's process: its standard streams, folder, environment and argv,
    and a death of its own when the server dies (Linux)."""
    import ctypes

    if sys.platform == "linux":
        ctypes.CDLL(None).prctl(1, signal.SIGKILL)  # PR_SET_PDEATHSIG
    for target, fd in enumerate(fds):
        os.dup2(fd, target)
        os.close(fd)
    for target, stream in enumerate((sys.stdout, sys.stderr), start=1):
        stream.reconfigure(line_buffering=target == 2 or os.isatty(target))  # as Python sets them up
    os.chdir(cwd)
    os.environ.clear()
    os.environ.update(env)
    tempfile.tempdir = None  # found again from this environment's TMPDIR, as a new interpreter would
    sys.argv[:] = [script, *argv[1:]]  # a script's argv[0] is its path, as the kernel ran it
    sys.path[0] = os.path.dirname(script)  # and its folder leads the path, not this one's


if __name__ == "__main__":
    import runpy

    listening = _listen(sys.argv[1])
    _preload()
    _become(*_serve(listening), script=sys.argv[2])
    runpy.run_path(sys.argv[0], run_name="__main__")  # the console script: `sys.exit(main())`
