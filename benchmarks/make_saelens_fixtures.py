#!/usr/bin/env python
"""SAELens's own files and outputs as test fixtures, and mechfaith's exports loaded in SAELens.

Run in the peers' venv (``bash benchmarks/setup_peers.sh`` builds it; not in CI), from the
repository root:

    PYTHONPATH=src /tmp/peers-venv/bin/python benchmarks/make_saelens_fixtures.py [--out DIR]

1. Fixtures (``tests/fixtures/saelens/<name>/``, default ``--out``): tiny SAEs and transcoders
   (d_in 16, d_sae 64, d_out 12 for transcoders; seeded random weights) built by SAELens and saved
   by SAELens's own ``save_model`` / ``save_inference_model`` (``cfg.json`` +
   ``sae_weights.safetensors``): every architecture SAELens has that mechfaith reads, every setting
   that changes the computation (``apply_b_dec_to_input`` true and false,
   ``rescale_acts_by_decoder_norm`` on training checkpoints and folded inference saves, JumpReLU
   thresholds, BatchTopK's ``topk_threshold``, skip connections, flat pre-6.0 configs), and the
   architectures and settings mechfaith refuses. For each one mechfaith reads, ``expected.safetensors``
   holds the inputs ``x`` [8, 16] (seeded) and what SAELens computes from the saved folder:
   ``feature_acts`` (its ``encode``) and ``output`` (its forward pass); for BatchTopK checkpoints
   also ``feature_acts_batch`` / ``output_batch``, the training SAE's batch-level TopK. Every
   number comes from SAELens loading the folder it wrote (``SAE.load_from_disk``, or
   ``TrainingSAE.load_from_disk`` then ``save_inference_model`` for training-only architectures).
2. Exports: a random mechfaith coder of every kind mechfaith can export is written with
   ``export_saelens`` and loaded with SAELens's ``SAE.load_from_disk``; the script prints the
   largest difference of latents and outputs per kind and checks SAELens kept the hook and model
   names; kinds SAELens cannot hold must be refused with nothing written.
3. Imports: every fixture is read with ``import_saelens``; largest differences from SAELens's.

``tests/lm/test_saelens_fixtures.py`` checks (1) and (3) in CI without SAELens.
"""

from __future__ import annotations

import argparse
import json
import shutil
import sys
import tempfile
import warnings
from pathlib import Path
from typing import Any, Callable

import torch
from safetensors.torch import save_file

warnings.filterwarnings("ignore")

import sae_lens  # noqa: E402
from sae_lens import SAE, TrainingSAE  # noqa: E402
from sae_lens import saes as S  # noqa: E402
from sae_lens.saes.sae import SAEMetadata  # noqa: E402

from mechfaith.coders import CoderConfig, SparseCoder  # noqa: E402
from mechfaith.errors import MechfaithError  # noqa: E402
from mechfaith.lm.saelens import export_saelens, import_saelens  # noqa: E402

D_IN, D_SAE, D_OUT, K, BATCH = 16, 64, 12, 4, 8
ROOT = Path(__file__).resolve().parent.parent


def metadata(transcoder: bool = False, hook: str = "blocks.3.hook_resid_pre") -> SAEMetadata:
    """What SAELens's training runner records (model, hooks, context), for realistic configs."""
    meta: dict[str, Any] = {"model_name": "gpt2", "hook_name": "blocks.3.ln2.hook_normalized" if transcoder else hook,
                            "hook_head_index": None, "context_size": 128, "prepend_bos": True}
    if transcoder:
        meta.update(hook_name_out="blocks.3.hook_mlp_out", hook_head_index_out=None)
    return SAEMetadata(**meta)


@torch.no_grad()
def randomize(sae: torch.nn.Module, seed: int) -> None:
    """Seeded random weights of useful sizes: some latents fire, decoder norms far from 1."""
    g = torch.Generator().manual_seed(seed)
    scale = {"W_enc": 0.4, "b_enc": 0.2, "W_dec": 0.5, "b_dec": 0.3, "W_skip": 0.2}
    for name, p in sae.named_parameters():
        if name == "threshold":
            p.copy_(torch.rand(p.shape, generator=g) * 0.6)
        elif name in scale:
            p.copy_(torch.randn(p.shape, generator=g) * scale[name])
        else:  # other architectures' extras (gated, temporal, ...)
            p.copy_(torch.randn(p.shape, generator=g) * 0.2)
    if hasattr(sae, "topk_threshold"):
        sae.topk_threshold = torch.tensor(0.35, dtype=torch.double)


