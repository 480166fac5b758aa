"""Settings refused at startup because the server could not honour them (never accepted and ignored)."""

import pytest
from pydantic import ValidationError

from server.config import Settings


@pytest.mark.parametrize("flag", ["health_requires_key", "metrics_requires_key"])
def test_requiring_a_key_without_any_key_is_refused(flag: str) -> None:
    with pytest.raises(ValidationError, match=f"{flag} is set but no api_key or admin_key"):
        Settings(**{flag: True})
    for key in ("api_key", "admin_key"):  # with either key configured the flag has a key to require
        assert getattr(Settings(**{flag: True, key: "k-123"}), flag) is True


def test_lora_load_dir_is_off_by_default_and_must_be_an_existing_folder(tmp_path, monkeypatch) -> None:
    monkeypatch.delenv("LORA_SERVER_LORA_LOAD_DIR", raising=False)
    assert Settings().lora_load_dir is None
    assert Settings(_cli_parse_args=["--lora-load-dir", str(tmp_path)]).lora_load_dir == tmp_path
    monkeypatch.setenv("LORA_SERVER_LORA_LOAD_DIR", str(tmp_path))
    assert Settings().lora_load_dir == tmp_path
    (tmp_path / "file").write_text("x")
    for bad in (tmp_path / "missing", tmp_path / "file"):
        with pytest.raises(ValidationError, match="is not an existing directory"):
            Settings(lora_load_dir=bad)
