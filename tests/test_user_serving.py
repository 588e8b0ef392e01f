"""Per-user PEFT serving: evaluate_llm.py --user_adapters on tiny random models.

Each user's adapter is made here with peft (random, non-zero LoRA weights) and saved where a
per-user training run saves it. The reference for every comparison is the plain way: load
that one user's adapter alone (PeftModel.from_pretrained, through load_model) and answer the
user's question by itself.
"""
from __future__ import annotations

import json
from pathlib import Path

import pytest

from conftest import run_cli, write_json
from LaMP import evaluate_llm
from LaMP.utils.data.users import user_adapter_dir, user_of
from LaMP.utils.errors import LampError
from LaMP.utils.tasks import get_task

pytestmark = pytest.mark.usefixtures("torch_single_thread")

TWEETS = [
    "ugh mondays.. coffee machine broke AGAIN and the bus was late lol",
    "finally finished my exams!! beach with the girls tomorrow",
    "just watched the new episode and i am NOT ok",
    "so tired today but my friends and i are going to the beach",
    "new phone who dis. the camera on this thing is amazing",
]
REVIEWS = [
    ("Great blender, crushes ice in seconds.", "5"),
    ("It works, but the lid leaks.", "2"),
    ("Decent for the price. Loud, though.", "3"),
    ("Stopped working after a week.", "1"),
]
LAMP7_PREFIX = "Paraphrase the following tweet without any explanation before or after it: "
LAMP3_PREFIX = ("What is the score of the following review on a scale of 1 to 5? just answer "
                "with 1, 2, 3, 4, or 5 without further explanation. review: ")


