"""A circuit-tracer set (:mod:`mechfaith.lm.circuit_tracer`) as a mechfaith set manifest and coders,
for ``mechfaith convert`` (:func:`circuit_tracer_refs`)."""

from __future__ import annotations

from pathlib import Path

from mechfaith.lm.circuit_tracer import read_circuit_tracer_set
from mechfaith.lm.coder_files import CoderRef
from mechfaith.lm.layer_set import SetResult
from mechfaith.lm.sparsify_run import imported_run

CIRCUIT_TRACER_SET = "circuit-tracer set"  # the manifest's ``activations``: where the coders came from


def circuit_tracer_refs(folder: str | Path) -> tuple[SetResult, dict[int, CoderRef]]:
    """The set in ``folder`` as a manifest (every layer "imported") and each layer's coder."""
    folder = Path(folder)
    s = read_circuit_tracer_set(folder)
    model = s.model_name or ""
    refs = {l: CoderRef(c.coder, s.model_name, l, c.input_site, c.output_site, None, folder)
            for l, c in s.coders.items()}
    first = s.coders[0]
    files = {l: str(c.source.get("file", "")) for l, c in s.coders.items()}
    runs = [imported_run(f"{CIRCUIT_TRACER_SET} {folder}", model, l, c.input_site or "", c.output_site or "",
                         c.coder.cfg, files[l]) for l, c in s.coders.items()]
    manifest = SetResult(model=model, layers=sorted(s.coders), input_site=first.input_site or "",
                         output_site=first.output_site or "", coders={str(l): f for l, f in files.items()},
                         activations=CIRCUIT_TRACER_SET, runs=runs, train_seconds=0.0, total_seconds=0.0)
    return manifest, refs
