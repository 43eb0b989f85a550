#!/usr/bin/env python
"""circuit-tracer's own cross-layer transcoder files and outputs as test fixtures, and mechfaith's
CLT exports loaded by circuit-tracer.

Run in the peers' venv (``bash benchmarks/setup_peers.sh``; circuit-tracer installed --no-deps: only
its transcoder code is used), from the repository root:

    PYTHONPATH=src /tmp/peers-venv/bin/python benchmarks/make_circuit_tracer_clt_fixtures.py [--out DIR]

1. Fixtures (``tests/fixtures/circuit_tracer_clt/<name>/``): 3-layer CLTs (d_model 16, d_transcoder 32;
   seeded random weights) built with circuit-tracer's ``CrossLayerTranscoder`` (``jump_relu`` or
   ``relu``), written by its own ``to_safetensors`` (``W_enc_<i>`` / ``W_dec_<i>`` files). circuit-tracer
   writes no ``config.yaml`` beside them (the Hub's CLT folders carry one; its transcoder cache holds
   one): the script writes the fields it reads, and every CLT here is loaded by circuit-tracer's
   ``load_transcoders_from_cache`` from a copy of its folder in a temporary cache (``config.yaml`` read
   by circuit-tracer, then ``load_clt`` with its hooks, lazy decoders: its defaults).
   ``expected.safetensors``: inputs ``x`` [3, 8, 16] (seeded) and the loaded CLT's ``encode``
   (``features``) and reconstruction (``compute_attribution_components``, no position zeroed;
   ``reconstruction``), both [layers, tokens, ...].
2. The skip connection: a circuit-tracer CLT with ``W_skip`` saved and reloaded by circuit-tracer
   comes back without it (checked: the reason mechfaith refuses to write a CLT with a skip).
3. Exports: mechfaith CLTs of every kind written with ``export_circuit_tracer_clt`` and loaded by
   circuit-tracer (as above); largest differences printed; TopK, skip, a block not from layer 0 and
   d_out != d_in refused. The reach-1 JumpReLU one is recorded (``from_mechfaith/``: the CLT as a mechfaith folder,
   and ``expected.safetensors``: what circuit-tracer computes from its export).
4. Imports: every fixture read with ``read_circuit_tracer_clt``; largest differences printed.
"""

from __future__ import annotations

import argparse
import shutil
import sys
import tempfile
import warnings
from pathlib import Path
from typing import Any

warnings.filterwarnings("ignore")

import huggingface_hub.constants  # noqa: E402

# circuit-tracer 0.5 imports a constant that newer huggingface_hub releases dropped (unused here: no download)
if not hasattr(huggingface_hub.constants, "HF_HUB_ENABLE_HF_TRANSFER"):
    huggingface_hub.constants.HF_HUB_ENABLE_HF_TRANSFER = False  # type: ignore[attr-defined]

import circuit_tracer  # noqa: E402
import torch  # noqa: E402
import yaml  # noqa: E402
from circuit_tracer.transcoder.cross_layer_transcoder import CrossLayerTranscoder as CTCLT  # noqa: E402
from circuit_tracer.transcoder.cross_layer_transcoder import load_clt  # noqa: E402
from circuit_tracer.utils.caching import get_cached_path, load_transcoders_from_cache  # noqa: E402
from safetensors.torch import load_file, save_file  # noqa: E402

from mechfaith.coders.clt import CrossLayerTranscoder  # noqa: E402
from mechfaith.coders.clt_config import CLTConfig  # noqa: E402
from mechfaith.coders.clt_files import save_clt  # noqa: E402
from mechfaith.errors import MechfaithError  # noqa: E402
from mechfaith.lm.circuit_tracer_clt import export_circuit_tracer_clt, read_circuit_tracer_clt  # noqa: E402

L, D, N, BATCH = 3, 16, 32, 8
ROOT = Path(__file__).resolve().parent.parent
CPU = torch.device("cpu")
FIXTURES = {"jumprelu": "jump_relu", "relu": "relu"}
HOOKS = {"feature_input_hook": "hook_resid_mid", "feature_output_hook": "hook_mlp_out"}


