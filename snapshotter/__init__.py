"""The node's state and containerd's view: registry client, cache, layers, snapshot service, CLI."""

import sys

# httpx's __init__ imports its command-line client (httpx._main: rich, pygments, ~40 ms) whenever
# rich is installed, as it is for our own CLI. We never run that client; a None entry makes
# httpx fall back to its stub ``main``. Set here, before any of our modules imports httpx.
sys.modules.setdefault("httpx._main", None)  # type: ignore[arg-type]
