"""Published indexes that lie, indexes of another repository, and pulls by digest.

An index published under the tag ``sha256-<manifest hex>.lazysnap`` is found through a tag, so
nothing pins it. It is either refused (the layer is then ``indexed during download``) or, when a
lie passes every structural check, a read of the file it lies about returns the right bytes or
EIO: never another file's bytes.
"""

from __future__ import annotations

import dataclasses
import errno
import hashlib
from collections.abc import Callable
from pathlib import Path

import pytest

from index.model import Entry, EntryType, LayerFormat, LayerIndex
from snapshotter.layers.sources import HOW_DOWNLOADED, HOW_STORED
from tests.support.hostile import (
    BIG,
    TWIN_A,
    TWIN_B,
    Victim,
    assert_all_correct,
    assert_daemon_alive,
    honest_index,
    layer_stats,
    publish,
    push_victim,
    read_file,
)
from tests.support.lazysnap_cli import CliSession, push, wait_for
from tests.support.registry import TestRegistry

Lie = Callable[[LayerIndex, Victim], LayerIndex]


def entry(index: LayerIndex, path: str) -> Entry:
    """The index entry at ``path``."""
    return next(e for e in index.entries if e.path == path)


def with_entries(index: LayerIndex, entries: list[Entry]) -> LayerIndex:
    """A copy of ``index`` holding ``entries``."""
    return dataclasses.replace(index, entries=entries)


def no_span_digests(index: LayerIndex, _: Victim) -> LayerIndex:
    """The index without span digests: fetched bytes could not be verified."""
    return dataclasses.replace(index, span_digests=[])


def span_size_4096(index: LayerIndex, victim: Victim) -> LayerIndex:
    """Honest span digests, but of 4 KiB spans instead of 64 KiB."""
    blob = victim.layer.blob
    digests = ["sha256:" + hashlib.sha256(blob[i : i + 4096]).hexdigest() for i in range(0, len(blob), 4096)]
    return dataclasses.replace(index, span_size=4096, span_digests=digests)


def format_tar(index: LayerIndex, _: Victim) -> LayerIndex:
    """The index claims the gzip blob is a plain tar."""
    return dataclasses.replace(index, format=LayerFormat.TAR, seek_points=[])


def other_diff_id(index: LayerIndex, _: Victim) -> LayerIndex:
    """The index names another tar's DiffID."""
    return dataclasses.replace(index, diff_id="sha256:" + "cd" * 32)


def larger_than_blob(index: LayerIndex, _: Victim) -> LayerIndex:
    """The index describes a blob one byte longer than the real one."""
    return dataclasses.replace(index, compressed_size=index.compressed_size + 1)


def a_reads_b(index: LayerIndex, _: Victim) -> LayerIndex:
    """File A (same size as B) is mapped to B's data offset."""
    b_offset = entry(index, TWIN_B).data_offset
    return with_entries(
        index,
        [dataclasses.replace(e, data_offset=b_offset) if e.path == TWIN_A else e for e in index.entries],
    )


def extra_setuid(index: LayerIndex, _: Victim) -> LayerIndex:
    """An extra setuid-root file ``bin/su`` whose data is B's."""
    b = entry(index, TWIN_B)
    return with_entries(index, [*index.entries, dataclasses.replace(b, path="bin/su", mode=0o4755)])


def file_beyond_blob(index: LayerIndex, victim: Victim) -> LayerIndex:
    """File A claims more bytes than the whole blob holds (reaching into B and past the tar's end)."""
    size = len(victim.layer.tar) * 2
    return with_entries(
        index, [dataclasses.replace(e, size=size) if e.path == TWIN_A else e for e in index.entries]
    )


REFUSED: dict[str, Lie] = {
    "no-span-digests": no_span_digests,
    "span-size-4096": span_size_4096,
    "format-tar-for-gzip": format_tar,
    "different-diff-id": other_diff_id,
    "blob-size-plus-one": larger_than_blob,
}


