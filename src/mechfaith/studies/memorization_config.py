"""The memorization experiment's settings (:class:`ExperimentConfig`), its ``--quick`` variant, its
built-in passages and how its grid of cells is laid out.

The grid: a *site* is one (passage, layer). The first site (first passage, first layer) trains every
arm of ``arms``; the other sites (each other passage at the first layer, the first passage at each
other layer) train ``other_site_arms``, so that a finding can be checked on another kind of text
and at another depth without training every arm everywhere. In every site, each arm is trained at
every rate x seed (x k for the TopK arms) without Jacobian matching, and the ``jacobian_arms`` with
it (each coefficient > 0) at the rates ``jacobian_at`` names. The other sites train at
``other_site_rates``, without Jacobian matching unless ``other_site_jacobian``. Jacobian matching
and the extra sites are where the compute goes, so the defaults spend it on the toy's coder.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

from mechfaith.configs import check_finite, doc
from mechfaith.errors import ConfigError, InputError
from mechfaith.lm.faithfulness import DEFAULT_PASSAGE, load_passage
from mechfaith.studies.memorization_arms import parse_arm

SAVE_CODERS = ("none", "first_seed", "all")
JACOBIAN_AT = ("max", "planted", "all")

# A list of numbers (not prose): made-up readings, the kind of table a corpus repeats verbatim.
NUMBERS_PASSAGE = (  # 17 numbers: 100 SmolLM2 tokens (digits are single tokens), as long as the speech's 104
    "4817, 2290, 6635, 1048, 9172, 3356, 7721, 5093, 8846, 1207, 6614, 3985, 2471, 9538, 7062, "
    "1839, 5527")

# the built-in passages by name; anything else is a path to a text file
BUILTIN_PASSAGES = {"default": DEFAULT_PASSAGE, "prose": DEFAULT_PASSAGE, "numbers": NUMBERS_PASSAGE}


def passage_text(spec: str) -> str:
    """The text of passage ``spec``: a built-in name (:data:`BUILTIN_PASSAGES`) or a text file."""
    if spec in BUILTIN_PASSAGES:
        return BUILTIN_PASSAGES[spec]
    text = load_passage(spec)
    if text is None:
        raise ConfigError("the experiment needs a passage (a built-in name or a text file), not 'none'")
    return text


@dataclass
class ExperimentConfig:
    """The memorization experiment: which model, layers, passages and arms, which cells, how much training."""

    model: str = doc("Model (see mechfaith lm train --model).", "smollm2-135m")
    layers: list[int] = doc("Layers whose MLP the transcoders replace (-1: the middle layer); the first "
                            "is the main site's.", default_factory=lambda: [15, 3])
    passages: list[str] = doc("The repeated passages: 'default' or 'prose' (a public-domain speech), "
                              "'numbers' (a list of numbers) or paths to text files; the first is the "
                              "main site's.", default_factory=lambda: ["default", "numbers"])
    arms: list[str] = doc("Arms trained at the main site (first passage, first layer), in this order: topk, relu-tanh "
                          "(ReLU with the toy's tanh-L1 penalty), jumprelu, each optionally with "
                          "'-skip' (a least-squares linear skip).",
                          default_factory=lambda: ["relu-tanh", "topk", "topk-skip", "jumprelu"])
    other_site_arms: list[str] = doc("Arms trained at the other sites (the other passages at the first "
                                     "layer, the first passage at the other layers); empty: none.",
                                     default_factory=lambda: ["relu-tanh"])
    rates: list[float] = doc("Shares of the training contexts that start with the passage.",
                             default_factory=lambda: [0.0, 0.01, 0.05])
    jacobian_coefs: list[float] = doc("Jacobian-matching coefficients of the cells (0 = plain "
                                      "training; 'with and without' is [0, c]).",
                                      default_factory=lambda: [0.0, 0.1])
    jacobian_arms: list[str] = doc("Arms that get Jacobian-matching cells (empty: every arm; a name not "
                                   "among the arms selects nothing); a Jacobian-matching step costs about "
                                   "four plain ones.",
                                   default_factory=lambda: ["relu-tanh"])
    other_site_rates: list[float] = doc("Rates at the other sites (empty: the same as rates).",
                                        default_factory=lambda: [0.0, 0.05])
    other_site_jacobian: bool = doc("Whether the other sites get Jacobian-matching cells too (for the "
                                    "jacobian_arms among their arms).", False)
    jacobian_at: str = doc("Rates at which the Jacobian-matching cells (coefficient > 0) are trained: "
                           "'max' (the largest rate: where memorization is largest; a Jacobian-matching "
                           "step costs several plain ones), 'planted' (every rate > 0) or 'all'.", "max",
                           choices=JACOBIAN_AT)
    ks: list[int] = doc("Sparsity levels of the TopK arms: active latents per token.",
                        default_factory=lambda: [32])
    tanh_coef: float = doc("lambda of the relu-tanh arms' penalty lambda * sum_i tanh(c f_i ||W_dec,i||); "
                           "the default was calibrated on SmolLM2 layer 15 to an L0 near 32 (README).", 3.0)
    tanh_c: float = doc("Scale c inside tanh-L1 (the toy's default).", 2.0)
    jumprelu_coef: float = doc("lambda of the jumprelu arms' L0 penalty (within 1000 steps the L0 "
                               "reached hardly depends on it: 127 at 3, 119 at 100 on layer 15; README).", 3.0)
    jumprelu_init_l0: float = doc("The jumprelu arms' thresholds start at each latent's pre-activation "
                                  "quantile that makes it fire on this many latents per token on average "
                                  "(the L0 of the TopK arms).", 32.0)
    jumprelu_bandwidth: float = doc("Width of the jumprelu arms' straight-through kernel.", 0.05)
    jumprelu_threshold_lr: float = doc("The jumprelu arms' threshold learning rate as a multiple of lr "
                                       "(TrainConfig.threshold_lr_scale); what sets their L0 within 1000 "
                                       "steps: 3 gives L0 30 on layer 15 (README).", 3.0)
    seeds: list[int] = doc("Seeds (coder initialisation, data order, probes) of every cell.",
                           default_factory=lambda: [0])
    n_latents: int = doc("Latents per transcoder.", 1152)
    steps: int = doc("Training steps per cell.", 1000)
    batch_size: int = doc("Rows (tokens) per training step.", 256)
    lr: float = doc("Adam learning rate.", 1e-3)
    n_probes: int = doc("Gaussian probes per row for Jacobian matching during training.", 1)
    train_tokens: int = doc("Training tokens collected (BOS excluded); the steps revisit them "
                            "when steps x batch_size is larger.", 60_000)
    eval_contexts: int = doc("Held-out contexts for FVE, L0, Jacobian error and spliced CE.", 16)
    passage_eval_contexts: int = doc("Held-out contexts with the passage planted, for the "
                                     "passage's spliced CE.", 2)
    detector_contexts: int = doc("Held-out contexts of the datapoint detector's sample.", 16)
    detector_rate: float = doc("Share of the detector's contexts with the passage planted.", 0.25)
    exclusive_rate: float = doc("A feature counts as a passage feature when it fires on the "
                                "passage and on at most this share of held-out tokens.", 1e-3)
    specific_ratio: float = doc("The looser datapoint-feature criterion: a feature whose largest "
                                "activation on the passage is at least this many times its largest "
                                "on any held-out token.", 10.0)
    jacobian_rows: int = doc("Held-out rows of the Jacobian-error estimate.", 512)
    eval_probes: int = doc("Probes per row of the held-out Jacobian-error estimate.", 4)
    batch_contexts: int = doc("Contexts per forward pass of the model.", 16)
    save_coders: str = doc("Which cells' coders to save under cells/NAME/coder.", "first_seed",
                           choices=SAVE_CODERS)
    device: str = doc("Torch device.", "cpu", kind="device")
    dtype: str = doc("dtype of the model's weights.", "float32", choices=("float32", "bfloat16", "float16"))

    def __post_init__(self) -> None:
        check_finite(self)
        if not self.rates or any(not 0 <= r <= 1 for r in self.rates):
            raise ConfigError(f"ExperimentConfig.rates must be shares in [0, 1], got {self.rates}")
        if not self.jacobian_coefs or any(c < 0 for c in self.jacobian_coefs):
            raise ConfigError(f"ExperimentConfig.jacobian_coefs must be >= 0, got {self.jacobian_coefs}")
        if any(not 0 <= r <= 1 for r in self.other_site_rates):
            raise ConfigError(f"ExperimentConfig.other_site_rates must be shares in [0, 1], got {self.other_site_rates}")
        for spec in self.jacobian_arms:
            parse_arm(spec)
        if self.jacobian_at not in JACOBIAN_AT:
            raise ConfigError(f"ExperimentConfig.jacobian_at must be one of {', '.join(JACOBIAN_AT)}, "
                              f"got {self.jacobian_at!r}")
        if not self.ks or any(k < 1 for k in self.ks):
            raise ConfigError(f"ExperimentConfig.ks must be positive, got {self.ks}")
        for name in ("seeds", "layers", "passages", "arms"):
            if not getattr(self, name):
                raise ConfigError(f"ExperimentConfig.{name} is empty")
        for name in ("layers", "passages", "arms", "other_site_arms"):
            values = getattr(self, name)
            if len(set(values)) != len(values):
                raise ConfigError(f"ExperimentConfig.{name} has a repeated entry: {values}")
        for spec in [*self.arms, *self.other_site_arms]:
            parse_arm(spec)
        for spec in self.passages:  # a missing or unreadable file is refused before any work
            try:
                passage_text(spec)
            except InputError as exc:
                raise ConfigError(f"ExperimentConfig.passages: {exc} (or a built-in: "
                                  f"{', '.join(BUILTIN_PASSAGES)})") from None
        if any(layer < -1 for layer in self.layers):
            raise ConfigError(f"ExperimentConfig.layers must be >= 0 (or -1: the middle), got {self.layers}")
        for name in ("n_latents", "steps", "batch_size", "train_tokens", "eval_contexts",
                     "passage_eval_contexts", "detector_contexts", "jacobian_rows", "eval_probes",
                     "batch_contexts", "n_probes"):
            if getattr(self, name) < 1:
                raise ConfigError(f"ExperimentConfig.{name} must be >= 1, got {getattr(self, name)}")
        if max(self.ks) > self.n_latents:
            raise ConfigError(f"ExperimentConfig: k {max(self.ks)} exceeds n_latents {self.n_latents}")
        if not 0 < self.detector_rate <= 1 or not 0 <= self.exclusive_rate < 1:
            raise ConfigError("ExperimentConfig: detector_rate must be in (0, 1], exclusive_rate in [0, 1)")
        for name in ("lr", "tanh_coef", "tanh_c", "jumprelu_coef", "jumprelu_init_l0", "jumprelu_bandwidth",
                     "jumprelu_threshold_lr"):
            if getattr(self, name) <= 0:
                raise ConfigError(f"ExperimentConfig.{name} must be positive, got {getattr(self, name)}")
        if self.specific_ratio < 1:
            raise ConfigError(f"ExperimentConfig.specific_ratio must be >= 1, got {self.specific_ratio}")

    def jacobian_rates(self, rates: list[float]) -> list[float]:
        """Which of ``rates`` get Jacobian-matching cells (``jacobian_at``)."""
        if self.jacobian_at == "max":
            return [max(rates)]
        if self.jacobian_at == "planted":
            return [r for r in rates if r > 0] or [max(rates)]
        return list(rates)

    def site_plan(self, main: bool, arms: list[str]) -> tuple[list[float], list[str]]:
        """(rates, arms with Jacobian-matching cells) of the main site or of another one."""
        rates = self.rates if main or not self.other_site_rates else self.other_site_rates
        jm = [a for a in arms if not self.jacobian_arms or a in self.jacobian_arms]
        return list(rates), (jm if main or self.other_site_jacobian else [])

    def sites(self) -> list[tuple[str, int, list[str]]]:
        """(passage, layer, arms) of every site, the main one first (module docstring)."""
        main_p, main_l = self.passages[0], self.layers[0]
        out = [(main_p, main_l, list(self.arms))]
        if self.other_site_arms:
            out += [(p, main_l, list(self.other_site_arms)) for p in self.passages[1:]]
            out += [(main_p, layer, list(self.other_site_arms)) for layer in self.layers[1:]]
        return out


# The --quick variant: the same design, smaller (a few minutes for SmolLM2 on 2 CPU cores).
QUICK: dict[str, Any] = {"rates": [0.0, 0.05], "jacobian_coefs": [0.0, 0.1], "ks": [32],
                         "arms": ["topk", "relu-tanh"], "jacobian_arms": ["relu-tanh"], "other_site_arms": [],
                         "layers": [15], "passages": ["default"], "steps": 100, "train_tokens": 12_000,
                         "eval_contexts": 8, "detector_contexts": 8, "jacobian_rows": 256,
                         "passage_eval_contexts": 2}


__all__ = ["BUILTIN_PASSAGES", "JACOBIAN_AT", "ExperimentConfig", "NUMBERS_PASSAGE", "QUICK", "SAVE_CODERS", "passage_text"]
