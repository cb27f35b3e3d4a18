"""Reading a Python module from a mount prefetches the modules it imports, as Python's path finder would find them."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import trio
import trio.testing

from fusefs.merged_tree import MergedTree
from fusefs.prefetch import TreeTasks
from fusefs.prefetch.imports import ImportPrefetcher, ModuleFile, module_file
from fusefs.prefetch.python_imports import ImportStatement
from index.model import Entry
from index.model import EntryType as T
from tests.fusefs.test_library_prefetch import PrefetchRecordingSource, tree_tasks

STDLIB = "usr/lib/python3.11"
TAG = "cpython-311"


def test_module_files_are_recognized_by_their_names() -> None:
    assert module_file(f"{STDLIB}/json/__pycache__/decoder.{TAG}.pyc") == ModuleFile(
        f"{STDLIB}/json", "decoder", TAG, "pyc"
    )
    assert module_file(f"{STDLIB}/__pycache__/enum.{TAG}.opt-1.pyc") == ModuleFile(
        STDLIB, "enum", f"{TAG}.opt-1", "pyc"
    )
    assert module_file("app/pkg/__init__.py") == ModuleFile("app/pkg", "__init__", None, "py")
    assert module_file("app/legacy.pyc") == ModuleFile("app", "legacy", None, "pyc")
    assert module_file(f"{STDLIB}/__pycache__/README.txt") is None
    assert module_file("usr/bin/python3.11") is None
    assert module_file(f"{STDLIB}/notcache/enum.{TAG}.pyc") is None


def python_tree() -> MergedTree:
    """A small Debian-like Python installation and an application beside it."""
    files = [
        f"{STDLIB}/json/__init__.py",
        f"{STDLIB}/json/__pycache__/__init__.{TAG}.pyc",
        f"{STDLIB}/json/decoder.py",
        f"{STDLIB}/json/__pycache__/decoder.{TAG}.pyc",
        f"{STDLIB}/enum.py",
        f"{STDLIB}/__pycache__/enum.{TAG}.pyc",
        f"{STDLIB}/lib-dynload/_json.cpython-311-x86_64-linux-gnu.so",
        "usr/lib/python3/dist-packages/requests/__init__.py",
        "usr/lib/python3/dist-packages/requests/api.py",
        "app/main.py",
        "app/pkg/__init__.py",
        "app/pkg/mod.py",
        "app/pkg/sub/helper.py",
    ]
    entries = [Entry("", T.DIR, 0o755)]
    dirs: set[str] = set()
    for path in files:
        parts = path.split("/")
        for i in range(1, len(parts)):
            dirs.add("/".join(parts[:i]))
    entries += [Entry(d, T.DIR, 0o755) for d in sorted(dirs)]
    entries += [Entry(path, T.FILE, 0o644, size=10) for path in files]
    entries.append(Entry("app/pkg/sub/__init__.py", T.FILE, 0o644, size=0))  # an empty __init__ still counts
    return MergedTree.build([entries])


def resolved(importer: ModuleFile, *statements: ImportStatement) -> list[str]:
    prefetcher = ImportPrefetcher(python_tree(), PrefetchRecordingSource({}), TreeTasks())
    return [node.entry.path for node, _ in prefetcher.resolve(importer, list(statements))]


def test_relative_imports_resolve_in_the_importers_package() -> None:
    importer = ModuleFile(f"{STDLIB}/json", "__init__", TAG, "pyc")
    assert resolved(importer, ImportStatement("decoder", 1, ("JSONDecoder",))) == [
        f"{STDLIB}/json/__pycache__/decoder.{TAG}.pyc"
    ]
    assert resolved(importer, ImportStatement("", 1, ("decoder",))) == [
        f"{STDLIB}/json/__pycache__/decoder.{TAG}.pyc"
    ]


def test_absolute_imports_search_the_standard_library_lib_dynload_and_dist_packages() -> None:
    importer = ModuleFile(f"{STDLIB}/json", "decoder", TAG, "pyc")
    assert resolved(
        importer,
        ImportStatement("enum"),
        ImportStatement("_json"),
        ImportStatement("requests", 0, ("api", "get")),
        ImportStatement("not_installed"),
    ) == [
        f"{STDLIB}/__pycache__/enum.{TAG}.pyc",
        f"{STDLIB}/lib-dynload/_json.cpython-311-x86_64-linux-gnu.so",
        "usr/lib/python3/dist-packages/requests/__init__.py",  # no bytecode: the source is read
        "usr/lib/python3/dist-packages/requests/api.py",  # `get` is an attribute, not a module
    ]


def test_an_application_imports_from_its_own_directory_and_its_packages() -> None:
    main = ModuleFile("app", "main", None, "py")
    assert resolved(main, ImportStatement("pkg.sub.helper")) == [
        "app/pkg/__init__.py",
        "app/pkg/sub/__init__.py",
        "app/pkg/sub/helper.py",
    ]
    mod = ModuleFile("app/pkg", "mod", None, "py")
    assert resolved(mod, ImportStatement("sub", 1, ("helper",)), ImportStatement("pkg")) == [
        "app/pkg/sub/__init__.py",
        "app/pkg/sub/helper.py",
        "app/pkg/__init__.py",  # absolute: from app/, the sys.path entry above the package
    ]


# -- against the real standard library ------------------------------------------------------------

# Run by this interpreter: the files of the modules `import json` loads, and of all modules loaded.
_FILES_OF_MODULES = """
import sys
before = set(sys.modules)
import json
new = set(sys.modules) - before
def file_of(name):
    module = sys.modules[name]
    if getattr(getattr(module, "__spec__", None), "origin", None) == "frozen":
        return None  # served from the interpreter itself, never read from disk
    return getattr(module, "__cached__", None) or getattr(module, "__file__", None)
