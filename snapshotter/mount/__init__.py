"""``lazysnap mount``/``umount``/``stats``: one image shown at a directory, lazily (or eagerly for the baseline)."""
