"""Worker processes that open blobs, for restore and the full data check.

Opening a blob is AES-256-GCM (``cryptography`` holds the GIL while it decrypts), zstd,
a keyed BLAKE3 re-hash and ~25 µs of Python per chunk, so threads in one process scaled
only 1.1x on two cores. ``ProcPool`` runs such tasks in worker processes instead, each
holding its own backend handle (reopened from ``backend.reopen_spec()``) and its own
codec (``kyrorepo.blob.codec_for``). Backends without a reopen spec (in-memory ones, and
the network backends, where the network is the bound) keep ``ThreadRunner``: the same
tasks on threads of this process. ``open_runner`` chooses.

Workers are started as ``python -c`` of this module, never with a bare ``fork`` (the
parent holds an LMDB environment and threads), and talk to the parent over one socket
each: length-prefixed pickles, first the ``Setup``, then ``(function, argument)`` tasks;
every task gets one reply, ``(n, ("ok", value))`` or ``(n, error tuple)`` where ``n``
counts the tasks that worker received (exceptions are sent as text, since exception
classes with their own ``__init__`` do not always unpickle). A worker runs
``Setup.threads`` tasks at once, so one task's disk I/O (direct I/O waits for the
device, kyrorepo.directio) overlaps another's computing; replies may then overtake. A
worker stops when its socket closes: when the parent closes the pool, fails, or dies
(even by SIGKILL), so no worker outlives it by more than the task it is running. Workers
ignore SIGINT: on Ctrl-C the parent unwinds and closes the pool.

``prestart`` starts workers before their ``Setup`` is known (restore and the data check
do it before the passphrase is stretched); the next ``ProcPool`` adopts them.

A worker imports only what opening blobs needs (``kyrorepo.blob``, the local backend,
the task's module): check with ``python -X importtime``.
"""

from __future__ import annotations

import atexit
import contextlib
import importlib
import os
import pickle
import queue
import selectors
import signal
import socket
import struct
import subprocess
import sys
import threading
import traceback
from collections import deque
from concurrent.futures import Future, ThreadPoolExecutor
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any, Callable, Iterable, Iterator, Protocol, TypeVar

from kyrorepo import errors
from kyrorepo.errors import KyroError

if TYPE_CHECKING:
    from kyrorepo.blob import BlobCodec
    from kyrorepo.crypto import BlobKeys
    from kyrorepo.repository import Repository

A = TypeVar("A")
R = TypeVar("R")
Reply = tuple[Any, ...]

THREADS = 2  # tasks a worker process runs at once: one computing while another waits on the disk
# What the worker processes of a restore and of the data check import: named here, not read
# from their task functions, so that a command can start its workers (``prestart_for``)
# before it imports its own modules (tests/test_restore_processes.py pins both).
RESTORE_TASKS = "kyrorepo.restore_worker"
SCAN_TASKS = "kyrorepo.verify_pack"
STOP_TIMEOUT = 10.0  # seconds a worker may take to finish its task after the pool closes
_HEADER = struct.Struct("<Q")
# A task allocates and frees its blobs' plaintexts, a few MiB of objects under 128 KiB, over and
# over. By default glibc gives memory back whenever more than 128 KiB lies free at the top of a
# heap, and maps blocks of 128 KiB and more (chunks reach that) on their own: either way every
# reuse faults the pages in and zeroes them afresh. Workers keep up to 16 MiB free per heap and
# map only blocks of 1 MiB and more (docs/performance.md, "Restore", session 9).
WORKER_MALLOC = "glibc.malloc.mmap_threshold=1048576:glibc.malloc.trim_threshold=16777216"


@dataclass
class WorkerContext:
    """What a task runs with: a backend handle, the repository's codec and keys."""

    backend: Any
    codec: "BlobCodec"
    keys: "BlobKeys"


