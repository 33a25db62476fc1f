"""An OCI distribution client: HTTP, credentials, blobs, manifests and tags."""
