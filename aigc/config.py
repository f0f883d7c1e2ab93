"""Typed, validated configuration: one pydantic model per ``params.yaml`` section.

``params.yaml`` is read once and validated as a whole, so a typo anywhere fails before any
stage does work. A stage then takes only its own section (``load_section``), never the raw
dict. Every error names the key, the value it had and what is allowed, in one line per
problem (``ConfigError``), e.g.::

    params.yaml: train.lr_g = -0.1: must be > 0
"""

from __future__ import annotations

import warnings
from pathlib import Path
from typing import Annotated, Any, Literal, TypeVar

import yaml
from pydantic import BaseModel, ConfigDict, Field, ValidationError, model_validator

from aigc.errors import ConfigError

DEFAULT_PARAMS = "params.yaml"
MAX_IMAGE_SIZE = 1024  # the largest data.image_size; source images may be up to 4x larger (aigc.data.sources)


class _Section(BaseModel):
    # extra="forbid": an unknown key is a typo until proven otherwise.
    # strict: "3" is not an int and 1 is not a bool; YAML already gives real types.
    model_config = ConfigDict(extra="forbid", strict=True, frozen=True, use_attribute_docstrings=True)


class DataConfig(_Section):
    """Where the raw images come from (ingest) and how they are cleaned and split (preprocess)."""

    source: Literal["mnist5k", "digits", "idx", "npz", "csv", "folder"] = "mnist5k"
    """mnist5k | digits | idx | npz | csv | folder."""
    # File or folder for the local sources (idx, npz, csv, folder); ignored by the built-ins.
    path: str = "data/source"
    """File or folder for idx, npz, csv, folder (ignored by mnist5k, digits)."""
    # IDX only: the labels file; by default found beside the images file
    # (train-images-idx3-ubyte -> train-labels-idx1-ubyte).
    labels_path: str | None = None
    """Idx only; default: the *labels*idx1* file beside the images."""
    # CSV only: the column that holds the class label.
    label_column: str = "label"
    """Csv only."""
    # Square side to resize/pad to; null keeps the source resolution.
    image_size: int | None = Field(default=None, ge=4, le=MAX_IMAGE_SIZE)
    """Square side to resize/pad to; null keeps the source resolution."""
    resize_mode: Literal["pad", "resize"] = "pad"
    """pad (centre on black, never shrinks) | resize (Lanczos)."""
    test_size: float = Field(default=0.1, gt=0.0, lt=1.0)
    """Held-out share, stratified by label."""
    # Images whose pixel standard deviation (0..255 scale) is below this are blank/constant.
    blank_std: float = Field(default=1.0, ge=0.0)
    """Images with pixel std below this (0..255 scale) are dropped as blank."""
    # 16-bit images (PNG/TIFF "I;16", uint16 arrays): "scale" maps 0..65535 onto 0..255 (x / 257,
    # rounded); "refuse" stops ingest naming the files. Never clipped.
    high_bit_depth: Literal["scale", "refuse"] = "scale"
    """16-bit images: scale (0..65535 -> 0..255, never clipped) | refuse."""
    # Float pixels: "auto" accepts an unambiguous range ([0, 1], [-1, 1], or whole numbers in
    # 0..255) and refuses anything else with the range found; or declare the range.
    float_range: Literal["auto", "0..1", "-1..1", "0..255"] = "auto"
    """Float pixels: auto ([0,1], [-1,1] or whole 0..255; else refused) | 0..1 | -1..1 | 0..255."""
    # folder (and an idx folder): a symbolic link whose target lies outside data.path is refused,
    # naming the link and its target, unless this is true; links that stay inside are followed.
    follow_symlinks: bool = False
    """Follow symbolic links in a folder source that lead outside it (false: refused, naming each)."""


