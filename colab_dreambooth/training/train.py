"""The DreamBooth training run: config -> data -> models -> loop -> saved diffusers folder.

The loop body is the paper's step in one place: encode images to latents, add noise at random
timesteps, predict the noise (or velocity), take the MSE on the instance half of the batch plus
Prior Loss Weight times the MSE on the class half, backward, step. With Use LORA the same step
trains only LoRA adapters (:mod:`colab_dreambooth.models.lora`) and the run saves one LoRA file.
"""

from __future__ import annotations

import contextlib
import json
import logging
import math
import random
import shutil
import signal
import threading
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable

import torch
import torch.nn.functional as F
from tqdm.auto import tqdm

from colab_dreambooth.config.params import resolve_concepts, save_params, write_text_atomic
from colab_dreambooth.config.settings import DreamBoothConfig
from colab_dreambooth.config.validation import check_config, check_lora
from colab_dreambooth.data.buckets import assign_buckets, bucket_report
from colab_dreambooth.data.dataset import (
    DreamBoothDataset,
    TrainingData,
    collate,
    collect_training_data,
)
from colab_dreambooth.data.samplers import BucketBatchSampler, EpochBatchSampler
from colab_dreambooth.errors import ConfigError, Problem
from colab_dreambooth.files import save_folder_atomic
from colab_dreambooth.generation.class_images import generate_class_images
from colab_dreambooth.models.attention import set_memory_attention
from colab_dreambooth.models.loading import Components, load_components
from colab_dreambooth.models.lora import (
    add_lora,
    kohya_state_dict,
    lora_file_path,
    lora_metadata,
    save_lora,
)
from colab_dreambooth.models.text_encoding import (
    encode_prompts,
    freeze_final_layer_norm,
    num_text_layers,
)
from colab_dreambooth.runtime.device import DeviceInfo, detect_device
from colab_dreambooth.training.checkpoints import (
    Checkpointer,
    Progress,
    TrainingState,
    check_compatible,
    find_resume_checkpoint,
    hub_uploader,
    keep_checkpoint_choices,
    load_checkpoint,
    refuse_to_bury_unfinished_run,
    saved_seed,
)
from colab_dreambooth.training.fit import enforce, plan_memory
from colab_dreambooth.training.noise import (
    add_noise,
    make_noise_scheduler,
    min_snr_weights,
    sample_noise,
    velocity,
)
from colab_dreambooth.training.numerics import (
    allow_fp16_gradient_unscale,
    apply_numerics,
    half_model_dtype,
    warn_fp16_optimizer_state,
)
from colab_dreambooth.training.optim import EMA, make_lr_scheduler, make_optimizer, plan_steps
from colab_dreambooth.training.space import check_space

log = logging.getLogger(__name__)


@dataclass
class TrainResult:
    """What a finished (or stopped) run produced."""

    model_dir: Path  # the saved diffusers folder; with Use LORA the folder of the LoRA file
    steps: int
    total_steps: int
    epochs: int
    seed: int
    losses: list[float] = field(default_factory=list)
    stopped_early: bool = False
    lora_file: Path | None = None  # with Use LORA: <model dir>/lora/<model name>.safetensors
    checkpoint: Path | None = None  # the last checkpoint written (resume from it)
    resumed_from: Path | None = None  # the checkpoint this run continued, if any


