"""A LightningCLI entry point for tests/test_callback.py: `python lit_cli_main.py fit --config CONFIG`."""

import os
import sys
import warnings

sys.path.insert(0, os.path.dirname(__file__))
warnings.filterwarnings("ignore")

from lit_models import LitDecoder, pl  # noqa: E402

if __name__ == "__main__":
    import importlib

    importlib.import_module(pl.__name__ + ".cli").LightningCLI(LitDecoder, save_config_callback=None)
