#!/usr/bin/env python
"""circuit-tracer's own files and outputs as test fixtures, and mechfaith's exports loaded in circuit-tracer.

Run in the peers' venv (not in CI; ``pip install --no-deps circuit-tracer`` there: only its
transcoder and config loading code is used), from the repository root:

    PYTHONPATH=src /tmp/peers-venv/bin/python benchmarks/make_circuit_tracer_fixtures.py [--out DIR]

1. Fixtures (``tests/fixtures/circuit_tracer/<name>/``): two-layer sets of tiny transcoders (d_model
   16, d_transcoder 64; seeded random weights) built with circuit-tracer's ``SingleLayerTranscoder``
   (ReLU, or its ``JumpReLU`` with a skip connection) in a ``TranscoderSet``, written by its own
   ``TranscoderSet.to_safetensors`` (``layer_<i>.safetensors``). circuit-tracer writes no
   ``config.yaml`` itself (sets on the Hub carry a hand-written one): the script writes one with the
   fields its ``load_transcoders`` reads (relative ``transcoders`` paths), and loads the set through
   ``load_transcoders`` from that file (run from the set folder, as circuit-tracer opens local paths
   relative to the current folder). ``expected.safetensors``: inputs ``x`` [8, 16] (seeded) and, per
   layer, the loaded set's ``encode`` (``features_<i>``) and forward pass (``out_<i>``).
2. Exports: mechfaith sets of every kind written with ``export_circuit_tracer_set`` and loaded by
   ``load_transcoders`` from the written ``config.yaml``; largest differences printed; TopK refused.
3. Imports: every fixture read with ``read_circuit_tracer_set``; largest differences printed.
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

warnings.filterwarnings("ignore")

import huggingface_hub.constants  # noqa: E402

# circuit-tracer 0.5 imports a constant that newer huggingface_hub releases dropped (unused here: no download)
if not hasattr(huggingface_hub.constants, "HF_HUB_ENABLE_HF_TRANSFER"):
    huggingface_hub.constants.HF_HUB_ENABLE_HF_TRANSFER = False  # type: ignore[attr-defined]

import circuit_tracer  # noqa: E402
import torch  # noqa: E402
import torch.nn.functional as F  # noqa: E402
import yaml  # noqa: E402
from circuit_tracer.transcoder.activation_functions import JumpReLU  # noqa: E402
from circuit_tracer.transcoder.single_layer_transcoder import SingleLayerTranscoder, TranscoderSet  # noqa: E402
from circuit_tracer.utils.hf_utils import load_transcoders  # noqa: E402
from safetensors.torch import load_file, save_file  # noqa: E402

from mechfaith.coders import CoderConfig  # noqa: E402
from mechfaith.coders import SparseCoder as Coder  # noqa: E402
from mechfaith.errors import MechfaithError  # noqa: E402
from mechfaith.lm.circuit_tracer import export_circuit_tracer_set, read_circuit_tracer_set  # noqa: E402

D, N, BATCH, LAYERS = 16, 64, 8, 2
ROOT = Path(__file__).resolve().parent.parent
CPU = torch.device("cpu")
FIXTURES: dict[str, dict[str, Any]] = {"relu": {"jumprelu": False, "skip": False},
                                       "jumprelu_skip": {"jumprelu": True, "skip": True}}
HOOKS = {"feature_input_hook": "mlp.hook_in", "feature_output_hook": "mlp.hook_out"}


@torch.no_grad()
def build(jumprelu: bool, skip: bool, layer: int, seed: int) -> SingleLayerTranscoder:
    g = torch.Generator().manual_seed(seed)
    act = JumpReLU(torch.rand(N, generator=g) * 0.3 + 0.05, 0.1) if jumprelu else F.relu
    tc = SingleLayerTranscoder(D, N, act, layer, skip_connection=skip, device=CPU, dtype=torch.float32)
    for name, p in tc.named_parameters():
        if name != "activation_function.threshold":
            p.copy_(torch.randn(p.shape, generator=g) * (0.4 if p.dim() == 2 else 0.2))
    return tc


def load(folder: Path) -> TranscoderSet:
    """circuit-tracer's own loading of a set from its config.yaml (local paths: from the set folder)."""
    config = yaml.safe_load((folder / "config.yaml").read_text())
    here = os.getcwd()
    os.chdir(folder)
    try:
        return load_transcoders(config, device=CPU, dtype=torch.float32, lazy_encoder=False, lazy_decoder=False)
    finally:
        os.chdir(here)


