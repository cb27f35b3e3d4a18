"""The node's state and containerd's view: registry client, cache, layers, snapshot service, CLI."""
