"""Stage 6, publish: an image and its SBOM pushed by digest, and OCI artifacts."""