@dataclass(frozen=True)
class Setup:
    """Sent to every worker process first: how to open the backend, and the codec's inputs."""

    backend: Any  # a reopen spec: an object whose ``open()`` returns a backend
    keys: "BlobKeys"
    level: int
    threads: int = THREADS

    def context(self) -> WorkerContext:
        from kyrorepo.blob import codec_for

        backend = self.backend.open()
        return WorkerContext(backend, codec_for(backend, self.keys, self.level), self.keys)


class WorkerFailed(RuntimeError):
    """A task failed in a worker with an unexpected error (a bug): the worker's traceback is the cause."""


class RemoteTraceback(Exception):
    def __str__(self) -> str:
        return str(self.args[0])


class Runner(Protocol):
    """Runs ``fn(context, arg)`` tasks; replies come back in completion order."""

    slots: int  # tasks worth keeping in flight

    @property
    def pending(self) -> int: ...

    @property
    def idle(self) -> bool:
        """Whether a task submitted now starts at once (some worker thread is free): a long task
        queued behind a busy worker's tasks would wait there while another worker goes idle."""
        ...

    def submit(self, fn: Callable[[WorkerContext, Any], Any], arg: Any) -> int: ...

    def wait(self) -> tuple[int, Any]: ...

    def close(self) -> None: ...


# --- the wire ---------------------------------------------------------------------------------


def _send(sock: socket.socket, obj: object) -> None:
    data = pickle.dumps(obj, protocol=pickle.HIGHEST_PROTOCOL)
    sock.sendall(_HEADER.pack(len(data)))
    sock.sendall(data)


def _recv_exact(sock: socket.socket, n: int) -> bytearray:
    buf = bytearray(n)
    view = memoryview(buf)
    got = 0
    while got < n:
        k = sock.recv_into(view[got:])
        if k == 0:
            raise EOFError
        got += k
    return buf


def _recv(sock: socket.socket) -> Any:
    (n,) = _HEADER.unpack(_recv_exact(sock, _HEADER.size))
    return pickle.loads(_recv_exact(sock, n))


def error_reply(exc: BaseException) -> Reply:
    """A task's failure as plain data: KyroErrors by class name and message, anything else as a bug."""
    if isinstance(exc, KyroError):
        return ("err", type(exc).__name__, exc.message)
    tb = "".join(traceback.format_exception(type(exc), exc, exc.__traceback__))
    return ("bug", f"{type(exc).__name__}: {exc}", tb)


def raise_reply(reply: Reply) -> None:
    """Raise the error a worker sent back, as the KyroError subclass it was when there is one."""
    if reply[0] == "err":
        cls = getattr(errors, reply[1], KyroError)
        if not (isinstance(cls, type) and issubclass(cls, KyroError)):
            cls = KyroError
        raise cls(reply[2])
    raise WorkerFailed(f"a worker process failed: {reply[1]}") from RemoteTraceback(reply[2])


# --- worker side ----------------------------------------------------------------------------------


def _run_task(ctx: WorkerContext | None, setup_error: Reply | None, task: tuple[Callable[..., Any], Any]) -> Reply:
    if setup_error is not None:
        return setup_error
    fn, arg = task
    try:
        return ("ok", fn(ctx, arg))
    except Exception as exc:  # every failure goes back to the parent as a reply
        return error_reply(exc)


def _receive(sock: socket.socket, tasks: "queue.SimpleQueue[Any]", stop: threading.Event) -> None:
    """Read tasks as they come, so the parent's sends never wait for the task running here."""
    try:
        while True:
            tasks.put(_recv(sock))
    except (EOFError, OSError):
        stop.set()
        tasks.put(None)


