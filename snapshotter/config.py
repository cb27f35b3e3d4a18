"""lazysnap's configuration: every tunable in one place, read from one TOML file by every command.

``lazysnap mount``, ``lazysnap index push``, ``lazysnap serve`` (and ``umount``/``stats``, for the
root) take ``--config FILE``; every key is optional, and ``docs/config.md`` lists them all with
their defaults. Example::

    root = "/var/lib/lazysnap"
    log_level = "info"

    [registry]
    plain_http = ["localhost:5000"]

    [fetch]
    timeout_seconds = 30.0

    [layers]
    gzip_spacing_bytes = 1048576

Keys only ``serve`` uses (``address``, ``grpc_workers``, ``shutdown_grace_seconds``,
``fuse.mount_directory``, ``background_fetch.delay_seconds``) are accepted and ignored by the
other commands, so one file serves a whole node.

Command-line flags override the file (``command_line_overrides`` maps them onto keys). An
unknown key, a value of the wrong type or out of range is a ``ConfigError`` naming the key,
raised when the config is loaded, so a typo never passes silently and never surfaces later.
"""

from __future__ import annotations

import dataclasses
import os
import tomllib
import types
import typing
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from snapshotter.errors import ConfigError as ConfigError  # re-exported: it was defined here

DEFAULT_ROOT = "/var/lib/lazysnap"
# sun_path of a unix socket address holds 108 bytes on Linux, the terminating NUL included.
UNIX_SOCKET_PATH_LIMIT = 108
LOG_LEVELS = ("debug", "info", "warning", "error", "critical")
# Every host (for --plain-http, which means "the registry of this reference, whatever it is").
ALL_HOSTS = "*"


def _at_least(minimum: float, default: Any) -> Any:
    """A field that must be >= ``minimum``; checked by ``load_config``."""
    return field(default=default, metadata={"min": minimum})


def _above(bound: float, default: Any) -> Any:
    """A field that must be > ``bound``; checked by ``load_config``."""
    return field(default=default, metadata={"above": bound})


@dataclass(frozen=True)
class RegistryConfig:
    """How to reach registries."""

    # Default []: HTTPS everywhere, except localhost/127.0.0.1/::1, which are always plain HTTP
    # (as containerd does). Hosts ("host:port") listed here are spoken to over plain HTTP too,
    # "*" means every host (what --plain-http sets); never list a host on an untrusted network.
    plain_http: list[str] = field(default_factory=list)
    # Default "": ~/.docker/config.json of the user running lazysnap (--docker-config). A
    # docker-style config with "auths" (base64 user:password or identitytoken) for token auth.
    credentials_file: str = ""


@dataclass(frozen=True)
class FetchConfig:
    """HTTP requests to registries: manifests, Range reads of layer bytes, whole-blob downloads."""

    # Default 30 s: a whole request, connect to last byte. Long enough for a 4 MiB background
    # request on a slow link, short enough that a container read does not hang for minutes.
    timeout_seconds: float = _above(0, 30.0)
    # Default 10 s: a registry that does not accept a connection within this is treated as down.
    connect_timeout_seconds: float = _above(0, 10.0)
    # Default 5: retries after the first attempt on timeouts, resets, 429 and 5xx. 5 (what mount,
    # --eager and index push always used; serve had 3) rides out ~6 s of registry restart or
    # throttling, which matters most to whole-blob downloads (a failure restarts the blob); a
    # container read is bounded anyway by fuse.read_timeout_seconds, not by this.
    retries: int = _at_least(0, 5)
    # Default 0.2 s, doubling with jitter, capped at 10 s a step: ~6 s in all with 5 retries.
    backoff_seconds: float = _at_least(0, 0.2)
    # Default 16: connections per registry host. 16 is what every `lazysnap bench` measurement
    # of a mount ran with (serve's 8 was never measured): a program's libraries are prefetched
    # one request per chunk, all at once, and 8 connections queue half of them behind the rest.
    max_connections_per_host: int = _at_least(1, 16)


