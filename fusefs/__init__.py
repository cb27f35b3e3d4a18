"""How a chain of layers looks as one read-only tree, served over FUSE."""
