"""The LM faithfulness report on a tiny random Llama: held-out tokens, BOS vs other, a planted
passage found by the datapoint detector in a hand-built transcoder, off-distribution sets; and the
token helpers (plant_repeats, context_keys, shuffle_tokens)."""

import json
import random

import pytest
import torch

pytest.importorskip("transformers")

from mechfaith.coders import CoderConfig, SparseCoder  # noqa: E402
from mechfaith.coders.files import save_coder  # noqa: E402
from mechfaith.configs import config_to_dict  # noqa: E402
from mechfaith.errors import ConfigError, InputError  # noqa: E402
from mechfaith.faithfulness.report import FaithfulnessConfig  # noqa: E402
from mechfaith.lm.config import LMConfig  # noqa: E402
from mechfaith.lm.corpus import CorpusConfig, eval_contexts  # noqa: E402
from mechfaith.lm.faithfulness import (  # noqa: E402
    LMFaithfulnessConfig,
    LMFaithfulnessResult,
    collect_inputs,
    context_keys,
    lm_faithfulness,
    plant_repeats,
    shuffle_tokens,
    tokenize_text,
)
from mechfaith.lm.model_cache import get_model  # noqa: E402

torch.set_num_threads(1)
WORDS = "the king queen lord love death night day sword crown heart blood".split()
PASSAGE = "Four score and seven years ago our fathers brought forth on this continent a new nation"


def test_plant_repeats_keys_and_shuffle():
    ctx = torch.arange(60).reshape(6, 10)
    ctx[:, 0] = 0
    out, planted = plant_repeats(ctx, [91, 92, 93], 0.5, seed=1)
    assert int(planted.sum()) == 3
    assert (out[planted][:, 1:4] == torch.tensor([91, 92, 93])).all()
    assert (out[planted][:, 4:] == ctx[planted][:, 4:]).all() and (out[~planted] == ctx[~planted]).all()
    assert (out[:, 0] == 0).all()
    long, _ = plant_repeats(ctx, list(range(100, 130)), 1.0)
    assert (long[:, 1:] == torch.arange(100, 109)).all()  # cut to the context length
    keys = context_keys(out, window=3)
    rows = torch.nonzero(planted).flatten()
    assert (keys[rows[0], :4] == keys[rows[1], :4]).all()  # identical prefix -> identical keys
    assert keys[rows[0], 6] != keys[rows[1], 6]  # different tokens in the last 3
    # the key depends only on the last `window` tokens
    a = torch.tensor([[0, 5, 1, 2, 3]])
    b = torch.tensor([[0, 7, 1, 2, 3]])
    assert context_keys(a, 3)[0, 4] == context_keys(b, 3)[0, 4] and context_keys(a, 4)[0, 4] != context_keys(b, 4)[0, 4]
    sh = shuffle_tokens(ctx, seed=0)
    assert (sh[:, 0] == ctx[:, 0]).all()
    assert (sh.sort(1).values == ctx.sort(1).values).all() and not torch.equal(sh, ctx)
    with pytest.raises(ConfigError):
        plant_repeats(ctx, [1], 1.5)
    with pytest.raises(InputError):
        plant_repeats(ctx, [], 0.5)


@pytest.fixture(scope="module")
def setup(tmp_path_factory):
    root = tmp_path_factory.mktemp("lmfaith")
    texts = root / "texts"
    texts.mkdir()
    rng = random.Random(1)
    for i in range(4):
        (texts / f"play{i}.txt").write_text(" ".join(rng.choice(WORDS) for _ in range(1500)))
    other = root / "other"
    other.mkdir()
    (other / "numbers.txt").write_text(" ".join(str(rng.randint(0, 999)) for _ in range(800)))
    (root / "passage.txt").write_text(PASSAGE)
    cfg = LMConfig(model="random-llama", layer=1)
    corpus = CorpusConfig(source=str(texts), context_length=24, val_fraction=0.25)
    lm = get_model(cfg)
    return root, cfg, corpus, lm


