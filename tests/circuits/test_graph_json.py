"""Attribution graphs as JSON: the own format (exact values, round trip, checks on reading) and the
circuit-tracer / Neuronpedia format (exact ids on a hand-built graph, a schema written from
circuit-tracer's pydantic models in ``circuit_tracer/frontend/graph_models.py``)."""

from __future__ import annotations

import json
import re

import pytest
import torch

from mechfaith.circuits.attribution_graph import (
    AttributionGraph,
    GraphConfig,
    LogitTargets,
    build_attribution_graph,
)
from mechfaith.circuits.graph_json import (
    FORMAT,
    cantor_pairing,
    cumulative_influence,
    graph_to_json,
    neuronpedia_json,
    read_graph_json,
)
from mechfaith.circuits.graph_scores import Pruned
from mechfaith.circuits.replacement import record_run
from mechfaith.errors import CoderFileError, ConfigError
from mechfaith.jsonio import write_json
from tests.circuits.test_circuits_attribution import make_setup

D = torch.float64


def tiny_graph(minus: int = -1) -> AttributionGraph:
    """1 layer, 2 tokens (ids 11, 7: "a", "b"), features 3 @0 and 5 @1, one logit (token 7 @1).

    Influence with logit weight 1/2 (rows normalised by their absolute sums):
    f0 1/16, f1 1/4, err@0 0, err@1 5/32, emb@0 1/8, emb@1 7/32; total 13/16."""
    edges = torch.tensor([[0, 0, 0, 0, 2.0, 0],  # f0 <- emb@0
                          [0, 0, 0, 0, 1.0, 3.0],  # f1 <- emb@0, emb@1
                          [1.0, -4.0, 0, 2.5, 0, 0.5]], dtype=D)  # logit <- f0, f1, err@1, emb@1
    half = torch.tensor([0.5], dtype=D)
    return AttributionGraph(
        tokens=[11, 7], token_strings=["a", "b"], n_layers=1, features=torch.tensor([[0, 0, 3], [0, 1, 5]]),
        activations=torch.tensor([1.5, 2.0], dtype=D), logits=LogitTargets(1, [7], half, half, minus),
        edges=edges, values=torch.tensor([2.0, 4.0, 0.0], dtype=D), n_active=4,
        config=GraphConfig(node_threshold=0.95, edge_threshold=0.95))


def test_tiny_graph_pruning_is_what_the_tests_expect():
    g = tiny_graph()
    assert g.influence().tolist() == [1 / 16, 1 / 4, 0.0, 5 / 32, 1 / 8, 7 / 32, 0.0]
    p = g.prune()
    assert p.node_mask.tolist() == [True, True, False, True, True, True, True]  # err@0 has no influence
    assert p.edge_mask.int().tolist() == [[0, 0, 0, 0, 1, 0], [0, 0, 0, 0, 1, 1], [1, 1, 0, 1, 0, 0]]  # emb@1 -> logit


