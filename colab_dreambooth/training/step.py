"""One DreamBooth training step, as the paper describes it, in one place.

Encode the batch's images to latents, add noise at random timesteps, predict the noise (or
the velocity) from the noisy latents and the prompts' text states (SDXL: also the pooled text
embedding and each image's size/crop numbers), take the MSE on the
instance rows plus Prior Loss Weight times the MSE on the class rows (prior preservation),
backward, clip, step. :class:`TrainingStep` is that step; ``train()`` runs it in its loop and
``benchmarks/gpu_train.py`` times it.
"""

from __future__ import annotations

from collections import OrderedDict
from dataclasses import dataclass, field
from typing import Any, Iterable

import torch
import torch.nn.functional as F

from colab_dreambooth.data.loader import encode_latents
from colab_dreambooth.models.text_encoding import (
    Conditioning,
    encode_token_ids,
    prompt_token_ids,
)
from colab_dreambooth.training.noise import add_noise, min_snr_weights, sample_noise, velocity

# Batches of prompts remembered (token ids; text states while the text encoder is frozen). A
# run with one instance and one class prompt needs one; captions and shuffled tags need more,
# and the oldest go first so memory stays bounded (~30 MB of SD 1.5 states at batch 1).
REMEMBERED_BATCHES = 128


def dreambooth_loss(unet, noise_scheduler, latents: torch.Tensor, text_states: torch.Tensor,
                    num_instance: int, prior_loss_weight: float, *, offset_noise: float = 0.0,
                    min_snr_gamma: float = 0.0, unet_kwargs: dict | None = None) -> torch.Tensor:
    """The DreamBooth objective on one batch (instance rows first, then class rows).

    Noise the latents at random timesteps (plus Offset Noise), predict the noise (or the
    velocity for v-prediction models, as the model's scheduler config says), and return the
    instance MSE plus Prior Loss Weight times the MSE on the class rows (prior
    preservation). With Min SNR Gamma each row's MSE is first weighted by its timestep's
    min-SNR weight (:func:`colab_dreambooth.training.noise.min_snr_weights`). ``unet_kwargs``
    is the rest of the conditioning (SDXL's ``added_cond_kwargs``).
    """
    noise = sample_noise(latents, offset_noise)
    timesteps = torch.randint(0, noise_scheduler.config.num_train_timesteps,
                              (latents.shape[0],), device=latents.device)
    noisy_latents = add_noise(noise_scheduler, latents, noise, timesteps)
    prediction = unet(noisy_latents, timesteps, text_states, **(unet_kwargs or {})).sample
    if noise_scheduler.config.prediction_type == "v_prediction":
        target = velocity(noise_scheduler, latents, noise, timesteps)
    else:
        target = noise
    # One MSE per row (every row has the same size, so their mean is the plain MSE), which
    # Min SNR Gamma weights by each row's timestep.
    rows = F.mse_loss(prediction.float(), target.float(), reduction="none")
    rows = rows.mean(dim=tuple(range(1, rows.dim())))
    if min_snr_gamma:
        rows = rows * min_snr_weights(noise_scheduler, timesteps, min_snr_gamma)
    loss = rows[:num_instance].mean()
    if rows.shape[0] > num_instance:
        loss = loss + prior_loss_weight * rows[num_instance:].mean()
    return loss


def prompts_known(config) -> bool:
    """True when every prompt's text states can be computed before the run (then
    :meth:`PromptStates.encode_all` encodes them and the frozen encoders leave the GPU): the
    text encoder(s) never train, and each prompt's states stand alone (Pad Tokens; no Shuffle
    Tags, which makes new prompts every epoch). Blank (auto) Train Text Encoder is not known
    to be off (a LoRA run and most presets train it)."""
    return (config.train_text_encoder is False and bool(config.pad_tokens)
            and not config.shuffle_tags)


