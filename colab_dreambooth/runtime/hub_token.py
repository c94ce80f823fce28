"""The Hugging Face token, from wherever this runtime keeps it, read once per session.

Sources, first found wins: a token given by the caller; Kaggle's secrets (``HF_TOKEN``, on
Kaggle, whose image also has ``google.colab``); Colab's secrets (``HF_TOKEN``); the
``HF_TOKEN`` / ``HUGGING_FACE_HUB_TOKEN`` variables; ``huggingface-cli login``'s saved token.

Colab asks the user to grant the notebook access the first time and gives up after 10 s, so
its answer (the token, or why there is none: no such secret, access not granted, no answer in
time) is kept for the session instead of asking on every upload; an entry point
(``ask_again=True``) asks once more after a failure, since the user may have fixed it since.
The token itself never appears in a message, a log line or a ``repr``.
"""

from __future__ import annotations

import os
import threading
from dataclasses import dataclass, field

SECRET_NAME = "HF_TOKEN"
TOKEN_ENV_VARS = ("HF_TOKEN", "HUGGING_FACE_HUB_TOKEN")
KAGGLE_VARIABLES = ("KAGGLE_KERNEL_RUN_TYPE", "KAGGLE_URL_BASE", "KAGGLE_DATA_PROXY_URL")

NO_TOKEN = ("no Hugging Face token: add a secret named HF_TOKEN holding a write token "
            "(huggingface.co/settings/tokens) in Colab's Secrets (key icon in the left bar) or "
            "Kaggle's (Add-ons > Secrets), set the HF_TOKEN environment variable, or run "
            "`huggingface-cli login`")
COLAB_NOT_GRANTED = ("Colab has a secret HF_TOKEN but this notebook was not granted access "
                     "to it: open Secrets (key icon in Colab's left bar), switch on 'Notebook "
                     "access' for HF_TOKEN, then run the cell again")
COLAB_TIMED_OUT = ("Colab did not hand over the secret HF_TOKEN within its 10 s limit (the "
                   "access prompt was not answered in time): run the cell again and choose "
                   "'Grant access' when Colab asks")
COLAB_NOT_FOUND = ("Colab's Secrets hold no HF_TOKEN: add it there (key icon in the left bar, "
                   "'Add new secret', name HF_TOKEN, a write token from "
                   "huggingface.co/settings/tokens) and switch on 'Notebook access'")
KAGGLE_NOT_ATTACHED = ("Kaggle's secret HF_TOKEN could not be read: in the notebook editor "
                       "open Add-ons > Secrets, add HF_TOKEN (a write token from "
                       "huggingface.co/settings/tokens) and tick it for this notebook")


@dataclass(frozen=True)
class TokenLookup:
    """A token (or None) and where it came from; ``problem`` says why there is none and what
    to do. The token is left out of ``repr`` so it cannot reach a log by accident."""

    token: str | None = field(repr=False)
    source: str = ""
    problem: str = ""


_lock = threading.Lock()
_session: TokenLookup | None = None  # the runtime's secret store's answer, kept


def find_token(explicit: str | None = None, *, ask_again: bool = False) -> TokenLookup:
    """The Hub token and its source (see the module docstring for the order). ``ask_again``
    re-reads the runtime's secrets when the kept answer was a failure."""
    if explicit and explicit.strip():
        return TokenLookup(explicit.strip(), "given")
    secret = _secret_store(ask_again)
    if secret.token:
        return secret
    for name in TOKEN_ENV_VARS:
        value = os.environ.get(name, "").strip()
        if value:
            return TokenLookup(value, f"the {name} variable")
    try:
        from huggingface_hub import get_token

        saved = get_token()
    except Exception:  # an unreadable token file is the same as none
        saved = None
    if saved:
        return TokenLookup(saved, "huggingface-cli login")
    return TokenLookup(None, "", secret.problem or NO_TOKEN)


def forget_session_token() -> None:
    """Drop the kept answer of the runtime's secrets (tests; a changed secret)."""
    global _session
    with _lock:
        _session = None


def _secret_store(ask_again: bool) -> TokenLookup:
    """Kaggle's or Colab's answer, asked once per session (again after a failure when
    ``ask_again``)."""
    global _session
    with _lock:
        if _session is None or (ask_again and not _session.token):
            _session = _ask_kaggle() if _on_kaggle() else _ask_colab()
        return _session


def _on_kaggle() -> bool:
    return any(os.environ.get(v) for v in KAGGLE_VARIABLES)


def _ask_kaggle() -> TokenLookup:
    try:
        from kaggle_secrets import UserSecretsClient  # type: ignore[import-not-found]
    except ImportError:
        return TokenLookup(None)
    try:
        token = UserSecretsClient().get_secret(SECRET_NAME)
    except Exception:  # BackendError and friends: not added, or not ticked for this notebook
        return TokenLookup(None, "", KAGGLE_NOT_ATTACHED)
    if token and token.strip():
        return TokenLookup(token.strip(), "Kaggle secret HF_TOKEN")
    return TokenLookup(None, "", KAGGLE_NOT_ATTACHED)


def _ask_colab() -> TokenLookup:
    try:
        from google.colab import userdata  # type: ignore[import-not-found]
    except Exception:  # not on Colab
        return TokenLookup(None)
    try:
        token = userdata.get(SECRET_NAME)
    except Exception as exc:  # told apart by class name: they moved between Colab releases
        kind = type(exc).__name__
        if kind == "NotebookAccessError":
            return TokenLookup(None, "", COLAB_NOT_GRANTED)
        if kind in ("TimeoutException", "TimeoutError"):
            return TokenLookup(None, "", COLAB_TIMED_OUT)
        if kind == "SecretNotFoundError":
            return TokenLookup(None, "", COLAB_NOT_FOUND)
        return TokenLookup(None, "", f"Colab's secrets could not be read ({kind}): {NO_TOKEN}")
    if token and token.strip():
        return TokenLookup(token.strip(), "Colab secret HF_TOKEN")
    return TokenLookup(None, "", COLAB_NOT_FOUND)


__all__ = ["NO_TOKEN", "TokenLookup", "find_token", "forget_session_token"]
