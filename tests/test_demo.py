"""demo.py end to end on the bundled sample, with a tiny random model instead of SmolLM2."""
from __future__ import annotations

import json

from conftest import load_script


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
