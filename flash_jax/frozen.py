"""The frozen models a run loads: the teacher and the VAE, from `config.model.pretrained` (a
diffusers folder, through `T2I.load_pretrained`) or from the testbed's run directories and
`.msgpack` files (`config.teacher_workdir`, `config.autoencoder_workdir`), checked against the
architecture in `config.model`. Above both the model (`t2i.T2I`) and the checkpoints."""

from __future__ import annotations

from collections.abc import Sequence
from typing import TYPE_CHECKING, Any

from flash_jax import weights
from flash_jax.t2i import T2I
from flash_jax.train import checkpoint

if TYPE_CHECKING:  # ml_collections is only a type here: GPU boxes without it can import this
    import ml_collections


def load_teacher(
    config: ml_collections.ConfigDict, model: T2I, parts: Sequence[str] = ("unet", "text")
) -> dict[str, Any]:
    """The frozen teacher's `{part: params}`: from `config.model.pretrained` if set, else from the
    testbed run in `config.teacher_workdir` (checked against `model`)."""
    if model.pretrained:
        return model.load_pretrained(parts)
    if not config.get("teacher_workdir"):
        raise ValueError(
            "set config.model.pretrained (a diffusers folder) or config.teacher_workdir"
        )
    params = checkpoint.load_params(config.teacher_workdir)
    params = {k: v for k, v in params.items() if k in parts}
    return model.check(params, f"teacher {config.teacher_workdir}")


def load_autoencoder(config: ml_collections.ConfigDict, model: T2I) -> Any:
    """The frozen VAE's params: `config.model.pretrained`/vae if set, else the testbed run in
    `config.autoencoder_workdir`."""
    if model.pretrained:
        return model.load_pretrained(("vae",))["vae"]
    if not config.get("autoencoder_workdir"):
        raise ValueError(
            "set config.model.pretrained (a diffusers folder) or config.autoencoder_workdir"
        )
    params = checkpoint.load_params(config.autoencoder_workdir)
    what = f"autoencoder {config.autoencoder_workdir} (for config.model.autoencoder)"
    weights.check_params_match(
        params, weights.model_abstract("autoencoder", model.autoencoder), what
    )
    return params
