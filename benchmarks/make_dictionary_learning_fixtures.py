#!/usr/bin/env python
"""dictionary_learning's own files and outputs as test fixtures.

Run in the peers' venv (not in CI; ``pip install --no-deps dictionary-learning`` there, with
``einops``), from the repository root:

    PYTHONPATH=src /tmp/peers-venv/bin/python benchmarks/make_dictionary_learning_fixtures.py [--out DIR]

Fixtures (``tests/fixtures/dictionary_learning/<name>/``, default ``--out``): tiny dictionaries
(activation_dim 16, dict_size 64, k 4; seeded random weights) built by dictionary_learning's own
trainers (``StandardTrainer``, ``TopKTrainer``, ``BatchTopKTrainer``, ``JumpReluTrainer``,
``GatedSAETrainer``) and saved as its ``trainSAE`` saves them: ``ae.pt`` (``torch.save`` of the
dictionary's ``state_dict``) and ``config.json`` (``{"trainer": trainer.config}``). For each one
mechfaith reads, ``expected.safetensors`` holds inputs ``x`` [8, 16] (seeded) and what the library
computes from the saved file (its class's ``from_pretrained``, the standard one with
``normalize_decoder=False``: the file as saved): ``features`` (``encode``) and ``x_hat``
(``forward``). ``batchtopk_no_threshold``: a BatchTopK dictionary whose ``threshold`` was never
estimated (-1: the library's ``encode`` then keeps every positive latent, a plain ReLU).

Then every fixture is read with ``import_dictionary_learning``, printing the largest differences.
``tests/lm/test_dictionary_learning_fixtures.py`` checks them in CI without the library.
"""

from __future__ import annotations

import argparse
import json
import shutil
import sys
import types
import warnings
from pathlib import Path
from typing import Any

warnings.filterwarnings("ignore")
# the package's __init__ imports its activation buffer, which needs nnsight (not needed here)
sys.modules.setdefault("nnsight", types.SimpleNamespace(LanguageModel=None))  # type: ignore[arg-type]

import dictionary_learning  # noqa: E402
import torch  # noqa: E402
from dictionary_learning.dictionary import AutoEncoder, GatedAutoEncoder, JumpReluAutoEncoder  # noqa: E402
from dictionary_learning.trainers import (  # noqa: E402
    BatchTopKTrainer,
    GatedSAETrainer,
    JumpReluTrainer,
    StandardTrainer,
    TopKTrainer,
)
from dictionary_learning.trainers.batch_top_k import BatchTopKSAE  # noqa: E402
from dictionary_learning.trainers.top_k import AutoEncoderTopK  # noqa: E402
from safetensors.torch import load_file, save_file  # noqa: E402

from mechfaith.errors import MechfaithError  # noqa: E402
from mechfaith.lm.dictionary_learning import import_dictionary_learning  # noqa: E402

D, N, K, BATCH, LAYER, LM = 16, 64, 4, 8, 3, "EleutherAI/pythia-70m-deduped"
ROOT = Path(__file__).resolve().parent.parent
COMMON = {"steps": 10_000, "activation_dim": D, "dict_size": N, "layer": LAYER, "lm_name": LM, "device": "cpu",
          "submodule_name": f"resid_post_layer_{LAYER}"}
FIXTURES: dict[str, tuple[Any, dict[str, Any], float | None]] = {  # trainer, its extra args, threshold
    "standard": (StandardTrainer, {}, None),
    "topk": (TopKTrainer, {"k": K}, 0.25),  # TopK's threshold is not used by its encode
    "batchtopk": (BatchTopKTrainer, {"k": K}, 0.3),
    "batchtopk_no_threshold": (BatchTopKTrainer, {"k": K}, -1.0),
    "jumprelu": (JumpReluTrainer, {}, None),
    "gated": (GatedSAETrainer, {}, None),  # refused by mechfaith
}
REFUSED = ("gated",)
LOADERS: dict[str, Any] = {
    "standard": lambda p: AutoEncoder.from_pretrained(p, normalize_decoder=False),
    "topk": AutoEncoderTopK.from_pretrained, "batchtopk": BatchTopKSAE.from_pretrained,
    "batchtopk_no_threshold": BatchTopKSAE.from_pretrained, "jumprelu": JumpReluAutoEncoder.from_pretrained,
    "gated": GatedAutoEncoder.from_pretrained,
}


