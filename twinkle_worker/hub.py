"""Hub model ids: `hf://org/name[@rev]`, a bare `org/name[@rev]` and `ms://org/name[@rev]`, resolved
into this worker's hub cache; and the check that every rank of a mesh loaded the same revision.

Used by twinkle_worker.model before it builds the model. A local directory is used as it is.
`hf://` and bare ids go through huggingface_hub.snapshot_download (its cache: HF_HUB_CACHE /
HF_HOME; a token from HF_TOKEN; HF_HUB_OFFLINE=1 uses the cache only), `ms://` through
modelscope's snapshot_download (MODELSCOPE_CACHE; a token from MODELSCOPE_API_TOKEN), when
modelscope is installed. Only what a safetensors model needs is downloaded (no pickled weights).
"""

from __future__ import annotations

import importlib.util
import logging
import os
import pathlib
import re
from dataclasses import dataclass

import torch
import torch.distributed as dist

from twinkle_protocol.errors import FailedPrecondition, InvalidArgument, NotFound, PermissionDenied, Unavailable

log = logging.getLogger(__name__)

# Files a causal LM needs: config, safetensors weights and their index, tokenizer and generation files.
ALLOW_PATTERNS = ["*.json", "*.safetensors", "*.txt", "*.model", "*.tiktoken", "*.py"]
_BARE_ID = re.compile(r"^[A-Za-z0-9][A-Za-z0-9_.\-]*/[A-Za-z0-9][A-Za-z0-9_.\-]*(@[A-Za-z0-9_.\-/]+)?$")
_COMMIT = 64  # bytes of a revision in the agreement (a git sha is 40 hex digits)


@dataclass(frozen=True)
class Resolved:
    """Where a model id was found: a local directory, and the hub commit it holds (None: a local path)."""

    path: str
    revision: str | None = None


def resolve(model_id: str) -> Resolved:
    """The local directory of model_id: itself when it is a directory, else downloaded into the hub cache."""
    if model_id.startswith("ms://"):
        repo, revision = _split(model_id[len("ms://") :], model_id)
        return _modelscope(model_id, repo, revision)
    if model_id.startswith("hf://"):
        return _huggingface(model_id, model_id)
    if os.path.isdir(model_id):
        return Resolved(model_id)
    if _BARE_ID.match(model_id) and not model_id.startswith((".", "/")):
        return _huggingface(model_id, "hf://" + model_id)
    raise NotFound(
        f"model_id {model_id!r} is neither a local directory nor a hub id ('hf://org/name[@revision]', "
        "'ms://org/name[@revision]' or 'org/name')",
        reason="MODEL_NOT_FOUND",
    )


def _split(text: str, model_id: str) -> tuple[str, str | None]:
    repo, _, revision = text.partition("@")
    if not _BARE_ID.match(repo):
        raise InvalidArgument(f"model_id {model_id!r}: the hub id must look like 'org/name[@revision]'")
    return repo, revision or None


def _huggingface(model_id: str, uri: str) -> Resolved:
    from huggingface_hub import errors, parse_hf_uri, snapshot_download

    try:
        parsed = parse_hf_uri(uri)
    except errors.HfUriError as error:
        raise InvalidArgument(f"model_id {model_id!r}: {error}") from None
    if parsed.type != "model" or parsed.path_in_repo:
        raise InvalidArgument(f"model_id {model_id!r}: name a model repository (hf://org/name[@revision])")
    try:
        path = snapshot_download(parsed.id, revision=parsed.revision, allow_patterns=ALLOW_PATTERNS)
    except errors.LocalEntryNotFoundError:
        raise NotFound(
            f"model_id {model_id!r}: not in this worker's Hugging Face cache and it cannot download "
            "(offline: HF_HUB_OFFLINE=1, or no network); download it on the worker's host first",
            reason="MODEL_NOT_FOUND",
        ) from None
    except errors.GatedRepoError:  # before RepositoryNotFoundError, its base class
        raise PermissionDenied(
            f"model_id {model_id!r} is gated: give the workers a token with access (HF_TOKEN)"
        ) from None
    except (errors.RepositoryNotFoundError, errors.RevisionNotFoundError) as error:
        raise NotFound(f"model_id {model_id!r}: {str(error).splitlines()[0]}", reason="MODEL_NOT_FOUND") from None
    except (errors.HfHubHTTPError, OSError) as error:
        raise Unavailable(f"model_id {model_id!r}: download failed: {str(error).splitlines()[0]}") from None
    return Resolved(path, pathlib.Path(path).name)


def _modelscope(model_id: str, repo: str, revision: str | None) -> Resolved:
    if importlib.util.find_spec("modelscope") is None:
        raise FailedPrecondition(
            f"model_id {model_id!r}: ms:// ids are downloaded with the 'modelscope' package, which this "
            "worker does not have (pip install modelscope), or use hf://, or a local directory"
        )
    from modelscope import snapshot_download  # type: ignore[import-not-found]

    try:
        path = snapshot_download(repo, revision=revision, allow_patterns=ALLOW_PATTERNS)
    except Exception as error:  # modelscope raises its own and requests' errors; say which and go on serving
        raise NotFound(
            f"model_id {model_id!r}: modelscope could not provide it: {error}".splitlines()[0], reason="MODEL_NOT_FOUND"
        ) from None
    return Resolved(path, revision)


def check_same_revision(resolved: Resolved, rank: int, device: torch.device) -> None:
    """On a mesh, every rank must have loaded the same hub revision: refuse Init (on every rank) otherwise.

    Each rank resolves the id itself (into its own host's cache); a moving branch such as `main` could
    give different commits on different hosts. One all_gather of the commit each rank found.
    """
    if not dist.is_initialized() or dist.get_world_size() == 1:
        return
    mine = (resolved.revision or "").encode()[:_COMMIT].ljust(_COMMIT, b"\0")
    local = torch.tensor(list(mine), dtype=torch.uint8, device=device)
    gathered = [torch.empty_like(local) for _ in range(dist.get_world_size())]
    dist.all_gather(gathered, local)
    revisions = [bytes(row.cpu().tolist()).rstrip(b"\0").decode() for row in gathered]
    if len(set(revisions)) > 1:
        found = ", ".join(f"rank {r}: {rev or '(a local directory)'}" for r, rev in enumerate(revisions))
        raise FailedPrecondition(
            f"rank {rank}: the ranks loaded different revisions of the model ({found}); pin one with "
            "model_id='hf://org/name@<commit>' so every rank loads the same weights"
        )