@dataclass(frozen=True)
class CacheConfig:
    """The on-disk blob cache."""

    # Default "": <root>/cache. Must be on a filesystem that supports sparse files.
    directory: str = ""
    # Default 64 KiB (one span): an on-demand read asks for at least this many bytes from the
    # wanted range on, so small reads of one file do not each pay a round trip. Measured with
    # `import json` on the eStargz python image: 256 KiB fetched 9.2 MB in 24 requests, 128 KiB
    # 7.2 MB in 25, 64 KiB 6.4 MB in 27. eStargz blobs cached in fine chunks ignore it.
    min_fetch_bytes: int = _at_least(0, 64 << 10)
    # Default 2: misses at most this many chunks apart are fetched in one Range request, even if
    # the present chunks between are fetched again: a round trip costs more than a few KiB.
    merge_gap_chunks: int = _at_least(0, 2)
    # Default 4 MiB: the largest Range request of the background fill, so an on-demand read never
    # waits long behind a huge transfer on the same link.
    background_request_bytes: int = _at_least(1, 4 << 20)


@dataclass(frozen=True)
class BackgroundFetchConfig:
    """Filling whole layers in the background after they are mounted."""

    # Default true: after the first reads, fetch the rest so the container survives a registry
    # outage (--no-background-fetch sets false).
    enabled: bool = True
    # Default 5 s (serve only): wait this long after a chain is mounted, so start-up reads go first.
    delay_seconds: float = _at_least(0, 5.0)
    # Default 1 s: a background request is sent only once on-demand reads have been quiet this
    # long. Start-up reads come in bursts; `lazysnap bench` at 100 Mbit + 20 ms measured
    # `import json` at 2.4 s with an immediate fill against 1.5 s without one.
    quiet_seconds: float = _at_least(0, 1.0)


@dataclass(frozen=True)
class LayersConfig:
    """How layer indexes are obtained and what is fetched ahead of reads.

    The 64 KiB span size (the unit a published or stored index records a digest for, and the
    cache's chunk size for gzip/zstd/tar blobs) is not tunable: indexes published by one node
    are read by every other, so it is fixed by the index format.
    """

    # Default 1 MiB: uncompressed bytes between gzip seek points in indexes built here (index push
    # --spacing). Smaller means less decompressed per cold read but a bigger index (each point
    # keeps a 32 KiB window); at 1 MiB the index is ~0.6% of the blob.
    gzip_spacing_bytes: int = _at_least(64 << 10, 1 << 20)
    # Default 4 KiB: the cache chunk of blobs without span digests (eStargz, verified per gzip
    # member), so a cold read fetches its members and little else: 64 KiB alignment cost
    # `import json` on the eStargz python image 6.4 MB where its files take 4.7 MB.
    fine_chunk_bytes: int = _at_least(1, 4 << 10)
    # Default 32 MiB: the largest prefetch region (an optimized eStargz blob's files before its
    # landmark) honoured; beyond it the prefetch competes with on-demand reads longer than it helps.
    landmark_prefetch_max_bytes: int = _at_least(0, 32 << 20)
    # Default 512 KiB: the landmark region is requested in pieces of this size, one after the
    # other, so a start-up read waits only for the piece holding its file.
    landmark_prefetch_piece_bytes: int = _at_least(1, 512 << 10)
    # Default 16 MiB: a file asked for ahead of its reads (a program's libraries, imports) is
    # fetched whole only up to this many compressed bytes; larger ones are left to the reads.
    file_prefetch_max_bytes: int = _at_least(0, 16 << 20)
    # Default 3: layers resolved at once. Each may be a whole-blob download, so a few in
    # parallel fill the link without starving the first layers the merge needs.
    parallel_layer_opens: int = _at_least(1, 3)
    # Default 64 GiB: a layer whose uncompressed size exceeds this is refused (a gzip/zstd bomb
    # bound: 64 GiB is far above any real image layer, far below a filled disk).
    max_uncompressed_bytes: int = _at_least(1, 64 << 30)
    # Default false: an eStargz blob whose descriptor has no toc.digest annotation is not served
    # lazily from its TOC, since nothing pins the TOC: it is indexed during download instead.
    allow_unpinned_toc: bool = False
    # Default false: a pull by digest does not use indexes published under a tag-resolved
    # manifest; an index is trusted only when it is pinned by the manifest digest pulled.
    trust_tag_indexes_for_digest_pulls: bool = False