def worker_main(fd: int, preload: tuple[str, ...] = ()) -> None:
    """A worker process: set up from the first message, then run tasks until the socket closes.

    The modules every task needs, and ``preload``, are imported before the first message is
    read: a worker started early (``prestart``) imports them while the parent is still busy."""
    signal.signal(signal.SIGINT, signal.SIG_IGN)
    for name in ("kyrorepo.blob", *preload):
        with contextlib.suppress(ImportError):  # a task that needs it reports the error
            importlib.import_module(name)
    sock = socket.socket(fileno=fd)
    try:
        setup: Setup = _recv(sock)
    except (EOFError, OSError):
        return
    ctx: WorkerContext | None = None
    setup_error: Reply | None = None
    try:
        ctx = setup.context()
    except Exception as exc:  # reported as the reply to every task
        setup_error = error_reply(exc)
    tasks: queue.SimpleQueue[Any] = queue.SimpleQueue()
    stop = threading.Event()
    threading.Thread(target=_receive, args=(sock, tasks, stop), daemon=True).start()
    sending = threading.Lock()
    numbers = iter(range(1 << 62))
    taking = threading.Lock()

    def serve() -> None:
        while True:
            with taking:  # numbers follow the order the tasks arrived in
                task = tasks.get()
                n = next(numbers)
            if task is None or stop.is_set():
                tasks.put(None)  # for the other threads
                return
            reply = _run_task(ctx, setup_error, task)
            try:
                with sending:
                    _send(sock, (n, reply))
            except OSError:
                stop.set()
                tasks.put(None)
                return

    helpers = [threading.Thread(target=serve, daemon=True) for _ in range(max(1, setup.threads) - 1)]
    for t in helpers:
        t.start()
    serve()
    for t in helpers:
        t.join()


# --- parent side: processes --------------------------------------------------------------------


@dataclass(eq=False)
class _Worker:
    proc: subprocess.Popen[bytes]
    sock: socket.socket
    tickets: dict[int, int]  # task number (in the order sent) -> ticket, for tasks not yet answered
    sent: int = 0


def _worker_env() -> dict[str, str]:
    """The environment of a worker: this one, with the directory holding this kyrorepo first on the
    path and ``WORKER_MALLOC`` before any glibc tunables of the user's (theirs win)."""
    root = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
    env = dict(os.environ)
    env["PYTHONPATH"] = os.pathsep.join(p for p in (root, env.get("PYTHONPATH", "")) if p)
    env["GLIBC_TUNABLES"] = ":".join(t for t in (WORKER_MALLOC, env.get("GLIBC_TUNABLES", "")) if t)
    return env


def _spawn(env: dict[str, str], preload: tuple[str, ...] = ()) -> _Worker:
    """Start a worker process; it waits for its ``Setup``."""
    mine, theirs = socket.socketpair()
    try:
        flags = ["-P"] if sys.version_info >= (3, 11) else []  # no current directory on the path
        code = f"from kyrorepo.procpool import worker_main; worker_main({theirs.fileno()}, {preload!r})"
        proc = subprocess.Popen([sys.executable, *flags, "-c", code], pass_fds=(theirs.fileno(),),
                                stdin=subprocess.DEVNULL, stdout=subprocess.DEVNULL, env=env)
    except OSError as exc:
        mine.close()
        raise KyroError(f"cannot start a worker process ({sys.executable}): {exc.strerror or exc}") from None
    finally:
        theirs.close()
    return _Worker(proc, mine, {})


def _start_worker(setup: Setup, env: dict[str, str]) -> _Worker:
    """A prestarted worker (``prestart``) if one with this environment is left, else a new
    one; sent its ``Setup``."""
    while _SPARES:
        w, its_env = _SPARES.pop()
        if its_env != env:
            _stop(w)
            continue
        try:
            _send(w.sock, setup)
            return w
        except OSError:  # it died while it waited
            _stop(w)
    w = _spawn(env)
    _send(w.sock, setup)  # small: sits in the socket buffer until the worker has started
    return w


_SPARES: list[tuple[_Worker, dict[str, str]]] = []  # prestarted workers and their environment
_STOPPER: list[object] = []  # stop_spares, once registered at exit


def default_workers() -> int:
    """Worker processes of a restore: one per CPU, at least two."""
    return max(2, os.cpu_count() or 2)


