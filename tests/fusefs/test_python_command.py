"""fusefs.prefetch.python_command: what a Python process will run first, from its command line and /proc."""

from __future__ import annotations

import os
import subprocess
import sys
import time
from pathlib import Path

from fusefs.prefetch.python_command import PythonLaunch, parse_command, python_executable, read_launch
from fusefs.prefetch.python_imports import ImportStatement

V = (3, 11)


def test_dash_c_code_names_its_imports() -> None:
    launch = parse_command("python3.11", ["python3", "-c", "import json; import os.path as p"], "srv")
    assert launch == PythonLaunch(V, "srv", (ImportStatement("json"), ImportStatement("os.path")))


def test_dash_m_names_the_module_and_options_before_it_are_skipped() -> None:
    argv = ["python3", "-u", "-X", "dev", "-W", "error", "-Bm", "http.server", "8000"]
    assert parse_command("python3.11", argv, "") == PythonLaunch(V, "", (ImportStatement("http.server"),))


def test_a_script_runs_from_its_own_directory() -> None:
    assert parse_command("python3.12", ["python3", "-O", "manage.py", "runserver"], "app") == PythonLaunch(
        (3, 12), "app", script="app/manage.py"
    )
    assert parse_command("python3.12", ["python3", "/srv/../opt/run.py"], "app") == PythonLaunch(
        (3, 12), "opt", script="opt/run.py"
    )
    assert parse_command("python3.12", ["python3", "--", "x.py"], "") == PythonLaunch(
        (3, 12), "", script="x.py"
    )


def test_nothing_to_know_for_stdin_the_repl_or_other_programs() -> None:
    assert parse_command("python3.11", ["python3", "-"], "") == PythonLaunch(V, "")
    assert parse_command("python3.11", ["python3", "-i"], "") == PythonLaunch(V, "")
    assert parse_command("python3.11", ["python3", "-c"], "") is None  # -c without its code
    assert parse_command("bash", ["bash", "-c", "import json"], "") is None


def test_a_real_python_process_is_read_from_proc(tmp_path: Path) -> None:
    """/proc/<pid> of a running interpreter: its executable, its -c imports and its working directory."""
    code = "import json, time; time.sleep(30)"
    process = subprocess.Popen([sys.executable, "-c", code], cwd=tmp_path)
    try:
        deadline = time.monotonic() + 10
        exe = None
        while exe is None and time.monotonic() < deadline:
            exe = python_executable(process.pid)
            time.sleep(0.01)
        assert exe is not None and os.path.samefile(exe, sys.executable)
        launch = read_launch(process.pid, exe)
        assert launch is not None
        assert launch.version == sys.version_info[:2]
        assert launch.directory == str(tmp_path.resolve()).lstrip("/")
        assert launch.statements == (ImportStatement("json"), ImportStatement("time"))
    finally:
        process.kill()
        process.wait()
    assert python_executable(process.pid) is None  # gone: nothing, no error