print(json.dumps({
    "new": sorted(filter(None, map(file_of, new))),
    "all": sorted(filter(None, map(file_of, list(sys.modules)))),
}))
"""


def stdlib_image() -> tuple[MergedTree, PrefetchRecordingSource, Path, str]:
    """This interpreter's standard library as an image at usr/lib/pythonX.Y, bytes served from the host."""
    stdlib = Path(os.__file__).parent
    version = f"{sys.version_info.major}.{sys.version_info.minor}"
    root = f"usr/lib/python{version}"
    entries = [Entry("", T.DIR, 0o755), Entry("usr", T.DIR, 0o755), Entry("usr/lib", T.DIR, 0o755)]
    data: dict[tuple[int, str], bytes] = {}
    skip = {"test", "tests", "idlelib", "tkinter", "lib2to3", "site-packages", "turtledemo", "ensurepip"}
    for directory, subdirs, names in os.walk(stdlib):
        subdirs[:] = sorted(d for d in subdirs if d not in skip and not d.startswith("config-"))
        relative = os.path.relpath(directory, stdlib)
        base = root if relative == "." else f"{root}/{relative}"
        entries.append(Entry(base, T.DIR, 0o755))
        for name in names:
            if name.endswith((".py", ".pyc", ".so")):
                content = Path(directory, name).read_bytes()
                entries.append(Entry(f"{base}/{name}", T.FILE, 0o644, size=len(content)))
                data[0, f"{base}/{name}"] = content
    return MergedTree.build([entries]), PrefetchRecordingSource(data), stdlib, root


def test_import_json_prefetches_every_module_python_loads_for_it_and_nothing_it_does_not() -> None:
    """From json/__init__.pyc, the imports found cover what `import json` loads (no site), within what Python loads."""
    tree, source, stdlib, root = stdlib_image()
    out = subprocess.run(
        [sys.executable, "-I", "-S", "-c", _FILES_OF_MODULES], capture_output=True, text=True, check=True
    )
    loaded = json.loads(out.stdout)

    def in_image(host_paths: list[str]) -> set[str]:
        return {f"{root}/{os.path.relpath(p, stdlib)}" for p in host_paths if p.startswith(str(stdlib))}

    new, everything = in_image(loaded["new"]), in_image(loaded["all"])
    first = next(
        p for p in new if p.endswith(f"json/__pycache__/__init__.{sys.implementation.cache_tag}.pyc")
    )
    node = tree.resolve(first)
    assert node is not None

    async def main() -> None:
        async with tree_tasks() as tasks:
            prefetcher = ImportPrefetcher(tree, source, tasks)
            prefetcher.note_read(node, 0, source.data[0, first])
            await trio.testing.wait_all_tasks_blocked(cushion=0.05)

    trio.run(main)
    fetched = {path for _, path, _, _ in source.reads} | set(source.prefetched)
    assert new - {first} <= fetched, f"not prefetched: {sorted(new - {first} - fetched)}"
    assert fetched <= everything, f"prefetched but never loaded: {sorted(fetched - everything)}"
    assert len(source.reads) == len({path for _, path, _, _ in source.reads}), "a module was read twice"


