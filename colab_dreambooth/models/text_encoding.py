"""Prompts to text-encoder states: 75-token chunks, clip skip, and caption tag shuffling.

CLIP sees 77 positions: a begin token, 75 prompt tokens, an end token. Prompts longer than 75
tokens (Max Token Length 150 or 225) are cut into 75-token chunks, each wrapped in its own
begin/end tokens and encoded separately; the states are joined as kohya's sd-scripts and the
WebUI do: the first chunk's begin state, the 75 prompt states of every chunk, the last chunk's
end state (1 + 75 n + 1 positions). The UNet's cross-attention takes any number of positions.

Clip skip N takes the hidden state N layers from the end (1 = the last layer) and passes it
through CLIP's final layer norm, as SD 1.x's users and the extension do.
"""

from __future__ import annotations

import math

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
    batch, chunks, length = input_ids.shape
    device = next(_unwrap(text_encoder).parameters()).device
    flat = input_ids.reshape(batch * chunks, length).to(device)
    if clip_skip > 1:
        out = text_encoder(flat, output_hidden_states=True)
        states = out.hidden_states[-clip_skip]
        states = _final_layer_norm(text_encoder)(states)
    else:
        states = text_encoder(flat)[0]
    states = states.reshape(batch, chunks, length, states.shape[-1])
    if chunks == 1:
        return states[:, 0]
    parts = [states[:, 0, :1]]  # the first begin token
    parts += [states[:, c, 1:length - 1] for c in range(chunks)]  # 75 prompt states each
    parts.append(states[:, -1, length - 1:])  # the last chunk's end token
    return torch.cat(parts, dim=1)


def encode_prompts(tokenizer, text_encoder, prompts: list[str], *, pad_tokens: bool = True,
                   max_token_length: int = CHUNK, clip_skip: int = 1) -> torch.Tensor:
    """The conditioning states the UNet trains with, for a batch of prompts."""
    ids = chunked_input_ids(tokenizer, prompts, max_token_length=max_token_length,
                            pad_tokens=pad_tokens)
    return encode_chunks(text_encoder, ids, clip_skip)


def num_text_layers(text_encoder) -> int:
    """Transformer layers of the text encoder (the most Clip Skip can skip back to)."""
    return _unwrap(text_encoder).config.num_hidden_layers


def _unwrap(module):
    # DistributedDataParallel (accelerate) keeps the model in .module.
    return getattr(module, "module", module)


def _final_layer_norm(text_encoder):
    model = _unwrap(text_encoder)
    # transformers 4 keeps the layers in .text_model; 5 puts them on the model itself.
    return getattr(model, "text_model", model).final_layer_norm


def freeze_final_layer_norm(text_encoder) -> list[torch.nn.Parameter]:
    """Stop CLIP's final layer norm from training (Freeze CLIP Normalization); return its
    parameters so they can be left out of the optimizer."""
    params = list(_final_layer_norm(text_encoder).parameters())
    for p in params:
        p.requires_grad_(False)
    return params


