"""Shared fixtures of the test suite: the repository on sys.path, quiet TensorFlow, and small generated datasets."""
import os
import sys

os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")
ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
if ROOT not in sys.path:
    sys.path.insert(0, ROOT)

import pytest  # noqa: E402

from tests.helpers import make_solid_dataset  # noqa: E402


@pytest.fixture(scope="module")
def solid_dataset(tmp_path_factory):
    return make_solid_dataset(str(tmp_path_factory.mktemp("solid")), per_class=8)
