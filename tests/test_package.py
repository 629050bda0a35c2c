"""The installed package's metadata: what pip and PyPI read."""

from importlib.metadata import metadata


def test_license_is_an_spdx_expression():
    meta = metadata("qlorafit")
    assert meta["License-Expression"] == "Apache-2.0"  # setuptools warns about the old table form
    assert not meta.get_all("License")


def test_a_missing_peer_skips_only_its_comparison_and_fails_under_ci(monkeypatch):
    import pytest

    from tests.conftest import LazyPeer, peer

    missing = LazyPeer("qlorafit_no_such_peer")  # made at import time of a test module: nothing happens yet
    monkeypatch.delenv("CI", raising=False)
    with pytest.raises(pytest.skip.Exception, match="not installed"):
        getattr(missing, "quantize_4bit")  # noqa: B009
    monkeypatch.setenv("CI", "true")
    with pytest.raises(pytest.fail.Exception, match="CI must compare against it"):
        peer("qlorafit_no_such_peer")
    assert peer("json").dumps([1]) == "[1]"