@pytest.mark.parametrize("lie", sorted(REFUSED))
@pytest.mark.parametrize("fmt", ["gzip", "zstd"])
def test_a_structurally_wrong_published_index_is_refused(
    fmt: str, lie: str, registry: TestRegistry, cli: CliSession, tmp_path: Path
) -> None:
    """A published index without usable span digests, in another format, of another DiffID or another size is refused: the layer is indexed during download and reads right."""
    victim = push_victim(registry, f"lie-{lie}", fmt, seed=11)
    publish(victim.ref, [REFUSED[lie](honest_index(victim), victim)])
    mountpoint = tmp_path / "mnt"
    mountpoint.mkdir()
    cli.mount_ok(victim.ref, mountpoint, "--no-background-fetch")
    (stats,) = layer_stats(cli, mountpoint)
    assert (stats["how"], stats["index_source"]) == (HOW_DOWNLOADED, "downloaded"), stats
    assert_all_correct(mountpoint, victim.files)


def test_an_honest_published_index_is_used(registry: TestRegistry, cli: CliSession, tmp_path: Path) -> None:
    """The control: an honest published index is used for a pull by tag, and every file reads right."""
    victim = push_victim(registry, "honest", "gzip", seed=12)
    publish(victim.ref, [honest_index(victim)])
    mountpoint = tmp_path / "mnt"
    mountpoint.mkdir()
    cli.mount_ok(victim.ref, mountpoint, "--no-background-fetch")
    (stats,) = layer_stats(cli, mountpoint)
    assert (stats["how"], stats["index_source"]) == (HOW_STORED, "published"), stats
    assert_all_correct(mountpoint, victim.files)


ENTRY_LIES: dict[str, tuple[Lie, str]] = {
    "a-mapped-to-b": (a_reads_b, TWIN_A),
    "extra-setuid-entry": (extra_setuid, "bin/su"),
    "file-size-beyond-blob": (file_beyond_blob, TWIN_A),
}


@pytest.mark.parametrize("lie", sorted(ENTRY_LIES))
@pytest.mark.parametrize("fmt", ["gzip", "zstd"])
def test_an_index_lying_about_one_file_gives_eio_for_that_file(
    fmt: str, lie: str, registry: TestRegistry, cli: CliSession, tmp_path: Path
) -> None:
    """A published index whose entries lie (A mapped onto B's bytes, an extra setuid file, a size beyond the blob) gives EIO for the file lied about, never B's bytes; the honest files read right and the daemon lives.

    An index whose lie overlaps two files' data is refused whole (the layer is then indexed during
    download and the invented file does not exist: ENOENT); one that passes the structural check is
    caught at the file's first read by the tar header before its bytes (EIO).
    """
    victim = push_victim(registry, f"entry-{lie}", fmt, seed=13)
    mutate, lied_about = ENTRY_LIES[lie]
    publish(victim.ref, [mutate(honest_index(victim), victim)])
    mountpoint = tmp_path / "mnt"
    mountpoint.mkdir()
    cli.mount_ok(victim.ref, mountpoint, "--no-background-fetch")
    outcome = read_file(mountpoint / lied_about)
    assert outcome != victim.files[TWIN_B], "served B's bytes as another file"
    in_image = lied_about in victim.files
    assert (
        outcome == victim.files.get(lied_about)
        or outcome == errno.EIO
        or (not in_image and outcome == errno.ENOENT)
    ), outcome
    assert_all_correct(mountpoint, {p: c for p, c in victim.files.items() if p != lied_about})
    assert_daemon_alive(cli, mountpoint)


