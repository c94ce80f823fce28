"""The DreamBooth training run, top to bottom: prepare, models, data, optimizer, loop, save.

:func:`train` first checks everything that can be checked before a model loads and generates
missing class images; then places the models for training
(:func:`~colab_dreambooth.training.placement.place_models`), builds the loader
(:func:`~colab_dreambooth.data.loader.build_loader`), the optimizer and schedule
(:func:`~colab_dreambooth.training.optim.make_training_optimizer`), and runs the loop, whose
body is the paper's step (:class:`~colab_dreambooth.training.step.TrainingStep`: noise,
predict, instance loss + prior loss, step). Checkpoints are written along the way and the
model (with Use LORA: one LoRA file) at the end.
"""

from __future__ import annotations

import contextlib
import logging
import math
import random
import signal
import threading
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable

import torch
from tqdm.auto import tqdm

from colab_dreambooth.config.params import resolve_concepts
from colab_dreambooth.config.settings import TINY_MODELS, DreamBoothConfig
from colab_dreambooth.config.validation import check_config, check_lora
from colab_dreambooth.data.dataset import TrainingData, collect_training_data
from colab_dreambooth.data.loader import TrainingBatches, build_loader
from colab_dreambooth.generation.class_images import generate_class_images
from colab_dreambooth.models.families import FAMILY, SDXL, detect_family
from colab_dreambooth.models.loading import Components, load_components
from colab_dreambooth.models.lora import lora_file_path
from colab_dreambooth.runtime.device import DeviceInfo, detect_device
from colab_dreambooth.training.checkpoints import (
    Progress,
    TrainingState,
    check_compatible,
    load_checkpoint,
)
from colab_dreambooth.training.fit import enforce, plan_memory
from colab_dreambooth.training.noise import make_noise_scheduler
from colab_dreambooth.training.numerics import (
    allow_fp16_gradient_unscale,
    apply_numerics,
    warn_fp16_optimizer_state,
)
from colab_dreambooth.training.optim import EMA, StepPlan, make_training_optimizer, plan_steps
from colab_dreambooth.training.placement import make_accelerator, place_models
from colab_dreambooth.training.previews import preview_samples
from colab_dreambooth.training.resume import (
    Checkpointer,
    find_resume_checkpoint,
    hub_uploader,
    keep_checkpoint_choices,
    refuse_to_bury_unfinished_run,
    saved_seed,
)
from colab_dreambooth.training.saving import save_model
from colab_dreambooth.training.space import check_space
from colab_dreambooth.training.step import PromptStates, TrainingStep, prompts_known

log = logging.getLogger(__name__)

