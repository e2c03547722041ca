"""The network: `build_model(...)` and `model_kwargs(settings)`; export in model.export.

    net = build_model(**model_kwargs(settings))
    logits = net(images, training=True)      # float32 [B, num_classes]
    loss = cross_entropy + net.regularization_loss()
    ... optimizer step ...; net.train_step.assign_add(1)
"""
import dataclasses

from model.batch_renorm import BatchRenorm, RenormConfig
from model.concat_resnet import NORMALIZATIONS, ConcatResNet
from model.export import export_saved_model
from model.resnet import COMPUTE_DTYPES, STAGES, STRIDE_PLACES, VARIANTS, ResNet
from utils.errors import UserError

__all__ = ["build_model", "model_kwargs", "RenormConfig", "BatchRenorm", "export_saved_model"]

# The stride placement each variant uses unless told otherwise: the original
# code strided its first 1x1 conv (v1); v1.5 is the common standard.
DEFAULT_STRIDE_ON = {"standard": "3x3", "original": "1x1"}
ARCHS = tuple(STAGES) + ("concat_resnet",)


def build_model(arch="resnet50", num_classes=1000, width_multiplier=1.0, variant="standard", stride_on="auto",
                zero_init_last_gamma=False, renorm=None, l2_penalty=0.0, compute_dtype="float32", seed=0,
                normalization="batch_renorm", stage_blocks=()):
    """Build a ResNet (a tf.Module) with batch renormalization, or the Tiny ImageNet recipe's concatenating ResNet.

    Args:
        arch: key of model.resnet.STAGES ('resnet50'), or 'concat_resnet' (model.concat_resnet;
            variant, stride_on and zero_init_last_gamma are resnet50's and must keep their defaults).
        num_classes: size of the dense output layer.
        width_multiplier: scales every conv width (0.25 for the CPU demo).
        variant: 'standard' (He et al.) or 'original' (the reproduced repo: ELU,
            parameter-free shortcuts, conv biases).
        stride_on: '3x3' (v1.5), '1x1' (v1) or 'auto' (3x3 for standard, 1x1 for original).
        zero_init_last_gamma: start the last BRN gamma of every block at 0.
        renorm: RenormConfig, a dict of its fields, or None for its defaults.
        l2_penalty: coefficient of `net.regularization_loss()`.
        compute_dtype: 'float32', 'float16' or 'bfloat16'; variables and batch
            statistics stay float32, logits are float32.
        seed: initialisation seed.
        normalization: 'batch_renorm', or for concat_resnet also 'batch_norm' (the Tiny ImageNet recipe's).
        stage_blocks: blocks in each stage of resnet50 (4 counts); empty = the arch's (3, 4, 6, 3).
    """
    _check_choice("arch", arch, ARCHS)
    _check_choice("normalization", normalization, NORMALIZATIONS)
    _check_choice("variant", variant, VARIANTS)
    _check_choice("stride_on", stride_on, STRIDE_PLACES + ("auto",))
    _check_choice("compute_dtype", compute_dtype, COMPUTE_DTYPES)
    if not (isinstance(num_classes, int) and num_classes >= 1):
        raise ValueError(f"num_classes must be a positive integer, received {num_classes!r}")
    if not width_multiplier > 0:
        raise ValueError(f"width_multiplier must be positive, received {width_multiplier!r}")
    if renorm is None:
        renorm = RenormConfig()
    elif isinstance(renorm, dict):
        renorm = RenormConfig(**renorm)
    if arch == "concat_resnet":
        if variant != "standard" or stride_on != "auto" or zero_init_last_gamma or stage_blocks:
            raise ValueError(f"variant, stride_on, zero_init_last_gamma and stage_blocks apply to resnet50 only, "
                             f"received {variant!r}, {stride_on!r}, {zero_init_last_gamma!r}, {stage_blocks!r} "
                             f"for concat_resnet")
        return ConcatResNet(num_classes=num_classes, width_multiplier=float(width_multiplier),
                            normalization=normalization, renorm=renorm, l2_penalty=l2_penalty,
                            compute_dtype=compute_dtype, seed=seed)
    if normalization != "batch_renorm":
        raise ValueError(f"resnet50 uses batch renorm (rmax_max = 1, dmax_max = 0 make it batch norm), received "
                         f"normalization={normalization!r}")
    stage_blocks = tuple(stage_blocks)
    if stage_blocks and (len(stage_blocks) != len(STAGES[arch]) or min(stage_blocks) < 1):
        raise ValueError(f"stage_blocks must be {len(STAGES[arch])} positive counts, received {stage_blocks!r}")
    return ResNet(arch=arch, num_classes=num_classes, width_multiplier=float(width_multiplier), variant=variant,
                  stride_on=DEFAULT_STRIDE_ON[variant] if stride_on == "auto" else stride_on,
                  zero_init_last_gamma=bool(zero_init_last_gamma), renorm=renorm, l2_penalty=l2_penalty,
                  compute_dtype=compute_dtype, seed=seed, stage_blocks=stage_blocks)


def _check_choice(name, value, choices):
    if value not in choices:
        raise ValueError(f"{name} must be one of {', '.join(choices)}, received {value!r}")


# [train] mixed_precision -> build_model(compute_dtype=...)
COMPUTE_DTYPE_OF_POLICY = {"none": "float32", "mixed_float16": "float16", "mixed_bfloat16": "bfloat16"}


def model_kwargs(settings):
    """build_model keyword arguments from resolved settings ([model], [batch_renorm], [l2], and [train]
    mixed_precision and seed; settings/__init__.py). [model] num_classes must be resolved (with_classes, or
    set in the config) and mixed_precision resolved (devices=True, or set in the config).
    All values are plain Python types, so the result can be written to JSON.
    """
    m, train = settings.model, settings.train
    if not m.num_classes:
        raise UserError("[model] num_classes is 0 and the number of classes is not known here; "
                        "set num_classes in the config.")
    if train.mixed_precision not in COMPUTE_DTYPE_OF_POLICY:
        raise ValueError("model_kwargs needs [train] mixed_precision resolved (load_settings(devices=True))")
    return dict(arch=m.arch, num_classes=int(m.num_classes), width_multiplier=m.width_multiplier,
                variant=m.variant, stride_on=m.stride_on, zero_init_last_gamma=m.zero_init_last_gamma,
                renorm=dataclasses.asdict(RenormConfig.from_settings_section(settings.batch_renorm)),
                l2_penalty=settings.l2.l2_penalty, compute_dtype=COMPUTE_DTYPE_OF_POLICY[train.mixed_precision],
                seed=train.seed, normalization=m.normalization, stage_blocks=list(m.stage_blocks))
