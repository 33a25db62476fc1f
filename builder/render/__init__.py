"""Stage 4, render (pure): a plan becomes the bytes of a build context; no downloads."""
