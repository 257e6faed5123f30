"""The package's public names: importing a submodule never hides the function of the same name."""

from __future__ import annotations

import importlib
import subprocess
import sys


def test_public_functions_survive_importing_their_modules() -> None:
    code = ("import importlib, memguard\n"
            "importlib.import_module('memguard.act.preflight')\n"
            "importlib.import_module('memguard.estimation')\n"
            "assert callable(memguard.preflight) and callable(memguard.estimate)\n"
            "assert memguard.preflight.__module__ == 'memguard.act.preflight'\n")
    done = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120)
    assert done.returncode == 0, done.stderr


def test_every_public_name_resolves() -> None:
    memguard = importlib.import_module("memguard")
    for name in memguard.__all__:
        assert getattr(memguard, name) is not None, name
