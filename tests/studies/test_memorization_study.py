"""The memorization experiment on a tiny random Llama: nested planting of the passage, the
memorization metric on a hand-built passage feature, the spliced CE against the fidelity
evaluator, the whole run (cells, resume, JSON, findings), the HTML page in Chromium and the CLI."""

import json
import random

import pytest
import torch

pytest.importorskip("transformers")

from mechfaith.coders import CoderConfig, SparseCoder  # noqa: E402
from mechfaith.errors import ConfigError  # noqa: E402
from mechfaith.lm.config import LMConfig  # noqa: E402
from mechfaith.lm.corpus import (  # noqa: E402
    CorpusConfig,  # noqa: E402
    eval_contexts,
    get_corpus,
)
from mechfaith.lm.faithfulness import tokenize_text  # noqa: E402
from mechfaith.lm.fidelity import FidelityConfig, evaluate_fidelity  # noqa: E402
from mechfaith.lm.model_cache import get_model  # noqa: E402
from mechfaith.reports.experiment_report import write_experiment_html  # noqa: E402
from mechfaith.studies import memorization as exp_mod  # noqa: E402
from mechfaith.studies.memorization import CellResult, ExperimentConfig, ExperimentResult, run_experiment  # noqa: E402
from mechfaith.studies.memorization_data import build_experiment_data  # noqa: E402
from mechfaith.studies.memorization_findings import TABLE_METRICS, findings, summarize  # noqa: E402
from mechfaith.studies.memorization_metrics import passage_features, spliced_ce  # noqa: E402
from tests.browser import open_page, require_browser  # noqa: E402

torch.set_num_threads(1)
WORDS = "the king queen lord love death night day sword crown heart blood".split()
PASSAGE = "Four score and seven years ago our fathers brought forth"


@pytest.fixture(scope="module")
def setup(tmp_path_factory):
    root = tmp_path_factory.mktemp("lmexp")
    texts = root / "texts"
    texts.mkdir()
    rng = random.Random(2)
    for i in range(4):
        (texts / f"play{i}.txt").write_text(" ".join(rng.choice(WORDS) for _ in range(1200)))
    (root / "passage.txt").write_text(PASSAGE)
    corpus = CorpusConfig(source=str(texts), context_length=20, val_fraction=0.25)
    lm = get_model(LMConfig(model="random-llama", layer=1))
    return root, corpus, lm


def _data(lm, corpus, max_rate=0.2, n_train=30):
    c = get_corpus(lm, corpus)
    held, _ = eval_contexts(lm, corpus, 12)
    ids = tokenize_text(lm, PASSAGE)
    return build_experiment_data(lm.adapter, c.train[:n_train], held, ids, layer=1, input_site="mlp_in",
                                 output_site="mlp_out", max_rate=max_rate, eval_contexts=8,
                                 passage_eval_contexts=2, detector_contexts=12, detector_rate=0.5,
                                 batch_contexts=8), ids


def test_planting_is_nested_and_the_passage_rows_repeat(setup):
    _, corpus, lm = setup
    data, ids = _data(lm, corpus)
    m = min(len(ids), 19)
    n, per, d = data.x_train.shape
    assert per == 19 and data.x_planted.shape[0] == 6 and data.x_passage.shape == (m, d)
    x0, y0 = data.training_rows(0.0)
    assert torch.equal(x0, data.x_train.reshape(-1, d)) and torch.equal(y0, data.y_train.reshape(-1, d))
    sets = {}
    for rate in (0.1, 0.2):
        x, y = data.training_rows(rate)
        x3 = x.reshape(n, per, d)
        changed = {i for i in range(n) if not torch.equal(x3[i], data.x_train[i])}
        assert len(changed) == round(rate * n)
        sets[rate] = changed
        for i in changed:  # a planted context's passage rows are the passage's own rows (causal model)
            assert torch.allclose(x3[i, :m], data.x_passage, atol=1e-5)
    assert sets[0.1] < sets[0.2]  # nested
    with pytest.raises(ConfigError):
        data.training_rows(0.5)  # more than was collected
    # the detector sample has the passage planted in half of its contexts
    assert data.detector_planted == 6 and data.detector_keys.shape == (data.x_detector.shape[0],)


