"""What every run config shares, the testbed's and Stable Diffusion's alike: the trainer's knobs
(`training`, `optimizer`, `mesh`, `SHARDING_RULES`) and the one parser of a config's variants
(what follows `:` in `--config path.py:variants`)."""

from __future__ import annotations

from collections.abc import Iterable

import ml_collections


def parse(
    arg: str | None, known: Iterable[str], config: str, keyed: Iterable[str] = ()
) -> tuple[set[str], dict[str, str]]:
    """`(flags, {key: value})` of the comma-separated variants in `arg`: each is one of `known`
    or `key=value` with `key` in `keyed`. Anything else is an error naming `config` and what it
    accepts, so a misspelt variant never silently trains the default."""
    chosen, values = set(), {}
    keyed = tuple(keyed)
    for token in filter(None, (arg or "").split(",")):
        key, eq, value = token.partition("=")
        if eq and key in keyed:
            values[key] = value
        else:
            chosen.add(token)
    unknown = chosen - set(known)
    if unknown:
        accepts = sorted(known) + [f"{k}=..." for k in keyed]
        raise ValueError(
            f"{config}: unknown variant(s) {sorted(unknown)}; this config has {accepts}"
        )
    return chosen, values


def flags(arg: str | None, known: Iterable[str], config: str) -> set[str]:
    """The variants of a config that takes no `key=value` ones (`parse`)."""
    return parse(arg, known, config)[0]


def optimizer(learning_rate: float = 3e-4, warmup_steps: int = 200) -> ml_collections.ConfigDict:
    return ml_collections.ConfigDict(
        dict(
            learning_rate=learning_rate,  # peak rate after linear warm-up
            warmup_steps=warmup_steps,  # linear warm-up from 0
            grad_clip=1.0,  # global-norm clipping
            b1=0.9,  # Adam β1
            b2=0.999,  # Adam β2
            eps=1e-8,  # Adam ε (added to √v̂)
            weight_decay=0.0,  # decoupled weight decay
        )
    )


# Logical axis names of the models (models/layers.py, models/text.py) → mesh axes. Activations:
# batch over data×fsdp, channels over tensor; kernels: input features over fsdp, output features /
# heads over tensor (Megatron-style). A rule is skipped where its mesh axes are taken or do not
# divide the dimension; see flash_jax/parallel.py.
SHARDING_RULES = (
    ("batch", ("data", "fsdp")),
    ("embed", "fsdp"),
    ("conv_in", "fsdp"),
    ("mlp", "tensor"),
    ("heads", "tensor"),
    ("vocab", "tensor"),
    ("conv_out", "tensor"),
    ("channels", "tensor"),
)


def lora() -> ml_collections.ConfigDict:
    """`config.lora` of the distillation configs: a LoRA student on the frozen teacher, off by
    default (flash_jax/lora.py documents the knobs)."""
    from flash_jax.lora import lora_section

    return lora_section()


def mesh(data: int = -1, fsdp: int = 1, tensor: int = 1) -> ml_collections.ConfigDict:
    """Device mesh sizes (flash_jax/parallel.py); one per-slice and one across-slice size may be -1."""
    return ml_collections.ConfigDict(
        dict(
            data=data,  # data parallel, inside a slice (ICI); -1 = the devices left
            fsdp=fsdp,  # parameter + optimizer state sharding (ZeRO-3 / FSDP), inside a slice
            tensor=tensor,  # tensor parallel (output features, attention heads), inside a slice
            dcn_data=-1,  # data parallel across TPU slices (multislice); -1 = the slices left
            dcn_fsdp=1,  # fsdp across slices
            dcn_tensor=1,  # tensor parallel across slices
        )
    )


def training(method: str, **overrides) -> ml_collections.ConfigDict:
    """The generic trainer's knobs (flash_jax/train/loop.py reads them)."""
    c = ml_collections.ConfigDict()
    c.method = method  # module in flash_jax/methods
    c.seed = 0  # parameter init and step keys
    c.batch_size = 32  # global batch
    c.total_steps = 10_000  # optimizer updates
    c.log_every = 50  # metrics.jsonl / progress bar cadence
    c.checkpoint_every = 1000  # checkpoint cadence (and at the end)
    c.keep_checkpoints = 3  # newest checkpoints kept
    c.sample_every = 2000  # sample-grid cadence (and at the end)
    c.num_samples = 8  # images in each grid (eval prompts)
    c.ema_decay = 0.999  # EMA of the trainable params
    c.ema_warmup = False  # True: decay min(ema_decay, (1+t)/(10+t)): forget the starting weights
    c.optimizer = optimizer()
    c.disc_optimizer = optimizer()  # used only by methods with a discriminator
    c.mesh = mesh()
    c.sharding_rules = SHARDING_RULES  # (logical axis, mesh axes) pairs, highest priority first
    c.fsdp_min_size = 2**20  # unannotated arrays with >= this many elements are sharded over fsdp
    c.frozen_dtype = (
        "float32"  # frozen models (teacher, text encoder, VAE) on device: or "bfloat16"
    )
    c.data = ml_collections.ConfigDict(
        dict(
            source="shapes",  # "shapes" (testbed) | "captions" (image–caption TFDS) | "cache"
            data_dir="",  # prepared TFDS directory; empty renders Shapes on the fly
            num_records=0,  # train records; 0 = the split's default
            image_size=32,  # image side in pixels
            seed=0,  # Shapes generator seed
            shuffle_seed=0,  # epoch shuffle seed
        )
    )
    c.update(overrides)
    return c
