"""Coder specs of ``circuit`` / ``dashboard`` (circuits.session): a set folder stands for its layers'
transcoders, exactly as if they were listed one by one."""

import pytest
import torch

from mechfaith.circuits.session import expand_coder_specs, load_transcoders
from mechfaith.errors import ConfigError, MechfaithError
from tests.lm.coder_sets import CORRUPTIONS


def test_a_set_expands_into_its_layers(tiny_set):
    coders = [str(tiny_set / "layers" / f"L{l}" / "coder") for l in (0, 1)]
    assert expand_coder_specs([str(tiny_set)]) == [(0, coders[0]), (1, coders[1])]
    # other specs pass through untouched (not even opened), in order
    assert expand_coder_specs(["7=/no/such/coder", str(tiny_set), "/x"]) == [(7, "/no/such/coder"), (0, coders[0]),
                                                                            (1, coders[1]), (None, "/x")]
    from_set, _ = load_transcoders([str(tiny_set)])
    listed, model = load_transcoders(coders)
    assert model == "random-gpt2" and sorted(from_set) == sorted(listed) == [0, 1]
    for l, tc in listed.items():
        other = from_set[l]
        assert (other.layer, other.input_site, other.output_site) == (tc.layer, tc.input_site, tc.output_site)
        for name, t in tc.coder.state_dict().items():
            assert torch.equal(other.coder.state_dict()[name], t)


def test_a_set_with_a_layer_or_a_second_coder_is_refused(tiny_set):
    with pytest.raises(ConfigError, match="coder set of layers 0-1: give it without 1="):
        expand_coder_specs([f"1={tiny_set}"])
    with pytest.raises(ConfigError, match="two transcoders for layer 1"):
        load_transcoders([str(tiny_set), str(tiny_set / "layers" / "L1" / "coder")])


def test_a_damaged_set_is_refused_before_anything_loads(set_copy):
    damage, message = CORRUPTIONS["coder outside the set"]
    damage(set_copy)
    with pytest.raises(MechfaithError) as err:
        expand_coder_specs([str(set_copy)])
    assert message in str(err.value)