class ModelConfig(_Section):
    """The model family; resolution and channels (and, when conditional, the classes) come from
    dataset.json."""

    family: Literal["dcgan", "mlp", "vae", "pixelcnn"] = "dcgan"
    """dcgan | mlp (GANs) | vae (variational autoencoder, trained with the vae section) | pixelcnn
    (gated PixelCNN, autoregressive, trained with the pixelcnn section)."""
    z_dim: int = Field(default=100, ge=1, le=4096)
    """Length of G's latent vector z (pixelcnn: ignored, one z per sub-pixel, C*H*W)."""
    # dcgan only. G's channels from the projection on (the last two layers double H and W; any
    # before them keep the size), D's stride-2 convolutions, and the kernel of both.
    g_widths: list[Annotated[int, Field(ge=1, le=4096)]] = Field(default_factory=lambda: [64, 32],
                                                                 min_length=2, max_length=8)
    """dcgan G: channels from the projection on; sides above 4x the base (e.g. 32, 64) add doubling
    blocks at the widest width."""
    d_widths: list[Annotated[int, Field(ge=1, le=4096)]] = Field(default_factory=lambda: [32, 64],
                                                                 min_length=1, max_length=8)
    """dcgan D: one stride-2 convolution per width."""
    kernel: int = Field(default=4, ge=2, le=9)
    """dcgan kernel side (even only with two g_widths)."""
    upsample: Literal["transposed", "nearest"] = "transposed"
    """dcgan G's doubling layers: transposed (a stride-2 transposed convolution) | nearest (nearest-
    neighbour upsampling, then a stride-1 convolution: no checkerboard with any kernel, ~2x G's FLOPs)."""
    d_dropout: float = Field(default=0.0, ge=0.0, lt=1.0)  # after each D convolution (0: none)
    """Dropout after each D convolution (0: none; off by default: measured 1.2x the img/s and a lower FID gap)."""
    spectral_norm: bool = True  # D's weights divided by their largest singular value (any family)
    """Spectral normalisation of D's weights."""

    @model_validator(mode="after")
    def _kernel_fits(self) -> "ModelConfig":
        if self.kernel % 2 == 0 and len(self.g_widths) > 2:
            raise ValueError(f"kernel = {self.kernel} is even, but g_widths {self.g_widths} has size-keeping "
                             "(stride-1) layers, which need an odd kernel; use an odd kernel or two g_widths")
        return self

    # Condition on the class label: dcgan -> conditional-BatchNorm G + projection D; vae -> a
    # conditional VAE. True needs a labelled dataset (checked when training reads dataset.json);
    # "auto" conditions when every training image has a label and there are 2+ classes (and the
    # family has a conditional variant), else trains unconditionally (aigc.models.net_config).
    conditional: bool | Literal["auto"] = "auto"
    """Condition on the class (dcgan: cBN G + projection D; vae: cVAE; pixelcnn: per-class bias): auto = when
    every training image has a label (2+ classes) | true | false."""

    @model_validator(mode="after")
    def _family_can_be_conditional(self) -> "ModelConfig":
        if self.conditional is True and self.family == "mlp":
            raise ValueError("the mlp family has no conditional variant; use family dcgan or vae, "
                             "or set model.conditional: false")
        return self


class VAEConfig(_Section):
    """Training of the vae family (model.family: vae); epochs and batch size come from the train
    section, device, threads and logging from the runtime section."""

    # p(x|z): bernoulli (pixel intensity (x+1)/2 as a Bernoulli probability; the usual MNIST
    # choice) or gaussian (mean tanh(o/2), fixed standard deviation `sigma` on the [-1, 1] scale).
    likelihood: Literal["bernoulli", "gaussian"] = "bernoulli"
    """P(x|z): bernoulli (pixel intensity as a probability) | gaussian (fixed sigma)."""
    sigma: float = Field(default=0.1, gt=0.0, le=10.0)
    """Gaussian only: the standard deviation on the [-1, 1] pixel scale."""
    # The weight of the KL term (1 = the ELBO; beta-VAE otherwise) ...
    beta: float = Field(default=1.0, gt=0.0, le=1000.0)
    """Weight of the KL term (1 = the ELBO)."""
    # ... ramped linearly from 0 over this many epochs (KL warm-up, Bowman et al. 2016; 0 = off).
    kl_warmup_epochs: int = Field(default=0, ge=0, le=10_000)
    """Ramp the KL weight from 0 to beta over this many epochs (0 = off)."""
    lr: float = Field(default=1e-3, gt=0.0, le=1.0)  # Adam (betas 0.9, 0.999)
    """Adam learning rate (betas 0.9, 0.999)."""


class PixelCNNConfig(_Section):
    """Training of the pixelcnn family (model.family: pixelcnn; aigc/models/pixelcnn.py): maximum
    likelihood over 256 levels per sub-pixel; its own epochs (a step costs ~15x a dcgan step), batch
    size and logging from the train section."""

    # 6 x 32 (131k parameters), measured on 4,500 28x28 MNIST digits, batch 64, a shared 2-core
    # AMD EPYC: one epoch 130 s (35 img/s; 1.78 train bits/dim after it); sampling 10 img/s then, ~70-90 now
    # (the cached sampler, one thread of a busy 2-core Xeon; python -m aigc_bench.sampling).
    layers: int = Field(default=6, ge=1, le=64)
    """Gated layers: the first 7x7 (mask A), the rest 3x3 (mask B); 6 see 9 rows above, 8 columns left."""
    width: int = Field(default=32, ge=3, le=1024)
    """Channels of each stack (split into colour groups R, G, B on RGB data)."""
    lr: float = Field(default=1e-3, gt=0.0, le=1.0)  # Adam (betas 0.9, 0.999)
    """Adam learning rate (betas 0.9, 0.999)."""
    # The family's own budget: train.epochs (20, set for the dcgan) would take ~40 min here.
    epochs: int | None = Field(default=5, ge=1, le=10_000)
    """Epochs of a pixelcnn training (null: train.epochs); its whole run within ~15 min on a 2-core CPU (docs: Models)."""


# train.preset: knobs that replace params.yaml's train values where they are still the defaults,
# each set measured as a whole (the section "Models and training" of aigc_bench/README.md). A value
# the user changed (dvc exp run -S train.preset=long -S train.epochs=80) wins over the preset's,
# and the train stage says so. "standard" replaces nothing.
TRAIN_PRESETS: dict[str, dict[str, Any]] = {"standard": {}, "long": {"epochs": 150}}


