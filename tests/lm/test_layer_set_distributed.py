"""A set shared by torchrun ranks (lm.distributed): the layer split; 2 gloo processes on CPU under
torchrun (tests/lm/set_ranks_worker.py) train bit for bit the coders 1 process trains (from the
command line, streamed from the model, and from a cache), resume per rank, and fail together (an
interrupted rank, a diverged layer) without hanging; ``python -m mechfaith``."""

from __future__ import annotations

import itertools
import json
import os
import random
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch

pytest.importorskip("transformers")

from mechfaith.cli.main import main  # noqa: E402
from mechfaith.coders.clt_files import load_clt  # noqa: E402
from mechfaith.coders.files import load_coder  # noqa: E402
from mechfaith.errors import ConfigError, PeerFailed, TrainingDiverged  # noqa: E402
from mechfaith.lm import model_cache  # noqa: E402
from mechfaith.lm.clt_train import train_clt_block  # noqa: E402
from mechfaith.lm.collect import collect  # noqa: E402
from mechfaith.lm.config import lm_train_config  # noqa: E402
from mechfaith.lm.corpus import CorpusConfig  # noqa: E402
from mechfaith.lm.distributed import join_ranks, share_costs, split_layers  # noqa: E402
from mechfaith.lm.layer_set import SetResult, train_set  # noqa: E402
from mechfaith.lm.models import random_model  # noqa: E402
from mechfaith.training import distributed as ddp  # noqa: E402
from tests.lm.set_ranks_worker import CFG, CODER, MODEL_KEY, N_LAYERS, TRAIN, corpus_config  # noqa: E402

torch.set_num_threads(1)

TIMEOUT_S = 300  # a hang fails the test instead of blocking CI


def _corpus(folder: Path) -> CorpusConfig:
    folder.mkdir(parents=True, exist_ok=True)
    rng = random.Random(1)
    words = "the king queen lord love death night day sword crown heart blood".split()
    for i in range(3):
        (folder / f"doc{i}.txt").write_text(" ".join(rng.choice(words) for _ in range(1200)))
    return corpus_config(",".join(str(p) for p in sorted(folder.glob("*.txt"))))


def _params(folder: Path) -> dict[str, torch.Tensor]:
    return dict(load_coder(folder).named_parameters())


def _assert_same_coders(ours: Path, theirs: Path, layers: list[int]) -> None:
    for layer in layers:
        a, b = _params(ours / "layers" / f"L{layer}" / "coder"), _params(theirs / "layers" / f"L{layer}" / "coder")
        assert set(a) == set(b)
        for name, p in b.items():
            assert torch.equal(a[name], p), (str(ours), layer, name)


def _assert_same_manifest(ours: Path, theirs: Path) -> None:
    a, b = (SetResult.from_json(json.loads((f / "set.json").read_text())) for f in (ours, theirs))
    assert (a.model, a.layers, a.coders, a.input_site, a.output_site) == \
        (b.model, b.layers, b.coders, b.input_site, b.output_site)
    for ra, rb in zip(a.runs, b.runs, strict=True):
        assert (ra.layer, ra.steps, ra.tokens, ra.status, ra.coder_config, ra.train_config) == \
            (rb.layer, rb.steps, rb.tokens, rb.status, rb.coder_config, rb.train_config)


# ---------------------------------------------------------------------------------------------- the split
def test_split_without_forward_cost_is_balanced_contiguous_chunks():
    for n, w in ((5, 2), (7, 3), (30, 4), (4, 4), (1, 1)):
        shares = split_layers(range(n), w)
        assert shares == [list(range(n))[ddp.rank_slice(n, r, w)] for r in range(w)], (n, w)


