"""Tensors streamed to and from disk one at a time: the optimizer's state and the weights come
back exactly, and the files are plain safetensors + JSON (nothing pickled)."""

from __future__ import annotations

import json

import torch

from colab_dreambooth.tensor_stream import load_into, load_optimizer, save_optimizer, save_tensors


def _trained_adamw(seed: int) -> tuple[torch.nn.Module, torch.optim.Optimizer]:
    torch.manual_seed(seed)
    model = torch.nn.Sequential(torch.nn.Linear(8, 16), torch.nn.ReLU(), torch.nn.Linear(16, 2))
    optimizer = torch.optim.AdamW([{"params": model[0].parameters(), "lr": 1e-3},
                                   {"params": model[2].parameters(), "lr": 5e-4,
                                    "weight_decay": 0.0}], betas=(0.8, 0.95))
    for _ in range(3):
        model(torch.randn(4, 8)).square().mean().backward()
        optimizer.step()
        optimizer.zero_grad()
    return model, optimizer


def test_optimizer_round_trip_continues_identically(tmp_path):
    model, optimizer = _trained_adamw(0)
    save_optimizer(optimizer, tmp_path)
    assert {p.name for p in tmp_path.iterdir()} == {"optimizer.safetensors", "optimizer.json"}
    record = json.loads((tmp_path / "optimizer.json").read_text())
    assert record["param_groups"][1]["lr"] == 5e-4 and record["param_groups"][0]["betas"] == [0.8, 0.95]

    copy, fresh = _trained_adamw(1)  # other weights, other states
    copy.load_state_dict(model.state_dict())
    load_optimizer(fresh, tmp_path)
    for a, b in zip(optimizer.state.values(), fresh.state.values()):
        assert a.keys() == b.keys()
        for key in a:
            assert torch.equal(a[key], b[key]), key
            assert a[key].device == b[key].device and a[key].dtype == b[key].dtype
    batch = torch.randn(4, 8)
    for m, o in ((model, optimizer), (copy, fresh)):
        m(batch).square().mean().backward()
        o.step()
    assert all(torch.equal(a, b) for a, b in zip(model.parameters(), copy.parameters()))


def test_weights_copied_into_place_and_missing_names_reported(tmp_path):
    source = {"a": torch.randn(3, 4), "b": torch.arange(5, dtype=torch.float16)}
    save_tensors(tmp_path / "w.safetensors", source, torch.float32)
    targets = {"a": torch.zeros(3, 4), "b": torch.zeros(5)}
    assert load_into(tmp_path / "w.safetensors", targets) == []
    assert torch.equal(targets["a"], source["a"]) and torch.equal(targets["b"], source["b"].float())
    untouched = {"a": torch.zeros(3, 4), "c": torch.zeros(1)}
    assert load_into(tmp_path / "w.safetensors", untouched) == ["c"]
    assert not untouched["a"].any()  # nothing copied when the file does not match