def test_own_format_exact_values():
    g = tiny_graph()
    out = graph_to_json(g, g.prune(), {"model": "toy"})
    assert out["format"] == FORMAT and out["format_version"] == 1 and out["meta"] == {"model": "toy"}
    assert out["replacement_score"] == 0.6875  # tokens 11/32 / (11/32 + errors 5/32)
    assert out["completeness_score"] == pytest.approx(37 / 42, abs=1e-15)
    assert out["n_layers"] == 1 and out["tokens"] == [11, 7] and out["token_strings"] == ["a", "b"]
    assert out["target"] == {"pos": 1, "tokens": [7], "probabilities": [0.5], "weights": [0.5], "minus": -1}
    assert out["config"]["node_threshold"] == 0.95 and out["config"]["max_feature_nodes"] == 1000
    assert out["counts"] == {"active_features": 4, "feature_nodes": 2, "error_nodes": 2, "token_nodes": 2,
                             "logit_nodes": 1, "nodes": 7, "edges": 7, "kept_nodes": 6, "kept_features": 2,
                             "kept_errors": 1, "kept_edges": 6}
    assert out["nodes"] == [
        {"id": "mlp0tc[3]@0", "index": 0, "kind": "feature", "layer": 0, "pos": 0, "influence": 0.0625,
         "token": "a", "feature": 3, "activation": 1.5},
        {"id": "mlp0tc[5]@1", "index": 1, "kind": "feature", "layer": 0, "pos": 1, "influence": 0.25,
         "token": "b", "feature": 5, "activation": 2.0},
        {"id": "mlp0err@1", "index": 3, "kind": "error", "layer": 0, "pos": 1, "influence": 0.15625, "token": "b"},
        {"id": "emb@0", "index": 4, "kind": "token", "layer": -1, "pos": 0, "influence": 0.125, "token": "a",
         "token_id": 11},
        {"id": "emb@1", "index": 5, "kind": "token", "layer": -1, "pos": 1, "influence": 0.21875, "token": "b",
         "token_id": 7},
        {"id": "logit[7]@1", "index": 6, "kind": "logit", "layer": 1, "pos": 1, "influence": 0.0, "token_id": 7,
         "probability": 0.5, "weight": 0.5, "token": "b"}]
    assert out["links"] == [
        {"source": "emb@0", "target": "mlp0tc[3]@0", "weight": 2.0},
        {"source": "emb@0", "target": "mlp0tc[5]@1", "weight": 1.0},
        {"source": "emb@1", "target": "mlp0tc[5]@1", "weight": 3.0},
        {"source": "mlp0tc[3]@0", "target": "logit[7]@1", "weight": 1.0},
        {"source": "mlp0tc[5]@1", "target": "logit[7]@1", "weight": -4.0},
        {"source": "mlp0err@1", "target": "logit[7]@1", "weight": 2.5}]


def test_neuronpedia_exact_values():
    g = tiny_graph()
    out = neuronpedia_json(g, g.prune(), {"slug": "tiny", "scan": "toy-model", "prompt": "a b"})
    assert out["metadata"] == {"slug": "tiny", "scan": "toy-model", "transcoder_list": [], "prompt_tokens": ["a", "b"],
                               "prompt": "a b", "node_threshold": 0.95, "schema_version": 1}
    assert out["qParams"] == {"pinnedIds": [], "supernodes": [], "linkType": "both", "clickedId": "", "sg_pos": ""}
    rest = {"token_prob": 0.0, "is_target_logit": False, "run_idx": 0, "reverse_ctx_idx": 0, "clerp": "",
            "activation": None}
    # cumulative influence: f1 1/4, emb@1 7/32, err@1 5/32, emb@0 1/8, f0 1/16 of 13/16
    assert out["nodes"] == [
        {**rest, "node_id": "0_3_0", "feature": 9, "layer": "0", "ctx_idx": 0, "feature_type": "cross layer transcoder",
         "jsNodeId": "0_3-0", "influence": 1.0, "activation": 1.5},
        {**rest, "node_id": "0_5_1", "feature": 20, "layer": "0", "ctx_idx": 1, "feature_type": "cross layer transcoder",
         "jsNodeId": "0_5-0", "influence": pytest.approx(4 / 13, abs=1e-15), "activation": 2.0},
        {**rest, "node_id": "0_-1_1", "feature": -1, "layer": "0", "ctx_idx": 1,
         "feature_type": "mlp reconstruction error", "jsNodeId": "0_-1-1", "influence": pytest.approx(10 / 13, abs=1e-15)},
        {**rest, "node_id": "E_11_0", "feature": 0, "layer": "E", "ctx_idx": 0, "feature_type": "embedding",
         "jsNodeId": "E_11-0", "influence": pytest.approx(12 / 13, abs=1e-15)},
        {**rest, "node_id": "E_7_1", "feature": 1, "layer": "E", "ctx_idx": 1, "feature_type": "embedding",
         "jsNodeId": "E_7-1", "influence": pytest.approx(15 / 26, abs=1e-15)},
        {**rest, "node_id": "2_7_1", "feature": 7, "layer": "2", "ctx_idx": 1, "feature_type": "logit",
         "jsNodeId": "L_7-1", "token_prob": 0.5, "is_target_logit": True, "clerp": 'Output "b" (p=0.500)',
         "influence": None}]
    assert out["links"] == [
        {"source": "E_11_0", "target": "0_3_0", "weight": 2.0},
        {"source": "E_11_0", "target": "0_5_1", "weight": 1.0},
        {"source": "E_7_1", "target": "0_5_1", "weight": 3.0},
        {"source": "0_3_0", "target": "2_7_1", "weight": 1.0},
        {"source": "0_5_1", "target": "2_7_1", "weight": -4.0},
        {"source": "0_-1_1", "target": "2_7_1", "weight": 2.5}]
    validate(out, NEURONPEDIA_SCHEMA)