@torch.no_grad()
def make_fixtures(out: Path) -> list[str]:
    x = torch.randn(BATCH, D, generator=torch.Generator().manual_seed(1234))
    for i, (name, kw) in enumerate(FIXTURES.items()):
        folder = out / name
        if folder.exists():
            shutil.rmtree(folder)
        ts = TranscoderSet({l: build(**kw, layer=l, seed=10 * i + l) for l in range(LAYERS)}, scan=f"fixture/{name}",
                           **HOOKS)
        ts.to_safetensors(str(folder))
        config = {"model_name": "HuggingFaceTB/SmolLM2-135M", "model_kind": "transcoder_set", **HOOKS,
                  "scan": f"fixture/{name}", "transcoders": [f"layer_{l}.safetensors" for l in range(LAYERS)]}
        (folder / "config.yaml").write_text(yaml.safe_dump(config, sort_keys=False))
        loaded = load(folder)
        expected = {"x": x}
        for l, tc in enumerate(loaded):
            expected[f"features_{l}"] = tc.encode(x).contiguous()
            expected[f"out_{l}"] = tc(x).contiguous()
        save_file(expected, str(folder / "expected.safetensors"))
    (out / "README.md").write_text(
        f"Layer files written by circuit-tracer {circuit_tracer.__version__} itself (`TranscoderSet.to_safetensors`,\n"
        "`benchmarks/make_circuit_tracer_fixtures.py`, run in the peers' venv). `config.yaml` is NOT written by\n"
        "circuit-tracer (it writes none): the script writes the fields its `load_transcoders` reads, and\n"
        "`expected.safetensors` holds what the set loaded by `load_transcoders` from that file computes\n"
        "(`features_<i>`, `out_<i>` on inputs `x`). Checked by `tests/lm/test_circuit_tracer_format.py`.\n")
    return list(FIXTURES)


def random_coder(seed: int, **kw: Any) -> Coder:
    cfg = {"d_in": D, "n_latents": N, "kind": "transcoder", "activation": "relu", "k": 4, **kw}
    coder = Coder(CoderConfig(**cfg), generator=torch.Generator().manual_seed(seed))
    g = torch.Generator().manual_seed(seed + 1)
    with torch.no_grad():
        for name, p in coder.named_parameters():
            p.add_(0.2 * torch.randn(p.shape, generator=g)) if name != "log_threshold" else \
                p.copy_((torch.rand(p.shape, generator=g) * 0.5 + 0.05).log())
        coder.batchtopk_threshold.fill_(0.3)
    return coder.eval()


EXPORTS: dict[str, dict[str, Any]] = {
    "relu transcoder": {}, "relu skip transcoder": {"skip": True}, "jumprelu transcoder": {"activation": "jumprelu"},
    "jumprelu skip transcoder": {"activation": "jumprelu", "skip": True},
    "batchtopk transcoder": {"activation": "batchtopk"}, "relu SAE": {"kind": "sae"},
    "topk transcoder": {"activation": "topk"}, "relu transcoder 16 -> 12": {"d_out": 12},
}


@torch.no_grad()
def check_exports() -> bool:
    print(f"\nmechfaith sets loaded by circuit-tracer {circuit_tracer.__version__} (load_transcoders(config.yaml)):")
    ok = True
    x = torch.randn(64, D, generator=torch.Generator().manual_seed(5))
    with tempfile.TemporaryDirectory() as tmp:
        for i, (kind, kw) in enumerate(EXPORTS.items()):
            coders, folder = {l: random_coder(10 * i + l, **kw) for l in range(LAYERS)}, Path(tmp) / f"e{i}"
            try:
                export_circuit_tracer_set(coders, folder, model_name="gpt2")
            except MechfaithError as exc:
                fine = (kw.get("activation") == "topk" or "d_out" in kw or "kind" in kw) and not folder.exists()
                ok &= fine
                print(f"  {kind:26s} refused{'' if fine else ' (UNEXPECTED)'}: {exc}")
                continue
            loaded = load(folder)
            d_f = max((tc.encode(x) - coders[l].encode(x)).abs().max().item() for l, tc in enumerate(loaded))
            d_o = max((tc(x) - coders[l](x)).abs().max().item() for l, tc in enumerate(loaded))
            ok &= max(d_f, d_o) < 1e-5
            print(f"  {kind:26s} max |diff| features {d_f:.1e}, outputs {d_o:.1e}")
    return ok


@torch.no_grad()
def check_imports(out: Path, names: list[str]) -> bool:
    print("\nfixtures read by mechfaith (read_circuit_tracer_set) against circuit-tracer's outputs:")
    ok = True
    for name in names:
        s = read_circuit_tracer_set(out / name)
        e = load_file(str(out / name / "expected.safetensors"))
        d_f = max((c.coder.encode(e["x"]) - e[f"features_{l}"]).abs().max().item() for l, c in s.coders.items())
        d_o = max((c.coder(e["x"]) - e[f"out_{l}"]).abs().max().item() for l, c in s.coders.items())
        ok &= max(d_f, d_o) < 1e-5
        print(f"  {name:16s} layers {sorted(s.coders)} max |diff| features {d_f:.1e}, outputs {d_o:.1e}")
    return ok


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--out", type=Path, default=ROOT / "tests" / "fixtures" / "circuit_tracer")
    args = p.parse_args()
    torch.set_num_threads(1)
    names = make_fixtures(args.out)
    print(f"wrote {len(names)} fixtures under {args.out} (circuit-tracer {circuit_tracer.__version__})")
    ok = check_exports() & check_imports(args.out, names)
    print("\nall as expected" if ok else "\nSOME CHECKS FAILED")
    return 0 if ok else 1


if __name__ == "__main__":
    sys.exit(main())
