"""Data-parallel training: 2 gloo processes on CPU train the same weights as 1 process."""

from __future__ import annotations

import json
import os
import socket
from pathlib import Path

import pytest
import torch
import torch.multiprocessing as mp
from safetensors.torch import load_file, save_file

from mechfaith.coders import CoderConfig, build_coder
from mechfaith.coders.clt import CrossLayerTranscoder
from mechfaith.coders.clt_config import CLTConfig
from mechfaith.errors import InputError
from mechfaith.training import TrainConfig, Trainer
from mechfaith.training import distributed as ddp
from mechfaith.training.clt_trainer import CLTTrainer

torch.set_num_threads(1)

B, D, N = 32, 8, 16  # global batch, width, latents


def _batches(n: int, seed: int = 0) -> list[tuple[torch.Tensor, torch.Tensor]]:
    g = torch.Generator().manual_seed(seed)
    w = torch.randn(D, D, generator=g) / D ** 0.5
    out = []
    for _ in range(n):
        x = torch.randn(B, D, generator=g).relu()
        out.append((x, torch.tanh(x @ w)))
    return out


CASES = {
    # ReLU SAE, L1, unit decoder rows, gradient clipping: targets are x (y dropped below)
    "relu_l1": (CoderConfig(d_in=D, n_latents=N, kind="sae", decoder_norm="unit"),
                dict(sparsity="l1", sparsity_coef=3e-2, grad_clip=0.5)),
    # TopK transcoder with a given target
    "topk": (CoderConfig(d_in=D, n_latents=N, activation="topk", k=3),
             dict(sparsity="none")),
    # ReLU transcoder with Jacobian matching (2 probes a row): the ranks draw the global batch's probes
    "jm": (CoderConfig(d_in=D, n_latents=N, activation="relu"),
           dict(sparsity="l1", sparsity_coef=1e-2, jacobian_coef=0.5, n_probes=2)),
}
_REF_W = torch.randn(D, D, generator=torch.Generator().manual_seed(9)) / D ** 0.5


def _reference(case: str):
    """The Jacobian-matching case's reference function (None for the others)."""
    return (lambda x: torch.tanh(x @ _REF_W.to(x.dtype))) if case == "jm" else None


def _cfg(extra: dict, n_steps: int, **kw) -> TrainConfig:
    return TrainConfig(n_steps=n_steps, batch_size=B, lr=1e-2, lr_warmup_steps=2, lr_decay="linear",
                       lr_decay_frac=0.5, log_every=2, checkpoint_every=0, **extra, **kw)


def _stream(case: str, n: int) -> list[tuple[torch.Tensor, torch.Tensor | None]]:
    data = _batches(n)
    return [(x, None) for x, _ in data] if case == "relu_l1" else data