def test_memorization_counts_only_passage_exclusive_features():
    g = torch.Generator().manual_seed(0)
    d, n_lat = 6, 5
    x_h = torch.randn(200, d, generator=g)  # held-out rows: components within about +-3.5
    x_p = torch.zeros(2, d)
    x_p[:, 0] = torch.tensor([10.0, 8.0])  # passage rows far out along e_0
    y_p = torch.randn(2, d, generator=g)
    coder = SparseCoder(CoderConfig(d_in=d, n_latents=n_lat, d_out=d, activation="relu"), generator=g).eval()
    with torch.no_grad():
        coder.W_enc.zero_()
        coder.b_enc.fill_(-1e3)  # latents 2..4 never fire
        coder.W_enc[0, 0], coder.b_enc[0] = 1.0, -6.0  # fires on the passage only: f = 4, 2
        coder.W_enc[1, 1], coder.b_enc[1] = 1.0, 0.0  # an ordinary feature: fires on held-out rows
        coder.W_enc[0, 1] = 1.0  # ... and on the passage too (x_0 = 10, 8)
        coder.W_dec.copy_(torch.randn(n_lat, d, generator=g))
    f_h = coder.forward_full(x_h).f.detach()
    res = passage_features(coder, x_p, y_p, f_h, exclusive_rate=1e-3)
    assert res["n_passage_features"] == 1 and res["passage_features"][0]["index"] == 0
    f0 = torch.tensor([4.0, 2.0])
    expected = ((f0[:, None] * coder.W_dec[0].detach()) * y_p).sum(1) / y_p.pow(2).sum(1)
    assert res["memorization"] == pytest.approx(float(expected.mean()), rel=1e-5)
    assert res["memorization_max"] == pytest.approx(float(expected.max()), rel=1e-5)
    # with a looser exclusivity the ordinary feature would count as well -> a different value
    loose = passage_features(coder, x_p, y_p, f_h, exclusive_rate=0.9)
    assert loose["n_passage_features"] == 2


def test_spliced_ce_matches_the_fidelity_evaluator(setup):
    _, corpus, lm = setup
    held, _ = eval_contexts(lm, corpus, 6)
    d = lm.adapter.d_model
    coder = SparseCoder(CoderConfig(d_in=d, n_latents=32, d_out=d, activation="topk", k=4, skip=True),
                        generator=torch.Generator().manual_seed(3)).eval()
    ours = spliced_ce(lm.adapter, coder, held, 1, "mlp_in", "mlp_out", batch_contexts=4)
    ref = evaluate_fidelity(lm.adapter, held, {1: coder}, "mlp_in", "mlp_out", FidelityConfig(batch_contexts=3))
    assert ours["clean"] == pytest.approx(ref.ce_clean, rel=1e-5)
    assert ours["spliced"] == pytest.approx(ref.ce_spliced, rel=1e-5)
    assert ours["kl"] == pytest.approx(ref.kl_spliced, rel=1e-4, abs=1e-7)
    assert ours["increase"] == pytest.approx(ref.ce_increase, rel=1e-4, abs=1e-7)
    cache: dict = {}
    again = spliced_ce(lm.adapter, coder, held, 1, "mlp_in", "mlp_out", batch_contexts=4, clean=cache)
    assert len(cache) == 2 and again["spliced"] == pytest.approx(ours["spliced"], rel=1e-6)
    part = spliced_ce(lm.adapter, coder, held, 1, "mlp_in", "mlp_out", positions=slice(2, 5), batch_contexts=4)
    assert part["clean"] != pytest.approx(ours["clean"], rel=1e-6)  # a different set of predictions


def tiny_config(root, **kw):
    base = dict(model="random-llama", layers=[1], rates=[0.0, 0.2], jacobian_coefs=[0.0, 0.5], ks=[4],
                seeds=[0, 1], n_latents=32, steps=12, batch_size=64, train_tokens=600,
                passages=[str(root / "passage.txt")], arms=["topk-skip"], other_site_arms=[], jacobian_at="all",
                jacobian_arms=[],
                eval_contexts=8, passage_eval_contexts=2,
                detector_contexts=8, jacobian_rows=64, eval_probes=2, batch_contexts=8)
    base.update(kw)
    return ExperimentConfig(**base)


@pytest.fixture(scope="module")
def experiment(setup):
    root, corpus, _ = setup
    out = root / "exp"
    rep = run_experiment(tiny_config(root), corpus, out, progress=False)
    return root, corpus, out, rep


