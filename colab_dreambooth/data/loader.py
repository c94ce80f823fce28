"""The training run's loader: buckets, cached latents and a resumable batch order.

:func:`build_loader` turns the checked :class:`~colab_dreambooth.data.dataset.TrainingData` into
the batches a run trains on; :func:`encode_latents` turns a batch into the latents the step
noises. Batch order is a function of ``(seed, epoch)`` and the loader draws from its own
generator, never the global one, so a resumed run sees the same batches and the same noise.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass
from typing import TYPE_CHECKING

import torch
from tqdm.auto import tqdm

from colab_dreambooth.data.buckets import assign_buckets, bucket_report
from colab_dreambooth.data.dataset import DreamBoothDataset, TrainingData, collate
from colab_dreambooth.data.images import to_tensor
from colab_dreambooth.data.samplers import (
    BucketBatchSampler,
    EpochBatchSampler,
    ResumableBatchSampler,
)

if TYPE_CHECKING:
    from colab_dreambooth.config.settings import DreamBoothConfig

log = logging.getLogger(__name__)


@dataclass
class TrainingBatches:
    """The dataset, its batch sampler and the loader over both."""

    dataset: DreamBoothDataset
    sampler: ResumableBatchSampler
    loader: torch.utils.data.DataLoader

    def start_epoch(self, epoch: int, skip: int = 0) -> None:
        """Make the next pass over :attr:`loader` yield ``epoch``'s batches after the first
        ``skip`` of the sampler (counted over all processes): a resumed run's batches already
        trained are skipped without being loaded."""
        for each in (self.sampler, self.dataset, self.loader):
            each.set_epoch(epoch)
        self.sampler.skip_next(skip)


def build_loader(data: TrainingData, config: "DreamBoothConfig", seed: int, *, vae=None,
                 device: torch.device | str = "cpu", dtype: torch.dtype = torch.float32,
                 progress: bool = False) -> TrainingBatches:
    """The batches of ``data`` as ``config`` asks: aspect-ratio buckets (Enable Bucket), and
    with Cache latents the VAE run once over every image here (``vae`` on ``device`` in
    ``dtype``), which the caller may then move off the GPU."""
    bucket_of = None
    if config.enable_bucket:
        instance = [e.image for e in data.instance]
        classes = [e.image for pool in data.classes.values() for e in pool]
        bucket_of = assign_buckets(dict.fromkeys(instance + classes), config.resolution,
                                   config.min_bucket_reso, config.max_bucket_reso)
        log.info("%s", bucket_report(instance, classes, bucket_of))
    dataset = DreamBoothDataset(data, config.resolution, config.center_crop, config.hflip, seed,
                                shuffle_tags=config.shuffle_tags, keep_tokens=config.keep_tokens,
                                bucket_of=bucket_of)
    if config.cache_latents:
        dataset.use_latents(cache_latents(dataset, vae, device, dtype, progress))
    if bucket_of is not None:  # every batch from one bucket
        sampler: ResumableBatchSampler = BucketBatchSampler(
            [bucket_of[e.image] for e in data.instance], config.train_batch_size, seed)
    else:
        sampler = EpochBatchSampler(len(dataset), config.train_batch_size, seed)
    loader = torch.utils.data.DataLoader(dataset, batch_sampler=sampler, collate_fn=collate,
                                         generator=torch.Generator().manual_seed(seed))
    return TrainingBatches(dataset, sampler, loader)


@torch.no_grad()
def cache_latents(dataset: DreamBoothDataset, vae, device: torch.device | str,
                  dtype: torch.dtype, progress: bool = True) -> dict:
    """Run the VAE once over every image (and its mirror image when flipping); keep the latent
    distributions, with each crop's SDXL size/crop conditioning, on the CPU."""
    cache = {}
    flips = (False, True) if dataset.flip else (False,)
    for image, size in tqdm(dataset.cache_entries(), desc="Caching latents",
                            disable=not progress):
        crop = dataset.crop(image, size=size)
        pixels = to_tensor(crop.image)
        for flipped in flips:
            x = (pixels.flip(-1) if flipped else pixels)[None].to(device, dtype=dtype)
            dist = vae.encode(x).latent_dist
            cache[dataset.latent_key(image, size, flipped)] = (
                dist.mean[0].float().cpu(), dist.std[0].float().cpu(),
                torch.tensor(crop.time_ids(flipped), dtype=torch.float32))
    return cache


@torch.no_grad()
def encode_latents(batch: dict, vae, device: torch.device, dtype: torch.dtype) -> torch.Tensor:
    """Scaled latents of a batch: sampled from the cached distribution or from the VAE (run
    in ``dtype``)."""
    if batch["latent_mean"] is not None:
        mean = batch["latent_mean"].to(device)
        latents = mean + batch["latent_std"].to(device) * torch.randn_like(mean)
    else:
        pixels = batch["pixels"].to(device, dtype=dtype)
        latents = vae.encode(pixels).latent_dist.sample().float()
    return latents * vae.config.scaling_factor


__all__ = ["TrainingBatches", "build_loader", "cache_latents", "encode_latents"]
