"""Hugging Face hub ids for ``load_vae``: ``"stabilityai/sd-vae-ft-mse"`` -> a local diffusers folder.

How a name is read (``latentae.io.load_vae`` asks ``resolve`` only when the name is not
an existing local path: a local folder called ``org/name`` always wins):

* it must look like a hub id, ``namespace/name`` (one slash, no ``./``, ``~``, ``:``);
* the **local cache first**: if the files are in the Hugging Face cache (``HF_HUB_CACHE``,
  else ``HF_HOME/hub``, else ``~/.cache/huggingface/hub``) at ``revision`` (a branch, tag
  or commit; default ``main``), they are used without any network access;
* otherwise, unless ``HF_HUB_OFFLINE`` is set, ``huggingface_hub`` downloads just the
  VAE's two files (``config.json`` and ``diffusion_pytorch_model.safetensors``), into
  that cache;
* ``subfolder``: where in the repo the VAE is. Default: the repo root when it holds an
  ``AutoencoderKL`` config, else ``vae/`` (pipeline repos such as
  ``stabilityai/stable-diffusion-xl-base-1.0`` keep their VAE there).

A repo that is neither cached nor reachable is one error naming the repo, the cache
folder and the command that fetches it. The environment is read at call time (so
``HF_HUB_OFFLINE`` / ``HF_HUB_CACHE`` set after ``huggingface_hub`` was imported count).
"""

from __future__ import annotations

import json
import os
import re
from pathlib import Path

CONFIG = "config.json"
WEIGHTS = "diffusion_pytorch_model.safetensors"

# namespace/name as the hub spells them (letters, digits, '-', '_', '.'; no '..' or '--' edges)
_REPO_ID = re.compile(r"^[A-Za-z0-9][A-Za-z0-9_.-]*/[A-Za-z0-9][A-Za-z0-9_.-]*$")
_TRUE = {"1", "ON", "YES", "TRUE"}


class HubError(FileNotFoundError):
    """A hub id that cannot be turned into a local VAE folder; the message says why and what to do."""

    def __init__(self, repo_id: str, reason: str):
        super().__init__(f"{repo_id}: {reason}")
        self.repo_id, self.reason = repo_id, reason


def looks_like_repo_id(name: str) -> bool:
    """``"org/name"``: one slash, no path syntax (``./x``, ``/abs``, ``~``, ``..``, ``C:``)."""
    return bool(_REPO_ID.match(name)) and ".." not in name and not name.endswith((".safetensors", ".ckpt", ".pt"))


def cache_dir() -> Path:
    """The hub cache folder, by huggingface_hub's rules, read from the environment now."""
    if os.environ.get("HF_HUB_CACHE"):
        return Path(os.path.expandvars(os.path.expanduser(os.environ["HF_HUB_CACHE"])))
    if os.environ.get("HUGGINGFACE_HUB_CACHE"):
        return Path(os.path.expandvars(os.path.expanduser(os.environ["HUGGINGFACE_HUB_CACHE"])))
    home = os.environ.get("HF_HOME") or os.path.join(
        os.environ.get("XDG_CACHE_HOME") or os.path.join(os.path.expanduser("~"), ".cache"), "huggingface"
    )
    return Path(os.path.expandvars(os.path.expanduser(home))) / "hub"


def offline() -> bool:
    """``HF_HUB_OFFLINE`` (or the older ``TRANSFORMERS_OFFLINE``) set to a true value."""
    value = os.environ.get("HF_HUB_OFFLINE") or os.environ.get("TRANSFORMERS_OFFLINE") or ""
    return value.upper() in _TRUE


def download_command(repo_id: str, subfolder: str | None, revision: str | None) -> str:
    """The shell command that puts exactly the files ``resolve`` needs into the cache."""
    import huggingface_hub

    # `hf` replaced `huggingface-cli` in huggingface_hub 0.34 (and the old name was dropped in 1.0).
    major, minor = (int(x) for x in re.findall(r"\d+", huggingface_hub.__version__)[:2])
    tool = "hf download" if (major, minor) >= (0, 34) else "huggingface-cli download"
    files = [f"{p}/{f}" if p else f for p in _places(subfolder) for f in (CONFIG, WEIGHTS)]
    rev = f" --revision {revision}" if revision else ""
    return f"{tool} {repo_id}{rev} --include " + " ".join(files)


