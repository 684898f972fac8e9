"""Package list only (the rest is pyproject.toml): every pipeline* package, plus the recipe files of
models/ installed as the data package `pipeline.models`, which find_packages cannot discover."""
from setuptools import find_packages, setup

setup(packages=find_packages(include=["pipeline*"]) + ["pipeline.models"])