def train(config: DreamBoothConfig, *, device: DeviceInfo | None = None,
          stop: threading.Event | None = None, progress: bool = True,
          on_step: Callable[[int, float, float], None] | None = None,
          resume: bool = False, force: bool = False) -> TrainResult:
    """Train ``config`` and save the result as a diffusers folder under ``config.model_dir``
    (with Use LORA: only the LoRA file, ``<model dir>/lora/<model name>.safetensors``).

    Everything that can be checked is checked before a model is loaded; class images a
    concept lacks are then generated with the base model. Checkpoints of the full training
    state go to :func:`~colab_dreambooth.training.checkpoints.checkpoint_root` every Save checkpoint
    every N steps/epochs, at the end and on stop; ``resume=True`` continues from the newest
    complete one (downloaded from Checkpoint Hub repo when there is none locally) exactly as
    if the run had never stopped. ``stop`` (set from another thread or a Stop button) or Ctrl-C
    end the run cleanly after the current step with a checkpoint and the model saved.
    ``on_step(step, loss, lr)`` is called after each optimizer step.

    Blank (auto) fields take the GPU preset's values, lowered until the memory estimate fits
    (:func:`~colab_dreambooth.training.fit.plan_memory`); a run whose own fields do not fit raises
    :class:`~colab_dreambooth.training.fit.GpuMemoryError` before any model is loaded, and a run
    whose files will not fit where they go (checkpoints on a 15 GB Drive, say) raises
    :class:`~colab_dreambooth.training.space.DiskSpaceError` before anything is written, unless
    ``force`` (for an expert who knows better than the estimates).
    """
    # Whatever a run changes outside itself (torch's global flags) is put back however it
    # ends, an exception included.
    with contextlib.ExitStack() as cleanup:
        return _train(config, cleanup, device=device, stop=stop, progress=progress,
                      on_step=on_step, resume=resume, force=force)


