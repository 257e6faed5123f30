import os
import sys
import warnings

sys.path.insert(0, os.path.dirname(__file__))
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
warnings.filterwarnings("ignore", message=".*Profiler.*")

HEAVY_FIRST = ("test_distributed.py", "test_examples.py", "test_example_configs.py", "test_callback.py",
               "test_quiet.py", "test_data_dependent.py", "test_compiled.py", "test_estimate_accuracy.py",
               "test_cli_check.py", "test_plan.py", "test_untraceable_quiet.py", "test_callback_ddp.py",
               "test_preflight.py", "test_hf.py", "test_sizing.py")
"""The files whose tests launch processes or train for real, longest first. Under ``-n 2 --dist loadfile``
each file goes to one worker as a whole, in collection order: handing out the longest first lets both
workers finish together instead of one running a long file alone at the end."""


def pytest_collection_modifyitems(items) -> None:
    def rank(item) -> int:
        name = os.path.basename(str(item.fspath))
        return HEAVY_FIRST.index(name) if name in HEAVY_FIRST else len(HEAVY_FIRST)

    items.sort(key=rank)  # stable: the order within each file, and of the other files, is kept
