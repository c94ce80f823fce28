"""Prompts to text-encoder states: 75-token chunks, clip skip, and caption tag shuffling.

CLIP sees 77 positions: a begin token, 75 prompt tokens, an end token. Prompts longer than 75
tokens (Max Token Length 150 or 225) are cut into 75-token chunks, each wrapped in its own
begin/end tokens and encoded separately; the states are joined as kohya's sd-scripts and the
WebUI do: the first chunk's begin state, the 75 prompt states of every chunk, the last chunk's
end state (1 + 75 n + 1 positions). The UNet's cross-attention takes any number of positions.

Clip skip N takes the hidden state N layers from the end (1 = the last layer) and passes it
through CLIP's final layer norm, as SD 1.x's users and the extension do.

SDXL (:class:`DualTextEncoder`) conditions on both encoders' penultimate hidden states side by
side (no final layer norm; Clip Skip N goes N - 1 layers further back, as diffusers' SDXL
``clip_skip=N-1``) and on the second encoder's pooled, projected output of the first chunk
(kohya's choice for long prompts). Every model's text encoder(s) go through
:func:`prompt_token_ids` and :func:`encode_token_ids`, which return a :class:`Conditioning`.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Any

import torch

CHUNK = 75  # prompt tokens per CLIP pass (77 positions less begin and end)


def chunked_input_ids(tokenizer, prompts: list[str], *, max_token_length: int = CHUNK,
                      pad_tokens: bool = True) -> torch.Tensor:
    """Token ids of ``prompts`` as ``(batch, chunks, 77)``: each chunk is begin token, up to 75
    prompt tokens, end token, then padding.

    Prompts are cut at ``max_token_length`` tokens. Pad Tokens pads to the full length (every
    chunk); without it a batch takes only as many chunks as its longest prompt needs, and a
    one-chunk batch is padded only to its longest prompt (the tokenizer's "longest").
    """
    bos, eos = tokenizer.bos_token_id, tokenizer.eos_token_id
    pad = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else eos
    bodies = [ids[:max_token_length] for ids in
              tokenizer(prompts, add_special_tokens=False, truncation=False).input_ids]
    max_chunks = max(1, math.ceil(max_token_length / CHUNK))
    longest = max((len(b) for b in bodies), default=0)
    chunks = max_chunks if pad_tokens else min(max_chunks, max(1, math.ceil(longest / CHUNK)))
    # One chunk without padding: as short as the longest prompt, like padding="longest".
    width = CHUNK if pad_tokens or chunks > 1 else longest
    rows = []
    for body in bodies:
        row = []
        for c in range(chunks):
            part = body[c * CHUNK:(c + 1) * CHUNK]
            row.append([bos] + part + [eos] + [pad] * (width - len(part)))
        rows.append(row)
    return torch.tensor(rows, dtype=torch.long)


def encode_chunks(text_encoder, input_ids: torch.Tensor, clip_skip: int = 1) -> torch.Tensor:
    """Text-encoder states for ``(batch, chunks, length)`` ids: ``(batch, positions, width)``
    with ``positions = length`` for one chunk, else ``1 + 75 * chunks + 1``."""
    if clip_skip > 1:
        norm = _final_layer_norm(text_encoder)
        return _chunked_states(text_encoder, input_ids,
                               lambda out: norm(out.hidden_states[-clip_skip]))[0]
    return _chunked_states(text_encoder, input_ids, lambda out: out[0], hidden=False)[0]


def encode_prompts(tokenizer, text_encoder, prompts: list[str], *, pad_tokens: bool = True,
                   max_token_length: int = CHUNK, clip_skip: int = 1) -> torch.Tensor:
    """The conditioning states the UNet trains with, for a batch of prompts."""
    ids = chunked_input_ids(tokenizer, prompts, max_token_length=max_token_length,
                            pad_tokens=pad_tokens)
    return encode_chunks(text_encoder, ids, clip_skip)


def num_text_layers(text_encoder) -> int:
    """Transformer layers of the text encoder(s) (the most Clip Skip can skip back to)."""
    return min(m.config.num_hidden_layers for m in text_parts(text_encoder).values())


def _unwrap(module):
    # DistributedDataParallel (accelerate) keeps the model in .module.
    return getattr(module, "module", module)


def _text_model(text_encoder):
    """The module holding CLIP's layers: transformers 4 keeps them in ``.text_model``, 5 puts
    them on CLIPTextModel itself (not on CLIPTextModelWithProjection)."""
    model = _unwrap(text_encoder)
    return getattr(model, "text_model", model)


def _final_layer_norm(text_encoder):
    return _text_model(text_encoder).final_layer_norm


def unused_text_modules(text_encoder, clip_skip: int) -> list[torch.nn.Module]:
    """The text-encoder layers whose output the conditioning never uses, so they get no
    gradient (which DistributedDataParallel refuses, and an optimizer would only carry):
    with Clip Skip N the last N - 1 layers of SD's CLIP; for SDXL the first encoder's last
    N layers and its final layer norm (its penultimate state is used; the second encoder's
    pooled output runs through all of its layers, as kohya's sdxl_train freezes them)."""
    parts = text_parts(text_encoder)
    if len(parts) == 1:
        skipped, norm = clip_skip - 1, False
    else:
        skipped, norm = clip_skip, True
    model = _text_model(parts["text_encoder"])
    unused = list(model.encoder.layers[len(model.encoder.layers) - skipped:]) if skipped else []
    return unused + ([model.final_layer_norm] if norm else [])


def freeze_final_layer_norm(text_encoder) -> list[torch.nn.Parameter]:
    """Stop CLIP's final layer norm (of each text encoder) from training (Freeze CLIP
    Normalization); return its parameters so they can be left out of the optimizer."""
    params = [p for part in text_parts(text_encoder).values()
              for p in _final_layer_norm(part).parameters()]
    for p in params:
        p.requires_grad_(False)
    return params




# ----------------------------------------------------------------------------- SDXL, both
class DualTextEncoder(torch.nn.Module):
    """SDXL's two text encoders as one module, so training handles them as it handles SD's one
    (one ``requires_grad_``, one optimizer group, one entry in a checkpoint, one module for
    accelerate to wrap). Its forward gives the UNet's states and the pooled embedding."""

    def __init__(self, text_encoder: torch.nn.Module, text_encoder_2: torch.nn.Module):
        super().__init__()
        # Named as their diffusers sub-folders: checkpoint keys and LoRA prefixes follow them.
        self.text_encoder = text_encoder
        self.text_encoder_2 = text_encoder_2

    def forward(self, input_ids: torch.Tensor, input_ids_2: torch.Tensor,
                clip_skip: int = 1) -> tuple[torch.Tensor, torch.Tensor]:
        """``(states, pooled)`` for ``(batch, chunks, length)`` ids of each tokenizer: the two
        encoders' hidden states concatenated feature-wise and the second's pooled projection."""
        pick = (lambda out: out.hidden_states[-(clip_skip + 1)])
        states, _ = _chunked_states(self.text_encoder, input_ids, pick)
        states_2, out = _chunked_states(self.text_encoder_2, input_ids_2, pick)
        # The pooled projection of each prompt's first chunk.
        pooled = out.text_embeds.reshape(input_ids_2.shape[0], input_ids_2.shape[1], -1)[:, 0]
        return torch.cat([states, states_2], dim=-1), pooled

    def gradient_checkpointing_enable(self) -> None:
        """Recompute both encoders' activations in the backward pass."""
        for encoder in (self.text_encoder, self.text_encoder_2):
            encoder.gradient_checkpointing_enable()


@dataclass
class Conditioning:
    """What the UNet is conditioned on for a batch of prompts: the text states, and for SDXL
    the pooled text embedding (the size/crop numbers come with each image)."""

    states: torch.Tensor
    pooled: torch.Tensor | None = None

    def unet_kwargs(self, time_ids: torch.Tensor | None) -> dict[str, Any]:
        """The UNet's keyword arguments beyond the states: SDXL's ``added_cond_kwargs``."""
        if self.pooled is None:
            return {}
        if time_ids is None:
            raise ValueError("SDXL needs the size/crop conditioning (time ids) of each image")
        return {"added_cond_kwargs": {"text_embeds": self.pooled,
                                      "time_ids": time_ids.to(self.pooled.device,
                                                              self.pooled.dtype)}}


def text_parts(text_module: torch.nn.Module) -> dict[str, torch.nn.Module]:
    """The text encoders inside a model's text module by diffusers sub-folder name:
    ``{"text_encoder": ...}``, and for SDXL also ``"text_encoder_2"``."""
    module = _unwrap(text_module)
    if isinstance(module, DualTextEncoder):
        return {"text_encoder": module.text_encoder, "text_encoder_2": module.text_encoder_2}
    return {"text_encoder": module}


def prompt_token_ids(tokenizers: tuple, prompts: list[str], *, max_token_length: int = CHUNK,
                     pad_tokens: bool = True) -> tuple[torch.Tensor, ...]:
    """:func:`chunked_input_ids` of ``prompts`` for each of a model's tokenizers."""
    return tuple(chunked_input_ids(t, prompts, max_token_length=max_token_length,
                                   pad_tokens=pad_tokens) for t in tokenizers)


def encode_token_ids(text_module: torch.nn.Module, ids: tuple[torch.Tensor, ...],
                     clip_skip: int = 1) -> Conditioning:
    """The :class:`Conditioning` of :func:`prompt_token_ids`' ids."""
    if len(ids) == 2:
        return Conditioning(*text_module(ids[0], ids[1], clip_skip))
    return Conditioning(encode_chunks(text_module, ids[0], clip_skip))


def _chunked_states(encoder, input_ids: torch.Tensor, pick, *, hidden: bool = True
                    ) -> tuple[torch.Tensor, Any]:
    """The states ``pick`` takes from the encoder's output for ``(batch, chunks, length)`` ids
    (all hidden states asked for when ``hidden``), with the chunks joined (:func:`_join_chunks`),
    and the encoder's whole output."""
    batch, chunks, length = input_ids.shape
    device = next(_unwrap(encoder).parameters()).device
    flat = input_ids.reshape(batch * chunks, length).to(device)
    out = encoder(flat, output_hidden_states=True) if hidden else encoder(flat)
    return _join_chunks(pick(out), batch, chunks, length), out


def _join_chunks(states: torch.Tensor, batch: int, chunks: int, length: int) -> torch.Tensor:
    states = states.reshape(batch, chunks, length, states.shape[-1])
    if chunks == 1:
        return states[:, 0]
    parts = [states[:, 0, :1]]  # the first begin token
    parts += [states[:, c, 1:length - 1] for c in range(chunks)]  # 75 prompt states each
    parts.append(states[:, -1, length - 1:])  # the last chunk's end token
    return torch.cat(parts, dim=1)