class TrainConfig(_Section):
    preset: Literal["standard", "long"] = "standard"
    """standard: the values below | long: for users who can wait, the measured longer recipe
    replaces those still at their defaults (epochs and what else aigc.config.TRAIN_PRESETS lists); a
    value you changed wins over the preset's; the train stage says which is which."""
    epochs: int = Field(default=60, ge=1, le=10_000)
    """Set so that training stays within 8 min on the slowest 2-core CPU measured (an AVX2 EPYC), by
    FLOPs: ``python -m aigc_bench.budget`` (README, 'Training time')."""
    batch_size: int = Field(default=64, ge=2, le=65_536)
    """Images per step (the global batch under torchrun)."""
    # The DCGAN paper's recipe (Radford et al. 2015): lr 2e-4, beta1 0.5.
    lr_g: float = Field(default=2e-4, gt=0.0, le=1.0)
    """G's Adam learning rate; the DCGAN paper's recipe: lr 2e-4, beta1 0.5."""
    lr_d: float = Field(default=2e-4, gt=0.0, le=1.0)
    """D's Adam learning rate (lr_d > lr_g is TTUR)."""
    beta1: float = Field(default=0.5, ge=0.0, lt=1.0)
    """Adam beta1 of G and D (0.5 in the DCGAN recipe)."""
    beta2: float = Field(default=0.999, ge=0.0, lt=1.0)
    """Adam beta2 of G and D."""
    # A sample grid (from a fixed z) every this many epochs, and always after the last.
    sample_every: int = Field(default=1, ge=1)
    """Epochs between sample grids."""
    grid_size: int = Field(default=64, ge=1, le=1024)
    """Images in each sample grid."""
    # The adversarial loss (aigc/losses.py): bce (non-saturating) | hinge | wgan (needs gp_weight).
    loss: Literal["bce", "hinge", "wgan"] = "hinge"
    """bce (non-saturating) | hinge | wgan (needs gp_weight)."""
    # R1 penalty on real images (gamma/2 * ||dD(x)/dx||^2; 0 = off), applied lazily as its own D
    # step every r1_interval steps, with stylegan2-ada's lr/beta correction for the extra steps.
    r1_gamma: float = Field(default=0.0, ge=0.0, le=1e4)
    """R1 penalty on real images, gamma/2 * |dD/dx|^2 (0: off)."""
    r1_interval: int = Field(default=16, ge=1, le=10_000)
    """... applied lazily as its own D step every this many steps."""
    # WGAN-GP's gradient penalty weight (10 in the paper; 0 = off).
    gp_weight: float = Field(default=0.0, ge=0.0, le=1e4)
    """WGAN-GP gradient penalty weight (10 in the paper; 0: off)."""
    # EMA of G (aigc/ema.py): half-life in thousands of images (0 = off), ramped up over the
    # first images seen (ema_nimg = min(ema_kimg*1000, seen*ema_rampup); null = no ramp-up).
    ema_kimg: float = Field(default=10.0, ge=0.0, le=1e6)
    """EMA of G: half-life in thousands of images (0: off); then the EMA G is saved."""
    ema_rampup: float | None = Field(default=0.05, gt=0.0, le=1.0)
    """... half-life ramps up as images seen x this (null: no ramp-up)."""
    # DiffAugment for everything D sees (aigc/augment.py): translation, cutout (fill -1), color (RGB only).
    augment: list[Literal["translation", "cutout", "color"]] = Field(default_factory=list)
    """DiffAugment on all D sees: translation, cutout (fill -1), color (RGB only)."""
    # The divergence guard: stop when D separates every real from every fake image for this many
    # consecutive steps (0 = off). Non-finite losses always stop the run.
    guard_steps: int = Field(default=500, ge=0)
    """Stop when D separates all reals from all fakes this many steps running (0: off)."""

    @model_validator(mode="after")
    def _consistent(self) -> "TrainConfig":
        if self.loss == "wgan" and self.gp_weight == 0:
            raise ValueError("loss = 'wgan' needs a Lipschitz critic: set gp_weight (10 in WGAN-GP)")
        if len(set(self.augment)) != len(self.augment):
            raise ValueError(f"augment = {self.augment} lists a policy twice")
        for key, value in TRAIN_PRESETS[self.preset].items():  # the preset's recipe, as measured ...
            if getattr(self, key) == type(self).model_fields[key].default:  # ... where params.yaml kept the default
                object.__setattr__(self, key, value)
        return self

    def preset_note(self) -> str | None:
        """The line the train stage prints under a preset: each knob it set, and each value of
        params.yaml that won over it (changed from the default); None when the preset sets nothing."""
        preset = TRAIN_PRESETS[self.preset]
        if not preset:
            return None
        used = [f"train.{k} = {v}" for k, v in preset.items() if getattr(self, k) == v]
        kept = [f"train.{k} = {getattr(self, k)} (params.yaml's, not the preset's {v})"
                for k, v in preset.items() if getattr(self, k) != v]
        return (f"train.preset {self.preset}: " + ", ".join(used + kept) +
                " (a value changed from its default in params.yaml wins over the preset's)")


