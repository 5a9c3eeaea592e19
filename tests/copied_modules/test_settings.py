"""settings.py: an endpoint setting read from its environment variable. One identical copy per example."""

from __future__ import annotations

from types import ModuleType

import pytest

from tests.shared.harness import EXAMPLES, REPO, load_copy


@pytest.fixture(params=EXAMPLES)
def settings(request: pytest.FixtureRequest) -> ModuleType:
    return load_copy(REPO / request.param / "settings.py")


def test_unset_or_empty_is_the_default(settings: ModuleType, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.delenv("SETTING", raising=False)
    assert settings.env_int("SETTING", 4) == 4 and settings.env_int("SETTING", None) is None
    monkeypatch.setenv("SETTING", "")  # an endpoint template's blank field
    assert settings.env_float("SETTING", 0.5) == 0.5 and settings.env_str("SETTING", "auto") == "auto"
    assert settings.env_flag("SETTING", True) is True and settings.env_flag("SETTING", False) is False


def test_a_set_value_is_parsed(settings: ModuleType, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("SETTING", "12")
    assert settings.env_int("SETTING", None) == 12 and settings.env_float("SETTING", 1.0) == 12.0
    for value, expected in (("true", True), ("YES", True), ("1", True), ("false", False), ("0", False)):
        monkeypatch.setenv("SETTING", value)
        assert settings.env_flag("SETTING", not expected) is expected
    monkeypatch.setenv("SETTING", "many")
    with pytest.raises(ValueError, match="many"):  # a worker stops at start on a setting it cannot read
        settings.env_int("SETTING", 4)