def _train(config: DreamBoothConfig, cleanup: contextlib.ExitStack, *, device: DeviceInfo | None,
           stop: threading.Event | None, progress: bool,
           on_step: Callable[[int, float, float], None] | None, resume: bool,
           force: bool = False) -> TrainResult:
    """The body of :func:`train`; ``cleanup`` undoes global changes when the run ends."""
    from accelerate import Accelerator
    from accelerate.utils import set_seed

    # ---- configuration and data, checked before any model is loaded
    device = device or (DeviceInfo.cpu() if config.use_cpu else detect_device())
    resume_from = find_resume_checkpoint(config) if resume else None
    if not resume:
        refuse_to_bury_unfinished_run(config)
    if resume_from is not None:
        # A resumed run on another GPU keeps what the interrupted run's preset chose.
        config = keep_checkpoint_choices(config, resume_from)
    # Blank (auto) memory/speed fields take the GPU preset's values, lowered until the
    # estimate fits; the user's win, and a run they make too big is refused here.
    memory = plan_memory(resolve_concepts(config), device)
    config = memory.config
    log.info("%s", memory)
    check_config(config, device)
    enforce(memory, force=force)
    # Every destination's bytes against its free space (Drive's quota, Kaggle's cap), before
    # class images or training write anything.
    bnb = memory.packages.get("bitsandbytes", False)
    check_space(config, eight_bit=bool(config.use_8bit_adam) and bnb and device.kind == "cuda"
                and not config.use_cpu, bitsandbytes=bnb, force=force, log=log)
    check_lora(config)
    if any(c.num_class_images for c in config.concepts_list):
        # Instance images are checked before any class image is generated (GPU time).
        collect_training_data(config, require_class_images=False)
        generate_class_images(config, progress=progress)  # only the missing ones
    data = collect_training_data(config)
    for warning in data.warnings:
        log.warning("%s", warning)
    if resume_from is not None:
        seed = saved_seed(resume_from)  # the interrupted run's seed, even when it was random
    else:
        seed = config.seed if config.seed is not None else random.randrange(2**32)
    log.info("Seed %d", seed)

    accelerator = Accelerator(mixed_precision=_mixed_precision(config, device),
                              gradient_accumulation_steps=config.gradient_accumulation_steps,
                              cpu=config.use_cpu)
    if resume_from is not None:  # before any model is loaded
        check_compatible(resume_from, config, accelerator.num_processes)
    set_seed(seed)
    on_cuda = accelerator.device.type == "cuda"
    weight_dtype = {"fp16": torch.float16, "bf16": torch.bfloat16}.get(
        accelerator.mixed_precision, torch.float32)

    # ---- models: frozen parts in the compute dtype, trained parts kept in fp32
    parts = load_components(config.base_model)
    unet, text_encoder, vae = parts.unet, parts.text_encoder, parts.vae
    if config.clip_skip > num_text_layers(text_encoder):
        raise ConfigError([Problem("clip_skip", f"{config.clip_skip} is more than the "
                                   f"{num_text_layers(text_encoder)} layers of this model's "
                                   "text encoder: lower it (1 = the last layer)")])
    # Global torch flags, put back when the run ends (so a later run without them is without).
    cleanup.callback(apply_numerics(tf32=config.allow_tf32,
                                    deterministic=config.deterministic).restore)
    vae.requires_grad_(False)
    text_encoder.requires_grad_(config.train_text_encoder)
    if config.train_text_encoder and config.freeze_clip_normalization:
        freeze_final_layer_norm(text_encoder)
    half = None if config.use_lora else half_model_dtype(config.full_fp16,
                                                         accelerator.mixed_precision)
    for module in (unet, text_encoder) if half else ():
        module.to(dtype=half)  # Half model: the trained weights themselves in fp16/bf16
    if config.use_lora:
        # The frozen base can sit in the compute dtype; only the fp32 adapters train.
        for module in (unet, text_encoder):
            module.to(accelerator.device)
            if weight_dtype != torch.float32:
                module.to(dtype=weight_dtype)
        add_lora(unet, text_encoder, config)
    unet.train()
    text_encoder.train(config.train_text_encoder)
    set_memory_attention(unet, config.attention, on_cuda)
    checkpointing = config.gradient_checkpointing
    if checkpointing if checkpointing is not None else on_cuda:
        unet.enable_gradient_checkpointing()
        if config.train_text_encoder:
            text_encoder.gradient_checkpointing_enable()
    frozen = [vae] + ([] if config.train_text_encoder else [text_encoder])
    for module in frozen:
        module.to(accelerator.device)
        if weight_dtype != torch.float32:
            module.to(dtype=weight_dtype)

    # ---- data loader, with the VAE run once up front when caching latents
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
        dataset.use_latents(cache_latents(dataset, vae, accelerator.device, weight_dtype,
                                          progress and accelerator.is_local_main_process))
        vae.to("cpu")  # no longer needed on the GPU
    # Batch order is a function of (seed, epoch) and the loader draws from its own generator,
    # never the global one, so a resumed run sees the same batches and the same noise.
    if bucket_of is not None:  # every batch from one bucket
        sampler = BucketBatchSampler([bucket_of[e.image] for e in data.instance],
                                     config.train_batch_size, seed)
    else:
        sampler = EpochBatchSampler(len(dataset), config.train_batch_size, seed)
    loader = torch.utils.data.DataLoader(dataset, batch_sampler=sampler, collate_fn=collate,
                                         generator=torch.Generator().manual_seed(seed))

    # ---- optimizer and schedule
    plan = plan_steps(math.ceil(len(loader) / accelerator.num_processes),
                      config.gradient_accumulation_steps, config.max_train_steps,
                      config.num_train_epochs)
    scale = (accelerator.num_processes * config.gradient_accumulation_steps
             * config.train_batch_size) if config.scale_lr else 1
    unet_lr, text_lr = ((config.lora_learning_rate, config.lora_txt_learning_rate)
                        if config.use_lora else
                        (config.learning_rate, config.text_encoder_learning_rate))
    groups = [{"params": [p for p in unet.parameters() if p.requires_grad],
               "lr": unet_lr * scale}]
    if config.train_text_encoder:
        groups.append({"params": [p for p in text_encoder.parameters() if p.requires_grad],
                        "lr": text_lr * scale})
        if config.tenc_weight_decay is not None:
            groups[-1]["weight_decay"] = config.tenc_weight_decay
    optimizer = make_optimizer(groups, config.optimizer, use_8bit=config.use_8bit_adam,
                               on_cuda=on_cuda, betas=(config.adam_beta1, config.adam_beta2),
                               weight_decay=config.weight_decay, eps=config.adam_epsilon,
                               warmup_steps=config.lr_warmup_steps)
    lr_scheduler = make_lr_scheduler(
        config.lr_scheduler, optimizer, warmup_steps=config.lr_warmup_steps * accelerator.num_processes,
        total_steps=plan.total_steps * accelerator.num_processes, cycles=config.lr_cycles,
        power=config.lr_power)
    if config.train_text_encoder:
        unet, text_encoder, optimizer, loader, lr_scheduler = accelerator.prepare(
            unet, text_encoder, optimizer, loader, lr_scheduler)
    else:
        unet, optimizer, loader, lr_scheduler = accelerator.prepare(
            unet, optimizer, loader, lr_scheduler)
    if half == torch.float16:
        allow_fp16_gradient_unscale(accelerator)
        warn_fp16_optimizer_state(optimizer, half)
    ema = EMA(unet.parameters(), config.ema_decay,
              "cpu" if config.ema_on_cpu else None) if config.use_ema else None

    # ---- where the run starts: step 0, or exactly where a checkpoint left it
    state = TrainingState(accelerator.unwrap_model(unet), accelerator.unwrap_model(text_encoder),
                          optimizer, lr_scheduler, accelerator.scaler, ema,
                          config.train_text_encoder, config.use_lora)
    run = Progress(seed=seed, total_steps=plan.total_steps)
    if resume_from is not None:
        run = load_checkpoint(resume_from, state, config, accelerator=accelerator)
        run.total_steps = plan.total_steps
        log.info("Resuming from %s: step %d of %d (epoch %d, batch %d)", resume_from, run.step,
                 plan.total_steps, run.epoch + 1, run.batch_in_epoch)
    uploader = hub_uploader(config, accelerator)
    checkpoints = Checkpointer(config, state, accelerator, uploader, len(loader))
    checkpoints.last = resume_from

    noise_scheduler = make_noise_scheduler(config.noise_scheduler, parts.noise_scheduler.config)
    text_encoder_stops_at = math.floor(config.stop_text_encoder * plan.total_steps)
    trains_text = config.train_text_encoder and run.step < text_encoder_stops_at
    if config.train_text_encoder and not trains_text:
        text_encoder.requires_grad_(False)
    log.info("%d instance images, %d class images, %d steps (%d epochs of %d steps)",
             len(data.instance), sum(map(len, data.classes.values())), plan.total_steps,
             plan.epochs, plan.steps_per_epoch)

    # ---- the loop
    stop = stop if stop is not None else threading.Event()
    step, losses, clean = run.step, run.losses, True
    bar = tqdm(total=plan.total_steps, initial=step, desc="Training", unit="step",
               disable=not (progress and accelerator.is_local_main_process))
    restore_ctrl_c = _ctrl_c_sets(stop)
    try:
        for epoch in range(run.epoch, plan.epochs if step < plan.total_steps else 0):
            # Resuming mid-epoch: the batches already trained are skipped, not loaded.
            skip = run.batch_in_epoch if epoch == run.epoch else 0
            for each in (sampler, dataset, loader):
                each.set_epoch(epoch)
            sampler.skip_next(skip * accelerator.num_processes)
            run.epoch, run.batch_in_epoch = epoch, skip
            for batch in loader:
                run.batch_in_epoch += 1
                clean = False
                with accelerator.accumulate(unet, text_encoder):
                    latents = encode_latents(batch, vae, accelerator.device, weight_dtype)
                    with torch.set_grad_enabled(trains_text):
                        text_states = encode_prompts(
                            parts.tokenizer, text_encoder, batch["prompts"],
                            pad_tokens=config.pad_tokens,
                            max_token_length=config.max_token_length, clip_skip=config.clip_skip)
                    loss = dreambooth_loss(unet, noise_scheduler, latents, text_states,
                                           batch["num_instance"], config.prior_loss_weight,
                                           offset_noise=config.offset_noise,
                                           min_snr_gamma=config.min_snr_gamma)

                    accelerator.backward(loss)
                    if accelerator.sync_gradients and config.max_grad_norm > 0:
                        trained = list(unet.parameters())
                        if trains_text:
                            trained += list(text_encoder.parameters())
                        accelerator.clip_grad_norm_(trained, config.max_grad_norm)
                    optimizer.step()
                    lr_scheduler.step()
                    optimizer.zero_grad(set_to_none=True)

                if not accelerator.sync_gradients:
                    continue
                step += 1
                if ema:
                    ema.update(unet.parameters())
                if trains_text and step >= text_encoder_stops_at:
                    trains_text = False  # Step Ratio of Text Encoder Training reached
                    accelerator.unwrap_model(text_encoder).requires_grad_(False)
                losses.append(accelerator.gather(loss.detach()).mean().item())
                run.step, clean = step, True
                lr = lr_scheduler.get_last_lr()[0]
                bar.update(1)
                bar.set_postfix(loss=f"{losses[-1]:.4f}", lr=f"{lr:.2e}", epoch=epoch + 1)
                if on_step:
                    on_step(step, losses[-1], lr)
                if accelerator.num_processes > 1:
                    _sync_stop(stop, accelerator)
                if config.save_every_steps and step % config.save_every_steps == 0 \
                        and step < plan.total_steps and not stop.is_set():
                    checkpoints.save(run)
                finished = step >= plan.total_steps or stop.is_set()
                every = config.save_preview_every_steps
                if every and (step % every == 0 or finished):
                    preview_samples(accelerator, config, data, parts, unet, text_encoder,
                                    f"step-{step:06d}")
                if finished:
                    break
            finished = step >= plan.total_steps or stop.is_set()
            if config.save_preview_every and ((epoch + 1) % config.save_preview_every == 0
                                              or finished):
                preview_samples(accelerator, config, data, parts, unet, text_encoder,
                                f"epoch-{epoch + 1:04d}")
            if finished:
                break
            if config.save_every_epochs and (epoch + 1) % config.save_every_epochs == 0:
                checkpoints.save(run)
    except KeyboardInterrupt:
        stop.set()
        log.warning("Interrupted at step %d: saving the model trained so far", step)
    finally:
        restore_ctrl_c()
        bar.close()

    stopped = step < plan.total_steps
    if stopped:
        log.warning("Stopped at step %d of %d: writing a checkpoint and the model; continue "
                    "with resume (train --resume, or the notebook's RESUME switch)", step,
                    plan.total_steps)
    if clean:  # a checkpoint taken in the middle of a step would not resume exactly
        checkpoints.save(run)
    model_dir = _save(accelerator, config, parts, unet, text_encoder, ema, step, seed, plan, data)
    if uploader is not None:
        uploader.close(timeout=3600)
    accelerator.end_training()
    return TrainResult(model_dir, step, plan.total_steps, plan.epochs, seed, losses, stopped,
                       lora_file_path(config) if config.use_lora else None,
                       checkpoints.last, resume_from)


