"""``StudyConfig``: everything that defines a study's numbers, each setting declared once.

Settings that belong to a component (the dataset, a network, training) re-declare that component's
field with ``inherit`` (same help; the study's own default where its recipe differs), and the
component configs are built from them by name (``options.build``), never positionally. The command
line generates its options from these fields (``metadata["cli"]``, ``fastscore.cli``)."""
from __future__ import annotations

import json
from dataclasses import asdict, dataclass
from typing import Any

from .. import _validate
from .._validate import UsageError
from ..data import DEFAULT_PALETTE, EXTRA_COLOURS, KVConfig, palette_of_size
from ..models import ATTENTIONS, ModelConfig
from ..options import build, inherit, matches, option
from ..sampling import SAMPLERS, timesteps
from ..training import TrainConfig

LABELS = {"none": "CNN", "top1": "CNN + top-1 attention", "identity": "CNN + identity attention",
          "softmax": "CNN + softmax attention", "ideal": "ideal score (theory)", "els": "ELS machine (theory)"}
ANALYTIC = ("ideal", "els")
PAPER = {"random": 5.38, "none": 10.88, "top1": 21.64, "identity": 25.44, "softmax": 64.03}
RATE_KEYS = ("valid", "consistent", "consistent_among_valid", "novel", "nearest_consistent")
MAX_COLOURS = len(DEFAULT_PALETTE + EXTRA_COLOURS)
# the attentions with learned projections, the only ones attn_patch applies to
PROJECTED = ("softmax", "top1")

# seeds derived from a row's seed s: model initialisation, the sampler's initial noise, the probe's images
MODEL_SEED, SAMPLE_SEED, PROBE_SEED = 1000, 10_000, 20_000
# seeds derived from the study's data_seed: the random-image baseline, the attention figure's image
RANDOM_IMAGES_SEED, FIGURE_IMAGE_SEED = 1, 7

PRESETS: dict[str, dict[str, Any]] = {"full": {},
           "quick": dict(train_steps=5000, n_samples=1000, n_seeds=1, probe_n=1000, n_random=2000),
           "tiny": dict(train_steps=20, n_samples=48, n_seeds=1, n_train=300, probe_n=48, n_random=200, steps=8,
                        width=16, probe_t=(200,))}

DATA, RECIPE, RUN = "dataset (defaults: the study's)", "network and training (defaults: the study's)", "study"
SAMPLER = "sampler"


