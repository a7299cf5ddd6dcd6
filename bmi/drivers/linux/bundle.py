"""`bmi bundle`: a root archive for a dynamically linked host program.

The PD gets no host files, so a dynamic program needs its loader and
libraries inside its root.  We take what `ldd` lists for each executable,
keep every file at its host path, and make /init point at the program.
An interpreter also needs its library: for a Python that is its standard
library (<prefix>/lib/pythonX.Y without site-packages), found from the
program's own path as Python itself finds it.
"""
from __future__ import annotations

import os
import re
import stat
import subprocess
from typing import BinaryIO, Callable, Iterable

from ...errors import ImageError, InvalidArgument
from ..cpio import CpioWriter
from .formats import ELF_MAGIC


def _needs_libraries(path: str) -> bool:
    with open(path, "rb") as f:
        head = f.read(4)
    return head == ELF_MAGIC


def libraries(path: str) -> list[str]:
    """Absolute paths of the shared objects `ldd` says `path` loads (none for a static ELF)."""
    if not _needs_libraries(path):
        return []
    done = subprocess.run(["ldd", path], capture_output=True, text=True, check=False)
    if done.returncode != 0:
        if "not a dynamic executable" in done.stdout + done.stderr:
            return []
        raise ImageError(f"bundle: ldd {path} failed: {done.stderr.strip() or done.stdout.strip()}")
    found = []
    for line in done.stdout.splitlines():
        if "not found" in line:
            raise ImageError(f"bundle: {path} needs a library the host lacks: {line.strip()}")
        for word in line.split():
            if word.startswith("/"):
                found.append(word)
                break
    return found


#: Directories of an interpreter's library that hold installed packages, not the language's own library.
_NOT_STDLIB = frozenset({"site-packages", "dist-packages"})


def interpreter_library(program: str) -> list[str]:
    """The library an interpreter cannot start without: a Python's standard library, else nothing."""
    real = os.path.realpath(program)
    name = os.path.basename(real)
    if not re.fullmatch(r"python3\.\d+", name):
        return []
    stdlib = os.path.join(os.path.dirname(os.path.dirname(real)), "lib", name)
    if not os.path.isfile(os.path.join(stdlib, "os.py")):
        raise ImageError(f"bundle: {program} is a Python whose standard library is not at {stdlib}; "
                         f"add it with --add")
    return [stdlib]


def _walk(path: str) -> Iterable[str]:
    yield path
    if os.path.isdir(path) and not os.path.islink(path):
        for root, dirs, files in os.walk(path):
            dirs[:] = sorted(d for d in dirs if d not in _NOT_STDLIB)
            for name in dirs + sorted(files):
                yield os.path.join(root, name)


def _may_load_libraries(path: str) -> bool:
    """Programs and shared objects (a Python's extension modules need libssl, libz, ...)."""
    return os.path.isfile(path) and (os.access(path, os.X_OK) or ".so" in os.path.basename(path))


def bundle(executable: str, out: BinaryIO, *, extra: Iterable[str] = (),
           progress: Callable[[int, int], None] | None = None) -> list[str]:
    """Write a newc archive holding the program, its libraries (and an interpreter's), `extra` paths, and
    /init; progress(done, total) is called with the file bytes written."""
    program = os.path.abspath(executable)
    if not os.path.isfile(program) or not os.access(program, os.X_OK):
        raise InvalidArgument(f"bundle: {executable!r} is not an executable file")
    # path -> whether to store the file it points to (the program and the
    # libraries ldd names: their symlink targets would be missing) or the
    # entry as it is (what --add walks).
    paths: dict[str, bool] = {}
    for item in [program, *interpreter_library(program), *[os.path.abspath(p) for p in extra]]:
        if not os.path.lexists(item):
            raise InvalidArgument(f"bundle: {item!r} does not exist")
        for path in _walk(item):
            paths.setdefault(path, path == program)
            if _may_load_libraries(path):
                paths.update(dict.fromkeys(libraries(path), True))
    writer = CpioWriter(out)
    made: set[str] = set()

    def parents(path: str) -> None:
        parent = os.path.dirname(path)
        if parent != "/" and parent not in made:
            parents(parent)
            writer.directory(parent.lstrip("/"))
            made.add(parent)

    total = sum(os.stat(p).st_size if follow else os.lstat(p).st_size
                for p, follow in paths.items() if os.path.isfile(p))
    done = 0
    for path, follow in sorted(paths.items()):
        parents(path)
        if path in made:
            continue
        info = os.stat(path) if follow else os.lstat(path)
        name = path.lstrip("/")
        if stat.S_ISLNK(info.st_mode):
            writer.symlink(name, os.readlink(path))
        elif stat.S_ISDIR(info.st_mode):
            writer.directory(name, stat.S_IMODE(info.st_mode))
        elif stat.S_ISREG(info.st_mode):
            with open(path, "rb") as f:
                writer.file(name, f.read(), stat.S_IMODE(info.st_mode))
            done += info.st_size
            if progress is not None:
                progress(done, total)
        else:
            raise InvalidArgument(f"bundle: {path!r} is not a file, directory or symlink")
        made.add(path)
    writer.symlink("init", program)
    writer.close()
    return sorted(paths)