def test_run_experiment_writes_every_cell_and_the_table(experiment):
    root, corpus, out, rep = experiment
    on_disk = json.loads((out / "experiment.json").read_text())
    assert len(on_disk["cells"]) == 8 and len(on_disk["table"]) == 4
    assert all(r["seeds"] == 2 for r in on_disk["table"])
    names = {c["name"] for c in on_disk["cells"]}
    assert "passage_L1_topk-skip_rate0.2_jac0.5_k4_seed1" in names
    for c in on_disk["cells"]:
        m = c["metrics"]
        assert 0 < m["l0"] <= 4 and m["fve"] < 1 and m["jacobian_rel"] > 0
        assert m["ce_clean"] > 0 and m["passage_ce_clean"] > 0 and m["memorization"] is not None
        assert c["planted_contexts"] == round(c["rate"] * on_disk["data"]["passage_L1"]["train_contexts"])
        assert (out / "cells" / c["name"] / "result.json").is_file()
        assert (out / "cells" / c["name"] / "coder").is_dir() == (c["seed"] == 0)
    # the clean CE is the same in every cell (one model, one set of held-out contexts)
    assert len({round(c["metrics"]["ce_clean"], 9) for c in on_disk["cells"]}) == 1
    # the table's means are the means over seeds of the cells
    row = next(r for r in on_disk["table"] if r["rate"] == 0.2 and r["jacobian_coef"] == 0.5)
    vals = [c["metrics"]["fve"] for c in on_disk["cells"] if c["rate"] == 0.2 and c["jacobian_coef"] == 0.5]
    assert row["fve"] == pytest.approx(sum(vals) / 2)
    assert on_disk["findings"] and all(isinstance(f, str) for f in on_disk["findings"])
    # the returned result is what the file holds
    assert isinstance(rep, ExperimentResult) and rep.to_json() == on_disk and rep.path == str(out / "experiment.json")
    for c in on_disk["cells"]:  # the new measurements are there, and the fit's parts add up
        m = c["metrics"]
        assert m["n_specific_features"] >= 0 and m["specific_ratio"] == 10.0
        assert m["passage_linear_share"] + m["passage_feature_share"] == pytest.approx(
            m["passage_linear_share"] + m["passage_feature_share"])
    again = CellResult.from_json(json.loads((out / "cells" / rep.cells[0].name / "result.json").read_text()))
    assert again == rep.cells[0]


def test_a_rerun_reuses_finished_cells(experiment, monkeypatch):
    root, corpus, out, rep = experiment

    def no_training(*a, **k):
        raise AssertionError("a finished cell was trained again")

    monkeypatch.setattr(exp_mod, "train_cell", no_training)
    again = run_experiment(tiny_config(root), corpus, out, progress=False)
    assert [c.metrics["fve"] for c in again.cells] == [c.metrics["fve"] for c in rep.cells]
    with pytest.raises(AssertionError, match="trained again"):  # changed settings: not reused
        run_experiment(tiny_config(root, steps=13), corpus, out, progress=False)


def test_findings_say_clear_only_beyond_the_seed_spread():
    cfg = ExperimentConfig(rates=[0.0, 0.05], jacobian_coefs=[0.0, 1.0], ks=[8], seeds=[0, 1])

    def cell(rate, coef, seed, mem):
        m = {k: 0.5 for k in TABLE_METRICS}
        m["memorization"] = mem
        return CellResult(name=f"c{rate}_{coef}_{seed}", passage="p", layer=3, arm="topk", rate=rate,
                          jacobian_coef=coef, k=8, seed=seed, train_seconds=0.0, train_metrics={"fve": 0.5},
                          planted_contexts=0, metrics=m, key={}, seconds=0.0)

    cells = [cell(0.0, 0.0, 0, 0.0), cell(0.0, 0.0, 1, 0.01), cell(0.05, 0.0, 0, 0.30), cell(0.05, 0.0, 1, 0.32),
             cell(0.0, 1.0, 0, 0.0), cell(0.0, 1.0, 1, 0.2), cell(0.05, 1.0, 0, 0.05), cell(0.05, 1.0, 1, 0.15)]
    text = findings(summarize(cells), cfg)
    assert any("plain: memorization by passage features rises clearly" in t for t in text)
    assert any("topk k=8, plain: dedicated datapoint features formed at 5%" in t for t in text)
    assert any("coef 1: memorization by passage features shows no clear change" in t for t in text)
    assert any("coef 1: no dedicated datapoint features formed" in t for t in text)
    assert any("Jacobian matching (coef 1) removes the dedicated datapoint features; it lowers memorization "
               "clearly" in t for t in text)
    # a difference far beyond the seeds' spread but below the smallest effect worth a word is no finding
    tiny = [cell(0.0, 0.0, 0, 0.0001), cell(0.0, 0.0, 1, 0.0001), cell(0.05, 0.0, 0, 0.0005),
            cell(0.05, 0.0, 1, 0.0005)]
    cfg1 = ExperimentConfig(rates=[0.0, 0.05], jacobian_coefs=[0.0], ks=[8], seeds=[0, 1])
    text1 = findings(summarize(tiny), cfg1)
    assert "memorization by passage features shows no clear change" in text1[0]
    assert not any("signature" in t for t in text1)  # the passage's fit did not change
    # the passage is fitted far better at the higher rate while its Jacobian error stays: the signature
    for c in tiny[2:]:
        c.metrics["passage_mse_ratio"] = 0.2 + 0.01 * c.seed
    text2 = findings(summarize(tiny), cfg1)
    assert "passage MSE / held-out MSE 0.5 -> 0.205" in text2[0] and "shows a clear fall" in text2[0]
    assert any("signature of unfaithfulness" in t and "spread over features" in t for t in text2)


