"""The installed package's metadata: what pip and PyPI read."""

from importlib.metadata import metadata


def test_license_is_an_spdx_expression():
    meta = metadata("qlorafit")
    assert meta["License-Expression"] == "Apache-2.0"  # setuptools warns about the old table form
    assert not meta.get_all("License")
