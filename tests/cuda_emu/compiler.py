"""CUDA C source -> a host shared library (g++ against emu.h), cached on disk by the hash of what is compiled.

translate(code, include_dirs)   the C++ text: local #includes inlined (with #line markers, so g++ errors
                                name the original file and line), comments blanked, __shared__ declarations
                                rewritten into emu.h calls, and one ``emu_body_<kernel>`` export per kernel
parse_kernels(code)             {kernel: [Param]} of the ``extern "C" __global__`` functions
build(code, options)            path of the compiled .so (compiled once; reused by every later session)
build_many(jobs)                the same for several sources at once, compiled in parallel

The cache lives under the system temp dir (``nemo_scratch_cuda_emu_<uid>/<sha256>.so``); the key covers the
translated text, emu.h and emu_fibers.h, the g++ flags and the g++ version. Nothing here imports cupy or touches a GPU.
"""

import functools
import hashlib
import os
import re
import shutil
import subprocess
import tempfile
from dataclasses import dataclass
from pathlib import Path

HERE = Path(__file__).resolve().parent
EMU_H = HERE / "emu.h"
CACHE_DIR = Path(tempfile.gettempdir()) / f"nemo_scratch_cuda_emu_{os.getuid()}"
# -O1: fast enough to run, quick to compile. No fast-math, no FMA contraction: fmaf is the only fused op.
GXX_FLAGS = ("-std=c++17", "-O1", "-g0", "-shared", "-fPIC", "-fno-strict-aliasing", "-ffp-contract=off",
             "-fno-fast-math", "-Wno-unknown-pragmas")

# C parameter type -> numpy dtype name (pointers point to arrays of it; scalars must be a numpy scalar of it).
C_TYPES = {"float": "float32", "double": "float64", "int": "int32", "unsigned int": "uint32",
           "unsigned": "uint32", "long long": "int64", "long long int": "int64", "unsigned long long": "uint64",
           "unsigned char": "uint8", "signed char": "int8", "char": "int8", "short": "int16",
           "unsigned short": "uint16", "bool": "bool"}


class EmulatorError(RuntimeError):
    """A kernel source the emulator cannot build, or a launch it refuses or that fails."""


@dataclass(frozen=True)
class Param:
    name: str
    ctype: str      # the base type, e.g. "float" for "const float* __restrict__ x"
    pointer: bool
    dtype: str      # numpy dtype name of C_TYPES[ctype]


def gxx():
    """The g++ executable; EmulatorError (a failure, never a skip) when it is missing."""
    path = shutil.which(os.environ.get("CXX", "g++")) or shutil.which("g++")
    if path is None:
        raise EmulatorError("g++ not found: the CUDA emulator (tests/cuda_emu) compiles kernels_cuda/*.cu with "
                            "g++ (Debian/Ubuntu: apt-get install g++), or set CXX")
    return path


def _blank_comments(text):
    """Comments -> spaces (newlines kept, so line numbers stay right)."""
    return re.sub(r"//[^\n]*|/\*.*?\*/", lambda m: re.sub(r"[^\n]", " ", m.group(0)), text, flags=re.DOTALL)


def _inline_includes(text, name, include_dirs, seen):
    """Replace each #include "local.h" found in include_dirs by its text (once per file, as #pragma once)."""
    out = [f'#line 1 "{name}"']
    for number, line in enumerate(_blank_comments(text).split("\n"), start=1):
        m = re.match(r'\s*#\s*include\s+"([^"]+)"', line)
        path = next((Path(d) / m.group(1) for d in include_dirs if (Path(d) / m.group(1)).is_file()), None) if m \
            else None
        if path is None:
            out.append(line)
            continue
        if path.resolve() not in seen:
            seen.add(path.resolve())
            out.append(_inline_includes(path.read_text(), str(path), include_dirs, seen))
        out.append(f'#line {number + 1} "{name}"')
    return "\n".join(out)


_TYPE = r"[A-Za-z_][\w:<>, ]*?"


def _rewrite_shared(code):
    """__shared__ declarations (inside functions) -> the emulator's per-block shared memory (emu_fibers.h)."""
    code = re.sub(r"__align__\s*\([^)]*\)", "", code)

    def in_function(m):
        if code.count("{", 0, m.start()) == code.count("}", 0, m.start()):
            raise EmulatorError(f"__shared__ at namespace scope ({m.group(0)!r}) is not emulated: declare it "
                                "inside the kernel or device function")

    def dynamic(m):
        in_function(m)
        return f"{m.group(1)}* const {m.group(2)} = reinterpret_cast<{m.group(1)}*>(emu::dynamic_smem());"

    def static(m):  # the address of a function-local static names the declaration (one per instantiation)
        in_function(m)
        ctype, name, dims = m.group(1), m.group(2), re.sub(r"\s+", "", m.group(3))
        ref = f"(&{name}){dims}" if dims else f"&{name}"
        return (f"static char emu_key_{name}; {ctype} {ref} = *reinterpret_cast<{ctype}(*){dims}>("
                f"emu::static_smem(&emu_key_{name}, sizeof({ctype}{dims})));")

    code = re.sub(rf"extern\s+__shared__\s+({_TYPE})\s+(\w+)\s*\[\s*\]\s*;", dynamic, code)
    return re.sub(rf"__shared__\s+({_TYPE})\s+(\w+)\s*((?:\[[^\]]+\]\s*)*);", static, code)