def cfg_of(cls: type, **kw: Any) -> Any:
    transcoder = "d_out" in kw
    if transcoder:
        kw.setdefault("apply_b_dec_to_input", False)
    kw.setdefault("metadata", metadata(transcoder))
    return cls(d_in=D_IN, d_sae=D_SAE, **kw)


# name -> (SAE built by SAELens, how it is saved: "model" (save_model) or "inference")
Builder = Callable[[], tuple[torch.nn.Module, str]]
READ: dict[str, Builder] = {
    "standard": lambda: (S.StandardSAE(cfg_of(S.StandardSAEConfig)), "model"),
    "standard_no_b_dec_in": lambda: (S.StandardSAE(cfg_of(S.StandardSAEConfig, apply_b_dec_to_input=False)), "model"),
    "standard_checkpoint": lambda: (S.StandardTrainingSAE(cfg_of(S.StandardTrainingSAEConfig)), "model"),
    "topk": lambda: (S.TopKSAE(cfg_of(S.TopKSAEConfig, k=K)), "model"),
    "topk_no_b_dec_in": lambda: (S.TopKSAE(cfg_of(S.TopKSAEConfig, k=K, apply_b_dec_to_input=False)), "model"),
    "topk_rescale_checkpoint": lambda: (S.TopKTrainingSAE(cfg_of(S.TopKTrainingSAEConfig, k=K)), "model"),
    "topk_rescale_inference": lambda: (S.TopKTrainingSAE(cfg_of(S.TopKTrainingSAEConfig, k=K)), "inference"),
    "jumprelu": lambda: (S.JumpReLUSAE(cfg_of(S.JumpReLUSAEConfig)), "model"),
    "jumprelu_no_b_dec_in": lambda: (S.JumpReLUSAE(cfg_of(S.JumpReLUSAEConfig, apply_b_dec_to_input=False)), "model"),
    "jumprelu_checkpoint": lambda: (S.JumpReLUTrainingSAE(cfg_of(S.JumpReLUTrainingSAEConfig)), "model"),
    "batchtopk_checkpoint": lambda: (S.BatchTopKTrainingSAE(cfg_of(S.BatchTopKTrainingSAEConfig, k=K)), "model"),
    "batchtopk_checkpoint_no_rescale": lambda: (S.BatchTopKTrainingSAE(cfg_of(
        S.BatchTopKTrainingSAEConfig, k=K, rescale_acts_by_decoder_norm=False)), "model"),
    "batchtopk_inference": lambda: (S.BatchTopKTrainingSAE(cfg_of(S.BatchTopKTrainingSAEConfig, k=K)), "inference"),
    "matryoshka_batchtopk_checkpoint": lambda: (S.MatryoshkaBatchTopKTrainingSAE(cfg_of(
        S.MatryoshkaBatchTopKTrainingSAEConfig, k=K, matryoshka_widths=[16, 64])), "model"),
    "transcoder": lambda: (S.Transcoder(cfg_of(S.TranscoderConfig, d_out=D_OUT)), "model"),
    "skip_transcoder": lambda: (S.SkipTranscoder(cfg_of(S.SkipTranscoderConfig, d_out=D_OUT)), "model"),
    "jumprelu_transcoder": lambda: (S.JumpReLUTranscoder(cfg_of(S.JumpReLUTranscoderConfig, d_out=D_OUT)), "model"),
    "jumprelu_skip_transcoder": lambda: (S.JumpReLUSkipTranscoder(cfg_of(S.JumpReLUSkipTranscoderConfig, d_out=D_OUT)),
                                         "model"),
}
# flat pre-6.0 configs (SAELens 6 cannot write them): SAELens's weights, the old config by hand
LEGACY: dict[str, dict[str, Any]] = {
    "legacy_standard": {"architecture": "standard", "activation_fn_str": "relu"},  # no apply_b_dec_to_input
    "legacy_topk": {"activation_fn_str": "topk", "activation_fn_kwargs": {"k": K}, "apply_b_dec_to_input": False},
}
REFUSED: dict[str, Builder] = {
    "gated": lambda: (S.GatedSAE(cfg_of(S.GatedSAEConfig)), "model"),
    "abstopk": lambda: (S.AbsTopKSAE(cfg_of(S.AbsTopKSAEConfig, k=K)), "model"),
    "matching_pursuit": lambda: (S.MatchingPursuitSAE(cfg_of(S.MatchingPursuitSAEConfig)), "model"),
    "temporal": lambda: (S.TemporalSAE(cfg_of(S.TemporalSAEConfig, n_heads=2, bottleneck_factor=8)), "model"),
    "standard_layer_norm": lambda: (S.StandardSAE(cfg_of(S.StandardSAEConfig, normalize_activations="layer_norm")),
                                    "model"),
    "standard_expected_average": lambda: (S.StandardSAE(cfg_of(
        S.StandardSAEConfig, normalize_activations="expected_average_only_in")), "model"),
    "standard_hook_z": lambda: (S.StandardSAE(cfg_of(S.StandardSAEConfig, reshape_activations="hook_z",
                                                     metadata=metadata(hook="blocks.3.attn.hook_z"))), "model"),
}


