"""Reading an export directory's ``export.json`` for verify: every field is checked
before anything runs, and a bad one is a one-line :class:`QflowError` (exit code 2)."""

from __future__ import annotations

import re
from dataclasses import dataclass, field
from pathlib import Path, PurePosixPath

from qflow.errors import QflowError
from qflow.export import EXPORT_FILE, QGRAPH_FILE
from qflow.export.runners import RUNNERS
from qflow.jsonfile import read_json

_SHA256 = re.compile(r"[0-9a-f]{64}")


@dataclass(frozen=True)
class ExportInfo:
    """The checked contents of export.json; every path is relative to the export."""

    directory: Path
    #: artifact kind -> relative POSIX path, in export.json's order
    artifacts: dict[str, str]
    qgraph: str
    #: relative POSIX path -> sha256 hex, as recorded right after the export
    files: dict[str, str]
    data: str | None = None
    #: sha256 of the data set's arrays at export time (qflow.sources.dataset_sha256)
    data_sha256: str | None = None
    #: sys.path entries a ``module:function`` data spec is imported with
    data_search_path: list[str] | None = None
    run: str | None = None
    run_absolute: str | None = None
    raw: dict = field(default_factory=dict, repr=False)


def read_export(directory: Path) -> ExportInfo:
    """Read and check ``directory/export.json``; raise QflowError naming the problem."""
    directory = Path(directory)
    source = directory / EXPORT_FILE
    info = read_json(source, missing=f"{directory} is not an export directory "
                     f"({EXPORT_FILE} not found)")
    artifacts = info.get("artifacts")
    if not isinstance(artifacts, dict):
        raise QflowError(f"{source}: 'artifacts' must map each artifact kind to a path "
                         f"relative to the export directory, not {_kind(artifacts)}")
    for kind, path in artifacts.items():
        if kind not in RUNNERS:
            raise QflowError(f"{source}: unknown artifact kind {kind!r} (known: "
                             f"{', '.join(RUNNERS)})")
        _inside(directory, path, f"{source}: artifact {kind!r} path")
    qgraph = info.get("qgraph", QGRAPH_FILE)
    _inside(directory, qgraph, f"{source}: 'qgraph'")
    if not (directory / qgraph).is_file():
        raise QflowError(f"{directory / qgraph} not found: the export's QGraph is the "
                         "reference every artifact is compared with")
    files = info.get("files")
    if files is None:
        raise QflowError(f"{source} has no file digests ('files'): it was written by an "
                         "older qflow; export the run again with `qflow export`")
    if not isinstance(files, dict):
        raise QflowError(f"{source}: 'files' must map relative paths to sha256 digests, "
                         f"not {_kind(files)}")
    for path, digest in files.items():
        _inside(directory, path, f"{source}: 'files' entry")
        if not isinstance(digest, str) or not _SHA256.fullmatch(digest):
            raise QflowError(f"{source}: 'files' entry {path!r} is not a sha256 hex digest")
    strings = {}
    for key in ("data", "data_sha256", "run", "run_absolute"):
        value = info.get(key)
        if value is not None and not isinstance(value, str):
            raise QflowError(f"{source}: {key!r} must be a string, not {_kind(value)}")
        strings[key] = value or None
    search = info.get("data_search_path")
    if search is not None and not (isinstance(search, list)
                                   and all(isinstance(p, str) for p in search)):
        raise QflowError(f"{source}: 'data_search_path' must be a list of paths")
    return ExportInfo(directory, {k: _posix(v) for k, v in artifacts.items()}, _posix(qgraph),
                      {_posix(k): v for k, v in files.items()}, raw=info,
                      data_search_path=search, **strings)


def run_directory(info: ExportInfo) -> tuple[Path | None, str]:
    """(the run directory, '') when it is found, else (None, why not).

    export.json's ``run`` is tried relative to the export directory first, then
    ``run_absolute`` when export.json has it. A run directory holds ``run.json``.
    """
    tried = []
    for value in (info.run, info.run_absolute):
        if not value:
            continue
        path = Path(value) if Path(value).is_absolute() else info.directory / value
        if (path / "run.json").is_file():
            return path.resolve(), ""
        tried.append(str(path))
    if not tried:
        return None, f"{EXPORT_FILE} names no run directory"
    return None, f"run directory {' or '.join(tried)} not found"


def _inside(directory: Path, path, what: str) -> None:
    """A relative path that stays inside ``directory`` (symbolic links resolved)."""
    if not isinstance(path, str) or not path:
        raise QflowError(f"{what} must be a non-empty relative path, not {_kind(path)}")
    if Path(path).is_absolute() or PurePosixPath(path).is_absolute():
        raise QflowError(f"{what} {path!r} is absolute: paths in {EXPORT_FILE} are "
                         "relative to the export directory")
    root = directory.resolve()
    if not (root / path).resolve().is_relative_to(root):
        raise QflowError(f"{what} {path!r} resolves outside the export directory")


def _posix(path: str) -> str:
    return PurePosixPath(path).as_posix()


def _kind(value) -> str:
    return "nothing" if value is None else f"a {type(value).__name__}"