@dataclass(frozen=True)
class FuseConfig:
    """The FUSE filesystems that show layers (mount: one per image; serve: one forest of chains)."""

    # Default 3600 s: entry and attribute cache lifetime in the kernel. Layers never change once
    # mounted, and the kernel can still reclaim its caches under memory pressure; measured here,
    # `ls -lR` of 20,000 files takes 9 s with 0 s timeouts and 0.14 s with any timeout >= 1 s.
    entry_timeout_seconds: float = _at_least(0, 3600.0)
    # Default 60 s (mount and serve): a read that needs the registry fails with EIO after this,
    # however retries go and counting the kernel's retry of a failed read, so a container never
    # hangs on a dead registry.
    read_timeout_seconds: float = _above(0, 60.0)
    # Default "" (serve only): <root>/fuse. Where merged chains are mounted.
    mount_directory: str = ""
    # Default 128: FUSE requests handled concurrently; a reader beyond it waits for a free task
    # (measured: 64 concurrent 10 ms reads need max_tasks >= 64 to overlap).
    max_tasks: int = _at_least(1, 128)
    # Default 1024 (1 MiB, the kernel's cap): the mount's read-ahead. The bdi default of 128 KiB
    # makes the kernel ask for 128 KiB per read; 1 MiB cuts the per-request Python cost
    # (~50 us) eightfold. 0 leaves the kernel's default.
    read_ahead_kb: int = _at_least(0, 1024)


@dataclass(frozen=True)
class IndexConfig:
    """Publishing the indexes this node builds."""

    # Default false: indexes built while a layer downloads are kept in the local store only;
    # pushing them to the registry needs write access a node normally does not have.
    publish: bool = False


@dataclass(frozen=True)
class Config:
    """Every tunable of lazysnap; see each field's comment for its default and why."""

    # Default /var/lib/lazysnap (--root): metadata.db, snapshots/, cache/, indexes/, mounts/ and
    # fuse/ live here. Control sockets live under it too, so it must be short enough for them.
    root: str = DEFAULT_ROOT
    # Default /run/lazysnap/lazysnap.sock (serve only, --address): what containerd's
    # [proxy_plugins] address points at; at most 107 bytes (the unix socket path limit).
    address: str = "/run/lazysnap/lazysnap.sock"
    # Default "info" (--verbose: "debug"): remote-snapshot-prepared=... lines are at info.
    log_level: str = field(default="info", metadata={"choices": LOG_LEVELS})
    # Default 16 (serve only): gRPC handler threads. Calls are short; containerd makes tens per
    # container start.
    grpc_workers: int = _at_least(1, 16)
    # Default 5 s (serve only): on SIGTERM, in-flight calls get this long to finish.
    shutdown_grace_seconds: float = _at_least(0, 5.0)
    registry: RegistryConfig = field(default_factory=RegistryConfig)
    fetch: FetchConfig = field(default_factory=FetchConfig)
    cache: CacheConfig = field(default_factory=CacheConfig)
    background_fetch: BackgroundFetchConfig = field(default_factory=BackgroundFetchConfig)
    layers: LayersConfig = field(default_factory=LayersConfig)
    fuse: FuseConfig = field(default_factory=FuseConfig)
    index: IndexConfig = field(default_factory=IndexConfig)

    def cache_path(self) -> Path:
        """The blob cache directory: ``cache.directory``, else ``<root>/cache``."""
        return Path(self.cache.directory or Path(self.root) / "cache")

    def index_store_path(self) -> Path:
        """The local index store: ``<root>/indexes``."""
        return Path(self.root) / "indexes"

    def fuse_mount_path(self) -> Path:
        """Where serve mounts its FUSE forest: ``fuse.mount_directory``, else ``<root>/fuse``."""
        return Path(self.fuse.mount_directory or Path(self.root) / "fuse")


