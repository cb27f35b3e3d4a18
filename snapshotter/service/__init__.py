"""Stage 5, containerd's view: the snapshot service, its metadata, local and remote snapshots, the gRPC daemon."""
