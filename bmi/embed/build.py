"""Build libbmi.so: bmi.h's calls as a shared library whose implementation is bmi's Python (cffi embedding).

Not one of bmi/_build/*_build.py: those are extension modules Python
imports; this is a library C programs link, built by setup.py's build_ext
(into the wheel) and by `python -m bmi.embed.build` (in place, for a
checkout).  It links this interpreter's libpython, so a wheel carrying it
is tagged for this CPython only.

    python -m bmi.embed.build [--out DIR] [--python PATH]

--python names the interpreter whose environment (a checkout's venv) the
embedded one takes, written to libbmi.python next to the library.  An
installed wheel needs none: libbmi.so in PREFIX/lib/pythonX.Y/site-packages
takes PREFIX/bin/python3.
"""
from __future__ import annotations

import argparse
import os
import re
import shutil
import sysconfig
import tempfile

HERE = os.path.dirname(os.path.abspath(__file__))
HEADER = os.path.join(HERE, "bmi.h")
LIBRARY = "libbmi.so"
PYTHON_FILE = "libbmi.python"
#: Implemented in C (no interpreter needed): reading the error must work when starting Python failed.
C_FUNCTIONS = ("bmi_last_error_code", "bmi_last_error", "bmi_free")
MESSAGE_MAX = 2048

_C_SOURCE = r"""
#include <dlfcn.h>
#include <limits.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <unistd.h>
#include "bmi.h"

#define BMI_EXPORT __attribute__((visibility("default")))

static __thread int bmi__code;
static __thread char bmi__message[%(max)d];

BMI_EXPORT int bmi_last_error_code(void) { return bmi__code; }
BMI_EXPORT const char *bmi_last_error(void) { return bmi__message; }
BMI_EXPORT void bmi_free(void *p) { free(p); }

static void bmi__set_error(int code, const char *message)
{
    bmi__code = code;
    strncpy(bmi__message, message, sizeof bmi__message - 1);
    bmi__message[sizeof bmi__message - 1] = 0;
}

/* A malloc'ed copy the caller frees with bmi_free. */
static char *bmi__strdup(const char *s, size_t n)
{
    char *p = malloc(n + 1);
    if (p) { memcpy(p, s, n); p[n] = 0; }
    return p;
}

/* Where this library was loaded from: the embedded interpreter finds bmi next to it. */
static const char *bmi__self_path(void)
{
    Dl_info info;
    return dladdr((void *)bmi__self_path, &info) && info.dli_fname ? info.dli_fname : "";
}

/* Before cffi starts the interpreter, make it the one bmi is installed for: the python named
 * in libbmi.python next to this library (a checkout's venv), else PREFIX/bin/python3 when
 * this library is PREFIX/lib/pythonX.Y/site-packages/bmi/embed/libbmi.so.  Python finds
 * that program's pyvenv.cfg and site-packages as if it had been started as it. */
__attribute__((constructor)) static void bmi__choose_python(void)
{
    static wchar_t *program;
    char dir[PATH_MAX], python[PATH_MAX + 32] = "", prefix[PATH_MAX];
    if (Py_IsInitialized() || snprintf(dir, sizeof dir, "%%s", bmi__self_path()) >= (int)sizeof dir)
        return;
    char *slash = strrchr(dir, '/');
    if (!slash)
        return;
    *slash = 0;
    snprintf(python, sizeof python, "%%s/%(python_file)s", dir);
    FILE *f = fopen(python, "r");
    python[0] = 0;
    if (f) {
        if (fgets(python, sizeof python, f))
            python[strcspn(python, "\n")] = 0;
        fclose(f);
    } else {
        strncat(dir, "/../../../../..", sizeof dir - strlen(dir) - 1);
        if (realpath(dir, prefix))
            snprintf(python, sizeof python, "%%s/bin/python3", prefix);
    }
    if (python[0] && access(python, X_OK) == 0 && (program = Py_DecodeLocale(python, NULL)))
        Py_SetProgramName(program);
}
""" % {"max": MESSAGE_MAX, "python_file": PYTHON_FILE}

