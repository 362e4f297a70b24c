"""setup.cfg holds the metadata; this adds the shipped files (ringpatch/shipped.py's FOLDERS) to the
built package as ringpatch/_shipped/, so a pip-installed user has the recipes and launch configs
(`ringpatch init DIR` writes them out). An editable install reads them from the checkout instead."""

import shutil
from pathlib import Path

from setuptools import setup
from setuptools.command.build_py import build_py

ROOT = Path(__file__).resolve().parent
FOLDERS = ("recipes", "launch", "data/demo-base")  # as ringpatch/shipped.py FOLDERS


class BuildWithShipped(build_py):
    def run(self):
        super().run()
        if getattr(self, "editable_mode", False):
            return
        for folder in FOLDERS:
            target = Path(self.build_lib, "ringpatch", "_shipped", folder)
            shutil.rmtree(target, ignore_errors=True)
            shutil.copytree(ROOT / folder, target, ignore=shutil.ignore_patterns("__pycache__"))


setup(cmdclass={"build_py": BuildWithShipped})