def prestart(processes: int, preload: tuple[str, ...] = ()) -> None:
    """Start up to ``processes`` worker processes now, before their ``Setup`` is known, so that
    their start and imports (~0.15 s) overlap what this process does before it can make a
    pool (stretching the passphrase takes ~0.25 s with the default Argon2id parameters).
    The next ``ProcPool`` takes them; ``stop_spares`` (also run at exit) stops those left."""
    if not _STOPPER:
        _STOPPER.append(atexit.register(stop_spares))
    env = _worker_env()
    while len(_SPARES) < processes:
        _SPARES.append((_spawn(env, preload), env))


def prestart_for(backend: Any, workers: int, task_module: str) -> None:
    """``prestart`` the worker processes ``open_runner(repo, workers)`` will want for a repository
    on ``backend`` (none when its tasks will run on threads), importing ``task_module`` and the
    backend's module. The caller runs ``stop_spares`` when it is done."""
    spec = reopen_spec(backend)
    if spec is not None:
        prestart(process_count(workers), (task_module, type(spec).__module__))


def stop_spares() -> None:
    """Stop the prestarted workers no pool took (the command failed or was refused first)."""
    while _SPARES:
        _stop(_SPARES.pop()[0])


def _stop(w: _Worker) -> None:
    w.sock.close()  # the worker sees the socket close and exits
    _reap(w.proc)


def _reap(proc: subprocess.Popen[bytes]) -> int:
    """Wait for a worker whose socket is closed; kill it if it does not finish its task in time."""
    try:
        return proc.wait(STOP_TIMEOUT)
    except subprocess.TimeoutExpired:
        proc.kill()
        return proc.wait()


class ProcPool:
    """Worker processes, each with at most ``threads + 1`` tasks queued; returns replies as they finish.

    Starting is asynchronous: the processes import and set up while the caller plans its
    first tasks. ``close`` (also on errors and Ctrl-C) closes every socket and waits for the
    workers, killing one that does not finish its task within ``STOP_TIMEOUT``.
    """

    def __init__(self, setup: Setup, processes: int) -> None:
        self._threads = max(1, setup.threads)
        self.slots = processes * (self._threads + 1)
        self._workers: list[_Worker] = []
        self._sel = selectors.DefaultSelector()
        self._ready: list[tuple[int, Reply]] = []
        self._next = 0
        self._closed = False
        env = _worker_env()
        try:
            for _ in range(processes):
                w = _start_worker(setup, env)
                self._workers.append(w)
                self._sel.register(w.sock, selectors.EVENT_READ, w)
        except BaseException:
            self.close()
            raise

    @property
    def pending(self) -> int:
        return sum(len(w.tickets) for w in self._workers) + len(self._ready)

    @property
    def idle(self) -> bool:
        return any(len(w.tickets) < self._threads for w in self._workers)

    def submit(self, fn: Callable[[WorkerContext, A], Any], arg: A) -> int:
        """Queue ``fn(context, arg)`` on the least busy worker; return its ticket."""
        w = min(self._workers, key=lambda x: len(x.tickets))
        ticket = self._next
        self._next += 1
        try:
            _send(w.sock, (fn, arg))
        except OSError:
            self._died(w)
        w.tickets[w.sent] = ticket
        w.sent += 1
        return ticket

    def wait(self) -> tuple[int, Any]:
        """The next finished task: ``(ticket, value)``; raises the task's error."""
        while not self._ready:
            if not any(w.tickets for w in self._workers):
                raise AssertionError("wait() with no task in flight")
            for key, _ in self._sel.select():
                w = key.data
                try:
                    n, reply = _recv(w.sock)
                except (EOFError, OSError):
                    self._died(w)
                self._ready.append((w.tickets.pop(n), reply))
        ticket, reply = self._ready.pop(0)
        if reply[0] != "ok":
            raise_reply(reply)
        return ticket, reply[1]

    def _died(self, w: _Worker) -> None:
        code = _reap(w.proc)
        how = f"was killed by signal {-code}" if code < 0 else f"exited with code {code}"
        raise KyroError(f"worker process {w.proc.pid} {how} before it finished its task "
                        "(out of memory?): run the command again")

    def close(self) -> None:
        """Stop every worker (each finishes at most the task it runs) and wait for it; idempotent."""
        if self._closed:
            return
        self._closed = True
        for w in self._workers:
            self._sel.unregister(w.sock)
            w.sock.close()
        for w in self._workers:
            _reap(w.proc)
        self._workers.clear()
        self._sel.close()