_HELPERS = """
void bmi__set_error(int code, const char *message);
char *bmi__strdup(const char *s, size_t n);
const char *bmi__self_path(void);
"""

_INIT_CODE = """
import os, sys
from _libbmi import ffi, lib
here = os.path.dirname(ffi.string(lib.bmi__self_path()).decode())
root = os.path.dirname(os.path.dirname(here))     # site-packages (a wheel) or the checkout
if root not in sys.path:
    sys.path.insert(0, root)
if not getattr(sys, "argv", None):
    sys.argv = ["libbmi"]
from bmi.embed import capi
capi.install(ffi, lib)
"""


def declarations(header: str = HEADER) -> tuple[str, str]:
    """bmi.h as cffi reads it: (types and constants, the functions Python implements)."""
    with open(header) as f:
        text = re.sub(r"/\*.*?\*/", "", f.read(), flags=re.S)
    defines, code = [], []
    for line in text.splitlines():
        match = re.match(r"#define\s+(BMI_\w+)\s+\(?(-?\d+)\)?\s*$", line)
        if match:
            defines.append(f"#define {match[1]} {match[2]}")
        elif line.strip() and not line.startswith(("#", "extern", "}")):
            code.append(line)
    types, functions = [], []
    for decl in " ".join(code).split(";"):
        decl = " ".join(decl.split())
        if not decl:
            continue
        if decl.startswith("typedef"):
            types.append(decl + ";")
        elif not any(re.search(rf"\b{name}\(", decl) for name in C_FUNCTIONS):
            functions.append(decl + ";")
    return "\n".join(defines + types), "\n".join(functions)


def builder():
    """The cffi FFI that makes libbmi.so."""
    from cffi import FFI
    types, functions = declarations()
    ffibuilder = FFI()
    ffibuilder.cdef(types + _HELPERS)
    ffibuilder.embedding_api(functions)
    ffibuilder.embedding_init_code(_INIT_CODE)
    libdir = sysconfig.get_config_var("LIBDIR")
    ffibuilder.set_source("_libbmi", _C_SOURCE, include_dirs=[HERE], library_dirs=[libdir],
                          extra_compile_args=["-O2", "-Wall", "-Wno-array-parameter", "-Wno-deprecated-declarations"],
                          extra_link_args=[f"-Wl,-rpath,{libdir}", "-ldl"])
    return ffibuilder


def build(out_dir: str = HERE, python: str | None = None) -> str:
    """Compile libbmi.so into out_dir (and libbmi.python when `python` is given); return its path."""
    os.makedirs(out_dir, exist_ok=True)
    with tempfile.TemporaryDirectory(prefix="libbmi-") as tmp:
        built = builder().compile(tmpdir=tmp, target=LIBRARY, verbose=False)
        target = os.path.join(out_dir, LIBRARY)
        # copy first (the temp dir may be another filesystem, e.g. /tmp on tmpfs), then rename
        # into place: a running program keeps the old inode
        shutil.copyfile(built, target + ".new")
        os.chmod(target + ".new", 0o755)
        os.replace(target + ".new", target)
    if python:
        with open(os.path.join(out_dir, PYTHON_FILE), "w") as f:
            f.write(python + "\n")
    return target


def main() -> None:
    parser = argparse.ArgumentParser(prog="python -m bmi.embed.build", description=__doc__.splitlines()[0])
    parser.add_argument("--out", default=HERE, help="where libbmi.so goes (default: next to bmi.h)")
    parser.add_argument("--python", help="the python (a venv's bin/python, not resolved) whose packages the "
                        "embedded interpreter uses; default: PREFIX/bin/python3 of the site-packages it is in")
    args = parser.parse_args()
    print(build(args.out, args.python))


if __name__ == "__main__":
    main()