def _fetch(repo_id: str, filename: str, revision: str | None, local_only: bool) -> Path | None:
    """One file of the repo as a local path; None if the repo has no such file (or, with
    ``local_only``, the cache lacks it). Other hub failures raise HubError."""
    from huggingface_hub import hf_hub_download
    from huggingface_hub.errors import (
        EntryNotFoundError,
        LocalEntryNotFoundError,
        RepositoryNotFoundError,
        RevisionNotFoundError,
    )

    try:
        return Path(
            hf_hub_download(repo_id, filename, revision=revision, cache_dir=cache_dir(), local_files_only=local_only)
        )
    except LocalEntryNotFoundError as e:
        if local_only:
            return None
        raise HubError(
            repo_id, f"not in the local Hugging Face cache ({cache_dir()}) and the hub could not be reached "
            f"({type(e).__name__}); fetch it where there is a connection with: "
            f"{download_command(repo_id, None, revision)}"
        ) from e
    except RepositoryNotFoundError as e:
        raise HubError(repo_id, "no such repository on the Hugging Face hub (or it is private: log in with `hf auth login`)") from e
    except RevisionNotFoundError as e:
        raise HubError(repo_id, f"the hub has no revision {revision!r}") from e
    except EntryNotFoundError:
        return None


def _places(subfolder: str | None) -> list[str]:
    """Where in the repo a VAE is looked for: the given subfolder, else the root, then ``vae/``
    (a pipeline repo)."""
    return [subfolder.strip("/")] if subfolder else ["", "vae"]


def _is_vae_config(path: Path) -> bool:
    try:
        return json.loads(path.read_text()).get("_class_name", "AutoencoderKL") == "AutoencoderKL"
    except (OSError, ValueError, AttributeError):
        return True  # let load_vae report the broken file, naming it


def _find(repo_id: str, subfolder: str | None, revision: str | None, local_only: bool) -> Path | None:
    """The local folder holding the VAE's config and weights; None when (with
    ``local_only``) the cache does not hold them at ``revision``."""
    for place in _places(subfolder):
        prefix = f"{place}/" if place else ""
        config = _fetch(repo_id, prefix + CONFIG, revision, local_only)
        if config is None or (not subfolder and not place and not _is_vae_config(config)):
            continue  # e.g. a pipeline repo: no VAE config at its root
        weights = _fetch(repo_id, prefix + WEIGHTS, revision, local_only)
        if weights is None:
            if local_only:
                return None  # config cached, weights not: try the hub
            raise HubError(repo_id, f"{prefix + CONFIG} but no {prefix + WEIGHTS} on the hub "
                           "(only safetensors weights are read)")
        return config.parent
    if local_only:
        return None
    where = f"{subfolder}/" if subfolder else "its root or vae/"
    raise HubError(repo_id, f"no VAE ({CONFIG} of an AutoencoderKL) in {where} at revision {revision or 'main'}")


def resolve(repo_id: str, *, subfolder: str | None = None, revision: str | None = None) -> Path:
    """A hub id -> a local folder ``load_vae`` reads (see the module docstring)."""
    found = _find(repo_id, subfolder, revision, local_only=True)
    if found is not None:
        return found
    at = f"{subfolder.strip('/')}/ " if subfolder else ""
    at += f"at revision {revision!r} " if revision else ""
    if offline():
        raise HubError(
            repo_id, f"{at}not in the local Hugging Face cache ({cache_dir()}) and HF_HUB_OFFLINE is set; "
            f"fetch it with: {download_command(repo_id, subfolder, revision)}"
        )
    return _find(repo_id, subfolder, revision, local_only=False)


def local_or_hub(path: str | Path, *, subfolder: str | None = None, revision: str | None = None) -> Path:
    """What ``load_vae(path, subfolder=, revision=)`` reads: an existing local path (joined with
    ``subfolder``) first, else a hub id through ``resolve``. Anything else is FileNotFoundError."""
    p = Path(path)
    if p.exists():
        if revision is not None:
            raise ValueError(f"revision={revision!r} applies to Hugging Face hub ids; {p} is a local path")
        if subfolder:
            p = p / subfolder
            if not p.exists():
                raise FileNotFoundError(f"VAE not found: {p} (subfolder {subfolder!r} of a local folder)")
        return p
    if not (isinstance(path, str) and looks_like_repo_id(path)):
        raise FileNotFoundError(f"VAE not found: {p}")
    try:
        return resolve(path, subfolder=subfolder, revision=revision)
    except HubError as e:
        raise HubError(e.repo_id, f"no such local file or folder, and as a Hugging Face hub id: {e.reason}") from e


__all__ = ["HubError", "cache_dir", "download_command", "local_or_hub", "looks_like_repo_id", "offline", "resolve"]
