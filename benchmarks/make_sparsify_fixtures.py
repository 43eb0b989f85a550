#!/usr/bin/env python
"""sparsify's own files and outputs as test fixtures, and mechfaith's exports loaded in sparsify.

Run in the peers' venv (``bash benchmarks/setup_peers.sh`` builds it; not in CI), from the
repository root:

    SPARSIFY_DISABLE_TRITON=1 PYTHONPATH=src /tmp/peers-venv/bin/python benchmarks/make_sparsify_fixtures.py [--out DIR]

1. Fixtures (``tests/fixtures/sparsify/<name>/``, default ``--out``): tiny coders (d_in 16, 64
   latents, k 4; seeded random weights) built by sparsify (``SparseCoder``) and saved by its own
   ``save_to_disk`` (``cfg.json`` + ``sae.safetensors``): an SAE, an SAE with a skip connection,
   one sized by ``expansion_factor`` (``num_latents`` 0), one trained with ``multi_topk``, a
   transcoder, a skip transcoder, and a run of two skip transcoders (``layers.0.mlp``,
   ``layers.1.mlp``) written by sparsify's trainer's own checkpoint code (hookpoint folders, the
   run's ``config.json``, its state files); ``groupmax`` (refused by mechfaith). For each one
   mechfaith reads, ``expected.safetensors`` holds the inputs ``x`` [8, 16] (seeded) and what
   sparsify computes from the saved folder (``SparseCoder.load_from_disk``): ``latent_acts`` and
   ``latent_indices`` (its ``encode``) and ``sae_out`` (its ``decode``, plus the skip connection:
   its forward pass's output; with ``multi_topk`` the forward pass decodes 4 k latents for its
   loss, so ``sae_out`` is ``encode`` then ``decode``, the coder at its ``k``).
2. Exports: a random mechfaith coder of every kind is written with ``export_sparsify`` and loaded
   with ``SparseCoder.load_from_disk``; a set with ``export_set_sparsify`` and loaded with
   ``SparseCoder.load_many``; the script prints the largest difference of latents and outputs per
   kind; kinds sparsify cannot hold must be refused with nothing written.
3. Imports: every fixture is read with ``import_sparsify`` (the run with ``read_sparsify_run``);
   largest differences from sparsify's.

``tests/lm/test_sparsify_fixtures.py`` checks (1) and (3) in CI without sparsify.
"""

from __future__ import annotations

import argparse
import os
import shutil
import sys
import tempfile
import warnings
from pathlib import Path
from typing import Any

os.environ.setdefault("SPARSIFY_DISABLE_TRITON", "1")
warnings.filterwarnings("ignore")

import sparsify  # noqa: E402
import torch  # noqa: E402
from safetensors.torch import load_file, save_file  # noqa: E402
from sparsify import SparseCoder, SparseCoderConfig  # noqa: E402
from sparsify.__main__ import RunConfig  # noqa: E402
from sparsify.trainer import Trainer  # noqa: E402

from mechfaith.coders import CoderConfig  # noqa: E402
from mechfaith.coders import SparseCoder as Coder  # noqa: E402
from mechfaith.errors import MechfaithError  # noqa: E402
from mechfaith.lm.coder_files import CoderRef  # noqa: E402
from mechfaith.lm.sparsify import export_set_sparsify, export_sparsify, import_sparsify, read_sparsify_run  # noqa: E402

D_IN, N, K, BATCH = 16, 64, 4, 8
ROOT = Path(__file__).resolve().parent.parent
RUN_MODEL = "HuggingFaceTB/SmolLM2-135M"  # sparsify's default model (mechfaith's smollm2-135m)
RUN_HOOKPOINTS = ("layers.0.mlp", "layers.1.mlp")