def save(sae: torch.nn.Module, how: str, folder: Path) -> None:
    if folder.exists():
        shutil.rmtree(folder)
    if how == "inference":
        sae.save_inference_model(str(folder))  # type: ignore[operator]
    else:
        sae.save_model(str(folder))  # type: ignore[operator]


@torch.no_grad()
def saelens_outputs(folder: Path, x: torch.Tensor) -> dict[str, torch.Tensor]:
    """What SAELens computes from the folder it wrote: latents and forward pass at inference."""
    arch = json.loads((folder / "cfg.json").read_text()).get("architecture", "standard")
    out: dict[str, torch.Tensor] = {"x": x}
    if arch in ("batchtopk", "matryoshka_batchtopk"):  # training-only: SAELens saves them as JumpReLU
        train = TrainingSAE.load_from_disk(str(folder)).eval()
        out["feature_acts_batch"] = train.encode(x)
        out["output_batch"] = train(x)
        with tempfile.TemporaryDirectory() as tmp:
            train.save_inference_model(tmp)
            sae = SAE.load_from_disk(tmp).eval()
    else:
        sae = SAE.load_from_disk(str(folder)).eval()
    out["feature_acts"] = sae.encode(x)
    out["output"] = sae(x)
    return {k: v.detach().float().contiguous() for k, v in out.items()}


def make_fixtures(out: Path) -> list[str]:
    out.mkdir(parents=True, exist_ok=True)
    x = torch.randn(BATCH, D_IN, generator=torch.Generator().manual_seed(1234))
    names = []
    for i, (name, build) in enumerate([*READ.items(), *REFUSED.items()]):
        torch.manual_seed(i)
        sae, how = build()
        randomize(sae, seed=100 + i)
        save(sae, how, out / name)
        if name in READ:
            save_file(saelens_outputs(out / name, x), str(out / name / "expected.safetensors"))
        names.append(name)
    for j, (name, flat) in enumerate(LEGACY.items()):
        sae = S.StandardSAE(cfg_of(S.StandardSAEConfig))
        randomize(sae, seed=200 + j)
        save(sae, "model", out / name)
        old = {"d_in": D_IN, "d_sae": D_SAE, "dtype": "float32", "device": "cpu", "model_name": "gpt2",
               "hook_point": "blocks.2.hook_resid_pre", "hook_point_layer": 2, "hook_point_head_index": None,
               "normalize_activations": False, "context_size": 128, "prepend_bos": True,
               "sae_lens_training_version": "3.5.0", **flat}
        (out / name / "cfg.json").write_text(json.dumps(old))
        save_file(saelens_outputs(out / name, x), str(out / name / "expected.safetensors"))
        names.append(name)
    (out / "README.md").write_text(
        "Written by SAELens " + sae_lens.__version__ + " itself (`benchmarks/make_saelens_fixtures.py`, run in the\n"
        "peers' venv). Each folder: SAELens's `cfg.json` + `sae_weights.safetensors`; `expected.safetensors`\n"
        "(inputs `x`, SAELens's `feature_acts` and `output`) where mechfaith reads the folder. `legacy_*`:\n"
        "SAELens's weights with a flat pre-6.0 `cfg.json`. Checked by `tests/lm/test_saelens_fixtures.py`.\n")
    return names


def random_coder(seed: int, **kw: Any) -> SparseCoder:
    cfg = {"d_in": D_IN, "n_latents": D_SAE, "d_out": D_OUT, "kind": "transcoder", "activation": "relu", **kw}
    if cfg["kind"] == "sae":
        cfg["d_out"] = D_IN
    coder = SparseCoder(CoderConfig(**cfg), generator=torch.Generator().manual_seed(seed))
    g = torch.Generator().manual_seed(seed + 1)
    with torch.no_grad():
        for name, p in coder.named_parameters():
            p.add_(0.2 * torch.randn(p.shape, generator=g)) if name != "log_threshold" else \
                p.copy_((torch.rand(p.shape, generator=g) * 0.5 + 0.05).log())
        if coder.cfg.activation == "batchtopk":
            coder.batchtopk_threshold.fill_(0.3)
    return coder.eval()


