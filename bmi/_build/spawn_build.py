"""cffi build of bmi._spawn: the Linux PD spawn path (csrc/spawn/spawn.c), all C from clone to exec,
and the socket maker (csrc/spawn/sockmaker.c) that makes the sockets handed to PDs in an empty network namespace.

The PD's pid 1 is a small static program, bmi-init (csrc/init/, with the
one cpio parser csrc/cpio/cpio.c), linked into the shim as bytes; the shim
runs it from a sealed memfd, so nothing but bmi's own installed files is
executed and it is covered by the TVL's self-measurement.
"""
import os
import shlex
import subprocess
import sysconfig

from cffi import FFI

_HERE = os.path.dirname(os.path.abspath(__file__))
_CSRC = os.path.relpath(os.path.normpath(os.path.join(_HERE, "..", "..", "csrc")))
_SPAWN, _INIT, _CPIO = (os.path.join(_CSRC, d) for d in ("spawn", "init", "cpio"))


def _build_init() -> str:
    """Compile bmi-init (static: a PD has no libraries) and return its absolute path."""
    out_dir = os.path.join(_HERE, "..", "..", "build")
    os.makedirs(out_dir, exist_ok=True)
    out = os.path.abspath(os.path.join(out_dir, "bmi-init"))
    cc = shlex.split(sysconfig.get_config_var("CC") or "cc")
    cmd = [*cc, "-static", "-O2", "-Wall", "-Wextra", "-I", _INIT, "-I", _SPAWN, "-I", _CPIO, "-o", out + ".tmp",
           os.path.join(_INIT, "init.c"), os.path.join(_CPIO, "cpio.c")]
    done = subprocess.run(cmd, capture_output=True, text=True)
    if done.returncode != 0:
        raise RuntimeError(f"building bmi-init failed (a static libc is needed: Debian libc6-dev):\n"
                           f"{shlex.join(cmd)}\n{done.stderr}")
    os.replace(out + ".tmp", out)
    return out


with open(os.path.join(_SPAWN, "spawn.h")) as f:
    # the header is the cdef, minus its #include lines
    _CDEF = "".join(line for line in f if not line.startswith("#include"))

# bmi-init's bytes, between bmi_init_image and bmi_init_image_end (hidden: not exported by the shim)
_EMBED = (
    '__asm__(".section .rodata\\n.balign 16\\n"\n'
    '        ".globl bmi_init_image\\n.hidden bmi_init_image\\nbmi_init_image:\\n"\n'
    f'        ".incbin \\"{_build_init()}\\"\\n"\n'
    '        ".globl bmi_init_image_end\\n.hidden bmi_init_image_end\\nbmi_init_image_end:\\n"\n'
    '        ".previous\\n");\n'
)

ffibuilder = FFI()
ffibuilder.cdef(_CDEF)
# bmi_spawn_args.progress: calls back into Python (bmi/drivers/linux/spawn.py), taking the GIL again
ffibuilder.cdef('extern "Python" int bmi_spawn_progress(void *, unsigned long long, unsigned long long);')
ffibuilder.set_source(
    "bmi._spawn",
    '#include "spawn.h"\n' + _EMBED,
    sources=[os.path.join(_SPAWN, "spawn.c"), os.path.join(_SPAWN, "sockmaker.c")],
    include_dirs=[_SPAWN, _INIT],
    extra_compile_args=["-O2", "-Wall", "-Wextra"],
)
