"""The model commands of the ``densepure`` CLI: ADM conversion and preset downloads.

    densepure convert-adm CHECKPOINT OUT_DIR [--preset NAME] [guided-diffusion flags] [--allow-pickle]
    densepure models fetch PRESET [--cache DIR] [--offline]
    densepure models list [--cache DIR]

``register(app)`` adds them to the main typer app (``flows/cli.py``).
"""

from __future__ import annotations

from pathlib import Path

import typer

__all__ = ["register", "models_app", "convert_adm"]

models_app = typer.Typer(no_args_is_help=True,
                         help="The papers' models: download, convert, list (docs/models.md).")


def _fail(message: str, code: int = 2) -> None:
    typer.secho(f"error: {message}", fg=typer.colors.RED, err=True)
    raise typer.Exit(code)


def convert_adm(
    checkpoint: Path = typer.Argument(..., help="The ADM .pt file (torch.save(model.state_dict())) "
                                      "or a .safetensors of it."),
    out_dir: Path = typer.Argument(..., help="Where to write unet/ and scheduler/ (diffusers "
                                   "save_pretrained, safetensors)."),
    preset: str = typer.Option(None, "--preset", help="imagenet256-uncond or cifar10-improved: "
                               "the released models' flags (explicit flags below override)."),
    image_size: int = typer.Option(None, "--image-size", help="Training resolution (picks the default "
                                   "--channel-mult; the UNet's sample_size)."),
    num_channels: int = typer.Option(None, "--num-channels", help="Base width (model_channels)."),
    num_res_blocks: int = typer.Option(None, "--num-res-blocks", help="ResBlocks per level."),
    channel_mult: str = typer.Option(None, "--channel-mult", help="e.g. 1,1,2,2,4,4 (default: "
                                     "by image size)."),
    attention_resolutions: str = typer.Option(None, "--attention-resolutions",
                                              help="e.g. 32,16,8"),
    num_heads: int = typer.Option(None, "--num-heads", help="Heads per attention block (when "
                                  "--num-head-channels is -1)."),
    num_head_channels: int = typer.Option(None, "--num-head-channels", help="Fixed channels per head "
                                          "(-1: use --num-heads)."),
    num_heads_upsample: int = typer.Option(None, "--num-heads-upsample", help="Heads in the up path "
                                           "(-1: --num-heads)."),
    learn_sigma: bool = typer.Option(None, "--learn-sigma/--no-learn-sigma", help="2C output channels: "
                                     "a learned-range variance."),
    sigma_small: bool = typer.Option(None, "--sigma-small/--no-sigma-small", help="Fixed small variance "
                                     "without --learn-sigma (else fixed large)."),
    class_cond: bool = typer.Option(None, "--class-cond/--no-class-cond", help="Class-conditional "
                                    "(refused: certification needs an unconditional model)."),
    resblock_updown: bool = typer.Option(None, "--resblock-updown/--no-resblock-updown",
                                         help="ResBlocks do the up- and downsampling."),
    use_scale_shift_norm: bool = typer.Option(None, "--use-scale-shift-norm/"
                                              "--no-use-scale-shift-norm", help="FiLM-like "
                                              "norm(h) * (1 + scale) + shift in the ResBlocks."),
    use_new_attention_order: bool = typer.Option(None, "--use-new-attention-order/"
                                                 "--no-use-new-attention-order", help="guided-diffusion's "
                                                 "QKVAttention (q, k, v split before the heads)."),
    dropout: float = typer.Option(None, "--dropout", help="Training dropout (recorded; inactive "
                                  "when certifying)."),
    diffusion_steps: int = typer.Option(None, "--diffusion-steps", help="T, the diffusion's steps."),
    noise_schedule: str = typer.Option(None, "--noise-schedule", help="linear or cosine"),
    predict_xstart: bool = typer.Option(None, "--predict-xstart/--no-predict-xstart", help="The model "
                                        "predicts x0 instead of the noise."),
    rescale_timesteps: bool = typer.Option(None, "--rescale-timesteps/--no-rescale-timesteps",
                                           help="the model was fed t*1000/T (improved-diffusion's "
                                                "default; guided-diffusion's is off)."),
    allow_pickle: bool = typer.Option(False, "--allow-pickle", help="Accept a legacy pickle that "
                                      "holds more than tensors (only files you trust)."),
    overwrite: bool = typer.Option(False, "--overwrite", help="Replace a non-empty OUT_DIR."),
):
    """Convert a guided-diffusion / improved-diffusion checkpoint to a diffusers UNet2DModel +
    DDPMScheduler, exactly (architectures diffusers cannot represent are refused)."""
    from densepure_core.models.adm import (
        ADM_PRESETS,
        AdmConfig,
        AdmConversionError,
        convert_adm_checkpoint,
        parse_int_list,
        parse_mult_list,
        unet_config,
    )

    if preset is not None and preset not in ADM_PRESETS:
        _fail(f"--preset {preset!r}: choose one of {', '.join(ADM_PRESETS)}, or give the flags")
    base = ADM_PRESETS[preset] if preset else AdmConfig()
    given = {k: v for k, v in dict(
        image_size=image_size, num_channels=num_channels, num_res_blocks=num_res_blocks,
        num_heads=num_heads, num_head_channels=num_head_channels,
        num_heads_upsample=num_heads_upsample, learn_sigma=learn_sigma, sigma_small=sigma_small,
        class_cond=class_cond, resblock_updown=resblock_updown,
        use_scale_shift_norm=use_scale_shift_norm,
        use_new_attention_order=use_new_attention_order, dropout=dropout,
        diffusion_steps=diffusion_steps, noise_schedule=noise_schedule,
        predict_xstart=predict_xstart, rescale_timesteps=rescale_timesteps).items()
        if v is not None}
    try:
        if channel_mult is not None:
            given["channel_mult"] = parse_mult_list(channel_mult)
        if attention_resolutions is not None:
            given["attention_resolutions"] = parse_int_list(attention_resolutions,
                                                            "--attention-resolutions")
        cfg = base.with_flags(**given)
        out = convert_adm_checkpoint(checkpoint, out_dir, cfg, allow_pickle=allow_pickle,
                                     overwrite=overwrite)
        uc = unet_config(cfg)
    except AdmConversionError as exc:
        hint = ("" if preset or given or "no such file" in str(exc) else
                f" (without --preset, guided-diffusion's default flags were used: pass --preset "
                f"{' or '.join(ADM_PRESETS)}, or the flags the checkpoint was trained with)")
        _fail(f"{exc}{hint}")
    typer.echo(f"converted {checkpoint} -> {out}/unet + {out}/scheduler "
               f"({len(uc['block_out_channels'])} levels {list(uc['block_out_channels'])}, "
               f"time embedding {uc['time_embedding_type']}, "
               f"{'learned-range' if cfg.learn_sigma else 'fixed'} variance, "
               f"{cfg.noise_schedule} x {cfg.diffusion_steps})")
    typer.echo(f"use it: densepure certify --config ... --set diffusion.source={out}", err=True)


