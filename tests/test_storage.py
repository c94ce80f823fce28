"""Destinations: folders (Drive), the Hub (its network mocked), tokens never shown."""

from __future__ import annotations

import logging

import huggingface_hub
import pytest

from colab_dreambooth.runtime import hub_token, storage
from colab_dreambooth.runtime.storage import (
    BackgroundUploader,
    HubRepo,
    StorageError,
    copy_to_folder,
    hf_token,
    parse_destination,
    publish,
    redact,
)

FAKE_TOKEN = "hf_" + "Q" * 34  # built at run time: no token-shaped literal in the repo


class FakeApi:
    """Stands in for huggingface_hub.HfApi: records calls, fails the first ``fail`` uploads."""

    calls: list = []
    fail = 0

    def __init__(self, token=None):
        self.token = token

    def create_repo(self, repo_id, private, exist_ok, repo_type):
        FakeApi.calls.append(("create_repo", repo_id, private))

    def upload_folder(self, folder_path, repo_id, path_in_repo, commit_message):
        self._upload("upload_folder", folder_path, repo_id, path_in_repo)

    def upload_file(self, path_or_fileobj, repo_id, path_in_repo, commit_message):
        self._upload("upload_file", path_or_fileobj, repo_id, path_in_repo)

    def delete_folder(self, path_in_repo, repo_id, commit_message):
        FakeApi.calls.append(("delete_folder", path_in_repo))

    def _upload(self, kind, path, repo_id, path_in_repo):
        if FakeApi.fail > 0:
            FakeApi.fail -= 1
            raise ConnectionError(f"server said no to Bearer {self.token}")
        FakeApi.calls.append((kind, path_in_repo, repo_id))


@pytest.fixture
def fake_hub(monkeypatch):
    FakeApi.calls, FakeApi.fail = [], 0
    monkeypatch.setattr(huggingface_hub, "HfApi", FakeApi)
    monkeypatch.setenv("HF_TOKEN", FAKE_TOKEN)
    monkeypatch.setattr(storage.time, "sleep", lambda s: None)
    return FakeApi


def test_parse_destination():
    assert parse_destination("") is None and parse_destination(None) is None
    assert parse_destination("hf://me/my-model") == HubRepo("me/my-model")
    assert str(parse_destination("/content/drive/MyDrive/x")) == "/content/drive/MyDrive/x"
    with pytest.raises(StorageError, match="hf://<user"):
        parse_destination("hf://just-a-name")


def test_copy_to_folder_is_whole_and_replaces_old_copy(tmp_path):
    src = tmp_path / "model"
    src.mkdir()
    (src / "a.bin").write_bytes(b"new")
    dest = tmp_path / "drive"
    (dest / "model").mkdir(parents=True)
    (dest / "model" / "old.bin").write_bytes(b"old")
    out = copy_to_folder(src, dest)
    assert out == dest / "model"
    assert sorted(p.name for p in out.iterdir()) == ["a.bin"]
    assert [p.name for p in dest.iterdir()] == ["model"]  # no temporary folder left
    single = tmp_path / "m.safetensors"
    single.write_bytes(b"x" * 10)
    assert publish(single, dest) == str(dest / "m.safetensors")
    assert single.read_bytes() == (dest / "m.safetensors").read_bytes()


def test_publish_blank_destination_does_nothing(tmp_path):
    assert publish(tmp_path, "  ") is None


def test_publish_missing_source(tmp_path):
    with pytest.raises(StorageError, match="does not exist"):
        publish(tmp_path / "nope.safetensors", tmp_path / "out")


def test_hub_upload_private_with_retries_and_no_token_in_logs(tmp_path, fake_hub, caplog):
    f = tmp_path / "m.safetensors"
    f.write_bytes(b"x")
    fake_hub.fail = 2
    with caplog.at_level(logging.DEBUG):
        url = publish(f, "hf://me/model")
    assert url == "https://huggingface.co/me/model"
    assert ("create_repo", "me/model", True) in fake_hub.calls
    assert ("upload_file", "m.safetensors", "me/model") in fake_hub.calls
    assert "try 1 of 3" in caplog.text and "try 2 of 3" in caplog.text
    assert FAKE_TOKEN not in caplog.text and "***" in caplog.text


def test_hub_upload_failure_message_has_no_token(tmp_path, fake_hub):
    fake_hub.fail = 5
    with pytest.raises(StorageError) as info:
        publish(tmp_path, "hf://me/model", retries=2)
    assert "after 2 tries" in str(info.value)
    assert FAKE_TOKEN not in str(info.value)


def test_hub_needs_a_token(tmp_path, monkeypatch):
    for name in hub_token.TOKEN_ENV_VARS:
        monkeypatch.delenv(name, raising=False)
    monkeypatch.setattr(huggingface_hub, "get_token", lambda: None)
    with pytest.raises(StorageError, match="HF_TOKEN"):
        publish(tmp_path, "hf://me/model")


def test_token_sources(monkeypatch):
    monkeypatch.setenv("HF_TOKEN", FAKE_TOKEN)
    assert hf_token() == FAKE_TOKEN
    assert hf_token(" explicit ") == "explicit"
    assert redact(f"x {FAKE_TOKEN} y") == "x *** y"


def test_background_uploader_keeps_going_after_failure(tmp_path, fake_hub, caplog):
    folder = tmp_path / "checkpoint-000010"
    folder.mkdir()
    (folder / "state.json").write_text("{}")
    fake_hub.fail = 3  # the first job fails all its tries
    uploader = BackgroundUploader(HubRepo("me/ckpt"), retries=3, retry_delay=0)
    uploader.upload(folder, "checkpoints/checkpoint-000010")
    uploader.upload(folder, "checkpoints/checkpoint-000020",
                    then_delete=["checkpoints/checkpoint-000010"])
    uploader.close(timeout=30)
    assert len(uploader.failures) == 1 and FAKE_TOKEN not in uploader.failures[0]
    assert uploader.done == ["checkpoints/checkpoint-000020"]
    assert ("delete_folder", "checkpoints/checkpoint-000010") in fake_hub.calls
    assert FAKE_TOKEN not in caplog.text