class PromptStates:
    """The conditioning (text states; SDXL: also the pooled embedding) a batch of prompts
    trains with.

    Token ids are remembered per batch of prompts; the conditioning too while the text
    encoder(s) are frozen (they then give the same output for the same batch every time, so a
    remembered batch costs no encoder pass). Training text encoders encode every step.
    """

    def __init__(self, tokenizers: tuple, text_encoder, *, pad_tokens: bool,
                 max_token_length: int, clip_skip: int):
        self.tokenizers, self.text_encoder = tuple(tokenizers), text_encoder
        self.pad_tokens, self.max_token_length = pad_tokens, max_token_length
        self.clip_skip = clip_skip
        self._ids: OrderedDict[tuple[str, ...], tuple[torch.Tensor, ...]] = OrderedDict()
        self._states: OrderedDict[tuple[str, ...], Conditioning] = OrderedDict()
        self._encoded: dict[str, Conditioning] | None = None  # every prompt, on the CPU
        self._device: torch.device | str = "cpu"  # where encoded prompts are used

    def encode_all(self, prompts: Iterable[str], device: torch.device | str) -> None:
        """Encode every prompt the run will train with, once, and keep the results on the CPU,
        so the frozen text encoder(s) can leave the GPU (SDXL's two hold ~1.6 GB in fp16).
        Only for Pad Tokens, where a prompt's states do not depend on the batch around it."""
        if not self.pad_tokens:
            raise ValueError("prompts can only be encoded alone with Pad Tokens")
        encoded = {}
        with torch.no_grad():
            for prompt in dict.fromkeys(prompts):
                ids = prompt_token_ids(self.tokenizers, [prompt],
                                       max_token_length=self.max_token_length, pad_tokens=True)
                out = encode_token_ids(self.text_encoder, ids, self.clip_skip)
                encoded[prompt] = Conditioning(
                    out.states.cpu(), None if out.pooled is None else out.pooled.cpu())
        self._encoded, self._device = encoded, device

    def __call__(self, prompts: list[str], trains_text: bool) -> Conditioning:
        """The conditioning of ``prompts`` (with gradients when ``trains_text``)."""
        # Keyed by the whole batch: without Pad Tokens a prompt's padding depends on the
        # longest prompt beside it, so only the same batch gives the same states.
        key = tuple(prompts)
        if self._encoded is not None and not trains_text:
            rows = [self._encoded[p] for p in prompts]
            return Conditioning(
                torch.cat([r.states for r in rows]).to(self._device),
                None if rows[0].pooled is None else
                torch.cat([r.pooled for r in rows]).to(self._device))
        ids = self._ids.get(key)
        if ids is None:
            ids = _remember(self._ids, key, prompt_token_ids(
                self.tokenizers, prompts, max_token_length=self.max_token_length,
                pad_tokens=self.pad_tokens))
        if trains_text:
            return encode_token_ids(self.text_encoder, ids, self.clip_skip)
        states = self._states.get(key)
        if states is None:
            with torch.no_grad():
                states = _remember(self._states, key,
                                   encode_token_ids(self.text_encoder, ids, self.clip_skip))
        return states


def _remember(cache: OrderedDict, key: Any, value: Any) -> Any:
    cache[key] = value
    if len(cache) > REMEMBERED_BATCHES:
        cache.popitem(last=False)
    return value


@dataclass
class TrainingStep:
    """The DreamBooth step over prepared (accelerate-wrapped) models and optimizer."""

    accelerator: Any
    unet: torch.nn.Module
    text_encoder: torch.nn.Module
    vae: torch.nn.Module  # encodes in vae_dtype (fp32 for SDXL's own VAE under fp16)
    prompts: PromptStates
    noise_scheduler: Any
    optimizer: Any
    lr_scheduler: Any
    weight_dtype: torch.dtype
    prior_loss_weight: float = 1.0
    offset_noise: float = 0.0
    min_snr_gamma: float = 0.0
    max_grad_norm: float = 1.0
    vae_dtype: torch.dtype | None = None  # None: weight_dtype
    _trained: dict[bool, list[torch.nn.Parameter]] = field(default_factory=dict, repr=False)

    def __call__(self, batch: dict, trains_text: bool) -> torch.Tensor:
        """Train on one (micro-)batch; the optimizer steps when accumulation is complete.
        Returns the batch's loss, detached (no host sync)."""
        accelerator = self.accelerator
        with accelerator.accumulate(self.unet, self.text_encoder):
            latents = encode_latents(batch, self.vae, accelerator.device,
                                     self.vae_dtype or self.weight_dtype)
            condition = self.prompts(batch["prompts"], trains_text)
            loss = dreambooth_loss(self.unet, self.noise_scheduler, latents, condition.states,
                                   batch["num_instance"], self.prior_loss_weight,
                                   offset_noise=self.offset_noise,
                                   min_snr_gamma=self.min_snr_gamma,
                                   unet_kwargs=condition.unet_kwargs(batch.get("time_ids")))
            accelerator.backward(loss)
            if accelerator.sync_gradients and self.max_grad_norm > 0:
                accelerator.clip_grad_norm_(self.trained(trains_text), self.max_grad_norm)
            self.optimizer.step()
            self.lr_scheduler.step()
            self.optimizer.zero_grad(set_to_none=True)
        return loss.detach()

    def trained(self, trains_text: bool) -> list[torch.nn.Parameter]:
        """The weights that get gradients (listed once per text-encoder state)."""
        if trains_text not in self._trained:
            modules = (self.unet, self.text_encoder) if trains_text else (self.unet,)
            self._trained[trains_text] = [p for m in modules for p in m.parameters()
                                          if p.requires_grad]
        return self._trained[trains_text]


__all__ = ["PromptStates", "TrainingStep", "dreambooth_loss"]
