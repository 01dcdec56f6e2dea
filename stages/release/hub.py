"""Pushing a release folder to the Hugging Face hub (huggingface_hub's create_repo and upload_folder), or listing
what would be pushed (`release.dry_run`). The token comes from the environment only and is never written."""

import logging
from pathlib import Path

from pipeline import UserError
from stages.release.settings import ReleaseSettings

log = logging.getLogger(__name__)


def push(out_dir: Path, files: list[str], release: ReleaseSettings, message: str, token: str | None) -> dict:
    """Push the release folder to the hub (create_repo, then upload_folder); dry_run lists what it would push."""
    target = {
        "repo_id": release.repo_id,
        "revision": release.revision or "main",
        "private": release.private,
        "commit_message": message,
        "files": files,
        "dry_run": bool(release.dry_run),
    }
    if release.dry_run:
        log.info(
            f"release: dry run: would push {len(files)} files to {release.repo_id} (revision "
            f"{target['revision']}{', private' if release.private else ''}) with the commit message "
            f'"{message}":\n' + "\n".join(f"  {name}  ({(out_dir / name).stat().st_size} bytes)" for name in files)
        )
        log.info("release: dry run: nothing uploaded")
        return target
    from httpx2 import TransportError  # what huggingface_hub 2.4 raises when it cannot connect
    from huggingface_hub import HfApi, constants
    from huggingface_hub.errors import HfHubHTTPError, OfflineModeIsEnabled

    api = HfApi(token=token)
    unreachable = (TransportError, OfflineModeIsEnabled, ConnectionError, TimeoutError)
    try:
        url = api.create_repo(release.repo_id, private=release.private, exist_ok=True)
        if release.revision:
            api.create_branch(release.repo_id, branch=release.revision, exist_ok=True)
    except unreachable as err:
        raise UserError(
            f"Could not reach the Hugging Face hub at {constants.ENDPOINT} ({type(err).__name__}: "
            f"{err}); nothing was uploaded. The release folder {out_dir} is complete. Fix: check the "
            "network (and HF_ENDPOINT, HF_HUB_OFFLINE), then push it with pipeline.stages=[release] "
            "release=hub in the same run folder."
        ) from None
    except HfHubHTTPError as err:
        raise UserError(
            f"The hub refused to create {release.repo_id} ({_http_reason(err)}); nothing was uploaded. "
            "Fix: check that HF_TOKEN is valid and may write to that namespace, and the repo id "
            "(<your-name>/<model-name>)."
        ) from None
    try:
        commit = api.upload_folder(
            repo_id=release.repo_id, folder_path=out_dir, commit_message=message, revision=release.revision
        )
    except unreachable as err:
        raise UserError(
            f"The upload to {release.repo_id} was interrupted ({type(err).__name__}: {err}). Fix: run "
            "the release again (pipeline.stages=[release] release=hub in the same run folder); "
            "files already on the hub are not uploaded twice."
        ) from None
    log.info(f"release: pushed to {commit.commit_url}")
    return {**target, "url": str(url), "commit": commit.oid, "commit_url": commit.commit_url}


def _http_reason(err) -> str:
    response = getattr(err, "response", None)
    status = getattr(response, "status_code", None)
    return f"HTTP {status}" if status else type(err).__name__
