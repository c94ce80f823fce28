"""The Hub token on every runtime: Colab's secret read once per session, "not granted" and
"timed out" told apart from "no token", Kaggle's secrets read too, the token never logged.
Colab's and Kaggle's secret modules are stood in by fakes with their real exception names."""

from __future__ import annotations

import logging
import sys
import types

import pytest

from colab_dreambooth.runtime import hub_token, storage
from colab_dreambooth.runtime.hub_token import (
    COLAB_NOT_FOUND,
    COLAB_NOT_GRANTED,
    COLAB_TIMED_OUT,
    KAGGLE_NOT_ATTACHED,
    find_token,
)

SECRET = "hf_" + "S3cr3t" * 6


@pytest.fixture(autouse=True)
def clean(monkeypatch):
    for name in hub_token.TOKEN_ENV_VARS + hub_token.KAGGLE_VARIABLES:
        monkeypatch.delenv(name, raising=False)
    monkeypatch.setenv("HF_HOME", "/nonexistent-hf-home")  # no saved login
    monkeypatch.setenv("HF_TOKEN_PATH", "/nonexistent-hf-home/token")
    hub_token.forget_session_token()
    yield
    hub_token.forget_session_token()


def fake_colab(monkeypatch, answer):
    """Colab's ``google.colab.userdata``: ``answer`` is the token or an exception class name."""
    calls = []

    def get(key):
        calls.append(key)
        if answer in ("NotebookAccessError", "TimeoutException", "SecretNotFoundError"):
            raise type(answer, (Exception,), {})(f"secret {key}")
        return answer

    google = sys.modules.get("google") or types.ModuleType("google")
    google.__path__ = getattr(google, "__path__", [])
    colab = types.ModuleType("google.colab")
    colab.userdata = types.SimpleNamespace(get=get)
    monkeypatch.setitem(sys.modules, "google", google)
    monkeypatch.setitem(sys.modules, "google.colab", colab)
    monkeypatch.setitem(sys.modules, "google.colab.userdata", colab.userdata)
    return calls


def test_colab_secret_is_read_once_per_session(monkeypatch, caplog):
    calls = fake_colab(monkeypatch, SECRET)
    with caplog.at_level(logging.DEBUG):
        first = find_token()
        assert find_token().token == SECRET and storage.hf_token() == SECRET
        assert find_token(ask_again=True).token == SECRET  # a success is never asked again
    assert first.token == SECRET and first.source == "Colab secret HF_TOKEN"
    assert calls == ["HF_TOKEN"]
    assert SECRET not in repr(first) and SECRET not in caplog.text


@pytest.mark.parametrize("answer, message", [
    ("NotebookAccessError", COLAB_NOT_GRANTED), ("TimeoutException", COLAB_TIMED_OUT),
    ("SecretNotFoundError", COLAB_NOT_FOUND)])
def test_colab_failures_are_told_apart_and_asked_again_only_by_an_entry_point(
        monkeypatch, answer, message):
    calls = fake_colab(monkeypatch, answer)
    lookup = find_token()
    assert lookup.token is None and lookup.problem == message
    find_token()  # kept: a 10 s timeout is not waited for again on every upload
    assert len(calls) == 1
    find_token(ask_again=True)  # a new run: the user may have granted access since
    assert len(calls) == 2
    with pytest.raises(storage.StorageError) as caught:
        storage.upload_to_hub(__file__, storage.HubRepo("me/repo"), retries=1)
    assert str(caught.value) == message
    # A variable still wins over a failed secret.
    monkeypatch.setenv("HF_TOKEN", SECRET)
    assert find_token().source == "the HF_TOKEN variable"


def test_messages_say_what_to_do():
    assert "Notebook access" in COLAB_NOT_GRANTED and "HF_TOKEN" in COLAB_NOT_GRANTED
    assert "Grant access" in COLAB_TIMED_OUT and "10 s" in COLAB_TIMED_OUT
    assert "Add-ons > Secrets" in KAGGLE_NOT_ATTACHED
    assert len({COLAB_NOT_GRANTED, COLAB_TIMED_OUT, COLAB_NOT_FOUND, hub_token.NO_TOKEN}) == 4


def test_kaggle_secrets_are_read_on_kaggle(monkeypatch):
    colab_calls = fake_colab(monkeypatch, "NotebookAccessError")  # Kaggle's image has it too
    asked = []

    class UserSecretsClient:
        def get_secret(self, name):
            asked.append(name)
            return SECRET

    monkeypatch.setitem(sys.modules, "kaggle_secrets",
                        types.SimpleNamespace(UserSecretsClient=UserSecretsClient))
    monkeypatch.setenv("KAGGLE_KERNEL_RUN_TYPE", "Interactive")
    lookup = find_token()
    assert lookup.token == SECRET and lookup.source == "Kaggle secret HF_TOKEN"
    assert asked == ["HF_TOKEN"] and colab_calls == []


def test_kaggle_secret_not_attached(monkeypatch):
    class BackendError(Exception):
        pass

    class UserSecretsClient:
        def get_secret(self, name):
            raise BackendError("Unexpected response from the service")

    monkeypatch.setitem(sys.modules, "kaggle_secrets",
                        types.SimpleNamespace(UserSecretsClient=UserSecretsClient))
    monkeypatch.setenv("KAGGLE_URL_BASE", "https://www.kaggle.com")
    assert find_token().problem == KAGGLE_NOT_ATTACHED


def test_nowhere_says_every_place_to_put_it():
    lookup = find_token()
    assert lookup.token is None and lookup.problem == hub_token.NO_TOKEN
    assert find_token(" given ").token == "given"
