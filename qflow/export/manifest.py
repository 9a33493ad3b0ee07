"""File digests of an export directory: what was written, so verify can tell what changed.

``qflow export`` stores :func:`digest_files` of the finished export in ``export.json``
under ``"files"``, right before writing ``export.json`` itself; the verify command
recomputes them with :func:`check_files`. Files created after the export (verify's own
report and log, the shared library that C simulation builds, Python's bytecode caches)
are not in the list, so they are never compared. The digests catch files that changed
or went missing; they are not a signature: whoever can edit the folder can edit
``export.json`` too.
"""

from __future__ import annotations

import os
from collections.abc import Iterable, Mapping
from fnmatch import fnmatchcase
from pathlib import Path, PurePosixPath

from qflow.sources import file_sha256

#: relative POSIX paths (``fnmatch`` patterns; ``*`` also matches ``/``) never digested:
#: files written after the digests are taken, and files that change by themselves
DIGEST_SKIP: tuple[str, ...] = (
    "export.json",  # holds the digests
    "verify.json",  # verify's report
    "csim.log",  # verify's C-simulation log
    ".*", "*/.*",  # hidden files and folders: lock and temporary files
    "__pycache__/*", "*/__pycache__/*",  # bytecode Python writes when it imports run.py
    # hls4ml's compile() (build_lib.sh) writes firmware/<project>-<stamp>.so and, while
    # it runs (left behind if g++ fails), <project>.o and <project>_bridge.o
    "hls/firmware/*.so", "hls/*.o",
)

def file_digest(path: Path) -> str:
    """sha256 (hex) of one file's bytes."""
    return file_sha256(path)


def skipped(relative: str, skip: Iterable[str] = DIGEST_SKIP) -> bool:
    """Whether the relative POSIX path matches one of the ``skip`` patterns."""
    return any(fnmatchcase(relative, pattern) for pattern in skip)


def digest_files(directory: Path, *, skip: Iterable[str] = DIGEST_SKIP) -> dict[str, str]:
    """Relative POSIX path -> sha256 hex of every regular file under ``directory``, sorted
    by path. Symbolic links are not followed and not listed; paths matching a ``skip``
    pattern (default :data:`DIGEST_SKIP`) are left out.

    >>> import tempfile
    >>> with tempfile.TemporaryDirectory() as d:
    ...     _ = (Path(d) / "model.int.onnx").write_bytes(b"abc")
    ...     _ = (Path(d) / "export.json").write_text("{}")
    ...     digest_files(Path(d))
    {'model.int.onnx': 'ba7816bf8f01cfea414140de5dae2223b00361a396177a9cb410ff61f20015ad'}
    """
    directory = Path(directory)
    skip = tuple(skip)
    found = {}
    for root, dirs, files in os.walk(directory):
        dirs.sort()
        for name in files:
            path = Path(root) / name
            relative = path.relative_to(directory).as_posix()
            if path.is_symlink() or not path.is_file() or skipped(relative, skip):
                continue
            found[relative] = file_digest(path)
    return dict(sorted(found.items()))


def check_files(directory: Path, expected: Mapping[str, str]) -> tuple[dict, dict]:
    """Recompute the digest of every file in ``expected`` (relative path -> sha256 hex).

    Returns (digests found: path -> sha256 hex or ``None`` when the file is missing or
    not a regular file, problems: path -> ``"changed"`` or ``"missing"``), both sorted.
    """
    directory = Path(directory)
    found, problems = {}, {}
    for relative in sorted(expected):
        path = directory / PurePosixPath(relative)
        if path.is_symlink() or not path.is_file():
            found[relative], problems[relative] = None, "missing"
            continue
        found[relative] = file_digest(path)
        if found[relative] != expected[relative]:
            problems[relative] = "changed"
    return found, problems


def owner(relative: str, artifacts: Mapping[str, str]) -> str | None:
    """The artifact kind whose path is ``relative`` or a folder holding it, else None.

    >>> owner("hls/firmware/weights/w2.h", {"int_onnx": "model.int.onnx", "hls_csim": "hls"})
    'hls_csim'
    """
    for kind, path in artifacts.items():
        top = PurePosixPath(path).as_posix().rstrip("/")
        if relative == top or relative.startswith(top + "/"):
            return kind
    return None
