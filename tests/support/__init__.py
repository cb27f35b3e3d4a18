"""Shared test infrastructure: a real registry (plain, basic auth, Bearer tokens), an image builder, containerd.

- ``tests.support.registry``: start docker-registry for tests; the session fixtures in
  ``tests/conftest.py`` (``registry``, ``auth_registry``, ``token_registry``) use it.
- ``tests.support.image_builder``: build layers and images in Python and push them.
- ``tests.support.token_server``: the Bearer token server behind ``token_registry``.
"""
