"""`batchtts` started warm, for the documentation's examples: one process imports the package and the
libraries its commands load, then forks a child for each `batchtts` command an example runs, which
runs the console script as a new process would, with the command's arguments, environment, working
folder and standard streams (passed over a Unix socket). The command exits with the child's status,
or dies of its signal. Each command is still a process of its own that the shell waits for; what it
no longer pays is the interpreter's start and the imports, most of a second a command.

    python forkserver.py SOCKET SCRIPT   the server: SCRIPT is the console script each child runs
    command()                            the client, which `serving()` makes the `batchtts` on a PATH

The client starts for every command, so this module imports no more at its top than the client
needs; the server's functions import the rest.
"""

from __future__ import annotations

import marshal
import os
import signal
import socket
import struct
import sys
from typing import TYPE_CHECKING

if TYPE_CHECKING:
    import selectors
    from collections.abc import Callable, Iterator
    from pathlib import Path

ADDRESS = "BATCHTTS_FORKSERVER"  # the variable that gives the command the server's socket
_INT = struct.Struct("!i")
_FORWARDED = (signal.SIGINT, signal.SIGTERM, signal.SIGHUP)
# Loaded on first use by the commands the examples run (mastering, qc, logs): loaded once here too.
_LAZY = ("scipy.signal", "pyloudnorm", "structlog")


def command() -> None:
    """The `batchtts` an example runs: hand the command to the server, pass on the signals a shell
    would send it, and end as the child ended."""
    with socket.socket(socket.AF_UNIX, socket.SOCK_SEQPACKET) as conn:
        conn.connect(os.environ[ADDRESS])
        socket.send_fds(conn, [marshal.dumps((sys.argv, os.getcwd(), dict(os.environ)))], [0, 1, 2])
        (pid,) = _INT.unpack(conn.recv(_INT.size))
        for sig in _FORWARDED:
            signal.signal(sig, lambda signum, frame: os.kill(pid, signum))
        reply = conn.recv(_INT.size)
    if not reply:
        sys.exit(f"batchtts: the fork server ended before the command (pid {pid}) did")
    (status,) = _INT.unpack(reply)
    if status < 0:  # killed by a signal: die of it too, as the shell expects of the process it ran
        if -status != signal.SIGKILL:  # whose action is fixed
            signal.signal(-status, signal.SIG_DFL)
        os.kill(os.getpid(), -status)
    sys.exit(status)


def serving(folder: Path, env: dict[str, str], preexec_fn: Callable[[], None]) -> Iterator[tuple[Path, str]]:
    """Start a server (its socket in `folder`, its environment `env`) and write the command as
    `folder/bin/batchtts`; yields that bin folder and the socket, for the PATH and ADDRESS, and stops
    the server when resumed."""
    import select
    import subprocess
    from pathlib import Path

    address, bindir = str(folder / "socket"), folder / "bin"
    script = Path(sys.executable).parent / "batchtts"  # the console script of the environment under test
    server = subprocess.Popen([sys.executable, __file__, address, str(script)], env=env, stdin=subprocess.DEVNULL,
                              stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, preexec_fn=preexec_fn)
    try:
        ready, _, _ = select.select([server.stdout], [], [], 60)
        if not ready or server.stdout.readline() != "ready\n":
            server.kill()
            raise RuntimeError(f"the fork server did not start: {server.stderr.read()}")
        bindir.mkdir()
        shim = bindir / "batchtts"
        shim.write_text(f"#!{sys.executable} -IS\nimport sys\nsys.path.insert(0, {str(Path(__file__).parent)!r})\n"
                        "import forkserver\nforkserver.command()\n")
        shim.chmod(0o755)
        yield bindir, address
    finally:
        server.kill()
        server.wait(10)
        server.stdout.close()
        server.stderr.close()


def _serve(address: str) -> tuple[list[str], str, dict[str, str], list[int]]:
    """Answer commands until the server is killed: fork a child for each, tell the command its pid,
    and its exit status once it is reaped (a command that goes away takes its child with it).
    Returns only in a child: the command's argv, folder, environment and standard streams."""
    import selectors

    listener = socket.socket(socket.AF_UNIX, socket.SOCK_SEQPACKET)
    listener.bind(address)
    listener.listen(64)
    wake_read, wake_write = os.pipe()
    os.set_blocking(wake_write, False)
    signal.set_wakeup_fd(wake_write)
    signal.signal(signal.SIGCHLD, lambda signum, frame: None)  # a handler, so the wakeup fd hears of it
    selector = selectors.DefaultSelector()
    selector.register(listener, selectors.EVENT_READ)
    selector.register(wake_read, selectors.EVENT_READ)
    children: dict[int, socket.socket] = {}
    print("ready", flush=True)
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
    """Make this child the command's process: its standard streams, folder, environment and argv."""
    for target, fd in enumerate(fds):
        os.dup2(fd, target)
        os.close(fd)
    for target, stream in enumerate((sys.stdout, sys.stderr), start=1):
        stream.reconfigure(line_buffering=target == 2 or os.isatty(target))  # as Python sets them up
    os.chdir(cwd)
    os.environ.clear()
    os.environ.update(env)
    sys.argv[:] = [script, *argv[1:]]  # a script's argv[0] is its path, as the kernel ran it
    sys.path[0] = os.path.dirname(script)  # and its folder leads the path, not this one's


if __name__ == "__main__":
    import runpy

    _preload()
    _become(*_serve(sys.argv[1]), script=sys.argv[2])
    runpy.run_path(sys.argv[0], run_name="__main__")  # the console script: `sys.exit(main())`