@torch.no_grad()
def build(act: str, seed: int, skip: bool = False) -> CTCLT:
    g = torch.Generator().manual_seed(seed)
    clt = CTCLT(L, N, D, activation_function=act, skip_connection=skip, lazy_decoder=False, device=CPU,
                dtype=torch.float32)
    for name, p in clt.named_parameters():
        if name == "activation_function.threshold":
            p.copy_(torch.rand(p.shape, generator=g) * 0.3 + 0.05)
        else:
            p.copy_(torch.randn(p.shape, generator=g) * (0.25 if p.dim() >= 2 else 0.2))
    return clt


@torch.no_grad()
def outputs(clt: CTCLT, x: torch.Tensor) -> dict[str, torch.Tensor]:
    """circuit-tracer's latents and reconstruction [layers, tokens, ...] on x."""
    recon = clt.compute_attribution_components(x, zero_positions=slice(0, 0))["reconstruction"]
    assert recon.shape == (L, x.shape[1], D), recon.shape  # every position has an active latent
    return {"features": clt.encode(x).contiguous(), "reconstruction": recon.contiguous()}


def load(folder: Path, cache: Path) -> CTCLT:
    """circuit-tracer's own loading of a CLT folder with its config.yaml: copied into a cache, loaded
    from there (the hooks checked to be those of config.yaml)."""
    ref = f"mechfaith-fixtures/{folder.name}"
    target = get_cached_path(ref, cache)
    if target.exists():
        shutil.rmtree(target)
    shutil.copytree(folder, target)
    clt, config = load_transcoders_from_cache(ref, cache_dir=cache, device=CPU, dtype=torch.float32)
    assert config["model_kind"] == "cross_layer_transcoder" and isinstance(clt, CTCLT)
    assert (clt.feature_input_hook, clt.feature_output_hook) == (config["feature_input_hook"],
                                                                 config["feature_output_hook"])
    return clt


def inputs(seed: int = 1234) -> torch.Tensor:
    return torch.randn(L, BATCH, D, generator=torch.Generator().manual_seed(seed))


def make_fixtures(out: Path) -> list[str]:
    x = inputs()
    for i, (name, act) in enumerate(FIXTURES.items()):
        folder = out / name
        if folder.exists():
            shutil.rmtree(folder)
        build(act, seed=10 + i).to_safetensors(str(folder))
        config = {"model_name": "HuggingFaceTB/SmolLM2-135M", "model_kind": "cross_layer_transcoder", **HOOKS,
                  "scan": f"fixture/{name}"}
        (folder / "config.yaml").write_text(yaml.safe_dump(config, sort_keys=False))
        with tempfile.TemporaryDirectory() as cache:
            loaded = load(folder, Path(cache))
            save_file({"x": x, **outputs(loaded, x)}, str(folder / "expected.safetensors"))
    (out / "README.md").write_text(
        f"CLT files written by circuit-tracer {circuit_tracer.__version__} itself (`CrossLayerTranscoder.to_safetensors`,\n"
        "`benchmarks/make_circuit_tracer_clt_fixtures.py`, run in the peers' venv). `config.yaml` is NOT written by\n"
        "circuit-tracer (it writes none beside them): the script writes the fields its `load_transcoders` reads.\n"
        "`expected.safetensors` holds what the CLT loaded by circuit-tracer (`load_transcoders_from_cache`, from a\n"
        "copy of the folder in a temporary cache: config.yaml, then `load_clt`) computes (`features`,\n"
        "`reconstruction` on inputs `x`). `from_mechfaith/`: a mechfaith CLT (reach 1, JumpReLU) and what\n"
        "circuit-tracer computes from its export. Checked by `tests/lm/test_circuit_tracer_clt.py`.\n")
    return list(FIXTURES)


@torch.no_grad()
def check_skip_is_not_saved() -> bool:
    with tempfile.TemporaryDirectory() as tmp:
        clt = build("jump_relu", seed=99, skip=True)
        clt.to_safetensors(tmp)
        back = load_clt(tmp, device=CPU, dtype=torch.float32, lazy_decoder=False)
        ok = clt.W_skip is not None and back.W_skip is None
    print(f"\ncircuit-tracer CLT with W_skip, saved and reloaded by circuit-tracer: W_skip "
          f"{'lost (as expected: mechfaith refuses to write a skip)' if ok else 'KEPT (UNEXPECTED: update mechfaith)'}")
    return ok


