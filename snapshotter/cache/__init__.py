"""Stage 2, the node's disk: fetched blob ranges verified and kept (blob cache), layer indexes kept (index store)."""
