"""The configuration model: one dataclass for a training run (its concepts: :mod:`~.concept`).

Field names are the AUTOMATIC1111 Dreambooth extension's own ``db_config.json`` / concept keys
(see ``fields.md``), so a user's saved parameters read the same here. Each field carries its
label, help, group, limits and choices, its column in the GPU preset table when a preset fills
it, and whether a resumed run must keep it (:func:`colab_dreambooth.config.fields.setting`).
JSON save/load lives in :mod:`colab_dreambooth.config.params`, the checks in
:mod:`colab_dreambooth.config.validation`.
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass
from pathlib import Path
from typing import Optional

from colab_dreambooth.config.concept import Concept
from colab_dreambooth.config.fields import setting

LR_SCHEDULERS = ("constant", "constant_with_warmup", "linear", "cosine",
                 "cosine_with_restarts", "polynomial")
MIXED_PRECISION = ("no", "fp16", "bf16")
ATTENTION = ("default", "xformers", "flash_attention")
OPTIMIZERS = ("AdamW", "Lion", "Prodigy", "Adafactor")
NOISE_SCHEDULERS = ("DDPM", "DEIS", "UniPC")
LORA_TYPES = ("LoRA", "LoCon", "LoHa", "LoKr")  # see colab_dreambooth.models.lora
DORA_TYPES = ("LoRA", "LoCon")  # peft's DoRA is LoRA's
CONV_TYPES = ("LoCon", "LoHa", "LoKr")  # with Lora Conv Rank for the 3x3 convolutions
MAX_TOKEN_LENGTHS = (75, 150, 225)
TINY_MODEL = "tiny"
TINY_SDXL_MODEL = "tiny-sdxl"  # the tiny SDXL-shaped model (colab_dreambooth.models.tiny)
TINY_MODELS = (TINY_MODEL, TINY_SDXL_MODEL)
# The model families; colab_dreambooth.models.families says which one a base model is.
SD, SDXL = "SD", "SDXL"
DEFAULT_BASE_MODEL = "stable-diffusion-v1-5/stable-diffusion-v1-5"


@dataclass
class DreamBoothConfig:
    """Every setting of a DreamBooth run (the extension's form, as JSON keys)."""

    # Model
    model_name: str = setting(
        "dreambooth-model", "Model name", "Names the working folder "
        "<models root>/dreambooth/<name>/ where the trained model and class images go.", "Model")
    pretrained_model_name_or_path: str = setting(
        DEFAULT_BASE_MODEL, "Base model", "A Hugging Face Hub id, a local diffusers folder, a "
        ".safetensors/.ckpt file (SD 1.x, 2.x or SDXL: the family is read from the model), or "
        "'tiny' / 'tiny-sdxl' for the small built-in models (tests and demos; learn nothing "
        "useful).", "Model", path=True, must_match=True)
    src: str = setting(
        "", "Create Model (source checkpoint)", "A single-file .ckpt/.safetensors to convert "
        "to the diffusers layout once; when set it is the base model.", "Model", path=True,
        must_match=True)
    pretrained_vae_name_or_path: str = setting(
        "", "VAE", "Another VAE to train and sample with instead of the base model's own: a "
        "Hub id (madebyollin/sdxl-vae-fp16-fix: SDXL's VAE fixed to run in fp16, where the "
        "original overflows and is kept in fp32), a diffusers VAE folder, or a single-file "
        ".safetensors VAE. Blank = the base model's.", "Model", path=True, must_match=True)
    models_root: str = setting(
        "", "Models root", "Folder that holds dreambooth/<model name>/. Blank = ./models in "
        "the current folder.", "Model", path=True)
    # Parameters
    max_train_steps: Optional[int] = setting(
        None, "Training Steps", "Total optimizer steps. When set it wins over Training Epochs.",
        "Parameters", minimum=1)
    num_train_epochs: Optional[int] = setting(
        100, "Training Epochs", "Passes over the instance images, used when Training Steps is "
        "blank. Rule of thumb: about 100 (images x 100 steps at batch size 1).", "Parameters",
        minimum=1)
    learning_rate: float = setting(
        2e-6, "Learning rate", "UNet learning rate. Higher learns faster and over-fits sooner.",
        "Parameters", minimum=0.0, maximum=1.0)
    text_encoder_learning_rate: float = setting(
        1e-6, "Text encoder learning rate", "Learning rate of the text encoder when it "
        "trains.", "Parameters", minimum=0.0, maximum=1.0)
    use_lora: bool = setting(
        False, "Use LORA", "Train small LoRA adapters instead of the whole model: the base "
        "weights stay frozen and the run saves one .safetensors file of a few MB (lora/<model "
        "name>.safetensors) that the WebUI, kohya and diffusers load, instead of a 2-4 GB "
        "model. Needs much less VRAM; the Lora learning rates replace the usual ones.",
        "Parameters", must_match=True)
    lora_type: str = setting(
        "LoRA", "Lora Type", "The adapter Use LORA trains, as in kohya's sd-scripts and "
        "LyCORIS: LoRA (attention layers, diffusers' DreamBooth LoRA), LoCon (LoRA on every "
        "linear layer of the transformer blocks and on the convolutions too, at Conv rank), LoHa "
        "(a Hadamard product of two low-rank pairs: more capacity per MB) or LoKr (a Kronecker "
        "product: the smallest files). All save in the layout the WebUI and ComfyUI load.",
        "Parameters", choices=LORA_TYPES, must_match=True, shown_when={"use_lora": (True,)})
    use_dora: bool = setting(
        False, "Use DoRA", "Weight-decomposed LoRA: also trains each output row's magnitude, "
        "which follows full fine-tuning more closely at the same rank (about 10-20% slower "
        "steps). LoRA and LoCon only.", "Parameters", must_match=True,
        shown_when={"use_lora": (True,), "lora_type": DORA_TYPES})
    lora_learning_rate: float = setting(
        1e-4, "Lora UNET Learning Rate", "UNet learning rate when Use LORA is on (LoRA "
        "adapters need far higher rates than full fine-tuning).", "Parameters",
        minimum=0.0, maximum=1.0)
    lora_txt_learning_rate: float = setting(
        5e-5, "Lora Text Encoder Learning Rate", "Text encoder learning rate when Use LORA "
        "and Train Text Encoder are on.", "Parameters", minimum=0.0, maximum=1.0)
    scale_lr: bool = setting(
        False, "Scale learning rate", "Multiply the learning rates by GPUs x gradient "
        "accumulation steps x batch size.", "Parameters")
    lr_scheduler: str = setting(
        "constant_with_warmup", "LR scheduler", "How the learning rate changes over the run: "
        "constant keeps it, linear/cosine/polynomial lower it towards 0 by the end.",
        "Parameters", choices=LR_SCHEDULERS)
    lr_warmup_steps: int = setting(
        0, "Warmup Steps", "Linear warm-up of the learning rate from 0 over this many steps.",
        "Parameters", minimum=0)
    lr_cycles: int = setting(
        1, "Learning rate cycles", "Number of cosine cycles (restarts) for "
        "cosine_with_restarts; other schedulers ignore it.", "Parameters",
        minimum=1, maximum=100)
    lr_power: float = setting(
        1.0, "Polynomial power", "Power of the polynomial scheduler's decay (1.0 = linear); "
        "other schedulers ignore it.", "Parameters",
        minimum=0.0, maximum=10.0)
    resolution: int = setting(
        512, "Resolution", "Training side length in pixels (a multiple of 64). 640 helps when "
        "you will generate above 512; VRAM grows with its square.", "Parameters",
        minimum=64, maximum=2048, must_match=True)
    enable_bucket: bool = setting(
        False, "Aspect ratio buckets", "Train non-square images at their own aspect ratio "
        "instead of a square crop: each image (class images too) goes to the bucket of about "
        "Resolution x Resolution pixels (sides multiples of 64) nearest its shape and loses "
        "only the sliver that differs; each batch comes from one bucket, and the log shows "
        "how many images each bucket got. Costs nothing per step; a bucket holding few "
        "images makes smaller batches, and cached latents are kept per bucket.", "Parameters",
        must_match=True)
    min_bucket_reso: Optional[int] = setting(
        None, "Minimum bucket side", "Smallest bucket width or height in pixels (a multiple "
        "of 64). Blank = half the resolution (kohya's min_bucket_reso: 256 at 512).",
        "Parameters", minimum=64, maximum=4096, must_match=True)
    max_bucket_reso: Optional[int] = setting(
        None, "Maximum bucket side", "Largest bucket width or height in pixels (a multiple of "
        "64). Blank = twice the resolution (kohya's max_bucket_reso: 1024 at 512).",
        "Parameters", minimum=64, maximum=4096, must_match=True)
    center_crop: bool = setting(
        False, "Center Crop", "Crop the center square; otherwise resize the short side and "
        "crop at random each epoch.", "Parameters", must_match=True)
    hflip: bool = setting(
        True, "Apply Horizontal Flip", "Random left-right flip. Turn off for asymmetric "
        "subjects (text, logos, parted hair).", "Parameters", must_match=True)
    seed: Optional[int] = setting(
        None, "Seed", "Seed for the whole run; blank = random (printed so you can repeat it).",
        "Parameters", minimum=0, maximum=2**32 - 1)
    concepts_path: str = setting(
        "", "Concepts List", "A JSON file holding a list of concepts (used instead of the "
        "concepts below).", "Parameters", path=True)
    concepts_list: list[Concept] = setting(
        [], "Concepts", "The concepts trained together in this run. Train several concepts in "
        "one run: training concept B later blurs concept A.", "Concepts")
    # Advanced
    train_batch_size: Optional[int] = setting(
        None, "Batch size", "Instance images per step (with prior preservation each step also "
        "takes as many class images). More VRAM. Blank = chosen from the GPU (preset: 1 on a "
        "T4, up to 8 on an 80 GB card).", "Advanced", minimum=1, maximum=256, preset_column=6,
        must_match=True)
    sample_batch_size: int = setting(
        1, "Class batch size", "Images generated at once when making class images.",
        "Advanced", minimum=1, maximum=256)
    gradient_accumulation_steps: int = setting(
        1, "Gradient accumulation steps", "Batches summed per optimizer step: a larger "
        "effective batch at no VRAM cost, slower per step.", "Advanced", minimum=1, maximum=1024,
        must_match=True)
    use_cpu: bool = setting(
        False, "Use CPU Only (SLOW)", "Train on the CPU: very slow for SD, for "
        "trying things out. SD 1.5 with AdamW needs about 17 GB of RAM (`colab-dreambooth env "
        "--config PARAMS` estimates your settings). Cannot use 8-bit Adam.", "Advanced")
    use_8bit_adam: Optional[bool] = setting(
        None, "Use 8bit Adam", "bitsandbytes 8-bit optimizer state (AdamW8bit, or Lion8bit "
        "with Lion): saves about 5 GB of VRAM on SD 1.5 with AdamW, slightly less exact; CUDA "
        "only. Blank = chosen from the GPU (on for GPUs up to 24 GB; AdamW only). Prodigy and "
        "Adafactor have no 8-bit form.", "Advanced", preset_column=2, must_match=True)
    optimizer: str = setting(
        "AdamW", "Optimizer", "AdamW: the standard (2 states per weight; 8-bit with Use 8bit "
        "Adam). Lion (pip install lion-pytorch): 1 state per weight, half AdamW's optimizer "
        "memory; use a 3-10x lower learning rate and a 3-10x higher weight decay. "
        "Prodigy (pip install prodigyopt): finds its own step size: set the learning rates "
        "to 1.0; costs 2 more states per weight than AdamW. Adafactor (in transformers): "
        "factored second moments, the least optimizer memory, may learn more slowly.",
        "Advanced", choices=OPTIMIZERS, must_match=True)
    weight_decay: float = setting(
        1e-2, "Weight decay", "Decoupled weight decay of the optimizer: pulls weights towards "
        "0 each step, a mild guard against over-fitting; free.", "Advanced",
        minimum=0.0, maximum=1.0)
    tenc_weight_decay: Optional[float] = setting(
        None, "TENC Weight Decay", "Weight decay of the text encoder's parameters. "
        "Blank = the same as Weight decay.", "Advanced", minimum=0.0, maximum=1.0)
    adam_beta1: float = setting(0.9, "Adam beta 1", "First-moment (momentum) decay of AdamW, "
                                "Lion and Prodigy; the default rarely needs changing.", "Advanced",
                                minimum=0.0, maximum=0.99999)
    adam_beta2: float = setting(0.999, "Adam beta 2", "Second-moment decay of AdamW and "
                                "Prodigy (Lion's momentum decay, for which 0.99 is usual); the "
                                "default rarely needs changing.", "Advanced",
                                minimum=0.0, maximum=0.99999)
    adam_epsilon: float = setting(1e-8, "Adam epsilon", "AdamW's small constant that keeps "
                                  "steps finite; the default rarely needs changing.", "Advanced",
                                  minimum=0.0, maximum=1.0)
    max_grad_norm: float = setting(
        1.0, "Max grad norm", "Clip gradients to this norm; 0 = no clipping.", "Advanced",
        minimum=0.0)
    # Not must_match: the trained weights and optimizer states stay fp32 (autocast only lowers
    # the compute), so a run stopped on an A100 (bf16) can go on on a T4 (fp16), whose fresh
    # grad scaler finds its scale within a few steps. Half model stores the weights in the
    # compute dtype; full_fp16 must match.
    mixed_precision: Optional[str] = setting(
        None, "Mixed precision", "no / fp16 / bf16. bf16 needs an A100, L4, H100 or newer "
        "(not T4/V100). On the CPU training runs in fp32. Blank = chosen from the GPU "
        "(bf16 where it runs, else fp16).", "Advanced", choices=MIXED_PRECISION, preset_column=1)
    allow_tf32: bool = setting(
        False, "Use TF32", "Let fp32 matmuls and convolutions use TF32 tensor cores on Ampere "
        "and newer GPUs (A100, L4, H100, RTX 30xx+): the fp32 parts of a step run several "
        "times faster at about 3 significant digits per product, which training tolerates. "
        "Older GPUs and the CPU ignore it.", "Advanced")
    full_fp16: bool = setting(
        False, "Half model (full fp16)", "Keep the trained UNet and text encoder weights in "
        "fp16 (bf16 with bf16 mixed precision) instead of fp32 copies: about half the weight "
        "and optimizer memory, for the smallest GPUs. Risks: updates smaller than fp16's "
        "precision (about 1e-3 of a weight) are rounded away, so low learning rates may learn "
        "nothing; fp16 gradients may overflow and skip steps; results are worse than with "
        "mixed precision. Use it with 8-bit Adam, Adafactor or Lion: torch AdamW and Prodigy "
        "would keep their state in fp16 too. Needs fp16/bf16 mixed precision; on the CPU it "
        "is ignored (fp32). Not used with Use LORA (the adapters stay fp32).", "Advanced",
        must_match=True)
    deterministic: bool = setting(
        False, "Deterministic", "Use deterministic kernels (cuDNN without autotuning, a fixed "
        "cuBLAS workspace) so the same seed repeats the same run; slower, often 10-20% on a "
        "GPU. Kernels with no deterministic version warn instead of failing, so a GPU run may "
        "still differ in the last bits; on the CPU runs repeat exactly.", "Advanced")
    attention: Optional[str] = setting(
        None, "Memory Attention", "default = PyTorch scaled-dot-product attention "
        "(memory-efficient, no extra install); xformers needs its package and CUDA; "
        "flash_attention = PyTorch's flash kernel (A100, L4, H100 and newer). Blank = chosen "
        "from the GPU.", "Advanced", choices=ATTENTION, preset_column=4)
    cache_latents: Optional[bool] = setting(
        None, "Cache latents", "Run the VAE once over all images and keep the latents (both "
        "flips when flipping), so the VAE leaves the GPU. Turn off to encode each step. "
        "Blank = on.", "Advanced", preset_column=5, must_match=True)
    train_text_encoder: Optional[bool] = setting(
        None, "Train Text Encoder", "Also fine-tune CLIP: better faces, about 1 GB more VRAM "
        "(with 8-bit Adam). Blank = on unless the GPU has under 12 GB.", "Advanced",
        preset_column=7, must_match=True)
    stop_text_encoder: float = setting(
        1.0, "Step Ratio of Text Encoder Training", "Fraction of the run during which the text "
        "encoder trains (1.0 = all of it).", "Advanced", minimum=0.0, maximum=1.0)
    lora_unet_rank: int = setting(
        4, "Lora UNET Rank", "Rank (dim) of the UNet's LoRA adapters on the attention "
        "projections (to_q, to_k, to_v, to_out.0): higher learns more detail, makes a bigger "
        "file (about 0.8 MB per rank on SD 1.5) and over-fits sooner. 4-32 is usual.",
        "Advanced", minimum=1, maximum=1024, must_match=True)
    lora_txt_rank: int = setting(
        4, "Lora Text Encoder Rank", "Rank of the text encoder's LoRA adapters (CLIP "
        "self-attention q/k/v/out projections), used when Train Text Encoder is on.",
        "Advanced", minimum=1, maximum=1024, must_match=True)
    lora_conv_rank: int = setting(
        4, "Lora Conv Rank", "Rank of the adapters on the UNet's 3x3 convolutions (kohya's "
        "conv_dim) for LoCon, LoHa and LoKr; 0 = convolutions left out (LoHa/LoKr then adapt "
        "the transformer blocks only). 4-16 is usual; convolutions learn texture and style.",
        "Advanced", minimum=0, maximum=1024, must_match=True,
        shown_when={"use_lora": (True,), "lora_type": CONV_TYPES})
    lora_conv_alpha: Optional[float] = setting(
        None, "Lora Conv Alpha", "Alpha of the convolution adapters (kohya's conv_alpha): their "
        "update is scaled by alpha / conv rank. Blank or 0 = the conv rank (scale 1.0).",
        "Advanced", minimum=0.0, must_match=True,
        shown_when={"use_lora": (True,), "lora_type": CONV_TYPES})
    # Must match: the adapters' output is scaled by alpha / rank, so the checkpoint's adapters
    # under another alpha compute another function (and take steps of another size).
    lora_alpha: Optional[float] = setting(
        None, "Lora Alpha", "kohya-style network alpha: the adapters' output is scaled by "
        "alpha / rank. Blank or 0 = the rank (scale 1.0, as in diffusers' and the extension's "
        "LoRA, which the default learning rates suit). A fixed alpha such as 1 (kohya's "
        "default) keeps updates the same size whatever the rank but needs a higher learning "
        "rate (about rank / alpha times).", "Advanced", minimum=0.0, must_match=True)
    use_ema: bool = setting(
        False, "Train EMA", "Keep an exponential moving average of the UNet and save it: "
        "guards against over-fitting late in the run; costs one more UNet of memory.",
        "Advanced", must_match=True)
    ema_on_cpu: bool = setting(
        False, "Keep EMA on CPU", "Hold the EMA weights in host memory: saves VRAM, slower "
        "steps.", "Advanced")
    ema_decay: float = setting(
        0.9999, "EMA max decay", "Upper bound of the EMA decay (warmed up from 0).", "Advanced",
        minimum=0.0, maximum=1.0)
    prior_loss_weight: float = setting(
        1.0, "Prior Loss Weight", "Weight of the class-image (prior-preservation) loss.",
        "Advanced", minimum=0.0, maximum=100.0)
    offset_noise: float = setting(
        0.0, "Offset Noise", "Add this much of one random value per image and channel to the "
        "training noise, so the model learns to change an image's overall brightness (very "
        "dark or bright pictures); 0 = off, 0.05-0.1 is usual. Free; too much shifts colours.",
        "Advanced", minimum=0.0, maximum=1.0)
    min_snr_gamma: float = setting(
        0.0, "Min SNR Gamma", "Min-SNR-gamma loss weighting: weights each image's loss by "
        "min(SNR, gamma)/SNR (v-prediction models: /(SNR+1)), so the easy low-noise steps do "
        "not dominate; 5 is the paper's value, 0 = off. Free; often converges faster.",
        "Advanced", minimum=0.0, maximum=100.0)
    noise_scheduler: str = setting(
        "DDPM", "Noise scheduler", "The scheduler that noises the latents in training, built "
        "from the model's own scheduler config. DEIS and UniPC (the extension's other "
        "choices) use the same beta schedule, so they add exactly the same noise as DDPM; "
        "they are kept so the extension's files load. Epsilon or v-prediction always comes "
        "from the model.", "Advanced", choices=NOISE_SCHEDULERS)
    pad_tokens: bool = setting(
        True, "Pad Tokens", "Pad every prompt to the full 75 tokens (77 with BOS/EOS); with "
        "Max Token Length above 75, to the full number of 75-token chunks.", "Advanced")
    # Must match, as clip_skip: it changes the conditioning the UNet learnt to read (how many
    # 75-token chunks, so where long captions are cut and how many positions it attends to).
    max_token_length: int = setting(
        75, "Max Token Length", "Longest prompt in tokens. 150 or 225 let long captions train "
        "whole: they are encoded in 75-token chunks joined for the UNet (kohya and the WebUI "
        "do the same). Each chunk is one more text-encoder pass and more cross-attention "
        "work.", "Advanced", choices=MAX_TOKEN_LENGTHS, must_match=True)
    # Must match: the UNet (and the trained text encoder) learnt from this layer's states;
    # another layer's states mean something else, and layers past it got no gradient.
    clip_skip: int = setting(
        1, "Clip Skip", "Condition on the text encoder's hidden state this many layers from "
        "the end (1 = the last layer), passed through CLIP's final layer norm. 2 suits models "
        "trained that way (NovelAI-style anime models); generate with the same value. Free.",
        "Advanced", minimum=1, maximum=12, must_match=True)
    shuffle_tags: bool = setting(
        False, "Shuffle Tags", "Shuffle the comma-separated tags of each training prompt "
        "every epoch (keeping the first Keep Tokens in place), so no tag order is learnt; for "
        "tag-style captions. Free.", "Advanced")
    keep_tokens: int = setting(
        1, "Keep Tokens", "With Shuffle Tags: how many leading comma-separated tags stay in "
        "place (kohya's keep_tokens). 1 keeps the first tag, which usually holds the instance "
        "token and class word, as the extension does.", "Advanced", minimum=0, maximum=75)
    freeze_clip_normalization: bool = setting(
        False, "Freeze CLIP Normalization Layers", "Keep CLIP's final layer norm as it is "
        "while the text encoder trains: its scale and shift set the size of every state the "
        "UNet sees, and drift there moves all prompts at once. Free.", "Advanced",
        must_match=True)
    gradient_checkpointing: Optional[bool] = setting(
        None, "Gradient checkpointing", "Recompute activations in the backward pass: much less "
        "VRAM, about 25% slower. Blank = chosen from the GPU (on for 16 GB cards).",
        "Advanced", preset_column=3)
    # Saving and sampling cadence
    save_every_steps: int = setting(
        0, "Save checkpoint every N steps", "Write a checkpoint (the full training state: "
        "weights, optimizer, schedule, random states) every N steps, so a disconnected run can "
        "resume exactly. Costs disk and a few seconds each: SD 1.5 with AdamW is about 10 GB, "
        "with 8-bit Adam about 5 GB, a LoRA run a few MB. A checkpoint and the model are also "
        "written at the end and when you stop. 0 = only then.", "Saving", minimum=0)
    save_every_epochs: int = setting(
        0, "Save checkpoint every N epochs", "Write a checkpoint every N epochs (like the step "
        "setting); 0 = off.", "Saving", minimum=0)
    checkpoint_dir: str = setting(
        "", "Checkpoint folder", "Where checkpoints go. Blank = <models root>/dreambooth/"
        "<model name>/checkpoints. On Colab put it on Drive (/content/drive/MyDrive/...) so "
        "it survives a disconnect.", "Saving", path=True)
    checkpoints_to_keep: int = setting(
        1, "Checkpoints to keep", "How many of the newest checkpoints stay; older ones are "
        "deleted once a newer one is complete (so one is always there).", "Saving", minimum=1,
        maximum=100)
    checkpoint_hub_repo: str = setting(
        "", "Checkpoint Hub repo", "hf://<user>/<repo>: also upload each checkpoint to this "
        "Hugging Face repo (created private) in the background; training goes on if an upload "
        "fails. The token comes from Colab's secrets (HF_TOKEN), the HF_TOKEN variable or a "
        "login, never from this file. Blank = no upload.", "Saving")
    save_preview_every: int = setting(
        0, "Generate a preview every N epochs", "Preview samples of each concept every N "
        "epochs (and at the end when non-zero); 0 = none.", "Sampling", minimum=0)
    save_preview_every_steps: int = setting(
        0, "Generate a preview every N steps", "Preview samples of each concept every N "
        "optimizer steps (and at the end when non-zero); 0 = none. Each preview costs a few "
        "seconds of generation per sample.", "Sampling", minimum=0)

    # ----------------------------------------------------------------- derived paths
    @property
    def base_model(self) -> str:
        """The model training starts from: ``src`` when set, else the base model."""
        return self.src.strip() or self.pretrained_model_name_or_path.strip()

    @property
    def model_dir(self) -> Path:
        """``<models root>/dreambooth/<model name>``: where this run's files go."""
        root = Path(self.models_root).expanduser() if self.models_root.strip() else Path("models")
        return root / "dreambooth" / safe_name(self.model_name)

    def class_dir(self, index: int) -> Path:
        """The class image folder of concept ``index`` (0-based), its own or the default."""
        concept = self.concepts_list[index]
        if concept.class_data_dir.strip():
            return Path(concept.class_data_dir).expanduser()
        return self.model_dir / "classifiers" / f"concept_{index + 1}"

    def copy(self, **changes) -> "DreamBoothConfig":
        """A deep copy with some fields changed."""
        new = dataclasses.replace(self, **changes)
        if "concepts_list" not in changes:
            new.concepts_list = [dataclasses.replace(c) for c in self.concepts_list]
        return new


def safe_name(name: str) -> str:
    """A model name usable as a folder name (what the extension keeps: letters, digits, ._- )."""
    kept = "".join(ch for ch in name.strip() if ch.isalnum() or ch in "._- ").strip(" .")
    return kept or "dreambooth-model"

