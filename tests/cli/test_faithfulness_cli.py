"""``mechfaith faithfulness report`` on a tiny random Llama transcoder: JSON + HTML written, config
precedence (defaults < file < flags), one-line errors."""

import argparse
import json
import random

import pytest
import torch

pytest.importorskip("transformers")
pytest.importorskip("mechfaith.cli.dataclass_args",
                    reason="mechfaith.cli.dataclass_args (the CLI helper's module) does not exist yet")

from mechfaith.cli import faithfulness as cli  # noqa: E402
from mechfaith.coders import CoderConfig, SparseCoder  # noqa: E402
from mechfaith.coders.files import save_coder  # noqa: E402
from mechfaith.configs import config_to_dict  # noqa: E402
from mechfaith.errors import ConfigError  # noqa: E402
from mechfaith.lm.corpus import CorpusConfig  # noqa: E402

torch.set_num_threads(1)
WORDS = "the king queen lord love death night day sword crown heart blood".split()


def parser():
    p = argparse.ArgumentParser(prog="mechfaith")
    cli.add_parser(p.add_subparsers(dest="command"))
    return p


@pytest.fixture(scope="module")
def run_folder(tmp_path_factory):
    root = tmp_path_factory.mktemp("fcli")
    texts = root / "texts"
    texts.mkdir()
    rng = random.Random(2)
    for i in range(4):
        (texts / f"play{i}.txt").write_text(" ".join(rng.choice(WORDS) for _ in range(1200)))
    coder = SparseCoder(CoderConfig(d_in=32, n_latents=64, d_out=32, activation="topk", k=4, skip=True),
                        generator=torch.Generator().manual_seed(0))
    corpus = CorpusConfig(source=str(texts), context_length=24, val_fraction=0.25)
    save_coder(coder, root / "run" / "coder", training={
        "model": "random-llama", "layer": 1, "input_site": "mlp_in", "output_site": "mlp_out",
        "corpus": config_to_dict(corpus)})
    return root


def test_config_precedence(tmp_path):
    cfg_file = tmp_path / "f.toml"
    cfg_file.write_text("[faithfulness]\nn_probes = 3\nnoise_scales = [0.5]\n[datapoints]\ntop_k = 7\n"
                        "[lm_faithfulness]\neval_contexts = 5\n")
    args = parser().parse_args(["faithfulness", "report", "x", "--config", str(cfg_file), "--n-probes", "4",
                                "--masking-max-firing-rate", "0.2"])
    fcfg, lcfg = cli.configs(args)
    assert fcfg.n_probes == 4 and fcfg.noise_scales == [0.5] and fcfg.datapoints.top_k == 7
    assert fcfg.masking.max_firing_rate == 0.2 and lcfg.eval_contexts == 5
    bad = tmp_path / "bad.toml"
    bad.write_text("[nonsense]\na = 1\n")
    with pytest.raises(ConfigError, match="unknown section"):
        cli.configs(parser().parse_args(["faithfulness", "report", "x", "--config", str(bad)]))


def test_report_command_writes_json_and_html(run_folder, capsys):
    out = run_folder / "out"
    args = parser().parse_args(["faithfulness", "report", str(run_folder / "run"), "--out", str(out), "--quiet",
                                "--eval-contexts", "8", "--n-probes", "2", "--spectra-inputs", "2",
                                "--noise-scales", "0.3", "--passage", "default", "--passage-rate", "0.25"])
    assert args.func(args) == 0
    rep = json.loads((out / "faithfulness.json").read_text())
    assert rep["lm"]["eval_tokens"] == 8 * 24 and rep["config"]["n_probes"] == 2
    assert rep["lm"]["detector"]["planted_contexts"] == 2
    assert set(rep["offdist"]["sets"]) == {"on_distribution", "shuffled", "noise_0.3"}
    page = (out / "report.html").read_text()
    assert "Faithfulness of a transcoder of random-llama layer 1" in page and page.count("<img") == 5
    printed = capsys.readouterr().out
    assert "Jacobian relative error" in printed and "wrote" in printed


def test_main_knows_the_command_when_it_exists():
    main_mod = pytest.importorskip("mechfaith.cli.main", reason="mechfaith.cli.main does not exist yet")
    if "faithfulness" not in main_mod.COMMAND_MODULES:
        pytest.skip("faithfulness is not yet listed in mechfaith.cli.main.COMMAND_MODULES")
    assert main_mod.main(["faithfulness", "report", "/nonexistent/coder", "--quiet"]) == 2
