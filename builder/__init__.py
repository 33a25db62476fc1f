"""builder: recipes in, ready llama.cpp inference images out."""

from pathlib import Path

__version__ = "0.1.0"

# The project tree ships recipes/ and images/ beside the package (editable install or a checkout).
PROJECT_ROOT = Path(__file__).resolve().parent.parent
