"""The config schema: every section and key of config.txt with its type, range or choices, default and help.

Keys without a default are required. Adding a key is one line here: the loader (utils/config.py) validates it
and the settings (utils/settings.py) carry it as a field of its section, resolved and frozen.
"""

REQUIRED = object()


class Key:
    """One config key: kind is str, path, int, float, bool, choice, ints, floats, stats or count ('auto' or an int)."""

    def __init__(self, kind, default=REQUIRED, lo=None, hi=None, choices=None, help=""):
        self.kind, self.default, self.lo, self.hi = kind, default, lo, hi
        self.choices, self.help = choices, help


SCHEMA = {
    "preprocess": {
        "ImageNet_folder": Key("path", help="dataset root (train/ and val/ folders, or train.txt/val.txt lists)"),
        "path_to_save": Key("path", help="where preprocess.py writes the per-scale resize cache <path_to_save>/<S>/"),
        "num_workers": Key("int", 0, lo=0, help="worker processes for offline scripts; 0 = one per CPU core"),
        "jpeg_quality": Key("int", 95, lo=1, hi=100, help="JPEG quality of the resized images in <path_to_save>/<S>/"),
    },
    "preprocess_val": {
        "ImageNet_folder": Key("path", help="dataset root holding the validation split"),
        "path_to_save": Key("path", help="where preprocess_val.py writes the uint8 validation views"),
        "N": Key("int", lo=0, help="expected number of validation images (50000 for ImageNet); 0 = accept what is found"),
        "views_50": Key("bool", False, help="also store the original code's 5-scale set for --views 50"),
        "chunk_images": Key("int", 5000, lo=1, help="images per packed file; an interrupted run redoes at most one chunk"),
    },
    "get_mu_sigma": {
        "path_to_save": Key("path", help="folder where get_mu_sigma.py writes mu_sigma.json"),
        "max_images": Key("int", 0, lo=0, help="use a random subset of this many training images; 0 = all"),
    },
    "data": {
        "source": Key("choice", "folder", choices=("folder", "tfrecord"),
                      help="how [preprocess] and [preprocess_val] ImageNet_folder are read: folder = images "
                           "(train/, val/ or list files); tfrecord = train-*/validation-* shards from "
                           "tools/build_tfrecords.py (labels and class count from their dataset_info.json)"),
        "min_classes": Key("int", 2, lo=1, help="refuse a training set with fewer classes (one class usually means "
                                                "ImageNet_folder points one level too deep); 1 = train anyway"),
    },
    "train": {
        "buffer_folder": Key("path", help="folder of ready batch files shared by producer and trainer (RAM disk or SSD)"),
        "path_for_saving": Key("path", help="run folders are created here: <path_for_saving>/<run>/<epoch>/"),
        "N": Key("int", lo=0, help="number of training images (1281167 for ImageNet); 0 = accept what is found"),
        "sgd_momentum": Key("float", lo=0.0, hi=1.0),
        "buffer_size": Key("int", lo=1, help="maximum number of batches kept ready in the buffer"),
        "sleep_time": Key("float", lo=0.0, help="seconds the trainer sleeps between checks for a missing batch"),
        "wait_timeout": Key("float", 900.0, lo=0.0, help="seconds without a producer heartbeat before the trainer gives up"),
        "seed": Key("int", 0, lo=0, help="seeds the data order, augmentation and initialisation"),
        "deterministic": Key("bool", False, help="TF op determinism (slower); batches are deterministic regardless"),
        "optimizer": Key("choice", "sgd", choices=("sgd", "rmsprop"),
                         help="sgd = SGD with sgd_momentum; rmsprop = RMSprop, epsilon 1e-8 (the Tiny ImageNet recipe)"),
        "mixed_precision": Key("choice", "auto", choices=("auto", "none", "mixed_float16", "mixed_bfloat16"),
                               help="compute dtype; auto = mixed_float16 on NVIDIA GPUs of compute capability "
                                    ">= 7.0, else none; float16 uses dynamic loss scaling"),
        "jit_compile": Key("bool", False, help="compile the forward/backward pass with XLA (one device, not with deterministic)"),
        "distribute": Key("choice", "auto", choices=("auto", "one_device", "mirrored", "multi_worker"),
                          help="auto = multi_worker if TF_CONFIG is set, mirrored if >1 GPU, else one device"),
        "log_every": Key("int", 20, lo=1, help="steps between progress-bar and TensorBoard updates"),
        "label_smoothing": Key("float", 0.0, lo=0.0, hi=1.0,
                               help="cross-entropy against (1-e)*onehot + e/K; 0 = off (0.1 in NVIDIA's and FFCV's recipes)"),
        "ema_decay": Key("float", 0.0, lo=0.0, hi=1.0,
                         help="exponential moving average of the weights and moving statistics, exported as "
                              "saved_model_ema/ beside saved_model/; 0 = off (e.g. 0.9999)"),
        "ema_warmup": Key("bool", False, help="EMA decay min(ema_decay, (1+t)/(10+t)) at global step t"),
        "mixup_alpha": Key("float", 0.0, lo=0.0, help="mixup lambda ~ Beta(alpha, alpha) per batch; 0 = off (timm)"),
        "cutmix_alpha": Key("float", 0.0, lo=0.0, help="cutmix lambda ~ Beta(alpha, alpha) per batch; 0 = off (timm)"),
        "mix_prob": Key("float", 1.0, lo=0.0, hi=1.0, help="probability that a batch is mixed at all (timm prob)"),
        "switch_prob": Key("float", 0.5, lo=0.0, hi=1.0,
                           help="with both alphas > 0: probability of cutmix instead of mixup (timm switch_prob)"),
        "max_skipped_steps": Key("int", 50, lo=1,
                                 help="stop after this many steps in a row were skipped for a non-finite loss or "
                                      "gradient (a healthy float16 run skips at most ~15 in a row, while its "
                                      "loss scale falls from 2^15 to 1)"),
        "accumulation_steps": Key("int", 1, lo=1,
                                  help="one optimizer update per this many buffer batches (their gradients' mean); "
                                       "effective batch = --batch_size x this; 1 = off"),
        "profile_steps": Key("ints", (), lo=0, help="first, last global step (inclusive, from 0) of a TensorBoard "
                                                    "profiler trace written to <run>/tensorboard/; empty = none"),
    },
    "schedule": {
        "type": Key("choice", "constant", choices=("constant", "step", "cosine", "onecycle", "linear"),
                    help="learning-rate schedule; train.py --learning_rate overrides it with a constant"),
        "base_lr": Key("float", 0.01, lo=0.0, help="initial rate (peak rate for onecycle)"),
        "reference_batch": Key("int", 0, lo=0,
                               help="the global batch base_lr is meant for: the rate (warm-up included) scales "
                                    "linearly to the effective batch (Goyal et al. 2017); 0 = base_lr as written"),
        "boundaries": Key("floats", (), lo=0.0, help="step type: where the rate drops, in boundaries_unit"),
        "boundaries_unit": Key("choice", "epochs", choices=("epochs", "steps"),
                               help="epochs: the drop starts with that epoch; steps: piecewise_constant, after that step"),
        "factors": Key("floats", (0.1,), lo=0.0, help="multiplier at each boundary (one value = the same for all)"),
        "warmup_epochs": Key("float", 0.0, lo=0.0, help="linear warmup length, composes with any type"),
        "warmup_start_factor": Key("float", 0.0, lo=0.0, hi=1.0, help="warmup starts at base rate times this"),
        "total_epochs": Key("float", 0.0, lo=0.0, help="cosine/onecycle/linear length; 0 = train.py --epoch_end"),
        "final_factor": Key("float", 0.0, lo=0.0, hi=1.0, help="cosine and linear end at base_lr times this"),
        "onecycle_end_percentage": Key("float", 0.2, lo=0.0, hi=1.0, help="fraction of steps in the final decay"),
        "onecycle_scale_percentage": Key("float", 0.1, lo=0.0, hi=1.0, help="cycle starts and ends at base_lr times this"),
    },
    "batch_renorm": {
        "moving_avgs_momentum": Key("float", lo=0.0, hi=1.0),
        "rmax_max": Key("float", lo=1.0),
        "dmax_max": Key("float", lo=0.0),
        "start_relaxing_rmax": Key("int", lo=0),
        "reach_rmax_max": Key("int", lo=0),
        "start_relaxing_dmax": Key("int", lo=0),
        "reach_dmax_max": Key("int", lo=0),
        "epsilon": Key("float", 1e-3, lo=1.001e-5, help="added to the batch variance once, inside sigma_B"),
        "sync_replicas": Key("bool", False, help="synchronise batch statistics across replicas"),
    },
    "runtime_preprocessing": {
        "sleep_time": Key("float", lo=0.0, help="seconds the producer sleeps when the buffer needs no refill"),
        "num_of_threads": Key("count", "auto", lo=1,
                              help="worker processes building batches in parallel; auto = start with one and add or "
                                   "retire workers to match what the trainer takes (data/buffer/sizing.py)"),
        "max_workers": Key("int", 0, lo=0, help="with num_of_threads = auto, at most this many workers; 0 = no cap "
                                                 "(the cores it may use, one left for the trainer)"),
        "sizing_window": Key("float", 10.0, lo=0.05,
                             help="seconds over which num_of_threads = auto measures rates before each decision"),
        "refill_threshold": Key("float", 0.8, lo=0.0, hi=1.0,
                                help="refill when fewer than this fraction of buffer_size batches are ready ahead"),
        "heartbeat_interval": Key("float", 2.0, lo=0.05,
                                  help="seconds between the producer's heartbeat writes (the trainer's liveness check)"),
        "decoder": Key("choice", "auto", choices=("auto", "turbojpeg", "pil"),
                       help="crop-window decoder: auto/turbojpeg = libjpeg-turbo region decode + OpenCV resize "
                            "(fast), pil = PIL draft + resize(box) (exact reference geometry, ~2x slower)"),
        "use_scale_cache": Key("bool", True, help="read preprocess.py's resized images when complete for a scale"),
    },
    "utils": {
        **{f"mu_{c}": Key("stats", help="channel mean of pixels in [0,1]; 'auto' = read get_mu_sigma.py's output")
           for c in range(3)},
        **{f"sigma_{c}": Key("stats", help="channel std of pixels in [0,1]; 'auto' = read get_mu_sigma.py's output")
           for c in range(3)},
    },
    "l2": {
        "l2_penalty": Key("float", lo=0.0, help="weight decay coefficient: loss += l2_penalty/2 * sum(w^2) over kernels"),
    },
    "images": {
        "crop_size": Key("int", 224, lo=8, help="training and evaluation crop side"),
        "scale_min": Key("int", 256, lo=8, help="smallest shorter side of the scale augmentation"),
        "scale_max": Key("int", 480, lo=8, help="largest shorter side of the scale augmentation"),
        "scale_step": Key("int", 7, lo=1, help="scales are scale_min, scale_min+step, ..., scale_max"),
        "eval_resize": Key("int", 256, lo=8, help="shorter side for the 10-crop and centre-crop evaluation"),
        "eval_scales_50": Key("ints", (224, 256, 384, 480, 640), help="shorter sides of the 50-view protocol"),
        "pca_std": Key("float", 0.1, lo=0.0, help="std of the AlexNet-style PCA lighting coefficients; 0 = off"),
        "crop_schedule": Key("str", "", help="progressive resizing: 'epoch:crop, ...' (e.g. '0:32, 10:48, 20:64'), "
                                             "the training crop from each listed epoch on, each <= crop_size; "
                                             "empty = crop_size throughout; evaluation stays at crop_size"),
        "augmentation": Key("choice", "scale", choices=("scale", "tiny", "inception"),
                            help="scale = random shorter side, crop, flip and PCA lighting; tiny = the Tiny ImageNet imgaug "
                                 "pipeline ([tiny_augment]) on images loaded at crop_size x crop_size, then a random crop; "
                                 "inception = Inception's distorted bounding-box crop resized to crop_size, and flip"),
    },
    "model": {
        "arch": Key("choice", "resnet50", choices=("resnet50", "concat_resnet"),
                    help="resnet50, or concat_resnet (the fully convolutional Tiny ImageNet network)"),
        "num_classes": Key("int", 0, lo=0, help="0 = number of classes found in the dataset"),
        "width_multiplier": Key("float", 1.0, lo=0.01),
        "variant": Key("choice", "standard", choices=("standard", "original"),
                       help="standard He et al. ResNet-50, or the original author's (ELU, parameter-free shortcuts, conv biases)"),
        "stride_on": Key("choice", "auto", choices=("auto", "3x3", "1x1"),
                         help="3x3 = ResNet v1.5, 1x1 = v1; auto = 3x3 for standard, 1x1 for original"),
        "stage_blocks": Key("ints", (), lo=1,
                            help="resnet50: bottleneck blocks in each of the 4 stages; empty = 3, 4, 6, 3 (ResNet-50); "
                                 "3, 4, 23, 3 is ResNet-101. The test suite uses 1, 1, 1, 1: every kind of layer, "
                                 "compiled in half the time"),
        "zero_init_last_gamma": Key("bool", False, help="start the last batch renorm gamma of each block at 0"),
        "normalization": Key("choice", "batch_renorm", choices=("batch_renorm", "batch_norm"),
                             help="concat_resnet: batch_norm (the Tiny ImageNet recipe; momentum 0.99, epsilon 1e-3) or batch_renorm "
                                  "([batch_renorm]); resnet50 always uses batch renorm"),
    },
    "tiny_augment": {  # the Tiny ImageNet recipe's imgaug magnitudes, used when [images] augmentation = tiny
        "hflip": Key("float", 0.5, lo=0.0, hi=1.0, help="probability of a horizontal flip"),
        "vflip": Key("float", 0.2, lo=0.0, hi=1.0, help="probability of a vertical flip"),
        "sometimes": Key("float", 0.5, lo=0.0, hi=1.0, help="probability of each of blur, crop-and-pad, affine, dropout"),
        "blur_sigma_max": Key("float", 2.0, lo=0.0, help="Gaussian blur sigma ~ U(0, this), in pixels"),
        "crop_pad_min": Key("float", -0.1, lo=-0.49, hi=1.0, help="per side, fraction of the axis; negative crops"),
        "crop_pad_max": Key("float", 0.2, lo=-0.49, hi=1.0, help="per side, fraction of the axis; positive pads"),
        "scale_min": Key("float", 0.8, lo=0.01, help="affine zoom ~ U(scale_min, scale_max), x and y drawn apart"),
        "scale_max": Key("float", 1.5, lo=0.01),
        "translate": Key("float", 0.2, lo=0.0, hi=1.0, help="affine shift ~ U(-t, t) of the width and of the height"),
        "rotate": Key("float", 45.0, lo=0.0, hi=180.0, help="affine rotation ~ U(-r, r) degrees"),
        "shear": Key("float", 16.0, lo=0.0, hi=80.0, help="affine shear ~ U(-s, s) degrees"),
        "dropout_p_min": Key("float", 0.03, lo=0.0, hi=1.0, help="coarse dropout: cell drop probability ~ U(min, max)"),
        "dropout_p_max": Key("float", 0.15, lo=0.0, hi=1.0),
        "dropout_size_min": Key("float", 0.02, lo=0.0, hi=1.0,
                                help="coarse dropout grid: this fraction of each axis, at least dropout_min_cells cells"),
        "dropout_size_max": Key("float", 0.05, lo=0.0, hi=1.0),
        "dropout_per_channel": Key("float", 0.2, lo=0.0, hi=1.0, help="probability of one mask per channel"),
        "dropout_min_cells": Key("int", 4, lo=1, help="imgaug's min_size: the coarsest grid side"),
        "random_order": Key("bool", True, help="apply the six augmenters in a random order per image (imgaug random_order)"),
    },
}

# Keys the seed's config.txt walk-through places in another section. Its "[preprocess]" list describes
# preprocess_val.py's keys (path of the 10 validation views, N = 50000); the original config.txt has
# them under [preprocess_val], and [preprocess] (the training-set resize cache) counts no images.
MOVED_KEYS = {
    ("preprocess", "N"): "[preprocess] N is the validation image count, which lives in [preprocess_val] N "
                         "(the seed's walk-through lists it under [preprocess], the original config.txt under "
                         "[preprocess_val]); move the line there.",
}

