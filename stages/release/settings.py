"""The release stage's settings: the `release` block (conf/release/local.yaml and hub.yaml document every key)."""

import os
import re
from typing import Literal

from pydantic import field_validator, model_validator

from pipeline import UserError
from pipeline.settings import Settings

TOKEN_VARIABLES = ("HF_TOKEN", "HUGGING_FACE_HUB_TOKEN")  # huggingface_hub's own environment variables


class ReleaseSettings(Settings):
    publish: bool
    name: str | None = None
    pick: Literal["annealed", "merged", "best"]
    objective: str
    license: str
    language: str | list[str] | None
    repo_id: str | None = None
    private: bool = True
    revision: str | None = None
    dry_run: bool = False
    commit_message: str | None = None

    @field_validator("name")
    @classmethod
    def _usable_folder_name(cls, name: str | None) -> str | None:
        if name is not None and (not re.fullmatch(r"[A-Za-z0-9][\w.-]*", name) or ".." in name):
            raise UserError(
                f"release.name={name} is not a usable folder name. Fix: letters, digits, '-', '_' and "
                "'.', e.g. release.name=my-merge."
            )
        return name

    @model_validator(mode="after")
    def _where_to_push(self):
        """Publishing needs the repository and (unless a dry run) a token with write access, from the
        environment."""
        if self.publish and not self.repo_id:
            raise UserError(
                "release=hub needs the hub repository to push to, and release.repo_id is not set. Fix: "
                "add release.repo_id=<your-name>/<model-name> (or drop release=hub to release locally "
                "only)."
            )
        if self.publish and not self.dry_run:
            hub_token()
        return self


def hub_token() -> str:
    """The hub token, from the environment only (never from a file, never written anywhere)."""
    for variable in TOKEN_VARIABLES:
        if os.environ.get(variable, "").strip():
            return os.environ[variable].strip()
    raise UserError(
        "release=hub needs a Hugging Face token with write access, and HF_TOKEN is not set; nothing "
        "was written or uploaded. Fix: export HF_TOKEN=<token> (https://huggingface.co/settings/tokens) "
        "and run again, or add release.dry_run=true to see what would be pushed."
    )


def secrets() -> list[str]:
    """Token values present in the environment: they must never appear in a released file."""
    return [v.strip() for v in (os.environ.get(n, "") for n in TOKEN_VARIABLES) if len(v.strip()) >= 8]