def parse_kernels(code):
    """{name: [Param, ...]} of every ``extern "C" __global__ void name(...)`` (comments ignored)."""
    kernels = {}
    pattern = r'extern\s+"C"\s+__global__\s+void\s+(?:__launch_bounds__\s*\([^)]*\)\s*)?(\w+)\s*\(([^)]*)\)'
    for m in re.finditer(pattern, _blank_comments(code)):
        params = []
        for text in filter(str.strip, m.group(2).split(",")):
            words = text.replace("*", " * ").replace("&", " & ").split()
            words = [w for w in words if w not in ("const", "volatile", "__restrict__", "__restrict")]
            pointer = words.count("*")
            name, ctype = words[-1], " ".join(w for w in words[:-1] if w != "*")
            if ctype not in C_TYPES or pointer > 1 or "&" in words:
                raise EmulatorError(f"kernel {m.group(1)}: parameter {text.strip()!r} has a type the emulator "
                                    f"does not pass (supported: {sorted(C_TYPES)} and pointers to them)")
            params.append(Param(name, ctype, bool(pointer), C_TYPES[ctype]))
        kernels[m.group(1)] = params
    return kernels


def translate(code, include_dirs=()):
    """The C++ translation unit for ``code`` (see the module docstring)."""
    text = _rewrite_shared(_inline_includes(code, "<RawModule code>", list(include_dirs), set()))
    glue = [f'extern "C" void emu_body_{k}(void** args) {{ emu::invoke({k}, args); }}' for k in parse_kernels(code)]
    return text + "\n\n// ---- emulator exports\n" + "\n".join(glue) + "\n"


def gxx_command(options):
    """(g++ argv without input/output, include dirs) for CuPy RawModule ``options``."""
    includes, defines = [], []
    for opt in options:
        if opt.startswith("-I"):
            includes.append(opt[2:])
        elif opt.startswith("-D"):
            defines.append(opt)
        elif opt.startswith("-std="):
            if opt != "-std=c++17":
                raise EmulatorError(f"RawModule option {opt!r}: the emulator compiles as C++17 only")
        else:
            raise EmulatorError(f"RawModule option {opt!r} is not emulated (fast-math and architecture flags "
                                "have no host equivalent)")
    return [gxx(), *GXX_FLAGS, *defines, "-I", str(HERE), "-include", str(EMU_H)], includes


@functools.cache
def _gxx_version(path):
    return subprocess.run([path, "--version"], capture_output=True, text=True, check=True).stdout.split("\n")[0]


def _job(code, options):
    """(translated text, argv prefix, .so path) of one source."""
    argv, includes = gxx_command(options)
    text = translate(code, includes)
    version = _gxx_version(argv[0])
    headers = "".join(p.read_text() for p in sorted(HERE.glob("*.h")))   # emu.h, emu_fibers.h
    key = hashlib.sha256("\0".join([text, headers, " ".join(argv[1:]), version]).encode()).hexdigest()
    return text, argv, CACHE_DIR / f"{key[:32]}.so"


def build_many(jobs):
    """[(code, options)] -> [.so path]: every missing library is compiled, in parallel; errors raise."""
    planned = [_job(code, options) for code, options in jobs]
    CACHE_DIR.mkdir(parents=True, exist_ok=True)
    running = []
    for text, argv, so in {p[2]: p for p in planned}.values():
        if so.exists():
            continue
        src = so.with_suffix(f".{os.getpid()}.cpp")
        src.write_text(text)
        tmp = so.with_suffix(f".{os.getpid()}.tmp")
        proc = subprocess.Popen([*argv, str(src), "-o", str(tmp)], stdout=subprocess.PIPE, stderr=subprocess.STDOUT,
                                text=True)
        running.append((proc, src, tmp, so))
    errors = []
    for proc, src, tmp, so in running:
        log = proc.communicate()[0]
        if proc.returncode != 0:
            errors.append(f"g++ failed on {src} (the translated kernel source):\n{log[-4000:]}")
            continue
        os.replace(tmp, so)   # atomic: parallel sessions never load a half-written library
        src.unlink()
    if errors:
        raise EmulatorError("\n\n".join(errors))
    return [so for _, _, so in planned]


def build(code, options):
    """The .so path of one source (see build_many)."""
    return build_many([(code, options)])[0]