def hand_built_coder(lm, corpus, n_contexts, rate, seed):
    """Ordinary random-direction features plus one datapoint feature that fires only on the planted
    passage's token at the position where it is most separable, and writes that token's MLP output."""
    adapter = lm.adapter
    ctx, _ = eval_contexts(lm, corpus, n_contexts)
    planted_ctx, planted = plant_repeats(ctx, tokenize_text(lm, PASSAGE), rate, seed=seed)
    x, y, pos = collect_inputs(adapter, planted_ctx, 1, "mlp_in", "mlp_out")
    x3 = x.reshape(ctx.shape[0], ctx.shape[1], -1)
    rest = x3[~planted].reshape(-1, x.shape[1])
    best = None
    for t in range(2, ctx.shape[1]):
        xs = x3[planted][0, t]
        u = xs / xs.norm()
        gap = float(xs.norm() - (rest @ u).max())
        if best is None or gap > best[0]:
            best = (gap, t, xs)
    gap, t, x_star = best
    assert gap > 0
    d = adapter.d_model
    g = torch.Generator().manual_seed(0)
    n_lat = 40
    coder = SparseCoder(CoderConfig(d_in=d, n_latents=n_lat, d_out=d), generator=g).eval()
    ref = adapter.mlp_function(1, "mlp_in", "mlp_out")
    with torch.no_grad():
        coder.W_enc.copy_(torch.nn.functional.normalize(torch.randn(d, n_lat, generator=g), dim=0))
        coder.b_enc.zero_()
        coder.W_dec.copy_(0.2 * torch.randn(n_lat, d, generator=g))
        lam = 20.0 / float(x_star.norm())
        u = x_star / x_star.norm()
        coder.W_enc[:, 39] = lam * u
        coder.b_enc[39] = -lam * (float(x_star.norm()) - gap / 2)
        f_star = lam * gap / 2
        coder.W_dec[39] = ref(x_star.unsqueeze(0))[0] / f_star
    return coder, t


def test_lm_report_finds_the_planted_datapoint_feature(setup):
    root, cfg, corpus, lm = setup
    n_ctx, rate = 40, 0.1
    coder, t = hand_built_coder(lm, corpus, n_ctx, rate, seed=0)
    folder = root / "run" / "coder"
    save_coder(coder, folder, training={"model": "random-llama", "layer": 1, "input_site": "mlp_in",
                                        "output_site": "mlp_out", "corpus": config_to_dict(corpus)})
    fcfg = FaithfulnessConfig(n_probes=2, spectra_inputs=3, noise_scales=[0.3], seed=0)
    lcfg = LMFaithfulnessConfig(eval_contexts=n_ctx, passage=str(root / "passage.txt"), passage_rate=rate,
                                offdist_source=str(root / "other"), offdist_contexts=8)
    rep = lm_faithfulness(folder, cfg, None, fcfg, lcfg)
    path = root / "run" / "faithfulness" / "faithfulness.json"
    assert rep.path == str(path)
    on_disk = json.loads(path.read_text())
    assert on_disk == rep.to_json() and rep.lm.layer == 1 and rep.measures["jacobian"] == on_disk["jacobian"]
    assert LMFaithfulnessResult.from_json(on_disk, rep.path) == rep
    assert on_disk["lm"]["layer"] == 1 and on_disk["lm"]["reference_check_rel_diff"] < 1e-5
    assert on_disk["lm"]["eval_tokens"] == n_ctx * 24
    assert on_disk["lm"]["detector"]["planted_contexts"] == 4
    # BOS vs other positions
    jac = on_disk["jacobian"]
    assert jac["bos"]["n_inputs"] == n_ctx and jac["other"]["n_inputs"] == n_ctx * 23
    assert jac["all"]["rel_error"] > 0
    # the planted datapoint feature is flagged, and nothing else
    dp = on_disk["datapoints"]
    assert [f["index"] for f in dp["flagged"]] == [39], dp["candidates"]
    assert dp["flagged"][0]["mass_share"] > 0.99 and dp["flagged"][0]["top_share"] == 1.0
    # off-distribution sets
    sets = on_disk["offdist"]["sets"]
    assert set(sets) == {"on_distribution", "shuffled", "other_text", "noise_0.3"}
    assert sets["shuffled"]["n"] == 8 * 23 and sets["other_text"]["n"] > 0
    assert on_disk["spectra"]["n_inputs"] == 3
    assert len(on_disk["spectra"]["reference"]["mean_normalized"]) == 32
    # without a planted passage the detector sample has no repeats of it: nothing flagged
    lcfg2 = LMFaithfulnessConfig(eval_contexts=n_ctx, passage="none")
    rep2 = lm_faithfulness(folder, cfg, None, fcfg, lcfg2, out=root / "plain")
    assert rep2.measures["datapoints"]["n_flagged"] == 0 and "other_text" not in rep2.measures["offdist"]["sets"]
    assert (root / "plain" / "faithfulness.json").is_file()


def test_lm_report_rejects_a_coder_of_the_wrong_width(setup):
    root, cfg, corpus, lm = setup
    coder = SparseCoder(CoderConfig(d_in=8, n_latents=4, d_out=8))
    save_coder(coder, root / "bad", training={"model": "random-llama", "layer": 1, "corpus": config_to_dict(corpus)})
    with pytest.raises(InputError, match="d_model"):
        lm_faithfulness(root / "bad", cfg, None, FaithfulnessConfig(n_probes=1, spectra_inputs=0),
                        LMFaithfulnessConfig(eval_contexts=4))
