"""What every stage uses: errors, validated types, cache paths, the one subprocess module, file locks,
a loopback HTTP server."""
