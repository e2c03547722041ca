"""Batch bytes are pinned: each augmentation family builds, from the images in tests/data/golden/, the same
bytes as before the data/ layout moved (recorded in tests/data/golden/batches.json), so existing buffers,
scale caches and validation stores stay valid across refactors.

This test only reads the record. It is written by a separate command, run only when a change is meant to
alter batch bytes (say so in the commit): `python -m tests.record_golden`.
"""
import pytest

from data.transforms.jpeg_window import get_turbojpeg
from tests.record_golden import FAMILIES, family_digest, recorded


@pytest.mark.parametrize("name", sorted(FAMILIES))
def test_each_augmentation_family_builds_the_recorded_bytes(name):
    if name == "scale_turbojpeg" and get_turbojpeg() is None:
        pytest.skip("the turbojpeg wheel is not installed")
    assert family_digest(name) == recorded()[name]


def test_the_families_differ_so_a_record_cannot_match_by_accident():
    record = recorded()
    assert sorted(record) == sorted(FAMILIES)
    assert len(set(record.values())) == len(record)