def _worker(rank: int, world: int, port: int, folder: str) -> None:
    os.environ.update(RANK=str(rank), WORLD_SIZE=str(world), LOCAL_RANK=str(rank),
                      MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port))
    torch.set_num_threads(1)
    ctx = ddp.init_distributed(timeout_s=120)
    assert ctx.backend == "gloo" and ctx.world_size == world and ctx.rank == rank
    root = Path(folder)
    try:
        for case, (ccfg, extra) in CASES.items():
            # different initial weights per rank: attach() must broadcast rank 0's
            coder = build_coder(ccfg, seed=100 + rank)
            trainer = ddp.attach(Trainer(coder, _cfg(extra, 5), _reference(case), log_path=root / case / "log.jsonl",
                                         progress=False), ctx)
            res = ddp.fit(trainer, _stream(case, 5), ctx)
            assert res.ok and res.tokens_seen == 5 * B
            save_file({k: v.contiguous() for k, v in coder.state_dict().items()},
                      str(root / case / f"rank{rank}.safetensors"))
        # interrupted and resumed: 3 steps, a checkpoint, then 3 more from it with fresh weights
        ccfg, extra = CASES["relu_l1"]
        ck = root / "resume" / "ckpt"
        t1 = ddp.attach(Trainer(build_coder(ccfg, seed=7 + rank), _cfg(extra, 6),
                                checkpoint_dir=ck, progress=False), ctx)
        r1 = ddp.fit(t1, _stream("relu_l1", 3), ctx)  # the stream ends after 3 steps
        assert r1.stream_exhausted and t1.step_count == 3
        t2 = ddp.attach(Trainer(build_coder(ccfg, seed=50 + rank), _cfg(extra, 6),
                                checkpoint_dir=ck, progress=False), ctx)
        r2 = ddp.fit(t2, _stream("relu_l1", 6), ctx, resume="auto")
        assert r2.ok and t2.step_count == 6
        save_file({k: v.contiguous() for k, v in t2.coder.state_dict().items()},
                  str(root / "resume" / f"rank{rank}.safetensors"))
        # a cross-layer transcoder: layer-major batches [L, B, d] sliced along their rows (dim 1)
        clt = _clt(seed=300 + rank)
        tc = ddp.attach(CLTTrainer(clt, _cfg(dict(sparsity="l1", sparsity_coef=1e-2), 5), progress=False), ctx)
        rc = ddp.fit(tc, _clt_batches(5), ctx, row_dim=1)
        assert rc.ok and rc.tokens_seen == 5 * B
        save_file({k: v.contiguous() for k, v in clt.state_dict().items()}, str(root / "clt" / f"rank{rank}.safetensors"))
    finally:
        ddp.destroy(ctx)


def _clt(seed: int) -> CrossLayerTranscoder:
    cfg = CLTConfig(n_layers=3, d_in=D, n_latents=N, activation="relu", skip=True)
    return CrossLayerTranscoder(cfg, generator=torch.Generator().manual_seed(seed))


def _clt_batches(n: int) -> list[tuple[torch.Tensor, torch.Tensor]]:
    g = torch.Generator().manual_seed(4)
    w = torch.randn(3, D, D, generator=g) / D ** 0.5
    out = []
    for _ in range(n):
        x = torch.randn(3, B, D, generator=g)
        out.append((x, torch.tanh(torch.bmm(x, w))))
    return out


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _single(case: str, n_steps: int) -> dict[str, torch.Tensor]:
    ccfg, extra = CASES[case]
    coder = build_coder(ccfg, seed=100 if n_steps == 5 else 7)
    Trainer(coder, _cfg(extra, n_steps), _reference(case), progress=False).fit(_stream(case, n_steps))
    return coder.state_dict()


def test_two_gloo_processes_train_the_same_weights_as_one(tmp_path: Path):
    for case in [*CASES, "resume", "clt"]:
        (tmp_path / case).mkdir()
    mp.spawn(_worker, args=(2, _free_port(), str(tmp_path)), nprocs=2, join=True)
    for case, n_steps in (("relu_l1", 5), ("topk", 5), ("jm", 5), ("resume", 6)):
        ref = _single("relu_l1" if case == "resume" else case, n_steps)
        w0 = load_file(str(tmp_path / case / "rank0.safetensors"))
        w1 = load_file(str(tmp_path / case / "rank1.safetensors"))
        assert set(w0) == set(ref)
        for k in ref:
            assert torch.equal(w0[k], w1[k]), f"{case}: ranks disagree on {k}"
            torch.testing.assert_close(w0[k], ref[k], atol=2e-5, rtol=1e-4, msg=f"{case}: {k}")
        moved = any(not torch.allclose(ref[k], build_coder(CASES["relu_l1" if case == "resume" else case][0],
                                                            seed=100).state_dict()[k]) for k in ref)
        assert moved
    ref_clt = _clt(seed=300)
    CLTTrainer(ref_clt, _cfg(dict(sparsity="l1", sparsity_coef=1e-2), 5), progress=False).fit(_clt_batches(5))
    c0 = load_file(str(tmp_path / "clt" / "rank0.safetensors"))
    c1 = load_file(str(tmp_path / "clt" / "rank1.safetensors"))
    for k, v in ref_clt.state_dict().items():
        assert torch.equal(c0[k], c1[k]), f"clt: ranks disagree on {k}"
        torch.testing.assert_close(c0[k], v, atol=2e-5, rtol=1e-4, msg=f"clt: {k}")
        assert not torch.equal(v, _clt(seed=300).state_dict()[k]) or k == "b_enc"
    # rank 0 alone writes the log; its tokens count the global batch
    lines = [json.loads(s) for s in (tmp_path / "relu_l1" / "log.jsonl").read_text().splitlines()]
    assert [r["step"] for r in lines] == [1, 2, 4, 5]
    assert lines[-1]["tokens"] == 5 * B
    assert (tmp_path / "resume" / "ckpt" / "trainer_state.json").is_file()


