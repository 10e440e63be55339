"""How a program is isolated: the bubblewrap command line, the fallback, and per-worker uids.

bubblewrap gives each run new user (unless we are root), pid, network, IPC and UTS
namespaces, a root file system holding only the system directories and the interpreter
(read-only) and a size-capped tmpfs work directory. The fallback has none of that: it runs
the interpreter directly in a fresh temporary directory with the resource limits.

The process limit (``RLIMIT_NPROC``) counts the processes of a user, and the kernel ignores it
for root. So when the trainer runs as root, each worker runs its programs under a uid of its
own (leased with a lock file, so that two trainers on one machine never share one), and the
limit counts exactly that run's processes. Without root, bubblewrap's user namespace counts
the run's processes apart from the user's others; the non-root fallback can only set the
limit above the user's current count (docs/sandbox.md).
"""

from __future__ import annotations

import contextlib
import fcntl
import os
import shutil
import signal
import stat
import tempfile
import time
from pathlib import Path

WORKDIR = "/sandbox"  # the work directory inside bubblewrap
SYSTEM_PATHS = ("/usr", "/bin", "/sbin", "/lib", "/lib32", "/lib64", "/libx32", "/etc/ld.so.cache")
UID_SEARCH = 1 << 16  # uids tried above uid_base when leasing
UIDS_PER_WORKER = 4  # as root, runs rotate over these many uids per worker (two per run)
# World-writable places a program could leave files in. The fallback as root mounts a fresh
# tmpfs on each (the harness gets the list in its job); where the kernel refuses, it deletes
# what the run's uid left there instead.
SHARED_DIRS = ("/tmp", "/var/tmp", "/dev/shm", "/run/lock")
PRIVATE_WORKDIR = "/tmp/sandbox"  # the fallback's work directory inside its private /tmp
ROOT_CAPS = ("CAP_SETUID", "CAP_SETGID", "CAP_CHOWN")  # dropped with the switch to the uid


def bwrap_argv(bwrap: str, readonly: list[str], workdir_bytes: int, as_root: bool) -> list[str]:
    """The ``bwrap`` options; the interpreter command follows ``--``.

    As root, bubblewrap needs no user namespace; the harness keeps the capabilities to switch
    to the worker's uid and drops them with it. Otherwise the user namespace is the only one
    an unprivileged user may create, and it carries the others.
    """
    argv = [bwrap, "--die-with-parent", "--new-session", "--unshare-pid", "--unshare-net",
            "--unshare-ipc", "--unshare-uts", "--unshare-cgroup-try"]  # fmt: skip
    if as_root:
        for cap in ROOT_CAPS:
            argv += ["--cap-add", cap]
    else:
        argv.append("--unshare-user")
    bound: list[str] = []
    for path in SYSTEM_PATHS:
        if os.path.islink(path):
            argv += ["--symlink", os.readlink(path), path]
        elif os.path.exists(path):
            argv += ["--ro-bind", path, path]
            bound.append(path)
    made: set[str] = set()
    for path in readonly:
        if any(path == b or path.startswith(b.rstrip("/") + "/") for b in bound):
            continue
        # Parents bubblewrap would create copy the host's modes (/root is 0700): make them
        # traversable so the run's uid reaches the interpreter.
        for parent in reversed(Path(path).parents[:-1]):
            if str(parent) not in made:
                argv += ["--perms", "0755", "--dir", str(parent)]
                made.add(str(parent))
        argv += ["--ro-bind", path, path]
        bound.append(path)
    argv += ["--proc", "/proc", "--dev", "/dev", "--size", str(workdir_bytes), "--tmpfs", WORKDIR,
             "--chdir", WORKDIR, "--"]  # fmt: skip
    return argv


def world_usable(path: str) -> bool:
    """Whether any user may run ``path``: every directory on the way to its real location is
    searchable by others and the file is readable and executable by them. As root, the
    fallback's uid needs this (bubblewrap makes the parents of what it shows searchable)."""
    real = Path(os.path.realpath(path))
    try:
        modes = [p.stat().st_mode for p in real.parents] + [real.stat().st_mode]
    except OSError:
        return False
    return all(m & stat.S_IXOTH for m in modes) and bool(modes[-1] & stat.S_IROTH)


