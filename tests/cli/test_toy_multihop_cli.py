"""``mechfaith toy multihop``: the --quick run through the real command line writes metrics.json with
claims and report.html; bad arguments are one line and exit 2; the abs toy's command is unchanged."""

from __future__ import annotations

import json

import pytest
import torch

from mechfaith.cli import toy_multihop
from mechfaith.cli.main import build_parser, main


@pytest.fixture(scope="module")
def quick_run(tmp_path_factory):
    out = tmp_path_factory.mktemp("mh") / "report"
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        code = main(["toy", "multihop", "--out", str(out), "--quick", "--quiet", "--steps", "80"])
    finally:
        torch.set_num_threads(threads)
    return code, out


def test_quick_run_writes_metrics_with_claims_and_the_report(quick_run, capsys):
    code, out = quick_run
    assert code == 0
    m = json.loads((out / "metrics.json").read_text())
    assert m["config"]["steps"] == 80 and m["config"]["seeds"] == 2  # flag beats the preset
    assert set(m["settings"]) == {"per_layer", "clt_lam0", "clt_lam0.03", "clt_jacobian"}
    assert m["claims"] and all({"claim", "ok", "verdict"} <= set(c) for c in m["claims"].values())
    assert all(c["verdict"] in ("holds", "refuted") for c in m["claims"].values())
    s = m["settings"]["clt_lam0"]["cross_layer_share"]
    assert len(s["seeds"]) == 2 and s["mean"] == pytest.approx(sum(s["seeds"]) / 2)
    text = (out / "report.html").read_text()
    assert text.startswith("<!DOCTYPE html>") and "Claims" in text
    assert (out / "summary.png").is_file() and (out / "report.md").is_file()


@pytest.mark.parametrize("argv,needle", [
    (["toy", "multihop", "--steps", "0"], "MultihopConfig.steps must be positive"),
    (["toy", "multihop", "--n-layers", "7"], "n_layers must be in 2..4"),
    (["toy", "multihop", "--density", "1"], "density must be in (0, 1)"),
    (["toy", "multihop", "--sparsity-coefs", "0.1,-1"], "sparsity_coefs"),
    (["toy", "multihop", "--no-such-option"], "unrecognized arguments"),
    (["toy", "multihop", "--lr", "nan"], "lr"),
    (["toy", "nothere"], "invalid choice"),
])
def test_bad_arguments_are_one_line_and_exit_2(tmp_path, capsys, argv, needle):
    try:
        code = main(argv + ["--out", str(tmp_path / "o")] if argv[1] == "multihop" else argv)
    except SystemExit as exc:
        code = exc.code
    assert code == 2
    err = capsys.readouterr().err
    assert err.startswith("mechfaith: error: ") and err.count("\n") == 1 and needle in err, err
    assert not (tmp_path / "o").exists()


def test_abs_toy_command_is_unchanged():
    args = build_parser().parse_args(["toy", "--out", "runs/toy"])
    from mechfaith.cli import toy

    assert args.func is toy.run and args.out == "runs/toy" and args.toy_command is None
    args = build_parser().parse_args(["toy", "multihop", "--out", "x", "--steps", "5"])
    assert args.func is toy_multihop.run and args.out == "x" and toy_multihop.build_config(args).steps == 5


def test_config_file_sits_between_preset_and_flags(tmp_path):
    f = tmp_path / "mh.toml"
    f.write_text("[multihop]\nsteps = 77\nseeds = 4\n")
    args = build_parser().parse_args(["toy", "multihop", "--quick", "--config", str(f), "--seeds", "3"])
    cfg = toy_multihop.build_config(args)
    assert cfg.steps == 77 and cfg.seeds == 3 and cfg.sparsity_coefs == [0.0, 0.03]
