"""Fetch the modules a Python program is about to import while it runs the module that imports them.

A cold ``import json`` on a lazy mount reads about twenty ``.pyc`` files, one after the other:
each import runs only once the module naming it has been read and started, so each is a full
round trip to the registry (about 0.4 s of python3's start on a 20 ms link). But a module's
top-level imports are written in its bytecode: the first read of a ``.pyc`` (or ``.py``) starts a
background task that finds them in the merged tree the way Python's path finder would, fetches
them, reads their imports in turn, and so on. The program then finds each module cached, and
the chain costs about one round trip per level of the import tree instead of one per module.

Resolution follows Python's rules closely enough for a hint: relative imports from the
importer's package, absolute ones from the importer's own ``sys.path`` entry and from the
standard library and site directories of its Python version; packages before extension
modules before source; ``.pyc`` files from ``__pycache__`` with the importer's cache tag. A wrong
guess only costs a fetch; a failure is logged and forgotten, since the program's own reads
fetch (or fail) as usual.
"""

from __future__ import annotations

import logging
import posixpath
import re
from dataclasses import dataclass

import trio

from fusefs.merged_tree import MergedTree, Node
from fusefs.prefetch import TreeTasks
from fusefs.prefetch.elf_deps import ELF_MAGIC, elf_machine, multiarch_triplet
from fusefs.prefetch.libraries import PrefetchingSource
from fusefs.prefetch.python_command import INTERPRETER_NAME, PythonLaunch, python_executable, read_launch
from fusefs.prefetch.python_imports import FROZEN_SINCE_311, ImportStatement, pyc_imports, source_imports
from index.model import EntryType

log = logging.getLogger(__name__)

PYCACHE = "__pycache__"
# Modules followed per tree at most, and files fetched at once: a big application's import
# graph is all needed, but must not crowd out the program's own reads.
MAX_MODULES = 4096
PARALLEL_FETCHES = 8
# Module files larger than this are fetched but not parsed for their own imports.
MAX_PARSED_BYTES = 4 << 20

# What the interpreter imports by itself before running any code: the codec machinery for its
# (UTF-8) locale and the site module's hooks. Before 3.11 the rest were read from disk too.
STARTUP_MODULES = (
    "encodings",
    "encodings.aliases",
    "encodings.utf_8",
    "codecs",
    "io",
    "abc",
    "site",
    "os",
    "stat",
    "posixpath",
    "genericpath",
    "_collections_abc",
    "_sitebuiltins",
    "sitecustomize",
)
# What CPython's start reads through the C library (glibc), one after the other, before its
# first import: the LC_CTYPE of the C.UTF-8 locale it coerces to when none is set (PEP 538),
# glibc's charset converter registry, and the local time zone (the time module's tzset).
STARTUP_DATA = (
    "usr/lib/locale/C.utf8/LC_CTYPE",
    "usr/lib/locale/C.UTF-8/LC_CTYPE",
    "usr/lib/{triplet}/gconv/gconv-modules.cache",
    "etc/localtime",
)
_PYC_NAME = re.compile(r"^(?P<module>[^.]+)\.(?P<tag>[A-Za-z]+-\d+(?:\.opt-\d+)?)\.pyc$")
_PYTHON_DIR = re.compile(r"^python(\d+)\.(\d+)$")
_TAG_VERSION = re.compile(r"^[A-Za-z]+-(\d)(\d+)")


@dataclass(frozen=True, slots=True)
class ModuleFile:
    """A file Python loads a module from: where its source directory is and how it is stored."""

    directory: str  # the directory holding the module (``pkg`` for ``pkg/__pycache__/mod.TAG.pyc``)
    name: str  # the module's last name component, ``__init__`` for a package
    tag: str | None  # the cache tag of a ``__pycache__`` file (``cpython-311``), None for a source file
    kind: str  # "pyc" (bytecode: parse with pyc_imports), "py" (source) or "ext" (extension module)

    @property
    def is_package(self) -> bool:
        """Whether this file is a package's ``__init__``."""
        return self.name == "__init__"


