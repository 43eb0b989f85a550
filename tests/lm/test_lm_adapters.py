"""Adapters: hooks capture exactly what the model computes (checked against a manual forward)."""

import pytest
import torch
import torch.nn.functional as F

pytest.importorskip("transformers")

from mechfaith.errors import ConfigError  # noqa: E402
from mechfaith.lm.adapters import SITES, ModelAdapter, UnsupportedModelError, supported_families  # noqa: E402
from mechfaith.lm.models import random_model  # noqa: E402

torch.set_num_threads(1)
FAMILIES = ["gpt2", "llama", "bert"]


@pytest.fixture(scope="module", params=FAMILIES)
def lm(request):
    return random_model(request.param, seed=1)


def manual_forward(adapter: ModelAdapter, ids: torch.Tensor) -> dict:
    """An independent forward pass of the residual stream, block by block, reading only weights."""
    fam = adapter.family.name
    out = {}
    base = adapter.base
    if fam == "gpt2":
        pos = torch.arange(ids.shape[1])
        h = base.wte(ids) + base.wpe(pos)[None]
    elif fam == "llama":
        h = base.embed_tokens(ids)
    else:
        h = base.embeddings(input_ids=ids)
    seq = ids.shape[1]
    for layer in range(adapter.n_layers):
        blk = adapter.block(layer)
        out[(layer, "resid_pre")] = h
        if fam == "gpt2":
            a = blk.attn(blk.ln_1(h))[0]
            mid = h + a
            pre_norm_in = mid
            x = F.layer_norm(mid, (mid.shape[-1],), blk.ln_2.weight, blk.ln_2.bias, blk.ln_2.eps)
            u = x @ blk.mlp.c_fc.weight + blk.mlp.c_fc.bias
            g = 0.5 * u * (1 + torch.tanh((2 / torch.pi) ** 0.5 * (u + 0.044715 * u ** 3)))
            y = g @ blk.mlp.c_proj.weight + blk.mlp.c_proj.bias
            h_next = mid + y
        elif fam == "llama":
            rotary = base.rotary_emb
            pos = torch.arange(seq)[None]
            cos, sin = rotary(h, pos)
            mask = torch.full((seq, seq), float("-inf")).triu(1)[None, None]
            a = blk.self_attn(blk.input_layernorm(h), position_embeddings=(cos, sin), attention_mask=mask)[0]
            mid = h + a
            pre_norm_in = mid
            var = mid.pow(2).mean(-1, keepdim=True)
            x = blk.post_attention_layernorm.weight * (mid * torch.rsqrt(var + blk.post_attention_layernorm.variance_epsilon))
            m = blk.mlp
            y = (F.silu(x @ m.gate_proj.weight.T) * (x @ m.up_proj.weight.T)) @ m.down_proj.weight.T
            h_next = mid + y
        else:
            att = blk.attention
            s = att.self(h)[0] if isinstance(att.self(h), tuple) else att.self(h)
            pre_norm_in = att.output.dense(s) + h
            x = att.output.LayerNorm(pre_norm_in)
            u = x @ blk.intermediate.dense.weight.T + blk.intermediate.dense.bias
            g = 0.5 * u * (1 + torch.erf(u / 2 ** 0.5))
            y = g @ blk.output.dense.weight.T + blk.output.dense.bias
            h_next = blk.output.LayerNorm(y + x)
        norm = adapter.pre_mlp_norm(layer)
        eps = getattr(norm, "eps", None) or norm.variance_epsilon
        if adapter.family.norm_kind == "rmsnorm":
            z = pre_norm_in * torch.rsqrt(pre_norm_in.pow(2).mean(-1, keepdim=True) + eps)
        else:
            mu = pre_norm_in.mean(-1, keepdim=True)
            z = (pre_norm_in - mu) / torch.sqrt((pre_norm_in - mu).pow(2).mean(-1, keepdim=True) + eps)
        out[(layer, "mlp_in")] = x
        out[(layer, "mlp_in_normalized")] = z
        out[(layer, "mlp_out")] = y
        out[(layer, "mlp_out_centered")] = y - y.mean(-1, keepdim=True)
        out[(layer, "resid_post")] = h_next
        h = h_next
    return out