EXPORTS: dict[str, dict[str, Any]] = {
    "relu SAE": {"kind": "sae"}, "topk SAE": {"kind": "sae", "activation": "topk", "k": K},
    "jumprelu SAE": {"kind": "sae", "activation": "jumprelu"},
    "batchtopk SAE": {"kind": "sae", "activation": "batchtopk", "k": K},
    "relu SAE + skip": {"kind": "sae", "skip": True},
    "relu transcoder": {}, "relu skip transcoder": {"skip": True},
    "jumprelu transcoder": {"activation": "jumprelu"}, "jumprelu skip transcoder": {"activation": "jumprelu", "skip": True},
    "batchtopk transcoder": {"activation": "batchtopk", "k": K},
    "batchtopk skip transcoder": {"activation": "batchtopk", "k": K, "skip": True},
    "topk transcoder": {"activation": "topk", "k": K}, "topk skip transcoder": {"activation": "topk", "k": K, "skip": True},
}


@torch.no_grad()
def check_exports() -> bool:
    print(f"\nmechfaith exports loaded by SAELens {sae_lens.__version__} (SAE.load_from_disk):")
    ok = True
    x = torch.randn(64, D_IN, generator=torch.Generator().manual_seed(5))
    with tempfile.TemporaryDirectory() as tmp:
        for i, (kind, kw) in enumerate(EXPORTS.items()):
            coder, folder = random_coder(10 + i, **kw), Path(tmp) / f"e{i}"
            try:
                export_saelens(coder, folder, layer=3, input_site="mlp_in", output_site="mlp_out", model_name="gpt2")
            except MechfaithError as exc:
                fine = kw.get("activation") == "topk" and not folder.exists()
                ok &= fine
                print(f"  {kind:28s} refused{'' if fine else ' (UNEXPECTED)'}: {exc}")
                continue
            sae = SAE.load_from_disk(str(folder)).eval()
            meta = sae.cfg.metadata
            kept = meta.model_name == "gpt2" and meta.hook_name == "blocks.3.ln2.hook_normalized"
            if sae.cfg.architecture().endswith("transcoder"):  # an SAE with a skip reads and writes one site
                kept &= meta.hook_name_out == ("blocks.3.hook_mlp_out" if coder.cfg.kind == "transcoder"
                                               else "blocks.3.ln2.hook_normalized")
            d_acts = (sae.encode(x) - coder.encode(x)).abs().max().item()
            d_out = (sae(x) - coder(x)).abs().max().item()
            ok &= kept and max(d_acts, d_out) < 1e-5
            print(f"  {kind:28s} {sae.cfg.architecture():26s} max |diff| latents {d_acts:.1e}, outputs {d_out:.1e}; "
                  f"hook and model names {'kept' if kept else 'LOST'}")
    return ok


@torch.no_grad()
def check_imports(out: Path, names: list[str]) -> bool:
    print("\nfixtures read by mechfaith (import_saelens) against SAELens's outputs:")
    ok = True
    for name in names:
        folder = out / name
        try:
            imp = import_saelens(folder)
        except MechfaithError as exc:
            fine = name in REFUSED
            ok &= fine
            print(f"  {name:34s} refused{'' if fine else ' (UNEXPECTED)'}: {str(exc).split(': ', 1)[1]}")
            continue
        from safetensors.torch import load_file
        e = load_file(str(folder / "expected.safetensors"))
        d_acts = (imp.coder.encode(e["x"]) - e["feature_acts"]).abs().max().item()
        d_out = (imp.coder(e["x"]) - e["output"]).abs().max().item()
        ok &= name in READ or name in LEGACY
        ok &= max(d_acts, d_out) < 1e-5
        print(f"  {name:34s} {imp.coder.cfg.activation:9s} max |diff| latents {d_acts:.1e}, outputs {d_out:.1e}")
    return ok


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0], formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--out", type=Path, default=ROOT / "tests" / "fixtures" / "saelens", help="fixture folder")
    args = p.parse_args()
    torch.set_num_threads(1)
    names = make_fixtures(args.out)
    print(f"wrote {len(names)} fixtures under {args.out} (SAELens {sae_lens.__version__})")
    ok = check_exports() & check_imports(args.out, names)
    print("\nall as expected" if ok else "\nSOME CHECKS FAILED")
    return 0 if ok else 1


if __name__ == "__main__":
    sys.exit(main())
