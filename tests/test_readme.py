"""The README's two set-up commands are exactly the ones CI runs."""

from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent


def _readme_commands() -> list[str]:
    text = (ROOT / "README.md").read_text(encoding="utf-8")
    block = text.split("```bash", 1)[1].split("```", 1)[0]
    return [line.strip() for line in block.splitlines() if line.strip() and not line.strip().startswith("#")]


def test_readme_starts_with_two_commands_that_ci_runs() -> None:
    commands = _readme_commands()
    assert len(commands) == 2, commands
    ci = (ROOT / ".ci" / "run").read_text(encoding="utf-8").splitlines()
    for cmd in commands:
        assert cmd in [line.strip() for line in ci], f"CI does not run the README command: {cmd}"
    assert "mechfaith toy" in commands[0] and "install.sh" in commands[0]
    assert "pytest" in commands[1]


def test_readme_python_example_runs_and_learns(tmp_path, monkeypatch) -> None:
    import torch

    text = (ROOT / "README.md").read_text(encoding="utf-8")
    code = text.split("```python", 1)[1].split("```", 1)[0]
    monkeypatch.chdir(tmp_path)
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        namespace: dict = {"print": lambda *a, **k: None}
        exec(compile(code, "README.md", "exec"), namespace)
    finally:
        torch.set_num_threads(threads)
    assert namespace["result"].status == "completed"
    assert namespace["result"].final_metrics["fve"] > 0.7
    assert (tmp_path / "my_coder" / "config.json").is_file()