@torch.no_grad()
def build(name: str, seed: int) -> Any:
    """The trainer (its dictionary with seeded random weights of useful sizes)."""
    cls, extra, thr = FIXTURES[name]
    trainer = cls(**COMMON, **extra, seed=seed)
    g = torch.Generator().manual_seed(100 + seed)
    for pname, p in trainer.ae.named_parameters():
        if pname == "threshold":  # JumpReLU: positive per-latent thresholds
            p.copy_(torch.rand(p.shape, generator=g) * 0.3 + 0.05)
        else:
            p.copy_(torch.randn(p.shape, generator=g) * (0.4 if p.dim() == 2 else 0.2))
    if thr is not None:
        trainer.ae.threshold.fill_(thr)
    return trainer


def save(trainer: Any, folder: Path) -> None:
    """As ``trainSAE`` saves: config.json, then ae.pt (state_dict on the CPU)."""
    folder.mkdir(parents=True)
    (folder / "config.json").write_text(json.dumps({"trainer": trainer.config}, indent=4))
    torch.save({k: v.cpu() for k, v in trainer.ae.state_dict().items()}, folder / "ae.pt")


@torch.no_grad()
def make_fixtures(out: Path) -> list[str]:
    out.mkdir(parents=True, exist_ok=True)
    x = torch.randn(BATCH, D, generator=torch.Generator().manual_seed(1234))
    for i, name in enumerate(FIXTURES):
        if (out / name).exists():
            shutil.rmtree(out / name)
        save(build(name, seed=i), out / name)
        if name not in REFUSED:
            ae = LOADERS[name](str(out / name / "ae.pt"))
            feats = ae.encode(x)
            x_hat = ae(x)
            assert torch.allclose(x_hat, ae.decode(feats))
            save_file({"x": x, "features": feats.contiguous(), "x_hat": x_hat.contiguous()},
                      str(out / name / "expected.safetensors"))
    (out / "README.md").write_text(
        f"Written by dictionary_learning {dictionary_learning.__version__} itself "
        "(`benchmarks/make_dictionary_learning_fixtures.py`,\nrun in the peers' venv): its trainers' "
        "dictionaries saved as its `trainSAE` saves them (`ae.pt`,\n`config.json`); `expected.safetensors` "
        "(inputs `x`, the library's `features` and `x_hat`) where\nmechfaith reads the file. Checked by "
        "`tests/lm/test_dictionary_learning_fixtures.py`.\n")
    return list(FIXTURES)


@torch.no_grad()
def check_imports(out: Path, names: list[str]) -> bool:
    print("\nfixtures read by mechfaith (import_dictionary_learning) against dictionary_learning's outputs:")
    ok = True
    for name in names:
        try:
            imp = import_dictionary_learning(out / name)
        except MechfaithError as exc:
            print(f"  {name:24s} refused{'' if name in REFUSED else ' (UNEXPECTED)'}: {exc}")
            ok &= name in REFUSED
            continue
        e = load_file(str(out / name / "expected.safetensors"))
        d_f = (imp.coder.encode(e["x"]) - e["features"]).abs().max().item()
        d_o = (imp.coder(e["x"]) - e["x_hat"]).abs().max().item()
        ok &= max(d_f, d_o) < 1e-5 and name not in REFUSED
        print(f"  {name:24s} {imp.coder.cfg.activation:10s} layer {imp.layer} "
              f"max |diff| features {d_f:.1e}, outputs {d_o:.1e}")
    return ok


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--out", type=Path, default=ROOT / "tests" / "fixtures" / "dictionary_learning")
    args = p.parse_args()
    torch.set_num_threads(1)
    names = make_fixtures(args.out)
    print(f"wrote {len(names)} fixtures under {args.out} (dictionary_learning {dictionary_learning.__version__})")
    ok = check_imports(args.out, names)
    print("\nall as expected" if ok else "\nSOME CHECKS FAILED")
    return 0 if ok else 1


if __name__ == "__main__":
    sys.exit(main())
