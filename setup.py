"""Packaging beyond pyproject.toml: the wheel carries the data the library reads at run time, so
that an installed toolkit works from any directory. configs/ (model presets, scorer specs, the
shipped training and launch configs) and Unified-Bench/UniBench/ (the sample references and their
captions) stay where users read them in a checkout; the build copies them into uae/_data/, where
uae.paths finds them when the package is not a checkout."""

from pathlib import Path

from setuptools import setup
from setuptools.command.build_py import build_py

DATA = ("configs", "Unified-Bench/UniBench")


class BuildPyWithData(build_py):
    def run(self):
        super().run()
        for folder in DATA:
            self.copy_tree(folder, str(Path(self.build_lib) / "uae" / "_data" / folder))


setup(cmdclass={"build_py": BuildPyWithData})
