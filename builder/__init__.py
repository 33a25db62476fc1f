"""builder: recipes in, ready llama.cpp inference images out."""

from pathlib import Path

__version__ = "0.1.0"

# Where recipes/, images/ and builder.lock are: beside the package in a checkout or an editable install,
# in builder/shipped/ inside an installed wheel (setup.py puts them there).
_PACKAGE = Path(__file__).resolve().parent
PROJECT_ROOT = _PACKAGE / "shipped" if (_PACKAGE / "shipped").is_dir() else _PACKAGE.parent