def user_processes(uid: int, live: bool = False) -> dict[int, int]:
    """pid -> thread count of the processes whose real uid is ``uid``, zombies included
    unless ``live`` (``RLIMIT_NPROC`` counts zombies until their reaper collects them)."""
    found: dict[int, int] = {}
    for entry in os.scandir("/proc"):
        if not entry.name.isdigit():
            continue
        try:
            status = Path(entry.path, "status").read_text()
        except OSError:  # the process ended meanwhile
            continue
        fields = dict(line.split(":", 1) for line in status.splitlines() if ":" in line)
        zombie = fields.get("State", "").strip().startswith("Z")
        if int(fields.get("Uid", "-1").split()[0]) == uid and not (live and zombie):
            found[int(entry.name)] = int(fields.get("Threads", "1"))
    return found


def kill_uid(uid: int, timeout: float = 2.0) -> bool:
    """As root: SIGKILL every live process of ``uid`` until none is left (this also catches
    processes that left the run's session). False if some still live after ``timeout``."""
    deadline = time.monotonic() + timeout
    while processes := user_processes(uid, live=True):
        if time.monotonic() > deadline:
            return False
        for pid in processes:
            with contextlib.suppress(OSError):
                os.kill(pid, signal.SIGKILL)
        time.sleep(0.002)
    return True


def wait_idle(uid: int, timeout: float = 2.0) -> bool:
    """Wait until ``uid`` has no processes, zombies included, so that a run's process limit
    counts only its own; False after ``timeout``. Zombies of killed runs are reaped by the
    system's init, which may take a moment; rotating uids (``UIDS_PER_WORKER``) hides that."""
    deadline = time.monotonic() + timeout
    while user_processes(uid):
        if time.monotonic() > deadline:
            return False
        time.sleep(0.005)
    return True


def _open_to_all(path: str) -> bool:
    """A real (not symlinked) folder that every user may write in."""
    try:
        info = os.lstat(path)
    except OSError:
        return False
    return stat.S_ISDIR(info.st_mode) and bool(info.st_mode & stat.S_IWOTH)


def remove_owned(uid: int, roots: tuple[str, ...] = SHARED_DIRS) -> list[str]:
    """As root: delete every file and folder owned by ``uid`` under ``roots``; returns what was
    deleted. A uid can only create entries in world-writable folders and in its own, so only
    those are searched (deleting a folder of its own takes everything under it)."""
    removed: list[str] = []
    for root in roots:
        if not os.path.isdir(root) or os.path.islink(root):
            continue
        for parent, dirs, files in os.walk(root):
            for name in list(dirs) + files:
                path = os.path.join(parent, name)
                try:
                    info = os.lstat(path)
                except OSError:
                    continue
                if info.st_uid == uid:
                    if stat.S_ISDIR(info.st_mode):
                        shutil.rmtree(path, ignore_errors=True)
                    else:
                        with contextlib.suppress(OSError):
                            os.unlink(path)
                    removed.append(path)
            dirs[:] = [d for d in dirs if _open_to_all(os.path.join(parent, d))]
    return removed


class UidLeases:
    """``count`` uids at or above ``base`` that no other lease holder on this machine uses,
    held through lock files in a root-only directory until :meth:`release` (or exit)."""

    def __init__(self, base: int, count: int) -> None:
        self.directory = Path(tempfile.gettempdir(), "unmask-sandbox-uids")
        self.directory.mkdir(mode=0o700, exist_ok=True)
        info = self.directory.lstat()
        if info.st_uid != os.geteuid() or info.st_mode & 0o077:
            raise RuntimeError(f"{self.directory} must be a directory only this user can use")
        self._files: list[int] = []
        self.uids: list[int] = []
        for uid in range(base, base + UID_SEARCH):
            if len(self.uids) == count:
                return
            fd = os.open(self.directory / str(uid), os.O_CREAT | os.O_RDWR, 0o600)
            try:
                fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
            except BlockingIOError:
                os.close(fd)
                continue
            self._files.append(fd)
            self.uids.append(uid)
        self.release()
        raise RuntimeError(f"no {count} free sandbox uids in {base}..{base + UID_SEARCH}")

    def release(self) -> None:
        """Give back the leased uids (closing their lock files)."""
        for fd in self._files:
            with contextlib.suppress(OSError):
                os.close(fd)
        self._files, self.uids = [], []