# Seconds between progress-bar loss updates: each one copies the loss to the host (a GPU sync).
BAR_LOSS_EVERY_S = 1.0


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
    state go to :func:`~colab_dreambooth.training.resume.checkpoint_root` every Save checkpoint
    every N steps/epochs, at the end and on stop; ``resume=True`` continues from the newest
    complete one (downloaded from Checkpoint Hub repo when there is none locally) exactly as
    if the run had never stopped. ``stop`` (set from another thread or a Stop button) or Ctrl-C
    end the run cleanly after the current step with a checkpoint and the model saved.
    ``on_step(step, loss, lr)`` is called after each optimizer step, with the loss averaged
    over the step's accumulated micro-batches (what :attr:`TrainResult.losses` records).

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
    from accelerate.utils import set_seed

    # ---- prepare: every check before any model loads, the class images, the seed
    device = device or (DeviceInfo.cpu() if config.use_cpu else detect_device())
    config, data, seed, resume_from = _prepare(config, device, resume=resume, force=force,
                                               progress=progress)
    accelerator = make_accelerator(config, device)
    if resume_from is not None:  # before any model is loaded
        check_compatible(resume_from, config, accelerator.num_processes)
    set_seed(seed)
    main_bar = progress and accelerator.is_local_main_process

    # ---- the models, placed for training (global torch flags put back when the run ends)
    parts = load_components(config.base_model, vae=config.pretrained_vae_name_or_path)
    cleanup.callback(apply_numerics(tf32=config.allow_tf32,
                                    deterministic=config.deterministic).restore)
    models = place_models(parts.unet, parts.text_encoder, parts.vae, config, accelerator)

    # ---- the data, with the VAE run once up front when caching latents
    batches = build_loader(data, config, seed, vae=models.vae, device=accelerator.device,
                           dtype=models.vae_dtype, progress=main_bar)
    if config.cache_latents:
        models.vae.to("cpu")  # no longer needed on the GPU

    # ---- optimizer and schedule
    processes = accelerator.num_processes
    plan = plan_steps(math.ceil(len(batches.loader) / processes),
                      config.gradient_accumulation_steps, config.max_train_steps,
                      config.num_train_epochs)
    optimizer, lr_scheduler = make_training_optimizer(
        config, models.unet, models.text_encoder, total_steps=plan.total_steps,
        processes=processes, on_cuda=accelerator.device.type == "cuda")
    unet, text_encoder = models.unet, models.text_encoder
    if config.train_text_encoder:
        unet, text_encoder, optimizer, batches.loader, lr_scheduler = accelerator.prepare(
            unet, text_encoder, optimizer, batches.loader, lr_scheduler)
    else:
        unet, optimizer, batches.loader, lr_scheduler = accelerator.prepare(
            unet, optimizer, batches.loader, lr_scheduler)
    if models.half == torch.float16:
        allow_fp16_gradient_unscale(accelerator)
        warn_fp16_optimizer_state(optimizer, models.half)

    # ---- where the run starts: step 0, or exactly where a checkpoint left it
    run, ema, checkpoints = _start(config, plan, accelerator, unet, text_encoder, optimizer,
                                   lr_scheduler, seed, resume_from, len(batches.loader))
    log.info("%d instance images, %d class images, %d steps (%d epochs of %d steps)",
             len(data.instance), sum(map(len, data.classes.values())), plan.total_steps,
             plan.epochs, plan.steps_per_epoch)

    # ---- the loop, then a checkpoint and the model
    step = TrainingStep(
        accelerator, unet, text_encoder, models.vae,
        PromptStates(parts.tokenizers, text_encoder, pad_tokens=config.pad_tokens,
                     max_token_length=config.max_token_length, clip_skip=config.clip_skip),
        make_noise_scheduler(config.noise_scheduler, parts.noise_scheduler.config),
        optimizer, lr_scheduler, models.weight_dtype, config.prior_loss_weight,
        config.offset_noise, config.min_snr_gamma, config.max_grad_norm, models.vae_dtype)
    if prompts_known(config):
        # Frozen text encoder(s): every prompt encoded once, and the encoders leave the GPU.
        step.prompts.encode_all([e.prompt for e in data.instance]
                                + [e.prompt for pool in data.classes.values() for e in pool],
                                accelerator.device)
        accelerator.unwrap_model(text_encoder).to("cpu")
    stop = stop if stop is not None else threading.Event()
    clean = _loop(config, plan, run, batches, step, ema, checkpoints, parts, stop=stop,
                  bar=main_bar, on_step=on_step)
    if run.step < plan.total_steps:
        log.warning("Stopped at step %d of %d: writing a checkpoint and the model; continue "
                    "with resume (train --resume, or the notebook's RESUME switch)", run.step,
                    plan.total_steps)
    if clean:  # a checkpoint taken in the middle of a step would not resume exactly
        checkpoints.save(run)
    model_dir = save_model(accelerator, config, parts, unet, text_encoder, ema, run.step, seed,
                           plan, data)
    if checkpoints.uploader is not None:
        checkpoints.uploader.close(timeout=3600)
    accelerator.end_training()
    return TrainResult(model_dir, run.step, plan.total_steps, plan.epochs, seed, run.losses,
                       run.step < plan.total_steps,
                       lora_file_path(config) if config.use_lora else None,
                       checkpoints.last, resume_from)


def _prepare(config: DreamBoothConfig, device: DeviceInfo, *, resume: bool, force: bool,
             progress: bool) -> tuple[DreamBoothConfig, TrainingData, int, Path | None]:
    """Check everything that can be checked before a model loads, generate the class images
    a concept lacks, and choose the seed. Returns the run's config (blank fields filled),
    its data, its seed and the checkpoint it resumes (or None)."""
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
    _warn_low_resolution(config)
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
    return config, data, seed, resume_from


def _warn_low_resolution(config: DreamBoothConfig) -> None:
    """SDXL below 768 px trains and samples noticeably worse than at its own 1024 px."""
    family = detect_family(config.base_model)
    if (family == SDXL and config.resolution < 768
            and config.base_model.strip() not in TINY_MODELS):
        log.warning("Resolution %d px with an SDXL model: SDXL was trained at %d px and learns "
                    "and draws worse below 768; use 1024 (768 to save memory)", config.resolution,
                    FAMILY[SDXL].resolution)


def _start(config: DreamBoothConfig, plan: StepPlan, accelerator, unet, text_encoder, optimizer,
           lr_scheduler, seed: int, resume_from: Path | None, batches_per_epoch: int
           ) -> tuple[Progress, EMA | None, Checkpointer]:
    """Where the run starts (step 0, or the checkpoint's position with every state restored),
    the EMA of the UNet, and the checkpointer of the run's state."""
    ema = EMA(unet.parameters(), config.ema_decay,
              "cpu" if config.ema_on_cpu else None) if config.use_ema else None
    state = TrainingState(accelerator.unwrap_model(unet), accelerator.unwrap_model(text_encoder),
                          optimizer, lr_scheduler, accelerator.scaler, ema,
                          config.train_text_encoder, config.use_lora)
    run = Progress(seed=seed, total_steps=plan.total_steps)
    if resume_from is not None:
        run = load_checkpoint(resume_from, state, config, accelerator=accelerator)
        run.total_steps = plan.total_steps
        log.info("Resuming from %s: step %d of %d (epoch %d, batch %d)", resume_from, run.step,
                 plan.total_steps, run.epoch + 1, run.batch_in_epoch)
    checkpoints = Checkpointer(config, state, accelerator, hub_uploader(config, accelerator),
                               batches_per_epoch)
    checkpoints.last = resume_from
    return run, ema, checkpoints


