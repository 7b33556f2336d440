"""A preloaded process that forks pod shims, so each shim shares the interpreter and
its imported modules copy-on-write instead of paying for a fresh Python (~14 MiB USS).

`python -m shim.zygote --socket PATH [--log FILE]`; one JSON line per connection:
    -> {"v": 1, "op": "spawn", "pod_id": ..., "dir": ..., "runc_root": ...,
        "runc": ..., "runc_args": [...], "log_level": ..., "max_log_line": ...}
    <- {"v": 1, "ok": true, "pid": <shim pid>}   (the shim's socket is listening)
    -> {"v": 1, "op": "ping"}   <- {"v": 1, "ok": true, "pid": <zygote pid>}
    -> {"v": 1, "op": "stop"}   <- {"v": 1, "ok": true}, then the zygote exits; the shims it
                                   forked are not its children and keep running
"""

from __future__ import annotations

import argparse
import contextlib
import ctypes
import gc
import json
import os
import re
import shutil
import signal
import socket
import sys
import types
from collections.abc import Callable, Iterable, Mapping
from dataclasses import dataclass
from typing import Any

from shim import __main__ as shim_main
from shim import ksm, protocol
from shim.runc import DEFAULT_RUNC

# shim.server imports the op handlers (shim/ops_*.py) and shim/state.py: all loaded here,
# before any fork, so every shim shares them.
from shim.server import (
    LOG_LEVELS,
    Connection,
    Shim,
    accept,
    ignore_signal,
    load_libc,
    load_prctl,
    set_child_subreaper,
    set_signal_handler,
)


def spawn_args(request: dict[str, Any]) -> argparse.Namespace:
    """The shim's arguments, as `python -m shim` would parse them. Built directly, not with
    argparse: a parser made per spawn would dirty zygote pages that the shims forked
    earlier still share, and each such page becomes a private copy in them."""
    log_level = str(request.get("log_level") or "info")
    if log_level not in LOG_LEVELS:
        raise ValueError(f"unknown log level {log_level!r}")
    return argparse.Namespace(
        pod_id=str(request["pod_id"]), dir=str(request["dir"]),
        runc_root=str(request["runc_root"]), runc=str(request.get("runc") or DEFAULT_RUNC),
        runc_args=[str(arg) for arg in request.get("runc_args") or []],
        log_level=log_level, max_log_line=int(request.get("max_log_line") or 16 * 1024),
        foreground=True)


def fork_shim(args: argparse.Namespace, inherited: list[socket.socket],
              environment: Mapping[str, str]) -> int:
    """Fork a detached shim; returns its pid, its socket listening (bound before the
    fork). Its runc calls get environment (this process's, copied once: see
    Runc.environment).

    One fork, not the classic double fork: the zygote ignores SIGCHLD (serve_zygote), so
    the kernel reaps a shim that exits and none is left a zombie, and a shim outlives the
    zygote as it would outlive the intermediate process, re-parented to init. The second
    fork and the intermediate's exit were about half of the zygote's CPU per shim (perf:
    each fork copies the zygote's page tables, and each new process faults its way back
    into the zygote's pages).
    """
    if not os.access(args.dir, os.F_OK):  # the daemon has made it: makedirs would raise
        os.makedirs(args.dir, mode=0o700, exist_ok=True)
    listener = shim_main.bind_listener(os.path.join(args.dir, shim_main.SOCKET_NAME))
    try:
        shim_pid = os.fork()
    except OSError:
        listener.close()
        raise
    if shim_pid == 0:
        _become_shim(args, listener, inherited, environment)
    listener.close()
    return shim_pid


def _become_shim(args: argparse.Namespace, listener: socket.socket,
                 inherited: list[socket.socket], environment: Mapping[str, str]) -> None:
    """In the forked child: a session of its own, stdio to the shim's log, then the shim.

    Leading its session gives a shim no controlling terminal: it opens no terminal device
    (a container's pty master comes over runc's console socket)."""
    try:
        for sock in inherited:  # the zygote's listener and client connection
            sock.close()
        os.setsid()
        shim_main.redirect_stdio(os.path.join(args.dir, shim_main.LOG_NAME))
        shim_main.serve(args, listener, environment)
        os._exit(0)
    except BaseException:
        os._exit(1)


