"""The value rule of every key of the run settings, the recipe and the data configs: one table per section.

Why tables: a rule next to its key is what a reader looks for ("what may `recipe.momentum` be?"), and a key
without a rule is then easy to find (tests/test_config_ranges.py composes every group option and fails on a
key that has none). Every rule goes through `Knobs`, so every error has one shape, naming the key, the value and
what is allowed:

    recipe.momentum=1.5 is invalid; allowed values: a number in [0.0, 1.0)

The operator, attention and task knobs are not here: their owners check them (`Knobs` in dynconv/ops,
dynconv/attention and dynconv/tasks), on the model built on the meta device.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable, Mapping

from dynconv.knobs import Knobs, is_int, is_number

Rule = Callable[[Knobs, str], Any]

SCHEDULES = ("cosine", "step", "multistep", "linear", "poly", "none")
AMP_MODES = ("none", "bf16", "fp16")  # dynconv.precision.AMP_DTYPES maps them to autocast dtypes
DEVICES = ("auto", "cpu", "cuda")
DIST_BACKENDS = ("auto", "nccl", "gloo")
# What both timm's `str_to_interp_mode` (ImageNet-style transforms) and torchvision's `InterpolationMode`
# (CIFAR's resize) accept; timm's extra "random" exists for training crops only, its evaluation resize fails.
INTERPOLATIONS = ("nearest", "bilinear", "bicubic", "box", "hamming", "lanczos")
RANDOM_ERASING_MODES = ("pixel", "rand", "const")  # timm's RandomErasing
AUTO_AUGMENT_OFF = ("", "none", "null", "off", "false")  # what the transforms read as "no auto-augment"
# The largest image side: a typo such as 22400 would otherwise try to allocate (or write, for the embedded
# digits) images of gigabytes; the papers' largest setting is COCO's 1333.
MAX_SIDE = 8192
# Detection sizes: below this, the coarsest pyramid levels (stride 64-128) have nothing left to see.
MIN_DETECTION_SIDE = 32
SEED_MAX = 2**32 - 1  # numpy's legacy seeding takes 32 bits; torch adds the epoch to the seed
MAX_TIMEOUT_S = 1e9  # ~31 years, i.e. no timeout; a larger value overflows the timedelta torch is given
# Segmentation's random scale: at most this factor. A typo such as 20 would scale a 2048x1024 Cityscapes image to
# gigabytes; the papers' recipes scale by at most 2.
MAX_SCALE = 4.0
# Datasets whose class count is fixed (embedded or a fixed release); the others count their class folders.
FIXED_CLASS_COUNTS = {"digits": 10, "cifar100": 100, "voc": 21, "cityscapes": 19, "toy_seg": 4, "toy_video": 4}
# Frames per video clip: a typo such as 1600 would decode (and hold) minutes of video per sample; the papers use 8-16.
MAX_FRAMES = 512
VIDEO_SAMPLINGS = ("dense", "segments")  # dynconv/tasks/video/sampling.py


def rule(method: str, *args: Any, **kwargs: Any) -> Rule:
    """The rule `Knobs.<method>(key, *args, **kwargs)`."""

    def check(knobs: Knobs, key: str) -> Any:
        return getattr(knobs, method)(key, *args, **kwargs)

    return check


FLAG = rule("flag")
PROBABILITY = rule("number_in", 0.0, 1.0)
NON_NEGATIVE = rule("number", 0.0, inclusive=True)
POSITIVE_INT = rule("integer", 1)
SUBSET_SIZE = rule("integer", 1, nullable=True)


def CHECKED_ELSEWHERE(knobs: Knobs, key: str) -> None:  # noqa: N802 - used like the constant rules above
    """No rule here: a registry or a dataset layout check has it."""


# ------------------------------------------------------------------------------------------- custom rules
def _existing_file(knobs: Knobs, key: str, words: tuple[str, ...], nullable: bool) -> None:
    value = knobs.get(key)
    if (value is None and nullable) or (isinstance(value, str) and value in words):
        return
    allowed = ", ".join([*words, "a path to an existing checkpoint file"])
    if not isinstance(value, str) or not value.strip():
        raise knobs.fail(key, value, ("null, " if nullable else "") + allowed)
    if not Path(value).expanduser().is_file():
        raise knobs.error(f"{knobs.name(key)}={value!r}: no such checkpoint file; allowed values: "
                          f"{'null, ' if nullable else ''}{allowed}")


def init_from(knobs: Knobs, key: str) -> None:
    _existing_file(knobs, key, (), nullable=True)


def init_from_static(knobs: Knobs, key: str) -> None:
    """null, a static network's weights file, or timm:<a timm model with pretrained weights>; not with init_from
    (one start: a dynamic checkpoint of the same op, or a static network's weights; docs/pretrained.md)."""
    value = knobs.get(key)
    if value is None:
        return
    if knobs.get("init_from") is not None:
        raise knobs.error(f"{knobs.name(key)}={value!r} and init_from={knobs.get('init_from')!r} are both set: a run "
                          "starts from one of them; allowed values: null (keep init_from) or unset init_from")
    if isinstance(value, str) and value.startswith("timm:"):
        import timm

        name = value.removeprefix("timm:")
        if not (name in timm.list_pretrained() or timm.is_model_pretrained(name)):
            raise knobs.error(f"{knobs.name(key)}={value!r}: timm has no pretrained weights named {name!r}; allowed "
                              "values: timm:<a name of timm.list_pretrained()>, e.g. timm:resnet50.tv_in1k")
        return
    _existing_file(knobs, key, (), nullable=True)


def resume(knobs: Knobs, key: str) -> None:
    _existing_file(knobs, key, ("auto", "never"), nullable=False)


def conv_algorithm(knobs: Knobs, key: str) -> None:
    """null (DYNCONV_CONV_ALGORITHM or measure) or a policy of the per-sample convolution selector."""
    from dynconv.functional.selector import POLICIES

    if knobs.get(key) is not None:
        knobs.choice(key, POLICIES)


def kernel_memory(knobs: Knobs, key: str) -> None:
    """auto | keep | recompute: whether autograd keeps the per-sample kernels (dynconv.functional.recompute)."""
    from dynconv.functional.recompute import KERNEL_MEMORY

    knobs.choice(key, KERNEL_MEMORY)


def optimizer(knobs: Knobs, key: str) -> None:
    import timm.optim

    knobs.choice(key, timm.optim.list_optimizers())


def color_jitter(knobs: Knobs, key: str) -> None:
    """What timm's create_transform takes: null (off), one strength >= 0 for brightness, contrast and
    saturation, or 3-4 numbers (brightness, contrast, saturation[, hue]); torchvision's hue is at most 0.5."""
    value = knobs.get(key)
    allowed = "null, a number >= 0, or a list of 3 or 4 numbers >= 0 (brightness, contrast, saturation[, hue <= 0.5])"
    if value is None or (is_number(value) and value >= 0):
        return
    items = list(value) if isinstance(value, (list, tuple)) else None
    if (items is None or len(items) not in (3, 4) or not all(is_number(v) and v >= 0 for v in items)
            or (len(items) == 4 and items[3] > 0.5)):
        raise knobs.fail(key, value, allowed)


def auto_augment(knobs: Knobs, key: str) -> None:
    """null / off, or a policy string timm can build (rand-m9-mstd0.5-inc1, augmix-..., v0, original, ...): the
    policy is built once here, so a typo fails now rather than when the first worker starts."""
    value = knobs.get(key)
    if value is None or (isinstance(value, str) and value.strip().lower() in AUTO_AUGMENT_OFF):
        return
    allowed = ("null, or a timm auto-augment policy: rand-<options> (e.g. rand-m9-mstd0.5-inc1), augmix-<options>, "
               "v0, v0r, original, originalr, 3a")
    if not isinstance(value, str):
        raise knobs.fail(key, value, allowed)
    from timm.data import create_transform

    try:
        create_transform(input_size=(3, 32, 32), is_training=True, auto_augment=value)
    except Exception as error:
        reason = str(error) or type(error).__name__
        raise knobs.error(f"{knobs.name(key)}={value!r} is invalid: timm cannot build it ({reason}); allowed values: "
                          f"{allowed}") from None


def optional_text(knobs: Knobs, key: str) -> None:
    """null or a non-empty string (a table or row id)."""
    if knobs.get(key) is not None:
        knobs.text(key)


def data_root(knobs: Knobs, key: str) -> None:
    """A folder name; whether it holds the dataset is the dataset's own check (null: it says how to set it)."""
    value = knobs.get(key)
    if value is not None and (not isinstance(value, str) or not value.strip()):
        raise knobs.fail(key, value, "a directory (a non-empty string)")


def num_classes(knobs: Knobs, key: str) -> None:
    """null (count the class folders) or the count; a dataset whose count is fixed takes only that one."""
    fixed = FIXED_CLASS_COUNTS.get(str(knobs.get("name")))
    value = knobs.get(key)
    if fixed is not None:
        if value is not None and not (is_int(value) and value == fixed):
            raise knobs.fail(key, value, f"null, {fixed} (data={knobs.get('name')} has {fixed} classes)")
        return
    knobs.integer(key, 2, nullable=True)


def crop_size(knobs: Knobs, key: str) -> None:
    """A segmentation training crop: one side (a square) or [height, width], each in [1, MAX_SIDE]."""
    value = knobs.get(key)
    sides = [value] if is_int(value) else list(value) if isinstance(value, (list, tuple)) and len(value) == 2 else None
    if sides is None or not all(is_int(side) and 1 <= side <= MAX_SIDE for side in sides):
        raise knobs.fail(key, value, f"an integer in [1, {MAX_SIDE}] (a square) or [height, width] of such integers")


def video_resize(knobs: Knobs, key: str) -> None:
    """The frames' short side before cropping: at least the crop (data.image_size), which evaluation takes from the
    centre of it."""
    crop = knobs.get("image_size")
    low = crop if is_int(crop) and 1 <= crop <= MAX_SIDE else 1
    knobs.integer(key, low, high=MAX_SIDE)


def max_size(knobs: Knobs, key: str) -> None:
    """The cap on the long side must leave room for every short side the model resizes to."""
    shorts = [knobs.get("test_size"), *(knobs.get("train_sizes") or [])]
    largest = max([v for v in shorts if is_int(v)] or [MIN_DETECTION_SIDE])
    value = knobs.get(key)
    if not is_int(value) or not largest <= value <= MAX_SIDE:
        raise knobs.fail(key, value, f"integers in [{largest}, {MAX_SIDE}] (>= data.test_size and every "
                                     "data.train_sizes entry: it caps the long side)")


# ------------------------------------------------------------------------------------------------ tables
TOP_LEVEL: dict[str, Rule] = {
    "seed": rule("integer", 0, high=SEED_MAX),
    "device": rule("choice", DEVICES),
    "init_from": init_from,
    "init_from_static": init_from_static,
    "resume": resume,
    "deterministic": FLAG,
    "conv_algorithm": conv_algorithm,
    "kernel_memory": kernel_memory,
}
DIST = {"backend": rule("choice", DIST_BACKENDS), "timeout_s": rule("number_in", 0.0, MAX_TIMEOUT_S, low_open=True)}
NONFINITE = {"max_consecutive": POSITIVE_INT}
LOG = {"every": POSITIVE_INT, "progress_bar": FLAG, "tensorboard": FLAG, "figures": FLAG}
CHECKPOINT = {"enabled": FLAG, "save_best": FLAG, "keep_last": rule("choice", (1, 2)),
              "on_write_error": rule("choice", ("stop", "continue"))}
RECIPE: dict[str, Rule] = {
    "epochs": POSITIVE_INT,
    "batch_size": POSITIVE_INT,
    "eval_batch_size": POSITIVE_INT,
    "drop_last": FLAG,
    "opt": optimizer,
    "lr": rule("number", 0.0),
    "momentum": rule("number_in", 0.0, 1.0, high_open=True),
    "weight_decay": NON_NEGATIVE,
    "sched": rule("choice", SCHEDULES),
    "warmup_epochs": NON_NEGATIVE,
    "warmup_lr": NON_NEGATIVE,
    "min_lr": NON_NEGATIVE,
    "decay_epochs": rule("number", 0.0),
    "decay_milestones": rule("numbers", low=0.0, ascending=True, empty=True),
    "decay_rate": rule("number_in", 0.0, 1.0, low_open=True),  # step/multistep: lr factor; poly: the power
    "smoothing": rule("number_in", 0.0, 1.0, high_open=True),
    "clip_grad": rule("number", 0.0, nullable=True),
    "amp": rule("choice", AMP_MODES),
    "channels_last": FLAG,
    "compile": FLAG,
    "sync_bn": FLAG,
    "eval_every": POSITIVE_INT,
    "accum_steps": POSITIVE_INT,  # micro-batches per optimizer step (gradient accumulation)
    "cycle_epochs": rule("number", 0.0, nullable=True),  # SGDR's first cycle; only with sched=cosine (config.py)
    "cycle_mul": rule("number", 0.0),
    "cycle_limit": POSITIVE_INT,
    "kw_tau_epochs": NON_NEGATIVE,  # KernelWarehouse's tau schedule length (op.tau_epochs interpolates it)
    "zero_init_last": FLAG,  # ResNets' last BN scale at 0 (timm) or 1 (the releases); backbone.zero_init_last interpolates it
}
# Recipe keys that a recipe written before them (a user's own, not built on digits.yaml) may lack: a missing one
# means its default (accum_steps 1, one cosine cycle; op=kw's tau_epochs falls back to 10, backbone.zero_init_last to
# timm's true), read with `recipe.get`.
OPTIONAL_RECIPE_KEYS = ("accum_steps", "cycle_epochs", "cycle_mul", "cycle_limit", "kw_tau_epochs", "zero_init_last")
EMA = {"enabled": FLAG, "decay": rule("number_in", 0.0, 1.0, high_open=True), "warmup": FLAG}
AUG: dict[str, Rule] = {
    "scale": rule("pair", 0.0, 1.0),
    "ratio": rule("pair", 0.0),
    "hflip": PROBABILITY,
    "vflip": PROBABILITY,
    "color_jitter": color_jitter,
    "auto_augment": auto_augment,
    "re_prob": PROBABILITY,
    "re_mode": rule("choice", RANDOM_ERASING_MODES),
    "re_count": POSITIVE_INT,
    "mixup": NON_NEGATIVE,
    "cutmix": NON_NEGATIVE,
    "mixup_prob": PROBABILITY,
    "mixup_switch_prob": PROBABILITY,
}
DATA: dict[str, Rule] = {
    "name": CHECKED_ELSEWHERE,  # the DATASETS registry (and whether it fits the task)
    "root": data_root,  # its type; what is in it: the dataset's own layout check
    "image_size": rule("integer", 1, high=MAX_SIDE),  # and a meta-device forward pass (validate_train_config)
    "num_classes": num_classes,
    "strict": FLAG,
    "num_workers": rule("integer_or", ("auto",), 0),
    "pin_memory": FLAG,
    "persistent_workers": FLAG,
    "mean": rule("numbers", length=3),
    "std": rule("numbers", length=3, low=0.0, inclusive=False),
    "crop_pct": rule("number_in", 0.0, 1.0, low_open=True),
    "interpolation": rule("choice", INTERPOLATIONS),
    "max_train_samples": SUBSET_SIZE,
    "max_val_samples": SUBSET_SIZE,
    "crop_padding": rule("integer", 0),
    "train_split": rule("text"),
    "val_split": rule("text"),
    "train_sizes": rule("numbers", integers=True, low=MIN_DETECTION_SIDE, high=MAX_SIDE),
    "test_size": rule("integer", MIN_DETECTION_SIDE, high=MAX_SIDE),
    "max_size": max_size,  # after test_size and train_sizes, which it is compared with
    "hflip": PROBABILITY,
    # Segmentation (docs/segmentation.md): the training crop and random scale, the evaluation size, VOC's lists.
    "crop_size": crop_size,
    "scale_range": rule("pair", 0.0, MAX_SCALE),
    "val_size": rule("integer", 1, high=MAX_SIDE, nullable=True),
    "train_list": optional_text,
    "train_mask_dir": rule("text"),
    # Video (docs/video.md; train_list above is also the training clip list): the lists and classes file, frames per
    # clip and how they are sampled, the frames' short side and the training crops.
    "val_list": optional_text,
    "classes": optional_text,
    "clips_dir": optional_text,
    "num_frames": rule("integer", 1, high=MAX_FRAMES),
    "sampling": rule("choice", VIDEO_SAMPLINGS),
    "frame_stride": POSITIVE_INT,
    "resize": video_resize,  # after image_size, which it is compared with
    "crop_scale": rule("pair", 0.0, 1.0),
}
# op.keep_static is every operator's; the other op keys are the operator's own.
OP = {"keep_static": rule("strings", example="[layer1.*, fc]", nullable=True)}
REPRODUCE = {  # set by scripts/reproduce.py launch (docs/reproduction.md)
    "table": optional_text,
    "row": optional_text,
    "smoke": FLAG,
}
BACKBONE = {
    "name": CHECKED_ELSEWHERE,  # the BACKBONES registry
    "model": CHECKED_ELSEWHERE,  # backbone=timm: the timm model name, checked against timm's registry when built
    "drop_rate": rule("number_in", 0.0, 1.0, high_open=True, nullable=True),
    "drop_path_rate": rule("number_in", 0.0, 1.0, high_open=True, nullable=True),
    # Initialisation and regularisation choices of the papers' releases (docs/initialisation.md): each block's last
    # BatchNorm scale at 0 (timm) or 1; timm's linear drop-path ramp or one rate everywhere; the library's classifier
    # init or N(0, 0.01) with a zero bias.
    "zero_init_last": FLAG,
    "drop_path_schedule": rule("choice", ("linear", "constant")),
    "classifier_init": rule("choice", ("library", "normal")),
    # Architecture variants of the ResNets (docs/training.md): BatchNorm or GroupNorm(norm_groups, C); ResNet v1's
    # stride on the first 1x1 of a downsampling bottleneck instead of the 3x3 (v1.5).
    "norm_layer": rule("choice", ("batchnorm", "groupnorm")),
    "norm_groups": rule("integer", 1),
    "stride_in_1x1": FLAG,
    # Dilated last stages (docs/segmentation.md): the stride of the last feature map; 32 is the plain network.
    "output_stride": rule("choice", (8, 16, 32)),
    # TSM's temporal shift (docs/video.md): 1/shift_div of the channels move back in time, 1/shift_div forward.
    "shift_div": rule("integer", 2),
    "default_resolution": rule("integer", 1, high=MAX_SIDE),
}


@dataclass(frozen=True)
class Section:
    """The rules of one config section (`path`, "" for the top level). `required`: keys that must be set (all
    of them when None); the others are checked where the composed config has them (a detection recipe has
    no aug keys, CIFAR's data no crop_pct)."""

    path: str
    rules: Mapping[str, Rule]
    required: tuple[str, ...] | None = None


RUN_SECTIONS = (
    Section("", TOP_LEVEL),
    Section("dist", DIST),
    Section("nonfinite", NONFINITE),
    Section("log", LOG),
    Section("checkpoint", CHECKPOINT),
    Section("recipe", RECIPE, required=tuple(key for key in RECIPE if key not in OPTIONAL_RECIPE_KEYS)),
    Section("recipe.ema", EMA),
    Section("recipe.aug", AUG, required=()),
    Section("reproduce", REPRODUCE, required=()),
)
DATA_SECTION = Section("data", DATA, required=("name", "image_size"))
BACKBONE_SECTION = Section("backbone", BACKBONE, required=("name",))
OP_SECTION = Section("op", OP, required=())
MISSING = "???"  # OmegaConf's mandatory value, as a plain container shows it


def check_section(config: Mapping[str, Any], section: Section, error: type[Exception]) -> None:
    """Apply `section`'s rules to the plain (resolved) `config`; raise `error` naming the first bad key."""
    node: Any = config
    for part in filter(None, section.path.split(".")):
        node = node.get(part) if isinstance(node, Mapping) else None
    if node is None:
        node = {}
    if not isinstance(node, Mapping):
        raise error(f"{section.path}={node!r} is invalid; allowed values: a section with the keys "
                    f"{', '.join(section.rules)}")
    knobs = Knobs(node, section.path, error=error)
    required = section.rules.keys() if section.required is None else section.required
    for key, check in section.rules.items():
        if key not in node or node[key] == MISSING:
            if key in required:
                name = knobs.name(key)
                raise error(f"{name} is required but not set: pass {name}=...")
            continue
        check(knobs, key)