def test_split_is_the_cheapest_contiguous_one():
    rng = random.Random(0)
    for _ in range(150):
        n, w = rng.randint(2, 8), rng.randint(1, 4)
        layers, f, c = sorted(rng.sample(range(12), n)), rng.randint(0, 5), rng.randint(1, 6)
        shares = split_layers(layers, w, forward_cost=f, coder_cost=c)
        assert [l for s in shares for l in s] == layers and len(shares) == w

        def costs(parts):
            return [f * (p[-1] + 1) + c * len(p) for p in parts]

        best = min(max(costs([layers[a:b] for a, b in zip((0, *cuts), (*cuts, n))])) for cuts in
                   itertools.combinations(range(1, n), min(w, n) - 1))
        assert max(costs([s for s in shares if s])) == best, (layers, w, f, c, shares)
        assert all(shares) or n < w


def test_split_gives_early_ranks_more_layers_when_the_forward_pass_counts():
    shares = split_layers(range(30), 2, forward_cost=1, coder_cost=4)
    assert shares == [list(range(17)), list(range(17, 30))]  # costs 85 and 82 (15 + 15: 75 and 90)
    assert split_layers([1, 3], 4) == [[1], [3], [], []]  # more ranks than layers


def test_share_costs_and_a_single_process(monkeypatch):
    for name in ("RANK", "WORLD_SIZE", "LOCAL_RANK"):
        monkeypatch.delenv(name, raising=False)
    adapter = random_model("llama", n_layers=2).adapter
    tcfg = lm_train_config(jacobian_coef=0.0)
    forward, coder = share_costs(adapter, CODER, tcfg, streamed=True)
    assert forward == sum(p.numel() for p in adapter.block(0).parameters()) and coder > forward
    assert share_costs(adapter, CODER, tcfg, streamed=False)[0] == 0
    assert share_costs(adapter, CODER, lm_train_config(jacobian_coef=0.1), streamed=True)[1] == 2 * coder
    ranks = join_ranks("cpu")
    assert (ranks.rank, ranks.world_size, ranks.group) == (0, 1, None) and ranks.run(lambda: 7) == [7]
    with pytest.raises(KeyError):  # one process: the function's own exception, untouched
        ranks.run(lambda: {}["x"])


# ---------------------------------------------------------------------------------------------- 2 ranks
def _torchrun(root: Path, source: str) -> subprocess.CompletedProcess:
    """2 gloo ranks of tests/lm/set_ranks_worker.py under torchrun, killed (all of them) on a hang."""
    repo = Path(__file__).parents[2]
    env = {k: v for k, v in os.environ.items() if k not in ("RANK", "WORLD_SIZE", "LOCAL_RANK", "MASTER_PORT")}
    env.update(OMP_NUM_THREADS="1", PYTHONPATH=os.pathsep.join(filter(None, [str(repo / "src"),
                                                                              env.get("PYTHONPATH")])))
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", "2",
           "-m", "tests.lm.set_ranks_worker", str(root), source]
    proc = subprocess.Popen(cmd, cwd=repo, env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
                            start_new_session=True)
    try:
        out, err = proc.communicate(timeout=TIMEOUT_S)
    except subprocess.TimeoutExpired:
        os.killpg(proc.pid, signal.SIGKILL)  # torchrun and both ranks
        proc.communicate()
        pytest.fail(f"the 2 ranks did not finish within {TIMEOUT_S} s")
    return subprocess.CompletedProcess(cmd, proc.returncode, out, err)


