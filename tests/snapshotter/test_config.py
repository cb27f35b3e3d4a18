"""The TOML config: defaults, sections, and clear errors for typos and wrong types."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import pytest

from snapshotter.config import Config, ConfigError, command_line_overrides, load_config


def write(tmp_path: Path, text: str) -> Path:
    path = tmp_path / "config.toml"
    path.write_text(text)
    return path


def test_no_file_gives_defaults_and_flags_override() -> None:
    """Without a file every field has its default; --root/--address win over the file."""
    assert load_config(None) == Config()
    config = load_config(None, root="/r", address=None)
    assert config.root == "/r" and config.address == Config().address


def test_sections_and_int_to_float(tmp_path: Path) -> None:
    """Nested tables fill their sections; an integer is accepted where a float is expected."""
    path = write(
        tmp_path,
        """
root = "/srv/lazysnap"
[registry]
plain_http = ["localhost:5000"]
[fetch]
timeout_seconds = 5
retries = 1
[background_fetch]
enabled = false
""",
    )
    config = load_config(path)
    assert config.root == "/srv/lazysnap"
    assert config.registry.plain_http == ["localhost:5000"]
    assert config.fetch.timeout_seconds == 5.0 and config.fetch.retries == 1
    assert config.background_fetch.enabled is False


@pytest.mark.parametrize(
    ("text", "message"),
    [
        ("roott = 1", "unknown config key.*roott"),
        ("[fetch]\ntimeout = 1", "unknown config key.*fetch.timeout"),
        ("[fetch]\nretries = true", "fetch.retries must be int"),
        ("[registry]\nplain_http = 'x'", "registry.plain_http must be a list"),
        ("fetch = 3", r"\[fetch\] must be a table"),
        ("root = ", "not valid TOML"),
    ],
)
def test_bad_files_name_the_key(tmp_path: Path, text: str, message: str) -> None:
    """Typos and wrong types are ConfigErrors that say which key."""
    with pytest.raises(ConfigError, match=message):
        load_config(write(tmp_path, text))


def test_missing_file(tmp_path: Path) -> None:
    """A config path that can't be read is a ConfigError."""
    with pytest.raises(ConfigError, match="cannot read"):
        load_config(tmp_path / "nope.toml")


@pytest.mark.parametrize(
    ("text", "message"),
    [
        ("[fetch]\nretries = -1", "fetch.retries must be at least 0"),
        ("[fetch]\ntimeout_seconds = 0", "fetch.timeout_seconds must be more than 0"),
        ("[fetch]\nmax_connections_per_host = 0", "fetch.max_connections_per_host must be at least 1"),
        ("[cache]\nmin_fetch_bytes = -4096", "cache.min_fetch_bytes must be at least 0"),
        ("[layers]\ngzip_spacing_bytes = 4096", "layers.gzip_spacing_bytes must be at least 65536"),
        ("[layers]\nparallel_layer_opens = 0", "layers.parallel_layer_opens must be at least 1"),
        ("[fuse]\nread_timeout_seconds = 0", "fuse.read_timeout_seconds must be more than 0"),
        ("[background_fetch]\nquiet_seconds = -1", "background_fetch.quiet_seconds must be at least 0"),
        ("log_level = 'loud'", "log_level must be one of debug, info, warning, error, critical"),
        ("grpc_workers = 0", "grpc_workers must be at least 1"),
        ("root = ''", "root must not be empty"),
    ],
)
def test_out_of_range_values_name_the_key(tmp_path: Path, text: str, message: str) -> None:
    """Negative sizes and counts, zero timeouts and unknown log levels are ConfigErrors naming the key."""
    with pytest.raises(ConfigError, match=message):
        load_config(write(tmp_path, text))


def test_dotted_overrides_win_over_the_file(tmp_path: Path) -> None:
    """Flags reach nested keys by dotted name and win over the file; None means "not given"."""
    path = write(tmp_path, "[registry]\nplain_http = ['a:5000']\n[background_fetch]\nenabled = true\n")
    config = load_config(
        path, **{"registry.plain_http": ["*"], "background_fetch.enabled": False, "root": None}
    )
    assert config.registry.plain_http == ["*"]
    assert config.background_fetch.enabled is False
    assert config.root == Config().root


def test_overrides_are_checked_like_the_file() -> None:
    """An override of an unknown key, the wrong type or out of range is a ConfigError too."""
    with pytest.raises(ConfigError, match=r"unknown config key fetch\.nope"):
        load_config(None, **{"fetch.nope": 1})
    with pytest.raises(ConfigError, match=r"fetch\.retries must be int"):
        load_config(None, **{"fetch.retries": "3"})
    with pytest.raises(ConfigError, match=r"layers\.gzip_spacing_bytes must be at least"):
        load_config(None, **command_line_overrides(gzip_spacing=1))


