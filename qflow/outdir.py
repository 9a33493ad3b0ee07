"""Output directories: the one place that decides what qflow may write, replace and delete.

Every command that writes a directory (``qflow quantize``'s run, ``qflow export``'s
export folder) goes through :class:`OutputDirectory`. The rules:

- A directory qflow makes holds a marker file, ``.qflow``, naming its kind and the
  entries qflow wrote into it.
- An existing output that is not an empty directory is refused, unless ``force``; and
  ``force`` replaces only a directory with qflow's marker, of the same kind, whose every
  entry qflow made (a user's file inside makes it refuse). The current directory, the
  directories being read (the run an export reads) and their parents are never outputs.
- Work goes into a hidden sibling, ``.NAME.partial``, renamed into place when complete:
  a failure leaves nothing half-written, and a killed ``qflow quantize`` leaves its last
  per-epoch checkpoint there for ``--resume``.
- One process per output: a lock file beside it, ``.NAME.lock`` (``flock``, released by
  the kernel when a process dies), taken before any work.
- Leftovers of killed processes beside the output (``.NAME.partial`` without saved
  progress, ``.NAME.old-*``, and the ``.NAME.tmp-*`` folders of earlier qflow versions)
  are reported and removed by the next process that holds the lock.

>>> import tempfile
>>> from pathlib import Path
>>> root = Path(tempfile.mkdtemp())
>>> out = OutputDirectory(root / "run", kind="run")
>>> with out.open() as stage:
...     _ = (stage / "result.txt").write_text("42")
...     _ = out.commit()
>>> sorted(p.name for p in (root / "run").iterdir())
['.qflow', 'result.txt']
>>> OutputDirectory(root / "run", kind="run").check()  # doctest: +ELLIPSIS
Traceback (most recent call last):
qflow.errors.QflowError: --out ... exists and is not empty (add --force ...)
"""

from __future__ import annotations

import contextlib
import errno
import fcntl
import json
import os
import re
import shutil
from collections.abc import Callable, Iterator, Sequence
from pathlib import Path

from qflow.errors import QflowError

MARKER = ".qflow"
#: entries that later commands add to a directory qflow made (verify's report and log)
LATER_ENTRIES = {
    "run": ("report.html",),
    "export": ("verify.json", ".verify.json.tmp", "csim.log", "report.html"),
}
_OLD_TMP = re.compile(r"\.tmp-[A-Za-z0-9_]{8}$")  # tempfile.mkdtemp's suffix (older qflow)


def _say_nothing(message: str) -> None:
    pass


def read_marker(directory: Path) -> dict | None:
    """The marker of a directory qflow made, or None when it has none (or a broken one)."""
    try:
        data = json.loads((Path(directory) / MARKER).read_text(encoding="utf-8"))
    except (OSError, ValueError, RecursionError):
        return None
    if not isinstance(data, dict) or not isinstance(data.get("entries"), list):
        return None
    return data


def write_marker(directory: Path, kind: str, *, complete: bool, **extra) -> None:
    """Write ``directory``'s marker listing its current entries."""
    from qflow import __version__

    directory = Path(directory)
    entries = sorted({p.name for p in directory.iterdir()} | {MARKER})
    data = {"kind": kind, "complete": complete, "qflow": __version__, "entries": entries,
            **extra}
    tmp = directory / f"{MARKER}.tmp"
    tmp.write_text(json.dumps(data, indent=2) + "\n", encoding="utf-8")
    tmp.replace(directory / MARKER)


def foreign_entry(directory: Path, kind: str) -> str | None:
    """The first entry of ``directory`` that qflow did not write (None if all are qflow's).

    An entry counts as qflow's when the marker lists it, when a later qflow command adds
    it (:data:`LATER_ENTRIES`), or when it is a complete qflow-made directory itself (an
    export inside its run), checked the same way.
    """
    marker = read_marker(directory)
    if marker is None:
        return "(no qflow marker)"
    known = set(marker["entries"]) | set(LATER_ENTRIES.get(kind, ()))
    for entry in sorted(Path(directory).iterdir(), key=lambda p: p.name):
        if entry.name in known:
            continue
        inner = read_marker(entry) if entry.is_dir() and not entry.is_symlink() else None
        if inner is None or not inner.get("complete"):
            return entry.name
        nested = foreign_entry(entry, str(inner.get("kind")))
        if nested is not None:
            return f"{entry.name}/{nested}"
    return None


def _is_within(path: Path, other: Path) -> bool:
    """True when ``path`` is ``other`` or inside it (both resolved)."""
    return path == other or other in path.parents