def test_starting_the_interpreter_prefetches_the_modules_it_imports_by_itself() -> None:
    """The first read of bin/pythonX.Y fetches encodings, the UTF-8 codec and the C library's start-up data."""
    tree, source, _, root = stdlib_image()
    version = f"{sys.version_info.major}.{sys.version_info.minor}"
    binary = f"usr/bin/python{version}"
    gconv = "usr/lib/x86_64-linux-gnu/gconv/gconv-modules.cache"
    entries = [e.entry for _, e in tree.walk() if e.entry.path] + [
        Entry("usr/bin", T.DIR, 0o755),
        Entry(binary, T.FILE, 0o755, size=64),
        # What the C library reads for CPython's start: locale, charset registry, time zone.
        Entry("usr/lib/locale", T.DIR, 0o755),
        Entry("usr/lib/locale/C.utf8", T.DIR, 0o755),
        Entry("usr/lib/locale/C.utf8/LC_CTYPE", T.FILE, 0o644, size=10),
        Entry("usr/lib/x86_64-linux-gnu", T.DIR, 0o755),
        Entry("usr/lib/x86_64-linux-gnu/gconv", T.DIR, 0o755),
        Entry(gconv, T.FILE, 0o644, size=10),
        Entry("usr/share", T.DIR, 0o755),
        Entry("usr/share/zoneinfo", T.DIR, 0o755),
        Entry("usr/share/zoneinfo/UTC", T.FILE, 0o644, size=10),
        Entry("etc", T.DIR, 0o755),
        Entry("etc/localtime", T.SYMLINK, 0o777, link_target="/usr/share/zoneinfo/UTC"),
    ]
    tree = MergedTree.build([[Entry("", T.DIR, 0o755), *entries]])
    node = tree.resolve(binary)
    assert node is not None
    tag = sys.implementation.cache_tag

    async def main() -> None:
        async with tree_tasks() as tasks:
            prefetcher = ImportPrefetcher(tree, source, tasks)
            x86_64_header = (
                b"\x7fELF\x02\x01\x01" + bytes(11) + (62).to_bytes(2, "little")
            )  # e_machine EM_X86_64
            prefetcher.note_read(node, 0, x86_64_header + bytes(44))
            await trio.testing.wait_all_tasks_blocked(cushion=0.05)

    trio.run(main)
    fetched = {path for _, path, _, _ in source.reads}
    for module in ("encodings/__init__", "encodings/aliases", "encodings/utf_8"):
        package, _, name = module.rpartition("/")
        assert f"{root}/{package}/__pycache__/{name}.{tag}.pyc" in fetched
    assert f"{root}/__pycache__/os.{tag}.pyc" not in fetched  # served frozen since 3.11: never read
    assert {"usr/lib/locale/C.utf8/LC_CTYPE", gconv, "usr/share/zoneinfo/UTC"} <= set(source.prefetched)


def test_a_python_process_opening_a_file_gets_its_command_line_imports_prefetched(tmp_path: Path) -> None:
    """An interpreter's first open (the loader's, in life) starts fetching what its -c code imports."""
    tree, source, _, root = stdlib_image()
    process = subprocess.Popen(
        [sys.executable, "-c", "import json; import time; time.sleep(30)"], cwd=tmp_path
    )
    tag = sys.implementation.cache_tag
    try:
        node = tree.resolve(f"{root}/__pycache__/enum.{tag}.pyc")
        assert node is not None

        async def main() -> None:
            async with tree_tasks() as tasks:
                prefetcher = ImportPrefetcher(tree, source, tasks)
                deadline = trio.current_time() + 10
                while not source.reads and trio.current_time() < deadline:
                    prefetcher.note_open(node, process.pid)  # until the child has become python
                    await trio.sleep(0.01)
                await trio.testing.wait_all_tasks_blocked(cushion=0.05)

        trio.run(main)
    finally:
        process.kill()
        process.wait()
    fetched = {path for _, path, _, _ in source.reads}
    assert f"{root}/json/__pycache__/__init__.{tag}.pyc" in fetched
    assert f"{root}/re/__pycache__/__init__.{tag}.pyc" in fetched  # json.decoder's import, followed


def test_a_source_file_read_by_something_else_than_python_prefetches_nothing() -> None:
    """cat or grep reading app/main.py (browsing the image) fetches no imports; Python opening it does."""
    files = {
        "app/main.py": b"import helper\n",
        "app/helper.py": b"VALUE = 1\n",
    }
    entries = [Entry("", T.DIR, 0o755), Entry("app", T.DIR, 0o755)]
    entries += [Entry(path, T.FILE, 0o644, size=len(data)) for path, data in files.items()]
    tree = MergedTree.build([entries])
    main_node = tree.resolve("app/main.py")
    assert main_node is not None

    def reads_after(opener: int | None) -> set[str]:
        source = PrefetchRecordingSource({(0, path): data for path, data in files.items()})

        async def main() -> None:
            async with tree_tasks() as tasks:
                prefetcher = ImportPrefetcher(tree, source, tasks)
                if opener is not None:
                    prefetcher.note_open(main_node, opener)
                prefetcher.note_read(main_node, 0, files["app/main.py"])
                await trio.testing.wait_all_tasks_blocked(cushion=0.05)

        trio.run(main)
        return {path for _, path, _, _ in source.reads}

    cat = subprocess.Popen(["sleep", "30"])  # any process that is not a Python interpreter
    try:
        assert reads_after(cat.pid) == set()
    finally:
        cat.kill()
        cat.wait()
    assert reads_after(None) == set()
    assert reads_after(os.getpid()) == {"app/helper.py"}  # this test runs in a Python interpreter