@dataclass(frozen=True)
class StudyConfig:
    """Everything that defines a study's numbers (JSON-serialisable).

    The defaults are the recipe under which attention coordinates pairs (docs/coordination_search.md):
    2 colours, 4 pairs on 8x8; width 64 with ``attn_patch``; 10,000 steps of batch 64 with half the
    timesteps drawn from t in [50, 400]. With 4 colours the same recipe coordinates once trained
    longer (docs/four-colours.md: 36.5% at 40,000 steps, 60.8% at 160,000, chance 25.5%)."""
    n_pairs: int = inherit(KVConfig, "n_pairs", cli="--pairs", group=DATA)
    n_colours: int = option(2, f"palette size, 2..{MAX_COLOURS}, in the order R, G, B, Y, C, M, W, K",
                            cli="--colours", group=DATA)
    image_size: int = inherit(KVConfig, "image_size", cli="--image-size", group=DATA)
    n_train: int = option(5000, "training images", cli="--n-train", group=DATA)
    data_seed: int = option(0, "seed of the training set", cli="--data-seed", group=DATA)
    networks: tuple[str, ...] = option(("none", "top1", "identity", "softmax"),
                                       "comma list of the trained networks: " + ",".join(ATTENTIONS),
                                       cli="--networks", group=RUN)
    analytic: tuple[str, ...] = option(ANALYTIC, "analytic score models sampled beside the networks")
    els_patch: int = option(5, "patch size of the ELS machine (odd)")
    width: int = inherit(ModelConfig, "width", cli="--width", group=RECIPE)
    attn_dim: int = inherit(ModelConfig, "attn_dim", help="query/key width of the learned projections",
                            cli="--attn-dim", group=RECIPE)
    attn_patch: bool = inherit(ModelConfig, "attn_patch", default=True, cli="--attn-patch", group=RECIPE)
    temperature: float = inherit(ModelConfig, "temperature", cli="--temperature", group=RECIPE)
    coord_channels: bool = inherit(ModelConfig, "coord_channels", cli="--coord-channels", group=RECIPE)
    train_steps: int = inherit(TrainConfig, "steps", default=10000, cli="--train-steps", group=RECIPE)
    batch_size: int = inherit(TrainConfig, "batch_size", default=64, cli="--train-batch", group=RECIPE)
    lr: float = inherit(TrainConfig, "lr", cli="--lr", group=RECIPE)
    lr_schedule: str = inherit(TrainConfig, "lr_schedule", cli="--lr-schedule", group=RECIPE)
    ema: float = inherit(TrainConfig, "ema", cli="--ema", group=RECIPE)
    t_focus: tuple[int, int] | None = inherit(TrainConfig, "t_focus", default=(50, 400), cli="--t-focus", group=RECIPE)
    t_focus_prob: float = inherit(TrainConfig, "t_focus_prob", default=0.5, cli="--t-focus-prob", group=RECIPE)
    precision: str = inherit(TrainConfig, "precision", cli="--precision", group=RECIPE)
    n_seeds: int = option(3, "training seeds per network", cli="--n-seeds", group=RUN)
    n_samples: int = option(10000, "samples per network and seed", cli="--n-samples", group=RUN)
    sampler: str = option("ddim", "sampler: " + " or ".join(SAMPLERS), cli="--sampler", group=SAMPLER,
                          choices=SAMPLERS)
    steps: int = option(50, "sampler steps", cli="--steps", group=SAMPLER)
    eta: float = option(1.0, "DDIM eta (1: strided DDPM)", cli="--eta", group=SAMPLER)
    clip_x0: bool = option(True, "clamp the predicted x0 to [-1, 1] at each step", cli="--clip", group=SAMPLER)
    probe_t: tuple[int, ...] = option((100, 200, 400, 600), "timesteps of the coordination probe")
    probe_n: int = option(2000, "images per case of the coordination probe")
    n_random: int = option(10000, "random images of the empirical chance baseline")

    def __post_init__(self) -> None:
        for n in self.networks:
            _validate.choice("networks", n, ATTENTIONS)
        for n in self.analytic:
            _validate.choice("analytic", n, ANALYTIC)
        if len(set(self.networks)) != len(self.networks) or len(set(self.analytic)) != len(self.analytic):
            raise UsageError("networks and analytic must not repeat an entry")
        if self.n_pairs < 2:
            raise UsageError(f"n_pairs must be >= 2 for the study (consistency needs two pairs), got {self.n_pairs}")
        _validate.positive_int("n_colours", self.n_colours, minimum=2)
        if self.n_colours > MAX_COLOURS:
            raise UsageError(f"n_colours must be <= {MAX_COLOURS}, got {self.n_colours}")
        _validate.choice("sampler", self.sampler, SAMPLERS)
        _validate.finite_float("eta", self.eta, minimum=0.0)
        _validate.positive_int("els_patch", self.els_patch)
        if self.els_patch % 2 == 0:
            raise UsageError(f"els_patch must be odd, got {self.els_patch}")
        try:
            timesteps(ModelConfig.T, self.steps)
        except ValueError as e:
            raise _validate.usage(e) from None
        for t in self.probe_t:
            _validate.positive_int("probe_t", t, minimum=0)
            if t >= ModelConfig.T:
                raise UsageError(f"probe_t must lie in [0, {ModelConfig.T}), got {t}")
        if self.t_focus is not None:
            object.__setattr__(self, "t_focus", tuple(self.t_focus))
        self.train_config(0)
        for net in self.networks:
            self.model_config(net)
        object.__setattr__(self, "networks", tuple(self.networks))
        object.__setattr__(self, "analytic", tuple(self.analytic))
        object.__setattr__(self, "probe_t", tuple(self.probe_t))
        for name in ("n_seeds", "n_samples", "train_steps", "n_train", "probe_n", "n_random"):
            _validate.positive_int(name, getattr(self, name))
        self.data_config()  # validates the geometry
        if self.n_pairs > 4 and not self.coord_channels:
            raise UsageError(f"n_pairs={self.n_pairs} > 4 uses the border layout, where a translation-equivariant "
                             "CNN cannot tell key from value cells: set coord_channels=True")

    @classmethod
    def preset(cls, mode: str, **overrides) -> StudyConfig:
        """``"full"`` (the defaults), ``"quick"`` (minutes on a CPU) or ``"tiny"`` (seconds; CI)."""
        _validate.choice("mode", mode, tuple(PRESETS))
        base = dict(PRESETS[mode])
        base.update({k: v for k, v in overrides.items() if v is not None})
        return cls(**base)

    def data_config(self) -> KVConfig:
        return build(KVConfig, self, palette=palette_of_size(self.n_colours))

    def train_config(self, seed: int) -> TrainConfig:
        return build(TrainConfig, self, seed=seed)

    def model_config(self, net: str) -> ModelConfig:
        """The network ``net``; ``attn_patch`` applies to the attentions with learned projections."""
        return build(ModelConfig, self, attention=net, image_size=self.image_size,
                     attn_patch=self.attn_patch and net in PROJECTED)

    def jobs(self) -> list[tuple[str, int]]:
        """The study's rows ``(name, seed)`` in report order: the analytic models, then each network per seed."""
        return [(a, 0) for a in self.analytic] + [(net, s) for net in self.networks for s in range(self.n_seeds)]

    def to_dict(self) -> dict:
        return json.loads(json.dumps(asdict(self)))

    @classmethod
    def from_dict(cls, stored: dict) -> StudyConfig:
        """The config ``to_dict`` saved (lists back to tuples); a setting it lacks takes its default."""
        unknown = set(stored) - set(cls.__dataclass_fields__)
        if unknown:
            raise UsageError(f"unknown study settings {sorted(unknown)}")
        kw: dict[str, Any] = {k: tuple(v) if isinstance(v, list) else v for k, v in stored.items()}
        return cls(**kw)

    def matches(self, stored: dict) -> bool:
        """Whether ``stored`` (a saved ``to_dict``) is this config: the one rule that says a study or a
        sweep cell on disk is this one (``options.matches``: a setting added with a default since it
        was saved does not make it another)."""
        return matches(stored, self)
