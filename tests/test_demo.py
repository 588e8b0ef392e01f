"""demo.py end to end on the bundled sample, with a tiny random model instead of SmolLM2, and
its flags checked before any stage runs."""
from __future__ import annotations

import json

import pytest

from conftest import load_script, run_cli


def test_demo_runs_every_stage_and_scores_the_zip(tmp_path, tiny_llama, capsys):
    demo = load_script("demo.py")
    # The trained task is not among the zero-shot tasks: its row has a LoRA score only.
    summary = demo.main(["--model", str(tiny_llama), "--tasks", "LaMP-3", "LaMP-4",
                         "--train_task", "LaMP-7", "--epochs", "1",
                         "--work_dir", str(tmp_path / "demo")])
    work = tmp_path / "demo"
    for task in ("LaMP_3", "LaMP_4", "LaMP_7"):
        assert (work / task / "dev_merged.json").exists()
    assert (work / "LaMP_7" / "train_merged.json").exists()
    assert (work / "LaMP_7" / "lora" / "adapter_model.safetensors").exists()
    results = json.loads((work / "results_all.json").read_text())
    assert set(results) == {"LaMP_3", "LaMP_4", "LaMP_7"}
    assert results["LaMP_3"]["count"] == 24 and results["LaMP_3"]["invalid"] == 0  # labels
    rows = {name: (zero, lora) for name, _, zero, lora in summary["rows"]}
    assert rows["LaMP-7"][0] is None and rows["LaMP-7"][1] == results["LaMP_7"]["rouge-1"]
    assert rows["LaMP-3"][0] == results["LaMP_3"]["MAE"] and rows["LaMP-3"][1] is None
    printed = capsys.readouterr().out
    assert "zero-shot vs LoRA" in printed and "LaMP-7" in printed
    assert (work / "demo_summary.json").exists()


def test_lamp_2n_runs_through_every_stage_like_any_task(tmp_path, tiny_llama):
    """The eighth registry entry end to end: BM25 ranking, merging, LoRA training (its
    prompts), zero-shot answers, the zip and eval_all's scores, from the committed sample."""
    demo = load_script("demo.py")
    work = tmp_path / "demo"
    summary = demo.main(["--model", str(tiny_llama), "--tasks", "LaMP-2N",
                         "--train_task", "lamp_2_old", "--epochs", "1", "--work_dir", str(work)])
    merged = json.loads((work / "LaMP_2N" / "dev_merged.json").read_text())
    assert len(merged) == 24 and all(q["id"].startswith("11") for q in merged)
    assert (work / "LaMP_2N" / "lora" / "adapter_model.safetensors").exists()
    results = json.loads((work / "results_all.json").read_text())
    assert list(results) == ["LaMP_2N"]
    assert results["LaMP_2N"]["count"] == 24 and set(results["LaMP_2N"]) >= {"accuracy", "f1"}
    rows = {name: (zero, lora) for name, _, zero, lora in summary["rows"]}
    assert rows["LaMP-2N"][0] is not None and rows["LaMP-2N"][1] is not None


@pytest.mark.parametrize("flag, value, message", [
    ("--learning_rate", "-1", "error: --learning_rate must be > 0"),
    ("--epochs", "nan", "error: --num_train_epochs must be a finite number, not nan"),
    ("--epochs", "1e300", "error: --num_train_epochs must be at most 10,000, not 1e+300"),
    ("--num_retrieved", "-3", "error: --num_retrieved must be >= 0"),
])
def test_demo_checks_every_stage_flag_before_any_work(tmp_path, capsys, monkeypatch, flag,
                                                      value, message):
    demo = load_script("demo.py")
    monkeypatch.setattr(demo, "rank_and_merge", lambda *a: pytest.fail("work started"))
    work = tmp_path / "work"
    status, lines = run_cli(demo.main, ["--work_dir", work, "--model", tmp_path / "model",
                                        flag, value], capsys)
    assert status == 2
    assert lines == [message]
    assert not work.exists()
