"""Typed config schemas, registered in Hydra's ConfigStore.

Every YAML file under ``conf/`` merges into these dataclasses, so a misspelt key or a
value of the wrong type fails at composition time (struct mode). Range checks that a
type cannot express live in :func:`validate`.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from hydra.core.config_store import ConfigStore

from metalearn.data import IMAGE_DATASETS
from metalearn.data.class_splits import check_split
from metalearn.data.rotation import ROTATION_SAMPLING
from metalearn.errors import ConfigError


@dataclass
class AlgoConfig:
    """Meta-learning algorithm. Fields not used by an algorithm are ignored by it."""

    name: str = "maml"
    inner_lr: float = 0.01
    inner_steps: int = 1
    inner_steps_test: int = 1
    first_order: bool = False
    # Rematerialise each inner step in the backward pass (saves memory, costs compute).
    remat: bool = False
    # CAML (CAVIA): size of the per-task context vector; inner_lr is the context's lr.
    context_size: int = 5
    # Reptile: inner optimizer ("sgd", or "adam" with beta1=0 as in the paper), examples
    # per inner step (0: the whole set), and whether a training task's inner loop uses
    # support + query jointly (true) or the support set only (query held out for metrics).
    inner_optimizer: str = "sgd"
    inner_batch_size: int = 0
    train_on_query: bool = True
    # Reptile (metalearn/algos/reptile.py): examples per class a meta-training task's inner
    # loop trains on, taken from its k_shot + k_query; the rest are held out and score the
    # logged training metric (null: train_on_query decides, as before). Examples per inner
    # step at test (null: inner_batch_size). The inner optimizer's state: "carry" (one
    # state through all tasks and into evaluation, as supervised-reptile; set in
    # conf/algo/reptile.yaml) or "reset" (fresh per task; the default here, so that runs
    # made before this key existed load as they were trained). Reptile's inner loss over a
    # batch (algo.inner_loss below): "mean" or "sum" (supervised-reptile minimises the sum of
    # per-example cross-entropies).
    train_shots: int | None = None
    inner_batch_size_test: int | None = None
    inner_state: str = "reset"
    # ADML (conf/algo/adml.yaml): L-inf attack used to craft the adversarial support/query
    # sets during meta-training. attack_step_size null: 2.5 * eps / attack_steps (PGD only).
    eps: float = 0.1
    attack: str = "fgsm"
    attack_steps: int = 10
    attack_step_size: float | None = None
    attack_random_start: bool = True
    # Craft the adversarial query against the clean-adapted parameters, not the meta-parameters.
    regenerate_adversarial: bool = False
    # Loss reductions (README, "Contested details"): "mean" over the examples, or cbfinn/maml's
    # "sum_over_shots" (each example's cross-entropy / K, summed: N x the mean on the support
    # set). inner_loss: the adaptation loss (training and test); outer_loss: the query loss
    # of the meta-objective. Classification only. Reptile takes "mean" or "sum" instead.
    inner_loss: str = "mean"
    outer_loss: str = "mean"
    # false: BatchNorm parameters stay fixed in the inner loop (meta-learned only, as in
    # cbfinn/maml); true: adapted with the other weights.
    adapt_bn: bool = True
    # MAML++ (conf/algo/mamlpp.yaml; metalearn/algos/mamlpp.py). Each part is a switch; with
    # all off (and optim.schedule=constant) it is MAML. multi_step_loss: query loss after
    # every inner step, weights annealed to the last step over msl_steps meta-steps; lslr:
    # learned per-layer per-step inner lrs (start: inner_lr); per_step_bn: one BatchNorm
    # scale/bias per inner step; first_order_steps: first-order meta-gradient for that many
    # meta-steps, then second order (0: algo.first_order throughout).
    multi_step_loss: bool = True
    msl_steps: int = 5000
    lslr: bool = True
    per_step_bn: bool = True
    first_order_steps: int = 0
    # iMAML (conf/algo/imaml.yaml): strength lam of the proximal term (lam/2)||phi - theta||^2
    # of the inner problem, conjugate-gradient steps for the implicit meta-gradient
    # (I + H/lam)^-1 g, and a damping added to the linear system: (I + damping*I + H/lam).
    lam: float = 2.0
    cg_steps: int = 5
    cg_damping: float = 0.0
    # Where the proximal term acts: "every_step" (the paper) or "pullback" (the authors'
    # code: unregularised inner steps, then one step phi -= inner_lr * lam * (phi - theta)).
    proximal: str = "every_step"
    # Added to lam in the CG system: (... + H/(lam + cg_lam_offset)); the authors' code: 10.
    cg_lam_offset: float = 0.0
    # lam of the adaptation at evaluation; null: algo.lam (the authors' code tests with 0).
    lam_test: float | None = None


@dataclass
class DatasetConfig:
    """Task distribution. ``name`` selects the sampler; the rest are its options."""

    name: str = "sinusoid"
    n_way: int = 1
    # Ways of the meta-training episodes when they differ from the evaluation episodes'
    # (Prototypical Networks train 60-way for 5-way tests); null: dataset.n_way. Only for
    # algorithms without a fixed-size output layer (protonet, protomaml).
    n_way_train: int | None = None
    k_shot: int = 10
    k_query: int = 10
    # sinusoid regression: amplitude ~ U[amp_min, amp_max], phase ~ U[phase_min, phase_max],
    # x ~ U[x_min, x_max].
    amp_min: float = 0.1
    amp_max: float = 5.0
    phase_min: float = 0.0
    phase_max: float = math.pi
    x_min: float = -5.0
    x_max: float = 5.0
    # image datasets
    variant: str = "standard"
    manual_dir: str | None = None
    data_dir: str | None = None
    image_size: int = 28
    rotations: bool = True
    split_seed: int = 0
    # Which classes go to train / validation / test (metalearn/data/class_splits.py): null is
    # the dataset's own split (Omniglot: random; mini-ImageNet: ravi). Omniglot: random,
    # alphabets (whole alphabets held out), vinyals, mamlpp, or a split file's path.
    split: str | None = None
    download: bool = True
    # image_folder: the root folder (one subfolder per class, or train/val/test subfolders
    # each holding class subfolders), channels (1 grey, 3 RGB), and the fractions of classes
    # for train/validation/test when the folder is not split already.
    path: str | None = None
    channels: int = 3
    split_ratios: list[float] = field(default_factory=lambda: [0.64, 0.16, 0.2])
    # tfds: a TFDS image-classification dataset ("name", "name/config", "name:version")
    # prepared in data_dir (or prepared there by TFDS when download is on), the TFDS splits
    # pooled into one set of classes (then split by split_ratios / split_seed; [0, 0, 1]:
    # every class a test class, for evaluating runs trained on other data), and the
    # image and label feature keys.
    tfds_name: str | None = None
    tfds_splits: list[str] = field(default_factory=lambda: ["train"])
    image_key: str = "image"
    label_key: str = "label"
    # Where episodes are sampled: "device" (the whole split in accelerator memory, sampled
    # inside the jitted step), "host" (a background thread gathers each batch of tasks from
    # host memory and prefetches it), or "auto" (device when the data fits, else host).
    placement: str = "auto"
    # host placement: meta-batches prepared ahead of the accelerator.
    prefetch: int = 2
    # Omniglot with rotations: "classes" (each 90-degree rotation of a character is a class of
    # its split, so one task may hold two rotations of a character), "per_task" (cbfinn/maml,
    # data_generator.py: N distinct characters per task, each rotated by its own random
    # multiple of 90 degrees) or "per_task_train_only" (MAML++'s code: the same for training
    # tasks only; validation and test tasks unrotated). metalearn/data/rotation.py.
    rotation_sampling: str = "classes"
    # Query examples per class of validation and test tasks; null: k_query (cbfinn/maml tests
    # mini-ImageNet on K queries per class while training on 15).
    k_query_test: int | None = None


@dataclass
class ModelConfig:
    name: str = "mlp"
    hidden: list[int] = field(default_factory=lambda: [40, 40])
    filters: int = 64
    blocks: int = 4
    # "stride": stride-2 3x3 convs (Omniglot, MAML paper); "maxpool": stride-1 conv + 2x2 max-pool.
    downsample: str = "stride"
    # "im2col": patches + batched matmul (fast under vmap on CPU); "xla": lax.conv.
    conv_impl: str = "im2col"
    # resnet12: channels of its four residual stages (each halves the resolution).
    channels: list[int] = field(default_factory=lambda: [64, 160, 320, 640])
    # conv4: the head sees the last feature map "flatten"ed or averaged over space
    # ("spatial_mean", cbfinn/maml's Omniglot network). resnet12 always averages.
    head: str = "flatten"
    # Initialiser of the head's kernel: lecun_normal (Flax default), glorot_uniform, or normal
    # (N(0, 1), cbfinn/maml's Omniglot w5).
    head_init: str = "lecun_normal"
    # BatchNorm: a learned scale besides the offset (false: offset only, as cbfinn/maml's
    # tf.contrib.layers.batch_norm), and the epsilon added to the variance (TF's default 1e-3).
    bn_scale: bool = True
    bn_epsilon: float = 1e-5
    # Context-conditioned conv4 (CAML): FiLM before the max-pool ("pre_pool") or after it
    # ("post_pool", CAVIA's classification/models.py).
    film_position: str = "pre_pool"
    # Mixed precision: "bfloat16" computes activations and matmuls in bf16 while the
    # parameters, their gradients and the optimizer state stay float32.
    compute_dtype: str = "float32"


@dataclass
class OptimConfig:
    name: str = "adam"
    lr: float = 0.001
    momentum: float = 0.0
    # Adam's epsilon (optax's default 1e-8; the iMAML authors' code uses 1e-3).
    eps: float = 1e-8
    # Clip the meta-gradient to this global norm; null disables clipping.
    clip_norm: float | None = None
    # Clamp every meta-gradient entry to [-clip_value, clip_value] (cbfinn/maml mini-ImageNet
    # and CAVIA: 10); null disables it. Applied before clip_norm.
    clip_value: float | None = None
    # "constant", "cosine" or "linear" (decays to lr * final_lr_fraction over trainer.steps),
    # or "step" (lr * decay_rate ** floor(step / decay_every); CAVIA: 0.9 every 5000 steps).
    schedule: str = "constant"
    warmup_steps: int = 0
    final_lr_fraction: float = 0.0
    decay_rate: float = 1.0
    decay_every: int = 0


@dataclass
class TrainerConfig:
    steps: int = 20000
    meta_batch_size: int = 25
    log_every: int = 100
    val_every: int = 2000
    val_tasks: int = 200
    checkpoint_every: int = 5000
    progress: bool = True
    # Checkpoints kept in <run dir>/checkpoints/ (the newest N; older ones are deleted).
    keep_checkpoints: int = 3
    # Continue from the newest complete checkpoint of hydra.run.dir (see README, Reliability).
    resume: bool = False
    # A non-finite loss or gradient: "stop" (exit 2, last checkpoint kept) or "skip" (the
    # update is not applied; the step still advances and is counted in skipped_steps).
    on_nan: str = "stop"
    # Meta-steps per compiled call (one host dispatch runs a block of steps; results are
    # bitwise those of one step per call). 0: automatic (blocks of about 0.1 s, cut at log,
    # validation and checkpoint steps); N: at most N per call; 1: one step per call.
    steps_per_call: int = 0
    # Also write TensorBoard event files (run dir /tensorboard/); needs the `tensorboard`
    # extra (tensorboardX): pip install "metalearn[tensorboard]".
    tensorboard: bool = False
    # Multi-host: "auto" calls jax.distributed.initialize() when the environment describes
    # a multi-process job (SLURM with more than one task, or JAX_COORDINATOR_ADDRESS);
    # "on" always calls it, "off" never.
    distributed: str = "auto"


@dataclass
class EvalConfig:
    n_tasks: int = 600
    # Tasks adapted in parallel per jitted chunk (memory vs. speed).
    batch_size: int = 100
    # Query examples per class scored at evaluation (validation and test): the first
    # k_query of the dataset.k_query sampled (null: all). For training tasks with more
    # queries than the test protocol uses (Reptile's held-out examples).
    k_query: int | None = None
    split: str = "test"


@dataclass
class AttackConfig:
    """Adversarial evaluation (conf/attack/): after clean adaptation, the query inputs are
    attacked against the adapted model. name: none, fgsm or pgd; L-inf radius eps;
    PGD: steps, step_size (null: 2.5 * eps / steps), random_start."""

    name: str = "none"
    eps: float = 0.1
    steps: int = 10
    step_size: float | None = None
    random_start: bool = True


@dataclass
class PreprocessConfig:
    """How `metalearn predict` and cross-domain `metalearn eval` treat new images, on top of
    the run's recorded preprocessing (<run dir>/preprocessing.json; metalearn/preprocess.py).
    invert: "auto" (invert an image whose polarity differs from the training data's, e.g. black
    strokes on white for an Omniglot run; nothing for runs without a polarity), "true" (invert
    every image) or "false" (never)."""

    invert: str = "auto"


@dataclass
class PaperConfig:
    """A published number an experiment preset (conf/experiment/) reproduces. Informational:
    copied into results.json and shown next to ours by `metalearn reproduce` / `report`.
    Empty (source "") for ad-hoc runs."""

    source: str = ""
    # "accuracy" or "mse", as in results.json; value/ci95 in the same units (accuracy as a
    # fraction, e.g. 0.987 for 98.7%).
    metric: str = ""
    value: float | None = None
    ci95: float | None = None
    note: str = ""


@dataclass
class Config:
    algo: AlgoConfig = field(default_factory=AlgoConfig)
    dataset: DatasetConfig = field(default_factory=DatasetConfig)
    model: ModelConfig = field(default_factory=ModelConfig)
    optim: OptimConfig = field(default_factory=OptimConfig)
    trainer: TrainerConfig = field(default_factory=TrainerConfig)
    eval: EvalConfig = field(default_factory=EvalConfig)
    attack: AttackConfig = field(default_factory=AttackConfig)
    # Set by experiment presets: the paper's reported result for this setting.
    paper: PaperConfig = field(default_factory=PaperConfig)
    seed: int = 0
    # For `metalearn eval`: the training run to load. Unused by `metalearn train`.
    run_dir: str | None = None
    # For `metalearn eval` and `predict`: how new images are preprocessed (see PreprocessConfig).
    preprocess: PreprocessConfig = field(default_factory=PreprocessConfig)
    # For `metalearn predict`: the labelled examples (a folder with one subfolder per class, or
    # a CSV of x,y for regression) and what to classify (a folder, class subfolders, a file or
    # a list of files; a CSV of x for regression).
    support: str | None = None
    query: Any = None


def register_configs() -> None:
    cs = ConfigStore.instance()
    cs.store(name="base_config", node=Config)


_DATASETS = ("sinusoid", *IMAGE_DATASETS)
_MODELS = ("mlp", "conv4", "resnet12")
# Algorithms that classify by distances to class prototypes: no regression, any number of ways.
_METRIC_ALGOS = ("protonet", "protomaml")
_OPTIMS = ("adam", "sgd")
# Omniglot facts (metalearn/data/omniglot.py), repeated here so validation needs no data
# imports: drawings per character and the characters of the smallest (validation) split.
_OMNIGLOT_DRAWINGS = 20
_OMNIGLOT_CLASSES = {"standard": 100, "small": 20}
# Images per class and classes of the smallest split of the fixed benchmarks (validation
# for all three); the loaders check the files again.
_FIXED_DATASETS = {"mini_imagenet": (600, 16), "cifar_fs": (600, 16), "fc100": (600, 20)}


def validate(cfg: Any) -> None:
    """Range-check a composed config; raise ConfigError naming the first bad key."""

    def need(ok: bool, key: str, value: Any, valid: str) -> None:
        if not ok:
            raise ConfigError(f"invalid {key}={value!r}: must be {valid}")

    a, d, m, o, t, e = cfg.algo, cfg.dataset, cfg.model, cfg.optim, cfg.trainer, cfg.eval
    from metalearn.algos import ALGORITHMS  # late import: algos import this module
    from metalearn.algos.imaml import PROXIMAL

    need(a.name in ALGORITHMS, "algo.name", a.name, f"one of {sorted(ALGORITHMS)}")
    need(math.isfinite(a.inner_lr) and a.inner_lr > 0, "algo.inner_lr", a.inner_lr, "> 0")
    need(a.inner_steps >= 1, "algo.inner_steps", a.inner_steps, ">= 1")
    need(a.inner_steps_test >= 0, "algo.inner_steps_test", a.inner_steps_test, ">= 0")
    if a.name == "caml":
        need(a.context_size >= 1, "algo.context_size", a.context_size, ">= 1 for algo=caml")
    if a.name == "mamlpp":
        need(a.msl_steps >= 1, "algo.msl_steps", a.msl_steps, ">= 1 (meta-steps of loss-weight annealing)")
        fo = a.first_order_steps
        need(fo >= 0, "algo.first_order_steps", fo, ">= 0 (0: no derivative-order annealing)")
    need(math.isfinite(a.lam) and a.lam > 0, "algo.lam", a.lam, "> 0")
    need(a.cg_steps >= 1, "algo.cg_steps", a.cg_steps, ">= 1")
    need(math.isfinite(a.cg_damping) and a.cg_damping >= 0, "algo.cg_damping", a.cg_damping, ">= 0")
    need(a.proximal in PROXIMAL, "algo.proximal", a.proximal, f"one of {list(PROXIMAL)}")
    off = a.cg_lam_offset
    need(math.isfinite(off) and off >= 0, "algo.cg_lam_offset", off, ">= 0")
    need(
        a.lam_test is None or (math.isfinite(a.lam_test) and a.lam_test >= 0),
        "algo.lam_test",
        a.lam_test,
        ">= 0 or null",
    )
    need(a.inner_optimizer in ("sgd", "adam"), "algo.inner_optimizer", a.inner_optimizer, "sgd or adam")
    need(a.inner_batch_size >= 0, "algo.inner_batch_size", a.inner_batch_size, ">= 0 (0: the whole set)")
    test_batch = a.inner_batch_size_test
    need(test_batch is None or test_batch >= 0, "algo.inner_batch_size_test", test_batch, ">= 0 or null")
    need(a.inner_state in ("carry", "reset"), "algo.inner_state", a.inner_state, "carry or reset")
    if a.train_shots is not None:
        per_class = cfg.dataset.k_shot + cfg.dataset.k_query
        need(
            1 <= a.train_shots < per_class,
            "algo.train_shots",
            a.train_shots,
            f">= 1 and < dataset.k_shot + dataset.k_query = {per_class} (the rest are held out), or null",
        )
    need(math.isfinite(a.eps) and a.eps >= 0, "algo.eps", a.eps, "finite and >= 0")
    need(a.attack in ("fgsm", "pgd"), "algo.attack", a.attack, "fgsm or pgd")
    need(a.attack_steps >= 1, "algo.attack_steps", a.attack_steps, ">= 1")
    need(
        a.attack_step_size is None or a.attack_step_size > 0,
        "algo.attack_step_size",
        a.attack_step_size,
        "> 0 or null",
    )
    if a.name == "reptile":
        need(a.inner_loss in ("mean", "sum"), "algo.inner_loss", a.inner_loss, "mean or sum for algo=reptile")
    for key in ("outer_loss",) if a.name == "reptile" else ("inner_loss", "outer_loss"):
        value = getattr(a, key, "mean")
        need(value in ("mean", "sum_over_shots"), f"algo.{key}", value, "mean or sum_over_shots")
        if value == "sum_over_shots":
            need(
                cfg.dataset.name != "sinusoid",
                f"algo.{key}",
                value,
                "mean for regression (sum_over_shots divides a cross-entropy by the shots per class)",
            )

    need(d.name in _DATASETS, "dataset.name", d.name, f"one of {list(_DATASETS)}")
    check_split(d)
    if a.name in _METRIC_ALGOS:
        need(
            d.name != "sinusoid",
            "algo.name",
            a.name,
            f"an algorithm that can regress for dataset=sinusoid ({a.name} classifies by distances to "
            "class prototypes: use an image dataset)",
        )
    if d.n_way_train is not None:
        need(
            a.name in _METRIC_ALGOS,
            "dataset.n_way_train",
            d.n_way_train,
            f"null for algo={a.name} (its output layer has dataset.n_way units); only "
            f"{' and '.join(_METRIC_ALGOS)} train on more ways than they test",
        )
        need(d.n_way_train >= 2, "dataset.n_way_train", d.n_way_train, ">= 2 or null")
    need(d.k_shot >= 1, "dataset.k_shot", d.k_shot, ">= 1")
    need(d.k_query >= 1, "dataset.k_query", d.k_query, ">= 1")
    if d.name == "sinusoid":
        need(d.amp_max >= d.amp_min > 0, "dataset.amp_min", d.amp_min, "> 0 and <= dataset.amp_max")
        need(d.x_max > d.x_min, "dataset.x_max", d.x_max, "> dataset.x_min")
        need(d.phase_max >= d.phase_min, "dataset.phase_max", d.phase_max, ">= dataset.phase_min")
    else:
        need(d.n_way >= 2, "dataset.n_way", d.n_way, ">= 2 for classification")
        need(d.image_size >= 4, "dataset.image_size", d.image_size, ">= 4")
        need(
            d.placement in ("auto", "device", "host"),
            "dataset.placement",
            d.placement,
            "auto, device or host",
        )
        need(d.prefetch >= 1, "dataset.prefetch", d.prefetch, ">= 1")
        need(
            d.rotation_sampling in ROTATION_SAMPLING,
            "dataset.rotation_sampling",
            d.rotation_sampling,
            f"one of {list(ROTATION_SAMPLING)}",
        )
        if d.rotation_sampling != "classes":
            need(
                d.name == "omniglot" and d.rotations,
                "dataset.rotation_sampling",
                d.rotation_sampling,
                "classes unless dataset=omniglot with dataset.rotations=true",
            )
            need(
                d.placement != "host",
                "dataset.placement",
                d.placement,
                f"auto or device with dataset.rotation_sampling={d.rotation_sampling} (rotations are "
                "drawn on device)",
            )
        need(
            d.k_query_test is None or d.k_query_test >= 1,
            "dataset.k_query_test",
            d.k_query_test,
            ">= 1 or null",
        )
        if d.name == "omniglot":
            need(
                d.variant in _OMNIGLOT_CLASSES,
                "dataset.variant",
                d.variant,
                f"one of {sorted(_OMNIGLOT_CLASSES)}",
            )
            # Episode shapes the real archives cannot hold fail here, before any data is read
            # (tasks.image_source checks the loaded arrays again, e.g. for custom archives).
            per_class = _OMNIGLOT_DRAWINGS
            rotated_classes = d.rotations and d.rotation_sampling == "classes"
            classes = _OMNIGLOT_CLASSES[d.variant] * (4 if rotated_classes else 1)
            where = f"Omniglot {d.variant}, rotations={d.rotations}"
        elif d.name in _FIXED_DATASETS:
            per_class, classes = _FIXED_DATASETS[d.name]
            where = d.name
        else:  # image_folder, tfds: known only once the data is read
            per_class = classes = None
            need(d.channels in (1, 3), "dataset.channels", d.channels, "1 (grey) or 3 (RGB)")
            if d.name == "image_folder":
                need(d.path is not None, "dataset.path", d.path, "the image folder (one subfolder per class)")
                need(Path(str(d.path)).expanduser().is_dir(), "dataset.path", d.path, "an existing directory")
            else:
                need(bool(d.tfds_name), "dataset.tfds_name", d.tfds_name, "a TFDS dataset name")
                need(len(d.tfds_splits) >= 1, "dataset.tfds_splits", list(d.tfds_splits), "TFDS split names")
            ratios = list(d.split_ratios)
            need(
                len(ratios) == 3 and all(r >= 0 for r in ratios) and abs(sum(ratios) - 1) < 1e-6,
                "dataset.split_ratios",
                ratios,
                "three fractions >= 0 (train, validation, test) summing to 1",
            )
            if d.name == "tfds" and getattr(cfg, "run_dir", None) is None:  # training, not `metalearn eval`
                need(
                    ratios[0] > 0 and ratios[1] > 0,
                    "dataset.split_ratios",
                    ratios,
                    "> 0 for train and validation to train ([0, 0, 1] is for metalearn eval)",
                )
        if d.name == "cifar_fs" or d.name == "fc100":
            need(d.image_size == 32, "dataset.image_size", d.image_size, f"32 for {d.name} (CIFAR images)")
        if per_class is not None:
            need(
                d.k_shot + d.k_query <= per_class,
                "dataset.k_shot + dataset.k_query",
                d.k_shot + d.k_query,
                f"<= {per_class} (images per class of {where})",
            )
            if d.k_query_test is not None:
                need(
                    d.k_shot + d.k_query_test <= per_class,
                    "dataset.k_shot + dataset.k_query_test",
                    d.k_shot + d.k_query_test,
                    f"<= {per_class} (images per class of {where})",
                )
            need(
                d.n_way <= classes,
                "dataset.n_way",
                d.n_way,
                f"<= {classes} (classes of the smallest split of {where})",
            )
        if d.manual_dir is not None:
            need(
                Path(d.manual_dir).expanduser().is_dir(),
                "dataset.manual_dir",
                d.manual_dir,
                "an existing directory holding the dataset files",
            )

    need(m.name in _MODELS, "model.name", m.name, f"one of {list(_MODELS)}")
    need(m.downsample in ("stride", "maxpool"), "model.downsample", m.downsample, "stride or maxpool")
    need(m.conv_impl in ("im2col", "xla"), "model.conv_impl", m.conv_impl, "im2col or xla")
    need(m.filters >= 1, "model.filters", m.filters, ">= 1")
    need(m.blocks >= 1, "model.blocks", m.blocks, ">= 1")
    need(all(h >= 1 for h in m.hidden), "model.hidden", list(m.hidden), "a list of sizes >= 1")
    need(
        len(m.channels) >= 1 and all(c >= 1 for c in m.channels),
        "model.channels",
        list(m.channels),
        "sizes >= 1",
    )
    need(m.head in ("flatten", "spatial_mean"), "model.head", m.head, "flatten or spatial_mean")
    if m.head == "spatial_mean":
        need(m.name == "conv4", "model.head", m.head, "flatten unless model=conv4 (resnet12 always averages)")
    need(
        m.head_init in ("lecun_normal", "glorot_uniform", "normal"),
        "model.head_init",
        m.head_init,
        "lecun_normal, glorot_uniform or normal",
    )
    need(math.isfinite(m.bn_epsilon) and m.bn_epsilon > 0, "model.bn_epsilon", m.bn_epsilon, "> 0")
    need(
        m.film_position in ("pre_pool", "post_pool"),
        "model.film_position",
        m.film_position,
        "pre_pool or post_pool",
    )
    need(
        m.compute_dtype in ("float32", "bfloat16"),
        "model.compute_dtype",
        m.compute_dtype,
        "float32 or bfloat16",
    )
    if m.name == "resnet12" and d.name != "sinusoid":
        need(
            d.image_size >= 2 ** len(m.channels),
            "dataset.image_size",
            d.image_size,
            f">= {2 ** len(m.channels)} for resnet12 (each of its {len(m.channels)} stages halves the size)",
        )
    if d.name == "sinusoid":
        need(m.name == "mlp", "model", m.name, "mlp for dataset=sinusoid (images need conv4 or resnet12)")
    else:
        need(m.name != "mlp", "model", m.name, "conv4 or resnet12 for image datasets")

    need(o.name in _OPTIMS, "optim.name", o.name, f"one of {list(_OPTIMS)}")
    need(math.isfinite(o.lr) and o.lr > 0, "optim.lr", o.lr, "> 0")
    need(math.isfinite(o.eps) and o.eps > 0, "optim.eps", o.eps, "> 0")
    need(o.clip_norm is None or o.clip_norm > 0, "optim.clip_norm", o.clip_norm, "> 0 or null")
    need(o.clip_value is None or o.clip_value > 0, "optim.clip_value", o.clip_value, "> 0 or null")
    need(
        o.schedule in ("constant", "cosine", "linear", "step"),
        "optim.schedule",
        o.schedule,
        "constant, cosine, linear or step",
    )
    if o.schedule == "step":
        need(o.decay_every >= 1, "optim.decay_every", o.decay_every, ">= 1 with optim.schedule=step")
        need(0 < o.decay_rate <= 1, "optim.decay_rate", o.decay_rate, "in (0, 1] with optim.schedule=step")
    need(o.warmup_steps >= 0, "optim.warmup_steps", o.warmup_steps, ">= 0")
    need(0 <= o.final_lr_fraction <= 1, "optim.final_lr_fraction", o.final_lr_fraction, "in [0, 1]")

    need(t.steps >= 0, "trainer.steps", t.steps, ">= 0")
    need(t.meta_batch_size >= 1, "trainer.meta_batch_size", t.meta_batch_size, ">= 1")
    need(t.log_every >= 1, "trainer.log_every", t.log_every, ">= 1")
    need(t.val_every >= 0, "trainer.val_every", t.val_every, ">= 0 (0 disables validation)")
    need(t.val_tasks >= 1, "trainer.val_tasks", t.val_tasks, ">= 1")
    need(t.checkpoint_every >= 0, "trainer.checkpoint_every", t.checkpoint_every, ">= 0")
    if t.tensorboard:  # checked here so a missing extra fails before any run dir is written
        import importlib.util

        need(
            importlib.util.find_spec("tensorboardX") is not None,
            "trainer.tensorboard",
            True,
            'false, or install the extra: pip install "metalearn[tensorboard]" (tensorboardX)',
        )
    need(t.keep_checkpoints >= 1, "trainer.keep_checkpoints", t.keep_checkpoints, ">= 1")
    need(t.on_nan in ("stop", "skip"), "trainer.on_nan", t.on_nan, "stop or skip")
    need(t.steps_per_call >= 0, "trainer.steps_per_call", t.steps_per_call, ">= 0 (0: automatic)")
    need(t.distributed in ("auto", "on", "off"), "trainer.distributed", t.distributed, "auto, on or off")
    need(e.n_tasks >= 2, "eval.n_tasks", e.n_tasks, ">= 2 (a confidence interval needs two tasks)")
    need(e.batch_size >= 1, "eval.batch_size", e.batch_size, ">= 1")
    eval_k = getattr(e, "k_query", None)
    need(
        eval_k is None or 1 <= eval_k <= cfg.dataset.k_query,
        "eval.k_query",
        eval_k,
        f">= 1 and <= dataset.k_query = {cfg.dataset.k_query}, or null",
    )
    need(e.split in ("train", "validation", "test"), "eval.split", e.split, "train, validation or test")

    p = getattr(cfg, "preprocess", None)  # absent from configs of older runs
    if p is not None:
        need(
            str(p.invert).lower() in ("auto", "true", "false"),
            "preprocess.invert",
            p.invert,
            "auto, true or false",
        )

    k = getattr(cfg, "attack", None)  # absent from hand-built configs of older code
    if k is not None:
        need(k.name in ("none", "fgsm", "pgd"), "attack.name", k.name, "none, fgsm or pgd")
        need(math.isfinite(k.eps) and k.eps >= 0, "attack.eps", k.eps, "finite and >= 0")
        need(k.steps >= 1, "attack.steps", k.steps, ">= 1")
        need(k.step_size is None or k.step_size > 0, "attack.step_size", k.step_size, "> 0 or null")