def test_two_ranks_under_torchrun_train_exactly_the_set_one_process_trains(tmp_path, monkeypatch):
    monkeypatch.setitem(model_cache._MODELS, MODEL_KEY, random_model("llama", n_layers=N_LAYERS))
    corpus = _corpus(tmp_path / "texts")
    collect(CFG, corpus, tmp_path / "acts", layers=list(range(N_LAYERS)), progress=False)
    t0 = time.perf_counter()
    done = _torchrun(tmp_path, corpus.source)
    print(f"torchrun, 2 ranks, 5 sets: {time.perf_counter() - t0:.1f} s")
    assert done.returncode == 0, done.stderr[-4000:]
    r0, r1 = (json.loads((tmp_path / f"rank{r}.json").read_text()) for r in (0, 1))
    # the command line: both ranks succeed, rank 0 alone prints the summary
    assert r0["streamed"] == r1["streamed"] == {"exit": 0}
    assert done.stdout.count("wrote ") == 1 and "trained 3 coders of random-llama" in done.stdout
    tcfg = lm_train_config(**TRAIN)
    train_set(CFG, corpus, CODER, tcfg, tmp_path / "one_streamed", "all", progress=False)
    train_set(CFG, corpus, CODER, tcfg, tmp_path / "one_cached", "all", activations=tmp_path / "acts",
              progress=False)
    layers = list(range(N_LAYERS))
    for name, ref in (("streamed", "one_streamed"), ("cached", "one_cached"), ("resumed", "one_streamed")):
        if name != "streamed":
            assert r0[name].get("ok") and r1[name].get("ok"), (name, r0[name], r1[name])
            assert r0[name]["result"] == r1[name]["result"]  # every rank returns the same SetResult
        folder = tmp_path / ("stopped" if name == "resumed" else name)
        _assert_same_coders(folder, tmp_path / ref, layers)
        _assert_same_manifest(folder, tmp_path / ref)
    # rank 0 streamed layers 0-1 (its forward passes stopped after layer 1), rank 1 layer 2
    for layer, share in ((0, [0, 1]), (1, [0, 1]), (2, [2])):
        state = json.loads((tmp_path / "streamed" / "layers" / f"L{layer}" / "checkpoint" /
                            "trainer_state.json").read_text())
        assert state["stream"]["layers"] == share
    # an interrupted rank stops every rank; the set then resumed per rank (rank 0 done, rank 1 from step 4)
    assert r1["stopped"]["error"] == "KeyboardInterrupt"
    assert r0["stopped"]["error"] == PeerFailed.__name__
    assert "rank 1 of 2 failed: interrupted" in r0["stopped"]["message"]
    with pytest.raises(ConfigError, match="as many processes as trained it"):  # not by 1 process
        train_set(CFG, corpus, CODER, tcfg, tmp_path / "stopped", "all", resume=True, progress=False)
    # a diverged layer on rank 1: both ranks raise TrainingDiverged, no manifest, every train.json written
    assert r1["diverged"]["error"] == r0["diverged"]["error"] == TrainingDiverged.__name__
    assert "forced" in r1["diverged"]["message"] and "rank 1 of 2" in r0["diverged"]["message"]
    assert not (tmp_path / "diverged" / "set.json").exists()
    status = {l: json.loads((tmp_path / "diverged" / "layers" / f"L{l}" / "train.json").read_text())["status"]
              for l in layers}
    assert status == {0: "completed", 1: "completed", 2: "diverged"}
    # a CLT trained data-parallel by the 2 ranks equals one process's (rows split, gradients averaged)
    assert r0["clt"] == r1["clt"] and r0["clt"].get("ok"), r0["clt"]
    train_clt_block(CFG, corpus, CODER, tcfg, tmp_path / "clt_one", "all", progress=False)
    two, one = load_clt(tmp_path / "clt" / "clt"), load_clt(tmp_path / "clt_one" / "clt")
    for name, p in one.state_dict().items():
        torch.testing.assert_close(two.state_dict()[name], p, atol=2e-5, rtol=1e-4, msg=name)


def test_python_m_mechfaith_runs_the_command_line():
    repo = Path(__file__).parents[2]
    env = {**os.environ, "PYTHONPATH": os.pathsep.join(filter(None, [str(repo / "src"), os.environ.get("PYTHONPATH")]))}
    done = subprocess.run([sys.executable, "-m", "mechfaith", "--version"], env=env, capture_output=True, text=True,
                          timeout=120)
    assert done.returncode == 0 and done.stdout.startswith("mechfaith "), done.stderr


def test_lm_train_of_one_layer_is_refused_under_torchrun(monkeypatch, capsys):
    monkeypatch.setenv("WORLD_SIZE", "2")
    assert main(["lm", "train", "--model", "random-llama", "--out", "x"]) == 2
    assert "give --layers" in capsys.readouterr().err