def test_logit_difference_and_logit_strings():
    g = tiny_graph(minus=11)
    own = graph_to_json(g, g.prune(), {}, logit_strings=["B"])
    logit = own["nodes"][-1]
    assert logit["id"] == "logit[7-11]@1" and logit["token"] == "B" and logit["minus_token_id"] == 11
    np_logit = neuronpedia_json(g, g.prune(), {})["nodes"][-1]
    assert np_logit["clerp"] == 'Output "b - a" (p=0.500)' and np_logit["node_id"] == "2_7_1"
    g.token_strings = None  # unknown strings: token ids
    out = neuronpedia_json(g, g.prune(), {})
    assert out["metadata"]["prompt_tokens"] == ["11", "7"] and out["metadata"]["prompt"] == "117"
    assert out["nodes"][-1]["clerp"] == 'Output "#7 - #11" (p=0.500)'
    assert all("token" not in n for n in graph_to_json(g, g.prune(), {})["nodes"])


def test_cantor_pairing_and_cumulative_influence():
    assert [cantor_pairing(0, 928), cantor_pairing(3, 0), cantor_pairing(2, 5)] == [431984, 6, 33]
    cum = cumulative_influence(torch.tensor([1.0, 4.0, 0.0, 3.0, 2.0], dtype=D))
    assert cum.tolist() == [1.0, 0.4, 1.0, 0.7, 0.9]


def test_masks_of_another_graph_are_refused():
    g = tiny_graph()
    p = g.prune()
    with pytest.raises(ConfigError, match="do not fit"):
        graph_to_json(g, Pruned(p.node_mask[:-1], p.edge_mask, p.influence), {})


@pytest.fixture(scope="module")
def real_graph():
    lm, tcs, ids = make_setup("gpt2", ("mlp_in", "resid_pre", "mlp_in_normalized"))
    run = record_run(lm.model, ids, tcs, token_strings=[f"t{i}" for i in ids.tolist()])
    g = build_attribution_graph(run, GraphConfig(max_feature_nodes=0))
    return g, g.prune()


def test_own_format_round_trip_and_consistency(real_graph, tmp_path):
    g, p = real_graph
    out = graph_to_json(g, p, {"prompt": "random"})
    write_json(tmp_path / "g.json", out)
    back = read_graph_json(tmp_path / "g.json")
    assert back == json.loads(json.dumps(out))
    scores = g.scores()
    assert back["replacement_score"] == scores.replacement_score
    assert back["completeness_score"] == scores.completeness_score
    assert len(back["nodes"]) == int(p.node_mask.sum()) == back["counts"]["kept_nodes"]
    assert len(back["links"]) == int(p.edge_mask.sum()) == back["counts"]["kept_edges"]
    ids = [n["id"] for n in back["nodes"]]
    assert len(set(ids)) == len(ids)
    kept = {g.node_name(i) for i in p.node_mask.nonzero().flatten().tolist()}
    assert set(ids) == kept
    assert all(e["source"] in kept and e["target"] in kept for e in back["links"])
    kinds = {n["kind"] for n in back["nodes"]}
    assert kinds == {"feature", "error", "token", "logit"}
    for n in back["nodes"]:
        assert n["influence"] == float(p.influence[n["index"]])
        assert n["layer"] == {"token": -1, "logit": g.n_layers}.get(n["kind"], n["layer"])
    rows = g.blocks.row_nodes().tolist()
    edge = back["links"][0]
    r = rows.index(next(n["index"] for n in back["nodes"] if n["id"] == edge["target"]))
    c = next(n["index"] for n in back["nodes"] if n["id"] == edge["source"])
    assert edge["weight"] == float(g.edges[r, c])


