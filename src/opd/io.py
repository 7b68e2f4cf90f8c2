"""Atomic writes of files and folders: one appears under its final name only once it is
complete, so a killed process never leaves a half-written result that looks finished. Also the one format of
the numbers people read in reports, cards and summaries (`fmt`)."""

from __future__ import annotations

import contextlib
import json
import os
import shutil
import urllib.parse
from collections.abc import Callable, Iterable, Iterator, Mapping
from pathlib import Path
from typing import Any

from opd.errors import OPDError


def _writable(folder: Path) -> bool:
    """Whether this process may create files in `folder` (a separate function so that tests
    running as root, whom permissions do not bind, can stand in for a read-only folder)."""
    return os.access(folder, os.W_OK | os.X_OK)


def check_output_folder(path: str | Path, field: str, flag: str | None = None) -> None:
    """Refuse, before anything is written, an output folder that is a file, would lie under a
    file, or cannot be written; `field` is the setting that named it (e.g. `out`), `flag` how
    the user gives it (default: --field)."""
    path = Path(path)
    flag = flag or "--" + field.replace("_", "-")
    if path.exists() and not path.is_dir():
        raise OPDError(f"{field}: {str(path)!r} is a file, not a folder; choose a folder path "
                       f"for {flag} (nothing was written)")
    existing = path
    while not existing.exists() and existing != existing.parent:
        existing = existing.parent
    if not existing.is_dir():
        raise OPDError(f"{field}: {str(existing)!r} is a file, so {str(path)!r} cannot be made "
                       f"under it; choose another {flag} (nothing was written)")
    if not _writable(existing):
        raise OPDError(f"{field}: cannot write in {str(existing)!r} (permission denied); choose "
                       f"a writable {flag} or fix the folder's permissions (nothing was written)")


def write_atomic(path: Path, write: Callable[[Path], None]) -> None:
    """Call `write(tmp)` on a temporary name beside `path`, then rename it to `path`."""
    path = Path(path)
    tmp = path.with_name(f".{path.name}.tmp{os.getpid()}{path.suffix}")
    try:
        write(tmp)
        tmp.replace(path)
    finally:
        tmp.unlink(missing_ok=True)


def remove_folder(folder: Path) -> None:
    """Rename `folder` out of the way, then delete it: a kill half-way through never leaves a
    half-deleted folder under its name."""
    if folder.exists():
        trash = folder.with_name(folder.name + ".old")
        shutil.rmtree(trash, ignore_errors=True)
        folder.rename(trash)
        shutil.rmtree(trash, ignore_errors=True)


@contextlib.contextmanager
def atomic_folder(final: Path, begun: Path | None = None) -> Iterator[Path]:
    """A folder to build in, renamed to `final` (replacing what is there) once the block ends
    without an error; on an error it is removed and `final` is left as it was. It is the
    hidden sibling `.NAME.tmp`, emptied first (a killed attempt's leftovers go), or `begun`: a
    temporary folder already started, e.g. by other processes."""
    final = Path(final)
    tmp = begun if begun is not None else final.with_name(f".{final.name}.tmp")
    if begun is None:
        shutil.rmtree(tmp, ignore_errors=True)
        tmp.mkdir(parents=True)
    try:
        yield tmp
        remove_folder(final)
        tmp.rename(final)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)


def write_text_atomic(path: Path, text: str) -> None:
    write_atomic(path, lambda tmp: tmp.write_text(text, encoding="utf-8"))


def write_jsonl_atomic(path: Path, rows: Iterable[dict[str, Any]]) -> None:
    """One JSON object per line."""
    write_text_atomic(path, "".join(json.dumps(row) + "\n" for row in rows))


def read_jsonl(path: Path) -> list[dict[str, Any]]:
    """The JSON objects of a .jsonl file, one per non-empty line."""
    return [json.loads(line) for line in Path(path).read_text(encoding="utf-8").splitlines()
            if line.strip()]


def fmt(value: Any, spec: str = ".3f") -> str:
    """A value as people read it in a table or a summary: – for None, yes/no for a bool,
    floats with `spec`."""
    if value is None:
        return "–"
    if isinstance(value, bool):
        return "yes" if value else "no"
    if isinstance(value, float):
        return format(value, spec)
    return str(value)


def is_url(teacher: str) -> bool:
    """Whether a `teacher` setting names a served teacher rather than a model folder."""
    return teacher.startswith(("http://", "https://"))


def _url_flaw(url: str) -> str | None:
    """What makes an http(s) `url` unusable as a served teacher's address (None: nothing)."""
    parts = urllib.parse.urlsplit(url)
    if not parts.hostname:
        return "it names no host"
    try:
        _ = parts.port  # parsed on access
    except ValueError:
        return "its port is not a number from 0 to 65535"
    return None


def check_teacher_urls(teachers: Mapping[str, str] | None = None, **named: str | None) -> None:
    """Refuse at once a teacher setting that starts like a URL but is not one (instead of
    retrying it as if the server were down). `named`: settings by name (`teacher=...`);
    `teachers`: the `teachers` mapping, reported as `teachers.<value>`."""
    fields = {**named, **{f"teachers.{value}": url for value, url in (teachers or {}).items()}}
    for field, url in fields.items():
        flaw = url and is_url(url) and _url_flaw(url)
        if flaw:
            raise OPDError(f"{field}: {url!r} is not a teacher URL ({flaw}); give the address "
                           f"`opd serve-teacher` prints, http://HOST:PORT (e.g. "
                           f"http://127.0.0.1:8000), or a model folder")
