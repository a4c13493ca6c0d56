"""Collection rules for the doctests under ``src/`` (``tests/conftest.py`` configures the tests).

The doctests of the model integrations and the demo build tiny Hugging Face models: they are left
out where transformers (or Pillow) is missing, older than 5.10, or does not run with this torch
(transformers 5 needs torch >= 2.6), as the tests that need them skip there. Below torch 2.6 it
is not even imported (see ``tests/helpers.require_transformers``).
"""

import importlib.metadata
import importlib.util
import re


def _hf_usable() -> bool:
    import torch

    if torch.torch_version.TorchVersion(torch.__version__) < "2.6":
        return False
    if importlib.util.find_spec("transformers") is None or importlib.util.find_spec("PIL") is None:
        return False
    version = importlib.metadata.version("transformers")
    if tuple(int(part) for part in re.findall(r"\d+", version)[:2]) < (5, 10):
        return False
    from transformers.utils import is_torch_available

    return is_torch_available()


collect_ignore_glob = [] if _hf_usable() else ["src/vppo_core/integrations/*", "src/vppo_core/demo/*"]