def _ctrl_c_sets(stop: threading.Event) -> Callable[[], None]:
    """Until the returned function is called, the first Ctrl-C (or a notebook's interrupt)
    only asks the loop to stop after the current step, so the checkpoint written is whole; a
    second one interrupts at once. Only the main thread can catch signals: elsewhere (a
    notebook's training thread) the Stop button does this job."""
    if threading.current_thread() is not threading.main_thread():
        return lambda: None

    def handler(signum, frame):
        if stop.is_set():
            raise KeyboardInterrupt
        stop.set()
        log.warning("Stopping after this step (a checkpoint and the model are saved); "
                    "interrupt again to stop at once")

    previous = signal.signal(signal.SIGINT, handler)
    return lambda: signal.signal(signal.SIGINT, previous)


def _sync_stop(stop: threading.Event, accelerator) -> None:
    """Stop every process when any of them was asked to (they must save together)."""
    flag = torch.tensor([1.0 if stop.is_set() else 0.0], device=accelerator.device)
    if accelerator.reduce(flag, reduction="sum").item() > 0:
        stop.set()


def dreambooth_loss(unet, noise_scheduler, latents: torch.Tensor, text_states: torch.Tensor,
                    num_instance: int, prior_loss_weight: float, *, offset_noise: float = 0.0,
                    min_snr_gamma: float = 0.0) -> torch.Tensor:
    """The DreamBooth objective on one batch (instance rows first, then class rows).

    Noise the latents at random timesteps (plus Offset Noise), predict the noise (or the
    velocity for v-prediction models, as the model's scheduler config says), and return the
    instance MSE plus Prior Loss Weight times the MSE on the class rows (prior
    preservation). With Min SNR Gamma each row's MSE is first weighted by its timestep's
    min-SNR weight (:func:`colab_dreambooth.training.noise.min_snr_weights`).
    """
    noise = sample_noise(latents, offset_noise)
    timesteps = torch.randint(0, noise_scheduler.config.num_train_timesteps,
                              (latents.shape[0],), device=latents.device)
    noisy_latents = add_noise(noise_scheduler, latents, noise, timesteps)
    prediction = unet(noisy_latents, timesteps, text_states).sample
    if noise_scheduler.config.prediction_type == "v_prediction":
        target = velocity(noise_scheduler, latents, noise, timesteps)
    else:
        target = noise

    n = num_instance
    if min_snr_gamma:
        rows = F.mse_loss(prediction.float(), target.float(), reduction="none")
        rows = rows.mean(dim=tuple(range(1, rows.dim())))
        rows = rows * min_snr_weights(noise_scheduler, timesteps, min_snr_gamma)
        loss = rows[:n].mean()
        if rows.shape[0] > n:
            loss = loss + prior_loss_weight * rows[n:].mean()
        return loss
    loss = F.mse_loss(prediction[:n].float(), target[:n].float())
    if prediction.shape[0] > n:
        prior_loss = F.mse_loss(prediction[n:].float(), target[n:].float())
        loss = loss + prior_loss_weight * prior_loss
    return loss