class RuntimeConfig(_Section):
    """How the stages run, never what they compute: changing these knobs leaves every result as it
    was (the same weights and scores at the same seed on the same machine), so no stage lists them
    as a DVC param and a change of them retrains nothing.

    ``device`` is every stage's (train, train_evaluator, evaluate, register); the rest are training's."""

    # cuda when there is a GPU, else cpu; mixed precision (bf16) on CUDA only.
    device: Literal["auto", "cpu", "cuda"] = "auto"
    """auto (CUDA if present, else CPU) | cpu | cuda: the device of every stage."""
    # CPU threads: "auto" uses the cores other processes leave free (re-checked every epoch).
    threads: Literal["auto"] | Annotated[int, Field(ge=1, le=1024)] = "auto"
    """CPU threads: auto = the cores other processes leave free (and 1 if the probe measured it faster) | a number."""
    # Measured (python -m aigc_bench): torch.compile made the CPU step 0.80x as fast, so it is off.
    # channels_last (NHWC, dcgan only) measured 1.07x on an AVX-512 Xeon and 0.89x on an AVX2 EPYC,
    # so "auto" times both on the real step once per machine (aigc/runtime.py, probe).
    compile: bool = False
    """Torch.compile the step (measured slower on this CPU; see aigc_bench/)."""
    channels_last: Literal["auto"] | bool = "auto"
    """NHWC for the dcgan convolutions: auto = timed once per machine on the real step (~/.cache/aigc/probe.json) | true | false."""
    # Per-step scalars are gathered on the device and handed over every this many steps, so the
    # hot loop never waits on a host copy; every step is still logged.
    log_every: int = Field(default=100, ge=1)
    """Steps per batch of metrics sent to MLflow (every step is logged; one host sync and one MLflow
    call per batch)."""
    # A resumable checkpoint (models/checkpoint.pt) every this many epochs, besides the one before
    # the first epoch and the final one (0: only those). A killed run goes on from the last one.
    checkpoint_every: int = Field(default=1, ge=0, le=10_000)
    """Epochs between resumable checkpoints (0: only before the first epoch and at the end)."""


class TrackingConfig(_Section):
    """MLflow. ``MLFLOW_TRACKING_URI`` in the environment overrides ``uri``."""

    enabled: bool = True
    """Record runs in MLflow (false: the stages still write their outputs)."""
    uri: str = "sqlite:///mlflow.db"
    """MLflow tracking URI (SQLite file by default); MLFLOW_TRACKING_URI overrides it."""
    experiment: str = Field(default="aigc", min_length=1)
    """MLflow experiment the runs go to."""
    # Where a new experiment stores its artifacts (local folder or a URI such as s3://...); a
    # tracking server (http) without a URI here keeps them itself (proxied artifacts).
    artifact_root: str = "mlartifacts"
    """A new experiment's artifacts: folder or URI (s3://...); an http server keeps its own."""
    # A server that stops answering mid-run: metrics and images wait in memory and are retried with
    # backoff; once training is done the stage waits at most this long for an outage to end, then
    # fails saying so (the outputs written; `dvc repro` uploads the rest without retraining).
    retry_seconds: float = Field(default=300.0, ge=0.0, le=86_400.0)
    """A server that stops answering: metrics wait and are retried; after training, fail once an outage lasts this long."""


class ContrastiveConfig(_Section):
    """The self-supervised feature network (evaluate.features: auto on unlabelled data, or
    contrastive): SimCLR's contrastive objective on two augmented views of each train image
    (aigc/metrics/contrastive.py)."""

    # Measured on the default data (aigc_bench/README.md): 20 epochs give a space whose FID ranks a
    # generator's epochs as the classifier's does (tests/test_feature_spaces.py).
    epochs: int = Field(default=20, ge=1, le=10_000)
    """Passes over the train split (two augmented views of each image per pass)."""
    batch_size: int = Field(default=256, ge=4, le=65_536)
    """Images per step: each image's other view is its positive, the other 2(B-1) views its negatives."""
    lr: float = Field(default=0.003, gt=0.0, le=1.0)
    """Adam, peak of a one-cycle schedule."""
    temperature: float = Field(default=0.2, gt=0.0, le=10.0)
    """NT-Xent's softmax temperature."""
    # SimCLR's views are resized crops; resizing blurs, and a space trained to match blurred and
    # sharp views of one image cannot see blur in a generator's samples (measured: blurred real
    # digits then scored better than a trained generator). So views shift by whole pixels instead.
    shift: float = Field(default=0.125, ge=0.0, lt=0.5)
    """Largest random shift of a view, as a share of the side, in whole pixels (no resampling)."""


class EvaluatorConfig(_Section):
    """The metrics' feature network, trained on the processed train split (its size follows
    dataset.json; see aigc/metrics/evaluator.py): a small CNN classifier on labelled data, the same
    CNN trained self-supervised (contrastive) on unlabelled data (evaluate.features)."""

    # 5 epochs, one-cycle schedule peaking at lr: ~96% test accuracy on the default MNIST subset.
    epochs: int = Field(default=5, ge=1, le=1000)
    """~96% test accuracy on the default data."""
    batch_size: int = Field(default=64, ge=2, le=65_536)
    """Images per training step of the evaluator."""
    lr: float = Field(default=0.01, gt=0.0, le=1.0)
    """Adam, peak of a one-cycle schedule."""
    # Convolution widths b, 2b, F, F; their global average pool (F values) is the feature
    # vector of FID, KID, precision/recall and memorisation.
    base_channels: int = Field(default=16, ge=1, le=512)
    """Conv widths 16, 32, features, features (8x8 and 28x28 both work)."""
    features: int = Field(default=64, ge=2, le=4096)
    """Pooled width: the feature vector of FID, KID, PRDC and memorisation."""
    contrastive: ContrastiveConfig = ContrastiveConfig()
    """The self-supervised training (unlabelled data, or evaluate.features: contrastive)."""


