"""lazysnap's configuration: every tunable in one place, read from a TOML file.

Example (every key is optional; the values shown are the defaults)::

    root = "/var/lib/lazysnap"
    address = "/run/lazysnap/lazysnap.sock"
    log_level = "info"

    [registry]
    plain_http = ["localhost:5000"]
    credentials_file = "/root/.docker/config.json"

    [fetch]
    timeout_seconds = 30.0

Command-line flags (``--root``, ``--address``) override the file. An unknown key or a value of
the wrong type is an error (``ConfigError``) naming the key, so a typo never passes silently.
"""

from __future__ import annotations

import dataclasses
import tomllib
import types
import typing
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from index.errors import LazysnapError


class ConfigError(LazysnapError):
    """The config file can't be read, or has an unknown key or a value of the wrong type."""


@dataclass(frozen=True)
class RegistryConfig:
    """How to reach registries."""

    # Default []: HTTPS everywhere. Hosts ("host:port") listed here are spoken to over plain HTTP,
    # for local test registries; never list a host reached over an untrusted network.
    plain_http: list[str] = field(default_factory=list)
    # Default "": ~/.docker/config.json of the daemon's user. A docker-style config with "auths"
    # (base64 user:password or identitytoken) used for registry token auth.
    credentials_file: str = ""


@dataclass(frozen=True)
class FetchConfig:
    """HTTP Range fetches of layer bytes."""

    # Default 30 s: a whole request, connect to last byte. Long enough for a 4 MiB span on a slow
    # link, short enough that a container read does not hang for minutes.
    timeout_seconds: float = 30.0
    # Default 10 s: a registry that does not accept a connection within this is treated as down.
    connect_timeout_seconds: float = 10.0
    # Default 3: retries after the first attempt on timeouts, resets and 5xx, before a read fails
    # with EIO. Bounded so that an unreachable registry gives errors, not hung processes.
    retries: int = 3
    # Default 0.2 s, doubling: spreads retries over ~1.4 s in total with the default retries.
    backoff_seconds: float = 0.2
    # Default 8: connections per registry host. More helps on high-latency links; registries
    # commonly throttle above ~10.
    max_connections_per_host: int = 8


@dataclass(frozen=True)
class CacheConfig:
    """The on-disk blob cache."""

    # Default "": <root>/cache. Must be on a filesystem that supports sparse files.
    directory: str = ""


@dataclass(frozen=True)
class BackgroundFetchConfig:
    """Filling whole layers in the background after they are mounted."""

    # Default true: after the first reads, fetch the rest so the container survives a registry outage.
    enabled: bool = True
    # Default 5 s: wait this long after mounting, so the start-up reads go first.
    delay_seconds: float = 5.0


@dataclass(frozen=True)
class FuseConfig:
    """The FUSE filesystem that shows remote layers."""

    # Default 3600 s: entry and attribute cache lifetime in the kernel. Layers never change once
    # mounted, and the kernel can still reclaim its caches under memory pressure; measured here,
    # `ls -lR` of 20,000 files takes 9 s with 0 s timeouts and 0.14 s with any timeout >= 1 s.
    entry_timeout_seconds: float = 3600.0
    # Default 60 s: a read that needs the registry fails with EIO after this, however retries go.
    read_timeout_seconds: float = 60.0
    # Default "": <root>/fuse. Where merged chains are mounted.
    mount_directory: str = ""


@dataclass(frozen=True)
class Config:
    """Every tunable of lazysnap; see each field's comment for its default and why."""

    # Default /var/lib/lazysnap: metadata.db, snapshots/, cache/ and fuse/ live here.
    root: str = "/var/lib/lazysnap"
    # Default /run/lazysnap/lazysnap.sock: what containerd's [proxy_plugins] address points at.
    address: str = "/run/lazysnap/lazysnap.sock"
    # Default "info": remote-snapshot-prepared=... lines are at info.
    log_level: str = "info"
    # Default 16: gRPC handler threads. Calls are short; containerd makes tens per container start.
    grpc_workers: int = 16
    # Default 5 s: on SIGTERM, in-flight calls get this long to finish.
    shutdown_grace_seconds: float = 5.0
    registry: RegistryConfig = field(default_factory=RegistryConfig)
    fetch: FetchConfig = field(default_factory=FetchConfig)
    cache: CacheConfig = field(default_factory=CacheConfig)
    background_fetch: BackgroundFetchConfig = field(default_factory=BackgroundFetchConfig)
    fuse: FuseConfig = field(default_factory=FuseConfig)


def load_config(path: str | Path | None, **overrides: Any) -> Config:
    """Read a TOML config (None: all defaults) and apply top-level overrides; raises ConfigError."""
    data: dict[str, Any] = {}
    if path is not None:
        try:
            with open(path, "rb") as f:
                data = tomllib.load(f)
        except OSError as error:
            raise ConfigError(f"cannot read config file {path}: {error.strerror}") from None
        except tomllib.TOMLDecodeError as error:
            raise ConfigError(f"config file {path} is not valid TOML: {error}") from None
    config: Config = _build(Config, data, str(path or "<defaults>"), "")
    clean = {k: v for k, v in overrides.items() if v is not None}
    return dataclasses.replace(config, **clean) if clean else config


def _build(cls: type[Any], data: dict[str, Any], source: str, prefix: str) -> Any:
    hints = typing.get_type_hints(cls)
    known = {f.name for f in dataclasses.fields(cls)}
    unknown = sorted(set(data) - known)
    if unknown:
        names = ", ".join(prefix + name for name in unknown)
        raise ConfigError(f"{source}: unknown config key(s) {names}; known: {', '.join(sorted(known))}")
    values = {name: _convert(hints[name], value, source, prefix + name) for name, value in data.items()}
    return cls(**values)


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