def test_hooks_capture_what_the_model_computes(lm):
    ids = torch.randint(2, 100, (2, 9))
    ids[:, 0] = 0
    with torch.no_grad():
        cache = lm.adapter.run_with_cache(ids, [(l, s) for l in range(2) for s in SITES], stop_early=False)
        ref = manual_forward(lm.adapter, ids)
    for key, value in ref.items():
        assert key in cache
        torch.testing.assert_close(cache[key], value, atol=2e-5, rtol=1e-4, msg=str(key))
    # the sites are not all equal to each other: the comparison is informative
    assert not torch.allclose(cache[(0, "mlp_in")], cache[(0, "mlp_in_normalized")])


def test_mlp_function_matches_hooked_outputs(lm):
    ids = torch.randint(2, 100, (3, 7))
    sites = [(1, s) for s in ("mlp_in", "mlp_in_normalized", "mlp_out", "mlp_out_centered")]
    with torch.no_grad():
        cache = lm.adapter.run_with_cache(ids, sites)
        for i_site, o_site in [("mlp_in", "mlp_out"), ("mlp_in_normalized", "mlp_out"),
                               ("mlp_in_normalized", "mlp_out_centered")]:
            f = lm.adapter.mlp_function(1, i_site, o_site)
            x = cache[(1, i_site)].reshape(-1, lm.adapter.d_model)
            y = f(x)
            torch.testing.assert_close(y, cache[(1, o_site)].reshape(-1, lm.adapter.d_model), atol=1e-5, rtol=1e-4)
    # differentiable with forward-mode autodiff (Jacobian matching uses torch.func.jvp)
    x = cache[(1, "mlp_in")].reshape(-1, lm.adapter.d_model)[:4]
    v = torch.randn_like(x)
    _, jv = torch.func.jvp(lm.adapter.mlp_function(1), (x,), (v,))
    eps = 1e-3
    fd = (lm.adapter.mlp_function(1)(x + eps * v) - lm.adapter.mlp_function(1)(x - eps * v)) / (2 * eps)
    torch.testing.assert_close(jv, fd, atol=2e-3, rtol=2e-2)


def test_early_stop_skips_later_layers(lm):
    calls = []
    h = lm.adapter.block(1).register_forward_pre_hook(lambda m, a: calls.append(1))
    try:
        lm.adapter.run_with_cache(torch.randint(2, 100, (1, 5)), [(0, "mlp_out")])
        assert calls == []
        lm.adapter.run_with_cache(torch.randint(2, 100, (1, 5)), [(0, "mlp_out")], stop_early=False)
        assert calls == [1]
    finally:
        h.remove()


def test_no_hooks_left_behind(lm):
    lm.adapter.run_with_cache(torch.randint(2, 100, (1, 5)), [(1, s) for s in SITES])
    for mod in lm.model.modules():
        assert not mod._forward_hooks and not mod._forward_pre_hooks


def test_parts_are_found(lm):
    a = lm.adapter
    assert a.n_layers == 2 and a.d_model == 32 and a.d_mlp == 64
    assert a.embedding().weight.shape == (101, 32)
    assert a.unembedding() is not None and a.attention(0) is not None
    assert (a.final_norm() is None) == (a.family.name == "bert")


def test_bad_layer_and_site_are_clear_errors(lm):
    with pytest.raises(ConfigError, match="out of range"):
        lm.adapter.run_with_cache(torch.zeros(1, 3, dtype=torch.long), [(5, "mlp_in")])
    with pytest.raises(ConfigError, match="unknown activation site"):
        lm.adapter.hook_site(0, "attn_z", lambda t: None)


def test_unsupported_architecture_lists_supported_ones():
    from transformers import GPTNeoXConfig, GPTNeoXForCausalLM

    model = GPTNeoXForCausalLM(GPTNeoXConfig(num_hidden_layers=1, hidden_size=32, num_attention_heads=4,
                                             intermediate_size=64, vocab_size=50))
    with pytest.raises(UnsupportedModelError) as info:
        ModelAdapter(model)
    msg = str(info.value)
    assert "gpt_neox" in msg and "gpt2" in msg and "llama" in msg and "bert" in msg
    assert supported_families() in msg
