"""The TOML config: defaults, sections, and clear errors for typos and wrong types."""

from __future__ import annotations

from pathlib import Path

import pytest

from snapshotter.config import Config, ConfigError, load_config


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


def config_keys(section: object = None, prefix: str = "") -> list[str]:
    """Every key of the config, dotted ("fetch.retries")."""
    import dataclasses

    keys: list[str] = []
    for f in dataclasses.fields(section or Config()):  # type: ignore[arg-type]
        value = getattr(section or Config(), f.name)
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
