"""Stage 3, layers: each layer's index obtained the cheapest trusted way, served layers, and the chain-serving core."""
