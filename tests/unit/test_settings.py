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
