"""Development and test tooling: image builder, local registry, containerd launchers, demo, bench.

Daemon code never imports this package; the CLI imports it only for ``lazysnap demo`` and ``lazysnap bench``.
"""