class EvaluateConfig(_Section):
    """Scoring a trained generator against the real data (docs/evaluation.md)."""

    num_samples: int = Field(default=10_000, ge=2, le=1_000_000)
    """Generated images; scored in sets of n = the test split's size, each against n train images."""
    seed: int = Field(default=0, ge=0, le=2**32 - 1)  # z, the KID subsets, the floor's subset
    """Z, the reference subsets, KID's random subsets, the floor's bootstrap."""
    batch_size: int = Field(default=500, ge=1, le=65_536)  # images per generator/evaluator call
    """Images per generator/evaluator call."""
    kid_subsets: int = Field(default=100, ge=1, le=10_000)
    """KID = mean over this many random subsets ..."""
    # Capped at the compared sample size (torchmetrics refuses a larger subset).
    kid_subset_size: int = Field(default=100, ge=2, le=100_000)
    """... of this many images each (capped at the compared sample size)."""
    prdc_k: int = Field(default=5, ge=1, le=100)  # k of the k-nearest-neighbour balls (Naeem et al. 2020)
    """K of the nearest-neighbour balls of precision/recall/density/coverage."""
    # A class counts as a covered mode when its share of the samples is at least this fraction
    # of its share of the data (0.2 with 10 balanced classes: 2% of the samples).
    mode_min_share: float = Field(default=0.2, gt=0.0, le=1.0)
    """A class is a covered mode when it gets >= this fraction of its data share."""
    # The near-duplicate threshold: this quantile of the test images' pixel distances to their
    # nearest training image; an honest generator has about this share of samples closer.
    copy_quantile: float = Field(default=0.01, gt=0.0, lt=0.5)
    """Near-duplicate: closer to a training image than this quantile of test-to-train pixel distances."""
    grid_size: int = Field(default=64, ge=1, le=1024)  # samples in reports/eval/samples.png
    """Samples in reports/eval/samples.png."""
    nearest_pairs: int = Field(default=16, ge=1, le=256)  # pairs in the nearest-neighbour grid
    """Generated/nearest-training pairs in reports/eval/nearest.png."""
    # The feature space of FID, KID, precision/recall/density/coverage and DCR, learnt from the data
    # by the train_evaluator stage: "auto" = the classifier when every image is labelled (2+
    # classes), else the self-supervised (contrastive) encoder; or the FID InceptionV3's pool3
    # read from ``inception_weights``, a local copy of pytorch-fid's
    # pt_inception-2015-12-05-6726825d.pth (nothing downloads), beside the learnt network's logits.
    features: Literal["auto", "classifier", "contrastive", "inception"] = "auto"
    """Feature space of FID/KID/PRDC/DCR: auto (classifier on labelled data, else contrastive) | classifier | contrastive (self-supervised, no labels used) | inception (needs inception_weights)."""
    inception_weights: str | None = Field(default=None, min_length=1)
    """Local pytorch-fid pt_inception-2015-12-05-6726825d.pth for features: inception (nothing downloads)."""

    @model_validator(mode="after")
    def _inception_needs_weights(self) -> "EvaluateConfig":
        if self.features == "inception" and self.inception_weights is None:
            raise ValueError("evaluate.features is inception but evaluate.inception_weights is not set: point it "
                             "at pytorch-fid's pt_inception-2015-12-05-6726825d.pth, or use features: auto")
        return self

    def scoring(self) -> dict[str, Any]:
        """The settings the numbers depend on (not batch size, pictures, device, nor the weights'
        path: the weights themselves are hashed into the lineage): two evaluations with equal
        ``scoring()`` on the same generator, evaluator and data agree."""
        return self.model_dump(exclude={"batch_size", "grid_size", "nearest_pairs", "inception_weights"})


# The metrics of reports/metrics.json a registry decision can compare (aigc/registry.DIRECTIONS says
# which way is better for each).
REGISTRY_METRICS = ("fid", "kid", "is", "precision", "recall", "density", "coverage", "modes", "class_kl", "dcr_score",
                    "copy_share")


