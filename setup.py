"""Puts recipes/, images/ and builder.lock into the wheel as builder/shipped/, so an installed builder finds them.

A checkout (and an editable install) reads them where they are; builder/__init__.py picks the one that exists.
"""

import shutil
from pathlib import Path

from setuptools import setup
from setuptools.command.build_py import build_py

SHIPPED = ("recipes", "images", "builder.lock")


class BuildWithShippedFiles(build_py):
    def run(self) -> None:
        super().run()
        if self.editable_mode:
            return
        dest = Path(self.build_lib) / "builder" / "shipped"
        for name in SHIPPED:
            source = Path(name)
            if source.is_dir():
                shutil.copytree(source, dest / name, dirs_exist_ok=True,
                                ignore=shutil.ignore_patterns("__pycache__", "*.pyc"))
            else:
                dest.mkdir(parents=True, exist_ok=True)
                shutil.copy2(source, dest / name)


setup(cmdclass={"build_py": BuildWithShippedFiles})