def test_command_line_flags_map_onto_keys() -> None:
    """Each command's flags set the config keys they stand for."""
    config = load_config(
        None,
        **command_line_overrides(
            root="/r",
            plain_http=True,
            docker_config="/d.json",
            no_background_fetch=True,
            gzip_spacing=2 << 20,
            verbose=True,
        ),
    )
    assert config.root == "/r"
    assert config.registry.plain_http == ["*"]
    assert config.registry.credentials_file == "/d.json"
    assert config.background_fetch.enabled is False
    assert config.layers.gzip_spacing_bytes == 2 << 20
    assert config.log_level == "debug"
    assert command_line_overrides() == {}


def test_serve_only_keys_are_accepted_by_every_command(tmp_path: Path) -> None:
    """One node's file, serve's keys included, loads for mount and index push alike."""
    path = write(
        tmp_path,
        """
address = "/run/x.sock"
grpc_workers = 4
shutdown_grace_seconds = 1
[fuse]
mount_directory = "/srv/fuse"
[index]
publish = true
""",
    )
    config = load_config(path, **command_line_overrides(root="/r", plain_http=True))
    assert config.fuse.mount_directory == "/srv/fuse" and config.index.publish is True


def test_defaults_match_the_modules_they_configure() -> None:
    """The config's defaults are the defaults of BlobCache, fusefs.mount and the registry client."""
    from fusefs import mount as fuse_mount
    from snapshotter.cache import blob_cache
    from snapshotter.remote.request import RetryPolicy

    config = Config()
    assert config.cache.min_fetch_bytes == blob_cache.MIN_FETCH_BYTES
    assert config.cache.merge_gap_chunks == blob_cache.MERGE_GAP_CHUNKS
    assert config.cache.background_request_bytes == blob_cache.BACKGROUND_REQUEST_BYTES
    assert config.background_fetch.quiet_seconds == blob_cache.BACKGROUND_QUIET_SECONDS
    assert config.fuse.max_tasks == fuse_mount.DEFAULT_MAX_TASKS
    assert config.fuse.read_ahead_kb == fuse_mount.DEFAULT_READ_AHEAD_KB
    assert config.fetch.retries == RetryPolicy().max_retries
    assert config.fetch.backoff_seconds == RetryPolicy().base_delay


def test_open_blob_cache_takes_the_config_tunables(tmp_path: Path) -> None:
    """open_blob_cache builds a cache whose blobs use the [cache] and [background_fetch] values."""
    from snapshotter.cache.blob_cache import open_blob_cache

    config = load_config(
        None,
        root=str(tmp_path),
        **{
            "cache.min_fetch_bytes": 0,
            "cache.merge_gap_chunks": 7,
            "cache.background_request_bytes": 1 << 20,
            "background_fetch.quiet_seconds": 0.5,
        },
    )
    cache = open_blob_cache(config)
    try:

        async def fetch(offset: int, length: int) -> bytes:
            raise AssertionError("not fetched")  # pragma: no cover

        blob = cache.open("sha256:" + "a" * 64, 100, fetch)
        assert cache.root == tmp_path / "cache"
        assert (blob.min_fetch, blob.merge_gap_chunks) == (0, 7)
        assert (blob.background_request_bytes, blob.background_quiet_seconds) == (1 << 20, 0.5)
    finally:
        cache.close()


async def test_open_registry_client_follows_the_config(tmp_path: Path) -> None:
    """open_registry_client speaks plain HTTP to the listed hosts (all of them for "*")."""
    from snapshotter.remote.client import open_registry_client

    no_credentials = {"registry.credentials_file": "/nonexistent/config.json"}
    config = load_config(None, **{"registry.plain_http": ["reg.example:5000"]}, **no_credentials)
    async with open_registry_client(config) as client:
        assert client.scheme_for("reg.example:5000") == "http"
        assert client.scheme_for("other.example") == "https"
    everywhere = load_config(None, **command_line_overrides(plain_http=True), **no_credentials)
    async with open_registry_client(everywhere) as client:
        assert client.scheme_for("other.example") == "http"


def config_keys(section: Any = None, prefix: str = "") -> list[str]:
    """Every key of the config, dotted ("fetch.retries")."""
    import dataclasses

    section = Config() if section is None else section
    keys: list[str] = []
    for f in dataclasses.fields(section):
        value = getattr(section, f.name)
        if dataclasses.is_dataclass(value):
            keys += config_keys(value, f"{prefix}{f.name}.")
        else:
            keys.append(prefix + f.name)
    return keys


def test_docs_list_every_key() -> None:
    """docs/config.md has a row for every key, under its section's heading."""
    docs = (Path(__file__).resolve().parents[2] / "docs" / "config.md").read_text()
    for key in config_keys():
        section, _, name = key.rpartition(".")
        heading = f"## `[{section}]`" if section else "## Top level"
        assert heading in docs, heading
        body = docs.split(heading, 1)[1].split("\n## ", 1)[0]
        assert f"| `{name}`" in body, key
