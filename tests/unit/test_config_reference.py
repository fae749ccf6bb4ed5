"""docs/configuration.md is generated from the configuration models: a key added,
removed, renamed or given another default without regenerating it fails here."""

from __future__ import annotations

from gateway.config import models
from gateway.config.reference import OUTPUT, render


def test_the_reference_matches_the_models() -> None:
    assert OUTPUT.read_text("utf-8") == render(), (
        "docs/configuration.md is stale: run python -m gateway.config.reference --write"
    )


def test_every_table_and_key_is_in_it() -> None:
    text = render()
    tables = ("[listeners.NAME]", "[spool]", "[destinations.NAME]", "[channels.NAME]",
              "[channels.NAME.fields.NAME]", "[destinations.NAME.retry]", "[scanner]")  # fmt: skip
    for table in tables:
        assert f"## `{table}`" in text, table
    for model in (models.SpoolConfig, models.ChannelConfig, models.DestinationConfig):
        for key in model.model_fields:
            assert f"| `{key}` |" in text or f"{key}" in text, key
    assert "| `keystore` | path (optional) | none |" in text
    assert "| `retention_days` | int | `7` | ≥ 1, ≤ 366 |" in text