# --- parent side: threads ------------------------------------------------------------------------


class ThreadRunner:
    """The same tasks on threads of this process, for backends that cannot be reopened elsewhere.

    Uses ``executor`` when given (its owner shuts it down), else a pool of its own.
    """

    def __init__(self, ctx: WorkerContext, threads: int, executor: ThreadPoolExecutor | None = None) -> None:
        self.ctx = ctx
        self.slots = threads + 2
        self._threads = threads
        self._own = executor is None
        self._pool = executor or ThreadPoolExecutor(max_workers=threads, thread_name_prefix="open")
        self._done: queue.SimpleQueue[tuple[int, Future[Any]]] = queue.SimpleQueue()
        self._inflight = 0
        self._next = 0

    @property
    def pending(self) -> int:
        return self._inflight

    @property
    def idle(self) -> bool:
        return self._inflight < self._threads

    def submit(self, fn: Callable[[WorkerContext, A], Any], arg: A) -> int:
        ticket = self._next
        self._next += 1
        fut = self._pool.submit(fn, self.ctx, arg)
        fut.add_done_callback(lambda f: self._done.put((ticket, f)))
        self._inflight += 1
        return ticket

    def wait(self) -> tuple[int, Any]:
        if not self._inflight:
            raise AssertionError("wait() with no task in flight")
        ticket, fut = self._done.get()
        self._inflight -= 1
        return ticket, fut.result()

    def close(self) -> None:
        if self._own:
            self._pool.shutdown(wait=True, cancel_futures=True)


# --- choosing and using a runner -----------------------------------------------------------------


def reopen_spec(backend: object) -> object | None:
    """How another process can open ``backend`` itself, or None when it cannot."""
    spec = getattr(backend, "reopen_spec", None)
    return spec() if spec is not None else None


def open_runner(repo: "Repository", workers: int, threads: ThreadPoolExecutor | None = None) -> Runner:
    """Worker processes when the repository's backend can be reopened in them, else threads
    (of ``threads`` when given).

    Processes are capped at the number of CPUs: each one is a whole interpreter (~30 MiB),
    and more of them than cores only adds memory.
    """
    spec = reopen_spec(repo.backend)
    if spec is None:
        return ThreadRunner(WorkerContext(repo.backend, repo.codec, repo.keys), workers, threads)
    return ProcPool(Setup(spec, repo.keys, repo.config.compression_level), process_count(workers))


def process_count(workers: int) -> int:
    """How many worker processes ``open_runner`` starts for ``workers``."""
    return max(1, min(workers, os.cpu_count() or 1))


def ordered_map(runner: Runner, fn: Callable[[WorkerContext, A], R], items: Iterable[A]) -> Iterator[tuple[A, R]]:
    """``(item, fn(context, item))`` in the order of ``items``.

    Tasks in flight and replies that overtook a slower earlier task (they wait here) are at
    most ``2 * runner.slots`` together, so memory stays bounded.
    """
    order: deque[tuple[int, A]] = deque()
    done: dict[int, R] = {}

    def heads() -> Iterator[tuple[A, R]]:
        while order and order[0][0] in done:
            ticket, item = order.popleft()
            yield item, done.pop(ticket)

    for item in items:
        order.append((runner.submit(fn, item), item))
        while runner.pending + len(done) >= 2 * runner.slots:
            ticket, value = runner.wait()
            done[ticket] = value
            yield from heads()
    while order:
        ticket, value = runner.wait()
        done[ticket] = value
        yield from heads()
