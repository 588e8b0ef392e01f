"""Models and what runs them: loading (and the offline SmolLM2/MiniLM packages), prompts, PEFT
methods, examples, checkpoints, prediction, training, distributed runs and per-user PEFT."""
