"""The package list for setuptools; everything else is in pyproject.toml.

A setup.py only because pyproject.toml's package finder cannot install a folder under another
name: scripts/ (the command-line programs, run as `python scripts/generate.py` from a checkout)
is installed as the package `llama_cli`, whose main() functions are the console commands
(`llama-generate`, ...), so they run without the repository. The command-line code stays out of
llama/, which never imports kernels/ (generate.py applies kernels.optimize).
"""

from setuptools import find_packages, setup

setup(
    packages=[*find_packages(include=["llama", "llama.*", "weights", "weights.*", "kernels", "kernels.*"]), "llama_cli"],
    package_dir={"llama_cli": "scripts"},
)