class RegisterConfig(_Section):
    """The model registry: which version becomes the champion (aigc/registration.py, docs/registry.md)."""

    model_name: str = Field(default="aigc-generator", min_length=1, max_length=200)
    """MLflow registered model name."""
    # The alias that marks the best version so far (MLflow aliases, not the deprecated stages).
    alias: str = Field(default="champion", pattern=r"^[A-Za-z_][A-Za-z0-9_-]{0,254}$")
    """The alias that marks the best version so far."""
    # Compared between versions; its direction (lower/higher is better) is fixed per metric.
    metric: Literal[REGISTRY_METRICS] = "fid"  # type: ignore[valid-type]
    """fid | kid | is | precision | recall | density | coverage | modes | class_kl | dcr_score | copy_share."""
    # Compare metric - metric_floor (the gap to real held-out images) rather than the raw score
    # (is and density are always compared by their distance to the floor).
    relative_to_floor: bool = True
    """Compare fid - fid_floor (direction per metric: lower fid, higher precision, is/density closest to floor)."""
    # The champion is re-scored with the candidate's evaluator, data and evaluate settings; the
    # candidate must beat it by more than this many standard errors of the difference ...
    margin_se: float = Field(default=2.0, ge=0.0, le=100.0)
    """Beat the champion (re-scored with this evaluator and data) by > this many standard errors of the difference."""
    # ... and by more than this (in the metric's units); a tie never wins.
    min_improvement: float = Field(default=0.0, ge=0.0)
    """... and by more than this, in the metric's units; a tie never wins."""
    # Gates, checked before any comparison (the first version too):
    min_modes_covered: float = Field(default=0.8, ge=0.0, le=1.0)  # covered modes / classes (0: off)
    """Gate: covered modes >= 0.8 x classes (0 turns it off); measured 9.25 of 10 at 20 epochs."""
    min_dcr_score: float = Field(default=0.8, ge=0.0, le=10.0)  # memorisation: 1 = as far as fresh images (0: off)
    """Gate: DCR ratio, 1 = as far from the training set as fresh real images (0 turns it off)."""
    max_copy_share: float = Field(default=0.05, ge=0.0, le=1.0)  # near-duplicates of training images (1: off)
    """Gate: share of samples that are near-duplicates of training images; floor ~0.01 (1 turns it off)."""
    require_data_gate: bool = True  # reports/data_quality/summary.json must say passed
    """Gate: reports/data_quality/summary.json passed."""
    # Privacy gate: a version must have been trained with differential privacy at an epsilon no
    # larger than this (null: no DP required). A non-private model is refused when it is set.
    max_epsilon: float | None = Field(default=None, gt=0.0, le=1000.0)
    """Gate: trained with DP (privacy.dp) at epsilon <= this; null: no DP required."""
    # The broken-generator check: this many samples must be finite and not constant.
    check_samples: int = Field(default=64, ge=2, le=4096)
    """Gate: this many samples must be finite and not constant ..."""
    min_output_std: float = Field(default=0.01, ge=0.0)  # in the [-1, 1] pixel scale
    """... pixel std at least this (on the [-1, 1] scale)."""

    @model_validator(mode="after")
    def _alias_not_reserved(self) -> "RegisterConfig":
        # MLflow reserves "latest" and "v<number>" (they already mean a version).
        if self.alias == "latest" or (self.alias[0] == "v" and self.alias[1:].isdigit()):
            raise ValueError(f"alias {self.alias!r} is reserved by MLflow; pick another name")
        return self


# The data-quality expectations by name: the names validate.warn takes, and the report shows.
EXPECTATIONS = ("record_count", "image_shape", "channels", "dtype", "pixel_min", "pixel_max", "finite",
                "labels", "classes_present", "class_count", "class_share", "duplicates", "blank", "pii")
PrivacyAction = Literal["drop", "hash", "keep"]


class ValidateConfig(_Section):
    """The data-quality gate's bounds (great-expectations, on a per-record summary of data/raw).

    The defaults pass both built-in datasets (5,000 MNIST digits, 1,797 8x8 digits).
    """

    min_records: int = Field(default=100, ge=1)
    """Record count bounds."""
    max_records: int = Field(default=10_000_000, ge=1)
    """Upper bound of the record count."""
    # Allowed channel counts (1 grey, 3 RGB); every image must also have the same shape.
    channels: list[int] = Field(default_factory=lambda: [1, 3], min_length=1)
    """Allowed channel counts; every image must also have one shape."""
    # The declared pixel range (0..255 scale): every record's min and max must fall inside.
    pixel_min: int = Field(default=0, ge=0, le=255)
    """The declared pixel range (0..255 scale)."""
    pixel_max: int = Field(default=255, ge=0, le=255)
    """The declared pixel maximum (0..255 scale)."""
    # The declared class set: a list of labels, or null for any label 0..max_label.
    classes: list[int] | None = None
    """The declared class set, e.g. [0, 1, 2]; null: any label 0..max_label."""
    max_label: int = Field(default=9, ge=0)
    """The largest label allowed when validate.classes is null."""
    # -1 marks an unlabelled record (a source without labels); class checks ignore those.
    allow_unlabelled: bool = True
    """Label -1 (a source without labels) passes; class checks skip it."""
    min_classes: int = Field(default=2, ge=1)
    """Distinct labelled classes."""
    # Every class holds at least this share of the labelled records (10 balanced classes: 0.10).
    min_class_share: float = Field(default=0.05, ge=0.0, le=1.0)
    """Every class holds at least this share of the labelled records."""
    max_duplicate_share: float = Field(default=0.05, ge=0.0, le=1.0)
    """Exact duplicates (by content hash)."""
    max_blank_share: float = Field(default=0.05, ge=0.0, le=1.0)
    """Blank images (pixel std below data.blank_std)."""
    # Expectations that only warn: reported, but the run goes on.
    warn: list[Literal[EXPECTATIONS]] = Field(default_factory=list)  # type: ignore[valid-type]
    """Expectations that only warn, e.g. [class_share, duplicates]."""
    # Example images per failing expectation in the HTML report.
    examples: int = Field(default=8, ge=0, le=64)
    """Example images per failing expectation in the HTML report."""

    @model_validator(mode="after")
    def _bounds_in_order(self) -> "ValidateConfig":
        if self.min_records > self.max_records:
            raise ValueError(f"min_records ({self.min_records}) must not exceed max_records ({self.max_records})")
        if self.pixel_min > self.pixel_max:
            raise ValueError(f"pixel_min ({self.pixel_min}) must not exceed pixel_max ({self.pixel_max})")
        return self