class OutputDirectory:
    """A directory a command writes, under the rules in this module's docstring.

    ``check()`` only reads (call it before expensive work, so that bad output options fail
    at once and write nothing); ``open()`` takes the lock, cleans leftovers and yields
    the staging directory; ``commit()`` moves the staged result into place.
    ``protect`` lists directories being read: the output may not be one of them or hold
    one of them.
    """

    def __init__(self, final: str | Path, *, kind: str, force: bool = False,
                 protect: Sequence[Path] = (), report: Callable[[str], None] = _say_nothing):
        self.given = Path(final)
        self.final = Path(os.path.abspath(final))
        self.kind = kind
        self.force = force
        self.protect = [Path(p).resolve() for p in protect]
        self.report = report
        name = self.final.name
        self.stage = self.final.parent / f".{name}.partial"
        self.lock_path = self.final.parent / f".{name}.lock"
        self._lock_fd: int | None = None
        self._made_parents: list[Path] = []
        self._committed = False
        self._stage_is_ours = False
        self.resumed = False

    # -- checks (read only) ------------------------------------------------------------
    def check(self) -> None:
        """Refuse an output that would overwrite or delete what qflow did not make."""
        given, final = self.given, self.final
        if not final.name or final == Path(final.anchor):
            raise QflowError(f"--out {given} is not a directory qflow can create")
        resolved = final.resolve()
        cwd = Path.cwd().resolve()
        if _is_within(cwd, resolved):
            raise QflowError(f"--out {given} is the current directory or holds it; "
                             "name a new directory")
        for protected in self.protect:
            if _is_within(protected, resolved):
                what = "is" if protected == resolved else "holds"
                raise QflowError(f"--out {given} {what} the run being read ({protected}); "
                                 "write the output elsewhere")
        if final.is_symlink():
            raise QflowError(f"--out {given} is a symbolic link; name a real directory")
        if final.exists() and not final.is_dir():
            raise QflowError(f"--out {given} exists and is not a directory")
        if final.is_dir() and any(final.iterdir()):
            self._check_replaceable()
        parent = self._existing_parent()
        if not parent.is_dir():
            raise QflowError(f"cannot create --out {given}: {parent} is not a directory")
        if not os.access(parent, os.W_OK | os.X_OK):
            raise QflowError(f"cannot write to {parent}: permission denied")
        if final.is_dir() and not os.access(final, os.W_OK | os.X_OK):
            raise QflowError(f"cannot write to {given}: permission denied")

    def _check_replaceable(self) -> None:
        given = self.given
        if not self.force:
            raise QflowError(f"--out {given} exists and is not empty (add --force to replace "
                             f"it, if qflow wrote it)")
        marker = read_marker(self.final)
        if marker is None:
            raise QflowError(f"--force will not replace {given}: qflow did not make it "
                             f"(no {MARKER} marker); remove it yourself or choose another "
                             f"--out")
        if marker.get("kind") != self.kind:
            raise QflowError(f"--force will not replace {given}: it is a qflow "
                             f"{marker.get('kind')}, not a {self.kind}")
        foreign = foreign_entry(self.final, self.kind)
        if foreign is not None:
            raise QflowError(f"--force will not replace {given}: it holds {foreign!r}, which "
                             "qflow did not write")

    def _existing_parent(self) -> Path:
        parent = self.final.parent
        while not parent.exists() and parent != parent.parent:
            parent = parent.parent
        return parent

    # -- lock, leftovers, staging --------------------------------------------------------
    @contextlib.contextmanager
    def open(self, *, resume: bool = False,
             keep_progress_on: tuple[type[BaseException], ...] = ()) -> Iterator[Path]:
        """Check, lock, clean leftovers and yield the staging directory.

        The staging directory is fresh, or with ``resume`` the one an interrupted run
        left when it saved progress (without any, ``resume`` starts fresh). It is removed
        when the block raises, unless it holds saved progress (:meth:`mark_progress`) and
        the exception is one of ``keep_progress_on`` (an interrupted run keeps its progress
        for ``--resume``). The lock is released either way. Call :meth:`commit` inside
        the block; :attr:`resumed` says which kind of staging directory was given.
        """
        self.check()
        self._make_parents()
        try:
            self._lock()
            try:
                self.check()  # again under the lock: another process may have written it
                self.resumed = bool(resume and self.staged_progress())
                self._clean_leftovers(keep_stage=self.resumed)
                stage = self.stage if self.resumed else self._fresh_stage()
                self._stage_is_ours = True
                yield stage
                if not self._committed:
                    raise RuntimeError("OutputDirectory.open() block ended without commit()")
            except BaseException as exc:
                keep = isinstance(exc, keep_progress_on) and self.staged_progress()
                if self._stage_is_ours and not self._committed and not keep:
                    shutil.rmtree(self.stage, ignore_errors=True)
                raise
            finally:
                self._unlock()
        except BaseException:
            self._remove_made_parents()
            raise

    def staged_progress(self) -> str | None:
        """The saved progress an interrupted run left in the staging directory, or None."""
        marker = read_marker(self.stage)
        if marker is None or marker.get("kind") != self.kind or marker.get("complete"):
            return None
        return marker.get("progress") or None

    @contextlib.contextmanager
    def locked(self) -> Iterator[None]:
        """Hold this output's lock while reading or adding to it (``qflow verify``), so
        that no other qflow process replaces it meanwhile. Where the parent directory is
        read-only no writer can exist, and the block runs without the lock."""
        try:
            self._lock()
        except QflowError:
            if os.access(self.final.parent, os.W_OK):
                raise
        try:
            yield
        finally:
            self._unlock()

    def _make_parents(self) -> None:
        missing = []
        parent = self.final.parent
        while not parent.exists():
            missing.append(parent)
            parent = parent.parent
        for path in reversed(missing):
            try:
                path.mkdir()
            except FileExistsError:
                continue
            except OSError as exc:
                self._remove_made_parents()
                raise QflowError(f"cannot create {path}: {exc.strerror}") from None
            self._made_parents.append(path)

    def _remove_made_parents(self) -> None:
        for path in reversed(self._made_parents):
            try:
                path.rmdir()  # only while empty: another process may have used it since
            except OSError:
                break
        self._made_parents = []

    def _lock(self) -> None:
        while True:
            try:
                fd = os.open(self.lock_path, os.O_RDWR | os.O_CREAT, 0o644)
            except OSError as exc:
                raise QflowError(f"cannot write to {self.final.parent}: {exc.strerror}") from None
            try:
                fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
            except OSError as exc:
                os.close(fd)
                if exc.errno in (errno.EWOULDBLOCK, errno.EAGAIN):
                    raise QflowError(f"another qflow process is working on {self.given} "
                                     f"(lock {self.lock_path.name} is held); wait for it to "
                                     "finish") from None
                raise
            # The holder before us may have removed the file after we opened it: then
            # our lock is on a deleted file and protects nothing; take a fresh one.
            try:
                same = os.fstat(fd).st_ino == os.stat(self.lock_path).st_ino
            except FileNotFoundError:
                same = False
            if same:
                self._lock_fd = fd
                return
            os.close(fd)

    def _unlock(self) -> None:
        if self._lock_fd is None:
            return
        with contextlib.suppress(OSError):
            self.lock_path.unlink()  # while still holding it, see _lock
        os.close(self._lock_fd)
        self._lock_fd = None

    def _clean_leftovers(self, keep_stage: bool = False) -> None:
        """Remove what killed processes left beside the output (we hold the lock)."""
        parent, name = self.final.parent, self.final.name
        stage_marker = read_marker(self.stage)
        if stage_marker is not None and not keep_stage:
            if stage_marker.get("complete") and not self.final.exists():
                self.stage.rename(self.final)  # killed between the two renames of commit
                self.report(f"note: finished moving a completed {self.kind} into {self.given}")
            elif stage_marker.get("progress"):
                if not self.force:
                    raise QflowError(
                        f"{self.given} has an interrupted run ({stage_marker['progress']}): "
                        "add --resume to continue it, or --force to start over")
                self._remove(self.stage, "the interrupted run's saved progress")
            else:
                self._remove(self.stage, "an unfinished output of a killed process")
        elif self.stage.exists() and stage_marker is None and not keep_stage:
            raise QflowError(f"{self.stage} is in the way and qflow did not make it; "
                             "remove it yourself")
        for entry in parent.iterdir():
            if not entry.name.startswith(f".{name}."):
                continue
            rest = entry.name[len(name) + 1:]
            old = rest.startswith(".old-") and read_marker(entry) is not None
            older_tmp = _OLD_TMP.fullmatch(rest) is not None and entry.is_dir()
            if old or older_tmp:
                self._remove(entry, "a leftover of a killed process")

    def _remove(self, path: Path, what: str) -> None:
        self.report(f"note: removing {path.name}: {what}")
        shutil.rmtree(path, ignore_errors=True)

    def _fresh_stage(self) -> Path:
        try:
            self.stage.mkdir()
        except OSError as exc:
            raise QflowError(f"cannot write to {self.final.parent}: {exc.strerror}") from None
        umask = os.umask(0)
        os.umask(umask)
        self.stage.chmod(0o777 & ~umask)
        write_marker(self.stage, self.kind, complete=False)
        return self.stage

    def mark_progress(self, description: str) -> None:
        """Record in the staging marker that it holds resumable progress."""
        write_marker(self.stage, self.kind, complete=False, progress=description)

    def commit(self) -> Path:
        """Mark the staged directory complete and move it to the final path, replacing
        the (already checked) directory there."""
        write_marker(self.stage, self.kind, complete=True)
        old = None
        if self.final.exists():
            if any(self.final.iterdir()):
                inner = sorted(p.name for p in self.final.iterdir()
                               if p.is_dir() and read_marker(p) is not None)
                self.report(f"note: replacing {self.given}" + (
                    f" and what qflow wrote into it ({', '.join(inner)})" if inner else ""))
                old = self.final.parent / f".{self.final.name}.old-{os.getpid()}"
                self.final.rename(old)
            else:
                self.final.rmdir()
        self.stage.rename(self.final)
        if old is not None:
            shutil.rmtree(old, ignore_errors=True)
        self._committed = True
        return self.final