def handle(conn: socket.socket, zygote_listener: socket.socket,
           environment: Mapping[str, str]) -> None:
    with conn:
        conn.settimeout(30)
        buffer = b""
        while b"\n" not in buffer and len(buffer) < protocol.MAX_LINE:
            data = conn.recv(65536)
            if not data:
                return
            buffer += data
        stop = False
        try:
            request = protocol.decode_message(buffer.split(b"\n", 1)[0])
            op = request.get("op")
            if op == "spawn":
                shim_pid = fork_shim(spawn_args(request), [zygote_listener, conn],
                                     environment)
                reply: dict[str, Any] = {"ok": True, "pid": shim_pid}
            elif op == "ping":
                reply = {"ok": True, "pid": os.getpid()}
            elif op == "stop":
                reply, stop = {"ok": True}, True
            else:
                raise ValueError(f"unknown op {op!r}")
        except (OSError, ValueError, KeyError, SystemExit, protocol.ProtocolError) as exc:
            reply = {"ok": False, "error": str(exc) or type(exc).__name__}
        with contextlib.suppress(OSError):
            conn.sendall(protocol.encode_message({"v": protocol.PROTOCOL_VERSION, **reply}))
        if stop:
            with contextlib.suppress(OSError):
                os.unlink(zygote_listener.getsockname())
            os._exit(0)


WARM_UP_ROUNDS = 16  # CPython 3.11 specializes a function's bytecode after 8 calls


def _warm_up(rounds: int = WARM_UP_ROUNDS) -> None:
    """Run the shim's own paths here, enough times for CPython to specialize their
    bytecode, so that a shim finds them ready instead of writing to them.

    Running a function rewrites its code object (warm-up counters, specialized
    instructions, inline caches) and fills the interpreter's type-attribute cache; in a
    forked shim each of those writes copies a shared page. Done once here, the pages stay
    shared. Measured: about 0.35 MiB of USS per shim (with server.py reading its small
    files as bytes, which keeps the ascii codec out). Nothing here outlives the call: no
    child process, no signal handler, no open fd.
    """
    from shim.crilog import CriLogFile, LineSplitter
    from shim.runc import Runc
    from shim.server import Logger

    state_dir = _private_temp_dir("flatpod-zygote-warm-up-")
    try:
        bundle = os.path.join(state_dir, "bundle")
        os.mkdir(bundle)
        with open(os.path.join(bundle, "config.json"), "w", encoding="utf-8") as config:
            json.dump({"linux": {"cgroupsPath": "/warm-up/c", "namespaces": [
                {"type": "pid"}, {"type": "ipc", "path": "/proc/1/ns/ipc"}]}}, config)
        # /bin/true writes no pid file: create fails after runc ran, and the error
        # path is warmed as well.
        runc = Runc(root=state_dir, binary="/bin/true", log_dir=state_dir,
                    environment=dict(os.environ))
        listener = shim_main.bind_listener(os.path.join(state_dir, shim_main.SOCKET_NAME))
        shim = Shim("warm-up", state_dir, runc, listener, Logger(LOG_LEVELS["error"]))
        requests = b"".join(protocol.encode_message(r) for r in (
            {"v": 1, "id": 1, "op": "state"},
            {"v": 1, "id": 2, "op": "state", "container_id": "missing"},
            {"v": 1, "id": 3, "op": "create", "container_id": "warm-up", "bundle": bundle,
             "log_path": os.path.join(state_dir, "create.log"), "log_root": state_dir},
            {"v": 1, "id": 4, "op": "start", "container_id": "missing"},
            {"v": 1, "id": 5, "op": "nonsense"},
            {"v": 1, "id": 6, "op": "subscribe"}))
        lifecycle = _LifecycleWarmUp.make(state_dir)
        # A real file: CRI logs are opened beneath a directory, never a device like /dev/null.
        log = CriLogFile(os.path.join(state_dir, "warm-up.log"), state_dir)
        try:
            for round_ in range(rounds):
                ours, theirs = socket.socketpair()
                with ours:
                    connection = Connection(shim, theirs)
                    ours.sendall(requests)
                    shim.loop.run_once(0)
                    ours.recv(1 << 16)
                    connection.close()
                lifecycle.run(shim, run_at_create=round_ % 2 == 1)
                log.write_records(b"stdout", LineSplitter().feed(b"warm\nup\n"))
                _warm_up_request_handling(state_dir, listener)
                shim.reap()
                runc.start("warm-up")
        finally:
            log.close()
            if shim.oom_inotify >= 0:
                os.close(shim.oom_inotify)
            shim.loop.close()
            shim.wakeup_reader.close()
            shim.wakeup_writer.close()
            listener.close()
    finally:
        shutil.rmtree(state_dir, ignore_errors=True)


