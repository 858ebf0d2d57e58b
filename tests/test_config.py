"""Settings: what the README promises is what the code reads."""

from __future__ import annotations

from pathlib import Path

import pytest
from pydantic import ValidationError

from app.config import Settings

README = Path(__file__).resolve().parent.parent / "README.md"


def test_every_setting_is_documented_in_the_readme_table() -> None:
    readme = README.read_text()
    missing = [name for name in Settings.model_fields if f"`KGW_{name.upper()}`" not in readme]
    assert missing == []


def test_comma_separated_lists_and_urls_are_read_from_the_environment(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("KGW_ALLOWED_HOSTS", "mcp.example.com, mcp.example.com:*")
    monkeypatch.setenv("KGW_PUBLIC_URL", "https://mcp.example.com/")
    settings = Settings()
    assert settings.allowed_hosts == ["mcp.example.com", "mcp.example.com:*"]
    assert settings.mcp_url() == "https://mcp.example.com/mcp"
    assert "mcp.example.com" in settings.mcp_allowed_hosts()


@pytest.mark.parametrize(("name", "value"), [("KGW_PUBLIC_URL", "mcp.example.com"), ("KGW_KEY_ENVIRONMENT", "Prod!")])
def test_invalid_settings_are_refused_naming_the_setting(
    monkeypatch: pytest.MonkeyPatch, name: str, value: str
) -> None:
    monkeypatch.setenv(name, value)
    with pytest.raises(ValidationError, match=name.removeprefix("KGW_").lower()):
        Settings()


@pytest.mark.parametrize("name", ["KGW_ADMIN_TOKEN", "KGW_KEY_PEPPER"])
@pytest.mark.parametrize("value", ["", "short"])
def test_an_empty_or_short_secret_setting_is_refused(monkeypatch: pytest.MonkeyPatch, name: str, value: str) -> None:
    monkeypatch.setenv(name, value)
    with pytest.raises(ValidationError, match="at least 16 characters"):
        Settings()
