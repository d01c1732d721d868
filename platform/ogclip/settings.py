"""Process-wide settings, read from the environment with the ``OGCLIP_`` prefix (pydantic-settings).

Stage and model parameters live in per-stage config schemas (``ogclip.config``); settings hold only what
belongs to the machine or deployment: where data goes, which device, how to reach the graph.
"""

from __future__ import annotations

from functools import lru_cache
from pathlib import Path

from pydantic import Field, SecretStr
from pydantic_settings import BaseSettings, SettingsConfigDict


class Settings(BaseSettings):
    """Deployment settings. Every field can be set as ``OGCLIP_<FIELD>`` (e.g. ``OGCLIP_HOME=/data/ogclip``)."""

    model_config = SettingsConfigDict(env_prefix="OGCLIP_", extra="forbid")

    home: Path = Field(default=Path(".ogclip"), description="Root folder for data, checkpoints and bundles.")
    device: str = Field(default="auto", description="Torch device; 'auto' picks CUDA when present.")
    log_level: str = Field(default="INFO")
    neo4j_uri: str | None = Field(default=None, description="Bolt URI of a Neo4j server; unset = embedded server.")
    neo4j_user: str = Field(default="neo4j")
    neo4j_password: SecretStr | None = Field(default=None)
    neo4j_database: str = Field(default="neo4j")


@lru_cache(maxsize=1)
def get_settings() -> Settings:
    """The settings of this process, read once from the environment."""
    return Settings()