class DPConfig(_Section):
    """Differential privacy for the discriminator (DP-SGD with Opacus; aigc/privacy/dp.py).

    Only D sees real images, so only D is trained privately; G learns through D's noisy,
    clipped updates (post-processing). The noise multiplier follows from the budget
    (target_epsilon, delta) and the planned D steps (train.epochs x Poisson batches per epoch)."""

    enabled: bool = False
    """Train D privately (no R1/GP penalties; D built without spectral norm); docs/privacy.md, 'DP-SGD on the discriminator'."""
    # The (epsilon, delta)-DP budget the whole training may spend; the run stops before exceeding it.
    target_epsilon: float = Field(default=10.0, gt=0.0, le=1000.0)
    """The whole training's budget epsilon; the noise multiplier follows from it and the planned D steps."""
    # Must be below 1/N (N training images); checked at training, where N is known.
    delta: float = Field(default=1e-5, gt=0.0, lt=1.0)
    """The budget's delta; must be below 1/N (N training images)."""
    # Per-sample gradient clipping bound C (flat, over all of D's parameters).
    max_grad_norm: float = Field(default=1.0, gt=0.0, le=1e4)
    """Per-sample gradient clipping bound C over all of D's parameters."""
    # Opacus' accountant: rdp (Renyi DP, Mironov 2017) | prv (privacy random variables, tighter, slower).
    accountant: Literal["rdp", "prv"] = "rdp"
    """rdp (Renyi DP) | prv (privacy random variables: tighter, slower)."""


class PrivacyConfig(_Section):
    """What to do with a metadata column the gate flags as personal data (see aigc/privacy), and
    differential privacy and encryption at rest."""

    # drop: remove the column | hash: salted SHA-256 (salt from $AIGC_PII_SALT) | keep: opt-in
    action: PrivacyAction = "drop"
    """drop | hash (salted SHA-256; salt from $AIGC_PII_SALT) | keep (opt-in)."""
    # Per-column override, e.g. {author: hash, notes: keep}; drop/hash also apply unflagged.
    columns: dict[str, PrivacyAction] = Field(default_factory=dict)
    """Per-column override, e.g. {author: hash, notes: keep}."""
    # A column whose name contains one of these words holds person names.
    name_columns: list[str] = Field(default_factory=lambda: ["name", "author", "writer", "patient", "owner"])
    """A column named with one of these holds person names."""
    # DP-SGD on the discriminator (train stage).
    dp: DPConfig = DPConfig()
    """Differential privacy (DP-SGD, Opacus) for D, the only network that sees real images."""
    # ingest, validate and preprocess write data/raw, data/validated and data/processed AES-GCM
    # encrypted with the key in $AIGC_DATA_KEY (or the file $AIGC_DATA_KEY_FILE names); readers decrypt
    # in memory (aigc/encryption.py); the reports withhold their pictures of records (docs/privacy.md).
    encrypt_at_rest: bool = False
    """Every copy of a record AES-GCM encrypted, no picture of one in the reports; key in $AIGC_DATA_KEY(_FILE)."""


# The section is called "validate", like its stage; pydantic warns that the name hides the
# deprecated v1 classmethod BaseModel.validate, which nothing here uses.
warnings.filterwarnings("ignore", message='Field name "validate" in "Params" shadows', category=UserWarning)
# Likewise "register" (the stage's name) hides ABCMeta.register, which nothing here uses on Params.
warnings.filterwarnings("ignore", message='Field name "register" in "Params" shadows', category=UserWarning)


class Params(_Section):
    """The whole of params.yaml."""

    seed: int = Field(default=42, ge=0, le=2**32 - 1)
    """Every random thing (split, weights, z, batch order) follows from it."""
    data: DataConfig = DataConfig()
    """Ingest + preprocess."""
    model: ModelConfig = ModelConfig()
    """Resolution and channels come from data/processed/dataset.json."""
    train: TrainConfig = TrainConfig()
    runtime: RuntimeConfig = RuntimeConfig()
    """How the stages run, never what they compute: no stage depends on these, so changing them retrains nothing."""
    vae: VAEConfig = VAEConfig()
    """Model.family: vae only; epochs and batch size come from train, device and logging from runtime."""
    pixelcnn: PixelCNNConfig = PixelCNNConfig()
    """Model.family: pixelcnn only; its own epochs; batch size from train, device and logging from runtime."""
    tracking: TrackingConfig = TrackingConfig()
    """MLFLOW_TRACKING_URI in the environment overrides uri."""
    evaluator: EvaluatorConfig = EvaluatorConfig()
    """The metrics' feature network: a small CNN classifier on the train split."""
    evaluate: EvaluateConfig = EvaluateConfig()
    """Scores of models/generator.pt, each beside its spread, floor and ceiling (docs/evaluation.md, 'Evaluation')."""
    validate: ValidateConfig = ValidateConfig()
    """The data-quality gate (great-expectations) between ingest and preprocess."""
    privacy: PrivacyConfig = PrivacyConfig()
    """Personal data in the metadata (validate), DP training (train), encryption at rest."""
    register: RegisterConfig = RegisterConfig()
    """The MLflow model registry: a new version becomes `champion` only if it is better."""