def test_reading_checks_format_and_version(tmp_path):
    g = tiny_graph()
    out = graph_to_json(g, g.prune(), {})
    for change, problem in (({"format": "mechfaith.circuit_graph"}, "not a mechfaith.attribution_graph"),
                            ({"format_version": 2}, "version 2 is not supported"),
                            ({"links": None}, "lists 'nodes' and 'links'")):
        write_json(tmp_path / "bad.json", {**out, **change})
        with pytest.raises(CoderFileError, match=problem):
            read_graph_json(tmp_path / "bad.json")
    with pytest.raises(CoderFileError, match="file not found"):
        read_graph_json(tmp_path / "missing.json")
    (tmp_path / "broken.json").write_text("{", encoding="utf-8")
    with pytest.raises(CoderFileError, match="not valid JSON"):
        read_graph_json(tmp_path / "broken.json")


# ------------------------------------------------------------------ the Neuronpedia schema
# circuit-tracer's pydantic models (circuit_tracer/frontend/graph_models.py) as JSON Schema: fields
# without a default are required; the other fields are required here too, since model_dump_json
# writes them all. feature_type's values are those the Node class methods use.
def _obj(props: dict, required: list[str] | None = None) -> dict:
    return {"type": "object", "properties": props, "required": required or list(props), "additionalProperties": False}


STR, INT, NUM, BOOL = {"type": "string"}, {"type": "integer"}, {"type": "number"}, {"type": "boolean"}
NEURONPEDIA_SCHEMA = _obj({
    "metadata": _obj({"slug": STR, "scan": STR, "transcoder_list": {"type": "array", "items": STR},
                      "prompt_tokens": {"type": "array", "items": STR}, "prompt": STR,
                      "node_threshold": {"type": ["number", "null"]}, "schema_version": {"type": ["integer", "null"]}}),
    "qParams": _obj({"pinnedIds": {"type": "array", "items": STR},
                     "supernodes": {"type": "array", "items": {"type": "array", "items": STR}},
                     "linkType": STR, "clickedId": STR, "sg_pos": STR}),
    "nodes": {"type": "array", "items": _obj({
        "node_id": STR, "feature": INT, "layer": STR, "ctx_idx": INT,
        "feature_type": {"enum": ["cross layer transcoder", "mlp reconstruction error", "embedding", "logit"]},
        "token_prob": NUM, "is_target_logit": BOOL, "run_idx": INT, "reverse_ctx_idx": INT, "jsNodeId": STR,
        "clerp": STR, "influence": {"type": ["number", "null"]}, "activation": {"type": ["number", "null"]}})},
    "links": {"type": "array", "items": _obj({"source": STR, "target": STR, "weight": NUM})},
})
ID_PATTERNS = {"cross layer transcoder": r"\d+_\d+_\d+", "mlp reconstruction error": r"\d+_-1_\d+",
               "embedding": r"E_\d+_\d+", "logit": r"\d+_\d+_\d+"}


def _type_ok(value: object, name: str) -> bool:
    if name == "integer":
        return isinstance(value, int) and not isinstance(value, bool)
    if name == "number":
        return isinstance(value, (int, float)) and not isinstance(value, bool)
    return isinstance(value, {"string": str, "boolean": bool, "array": list, "object": dict, "null": type(None)}[name])