@dataclass(frozen=True)
class _LifecycleWarmUp:
    """A container's whole life through the shim, on its success paths: create (or run),
    start, state, a signal, its exit reaped and recorded, with a subscriber and the cgroup
    v2 OOM watch. The runtime is /bin/true, and the container's process a /bin/true of
    our own whose pid is written as runc would have written it. Measured: 50-60 KiB of USS
    per shim (hack/shim-memory, interleaved with the error paths alone)."""

    bundle: str
    requests: tuple[bytes, bytes]  # created, then started; or run at create

    CONTAINER_ID = "warm-up-running"
    SUBSCRIBE = protocol.encode_message({"v": 1, "id": 1, "op": "subscribe"})

    @classmethod
    def make(cls, state_dir: str) -> _LifecycleWarmUp:
        bundle = os.path.join(state_dir, cls.CONTAINER_ID)
        os.mkdir(bundle)
        with open(os.path.join(bundle, "config.json"), "w", encoding="utf-8") as config:
            json.dump({"linux": {"namespaces": [{"type": "pid"}]}}, config)
        oom_file = os.path.join(state_dir, "memory.events")
        with open(oom_file, "w", encoding="utf-8") as events:
            events.write("low 0\nhigh 0\nmax 0\noom 0\noom_kill 0\n")
        create: dict[str, Any] = {
            "op": "create", "container_id": cls.CONTAINER_ID, "bundle": bundle,
            "log_path": os.path.join(state_dir, "running.log"), "log_root": state_dir,
            "oom_file": oom_file}
        after: tuple[dict[str, Any], ...] = ({"op": "start", "container_id": cls.CONTAINER_ID},
                 {"op": "state", "container_id": cls.CONTAINER_ID},
                 {"op": "signal", "container_id": cls.CONTAINER_ID, "signal": 0},
                 {"op": "state"})
        requests = [b"".join(protocol.encode_message({"v": 1, "id": n, **r}) for n, r in
                             enumerate(({**create, "start": run}, *after), 1))
                    for run in (False, True)]
        return cls(bundle, (requests[0], requests[1]))

    def run(self, shim: Shim, run_at_create: bool) -> None:
        """One life; a step that fails leaves its path cold, never the zygote unstarted."""
        try:
            init = os.posix_spawn("/bin/true", ["/bin/true"], {})
        except OSError:
            return
        with open(os.path.join(self.bundle, "init.pid"), "wb") as pid_file:
            pid_file.write(b"%d" % init)
        subscriber, subscribed = socket.socketpair()
        ours, theirs = socket.socketpair()
        with subscriber, ours:
            events = Connection(shim, subscribed)
            subscriber.sendall(self.SUBSCRIBE)
            shim.loop.run_once(0)
            connection = Connection(shim, theirs)
            ours.sendall(self.requests[run_at_create])
            shim.loop.run_once(0)
            # Its exit, without reaping it: the shim reaps it.
            os.waitid(os.P_PID, init, os.WEXITED | os.WNOWAIT)
            shim.reap()
            ours.recv(1 << 16)
            subscriber.recv(1 << 16)
            connection.close()
            events.close()
        shim.containers.pop(self.CONTAINER_ID, None)