READ: dict[str, dict[str, Any]] = {
    "sae": {"num_latents": N, "k": K},
    "sae_skip": {"num_latents": N, "k": K, "skip_connection": True},
    "sae_expansion_factor": {"num_latents": 0, "expansion_factor": N // D_IN, "k": K},
    "sae_multi_topk": {"num_latents": N, "k": K, "multi_topk": True},
    "transcoder": {"num_latents": N, "k": K, "transcode": True},
    "skip_transcoder": {"num_latents": N, "k": K, "transcode": True, "skip_connection": True},
}
REFUSED: dict[str, dict[str, Any]] = {"groupmax": {"num_latents": N, "k": K, "activation": "groupmax"}}
RUN_CFG: dict[str, Any] = {"num_latents": N, "k": K, "transcode": True, "skip_connection": True}


@torch.no_grad()
def build(kw: dict[str, Any], seed: int) -> SparseCoder:
    """A sparsify coder with seeded random weights of useful sizes (some latents fire, decoder
    norms far from 1, a b_dec that matters)."""
    torch.manual_seed(seed)
    coder = SparseCoder(D_IN, SparseCoderConfig(**kw))
    g = torch.Generator().manual_seed(100 + seed)
    scale = {"encoder.weight": 0.4, "encoder.bias": 0.2, "W_dec": 0.5, "b_dec": 0.3, "W_skip": 0.2}
    for name, p in coder.named_parameters():
        p.copy_(torch.randn(p.shape, generator=g) * scale[name])
    return coder


@torch.no_grad()
def sparsify_outputs(folder: Path, x: torch.Tensor) -> dict[str, torch.Tensor]:
    """What sparsify computes from the folder it wrote: encode, decode (+ skip)."""
    sae = SparseCoder.load_from_disk(folder)
    acts, indices, _ = sae.encode(x)
    out = sae.decode(acts, indices)
    if sae.W_skip is not None:
        out = out + x @ sae.W_skip.mT
    if not sae.cfg.multi_topk:  # its forward pass computes the same
        fwd = sae(x)
        assert torch.equal(fwd.sae_out, out) and torch.equal(fwd.latent_indices, indices)
    return {"x": x, "latent_acts": acts.float().contiguous(), "latent_indices": indices.contiguous(),
            "sae_out": out.float().contiguous()}


def write_run(folder: Path, seed: int) -> None:
    """A run as sparsify's trainer checkpoints it (its own ``_checkpoint``: hookpoint folders, the
    run's config.json and state files), without training."""
    cfg = RunConfig(sae=SparseCoderConfig(**RUN_CFG), model=RUN_MODEL, hookpoints=list(RUN_HOOKPOINTS),
                    run_name=folder.name, log_to_wandb=False, data_preprocessing_num_proc=1)
    trainer = Trainer.__new__(Trainer)  # only what _checkpoint uses
    saes = {h: build(RUN_CFG, seed + i) for i, h in enumerate(RUN_HOOKPOINTS)}
    trainer.cfg, trainer.optimizers, trainer.lr_schedulers, trainer.global_step = cfg, [], [], 0
    trainer.num_tokens_since_fired = {h: torch.zeros(N, dtype=torch.long) for h in saes}
    trainer.best_loss = {h: float("inf") for h in saes}
    trainer._checkpoint(saes, str(folder), rank_zero=True)


def make_fixtures(out: Path) -> list[str]:
    out.mkdir(parents=True, exist_ok=True)
    x = torch.randn(BATCH, D_IN, generator=torch.Generator().manual_seed(1234))
    names = []
    for i, (name, kw) in enumerate([*READ.items(), *REFUSED.items()]):
        if (out / name).exists():
            shutil.rmtree(out / name)
        build(kw, seed=i).save_to_disk(out / name)
        if name in READ:
            save_file(sparsify_outputs(out / name, x), str(out / name / "expected.safetensors"))
        names.append(name)
    if (out / "run").exists():
        shutil.rmtree(out / "run")
    write_run(out / "run", seed=50)
    for h in RUN_HOOKPOINTS:
        save_file(sparsify_outputs(out / "run" / h, x), str(out / "run" / h / "expected.safetensors"))
    names.append("run")
    (out / "README.md").write_text(
        "Written by sparsify " + sparsify.__version__ + " itself (`benchmarks/make_sparsify_fixtures.py`, run in\n"
        "the peers' venv). Each folder: sparsify's `cfg.json` + `sae.safetensors` (its `save_to_disk`);\n"
        "`expected.safetensors` (inputs `x`, sparsify's `latent_acts`, `latent_indices` and `sae_out`) where\n"
        "mechfaith reads the folder. `run/`: two hookpoints as sparsify's trainer checkpoints a run (its\n"
        "`config.json` and state files beside them). Checked by `tests/lm/test_sparsify_fixtures.py`.\n")
    return names


def random_coder(seed: int, **kw: Any) -> Coder:
    cfg = {"d_in": D_IN, "n_latents": N, "kind": "transcoder", "activation": "topk", "k": K, **kw}
    coder = Coder(CoderConfig(**cfg), generator=torch.Generator().manual_seed(seed))
    g = torch.Generator().manual_seed(seed + 1)
    with torch.no_grad():
        for name, p in coder.named_parameters():
            p.add_(0.2 * torch.randn(p.shape, generator=g)) if name != "log_threshold" else \
                p.copy_((torch.rand(p.shape, generator=g) * 0.5 + 0.05).log())
        coder.batchtopk_threshold.fill_(0.3)
    return coder.eval()


EXPORTS: dict[str, dict[str, Any]] = {
    "topk SAE": {"kind": "sae"}, "topk SAE + skip": {"kind": "sae", "skip": True},
    "topk transcoder": {}, "topk skip transcoder": {"skip": True},
    "relu SAE": {"kind": "sae", "activation": "relu"}, "jumprelu transcoder": {"activation": "jumprelu"},
    "batchtopk SAE": {"kind": "sae", "activation": "batchtopk"},
    "topk transcoder 16 -> 12": {"d_out": 12},
}


@torch.no_grad()
def compare(sae: SparseCoder, coder: Coder, x: torch.Tensor) -> tuple[float, float]:
    """Largest differences of latents (dense) and outputs between sparsify's coder and ours."""
    acts, indices, _ = sae.encode(x)
    dense = torch.zeros(x.shape[0], sae.num_latents).scatter(-1, indices, acts)
    out = sae(x).sae_out
    return (dense - coder.encode(x)).abs().max().item(), (out - coder(x)).abs().max().item()


@torch.no_grad()
def check_exports() -> bool:
    print(f"\nmechfaith exports loaded by sparsify {sparsify.__version__} (SparseCoder.load_from_disk):")
    ok = True
    x = torch.randn(64, D_IN, generator=torch.Generator().manual_seed(5))
    with tempfile.TemporaryDirectory() as tmp:
        for i, (kind, kw) in enumerate(EXPORTS.items()):
            coder, folder = random_coder(10 + i, **kw), Path(tmp) / f"e{i}"
            try:
                export_sparsify(coder, folder, layer=3, input_site="mlp_in", output_site="mlp_out", model_name="gpt2")
            except MechfaithError as exc:
                fine = (kw.get("activation", "topk") != "topk" or "d_out" in kw) and not folder.exists()
                ok &= fine
                print(f"  {kind:28s} refused{'' if fine else ' (UNEXPECTED)'}: {exc}")
                continue
            sae = SparseCoder.load_from_disk(folder)
            d_acts, d_out = compare(sae, coder, x)
            ok &= max(d_acts, d_out) < 1e-5
            print(f"  {kind:28s} transcode={sae.cfg.transcode!s:5s} skip={sae.W_skip is not None!s:5s} "
                  f"max |diff| latents {d_acts:.1e}, outputs {d_out:.1e}")
        refs = {l: CoderRef(random_coder(40 + l, skip=True), "gpt2", l, "mlp_in", "mlp_out", None, Path(tmp))
                for l in (0, 1)}
        written = export_set_sparsify(refs, Path(tmp) / "run", "gpt2")
        saes = SparseCoder.load_many(str(Path(tmp) / "run"), local=True)
        for l, folder in written.items():
            d_acts, d_out = compare(saes[folder.name], refs[l].coder, x)
            ok &= max(d_acts, d_out) < 1e-5
            print(f"  set -> run: {folder.name:16s} (load_many)   max |diff| latents {d_acts:.1e}, outputs {d_out:.1e}")
    return ok


@torch.no_grad()
def check_one(name: str, folder: Path) -> bool:
    try:
        imp = import_sparsify(folder)
    except MechfaithError as exc:
        print(f"  {name:30s} refused{'' if name in REFUSED else ' (UNEXPECTED)'}: {str(exc).split(': ', 1)[1]}")
        return name in REFUSED
    e = load_file(str(folder / "expected.safetensors"))
    dense = torch.zeros(BATCH, imp.coder.n_latents).scatter(-1, e["latent_indices"], e["latent_acts"])
    d_acts = (imp.coder.encode(e["x"]) - dense).abs().max().item()
    d_out = (imp.coder(e["x"]) - e["sae_out"]).abs().max().item()
    where = f"layer {imp.layer}, {imp.input_site} -> {imp.output_site}" if imp.layer is not None else "no hookpoint"
    print(f"  {name:30s} {imp.coder.cfg.kind:10s} skip={imp.coder.cfg.skip!s:5s} ({where}) "
          f"max |diff| latents {d_acts:.1e}, outputs {d_out:.1e}")
    return max(d_acts, d_out) < 1e-5 and name not in REFUSED


def check_imports(out: Path, names: list[str]) -> bool:
    print("\nfixtures read by mechfaith (import_sparsify) against sparsify's outputs:")
    ok = True
    for name in names:
        if name == "run":
            manifest = read_sparsify_run(out / name)
            print(f"  run: a set of layers {manifest.layers} of {manifest.model} ({manifest.coders})")
            for h in manifest.coders.values():
                ok &= check_one(f"run/{h}", out / name / h)
        else:
            ok &= check_one(name, out / name)
    return ok


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0], formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--out", type=Path, default=ROOT / "tests" / "fixtures" / "sparsify", help="fixture folder")
    args = p.parse_args()
    torch.set_num_threads(1)
    names = make_fixtures(args.out)
    print(f"wrote {len(names)} fixtures under {args.out} (sparsify {sparsify.__version__})")
    ok = check_exports() & check_imports(args.out, names)
    print("\nall as expected" if ok else "\nSOME CHECKS FAILED")
    return 0 if ok else 1


if __name__ == "__main__":
    sys.exit(main())