@pytest.mark.parametrize("attacker_lie", ["honest", "a-mapped-to-b", "extra-setuid-entry"])
@pytest.mark.parametrize("attacker_background", [False, True])
def test_an_attacker_repository_index_is_never_used_for_the_victim(
    attacker_lie: str, attacker_background: bool, registry: TestRegistry, cli: CliSession, tmp_path: Path
) -> None:
    """An attacker image in evil/x that reuses the victim's layer blob and publishes an index, mounted first from the same root, does not make the victim image's layer lazy from that index: the victim's layer is indexed during download and reads right."""
    victim = push_victim(registry, "victim-y", "gzip", seed=14)
    attacker = push(registry.ref("evil-x"), [victim.layer])
    attacker_ref = str(dataclasses.replace(attacker.reference, digest=None))
    index = honest_index(victim)
    if attacker_lie != "honest":
        index = ENTRY_LIES[attacker_lie][0](index, victim)
    publish(attacker_ref, [index])
    evil_mnt, victim_mnt = tmp_path / "evil", tmp_path / "victim"
    evil_mnt.mkdir()
    victim_mnt.mkdir()
    cli.mount_ok(attacker_ref, evil_mnt, *([] if attacker_background else ["--no-background-fetch"]))
    # An honest index serves the attacker's own mount; a lying one is refused there too (its files
    # overlap), so the attacker's layer is indexed during download.
    expected = "published" if attacker_lie == "honest" else "downloaded"
    assert layer_stats(cli, evil_mnt)[0]["index_source"] == expected
    read_file(evil_mnt / TWIN_A)  # whatever the attacker's mount serves, it serves it to the attacker
    read_file(evil_mnt / BIG)
    assert cli.umount(evil_mnt).returncode == 0
    cli.mount_ok(victim.ref, victim_mnt, "--no-background-fetch")
    (stats,) = layer_stats(cli, victim_mnt)
    assert stats["index_source"] != "published", stats
    # Only a trusted index may serve it from the store: one built here from the verified blob (the
    # attacker's mount downloaded it when its lying index was refused, or filled it in the background).
    assert stats["how"] != HOW_STORED or attacker_background or attacker_lie != "honest", stats
    assert_all_correct(victim_mnt, victim.files)


@pytest.mark.parametrize("fmt", ["gzip", "zstd", "tar"])
def test_a_pull_by_digest_ignores_an_index_published_through_the_tag(
    fmt: str, registry: TestRegistry, cli: CliSession, tmp_path: Path
) -> None:
    """`lazysnap mount host/name@sha256:...` with the default config does not use an index published through the tag: the layer is indexed during download."""
    victim = push_victim(registry, f"by-digest-{fmt}", fmt, seed=15)
    publish(victim.ref, [honest_index(victim)])
    mountpoint = tmp_path / "mnt"
    mountpoint.mkdir()
    by_digest = f"{victim.image.reference.registry}/{victim.image.reference.repository}@{victim.image.manifest_digest}"
    cli.mount_ok(by_digest, mountpoint, "--no-background-fetch")
    (stats,) = layer_stats(cli, mountpoint)
    assert (stats["how"], stats["index_source"]) == (HOW_DOWNLOADED, "downloaded"), stats
    assert_all_correct(mountpoint, victim.files)


def extra_symlink(index: LayerIndex, _: Victim) -> LayerIndex:
    """An invented symlink ``etc/passwd -> /proc/self/root``: no data, so no header is read for it."""
    invented = Entry("etc/passwd", EntryType.SYMLINK, 0o777, link_target="/proc/self/root")
    return with_entries(index, [*index.entries, invented])


@pytest.mark.parametrize("fmt", ["gzip", "zstd"])
def test_a_listing_lie_stops_the_layer_when_it_completes(
    fmt: str, registry: TestRegistry, cli: CliSession, tmp_path: Path
) -> None:
    """An index listing an entry no tar header backs serves until the layer completes; then the completion check stops the layer (EIO) and stats say why."""
    victim = push_victim(registry, f"listing-{fmt}", fmt, seed=15)
    publish(victim.ref, [extra_symlink(honest_index(victim), victim)])
    mountpoint = tmp_path / "mnt"
    mountpoint.mkdir()
    cli.mount_ok(victim.ref, mountpoint)  # background fetch on: the layer completes soon
    assert layer_stats(cli, mountpoint)[0]["index_source"] == "published"
    assert wait_for(lambda: layer_stats(cli, mountpoint)[0]["failed"], 60), layer_stats(cli, mountpoint)
    (stats,) = layer_stats(cli, mountpoint)
    assert "in the index, not in the tar" in stats["failed"] and not stats["verified"], stats
    assert read_file(mountpoint / TWIN_A) == errno.EIO  # nothing more is served from the lying index
    assert "layer-verified=false" in cli.daemon_log()
    assert_daemon_alive(cli, mountpoint)