def test_sharded_stream_slices_the_global_batch_and_keeps_its_state():
    data = _batches(2)
    parts = [ddp.ShardedStream(list(data), r, 4) for r in range(4)]
    got = [p.next_batch() for p in parts]
    torch.testing.assert_close(torch.cat([x for x, _ in got]), data[0][0])
    torch.testing.assert_close(torch.cat([y for _, y in got]), data[0][1])
    assert parts[0].state_dict() == {"kind": "IterableStream", "batches": 1}
    with pytest.raises(InputError, match="divisible"):
        ddp.ShardedStream(list(data), 0, 3).next_batch()
    layer_major = _clt_batches(1)
    halves = [ddp.ShardedStream(list(layer_major), r, 2, row_dim=1).next_batch() for r in range(2)]
    torch.testing.assert_close(torch.cat([x for x, _ in halves], dim=1), layer_major[0][0])


def test_rank_slices_cover_every_item_once():
    for n, w in ((10, 3), (4, 4), (7, 2)):
        idx = [i for r in range(w) for i in range(n)[ddp.rank_slice(n, r, w)]]
        assert idx == list(range(n))


def test_single_process_context_without_torchrun(monkeypatch):
    for name in ("RANK", "WORLD_SIZE", "LOCAL_RANK"):
        monkeypatch.delenv(name, raising=False)
    ctx = ddp.init_distributed(device="cpu")
    assert not ctx.distributed and ctx.is_main and ctx.backend is None
    trainer = Trainer(build_coder(CASES["topk"][0], seed=0), _cfg({"sparsity": "none"}, 2), progress=False)
    assert ddp.attach(trainer, ctx).sync is None
    assert ddp.fit(trainer, _batches(2), ctx).ok


def test_collection_split_by_rank_reads_as_one_cache(tmp_path: Path):
    pytest.importorskip("transformers")
    from mechfaith.lm.activation_cache import ActivationCache, write_activation_cache
    from mechfaith.lm.activations import ActivationConfig
    from mechfaith.lm.models import random_model

    lm = random_model("llama", n_layers=2, seed=2)
    g = torch.Generator().manual_seed(0)
    contexts = torch.randint(2, 100, (7, 6), generator=g)
    cfg = ActivationConfig(layers=[1], buffer_tokens=8, shard_tokens=10, batch_size=4)
    for rank in range(2):  # what each of 2 ranks does, one after the other
        ctx = ddp.DistContext(rank=rank, world_size=2)
        s = ddp.rank_slice(len(contexts), rank, 2)
        write_activation_cache(lm.model, contexts[s], cfg, ddp.part_folder(tmp_path / "c", rank), progress=False)
        assert ctx.rank == rank
    ddp.merge_activation_parts(tmp_path / "c", 2)
    whole = write_activation_cache(lm.model, contexts, cfg, tmp_path / "whole", progress=False)
    merged, ref = ActivationCache(tmp_path / "c"), ActivationCache(whole)
    assert merged.n_tokens == ref.n_tokens == 7 * 5
    assert merged.index["n_contexts"] == 7
    xm, ym = merged.load(1)
    xr, yr = ref.load(1)
    order_m, order_r = torch.argsort(xm[:, 0]), torch.argsort(xr[:, 0])  # same rows, other order
    torch.testing.assert_close(xm[order_m], xr[order_r], atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(ym[order_m], yr[order_r], atol=1e-5, rtol=1e-5)
    merged.verify()
