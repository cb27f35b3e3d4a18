"""Stage 1, the registry: references, media types, manifests, auth, HTTP requests, the registry client (HTTP only)."""