def _private_temp_dir(prefix: str) -> str:
    """A new directory only root can enter, as tempfile.mkdtemp makes one: tempfile
    imports random, whose at-fork hook reseeds it in every forked shim. Measured: 44 KiB
    of USS per shim."""
    path = os.path.join(os.environ.get("TMPDIR") or "/tmp", prefix + os.urandom(8).hex())
    os.mkdir(path, 0o700)  # fails rather than follow or reuse anything already there
    return path


def _warm_up_request_handling(state_dir: str, listener: socket.socket) -> None:
    """The zygote's own path up to a fork (a ping stands in for the spawn): otherwise the
    first shims forked pay for specializing it, and each shim keeps the pages that the
    zygote rewrites while it still warms up. Measured: about 50 KiB of USS per shim."""
    spawn_args({"pod_id": "warm-up", "dir": state_dir, "runc_root": state_dir})
    ours, theirs = socket.socketpair()
    with ours:
        ours.sendall(protocol.encode_message({"v": protocol.PROTOCOL_VERSION, "op": "ping"}))
        handle(theirs, listener, {})
        ours.recv(1 << 16)


# Objects that fill the free blocks of the zygote's pymalloc pools (see _fill_pool_holes);
# they are never read, and live as long as the zygote.
_POOL_FILLERS: list[object] = []
MALLOC_STATS_LINE = re.compile(rb"^\s*\d+\s+(\d+)\s+\d+\s+\d+\s+(\d+)\s*$")
BYTES_HEADER = sys.getsizeof(b"")  # a bytes object of length n takes BYTES_HEADER + n


def _fill_pool_holes() -> None:
    """Fill every free block of the partly used pymalloc pools with an object that is
    never touched again.

    Otherwise a shim's first small allocations land in those free blocks, which are
    scattered over the zygote's pools (imports leave holes everywhere): each lands on a
    shared page and makes a private copy of all 4 KiB of it. With the holes filled, new
    objects go to fresh pools, packed together. Measured: about 0.17 MiB of USS per shim.
    """
    # Filling makes a few short-lived objects of its own (and their holes): a second pass
    # fills those too.
    for _ in range(2):
        for size, free in _free_blocks_per_size():
            if size == 16:  # a bare object() is a 16-byte header
                for _ in range(free):
                    _POOL_FILLERS.append(object())
            elif size >= BYTES_HEADER + 2:  # bytes of length 0 and 1 are shared singletons
                for _ in range(free):
                    _POOL_FILLERS.append(bytes(size - BYTES_HEADER))
            elif size == 32:  # a one-digit int takes 28 bytes
                for n in range(free):
                    _POOL_FILLERS.append(n + 1000)


def _free_blocks_per_size() -> list[tuple[int, int]]:
    """(block size, free blocks in its partly used pools), from sys._debugmallocstats."""
    read_fd, write_fd = os.pipe()
    saved_stderr = os.dup(2)
    try:
        sys.stderr.flush()
        os.dup2(write_fd, 2)
        sys._debugmallocstats()  # writes to the C stderr, unbuffered
    finally:
        os.dup2(saved_stderr, 2)
        os.close(saved_stderr)
        os.close(write_fd)
    with os.fdopen(read_fd, "rb") as stats:
        lines = stats.read().splitlines()
    found = []
    for line in lines:
        match = MALLOC_STATS_LINE.match(line)
        if match is not None:
            found.append((int(match.group(1)), int(match.group(2))))
    return found