@torch.no_grad()
def encode_latents(batch: dict, vae, device: torch.device, dtype: torch.dtype) -> torch.Tensor:
    """Scaled latents of a batch: sampled from the cached distribution or from the VAE."""
    if batch["latent_mean"] is not None:
        mean = batch["latent_mean"].to(device)
        latents = mean + batch["latent_std"].to(device) * torch.randn_like(mean)
    else:
        pixels = batch["pixels"].to(device, dtype=dtype)
        latents = vae.encode(pixels).latent_dist.sample().float()
    return latents * vae.config.scaling_factor


@torch.no_grad()
def cache_latents(dataset: DreamBoothDataset, vae, device: torch.device, dtype: torch.dtype,
                  progress: bool = True) -> dict:
    """Run the VAE once over every image (and its mirror image when flipping); keep the latent
    distributions on the CPU."""
    cache = {}
    flips = (False, True) if dataset.flip else (False,)
    for image, size in tqdm(dataset.cache_entries(), desc="Caching latents",
                            disable=not progress):
        pixels = dataset.pixels(image, size=size)
        for flipped in flips:
            x = (pixels.flip(-1) if flipped else pixels)[None].to(device, dtype=dtype)
            dist = vae.encode(x).latent_dist
            cache[dataset.latent_key(image, size, flipped)] = (dist.mean[0].float().cpu(),
                                                               dist.std[0].float().cpu())
    return cache