def test_bad_experiment_settings_are_config_errors():
    for kw in ({"rates": [1.5]}, {"jacobian_coefs": [-1.0]}, {"ks": [0]}, {"seeds": []},
               {"ks": [64], "n_latents": 32}, {"steps": 0}, {"detector_rate": 0.0}):
        with pytest.raises(ConfigError):
            ExperimentConfig(**kw)


def test_report_page_opens_cleanly_in_chromium(experiment, tmp_path):
    require_browser()
    _, _, out, rep = experiment
    path = tmp_path / "report.html"
    write_experiment_html(rep.to_json(), path, "Tiny experiment")
    html = path.read_text()
    assert "http://" not in html and "https://" not in html  # self-contained
    seen = open_page(path, selectors=("img", "table", "li", "h2"), screenshot="experiment_report.png")
    seen.assert_clean()
    assert seen.counts["img"] == 8 and not seen.broken_images
    assert all(im.natural_width > 100 for im in seen.images)
    assert seen.counts["li"] == len(rep.findings) and seen.counts["table"] == 2
    assert "Tiny experiment" in seen.title and "memorization" in seen.text


def test_cli_experiment_quick_and_bad_argument(setup, tmp_path, capsys):
    from mechfaith.cli.main import main

    root, corpus, _ = setup
    out = tmp_path / "cli"
    args = ["faithfulness", "experiment", "--quick", "--quiet", "--out", str(out), "--model", "random-llama",
            "--layers", "1", "--n-latents", "32", "--ks", "4", "--steps", "6", "--batch-size", "64",
            "--train-tokens", "400", "--seeds", "0", "--passages", str(root / "passage.txt"),
            "--arms", "topk-skip,relu-tanh",
            "--eval-contexts", "6", "--detector-contexts", "6", "--jacobian-rows", "32",
            "--corpus-source", corpus.source, "--corpus-context-length", "20", "--corpus-val-fraction", "0.25"]
    assert main(args) == 0
    printed = capsys.readouterr().out
    assert "memorization" in printed and "report.html" in printed
    rep = json.loads((out / "experiment.json").read_text())
    assert rep["config"]["rates"] == [0.0, 0.05] and rep["config"]["steps"] == 6  # --quick, then flags
    assert len(rep["cells"]) == 5 and (out / "report.html").is_file()  # Jacobian matching: relu-tanh at 5%
    assert {c["arm"] for c in rep["cells"]} == {"topk-skip", "relu-tanh"}
    assert "10x feats" in printed and "relu-tanh" in printed
    for bad, word in ((["--rates", "2"], "rates"), (["--arms", "topk,sigmoid"], "sigmoid"),
                      (["--other-site-arms", "relu"], "relu"), (["--layers", "-3"], "layers"),
                      (["--tanh-coef", "0"], "tanh_coef"), (["--jumprelu-coef", "nan"], "jumprelu_coef"),
                      (["--specific-ratio", "0.5"], "specific_ratio"), (["--arms", "topk,topk"], "arms"),
                      (["--passages", "no/such/file.txt"], "no/such/file.txt")):
        code = main(["faithfulness", "experiment", "--out", str(tmp_path / "bad"), *bad])
        err = capsys.readouterr().err
        assert code == 2 and word in err and len(err.strip().splitlines()) == 1, (bad, err)
        assert not (tmp_path / "bad" / "experiment.json").exists()