def preload() -> None:
    """Everything a shim will need, imported, run and settled here, so that its pages are
    shared by all shims instead of copied into each."""
    # Never import subprocess: it imports threading, whose at-fork hook (run in every
    # forked shim) rebuilds locks and walks weak sets.
    # Measured: ~0.5 MiB of private pages per shim.
    # libc's prctl made here rather than in each shim: ~0.18 MiB per shim.
    load_prctl()
    # Two rounds: the second runs a container at create (the first creates, then starts).
    run_by_shims = _code_run_by(lambda: _warm_up(rounds=2))
    gc.collect()
    # Holes filled first, so that the copies are packed together in fresh memory.
    _fill_pool_holes()
    _trim_malloc()
    _fill_malloc_holes()
    _pack_code([*run_by_shims, *(function.__code__ for function in _run_only_in_a_shim()
                                 if isinstance(function, types.FunctionType))])
    del run_by_shims
    gc.collect()
    _warm_up()  # the copies specialized (the originals were)
    gc.collect()
    _fill_pool_holes()
    # Objects alive now are never collected: the cycle collector would otherwise
    # write to (and so un-share) every page of them in each forked shim.
    gc.collect()
    gc.freeze()
    _trim_malloc()
    _fill_malloc_holes()


def _trim_malloc() -> None:
    """Give back the free memory inside the heap (about 1.8 MiB, left by imports): the
    zygote, and so every shim, maps that much less (RSS and PSS; a shim's USS is alike)."""
    malloc_trim = getattr(load_libc(), "malloc_trim", None)  # glibc only
    if malloc_trim is not None:
        malloc_trim(0)


def _run_only_in_a_shim() -> list[object]:
    """The functions a shim (or the zygote for it) runs that the warm-up cannot: they fork,
    or set the process's signal handlers, session or name."""
    return [fork_shim, _become_shim, shim_main.serve, shim_main.redirect_stdio,
            set_child_subreaper, set_signal_handler, accept, Shim.run, Shim._on_signal,
            Shim._on_accept]


def _code_run_by(run: Callable[[], None]) -> list[types.CodeType]:
    """The code objects of the Python functions that `run` calls, each once."""
    called: dict[int, types.CodeType] = {}

    def profile(frame: types.FrameType, event: str, _arg: object) -> None:
        if event == "call":
            called.setdefault(id(frame.f_code), frame.f_code)

    sys.setprofile(profile)
    try:
        run()
    finally:
        sys.setprofile(None)
    return list(called.values())


def _pack_code(codes: Iterable[types.CodeType]) -> None:
    """Copy the code objects a shim runs into fresh memory, side by side, and point their
    functions at the copies.

    Calling a function writes its code object (CPython 3.11 counts a reference to it for
    the frame, and rewrites the counters of the instructions it could not specialize), so
    each code object a shim runs copies the zygote page that holds it. As imported, those
    are spread over pages shared with code no shim runs, module by module; packed, they
    fill fewer pages. The copies are made after the holes of pymalloc's pools and of the
    malloc heap are filled (so they land in fresh pools and at the heap's top), and are
    specialized by the warm-up that follows (unspecialized, each shim would specialize
    them itself and write them whole). Measured: 40-70 KiB of USS per shim
    (hack/shim-memory, interleaved with the tree before it)."""
    originals = {id(code): code for code in codes}
    copies: dict[int, types.CodeType] = {}

    def copy(code: types.CodeType) -> types.CodeType:
        made = copies.get(id(code))
        if made is None:
            # Nested code (comprehensions, closures) is made into functions from the
            # constants when the outer code runs: copied too, when a shim runs it.
            consts = tuple(copy(const) if isinstance(const, types.CodeType)
                           and id(const) in originals else const for const in code.co_consts)
            made = copies[id(code)] = code.replace(co_consts=consts)
        return made

    # In the order of their addresses: a module's code stays together.
    for code in sorted(originals.values(), key=id):
        copy(code)
    for obj in gc.get_objects():
        if isinstance(obj, types.FunctionType):
            made = copies.get(id(obj.__code__))
            if made is not None:
                obj.__code__ = made


class _Mallinfo2(ctypes.Structure):
    """glibc's struct mallinfo2 (glibc 2.33 and later)."""

    _fields_ = [(name, ctypes.c_size_t) for name in (
        "arena", "ordblks", "smblks", "hblks", "hblkhd", "usmblks", "fsmblks", "uordblks",
        "fordblks", "keepcost")]