@torch.no_grad()
def random_clt(seed: int, **kw: Any) -> CrossLayerTranscoder:
    cfg = CLTConfig(**{"n_layers": L, "d_in": D, "n_latents": N, "activation": "jumprelu", "k": 4, **kw})
    clt = CrossLayerTranscoder(cfg, generator=torch.Generator().manual_seed(seed))
    g = torch.Generator().manual_seed(seed + 1)
    for name, p in clt.named_parameters():
        if name == "log_threshold":
            p.copy_((torch.rand(p.shape, generator=g) * 0.3 + 0.05).log())
        else:
            p.add_(0.1 * torch.randn(p.shape, generator=g))
    return clt.eval()


EXPORTS: dict[str, dict[str, Any]] = {
    "jumprelu reach 1": {"reach": 1}, "jumprelu full": {}, "relu full": {"activation": "relu"},
    "relu reach 0": {"activation": "relu", "reach": 0},
    "topk": {"activation": "topk"}, "jumprelu skip": {"skip": True}, "jumprelu layers 2..4": {"first_layer": 2},
    "jumprelu 16 -> 12": {"d_out": 12},
}
REFUSED = ("topk", "jumprelu skip", "jumprelu layers 2..4", "jumprelu 16 -> 12")


@torch.no_grad()
def check_exports(out: Path) -> bool:
    print(f"\nmechfaith CLTs loaded by circuit-tracer {circuit_tracer.__version__} (load_transcoders_from_cache):")
    ok, x = True, inputs(5)
    with tempfile.TemporaryDirectory() as tmp:
        for i, (kind, kw) in enumerate(EXPORTS.items()):
            clt, folder = random_clt(20 + i, **kw), Path(tmp) / f"e{i}"
            try:
                export_circuit_tracer_clt(clt, folder, model_name="gpt2")
            except MechfaithError as exc:
                fine = kind in REFUSED and not folder.exists()
                ok &= fine
                print(f"  {kind:22s} refused{'' if fine else ' (UNEXPECTED)'}: {exc}")
                continue
            ok &= kind not in REFUSED
            theirs = outputs(load(folder, Path(tmp) / "cache"), x)
            d_f = (theirs["features"] - clt.encode(x)).abs().max().item()
            d_o = (theirs["reconstruction"] - clt(x)).abs().max().item()
            ok &= max(d_f, d_o) < 1e-5
            print(f"  {kind:22s} max |diff| features {d_f:.1e}, reconstruction {d_o:.1e}")
            if kind == "jumprelu reach 1":
                record = out / "from_mechfaith"
                if record.exists():
                    shutil.rmtree(record)
                save_clt(clt, record / "mechfaith", training={"note": "random weights, a fixture"})
                save_file({"x": x, **theirs}, str(record / "expected.safetensors"))
    return ok


@torch.no_grad()
def check_imports(out: Path, names: list[str]) -> bool:
    print("\nfixtures read by mechfaith (read_circuit_tracer_clt) against circuit-tracer's outputs:")
    ok = True
    for name in names:
        c = read_circuit_tracer_clt(out / name)
        e = load_file(str(out / name / "expected.safetensors"))
        d_f = (c.clt.encode(e["x"]) - e["features"]).abs().max().item()
        d_o = (c.clt(e["x"]) - e["reconstruction"]).abs().max().item()
        ok &= max(d_f, d_o) < 1e-5
        print(f"  {name:10s} {c.clt.cfg.activation} L={c.clt.n_layers} max |diff| features {d_f:.1e}, "
              f"reconstruction {d_o:.1e}")
    return ok


def main() -> int:
    p = argparse.ArgumentParser(description=(__doc__ or "").split("\n\n")[0])
    p.add_argument("--out", type=Path, default=ROOT / "tests" / "fixtures" / "circuit_tracer_clt")
    args = p.parse_args()
    torch.set_num_threads(1)
    args.out.mkdir(parents=True, exist_ok=True)
    names = make_fixtures(args.out)
    print(f"wrote {len(names)} fixtures under {args.out} (circuit-tracer {circuit_tracer.__version__})")
    ok = check_skip_is_not_saved() & check_exports(args.out) & check_imports(args.out, names)
    print("\nall as expected" if ok else "\nSOME CHECKS FAILED")
    return 0 if ok else 1


if __name__ == "__main__":
    sys.exit(main())
