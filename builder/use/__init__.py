"""Using built images: run, toolbox, doctor, and the listings (targets, CI matrix)."""