def module_file(path: str) -> ModuleFile | None:
    """What module the file at ``path`` (relative to the image root) holds, or None if it is not one."""
    directory, base = posixpath.split(path)
    if base.endswith(".pyc"):
        match = _PYC_NAME.match(base)
        if match and posixpath.basename(directory) == PYCACHE:
            return ModuleFile(posixpath.dirname(directory), match["module"], match["tag"], "pyc")
        if base.count(".") == 1:  # a sourceless module.pyc beside where its source would be
            return ModuleFile(directory, base[:-4], None, "pyc")
        return None
    if base.endswith(".py") and base.count(".") == 1:
        return ModuleFile(directory, base[:-3], None, "py")
    return None


class ImportPrefetcher:
    """Per merged tree: on the first read of a Python module, prefetch what it will import, recursively."""

    def __init__(self, tree: MergedTree, source: PrefetchingSource, tasks: TreeTasks) -> None:
        self._tasks = tasks
        self._tree = tree
        self._source = source
        self._handled: set[int] = set()  # node indexes fetched or being fetched
        self._limiter: trio.CapacityLimiter | None = None
        self._launches: set[tuple[int, str]] = set()  # (pid, interpreter) command lines read
        # Source files a Python interpreter opened: only those are imports about to run (a .pyc
        # is read by Python alone in practice, so its first read is enough).
        self._source_opened: set[int] = set()

    def note_open(self, node: Node, pid: int) -> None:
        """A process opens a file: a Python interpreter, new to us, gets its program's imports prefetched.

        The dynamic loader's first opens (``ld.so.cache``, libraries) come right after the
        interpreter was executed, long before it runs the program: its command line (``-c``
        code, ``-m`` module, script) already names what the program imports first.
        """
        exe = python_executable(pid) if pid > 0 else None
        if exe is None:
            return
        if node.entry.path.endswith(".py") and len(self._source_opened) < MAX_MODULES:
            self._source_opened.add(node.index)
        if (pid, exe) in self._launches:
            return
        if len(self._launches) >= MAX_MODULES:
            self._launches.clear()
        self._launches.add((pid, exe))
        launch = read_launch(pid, exe)
        if launch is not None and (launch.statements or launch.script):
            self._tasks.start_soon(self._run_launch, launch, name=f"import-prefetch pid {pid}")

    async def _run_launch(self, launch: PythonLaunch) -> None:
        major, minor = launch.version
        importer = ModuleFile(launch.directory, "__main__", f"cpython-{major}{minor}", "pyc")
        try:
            async with trio.open_nursery() as nursery:
                script = self._tree.resolve(launch.script) if launch.script else None
                if script is not None and _is_file(script) and script.index not in self._handled:
                    self._handled.add(script.index)
                    kind = "pyc" if script.entry.path.endswith(".pyc") else "py"
                    module = ModuleFile(launch.directory, "__main__", None, kind)
                    nursery.start_soon(self._follow, script, module, None, nursery)
                self._follow_all(importer, list(launch.statements), nursery)
        except Exception as error:  # a hint only: never let it reach the trio run
            log.debug("import-prefetch launch %s: %s", launch, error)

    def before_read(self, node: Node, offset: int) -> None:
        """Nothing to do before a read: a module's imports are known from its bytes."""

    def note_read(self, node: Node, offset: int, data: bytes) -> None:
        """Look at a read that just succeeded; if it starts a Python module, prefetch its imports."""
        if offset != 0 or node.index in self._handled:
            return
        if data.startswith(ELF_MAGIC):
            self._note_interpreter(node, data)
            return
        module = module_file(node.entry.path)
        if module is None or module.kind == "ext":
            return
        if module.kind == "py" and node.index not in self._source_opened:
            return  # a .py read by an editor, cat or grep (someone browsing the image): no imports follow
        self._handled.add(node.index)
        whole = data if len(data) == node.entry.size else None
        # In the tree's task group: the prefetch must not delay the read that revealed it, and
        # it ends when the tree is removed or the mount ends.
        self._tasks.start_soon(self._run, node, module, whole, name=f"import-prefetch {node.entry.path}")

    def _note_interpreter(self, node: Node, head: bytes) -> None:
        """A Python interpreter starting: prefetch what it reads before any of the program's modules."""
        match = INTERPRETER_NAME.match(posixpath.basename(node.entry.path))
        if match is None:
            return
        self._handled.add(node.index)
        major, minor = int(match[1]), int(match[2])
        startup = [
            ImportStatement(name)
            for name in STARTUP_MODULES
            if (major, minor) < (3, 11) or name not in FROZEN_SINCE_311
        ]
        stdlib = ModuleFile(f"usr/lib/python{major}.{minor}", "__main__", f"cpython-{major}{minor}", "pyc")
        local = ModuleFile(f"usr/local/lib/python{major}.{minor}", "__main__", stdlib.tag, "pyc")
        importer = local if self._tree.resolve(local.directory) is not None else stdlib
        machine = elf_machine(head)
        triplet = multiarch_triplet(machine) if machine is not None else None
        data = [path.format(triplet=triplet) for path in STARTUP_DATA if triplet or "{triplet}" not in path]
        self._tasks.start_soon(
            self._run_startup, importer, startup, data, name=f"import-prefetch {node.entry.path}"
        )

    async def _run_startup(
        self, importer: ModuleFile, startup: list[ImportStatement], data: list[str]
    ) -> None:
        try:
            async with trio.open_nursery() as nursery:
                for path in data:
                    target = self._tree.resolve(path)
                    if target is None or not _is_file(target) or target.index in self._handled:
                        continue
                    self._handled.add(target.index)
                    nursery.start_soon(self._prefetch, target)
                self._follow_all(importer, startup, nursery)
        except Exception as error:  # a hint only: never let it reach the trio run
            log.debug("import-prefetch interpreter %s: %s", importer.directory, error)

    async def _run(self, node: Node, module: ModuleFile, data: bytes | None) -> None:
        try:
            async with trio.open_nursery() as nursery:
                await self._follow(node, module, data, nursery)
        except Exception as error:  # a hint only: never let it reach the trio run
            log.debug("import-prefetch path=%s: %s", node.entry.path, error)

    async def _follow(
        self, node: Node, module: ModuleFile, data: bytes | None, nursery: trio.Nursery
    ) -> None:
        """Read ``node``'s imports; fetch each module not handled yet and follow it in turn."""
        if data is None:
            if node.entry.size == 0:
                return
            if node.entry.size > MAX_PARSED_BYTES:
                await self._source.prefetch(node.layer, node.entry)
                return
            async with self._fetch_slot():
                data = await self._source.read(node.layer, node.entry, 0, node.entry.size)
        statements = pyc_imports(data) if module.kind == "pyc" else source_imports(data)
        self._follow_all(module, statements, nursery)

    def _follow_all(
        self, module: ModuleFile, statements: list[ImportStatement], nursery: trio.Nursery
    ) -> None:
        """Start fetching (and following) every file ``statements`` load that is not handled yet."""
        for target, target_module in self.resolve(module, statements):
            if target.index in self._handled or len(self._handled) >= MAX_MODULES or not target.entry.size:
                continue
            self._handled.add(target.index)
            if target_module.kind == "ext":
                nursery.start_soon(self._prefetch, target)
            else:
                nursery.start_soon(self._follow, target, target_module, None, nursery)

    async def _prefetch(self, node: Node) -> None:
        async with self._fetch_slot():
            await self._source.prefetch(node.layer, node.entry)

    def _fetch_slot(self) -> trio.CapacityLimiter:
        if self._limiter is None:  # made inside the trio run that uses it
            self._limiter = trio.CapacityLimiter(PARALLEL_FETCHES)
        return self._limiter

    # -- resolution ----------------------------------------------------------------------------

    def resolve(
        self, importer: ModuleFile, statements: list[ImportStatement]
    ) -> list[tuple[Node, ModuleFile]]:
        """The files (nodes of this tree) that executing ``statements`` in ``importer`` would load, in order."""
        found: list[tuple[Node, ModuleFile]] = []
        roots: list[str] | None = None
        for statement in statements:
            if statement.level:
                base = importer.directory
                for _ in range(statement.level - 1):
                    base = posixpath.dirname(base)
                bases = [base]
            else:
                if roots is None:
                    roots = self._search_roots(importer)
                bases = roots
            parts = [p for p in statement.module.split(".") if p]
            for base in bases:
                chain = self._load_chain(base, parts, importer.tag)
                if chain is None:
                    continue
                found += chain
                # `from package import name`: name may be a submodule, loaded from the package.
                package = posixpath.join(base, *parts)
                if statement.names and (not parts or (chain and chain[-1][1].is_package)):
                    for name in statement.names:
                        hit = self._find(package, name, importer.tag)
                        if hit is not None:
                            found.append(hit)
                break
        return found

    def _load_chain(
        self, base: str, parts: list[str], tag: str | None
    ) -> list[tuple[Node, ModuleFile]] | None:
        """The files of ``a``, ``a.b``, ``a.b.c`` found under ``base``; None if ``a`` is not there."""
        chain: list[tuple[Node, ModuleFile]] = []
        directory = base
        for depth, part in enumerate(parts):
            hit = self._find(directory, part, tag)
            if hit is None:
                return None if depth == 0 else chain
            chain.append(hit)
            if not hit[1].is_package:
                break
            directory = posixpath.join(directory, part)
        if not parts and self._tree.resolve(base) is None:
            return None
        return chain

    def _find(self, directory: str, name: str, tag: str | None) -> tuple[Node, ModuleFile] | None:
        """Module ``name`` in ``directory`` as Python's path finder looks: package, extension, source or bytecode."""
        folder = self._tree.resolve(directory)
        if folder is None or folder.children is None:
            return None
        package = folder.children.get(name)
        if package is not None and package.children is not None:
            init = self._module_in(posixpath.join(directory, name), "__init__", tag)
            if init is not None:
                return init
        for child_name, child in folder.children.items():
            if child_name.startswith(name + ".") and child_name.endswith(".so") and _is_file(child):
                return child, ModuleFile(directory, name, None, "ext")
        return self._module_in(directory, name, tag)

    def _module_in(self, directory: str, name: str, tag: str | None) -> tuple[Node, ModuleFile] | None:
        """``name``'s bytecode in ``directory/__pycache__`` (with the importer's tag) or its source or sourceless pyc."""
        candidates = []
        if tag is not None:
            candidates.append(
                (f"{directory}/{PYCACHE}/{name}.{tag}.pyc", ModuleFile(directory, name, tag, "pyc"))
            )
        candidates += [
            (f"{directory}/{name}.py", ModuleFile(directory, name, None, "py")),
            (f"{directory}/{name}.pyc", ModuleFile(directory, name, None, "pyc")),
        ]
        for path, module in candidates:
            node = self._tree.resolve(path)
            if node is not None and _is_file(node):
                return node, module
        return None

    def _search_roots(self, importer: ModuleFile) -> list[str]:
        """The ``sys.path`` entries an absolute import from ``importer`` searches, existing ones only."""
        top = importer.directory
        while top and self._is_package_dir(top, importer.tag):
            top = posixpath.dirname(top)
        roots = [top]
        version = _version(importer)
        if version is not None:
            for prefix in ("usr/lib", "usr/local/lib"):
                stdlib = f"{prefix}/python{version}"
                roots += [
                    stdlib,
                    f"{stdlib}/lib-dynload",
                    f"{stdlib}/site-packages",
                    f"{stdlib}/dist-packages",
                ]
            roots.append("usr/lib/python3/dist-packages")
        unique = dict.fromkeys(roots)
        return [
            root
            for root in unique
            if (node := self._tree.resolve(root)) is not None and node.children is not None
        ]

    def _is_package_dir(self, directory: str, tag: str | None) -> bool:
        return self._module_in(directory, "__init__", tag) is not None


def _is_file(node: Node) -> bool:
    return node.entry.type is EntryType.FILE  # an empty __init__.py still makes a package


def _version(module: ModuleFile) -> str | None:
    """``3.11`` from the module's cache tag or from a ``python3.11`` directory above it."""
    if module.tag is not None:
        match = _TAG_VERSION.match(module.tag)
        if match:
            return f"{match[1]}.{match[2]}"
    for part in reversed(module.directory.split("/")):
        found = _PYTHON_DIR.match(part)
        if found:
            return f"{found[1]}.{found[2]}"
    return None