def load_config(path: str | Path | None, **overrides: Any) -> Config:
    """Read a TOML config (None: all defaults), apply overrides, validate; raises ConfigError naming the key.

    Args:
        path: the TOML file, or None for the defaults.
        overrides: values that win over the file, by key: top-level names (``root="/r"``) or
            dotted ``section.key`` names (``**{"registry.plain_http": ["*"]}``). None means
            "not given" and is skipped. ``command_line_overrides`` builds them from flags.

    Raises:
        ConfigError: the file can't be read or parsed; a key is unknown; a value has the wrong
            type or is out of range (negative sizes, zero timeouts, an unknown log_level).
    """
    data: dict[str, Any] = {}
    if path is not None:
        try:
            with open(path, "rb") as f:
                data = tomllib.load(f)
        except OSError as error:
            raise ConfigError(f"cannot read config file {path}: {error.strerror}") from None
        except tomllib.TOMLDecodeError as error:
            raise ConfigError(f"config file {path} is not valid TOML: {error}") from None
    source = str(path or "<defaults>")
    config: Config = _build(Config, data, source, "")
    _validate(config, source, "")  # the file as written: a flag must not hide a mistake in it
    given = {key: value for key, value in overrides.items() if value is not None}
    for key, value in given.items():
        config = _override(config, key.split("."), value, "")
    if given:
        _validate(config, f"{source} with command-line flags", "")
    return config


def command_line_overrides(
    *,
    root: str | None = None,
    address: str | None = None,
    plain_http: bool = False,
    docker_config: str | None = None,
    no_background_fetch: bool = False,
    gzip_spacing: int | None = None,
    verbose: bool = False,
) -> dict[str, Any]:
    """Map the commands' flags onto config keys, for ``load_config(path, **overrides)``; raises nothing.

    The mount command and its daemon process both call this with the same flags, so the daemon
    re-loading the config file sees exactly what the command saw.
    """
    overrides: dict[str, Any] = {"root": root, "address": address}
    if plain_http:
        overrides["registry.plain_http"] = [ALL_HOSTS]
    if docker_config:
        overrides["registry.credentials_file"] = docker_config
    if no_background_fetch:
        overrides["background_fetch.enabled"] = False
    if gzip_spacing is not None:
        overrides["layers.gzip_spacing_bytes"] = gzip_spacing
    if verbose:
        overrides["log_level"] = "debug"
    return {key: value for key, value in overrides.items() if value is not None}


def prepare_root(config: Config) -> Path:
    """Create the state directory (0700) if needed and check it is writable; raises ConfigError naming it."""
    root = Path(config.root)
    try:
        # 0700: the state names every image layer on the host.
        root.mkdir(mode=0o700, parents=True, exist_ok=True)
    except OSError as error:
        raise ConfigError(f"root {config.root}: cannot create it: {error.strerror}") from None
    if not os.access(root, os.W_OK | os.X_OK):
        raise ConfigError(f"root {config.root}: not writable; choose another --root or fix its permissions")
    try:
        probe = root / f".lazysnap-write-probe-{os.getpid()}"
        probe.touch()
        probe.unlink()
    except OSError as error:
        raise ConfigError(f"root {config.root}: cannot write in it: {error.strerror}") from None
    return root


