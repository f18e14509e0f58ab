"""Where a model name points, found out in seconds before transformers tries to load it.

Given a name that is no local folder, ``from_pretrained`` goes to the Hugging Face hub, and
without network access it retries for about a minute before it fails. A name that is not a
built-in is therefore looked up first: a local folder loads as it is; a hub name loads when the
local hub cache has it, or when one short request finds it on the hub; anything else is a
:class:`ConfigError` that names the built-in choices and says that a hub name needs network access.
"""

from __future__ import annotations

from collections.abc import Iterable
from pathlib import Path

from huggingface_hub import HfApi, constants, try_to_load_from_cache
from huggingface_hub.errors import GatedRepoError, HFValidationError, RepositoryNotFoundError
from huggingface_hub.utils import validate_repo_id

from fisherlora.errors import ConfigError

# Seconds the one hub request may take; a reachable hub answers in well under a second.
HUB_TIMEOUT_S = 10.0


def check_model_source(name: str, builtin: Iterable[str], kind: str = "model") -> None:
    """Return when ``name`` can be loaded without a long wait (a local folder, a hub model in
    the local cache, or one the hub says exists); otherwise raise :class:`ConfigError`.

    ``builtin``: the registry names to list in the message; ``kind``: what is being loaded
    ("model", "causal LM"), for the message.
    """
    if Path(name).expanduser().is_dir():
        return  # a local folder: loading it reports what, if anything, is missing in it
    unknown = (
        f"unknown {kind} {name!r}: not a built-in name ({sorted(builtin)}), not a local folder"
    )
    try:
        validate_repo_id(name)
    except HFValidationError:
        raise ConfigError(f"{unknown}, and not a hub name ('name' or 'owner/name')") from None
    if isinstance(try_to_load_from_cache(name, constants.CONFIG_NAME), str):
        return  # in the local hub cache: loads without the network
    if constants.HF_HUB_OFFLINE:
        raise ConfigError(
            f"{unknown}, and not in the local hub cache; HF_HUB_OFFLINE is set, and a hub name "
            "needs network access the first time"
        )
    try:
        HfApi().model_info(name, timeout=HUB_TIMEOUT_S)
    except GatedRepoError:
        return  # it exists; loading says what access it needs
    except RepositoryNotFoundError:
        raise ConfigError(
            f"{unknown}, and the hub has no model of that name (a private one needs "
            "`hf auth login`)"
        ) from None
    except Exception as err:
        # Whatever keeps the request from an answer (no network, DNS, proxy, timeout, a hub
        # error) means the same to the user here; the HTTP client's exception types vary with
        # the huggingface_hub version, hence the broad clause.
        raise ConfigError(
            f"{unknown}, and the hub could not be reached to look it up "
            f"({type(err).__name__}: {err}); a hub name needs network access the first time "
            "(afterwards it loads from the local cache)"
        ) from None
