"""Hugging Face Hub ids where a model folder is taken: --base / --model ORG/NAME, or ORG/NAME@REVISION.

A local path that exists always wins; a value that looks like ORG/NAME and names no local path is downloaded
(only the files growth, training and evaluation read) into the shared Hugging Face cache, and read from there
offline with HF_HUB_OFFLINE=1. HF_TOKEN (gated models) is read by huggingface_hub itself. Needs the `hub` extra.
"""

from __future__ import annotations

import os
import re
from pathlib import Path

from opt_deus_tool import CheckpointError

# Weights (single file or shards, never a repository's duplicate consolidated.safetensors or .bin files),
# config, tokenizer, generation defaults; README.md only for its license, never copied into an output.
ALLOW_PATTERNS = ["config.json", "model*.safetensors", "model.safetensors.index.json", "generation_config.json",
                  "tokenizer.json", "tokenizer_config.json", "tokenizer.model", "special_tokens_map.json",
                  "chat_template.jinja", "chat_template.json", "README.md"]
# ORG/NAME as the Hub spells repository ids, then an optional @REVISION (a branch, tag or commit).
HUB_ID = re.compile(r"(?P<repo>[A-Za-z0-9][\w.-]*/[A-Za-z0-9][\w.-]*)(?:@(?P<revision>[^\s@]+))?")


def hub_id(value) -> tuple[str, str | None] | None:
    """(repo id, revision or None) when `value` is to be read from the Hub: it looks like ORG/NAME[@REV] and
    no local path of that name exists. None: a local path (or a typo that the reader will name)."""
    text = str(value)
    match = HUB_ID.fullmatch(text)
    if match is None or Path(text).exists() or ".." in match["repo"]:
        return None
    return match["repo"], match["revision"]


def resolve_model(value, flag: str = "`model`") -> str:
    """The local folder of `value`: itself when it is not a Hub id (hub_id), else the cached snapshot of the
    repository, downloaded if it is not cached (and HF_HUB_OFFLINE is not set). Every failure is one
    CheckpointError naming `flag` and the id."""
    parsed = hub_id(value)
    if parsed is None:
        return str(value)
    repo, revision = parsed
    where = f"{flag} {value}: no such folder, and"
    try:
        from huggingface_hub import snapshot_download
        from huggingface_hub.utils import (GatedRepoError, LocalEntryNotFoundError, RepositoryNotFoundError,
                                           RevisionNotFoundError)
    except ImportError:
        raise CheckpointError(f"{where} reading it from the Hugging Face Hub needs huggingface_hub: "
                              f"pip install -e \".[hub]\"") from None
    # Read at each call, not when huggingface_hub was first imported: a caller (a test) may set them later.
    offline = os.environ.get("HF_HUB_OFFLINE", "").upper() in ("1", "ON", "YES", "TRUE")
    cache = os.environ.get("HF_HUB_CACHE") or None
    try:
        folder = Path(snapshot_download(repo, revision=revision, allow_patterns=ALLOW_PATTERNS, cache_dir=cache,
                                        local_files_only=offline))
    except GatedRepoError:
        raise CheckpointError(f"{where} {repo} is gated on the Hugging Face Hub: accept its terms on its page and "
                              f"set HF_TOKEN to a token of that account") from None
    except RepositoryNotFoundError:
        raise CheckpointError(f"{where} no model {repo} on the Hugging Face Hub (a private one needs HF_TOKEN); "
                              f"check the path or the id") from None
    except RevisionNotFoundError:
        raise CheckpointError(f"{where} {repo} has no revision {revision!r} on the Hugging Face Hub (a branch, "
                              f"tag or commit after @)") from None
    except LocalEntryNotFoundError as e:
        reason = ("HF_HUB_OFFLINE is set" if offline else
                  f"the Hub could not be reached ({str(e).splitlines()[0][:120]})")
        raise CheckpointError(f"{where} {repo}{'' if revision is None else '@' + revision} is not in the Hugging "
                              f"Face cache and {reason}: download it once with a connection") from None
    except (OSError, ValueError) as e:  # an invalid id (HFValidationError), other HTTP errors, a full disk
        message = str(e).strip().splitlines()[0] if str(e).strip() else type(e).__name__
        raise CheckpointError(f"{where} reading it from the Hugging Face Hub failed ({message})") from None
    if not (folder / "config.json").is_file():
        raise CheckpointError(f"{flag} {value}: the Hub repository {repo} has no config.json (not a transformers "
                              f"model)")
    if not any(folder.glob("model*.safetensors")):
        raise CheckpointError(f"{flag} {value}: the Hub repository {repo} has no safetensors weights "
                              f"(model*.safetensors); convert its weights to safetensors first")
    return str(folder)