def check_socket_path(path: str | Path, what: str) -> None:
    """Refuse a unix socket path that does not fit sun_path; raises ConfigError saying which limit."""
    size = len(os.fsencode(os.path.abspath(path)))
    if size >= UNIX_SOCKET_PATH_LIMIT:
        raise ConfigError(
            f"{what}: socket path {os.path.abspath(path)} is {size} bytes, over the unix socket path "
            f"limit ({UNIX_SOCKET_PATH_LIMIT} bytes with the terminating NUL); choose a shorter path"
        )


def _build(cls: type[Any], data: dict[str, Any], source: str, prefix: str) -> Any:
    hints = typing.get_type_hints(cls)
    known = {f.name for f in dataclasses.fields(cls)}
    unknown = sorted(set(data) - known)
    if unknown:
        names = ", ".join(prefix + name for name in unknown)
        raise ConfigError(f"{source}: unknown config key(s) {names}; known: {', '.join(sorted(known))}")
    values = {name: _convert(hints[name], value, source, prefix + name) for name, value in data.items()}
    return cls(**values)


def _override(section: Any, path: list[str], value: Any, prefix: str) -> Any:
    """Return ``section`` with the key at ``path`` replaced by ``value`` (type-checked)."""
    name, rest = path[0], path[1:]
    hints = typing.get_type_hints(type(section))
    if name not in hints:
        raise ConfigError(f"command line: unknown config key {prefix + name}")
    hint = hints[name]
    if rest:
        if not (isinstance(hint, type) and dataclasses.is_dataclass(hint)):
            raise ConfigError(f"command line: {prefix + name} is not a section")
        value = _override(getattr(section, name), rest, value, f"{prefix}{name}.")
    else:
        value = _convert(hint, value, "command line", prefix + name)
    return dataclasses.replace(section, **{name: value})


def _convert(hint: Any, value: Any, source: str, key: str) -> Any:
    """Check ``value`` against the field type ``hint``, building nested sections."""
    if isinstance(hint, type) and dataclasses.is_dataclass(hint):
        if not isinstance(value, dict):
            raise ConfigError(f"{source}: [{key}] must be a table")
        return _build(hint, value, source, key + ".")
    origin = typing.get_origin(hint)
    if origin is list:
        (item,) = typing.get_args(hint)
        if not isinstance(value, list):
            raise ConfigError(f"{source}: {key} must be a list")
        return [_convert(item, v, source, f"{key}[{i}]") for i, v in enumerate(value)]
    if hint is float and isinstance(value, int) and not isinstance(value, bool):
        return float(value)  # TOML `timeout = 30` means 30.0
    if isinstance(hint, type) and not isinstance(hint, types.GenericAlias):
        # bool is an int subclass: don't let `retries = true` through as 1.
        if isinstance(value, hint) and not (hint is int and isinstance(value, bool)):
            return value
        raise ConfigError(f"{source}: {key} must be {hint.__name__}, not {type(value).__name__} {value!r}")
    raise ConfigError(f"{source}: {key}: unsupported field type {hint!r}")  # pragma: no cover


def _validate(section: Any, source: str, prefix: str) -> None:
    """Check every field's range and choices (from its metadata), recursing into sections."""
    for f in dataclasses.fields(section):
        value = getattr(section, f.name)
        key = prefix + f.name
        if dataclasses.is_dataclass(value):
            _validate(value, source, key + ".")
        elif "min" in f.metadata and value < f.metadata["min"]:
            raise ConfigError(f"{source}: {key} must be at least {f.metadata['min']}, not {value!r}")
        elif "above" in f.metadata and value <= f.metadata["above"]:
            raise ConfigError(f"{source}: {key} must be more than {f.metadata['above']}, not {value!r}")
        elif "choices" in f.metadata and value not in f.metadata["choices"]:
            choices = ", ".join(f.metadata["choices"])
            raise ConfigError(f"{source}: {key} must be one of {choices}, not {value!r}")
    if prefix == "" and not section.root:
        raise ConfigError(f"{source}: root must not be empty")
