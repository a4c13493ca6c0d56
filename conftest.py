"""Collection rules for the doctests under ``src/`` (``tests/conftest.py`` configures the tests).

The doctests of the model integrations and the demo build tiny Hugging Face models: they are left
out where those cannot run (``tests.helpers.hf_skip_reason``: transformers missing, older than 5.10,
or not running with this torch) or Pillow is missing, as the tests that need them skip there.
"""

import importlib.util

from tests.helpers import hf_skip_reason

_HF_USABLE = hf_skip_reason() is None and importlib.util.find_spec("PIL") is not None

collect_ignore_glob = [] if _HF_USABLE else ["src/vppo_core/integrations/*", "src/vppo_core/demo/*"]