@torch.no_grad()
def preview_samples(accelerator, config: DreamBoothConfig, data: TrainingData, parts: Components,
                    unet, text_encoder, tag: str) -> Path | None:
    """Sample each concept with the model as it is now; save PNGs and a labelled grid under
    ``<model dir>/samples`` named after ``tag`` (e.g. ``epoch-0003``). Returns the grid's path."""
    from diffusers import StableDiffusionPipeline

    from colab_dreambooth.generation.sample import (
        concept_sample_jobs,
        generate_samples,
        image_grid,
        save_images,
    )

    if not accelerator.is_main_process:
        return None
    unet, text_encoder = accelerator.unwrap_model(unet), accelerator.unwrap_model(text_encoder)
    was_training = unet.training, text_encoder.training
    vae_device = next(parts.vae.parameters()).device
    parts.vae.to(accelerator.device)
    pipe = StableDiffusionPipeline(
        vae=parts.vae, text_encoder=text_encoder, tokenizer=parts.tokenizer, unet=unet,
        scheduler=parts.inference_scheduler, safety_checker=None, feature_extractor=None,
        requires_safety_checker=False)
    pipe.set_progress_bar_config(disable=True)
    images, labels = [], []
    autocast = torch.autocast(accelerator.device.type,
                              enabled=accelerator.mixed_precision != "no",
                              dtype=torch.bfloat16 if accelerator.mixed_precision == "bf16"
                              else torch.float16)
    for index in range(len(config.concepts_list)):
        # The same prompts, seeds and rules as the sample stage after training.
        for job in concept_sample_jobs(config, index):
            with autocast:
                images += generate_samples(
                    pipe, job.prompt, n=1, seed=job.seed, negative_prompt=job.negative_prompt,
                    guidance_scale=job.guidance_scale, steps=job.steps,
                    height=job.height or config.resolution, width=job.width or config.resolution,
                    progress=False, clip_skip=config.clip_skip,
                    max_token_length=config.max_token_length)
            labels.append(job.prompt)
    unet.train(was_training[0])
    text_encoder.train(was_training[1])
    parts.vae.to(vae_device)
    if not images:
        return None
    out = config.model_dir / "samples"
    save_images(images, out, tag)
    grid = out / f"{tag}-grid.png"
    image_grid(images, labels).save(grid)
    log.info("Preview samples (%s): %s", tag, grid)
    return grid