def _loop(config: DreamBoothConfig, plan: StepPlan, run: Progress, batches: TrainingBatches,
          step: TrainingStep, ema: EMA | None, checkpoints: Checkpointer, parts: Components, *,
          stop: threading.Event, bar: bool,
          on_step: Callable[[int, float, float], None] | None) -> bool:
    """Train from ``run`` (advanced in place) until the plan's last step or ``stop``; return
    whether the run stands between two steps (a checkpoint of it resumes exactly)."""
    accelerator = step.accelerator
    text_stops_at = math.floor(config.stop_text_encoder * plan.total_steps)
    trains_text = config.train_text_encoder and run.step < text_stops_at
    if config.train_text_encoder and not trains_text:
        accelerator.unwrap_model(step.text_encoder).requires_grad_(False)
    losses = _StepLosses(run.losses)
    progress = tqdm(total=plan.total_steps, initial=run.step, desc="Training", unit="step",
                    disable=not bar)
    shown = time.monotonic()
    clean = True
    restore_ctrl_c = _ctrl_c_sets(stop)
    try:
        for epoch in range(run.epoch, plan.epochs if run.step < plan.total_steps else 0):
            # Resuming mid-epoch: the batches already trained are skipped, not loaded.
            skip = run.batch_in_epoch if epoch == run.epoch else 0
            batches.start_epoch(epoch, skip * accelerator.num_processes)
            run.epoch, run.batch_in_epoch = epoch, skip
            for batch in batches.loader:
                run.batch_in_epoch += 1
                clean = False
                losses.micro.append(step(batch, trains_text))
                if not accelerator.sync_gradients:
                    continue
                run.step += 1
                losses.end_step(accelerator)
                clean = True
                if ema:
                    ema.update(step.unet.parameters())
                if trains_text and run.step >= text_stops_at:
                    trains_text = False  # Step Ratio of Text Encoder Training reached
                    accelerator.unwrap_model(step.text_encoder).requires_grad_(False)
                progress.update(1)
                lr = step.lr_scheduler.get_last_lr()[0]
                if on_step or (bar and time.monotonic() - shown >= BAR_LOSS_EVERY_S):
                    losses.to_host()
                    shown = time.monotonic()
                    progress.set_postfix(loss=f"{run.losses[-1]:.4f}", lr=f"{lr:.2e}",
                                         epoch=epoch + 1, refresh=False)
                if on_step:
                    on_step(run.step, run.losses[-1], lr)
                if accelerator.num_processes > 1:
                    _sync_stop(stop, accelerator)
                if config.save_every_steps and run.step % config.save_every_steps == 0 \
                        and run.step < plan.total_steps and not stop.is_set():
                    losses.to_host()
                    checkpoints.save(run)
                finished = run.step >= plan.total_steps or stop.is_set()
                every = config.save_preview_every_steps
                if every and (run.step % every == 0 or finished):
                    preview_samples(accelerator, config, parts, step.unet, step.text_encoder,
                                    f"step-{run.step:06d}")
                if finished:
                    break
            finished = run.step >= plan.total_steps or stop.is_set()
            if config.save_preview_every and ((epoch + 1) % config.save_preview_every == 0
                                              or finished):
                preview_samples(accelerator, config, parts, step.unet, step.text_encoder,
                                f"epoch-{epoch + 1:04d}")
            if finished:
                break
            if config.save_every_epochs and (epoch + 1) % config.save_every_epochs == 0:
                losses.to_host()
                checkpoints.save(run)
    except KeyboardInterrupt:
        stop.set()
        log.warning("Interrupted at step %d: saving the model trained so far", run.step)
    finally:
        restore_ctrl_c()
        progress.close()
        losses.to_host()
    return clean


class _StepLosses:
    """Each optimizer step's loss: the mean over its accumulated micro-batches (and processes),
    kept on the device until :meth:`to_host` appends them to ``logged`` (a GPU sync)."""

    def __init__(self, logged: list[float]):
        self.logged = logged
        self.micro: list[torch.Tensor] = []  # this step's micro-batch losses
        self._unlogged: list[torch.Tensor] = []

    def end_step(self, accelerator) -> None:
        """Close the step: its loss is the mean of its micro-batches' over all processes."""
        self._unlogged.append(accelerator.gather(torch.stack(self.micro).mean()).mean())
        self.micro.clear()

    def to_host(self) -> None:
        """Append the losses not yet copied to the host to ``logged``."""
        if self._unlogged:
            self.logged.extend(torch.stack(self._unlogged).tolist())
            self._unlogged.clear()


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


__all__ = ["TrainResult", "train"]