MALLOC_FILL_LARGEST = 1 << 16  # glibc's mmap threshold starts at 128 KiB: larger is mmap'd
MALLOC_FILL_SMALLEST = 32  # glibc's smallest chunk on 64-bit
MALLOC_CHUNK_HEADER = 16
MALLOC_FILL_MAX_CHUNKS = 100_000  # a bound, never reached: ~2 MiB of holes in chunks


def _fill_malloc_holes() -> None:
    """Fill the free chunks inside the zygote's malloc heap (glibc) with chunks that are
    never touched again, as _fill_pool_holes does for pymalloc.

    Imports leave free chunks all over the heap; a shim's first allocations of more than
    512 bytes (pymalloc hands those to malloc: buffers, large code and dict tables) would
    land in them and copy each page they write, chunk headers included. Filled, those
    allocations come from the top of the heap, new pages packed together. Filling writes
    only the new chunks' headers, not the free memory itself (malloc_trim gave that back).
    For each size from 64 KiB down to 32 bytes, chunks are taken until one comes from the
    top chunk (its size, mallinfo2's keepcost, shrinks): no hole that large is left.
    Measured: 110-150 KiB of USS per shim (hack/shim-memory, interleaved with main).
    """
    libc = load_libc()
    if not hasattr(libc, "mallinfo2"):  # not glibc, or older than 2.33
        return
    libc.mallinfo2.restype = _Mallinfo2
    libc.malloc.restype = ctypes.c_void_p
    libc.malloc.argtypes = [ctypes.c_size_t]
    libc.free.argtypes = [ctypes.c_void_p]
    # The filler chunks are never freed, so nothing needs to keep their addresses.
    size, filled = MALLOC_FILL_LARGEST, 0
    while size >= MALLOC_FILL_SMALLEST and filled < MALLOC_FILL_MAX_CHUNKS:
        top = libc.mallinfo2().keepcost
        chunk = libc.malloc(size - MALLOC_CHUNK_HEADER)
        if not chunk:
            return
        if libc.mallinfo2().keepcost < top:  # from the top: no hole this large is left
            libc.free(chunk)
            size //= 2
        else:
            filled += 1


def advise_merging() -> None:
    """Offer the zygote's memory, and so the shims' copies of it, to KSM (shim/ksm.py).
    Last before serving: a mapping made after this is not marked."""
    libc_madvise = load_libc().madvise
    libc_madvise.argtypes = [ctypes.c_void_p, ctypes.c_size_t, ctypes.c_int]

    def madvise(address: int, length: int, advice: int) -> None:
        if libc_madvise(address, length, advice) != 0:
            raise OSError(ctypes.get_errno(), f"madvise({advice}) refused")

    try:
        marked = ksm.mark_mergeable(madvise)
    except OSError as err:
        print(f"flatpod zygote: shim pages not merged: {err}", file=sys.stderr)
    else:
        print(f"flatpod zygote: {marked >> 10} KiB offered to KSM", file=sys.stderr)


def serve_zygote(listener: socket.socket, merge_pages: bool = False) -> None:
    preload()
    # The shims are forked as children (fork_shim): the kernel reaps them as they exit.
    # After preload, whose warm-up waits for children of its own. A shim inherits this
    # and sets its own SIGCHLD handler before it starts any process (Shim.run).
    ignore_signal(signal.SIGCHLD)
    environment = dict(os.environ)
    if merge_pages:
        advise_merging()
    while True:
        conn = accept(listener)
        handle(conn, listener, environment)


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(prog="python -m shim.zygote")
    parser.add_argument("--socket", required=True)
    parser.add_argument("--log", default=os.devnull)
    parser.add_argument("--foreground", action="store_true")
    parser.add_argument("--merge-pages", action="store_true",
                        help="mark the memory the shims inherit MADV_MERGEABLE (KSM)")
    args = parser.parse_args(argv)
    # Listening before detaching: when this command exits 0 the zygote is ready.
    listener = shim_main.bind_listener(args.socket)
    if not args.foreground:
        shim_main.detach(args.log, listener)
    serve_zygote(listener, args.merge_pages)
    sys.exit(0)


if __name__ == "__main__":
    main()