@models_app.command("fetch")
def models_fetch(
    preset: str = typer.Argument(..., help="A config preset (imagenet_densepure, imagenet_dds, "
                                 "cifar10_densepure, cifar10_dds) or a model preset "
                                 "(densepure models list)."),
    cache: Path = typer.Option(None, "--cache", help="Model cache (default: $DENSEPURE_MODELS or "
                               "./models, the paths the presets use)."),
    offline: bool = typer.Option(None, "--offline/--online", help="Never touch the network "
                                 "(default: offline when HF_HUB_OFFLINE or DENSEPURE_OFFLINE is "
                                 "set)."),
):
    """Download the preset's weights (OpenAI URLs, the Hugging Face Hub) and convert them into the
    cache; offline, convert what is there and say exactly what to place where."""
    from densepure_core.models.presets import (
        DEFAULT_CACHE,
        MODEL_PRESETS,
        DiffusionWeights,
        FetchError,
        fetch,
    )

    cache_dir = cache if cache is not None else Path(DEFAULT_CACHE)
    try:
        steps = fetch(preset, cache_dir, offline=offline, log=lambda m: typer.echo(m, err=True))
    except ValueError as exc:
        _fail(str(exc))
    except FetchError as exc:
        _fail(str(exc), 1)
    for s in steps:
        typer.echo(f"{s.model}: {s.status}  {s.path}")
    if Path(cache_dir) != Path("models"):
        for s in steps:
            if isinstance(MODEL_PRESETS.get(s.model), DiffusionWeights):
                typer.echo(f"the presets read models/{s.model}: run them with --set "
                           f"diffusion.source={s.path}", err=True)


@models_app.command("list")
def models_list(cache: Path = typer.Option(None, "--cache", help="Model cache to check.")):
    """The model and config presets, with where each model comes from."""
    from densepure_core.models.presets import (
        CONFIG_PRESETS,
        DEFAULT_CACHE,
        MODEL_PRESETS,
        DiffusionWeights,
    )

    cache_dir = cache if cache is not None else Path(DEFAULT_CACHE)
    for name, spec in MODEL_PRESETS.items():
        if isinstance(spec, DiffusionWeights):
            where = f"{spec.url} -> {spec.converted_dir(cache_dir)}"
        elif spec.timm_name:
            where = f"timm {spec.timm_name} (Hugging Face cache)"
        else:
            where = f"manual: {cache_dir / str(spec.filename)}"
        typer.echo(f"{name}: {where}")
    for name, cp in CONFIG_PRESETS.items():
        typer.echo(f"{name}: --config {name} needs {', '.join(cp.models)}")


def register(app: typer.Typer) -> None:
    """Add ``convert-adm`` and the ``models`` group to the ``densepure`` app."""
    app.command("convert-adm")(convert_adm)
    app.add_typer(models_app, name="models")
