"""What a starting Python process will run, from its command line: ``-c`` code, ``-m`` module or a script.

A process that opens files on a mount is known by its pid (FUSE tells), and ``/proc/<pid>``
says which program it executes, its arguments, its root and its working directory. For a
Python interpreter that is enough to know the program's first imports long before the
interpreter has started, loaded its libraries and reached them.

Reading ``/proc`` can fail at any moment (the process exits, lives in a pid namespace we do not
see): every failure means "nothing known", never an error.
"""

from __future__ import annotations

import os
import posixpath
import re
from dataclasses import dataclass

from fusefs.prefetch.python_imports import ImportStatement, source_imports

# The file name of a CPython interpreter binary (``python3.11``), with its major and minor version.
INTERPRETER_NAME = re.compile(r"^python(\d)\.(\d+)$")
# Interpreter options that take a value (the next argument, or the rest of this one).
_WITH_VALUE = frozenset("cmWXQ")
_MAX_CMDLINE = 64 << 10


@dataclass(frozen=True, slots=True)
class PythonLaunch:
    """A Python program being started: its interpreter version and what runs first."""

    version: tuple[int, int]
    directory: str  # sys.path[0], relative to the process's root: the script's directory, or the cwd
    statements: tuple[ImportStatement, ...] = ()  # the -c code's imports, or the -m module
    script: str | None = None  # the script's path relative to the process's root


def parse_command(exe_name: str, argv: list[str], cwd: str) -> PythonLaunch | None:
    """Read a Python command line (``cwd`` relative to the process's root); None if it is not one. Raises nothing."""
    match = INTERPRETER_NAME.match(exe_name)
    if match is None:
        return None
    version = (int(match[1]), int(match[2]))
    position = 1
    while position < len(argv):
        arg = argv[position]
        position += 1
        if arg == "--" or not arg.startswith("-") or arg == "-":
            if arg == "--" and position < len(argv):
                arg = argv[position]
            if arg in ("-", "--"):
                return PythonLaunch(version, cwd)  # a program on stdin: nothing to know
            script = posixpath.normpath(posixpath.join("/" + cwd, arg)).lstrip("/")
            return PythonLaunch(version, posixpath.dirname(script), script=script)
        if arg.startswith("--"):
            continue  # --version, --help: nothing is run
        for i, flag in enumerate(arg[1:], start=1):
            if flag not in _WITH_VALUE:
                continue
            value = arg[i + 1 :]
            if not value:
                if position >= len(argv):
                    return None
                value = argv[position]
                position += 1
            if flag == "c":
                code = value.replace(";", "\n").encode()
                lines = b"\n".join(line.strip() for line in code.splitlines())
                return PythonLaunch(version, cwd, tuple(source_imports(lines)))
            if flag == "m":
                return PythonLaunch(version, cwd, (ImportStatement(value),))
            break  # -W/-X/-Q value: the rest of this argument was it
    return PythonLaunch(version, cwd)  # the interactive interpreter


def python_executable(pid: int) -> str | None:
    """The path of the Python interpreter process ``pid`` executes, or None (another program, or gone)."""
    try:
        exe = os.readlink(f"/proc/{pid}/exe")
    except OSError:
        return None
    return exe if INTERPRETER_NAME.match(posixpath.basename(exe)) else None


def read_launch(pid: int, exe: str) -> PythonLaunch | None:
    """The Python program process ``pid`` (executing ``exe``) runs, from ``/proc``; None when it is gone."""
    proc = f"/proc/{pid}"
    try:
        with open(f"{proc}/cmdline", "rb") as handle:
            raw = handle.read(_MAX_CMDLINE)
        root = os.readlink(f"{proc}/root")
        cwd = os.readlink(f"{proc}/cwd")
    except OSError:
        return None
    argv = [part.decode("utf-8", "surrogateescape") for part in raw.split(b"\0")[:-1]]
    inside = ""
    if root == "/":
        inside = cwd.lstrip("/")
    elif cwd.startswith(root.rstrip("/") + "/"):
        inside = cwd[len(root.rstrip("/")) + 1 :]
    return parse_command(posixpath.basename(exe), argv, inside)