def _mixed_precision(config: DreamBoothConfig, device: DeviceInfo) -> str:
    if config.mixed_precision != "no" and (config.use_cpu or device.kind != "cuda"):
        log.warning("Mixed precision %s needs a GPU: training on the CPU in fp32",
                    config.mixed_precision)
        return "no"
    return config.mixed_precision


def _save(accelerator, config: DreamBoothConfig, parts: Components, unet, text_encoder,
          ema: EMA | None, step: int, seed: int, plan, data: TrainingData) -> Path:
    """Write the model as a diffusers folder, ``<model dir>/model``, atomically (with Use
    LORA: the LoRA file and its params into ``<model dir>/lora``)."""
    from diffusers import StableDiffusionPipeline

    target = config.model_dir / ("lora" if config.use_lora else "model")
    accelerator.wait_for_everyone()
    if not accelerator.is_main_process:
        return target
    unet = accelerator.unwrap_model(unet)
    text_encoder = accelerator.unwrap_model(text_encoder)
    if config.use_lora:
        return _save_lora(config, parts, unet, text_encoder, step, seed, plan, data)

    def write(folder: Path) -> None:
        pipe = StableDiffusionPipeline(
            vae=parts.vae, text_encoder=text_encoder, tokenizer=parts.tokenizer, unet=unet,
            scheduler=parts.inference_scheduler, safety_checker=None, feature_extractor=None,
            requires_safety_checker=False)
        pipe.save_pretrained(folder)
        # Frozen parts cast to fp16/bf16 for training are saved as the base's exact files.
        frozen = ["vae"] + ([] if config.train_text_encoder else ["text_encoder"])
        for name in frozen if parts.vae.dtype != torch.float32 else []:
            shutil.rmtree(folder / name)
            shutil.copytree(Path(parts.source) / name, folder / name)
        if ema is not None:
            ema_unet = type(unet).from_config(unet.config)
            ema.copy_to(ema_unet.parameters())
            ema_unet.save_pretrained(folder / "unet_ema")
        save_params(config, folder / "params.json")
        info = _training_info(config, step, seed, plan, ema=ema is not None)
        (folder / "training_info.json").write_text(json.dumps(info, indent=2), encoding="utf-8")

    save_folder_atomic(write, target)
    log.info("Saved the model at step %d to %s", step, target)
    return target


def _save_lora(config: DreamBoothConfig, parts: Components, unet, text_encoder, step: int,
               seed: int, plan, data: TrainingData) -> Path:
    """Write the LoRA file, its params and training info into ``<model dir>/lora``, each
    file atomically (the folder may hold the user's other files, so it is not swapped)."""
    path = lora_file_path(config)
    state = kohya_state_dict(unet, text_encoder if config.train_text_encoder else None)
    meta = lora_metadata(config, unet, steps=step, epochs=plan.epochs, seed=seed,
                         instance_prompts=[e.prompt for e in data.instance],
                         num_class_images=sum(map(len, data.classes.values())),
                         prediction_type=parts.prediction_type)
    save_lora(path, state, meta)
    save_params(config, path.parent / "params.json")
    info = _training_info(config, step, seed, plan, ema=False)
    info["lora_file"] = path.name
    write_text_atomic(path.parent / "training_info.json", json.dumps(info, indent=2))
    log.info("Saved the LoRA at step %d to %s (%.1f MB)", step, path, path.stat().st_size / 1e6)
    return path.parent


def _training_info(config: DreamBoothConfig, step: int, seed: int, plan, *, ema: bool) -> dict:
    return {"base_model": config.base_model, "steps": step, "total_steps": plan.total_steps,
            "epochs": plan.epochs, "seed": seed, "ema": ema, "lora": config.use_lora,
            "instance_prompts": [c.instance_prompt for c in config.concepts_list],
            "saved_at": time.strftime("%Y-%m-%dT%H:%M:%S%z")}


__all__ = ["train", "TrainResult", "TrainingData", "dreambooth_loss", "encode_latents",
           "cache_latents"]