def schema_errors(value: object, schema: dict, where: str = "$") -> list[str]:
    """The subset of JSON Schema used above: type, enum, properties, required, additionalProperties, items."""
    if "enum" in schema and value not in schema["enum"]:
        return [f"{where}: {value!r} not one of {schema['enum']}"]
    if "type" in schema:
        names = schema["type"] if isinstance(schema["type"], list) else [schema["type"]]
        if not any(_type_ok(value, n) for n in names):
            return [f"{where}: {value!r} is not {schema['type']}"]
    errors: list[str] = []
    if isinstance(value, dict) and "properties" in schema:
        errors += [f"{where}: missing {k}" for k in schema.get("required", []) if k not in value]
        if schema.get("additionalProperties") is False:
            errors += [f"{where}: unexpected {k}" for k in value if k not in schema["properties"]]
        for k, sub in schema["properties"].items():
            if k in value:
                errors += schema_errors(value[k], sub, f"{where}.{k}")
    if isinstance(value, list) and "items" in schema:
        for i, item in enumerate(value):
            errors += schema_errors(item, schema["items"], f"{where}[{i}]")
    return errors


def validate(doc: dict, schema: dict) -> None:
    errors = schema_errors(doc, schema)
    ids = [n["node_id"] for n in doc["nodes"]]
    errors += [f"duplicate node_id {i}" for i in {i for i in ids if ids.count(i) > 1}]
    errors += [f"link {e} refers to a missing node" for e in doc["links"]
               if e["source"] not in ids or e["target"] not in ids]
    errors += [f"node_id {n['node_id']} does not fit {n['feature_type']}" for n in doc["nodes"]
               if not re.fullmatch(ID_PATTERNS[n["feature_type"]], n["node_id"])]
    assert not errors, errors[:10]


def test_validator_catches_schema_violations():
    g = tiny_graph()
    good = neuronpedia_json(g, g.prune(), {})
    validate(good, NEURONPEDIA_SCHEMA)
    bad_layer = json.loads(json.dumps(good))
    bad_layer["nodes"][0]["layer"] = 0
    assert schema_errors(bad_layer, NEURONPEDIA_SCHEMA) == ["$.nodes[0].layer: 0 is not string"]
    bad = json.loads(json.dumps(good))
    del bad["nodes"][1]["jsNodeId"]
    bad["nodes"][2]["feature_type"] = "error"
    bad["metadata"]["extra"] = 1
    assert sorted(schema_errors(bad, NEURONPEDIA_SCHEMA)) == sorted([
        "$.nodes[1]: missing jsNodeId", "$.nodes[2].feature_type: 'error' not one of "
        "['cross layer transcoder', 'mlp reconstruction error', 'embedding', 'logit']", "$.metadata: unexpected extra"])
    bad = json.loads(json.dumps(good))
    bad["links"][0]["source"] = "0_9_9"
    with pytest.raises(AssertionError, match="refers to a missing node"):
        validate(bad, NEURONPEDIA_SCHEMA)


def test_neuronpedia_json_of_a_real_graph(real_graph):
    g, p = real_graph
    out = neuronpedia_json(g, p, {"slug": "random-gpt2", "scan": "random-gpt2"})
    validate(json.loads(json.dumps(out)), NEURONPEDIA_SCHEMA)
    own = graph_to_json(g, p, {})
    assert len(out["nodes"]) == len(own["nodes"]) and len(out["links"]) == len(own["links"])
    by_type: dict[str, int] = {}
    for n in out["nodes"]:
        by_type[n["feature_type"]] = by_type.get(n["feature_type"], 0) + 1
    assert by_type == {"cross layer transcoder": own["counts"]["kept_features"],
                       "mlp reconstruction error": own["counts"]["kept_errors"], "embedding": g.seq_len,
                       "logit": len(g.logits.tokens)}
    logits = [n for n in out["nodes"] if n["feature_type"] == "logit"]
    assert [n["is_target_logit"] for n in logits] == [True] + [False] * (len(logits) - 1)
    assert all(n["layer"] == str(g.n_layers + 1) and n["ctx_idx"] == g.seq_len - 1 for n in logits)
    assert [n["token_prob"] for n in logits] == g.logits.probabilities.tolist()
    infl = [n["influence"] for n in out["nodes"] if n["influence"] is not None]
    assert all(0 < v <= 1 + 1e-12 for v in infl)