def tweet_questions(count: int = 6, users: list[str] | None = None) -> list[dict]:
    """LaMP-7 questions; two questions share each tweet, so that only their users (and
    adapters) tell their answers apart. ``users``: a user_id per question (time split)."""
    questions = []
    for i in range(count):
        question = {"id": f"q{i}", "input": LAMP7_PREFIX + TWEETS[(i // 2) % len(TWEETS)],
                    "profile": [{"id": f"q{i}p{j}", "text": TWEETS[(i + j + 1) % len(TWEETS)]}
                                for j in range(3)],
                    "output": TWEETS[(i + 2) % len(TWEETS)]}
        if users is not None:
            question["user_id"] = users[i]
        questions.append(question)
    return questions


def review_questions(count: int = 6) -> list[dict]:
    return [{"id": f"r{i}", "input": LAMP3_PREFIX + REVIEWS[(i // 2) % len(REVIEWS)][0],
             "profile": [{"id": f"r{i}p{j}", "text": REVIEWS[(i + j + 1) % len(REVIEWS)][0],
                          "score": REVIEWS[(i + j + 1) % len(REVIEWS)][1]} for j in range(3)],
             "output": REVIEWS[(i // 2) % len(REVIEWS)][1]}
            for i in range(count)]


def save_user_adapters(model: Path, root: Path, users, *, method: str = "lora") -> Path:
    """One random, non-zero adapter per user at the folder a per-user training run uses."""
    import torch
    from peft import IA3Config, LoraConfig, PromptTuningConfig, get_peft_model
    from transformers import AutoConfig, AutoModelForCausalLM, AutoModelForSeq2SeqLM

    seq2seq = AutoConfig.from_pretrained(model).is_encoder_decoder
    model_class = AutoModelForSeq2SeqLM if seq2seq else AutoModelForCausalLM
    task_type = "SEQ_2_SEQ_LM" if seq2seq else "CAUSAL_LM"
    for number, user in enumerate(users):
        torch.manual_seed(100 + number)
        if method == "ia3":
            config = IA3Config(task_type=task_type, init_ia3_weights=False)
        elif method == "prompt_tuning":
            config = PromptTuningConfig(task_type=task_type, num_virtual_tokens=3 + number % 2)
        else:
            config = LoraConfig(r=4, lora_alpha=8, init_lora_weights=False, task_type=task_type,
                                use_dora=method == "dora", use_rslora=method == "rslora")
        adapted = get_peft_model(model_class.from_pretrained(model), config)
        adapted.save_pretrained(user_adapter_dir(root, user))
        write_user_record(root, user)
    return root


def write_user_record(root: Path, user: str, **fields) -> Path:
    """The user.json a per-user training run writes beside a user's adapter: its user, and
    (unless ``fields`` say otherwise) no task adapter under it."""
    return write_json(user_adapter_dir(root, user) / "user.json",
                      {"user": user, "base_adapter": None, **fields})


def serve_args(data: Path, model: Path, task: str, output_dir: Path, *extra: str) -> list[str]:
    return ["--validation_data", str(data), "--model_addr", str(model), "--task", task,
            "--output_dir", str(output_dir), "--max_length", "128",
            "--generation_max_length", "4", "--generation_num_beams", "1",
            "--per_device_batch_size", "4", "--device", "cpu", *extra]


def profile_flags(use_profile: bool) -> tuple[str, ...]:
    return ("--use_profile", "--is_ranked", "--num_retrieved", "2") if use_profile else ()


def one_user_at_a_time(model: Path, root: Path | None, questions, task_name: str, tmp_path,
                       *, use_profile: bool = False, label_scoring: bool = False,
                       num_beams: int = 1) -> list[str]:
    """Each question alone, through its user's adapter loaded alone (the base model for a
    user without one)."""
    from LaMP.utils.modeling.examples import ProfileOptions, build_examples
    from LaMP.utils.modeling.model import load_model
    from LaMP.utils.modeling.predict import predict

    task = get_task(task_name)
    options = ProfileOptions(use_profile=use_profile, num_retrieved=2, is_ranked=True)
    outputs = []
    for question in questions:
        folder = user_adapter_dir(root, user_of(question)) if root else None
        lamp_model = load_model(str(model), device="cpu",
                                adapter=str(folder) if folder and folder.exists() else None)
        one = write_json(tmp_path / "one_question.json", [question])
        examples = build_examples(str(one), task, lamp_model.prompt_builder(task, 128), options)
        outputs += predict(lamp_model, task, examples, max_length=128, max_new_tokens=4,
                           num_beams=num_beams, batch_size=1, label_scoring=label_scoring,
                           progress=False)
    return outputs


def predictions_file(output_dir: Path) -> list[tuple[str, str]]:
    document = json.loads((output_dir / "predictions.json").read_text(encoding="utf-8"))
    return [(row["id"], row["output"]) for row in document["golds"]]


@pytest.mark.parametrize("use_profile, num_beams", [(False, 1), (True, 2)],
                         ids=["no-profile-greedy", "profile-beams"])
def test_mixed_batches_answer_as_each_user_alone(tiny_model, tmp_path, use_profile, num_beams):
    questions = tweet_questions(6)
    data = write_json(tmp_path / "LaMP_7_dev.json", questions)
    root = save_user_adapters(tiny_model, tmp_path / "per_user", [q["id"] for q in questions])
    # Batches of 4 mix users; 2 adapters at a time makes three groups rotate through.
    returned = evaluate_llm.main(serve_args(
        data, tiny_model, "LaMP-7", tmp_path / "eval", "--user_adapters", str(root),
        "--max_loaded_adapters", "2", "--generation_num_beams", str(num_beams),
        *profile_flags(use_profile)))
    expected = one_user_at_a_time(tiny_model, root, questions, "LaMP-7", tmp_path,
                                  use_profile=use_profile, num_beams=num_beams)
    assert returned["predictions"] == expected
    assert predictions_file(tmp_path / "eval") == [(q["id"], text)
                                                   for q, text in zip(questions, expected)]
    assert set(json.loads((tmp_path / "eval" / "results_output.json").read_text())) >= {
        "rouge-1", "rouge-L"}
    # Questions q0/q1 (and q2/q3, q4/q5) read the same prompt: only their adapters differ.
    base = one_user_at_a_time(tiny_model, None, questions, "LaMP-7", tmp_path,
                              use_profile=use_profile, num_beams=num_beams)
    assert expected != base


def test_label_scoring_picks_each_users_own_label(tiny_model, tmp_path):
    questions = review_questions(6)
    data = write_json(tmp_path / "LaMP_3_dev.json", questions)
    root = save_user_adapters(tiny_model, tmp_path / "per_user", [q["id"] for q in questions])
    returned = evaluate_llm.main(serve_args(
        data, tiny_model, "LaMP-3", tmp_path / "eval", "--user_adapters", str(root),
        "--max_loaded_adapters", "4", "--label_scoring", *profile_flags(True)))
    expected = one_user_at_a_time(tiny_model, root, questions, "LaMP-3", tmp_path,
                                  use_profile=True, label_scoring=True)
    assert returned["predictions"] == expected
    assert set(expected) <= set(get_task("LaMP-3").labels)


# rsLoRA mixes users in a batch as LoRA does; the others are served user by user.
@pytest.mark.parametrize("method", ["rslora", "ia3", "dora", "prompt_tuning"])
def test_every_lora_family_and_other_method_answers_as_each_user_alone(tiny_llama, tmp_path,
                                                                       method):
    questions = tweet_questions(4)
    data = write_json(tmp_path / "LaMP_7_dev.json", questions)
    root = save_user_adapters(tiny_llama, tmp_path / "per_user", [q["id"] for q in questions],
                              method=method)
    returned = evaluate_llm.main(serve_args(data, tiny_llama, "LaMP-7", tmp_path / "eval",
                                            "--user_adapters", str(root),
                                            "--max_loaded_adapters", "3"))
    assert returned["predictions"] == one_user_at_a_time(tiny_llama, root, questions,
                                                         "LaMP-7", tmp_path)


def test_questions_of_one_user_id_share_that_users_adapter(tiny_llama, tmp_path):
    # Time split: three users with two questions each, listed out of user order.
    users = ["17", "u/2", "17", "3", "u/2", "3"]
    questions = tweet_questions(6, users)
    data = write_json(tmp_path / "LaMP_7_dev.json", questions)
    root = save_user_adapters(tiny_llama, tmp_path / "per_user", ["17", "u/2", "3"])
    returned = evaluate_llm.main(serve_args(data, tiny_llama, "LaMP-7", tmp_path / "eval",
                                            "--user_adapters", str(root),
                                            "--max_loaded_adapters", "2"))
    assert returned["predictions"] == one_user_at_a_time(tiny_llama, root, questions,
                                                         "LaMP-7", tmp_path)
    assert [qid for qid, _ in predictions_file(tmp_path / "eval")] == [q["id"] for q in questions]


def test_user_ids_alike_but_for_nul_or_case_are_served_their_own_adapters(tiny_llama,
                                                                          tmp_path):
    users = ["", "\x00", "A", "a", "", "A"]
    questions = tweet_questions(6, users)
    data = write_json(tmp_path / "LaMP_7_dev.json", questions)
    root = save_user_adapters(tiny_llama, tmp_path / "per_user", ["", "\x00", "A", "a"])
    assert len(list((root / "users").iterdir())) == 4
    # "A" in the folder urllib's quote names it: found by its user.json.
    user_adapter_dir(root, "A").rename(root / "users" / "A")
    returned = evaluate_llm.main(serve_args(data, tiny_llama, "LaMP-7", tmp_path / "eval",
                                            "--user_adapters", str(root)))
    user_adapter_dir(root, "A").with_name("A").rename(user_adapter_dir(root, "A"))
    assert returned["predictions"] == one_user_at_a_time(tiny_llama, root, questions,
                                                         "LaMP-7", tmp_path)


def test_without_user_ids_each_question_is_its_own_user(tiny_t5, tmp_path):
    # Adapters named by user id do not answer a file whose questions carry none.
    questions = tweet_questions(2)
    data = write_json(tmp_path / "LaMP_7_dev.json", questions)
    root = save_user_adapters(tiny_t5, tmp_path / "per_user", ["17"])
    with pytest.raises(LampError, match=r"no adapter for user 'q0' \(expected .*/users/q0/\)"):
        evaluate_llm.main(serve_args(data, tiny_t5, "LaMP-7", tmp_path / "eval",
                                     "--user_adapters", str(root)))


def test_a_missing_users_adapter_is_one_error_line(tiny_t5, tmp_path, capsys):
    questions = tweet_questions(4)
    data = write_json(tmp_path / "LaMP_7_dev.json", questions)
    root = save_user_adapters(tiny_t5, tmp_path / "per_user", ["q0", "q1", "q3"])
    status, err = run_cli(evaluate_llm.main, serve_args(data, tiny_t5, "LaMP-7", tmp_path / "eval",
                                                        "--user_adapters", str(root)), capsys)
    assert status == 2 and len(err) == 1
    assert err[0] == (f"error: --user_adapters {root}: no adapter for user 'q2' (expected "
                      f"{root}/users/q2/); users without one: 1 (first: q2) of 4; train them first or "
                      "pass --missing_user_adapter base to answer them with the base model")
    assert not (tmp_path / "eval" / "predictions.json").exists()


@pytest.mark.parametrize("task_name, extra", [("LaMP-7", ()), ("LaMP-3", ("--label_scoring",))],
                         ids=["generation", "label-scoring"])
def test_missing_user_adapter_base_answers_with_the_base_model(tiny_model, tmp_path, task_name,
                                                               extra):
    questions = tweet_questions(6) if task_name == "LaMP-7" else review_questions(6)
    data = write_json(tmp_path / "dev.json", questions)
    with_adapter = [questions[i]["id"] for i in (0, 1, 3, 5)]
    root = save_user_adapters(tiny_model, tmp_path / "per_user", with_adapter)
    # In mixed batches the base model's rows go through peft's "__base__".
    returned = evaluate_llm.main(serve_args(data, tiny_model, task_name, tmp_path / "eval",
                                            "--user_adapters", str(root),
                                            "--missing_user_adapter", "base",
                                            "--max_loaded_adapters", "3", *extra))
    plain = evaluate_llm.main(serve_args(data, tiny_model, task_name, tmp_path / "plain",
                                         *extra))
    for index, question in enumerate(questions):
        if question["id"] not in with_adapter:
            assert returned["predictions"][index] == plain["predictions"][index]
    assert returned["predictions"] == one_user_at_a_time(
        tiny_model, root, questions, task_name, tmp_path, label_scoring=bool(extra))


def test_adapter_and_user_adapters_together_are_refused(tiny_t5, tmp_path, capsys):
    data = write_json(tmp_path / "LaMP_7_dev.json", tweet_questions(2))
    root = save_user_adapters(tiny_t5, tmp_path / "per_user", ["q0", "q1"])
    capsys.readouterr()
    with pytest.raises(SystemExit) as stop:
        evaluate_llm.main(serve_args(data, tiny_t5, "LaMP-7", tmp_path / "eval",
                                     "--user_adapters", str(root),
                                     "--adapter", str(user_adapter_dir(root, "q0"))))
    err = capsys.readouterr().err.strip().splitlines()
    assert stop.value.code == 2 and len(err) == 1
    assert err[0].startswith("error: --adapter and --user_adapters cannot be combined")
    assert not (tmp_path / "eval").exists()


@pytest.mark.parametrize("flags, message", [
    (("--max_loaded_adapters", "0"), "error: --max_loaded_adapters must be >= 1"),
    (("--missing_user_adapter", "skip"), "error: argument --missing_user_adapter: invalid "
                                         "choice: 'skip' (choose from "),
])
def test_flag_values_are_checked(tmp_path, capsys, flags, message):
    data = write_json(tmp_path / "LaMP_7_dev.json", tweet_questions(2))
    with pytest.raises(SystemExit) as stop:
        evaluate_llm.main(serve_args(data, tmp_path, "LaMP-7", tmp_path / "eval",
                                     "--user_adapters", str(tmp_path), *flags))
    err = capsys.readouterr().err.strip().splitlines()
    assert stop.value.code == 2 and len(err) == 1 and err[0].startswith(message)


def test_bad_adapter_folders_are_one_line_naming_the_user(tiny_t5, tmp_path, no_weight_loads):
    questions = tweet_questions(2)
    data = write_json(tmp_path / "LaMP_7_dev.json", questions)
    root = tmp_path / "per_user"
    user_adapter_dir(root, "q0").mkdir(parents=True)
    (user_adapter_dir(root, "q0") / "adapter_config.json").write_text('{"peft_type": "LORA"}')
    with pytest.raises(LampError, match=r"^--user_adapters \(user 'q0'\) .*/users/q0: no "
                                        r"weights \(adapter_model.safetensors"):
        evaluate_llm.main(serve_args(data, tiny_t5, "LaMP-7", tmp_path / "eval",
                                     "--user_adapters", str(root)))
    with pytest.raises(LampError, match=r"--user_adapters .* is not a folder"):
        evaluate_llm.main(serve_args(data, tiny_t5, "LaMP-7", tmp_path / "eval",
                                     "--user_adapters", str(tmp_path / "absent")))
    (tmp_path / "not_a_run").mkdir()
    with pytest.raises(LampError, match=r"--user_adapters .*/not_a_run has no users/ folder"):
        evaluate_llm.main(serve_args(data, tiny_t5, "LaMP-7", tmp_path / "eval",
                                     "--user_adapters", str(tmp_path / "not_a_run")))


def test_adapters_of_two_methods_are_refused_before_loading(tiny_t5, tmp_path):
    questions = tweet_questions(2)
    data = write_json(tmp_path / "LaMP_7_dev.json", questions)
    root = save_user_adapters(tiny_t5, tmp_path / "per_user", ["q0"])
    save_user_adapters(tiny_t5, root, ["q1"], method="ia3")
    with pytest.raises(LampError, match=r"the adapters are of different kinds \(lora "
                                        r"\(SEQ_2_SEQ_LM\) for user 'q0'; ia3 \(SEQ_2_SEQ_LM\) "
                                        r"for user 'q1'\)"):
        evaluate_llm.main(serve_args(data, tiny_t5, "LaMP-7", tmp_path / "eval",
                                     "--user_adapters", str(root)))


def test_adapters_for_another_kind_of_model_are_refused(tiny_t5, tiny_llama, tmp_path):
    data = write_json(tmp_path / "LaMP_7_dev.json", tweet_questions(2))
    root = save_user_adapters(tiny_t5, tmp_path / "per_user", ["q0", "q1"])
    with pytest.raises(LampError, match=r"the adapters under .* are for SEQ_2_SEQ_LM models; "
                                        r"this model is causal \(CAUSAL_LM\)"):
        evaluate_llm.main(serve_args(data, tiny_llama, "LaMP-7", tmp_path / "eval",
                                     "--user_adapters", str(root)))


def test_an_adapter_of_another_base_model_is_one_error_naming_the_user(tiny_llama, tmp_path):
    import torch
    from peft import LoraConfig, get_peft_model
    from transformers import LlamaConfig, LlamaForCausalLM

    from conftest import make_unigram_tokenizer

    data = write_json(tmp_path / "LaMP_7_dev.json", tweet_questions(2))
    root = save_user_adapters(tiny_llama, tmp_path / "per_user", ["q0"])
    torch.manual_seed(0)
    wider = LlamaForCausalLM(LlamaConfig(vocab_size=len(make_unigram_tokenizer()),
                                         hidden_size=48, intermediate_size=64,
                                         num_hidden_layers=2, num_attention_heads=2,
                                         num_key_value_heads=2))
    get_peft_model(wider, LoraConfig(r=4, task_type="CAUSAL_LM")).save_pretrained(
        user_adapter_dir(root, "q1"))
    write_user_record(root, "q1")
    with pytest.raises(LampError, match=r"^cannot load user 'q1'\'s adapter .*/users/q1: "):
        evaluate_llm.main(serve_args(data, tiny_llama, "LaMP-7", tmp_path / "eval",
                                     "--user_adapters", str(root), "--max_loaded_adapters",
                                     "1"))
    assert not (tmp_path / "eval" / "predictions.json").exists()


def test_an_output_dir_inside_the_adapters_folder_is_refused(tiny_t5, tmp_path):
    questions = tweet_questions(2)
    data = write_json(tmp_path / "LaMP_7_dev.json", questions)
    root = save_user_adapters(tiny_t5, tmp_path / "per_user", ["q0", "q1"])
    before = sorted(p.relative_to(root) for p in root.rglob("*"))
    with pytest.raises(LampError, match=r"--output_dir .* is inside the input --user_adapters"):
        evaluate_llm.main(serve_args(data, tiny_t5, "LaMP-7", root / "users" / "q0" / "eval",
                                     "--user_adapters", str(root)))
    assert sorted(p.relative_to(root) for p in root.rglob("*")) == before


def test_a_user_id_that_is_not_an_id_is_one_error(tiny_t5, tmp_path):
    questions = tweet_questions(2, users=["a", ["b"]])
    data = write_json(tmp_path / "LaMP_7_dev.json", questions)
    (tmp_path / "per_user" / "users").mkdir(parents=True)
    with pytest.raises(LampError, match=r'question 1 \(id q1\): "user_id" must be a string '
                                        r"or an integer, not \['b'\]"):
        evaluate_llm.main(serve_args(data, tiny_t5, "LaMP-7", tmp_path / "eval",
                                     "--user_adapters", str(tmp_path / "per_user")))


# -- under a launcher: each process answers (and loads) its own users ------------------------

def test_a_launched_process_loads_only_its_own_users_adapters(tiny_t5, tmp_path, monkeypatch):
    from LaMP.utils.modeling import distributed, lora_stack, user_serving
    from LaMP.utils.modeling.distributed import Launch

    users = ["a", "b", "a", "b", "c", "d", "c", "d"]
    questions = tweet_questions(8, users)
    data = write_json(tmp_path / "LaMP_7_dev.json", questions)
    root = save_user_adapters(tiny_t5, tmp_path / "per_user", ["a", "b", "c", "d"])
    monkeypatch.setattr(distributed, "launch_from_env", lambda: Launch(1, 2, 1))
    monkeypatch.setattr(distributed, "init_process_group", lambda launch, device: False)
    answered, loaded = [], []

    def gather(mine, launch):  # process 0's four answers stood in for
        answered.extend(mine)
        return ["x"] * 4 + list(mine)

    load_one = user_serving._AdapterPool._load_one
    read_weights = lora_stack._read_weights

    def record(pool, user):  # through peft
        loaded.append(user)
        return load_one(pool, user)

    def record_read(folder):  # stacked (the default for LoRA)
        loaded.append(folder.name)
        return read_weights(folder)

    monkeypatch.setattr("LaMP.utils.modeling.predict.gather_in_order", gather)
    monkeypatch.setattr(user_serving._AdapterPool, "_load_one", record)
    monkeypatch.setattr(lora_stack, "_read_weights", record_read)
    out = evaluate_llm.main(serve_args(data, tiny_t5, "LaMP-7", tmp_path / "eval",
                                       "--user_adapters", str(root)))
    # Sliced with each user's questions together: process 1 has c's and d's, and only those.
    assert sorted(loaded) == ["c", "d"]
    expected = one_user_at_a_time(tiny_t5, root, [questions[i] for i in (4, 6, 5, 7)],
                                  "LaMP-7", tmp_path)
    assert answered == expected
    # ... and every answer lands at its question's place.
    assert out["predictions"] == ["x"] * 4 + [answered[0], answered[2], answered[1],
                                              answered[3]]
    assert not (tmp_path / "eval").exists()  # process 1 writes nothing


def test_two_processes_write_what_one_process_writes(tiny_t5, tmp_path):
    import os
    import subprocess
    import sys

    from conftest import REPO

    questions = tweet_questions(5, ["A", "B", "A", "C", "B"])
    data = write_json(tmp_path / "LaMP_7_dev.json", questions)
    root = save_user_adapters(tiny_t5, tmp_path / "per_user", ["A", "B", "C"])
    args = serve_args(data, tiny_t5, "LaMP-7", tmp_path / "one", "--user_adapters", str(root),
                      "--max_loaded_adapters", "2")
    evaluate_llm.main(args)
    args[args.index(str(tmp_path / "one"))] = str(tmp_path / "two")
    env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONPATH": str(REPO)}
    done = subprocess.run([sys.executable, "-m", "torch.distributed.run", "--nproc_per_node",
                           "2", "--master_addr", "127.0.0.1", "--master_port", "29641",
                           str(REPO / "LaMP" / "evaluate_llm.py"), *args],
                          env=env, capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stderr[-3000:]
    assert ((tmp_path / "two" / "predictions.json").read_bytes()
            == (tmp_path / "one" / "predictions.json").read_bytes())


def merged_answers(model: Path, task_folder: Path, root: Path, questions, tmp_path) -> list[str]:
    """Each question through its user's adapter on the base with ``task_folder`` merged in,
    loaded by hand."""
    import torch
    from peft import PeftModel

    from LaMP.utils.modeling.examples import ProfileOptions, build_examples
    from LaMP.utils.modeling.model import LampModel, load_model
    from LaMP.utils.modeling.predict import predict

    task = get_task("LaMP-7")
    expected = []
    for question in questions:
        merged = load_model(str(model), device="cpu", adapter=str(task_folder))
        peft_model = PeftModel.from_pretrained(merged.model.merge_and_unload(),
                                               str(user_adapter_dir(root, question["id"])))
        lamp_model = LampModel(model=peft_model.eval(), tokenizer=merged.tokenizer,
                               is_seq2seq=merged.is_seq2seq, device=torch.device("cpu"))
        one = write_json(tmp_path / "one_question.json", [question])
        examples = build_examples(str(one), task, lamp_model.prompt_builder(task, 128),
                                  ProfileOptions())
        expected += predict(lamp_model, task, examples, max_length=128, max_new_tokens=4,
                            num_beams=1, batch_size=1, progress=False)
    return expected


def test_users_trained_on_a_task_adapter_are_served_on_it_merged(tiny_model, tmp_path):
    # OPPU: train_user_peft.py --base_adapter merges a task adapter into the base and trains
    # the users' adapters on that; each user.json records it (users.json too), and serving
    # rebuilds the same base from the users' own records.
    from LaMP.utils.modeling.user_records import adapter_identity

    questions = tweet_questions(4)
    data = write_json(tmp_path / "LaMP_7_dev.json", questions)
    task_adapter = save_user_adapters(tiny_model, tmp_path / "task", ["shared"])
    task_folder = user_adapter_dir(task_adapter, "shared")
    root = save_user_adapters(tiny_model, tmp_path / "per_user", [q["id"] for q in questions])
    for question in questions:
        write_user_record(root, question["id"], base_adapter=adapter_identity(str(task_folder)))
    write_json(root / "users.json", {"base_adapter": str(task_folder), "users": {}})
    returned = evaluate_llm.main(serve_args(data, tiny_model, "LaMP-7", tmp_path / "eval",
                                            "--user_adapters", str(root)))
    expected = merged_answers(tiny_model, task_folder, root, questions, tmp_path)
    assert returned["predictions"] == expected
    assert expected != one_user_at_a_time(tiny_model, root, questions, "LaMP-7", tmp_path)
    # The users' own records say what they were trained on: the index is not needed.
    (root / "users.json").unlink()
    alone = evaluate_llm.main(serve_args(data, tiny_model, "LaMP-7", tmp_path / "alone",
                                         "--user_adapters", str(root)))
    assert alone["predictions"] == expected


def test_users_records_without_their_task_adapter_and_no_index_are_refused(tiny_t5, tmp_path,
                                                                          capsys):
    questions = tweet_questions(2)
    data = write_json(tmp_path / "LaMP_7_dev.json", questions)
    root = save_user_adapters(tiny_t5, tmp_path / "per_user", [q["id"] for q in questions])
    write_json(user_adapter_dir(root, "q0") / "user.json", {"user": "q0"})
    status, lines = run_cli(evaluate_llm.main, serve_args(data, tiny_t5, "LaMP-7",
                                                          tmp_path / "eval", "--user_adapters",
                                                          str(root)), capsys)
    assert status == 2
    assert lines == [
        f"error: --user_adapters (user 'q0') user.json does not record the task adapter it was "
        f"trained on top of (\"base_adapter\"), and {root} has no users.json to say; train the "
        "user again"]
    assert not (tmp_path / "eval").exists()


@pytest.mark.parametrize("where", ["users.json", "user.json"])
def test_a_base_adapter_that_is_gone_is_one_error_line(tiny_t5, tmp_path, capsys, where):
    questions = tweet_questions(2)
    data = write_json(tmp_path / "LaMP_7_dev.json", questions)
    root = save_user_adapters(tiny_t5, tmp_path / "per_user", [q["id"] for q in questions])
    gone = {"path": str(tmp_path / "gone"), "sha256": "0" * 64}
    for question in questions:
        if where == "user.json":
            write_user_record(root, question["id"], base_adapter=gone)
        else:  # a record that leaves it to the run's index
            write_json(user_adapter_dir(root, question["id"]) / "user.json",
                       {"user": question["id"]})
    if where == "users.json":
        write_json(root / "users.json", {"base_adapter": str(tmp_path / "gone"), "users": {}})
    status, err = run_cli(evaluate_llm.main, serve_args(data, tiny_t5, "LaMP-7", tmp_path / "eval",
                                                        "--user_adapters", str(root)), capsys)
    assert status == 2
    assert err == [f"error: --user_adapters (the base adapter its users were trained on) "
                   f"{tmp_path / 'gone'} is not a folder (a peft adapter folder, e.g. "
                   "train_llm.py's --output_dir)"]
    assert not (tmp_path / "eval" / "predictions.json").exists()


# -- a folder is served only for the user, base model and task adapter it was trained for ----

def serve_status(capsys, data, model, output_dir, *extra) -> tuple[int, list[str]]:
    return run_cli(evaluate_llm.main, serve_args(data, model, "LaMP-7", output_dir, *extra),
                   capsys)


@pytest.mark.parametrize("swap", ["copied over", "linked", "without user.json"])
@pytest.mark.parametrize("batches", ["stacked", "peft"])
def test_a_folder_holding_another_users_adapter_is_refused(tiny_llama, tmp_path, capsys, swap,
                                                          batches):
    import shutil

    questions = tweet_questions(2)
    data = write_json(tmp_path / "LaMP_7_dev.json", questions)
    root = save_user_adapters(tiny_llama, tmp_path / "per_user", ["q0", "q1"])
    q0, q1 = user_adapter_dir(root, "q0"), user_adapter_dir(root, "q1")
    if swap == "without user.json":
        (q1 / "user.json").unlink()
    else:
        shutil.rmtree(q1)
        if swap == "copied over":
            shutil.copytree(q0, q1)
        else:
            q1.symlink_to(q0, target_is_directory=True)
    status, err = serve_status(capsys, data, tiny_llama, tmp_path / "eval", "--user_adapters",
                               str(root), "--user_adapter_batches", batches)
    assert status == 2 and len(err) == 1
    if swap == "without user.json":
        assert err[0] == (f"error: --user_adapters (user 'q1') {q1}: no valid user.json "
                          "(train_user_peft.py names each folder's user there; a folder "
                          "without it is not served)")
    else:
        assert err[0] == (f"error: --user_adapters (user 'q1') {q1}: its user.json names user "
                          "'q0': another user's adapter is not served for this one")
    assert not (tmp_path / "eval").exists()


def test_adapters_are_served_only_on_the_base_model_they_were_trained_on(tiny_llama, tmp_path,
                                                                        capsys):
    import shutil

    from conftest import build_tiny_llama
    from LaMP.utils.modeling.user_records import model_identity

    questions = tweet_questions(2)
    data = write_json(tmp_path / "LaMP_7_dev.json", questions)
    root = save_user_adapters(tiny_llama, tmp_path / "per_user", ["q0", "q1"])
    for user in ("q0", "q1"):
        write_user_record(root, user, base_model=model_identity(str(tiny_llama)))
    other = build_tiny_llama(tmp_path / "other", seed=1)  # the same layers, other weights
    status, err = serve_status(capsys, data, other, tmp_path / "eval", "--user_adapters",
                               str(root))
    assert status == 2 and err == [
        f"error: --user_adapters: user 'q0''s adapter was trained on base model {tiny_llama}, "
        f"not on --model_addr {other} (other weights); users trained on another model: "
        "2 (first: 'q0', 'q1') of 2"]
    # A copy of the model elsewhere is the same model.
    copy = shutil.copytree(tiny_llama, tmp_path / "copy")
    served = evaluate_llm.main(serve_args(data, copy, "LaMP-7", tmp_path / "eval",
                                          "--user_adapters", str(root)))
    assert served["predictions"] == one_user_at_a_time(tiny_llama, root, questions, "LaMP-7",
                                                       tmp_path)
    # Records that leave it out: the adapter's own config names the model it was made on.
    for user in ("q0", "q1"):
        write_user_record(root, user)
    status, err = serve_status(capsys, data, other, tmp_path / "eval3", "--user_adapters",
                               str(root))
    assert status == 2 and err[0].startswith(
        f"error: --user_adapters: user 'q0''s adapter was trained on base model {tiny_llama}, "
        f"not on --model_addr {other} (another name)")
    # Trained on a hub model: a local folder is another name.
    write_user_record(root, "q1", base_model={"name": "org/model", "sha256": None})
    status, err = serve_status(capsys, data, tiny_llama, tmp_path / "eval2", "--user_adapters",
                               str(root))
    assert status == 2 and err == [
        f"error: --user_adapters: user 'q1''s adapter was trained on base model org/model, not "
        f"on --model_addr {tiny_llama} (another name); users trained on another model: "
        "1 (first: 'q1') of 2"]


def test_a_trained_run_serves_the_same_without_its_index_and_refuses_a_changed_task_adapter(
        tiny_llama, tmp_path, capsys):
    """train_user_peft.py --base_adapter, then serving: each user.json carries what the user
    was trained on top of, so losing users.json changes nothing, and a task adapter whose
    files changed since is refused."""
    import torch
    from peft import LoraConfig, get_peft_model
    from safetensors.torch import load_file, save_file
    from transformers import AutoModelForCausalLM

    from conftest import load_script

    train_user_peft = load_script("LaMP/train_user_peft.py")
    torch.manual_seed(5)
    get_peft_model(AutoModelForCausalLM.from_pretrained(tiny_llama),
                   LoraConfig(task_type="CAUSAL_LM", r=4, init_lora_weights=False)
                   ).save_pretrained(tmp_path / "task")
    questions = tweet_questions(3)
    data = write_json(tmp_path / "LaMP_7_dev.json", questions)
    root = tmp_path / "per_user"
    train_user_peft.main(["--train_data", str(data), "--task", "LaMP-7", "--model_name",
                          str(tiny_llama), "--output_dir", str(root), "--max_steps", "2",
                          "--per_device_batch_size", "4", "--max_length", "96",
                          "--generation_max_length", "8", "--learning_rate", "1e-2",
                          "--device", "cpu", "--base_adapter", str(tmp_path / "task")])
    record = json.loads((user_adapter_dir(root, "q0") / "user.json").read_text())
    assert record["base_model"]["name"] == str(tiny_llama) and record["base_model"]["sha256"]
    assert record["base_adapter"]["path"] == str(tmp_path / "task")
    with_index = evaluate_llm.main(serve_args(data, tiny_llama, "LaMP-7", tmp_path / "a",
                                              "--user_adapters", str(root)))
    assert with_index["predictions"] == merged_answers(tiny_llama, tmp_path / "task", root,
                                                       questions, tmp_path)
    (root / "users.json").unlink()
    without = evaluate_llm.main(serve_args(data, tiny_llama, "LaMP-7", tmp_path / "b",
                                           "--user_adapters", str(root)))
    assert without["predictions"] == with_index["predictions"]
    weights_path = tmp_path / "task" / "adapter_model.safetensors"
    weights = load_file(str(weights_path))
    save_file({key: value * 2 for key, value in weights.items()}, str(weights_path))
    status, err = serve_status(capsys, data, tiny_llama, tmp_path / "c", "--user_adapters",
                               str(root))
    assert status == 2 and err == [
        f"error: --user_adapters (the base adapter its users were trained on) "
        f"{tmp_path / 'task'}: its files differ from those user 'q0' was trained on top of "
        "(another sha256 than its user.json records)"]


@pytest.mark.parametrize("mixup", ["two task adapters", "one task adapter, two versions",
                                   "the index names another"])
def test_users_trained_on_top_of_different_task_adapters_are_refused(tiny_t5, tmp_path, capsys,
                                                                    mixup):
    from LaMP.utils.modeling.user_records import adapter_identity

    questions = tweet_questions(2)
    data = write_json(tmp_path / "LaMP_7_dev.json", questions)
    tasks = save_user_adapters(tiny_t5, tmp_path / "task", ["t0", "t1"])
    t0, t1 = (str(user_adapter_dir(tasks, name)) for name in ("t0", "t1"))
    root = save_user_adapters(tiny_t5, tmp_path / "per_user", ["q0", "q1"])
    write_user_record(root, "q0", base_adapter=adapter_identity(t0))
    if mixup == "two task adapters":
        write_user_record(root, "q1", base_adapter=adapter_identity(t1))
        expected = f"the users were trained on top of different task adapters ({t0} for user " \
                   f"'q0'; {t1} for user 'q1'); serve one run's users at a time"
    elif mixup == "one task adapter, two versions":
        write_user_record(root, "q1", base_adapter={"path": t0, "sha256": "0" * 64})
        expected = f"the users were trained on top of different task adapters ({t0} with " \
                   "other files for 'q0' than for 'q1'); serve one run's users at a time"
    else:
        write_user_record(root, "q1", base_adapter=adapter_identity(t0))
        write_json(root / "users.json", {"base_adapter": t1, "users": {}})
        expected = f"users.json names task adapter {t1}, user 'q0''s user.json {t0}"
    status, err = serve_status(capsys, data, tiny_t5, tmp_path / "eval", "--user_adapters",
                               str(root))
    assert status == 2 and err == [f"error: --user_adapters {root}: {expected}"]


@pytest.mark.parametrize("batches", ["stacked", "peft"])
def test_at_most_max_loaded_adapters_are_on_the_model_at_once(tiny_llama, tmp_path,
                                                              monkeypatch, batches):
    """Five users, --max_loaded_adapters 2: groups of 2, 2 and 1, each group's adapters
    released before the next loads, and every user served."""
    from LaMP.utils.modeling import lora_stack, user_serving

    questions = tweet_questions(5)
    data = write_json(tmp_path / "LaMP_7_dev.json", questions)
    root = save_user_adapters(tiny_llama, tmp_path / "per_user", [q["id"] for q in questions])
    on_model, most, groups = set(), [0], []
    real_load, real_delete = user_serving._AdapterPool._load_one, user_serving._AdapterPool._delete

    def load_one(self, user):
        name = real_load(self, user)
        on_model.add(name)
        most[0] = max(most[0], len(self.peft_model.peft_config))
        return name

    def delete(self, name):
        real_delete(self, name)
        on_model.discard(name)

    real_stack = lora_stack.LoraStack.__init__

    def stack(self, model, folders, *args, **kwargs):
        groups.append(len(folders))
        real_stack(self, model, folders, *args, **kwargs)

    monkeypatch.setattr(user_serving._AdapterPool, "_load_one", load_one)
    monkeypatch.setattr(user_serving._AdapterPool, "_delete", delete)
    monkeypatch.setattr(lora_stack.LoraStack, "__init__", stack)
    returned = evaluate_llm.main(serve_args(data, tiny_llama, "LaMP-7", tmp_path / "eval",
                                            "--user_adapters", str(root),
                                            "--max_loaded_adapters", "2",
                                            "--user_adapter_batches", batches))
    if batches == "stacked":
        assert groups == [2, 2, 1] and most == [0]
    else:
        assert groups == [] and most == [2] and on_model == set()
    assert returned["predictions"] == one_user_at_a_time(tiny_llama, root, questions,
                                                         "LaMP-7", tmp_path)