def cross_section_problems(params: Params) -> list[str]:
    """Settings that are valid alone but not together (one line each, naming both keys)."""
    problems = []
    if params.privacy.dp.enabled:
        t = params.train
        # Opacus computes per-sample gradients of one backward pass; a penalty on dD/dx needs a
        # second backward through those hooks (double backward), which Opacus does not support.
        for key, value, what in (("r1_gamma", t.r1_gamma, "the R1 penalty"),
                                 ("gp_weight", t.gp_weight, "the WGAN-GP gradient penalty")):
            if value > 0:
                problems.append(f"train.{key} = {value} with privacy.dp.enabled = true: {what} needs a double "
                                f"backward through D, which Opacus' per-sample gradients do not support; set "
                                f"train.{key}: 0 (and train.loss: bce or hinge) or privacy.dp.enabled: false")
        if params.runtime.compile:
            problems.append("runtime.compile = true with privacy.dp.enabled = true: Opacus' per-sample gradient hooks "
                            "do not run under torch.compile; set runtime.compile: false")
        if params.model.family in ("vae", "pixelcnn"):
            problems.append(f"model.family = {params.model.family!r} with privacy.dp.enabled = true: DP is implemented "
                            "for the GAN discriminator only; use family dcgan or mlp, or privacy.dp.enabled: false")
    return problems


S = TypeVar("S", bound=BaseModel)


def _describe(err: dict[str, Any]) -> str:
    """One pydantic error as 'what is allowed', in the user's terms."""
    kind, ctx = err["type"], err.get("ctx") or {}
    if kind == "extra_forbidden":
        return "unknown key (check the spelling; see params.yaml in the repository for every key)"
    if kind == "literal_error":
        return f"must be one of {ctx.get('expected')}"
    if kind == "missing":
        return "is required"
    return err["msg"].replace("Input should be", "must be").replace("Value error, ", "")


def _format_errors(exc: ValidationError, source: str) -> str:
    lines = []
    for err in exc.errors():
        key = ".".join(str(p) for p in err["loc"]) or "<top level>"
        key = key if key.isprintable() else repr(key)  # a control character must not break the line
        value = "(missing)" if err["type"] == "missing" else repr(err.get("input"))
        lines.append(f"{source}: {key} = {value}: {_describe(err)}")
    return "\n".join(lines)


def parse_params(raw: Any, source: str = DEFAULT_PARAMS) -> Params:
    """Validate an already-parsed params mapping."""
    if raw is None:
        raw = {}
    if not isinstance(raw, dict):
        raise ConfigError(f"{source}: expected a mapping of sections at the top level, got {type(raw).__name__}")
    try:
        params = Params.model_validate(raw)
    except ValidationError as exc:
        raise ConfigError(_format_errors(exc, source)) from None
    problems = cross_section_problems(params)
    if problems:
        raise ConfigError("\n".join(f"{source}: {p}" for p in problems))
    return params


def load_params(path: str | Path = DEFAULT_PARAMS, overrides: dict[str, Any] | None = None) -> Params:
    """Read and validate params.yaml; ``overrides`` ({"train.epochs": 1}) are applied first."""
    path = Path(path)
    try:
        raw = yaml.safe_load(path.read_text(encoding="utf-8"))
    except FileNotFoundError:
        raise ConfigError(f"{path}: not found (run from the project root, or pass --params)") from None
    except (IsADirectoryError, PermissionError, UnicodeDecodeError) as exc:
        raise ConfigError(f"{path}: cannot be read as a UTF-8 text file ({type(exc).__name__})") from None
    except yaml.YAMLError as exc:
        mark = getattr(exc, "problem_mark", None)
        where = f" line {mark.line + 1}" if mark else ""
        problem = str(getattr(exc, "problem", None) or exc).replace("\n", " ")
        raise ConfigError(f"{path}:{where} is not valid YAML: {problem}") from None
    for dotted, value in (overrides or {}).items():
        node = raw = {} if raw is None else raw
        *parents, leaf = dotted.split(".")
        walked: list[str] = []
        for key in parents:
            if not isinstance(node, dict):
                break
            walked.append(key)
            node = node.setdefault(key, {})
        if not isinstance(node, dict):
            raise ConfigError(f"{path}: {'.'.join(walked) or 'the top level'} must be a mapping to set {dotted}, "
                              f"got {node!r}")
        node[leaf] = value
    return parse_params(raw, str(path))


def load_section(path: str | Path, name: str, model: type[S]) -> S:
    """The validated section ``name`` of params.yaml (the whole file is validated)."""
    section = getattr(load_params(path), name)
    assert isinstance(section, model), f"section {name} is not a {model.__name__}"
    return section


def flatten(params: BaseModel, prefix: str = "") -> dict[str, Any]:
    """``{"train.lr_g": 0.0002, ...}``: the form MLflow params and DVC -S overrides use."""
    out: dict[str, Any] = {}
    for key, value in params.model_dump().items():
        _flatten_into(out, f"{prefix}{key}", value)
    return out


def _flatten_into(out: dict[str, Any], key: str, value: Any) -> None:
    if isinstance(value, dict):
        for k, v in value.items():
            _flatten_into(out, f"{key}.{k}", v)
    else:
        out[key] = value
