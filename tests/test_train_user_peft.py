"""Per-user PEFT training (train_user_peft.py): templates, users, isolation, resume, shards."""
from __future__ import annotations

import json
import os
import random
import subprocess
import sys
from pathlib import Path

import pytest

from conftest import REPO, SAMPLE, load_script, run_cli
from LaMP.utils.data.users import user_adapter_dir
from LaMP.utils.errors import LampError
from LaMP.utils.modeling import user_store, user_training
from LaMP.utils.modeling.user_store import read_users_index
from LaMP.utils.modeling.user_training import (collect_profiles, derived_seed, item_examples,
                                               retrieval_task, scan_users, shard_users,
                                               user_examples)
from LaMP.utils.tasks import MOVIE_TAGS, TASKS

train_user_peft = load_script("LaMP/train_user_peft.py")

ITEM = {"id": "9", "title": "A Title", "abstract": "An abstract.", "description": "A heist.",
        "tag": "comedy", "text": "Some text here.", "score": "4", "category": "crime"}
TAGS = ", ".join(MOVIE_TAGS)


@pytest.mark.parametrize("task, expected", [
    ("LaMP-1", ("Write an abstract for this title: A Title", "An abstract.", "A Title")),
    ("LaMP-2", ("Which tag does this movie relate to among the following tags? Just answer "
                "with the tag name without further explanation. tags: [sci-fi, based on a "
                "book, comedy, action, twist ending, dystopia, dark comedy, classic, "
                "psychology, fantasy, romance, thought-provoking, social commentary, "
                "violence, true story] description: A heist.", "comedy", "A heist.")),
    ("LaMP-3", ("What is the score of the following review on a scale of 1 to 5? just "
                "answer with 1, 2, 3, 4, or 5 without further explanation. review: Some "
                "text here.", "4", "Some text here.")),
    ("LaMP-4", ("Generate a headline for the following article: Some text here.", "A Title",
                "Some text here.")),
    ("LaMP-5", ("Generate a title for the following abstract of a paper: An abstract.",
                "A Title", "An abstract.")),
    ("LaMP-6", ("Generate a subject for the following email: Some text here.", "A Title",
                "Some text here.")),
    ("LaMP-2N", ("Which category does this article relate to among the following categories? "
                 "Just answer with the category name without further explanation. categories: "
                 "[women, religion, politics, style & beauty, entertainment, culture & arts, "
                 "sports, science & technology, travel, business, crime, education, healthy "
                 "living, parents, food & drink] article: Some text here.", "crime",
                 "Some text here.")),
])
def test_each_task_makes_per_user_examples_with_the_published_template(task, expected):
    assert TASKS[task].user_template.example(ITEM) == expected


class FixedShare:
    """A stand-in for random.Random whose draw is known."""

    def __init__(self, share: float):
        self.share = share

    def uniform(self, low: float, high: float) -> float:
        assert (low, high) == (0.10, 0.25)
        return self.share


@pytest.mark.parametrize("share, expected", [
    (0.2, ("Complete the following tweet: one two", "three four five six seven eight nine ten",
           "one two")),
    (0.1, ("Complete the following tweet: one", "two three four five six seven eight nine ten",
           "one")),
    (0.25, ("Complete the following tweet: one two", "three four five six seven eight nine "
            "ten", "one two")),  # 2.5 words round to 2 (banker's rounding, as Python rounds)
])
def test_lamp7_shows_the_start_of_a_tweet_and_learns_the_rest(share, expected):
    tweet = {"id": "1", "text": "one two  three four five six seven eight nine ten"}
    assert TASKS["LaMP-7"].user_template.example(tweet, FixedShare(share)) == expected


def test_lamp7_shows_at_least_one_word_leaves_one_and_skips_one_word_tweets():
    template = TASKS["LaMP-7"].user_template
    assert template.example({"text": "hello world"}, FixedShare(0.1))[1:] == ("world", "hello")
    assert template.example({"text": "  lonely  "}, FixedShare(0.2)) is None
    assert template.example({"text": ""}, FixedShare(0.2)) is None


def test_lamp7_share_is_seeded_per_item_and_stays_in_range():
    words = [f"w{i}" for i in range(40)]
    items = [{"id": str(i), "text": " ".join(words)} for i in range(50)]
    first = item_examples(TASKS["LaMP-7"], "u", items, seed=3)
    assert first == item_examples(TASKS["LaMP-7"], "u", items, seed=3)  # repeatable
    shown = [len(query.split()) for _, (_, _, query) in first]
    assert all(4 <= n <= 10 for n in shown)  # 10% … 25% of 40 words
    assert len(set(shown)) > 1  # drawn per item, not once
    assert [e for _, e in item_examples(TASKS["LaMP-7"], "u", items, seed=4)] != \
        [e for _, e in first]
    # An item's draw depends on the item, not on the items before it.
    assert item_examples(TASKS["LaMP-7"], "u", items[7:8], seed=3) == first[7:8]


def test_the_lamp2_and_lamp3_instructions_are_those_of_the_task_inputs():
    for task, marker in (("LaMP-2", " description:"), ("LaMP-3", " review:"),
                         ("LaMP-2N", " article:")):
        sample = json.loads((SAMPLE / TASKS[task].folder / "dev_questions.json").read_text())
        instruction = sample[0]["input"].split(marker)[0]
        made = TASKS[task].user_template.example(ITEM)[0]
        assert made.startswith(instruction + marker + " ")
    assert TAGS in TASKS["LaMP-2"].user_template.input


# -- users ---------------------------------------------------------------------------------

def write(path: Path, questions) -> str:
    path.write_text(json.dumps(questions), encoding="utf-8")
    return str(path)


def tweets(prefix: str, n: int) -> list[dict]:
    return [{"id": f"{prefix}{i}", "text": f"{prefix} tweet number {i} about the beach and "
             f"the weather today"} for i in range(n)]


def question(qid: str, profile, user: str | None = None) -> dict:
    entry = {"id": qid, "input": "Paraphrase the following tweet without any explanation "
             "before or after it: the sea", "profile": profile}
    if user is not None:
        entry["user_id"] = user
    return entry


def test_time_split_users_are_their_user_id_and_their_items_are_joined(tmp_path):
    a, b = tweets("a", 4), tweets("b", 3)
    path = write(tmp_path / "q.json", [
        question("1", a[:2], "A"), question("2", b, "B"), question("3", a[1:], "A")])
    assert scan_users(path, TASKS["LaMP-7"]) == ["A", "B"]
    profiles = collect_profiles(path, TASKS["LaMP-7"], ["A"])
    assert list(profiles) == ["A"]
    assert [item["id"] for item in profiles["A"]] == ["a0", "a1", "a2", "a3"]


def test_a_time_split_file_trains_one_adapter_per_user_id(tmp_path, tiny_llama,
                                                         torch_single_thread):
    a, b = tweets("a", 4), tweets("b", 3)
    path = write(tmp_path / "q.json", [
        question("1", a[:2], "A"), question("2", b, "B"), question("3", a[1:], "A")])
    result = train_user_peft.main(train_argv(path, tiny_llama, tmp_path / "out"))
    assert result["trained"] == ["A", "B"]
    users = read_users_index(tmp_path / "out")["users"]
    assert (users["A"]["items"], users["B"]["items"]) == (4, 3)
    # Upper case is escaped: a file system that ignores case keeps "A" and "a" apart.
    assert sorted(p.name for p in (tmp_path / "out" / "users").iterdir()) == ["%41", "%42"]


def test_user_ids_alike_but_for_nul_case_or_escapes_train_apart(tmp_path, tiny_llama,
                                                                 torch_single_thread):
    ids = ["", "\x00", "A", "a", "%41", "~", "%7E", ".", "%2E"]
    path = write(tmp_path / "q.json", [question(str(n), tweets(f"t{n}", 2), user)
                                       for n, user in enumerate(ids)])
    out = tmp_path / "out"
    result = train_user_peft.main(train_argv(path, tiny_llama, out))
    assert result["trained"] == sorted(ids)
    assert len({p.name.casefold() for p in (out / "users").iterdir()}) == len(ids)
    index = read_users_index(out)
    assert sorted(index["users"]) == sorted(ids) and index["num_missing"] == 0
    first = {user: adapter_bytes(out, user) for user in ids}
    again = train_user_peft.main(train_argv(path, tiny_llama, out))
    assert again["trained"] == [] and {user: adapter_bytes(out, user) for user in ids} == first


def test_a_folder_in_a_users_place_holding_another_users_adapter_is_never_replaced(
        tmp_path, tiny_llama, capsys, no_model_loads):
    # The empty id's folder as urllib's quote named it ("%00") is NUL's name here.
    out = tmp_path / "out"
    folder = out / "users" / "%00"
    folder.mkdir(parents=True)
    (folder / "adapter_config.json").write_text('{"peft_type": "LORA", "r": 2}')
    (folder / "adapter_model.bin").write_bytes(b"\x80\x02}q\x00.")
    (folder / "user.json").write_text(json.dumps({"user": ""}))
    before = {p: p.read_bytes() for p in out.rglob("*") if p.is_file()}
    path = write(tmp_path / "q.json", [question("1", tweets("a", 2), "\x00")])
    code, lines = run_cli(train_user_peft.main, train_argv(path, tiny_llama, out), capsys)
    assert code == 2 and lines[-1] == (
        f"error: {folder} holds the adapter of user '' (its user.json), not of user '\\x00'; "
        f"move it to {out / 'users' / '%empty'} or remove it (users whose folder holds "
        "another's: 1 (first: '\\x00'))")
    assert {p: p.read_bytes() for p in out.rglob("*") if p.is_file()} == before


def test_user_split_questions_are_each_their_own_user(tmp_path):
    path = write(tmp_path / "q.json", [question("7", tweets("x", 2)),
                                      question("5", tweets("y", 2))])
    assert scan_users(path, TASKS["LaMP-7"]) == ["5", "7"]
    assert [i["id"] for i in collect_profiles(path, TASKS["LaMP-7"], ["7"])["7"]] == ["x0", "x1"]


@pytest.mark.parametrize("n_users", [0, 1, 5, 12])
@pytest.mark.parametrize("num_shards", [1, 2, 3, 8])
def test_shards_partition_the_users(n_users, num_shards):
    users = [f"u{i}" for i in range(n_users)]
    random.Random(0).shuffle(users)
    parts = [shard_users(users, shard, num_shards) for shard in range(num_shards)]
    joined = [user for part in parts for user in part]
    assert sorted(joined) == sorted(users) and len(joined) == len(set(joined))
    assert max(map(len, parts)) - min(map(len, parts)) <= 1
    with pytest.raises(LampError, match="shard id"):
        shard_users(users, num_shards, num_shards)


def test_retrieval_in_training_takes_only_the_users_other_items():
    from LaMP.utils.retrieval import build_ranker

    task = TASKS["LaMP-7"]
    items = tweets("a", 5)
    items[3]["text"] = "sunny beach weather and waves at the beach"

    def prompt_fn(text, chosen):
        return json.dumps([text, [item["id"] for item in chosen]])

    examples = user_examples(task, "A", items, seed=1, prompt_fn=prompt_fn,
                             ranker=build_ranker("bm25", retrieval_task(task)), num_retrieved=2)
    assert [e.id for e in examples] == [item["id"] for item in items]
    for example in examples:
        text, chosen = json.loads(example.prompt)
        assert text.startswith("Complete the following tweet: ")
        assert len(chosen) == 2 and example.id not in chosen
        assert set(chosen) <= {item["id"] for item in items}
    plain = user_examples(task, "A", items, seed=1, prompt_fn=prompt_fn)
    assert all(json.loads(e.prompt)[1] == [] for e in plain)
    assert [e.target for e in plain] == [e.target for e in examples]


def test_seeds_depend_on_the_seed_and_the_user_only():
    assert derived_seed(42, "u1") == derived_seed(42, "u1")
    assert len({derived_seed(42, "u1"), derived_seed(43, "u1"), derived_seed(42, "u2")}) == 3
    assert 0 <= derived_seed(2**32 - 1, "x" * 1000) < 2**63


# -- training runs -------------------------------------------------------------------------

def sample_users(tmp_path: Path, n: int, name: str = "q.json", start: int = 0) -> str:
    questions = json.loads((SAMPLE / "LaMP_7" / "dev_questions.json").read_text())
    return write(tmp_path / name, questions[start:start + n])


def train_argv(data: str, model: Path, out: Path, *extra: str) -> list[str]:
    return ["--train_data", data, "--task", "LaMP-7", "--model_name", str(model),
            "--output_dir", str(out), "--max_steps", "2", "--per_device_batch_size", "4",
            "--max_length", "96", "--generation_max_length", "16", "--learning_rate", "1e-2",
            "--device", "cpu", *extra]


def adapter_bytes(out: Path, user: str) -> bytes:
    return (user_adapter_dir(out, user) / "adapter_model.safetensors").read_bytes()


@pytest.fixture
def seen(monkeypatch):
    """The examples each user's training got, by user."""
    got: dict[str, list] = {}
    original = user_training.UserAdapterTrainer.train_user

    def spy(self, user, examples, output_dir, extra=None):
        got[user] = list(examples)
        return original(self, user, examples, output_dir, extra)

    monkeypatch.setattr(user_training.UserAdapterTrainer, "train_user", spy)
    return got


def test_a_users_adapter_is_the_same_whoever_trained_before_it(tmp_path, tiny_llama, seen,
                                                               torch_single_thread):
    """OPPU's loop carried earlier users' data into later users' adapters: here user B's
    adapter is byte for byte the one a run with B alone trains, and B's loop saw only B's
    items."""
    both = sample_users(tmp_path, 2, "both.json")
    questions = json.loads(Path(both).read_text())
    user_a, user_b = questions[0]["id"], questions[1]["id"]
    write(tmp_path / "b.json", questions[1:])
    rag = ["--use_profile", "--num_retrieved", "1", "--max_length", "256"]
    with_a = train_user_peft.main(train_argv(both, tiny_llama, tmp_path / "ab", *rag))
    assert with_a["trained"] == sorted([user_a, user_b])
    b_after_a = seen.pop(user_b)
    alone = train_user_peft.main(train_argv(str(tmp_path / "b.json"), tiny_llama,
                                            tmp_path / "b", *rag))
    assert alone["trained"] == [user_b]
    assert adapter_bytes(tmp_path / "ab", user_b) == adapter_bytes(tmp_path / "b", user_b)
    assert adapter_bytes(tmp_path / "ab", user_a) != adapter_bytes(tmp_path / "ab", user_b)
    assert b_after_a == seen[user_b]
    b_items = {item["text"] for item in questions[1]["profile"]}
    for example in b_after_a:
        tweet = next(text for text in b_items if text.endswith(example.target))
        assert example.prompt.count('"') == 2  # one retrieved item, quoted
        retrieved = example.prompt.split('"')[1]  # whole, or cut to fit the budget
        assert any(text.startswith(retrieved) for text in b_items - {tweet})


def test_training_changes_only_the_users_adapter_and_saved_adapters_load(tmp_path, tiny_model,
                                                                         torch_single_thread,
                                                                         monkeypatch):
    import copy

    import torch
    from peft import PeftModel
    from safetensors.torch import load_file

    from LaMP.utils.modeling.model import load_model
    from LaMP.utils.modeling.user_training import TrainSettings, UserAdapterTrainer

    args = train_user_peft.parse_args(train_argv(sample_users(tmp_path, 2), tiny_model,
                                                 tmp_path / "out"))
    lamp_model = train_user_peft.load_base(args)
    base = lamp_model.model.get_base_model()
    before = {name: value.clone() for name, value in base.state_dict().items()
              if "lora_" not in name}
    from LaMP.utils.modeling.peft_methods import build_config, get_method

    settings = TrainSettings(learning_rate=1e-2, weight_decay=0.0, num_train_epochs=1,
                             max_steps=3, batch_size=2, warmup_ratio=0.0,
                             lr_scheduler_type="linear", max_length=96, target_max_length=16)
    trainer = UserAdapterTrainer(
        lamp_model, lambda: build_config(get_method("lora"), vars(args),
                                         seq2seq=lamp_model.is_seq2seq,
                                         model_config=base.config),
        settings, seed=0)
    prompt_fn = lamp_model.prompt_builder(TASKS["LaMP-7"], 96)
    deepcopy = copy.deepcopy

    def no_model_copies(value, *args, **kwargs):
        assert not isinstance(value, torch.nn.Module), "a model (or layer) was deep-copied"
        return deepcopy(value, *args, **kwargs)

    monkeypatch.setattr(copy, "deepcopy", no_model_copies)
    for user, prefix in (("A", "a"), ("B", "b")):
        examples = user_examples(TASKS["LaMP-7"], user, tweets(prefix, 4), seed=0,
                                 prompt_fn=prompt_fn)
        record = trainer.train_user(user, examples, tmp_path / "out")
        assert record["steps"] == 3 and record["items"] == 4
    after = {name: value for name, value in base.state_dict().items() if "lora_" not in name}
    assert before.keys() == after.keys()
    assert all(torch.equal(before[name], after[name]) for name in before)  # the base is untouched
    assert len(lamp_model.model.peft_config) == 1  # A's adapter left when B's came

    saved = {user: load_file(user_adapter_dir(tmp_path / "out", user)
                             / "adapter_model.safetensors") for user in "AB"}
    assert saved["A"].keys() == saved["B"].keys() and saved["A"]
    assert all(name.endswith(("lora_A.weight", "lora_B.weight")) for name in saved["A"])
    assert all(saved["A"][name].shape == saved["B"][name].shape for name in saved["A"])
    assert any(not torch.equal(saved["A"][name], saved["B"][name]) for name in saved["A"])
    assert any(saved["B"][name].abs().sum() > 0 for name in saved["B"] if "lora_B" in name)

    fresh = load_model(str(tiny_model), device="cpu", dtype=torch.float32)
    loaded = PeftModel.from_pretrained(fresh.model, str(user_adapter_dir(tmp_path / "out", "B")))
    weights = {name.replace(".default", ""): value for name, value
               in loaded.state_dict().items() if "lora_" in name}
    for name, value in saved["B"].items():
        assert torch.equal(weights[name], value)


def test_adapters_save_in_bf16_when_asked_and_still_load(tmp_path, tiny_llama,
                                                        torch_single_thread):
    import torch
    from peft import PeftModel
    from safetensors.torch import load_file

    from LaMP.utils.modeling.model import load_model

    data = sample_users(tmp_path, 1)
    result = train_user_peft.main(train_argv(data, tiny_llama, tmp_path / "out",
                                             "--save_dtype", "bf16"))
    folder = user_adapter_dir(tmp_path / "out", result["trained"][0])
    tensors = load_file(folder / "adapter_model.safetensors")
    assert {value.dtype for value in tensors.values()} == {torch.bfloat16}
    record = read_users_index(tmp_path / "out")["users"][result["trained"][0]]
    assert record["bytes"] == sum(p.stat().st_size for p in folder.iterdir()
                                  if p.name != "user.json")
    base = load_model(str(tiny_llama), device="cpu", dtype=torch.float32)
    PeftModel.from_pretrained(base.model, str(folder))  # loads onto the fp32 model


@pytest.fixture
def autocast_seen(monkeypatch):
    """Per training forward pass: whether CPU bf16 autocast was on, and the dtype of every
    trainable parameter then."""
    import torch

    from LaMP.utils.modeling import training

    monkeypatch.setattr(training, "bf16_supported", lambda use_cpu: True)  # native, as here
    seen: list[tuple[bool, set]] = []
    original = user_training.fit_parameters

    def spy(lamp_model, parameters, features, settings, seed):
        def record(module, inputs):
            if module.training:
                seen.append((torch.is_autocast_enabled("cpu"),
                             {parameter.dtype for parameter in parameters}))

        hook = lamp_model.model.register_forward_pre_hook(record)
        try:
            return original(lamp_model, parameters, features, settings, seed)
        finally:
            hook.remove()

    monkeypatch.setattr(user_training, "fit_parameters", spy)
    return seen


@pytest.mark.parametrize("flags, autocast", [((), True), (("--bf16",), True),
                                              (("--no_bf16",), False)])
def test_bf16_autocast_is_on_where_native_unless_refused_and_weights_stay_fp32(
        tmp_path, tiny_llama, torch_single_thread, autocast_seen, flags, autocast):
    import torch
    from safetensors.torch import load_file

    data = sample_users(tmp_path, 1)
    result = train_user_peft.main(train_argv(data, tiny_llama, tmp_path / "out", *flags))
    assert autocast_seen == [(autocast, {torch.float32})] * 2  # two steps
    assert read_users_index(tmp_path / "out")["bf16"] is autocast
    assert json.loads((tmp_path / "out" / "args.json").read_text())["bf16"] is autocast
    folder = user_adapter_dir(tmp_path / "out", result["trained"][0])
    assert {t.dtype for t in load_file(folder / "adapter_model.safetensors").values()} == {
        torch.float32}


def test_bf16_autocast_moves_the_adapter_where_fp32_does(tmp_path, tiny_llama,
                                                         torch_single_thread, monkeypatch):
    from safetensors.torch import load_file

    from LaMP.utils.modeling import training

    monkeypatch.setattr(training, "bf16_supported", lambda use_cpu: True)  # any CPU runs it
    data = sample_users(tmp_path, 1)
    runs = {}
    for flag in ("--bf16", "--no_bf16"):
        result = train_user_peft.main(train_argv(data, tiny_llama, tmp_path / flag, flag))
        folder = user_adapter_dir(tmp_path / flag, result["trained"][0])
        runs[flag] = load_file(folder / "adapter_model.safetensors")
    for name, fp32 in runs["--no_bf16"].items():
        bf16 = runs["--bf16"][name]
        if fp32.abs().max() > 0:  # B moved off zero in both, to within bf16's rounding
            assert (bf16 - fp32).norm() < 0.1 * fp32.norm(), name
            assert not bf16.equal(fp32)


def test_bf16_where_it_is_not_native_is_one_error_and_the_default_is_fp32(
        tmp_path, capsys, monkeypatch):
    from LaMP.utils.modeling import training

    monkeypatch.setattr(training, "bf16_supported", lambda use_cpu: False)
    data = sample_users(tmp_path, 1)
    argv = train_argv(data, tmp_path / "model", tmp_path / "out")
    assert train_user_peft.parse_args(argv).bf16 is False
    assert run_cli(train_user_peft.main, [*argv, "--bf16"], capsys) == (2, [
        "error: --bf16: this CPU has no AVX512-BF16 or AMX-BF16 instructions; use --no_bf16 "
        "or leave both out"])
    assert not (tmp_path / "out").exists()


def test_a_folder_from_before_bf16_was_recorded_continues_in_fp32_only(
        tmp_path, tiny_llama, torch_single_thread, capsys, monkeypatch):
    from LaMP.utils.modeling import training

    monkeypatch.setattr(training, "bf16_supported", lambda use_cpu: True)
    data = sample_users(tmp_path, 2)
    out = tmp_path / "out"
    argv = train_argv(data, tiny_llama, out, "--users", "most_active:1")
    train_user_peft.main([*argv, "--no_bf16"])
    saved = json.loads((out / "args.json").read_text())
    del saved["bf16"]  # as an older run wrote it: it trained in fp32
    (out / "args.json").write_text(json.dumps(saved))
    wider = train_argv(data, tiny_llama, out)
    status, lines = run_cli(train_user_peft.main, wider, capsys)  # the default is bf16 here
    assert status == 2 and len(lines) == 1 and "(--bf16 False then, True now)" in lines[0]
    assert len(train_user_peft.main([*wider, "--no_bf16"])["trained"]) == 1


def test_users_json_records_each_user_and_the_run(tmp_path, tiny_llama, torch_single_thread):
    data = sample_users(tmp_path, 2)
    result = train_user_peft.main(train_argv(data, tiny_llama, tmp_path / "out"))
    index = read_users_index(tmp_path / "out")
    assert index["task"] == "LaMP-7" and index["peft"] == "lora"
    assert index["model_name"] == os.path.abspath(tiny_llama) and index["base_adapter"] is None
    assert index["num_users"] == 2 and index["num_missing"] == 0
    assert list(index["users"]) == result["users"]
    questions = {q["id"]: q for q in json.loads(Path(data).read_text())}
    for user, record in index["users"].items():
        assert record["folder"] == f"users/{user}"
        assert record["items"] == record["profile_items"] == len(questions[user]["profile"])
        assert record["steps"] == 2 and record["final_loss"] > 0
        assert record["seconds"] >= 0 and record["bytes"] > 0
    args = json.loads((tmp_path / "out" / "args.json").read_text())
    assert args["lora_r"] == 8 and args["lora_alpha"] == 32 and args["lora_dropout"] == 0.1
    assert sorted(p.name for p in (tmp_path / "out").iterdir()
                  if p.name != user_store.INDEX_LOCK) == ["args.json", "users", "users.json"]


def test_the_index_is_rebuilt_under_a_lock_and_unlocked_where_none_can_be_taken(
        tmp_path, monkeypatch, caplog):
    import filelock

    out = tmp_path / "out"
    scan = user_store.scan_user_records
    held = []

    def scan_while_locked(output_dir):  # another process's lock cannot be had meanwhile
        with pytest.raises(filelock.Timeout):
            filelock.FileLock(out / user_store.INDEX_LOCK).acquire(blocking=False)
        held.append(True)
        return scan(output_dir)

    monkeypatch.setattr(user_store, "scan_user_records", scan_while_locked)
    assert user_store.write_users_index(out, {"task": "LaMP-7"})["num_users"] == 0
    assert held == [True]
    after = filelock.FileLock(out / user_store.INDEX_LOCK)
    after.acquire(blocking=False)  # released when the rebuild ended
    after.release()

    def refuse(self, *args, **kwargs):
        raise PermissionError(13, "Permission denied")

    monkeypatch.setattr(user_store, "scan_user_records", scan)
    monkeypatch.setattr(filelock.FileLock, "acquire", refuse)
    (out / "users.json").unlink()
    assert user_store.write_users_index(out, {"task": "LaMP-7"})["num_users"] == 0
    assert json.loads((out / "users.json").read_text())["users"] == {}
    assert "users.json is written unlocked" in caplog.text


def test_of_two_shards_that_both_found_no_args_json_the_later_is_refused(tmp_path, monkeypatch):
    import filelock

    out = tmp_path / "out"
    out.mkdir()
    stage = {"stage": "train_user_peft", "lora_r": 8, "bf16": True, "num_shards": 2}
    local = frozenset({"num_shards", "shard_id"})
    # Both checked an empty folder before their work; the first then writes its args.json.
    user_store.check_same_run(out, {**stage, "shard_id": 0}, local, "users")
    user_store.check_same_run(out, {**stage, "bf16": False, "shard_id": 1}, local, "users")
    checked = user_store.check_same_run
    locked = []

    def check_while_locked(*args, **kwargs):
        with pytest.raises(filelock.Timeout):
            filelock.FileLock(out / user_store.INDEX_LOCK).acquire(blocking=False)
        locked.append(True)
        return checked(*args, **kwargs)

    monkeypatch.setattr(user_store, "check_same_run", check_while_locked)
    user_store.save_same_run(out, {**stage, "shard_id": 0}, local, "users")
    saved = (out / "args.json").read_text()
    assert json.loads(saved) == {"stage": "train_user_peft", "lora_r": 8, "bf16": True}
    with pytest.raises(LampError, match=r"--bf16 True then, False now"):
        user_store.save_same_run(out, {**stage, "bf16": False, "shard_id": 1}, local, "users")
    assert (out / "args.json").read_text() == saved and locked == [True, True]
    user_store.save_same_run(out, {**stage, "shard_id": 1}, local, "users")  # the same: joins
    assert (out / "args.json").read_text() == saved


def test_the_defaults_are_the_per_user_recipe(tmp_path):
    args = train_user_peft.parse_args(["--train_data", "q.json", "--task", "LaMP-7",
                                       "--model_name", "m", "--output_dir", "out"])
    assert (args.lora_r, args.lora_alpha, args.lora_dropout) == (8, 32, 0.1)
    assert (args.learning_rate, args.num_train_epochs, args.max_length) == (5e-5, 30, 512)
    assert args.peft == "lora" and args.save_dtype == "fp32"


class Killed(Exception):
    """Stands for a kill after some users (SIGKILL: nothing of the run's own cleanup runs)."""


def test_a_killed_run_resumes_with_only_the_users_not_done(tmp_path, tiny_llama, monkeypatch,
                                                           torch_single_thread):
    data = sample_users(tmp_path, 4)
    out = tmp_path / "out"
    original = user_training.UserAdapterTrainer.fit
    calls = []

    def dies_in_third(self, features, seed):
        calls.append(seed)
        if len(calls) == 3:
            raise Killed()
        return original(self, features, seed)

    monkeypatch.setattr(user_training.UserAdapterTrainer, "fit", dies_in_third)
    with pytest.raises(Killed):
        train_user_peft.main(train_argv(data, tiny_llama, out))
    users = sorted(q["id"] for q in json.loads(Path(data).read_text()))
    done = sorted(p.name for p in (out / "users").iterdir())
    assert done == users[:2]
    # What a SIGKILL during a save leaves: a temporary of a writer that is gone.
    from LaMP.utils.data import fileio

    stale = out / "users" / f".{users[2]}{fileio._TMP_MARK}{fileio._HOST}-4194303-0badcafe.tmp"
    stale.mkdir()
    (stale / "adapter_model.safetensors").write_bytes(b"half")
    first = {user: adapter_bytes(out, user) for user in users[:2]}

    monkeypatch.setattr(user_training.UserAdapterTrainer, "fit", original)
    resumed = train_user_peft.main(train_argv(data, tiny_llama, out))
    assert resumed["trained"] == users[2:]
    assert sorted(p.name for p in (out / "users").iterdir()) == users
    assert all(adapter_bytes(out, user) == first[user] for user in users[:2])
    assert read_users_index(out)["num_users"] == 4

    # A user folder damaged since (a truncated weights file) is trained again; the rest not.
    (user_adapter_dir(out, users[0]) / "adapter_model.safetensors").write_bytes(b"cut")
    again = train_user_peft.main(train_argv(data, tiny_llama, out))
    assert again["trained"] == [users[0]]
    assert adapter_bytes(out, users[0]) == first[users[0]]
    assert train_user_peft.main(train_argv(data, tiny_llama, out))["trained"] == []


def test_a_rerun_on_other_weights_at_the_same_path_is_refused(tmp_path, capsys,
                                                              torch_single_thread):
    from conftest import build_tiny_llama

    model = build_tiny_llama(tmp_path / "model")
    data = sample_users(tmp_path, 2)
    out = tmp_path / "out"
    first = train_user_peft.main(train_argv(data, model, out))
    record = json.loads((user_adapter_dir(out, first["trained"][0]) / "user.json").read_text())
    assert record["base_model"]["name"] == str(model) and record["base_adapter"] is None
    build_tiny_llama(model, seed=1)  # the same path and layers, other weights
    before = {p: p.read_bytes() for p in out.rglob("*") if p.is_file()}
    code, lines = run_cli(train_user_peft.main, train_argv(data, model, out), capsys)
    assert code == 2 and lines[-1] == (
        f"error: --output_dir {out}: users trained on another base model or task adapter than "
        f"--model_name / --base_adapter name now: 2 (first: {first['trained'][0]!r}, "
        f"{first['trained'][1]!r}) (e.g. {user_adapter_dir(out, first['trained'][0])}/"
        "user.json); choose another --output_dir")
    assert {p: p.read_bytes() for p in out.rglob("*") if p.is_file()} == before


def test_shards_and_launched_processes_train_disjoint_users(tmp_path, tiny_llama, monkeypatch,
                                                            torch_single_thread):
    data = sample_users(tmp_path, 5)
    out = tmp_path / "out"
    trained = []
    for shard in range(2):
        result = train_user_peft.main(train_argv(data, tiny_llama, out, "--num_shards", "2",
                                                 "--shard_id", str(shard)))
        trained.append(result["trained"])
    users = sorted(q["id"] for q in json.loads(Path(data).read_text()))
    assert sorted(trained[0] + trained[1]) == users and not set(trained[0]) & set(trained[1])
    assert read_users_index(out)["num_missing"] == 0

    # Under torchrun each process of a shard takes its own share of the shard's users.
    monkeypatch.setenv("WORLD_SIZE", "2")
    monkeypatch.setenv("RANK", "1")
    monkeypatch.setenv("LOCAL_RANK", "1")
    result = train_user_peft.main(train_argv(data, tiny_llama, tmp_path / "ranks",
                                             "--num_shards", "2", "--shard_id", "1"))
    assert result["shard_users"] == users[3::4]
    assert read_users_index(tmp_path / "ranks")["num_missing"] == len(users) - 1


def test_a_base_adapter_is_merged_before_per_user_training(tmp_path, tiny_llama,
                                                          torch_single_thread):
    import torch
    from peft import LoraConfig, TaskType, get_peft_model
    from transformers import AutoModelForCausalLM

    torch.manual_seed(5)
    task_adapter = get_peft_model(AutoModelForCausalLM.from_pretrained(tiny_llama),
                                  LoraConfig(task_type=TaskType.CAUSAL_LM, r=4,
                                             init_lora_weights=False))
    task_adapter.save_pretrained(tmp_path / "task")
    data = sample_users(tmp_path, 1)
    plain = train_user_peft.main(train_argv(data, tiny_llama, tmp_path / "plain"))
    merged = train_user_peft.main(train_argv(data, tiny_llama, tmp_path / "merged",
                                             "--base_adapter", str(tmp_path / "task")))
    user = plain["trained"][0]
    assert merged["trained"] == [user]
    assert adapter_bytes(tmp_path / "plain", user) != adapter_bytes(tmp_path / "merged", user)
    assert read_users_index(tmp_path / "merged")["base_adapter"] == str(tmp_path / "task")
    assert (plain["records"][0]["final_loss"] != merged["records"][0]["final_loss"])


@pytest.mark.parametrize("peft", ["ia3", "prompt_tuning", "prefix_tuning"])
def test_other_methods_train_per_user_too(tmp_path, tiny_llama, peft, torch_single_thread):
    from peft import PeftModel

    from LaMP.utils.modeling.model import load_model

    data = sample_users(tmp_path, 2)
    result = train_user_peft.main(train_argv(data, tiny_llama, tmp_path / "out", "--peft", peft,
                                             "--num_virtual_tokens", "4"))
    assert len(result["trained"]) == 2
    base = load_model(str(tiny_llama), device="cpu")
    PeftModel.from_pretrained(base.model, str(user_adapter_dir(tmp_path / "out",
                                                               result["trained"][1])))


# -- bad input: one error line -------------------------------------------------------------

@pytest.fixture
def no_model_loads(monkeypatch):
    import LaMP.utils.modeling.model as modeling

    def refuse(*args, **kwargs):
        raise AssertionError("a model was loaded before the user error was reported")

    for name in ("load_model", "load_model_and_tokenizer", "load_pretrained"):
        monkeypatch.setattr(modeling, name, refuse)


def bad_case(tmp_path: Path, case: str) -> tuple[list[str], str]:
    """argv and the expected error line of one mistake."""
    data = sample_users(tmp_path, 2)
    out = tmp_path / "out"
    argv = train_argv(data, Path("no/model"), out)
    if case == "no items":
        write(tmp_path / "q.json", [question("1", tweets("a", 2)), question("2", [])])
        return argv, (f"error: {tmp_path / 'q.json'}: users with no profile item a LaMP-7 "
                      "per-user example can be made from: 1 (first: 2)")
    if case == "one-word tweets":
        write(tmp_path / "q.json", [question("1", [{"id": "t", "text": "hi"}], "u1")])
        return argv, (f"error: {tmp_path / 'q.json'}: users with no profile item a LaMP-7 "
                      "per-user example can be made from: 1 (first: u1)")
    if case == "output is the data":
        return train_argv(data, Path("no/model"), Path(data)), \
            f"error: --output_dir {data} exists and is not a folder"
    if case == "output holds the data":
        return train_argv(data, Path("no/model"), tmp_path), \
            f"error: --output_dir {tmp_path} contains the input --train_data {data}; choose " \
            "another output path"
    if case == "peft none":
        return argv + ["--peft", "none"], (
            "error: --peft none trains the whole model: per-user training needs an adapter "
            "method (one copy of the model per user is what it avoids)")
    if case == "is_ranked":
        return argv + ["--is_ranked"], (
            "error: --is_ranked: a file's ranking orders the profile for its question; "
            "per-user training retrieves for each profile item among the user's other items "
            "(leave it out and choose --retriever)")
    if case == "shard id":
        return argv + ["--num_shards", "2", "--shard_id", "2"], \
            "error: --shard_id must be in 0 … 1"
    if case == "no shards":
        return argv + ["--num_shards", "0"], "error: --num_shards must be at least 1"
    if case == "missing data":
        return train_argv(str(tmp_path / "nope.json"), Path("no/model"), out), \
            f"error: --train_data {tmp_path / 'nope.json'} does not exist"
    if case == "bad json":
        (tmp_path / "bad.json").write_text('[{"id": "1", "input": "x", "profile": [}]')
        return train_argv(str(tmp_path / "bad.json"), Path("no/model"), out), \
            f"error: {tmp_path / 'bad.json'}: malformed JSON"
    if case == "base adapter missing":
        return argv + ["--base_adapter", str(tmp_path / "none")], \
            f"error: --base_adapter {tmp_path / 'none'} is not a folder (a peft adapter " \
            "folder, e.g. train_llm.py's --output_dir)"
    if case == "base adapter not mergeable":
        folder = tmp_path / "pt"
        folder.mkdir()
        (folder / "adapter_config.json").write_text(json.dumps(
            {"peft_type": "PROMPT_TUNING", "num_virtual_tokens": 4}))
        (folder / "adapter_model.bin").write_bytes(b"\x80\x02}q\x00.")
        return argv + ["--base_adapter", str(folder)], (
            f"error: --base_adapter {folder}: a prompt_tuning adapter cannot be merged into "
            "the base model (LoRA-family and ia3 adapters can)")
    if case == "another stage's folder":
        out.mkdir()
        (out / "adapter_config.json").write_text("{}")
        return argv, (f"error: --output_dir {out} holds another stage's run "
                      "(adapter_config.json); choose another folder")
    if case == "other settings":
        out.mkdir()
        saved = train_user_peft.run_arguments(train_user_peft.parse_args(argv))
        (out / "args.json").write_text(json.dumps({**saved, "lora_r": 16}))
        return argv, (f"error: --output_dir {out} holds per-user adapters trained with other "
                      "settings (--lora_r 16 then, 8 now); rerun with the same flags or choose "
                      "another folder")
    if case == "output inside the model":
        (tmp_path / "model").mkdir()
        return train_argv(data, tmp_path / "model", tmp_path / "model" / "users"), (
            f"error: --output_dir {tmp_path / 'model' / 'users'} is inside the input "
            f"--model_name {tmp_path / 'model'}; choose another output path")
    if case == "output is the base adapter":
        (tmp_path / "task").mkdir()
        return train_argv(data, Path("no/model"), tmp_path / "task") + [
            "--base_adapter", str(tmp_path / "task")], (
            f"error: --output_dir {tmp_path / 'task'} is the input --base_adapter "
            f"{tmp_path / 'task'}; choose another output path")
    if case == "users is a file":
        out.mkdir()
        (out / "users").write_text("x")
        return argv, f"error: --output_dir {out / 'users'} exists and is not a folder"
    if case == "users.json is a folder":
        (out / "users.json").mkdir(parents=True)
        return argv, (f"error: --output_dir {out}: users.json is a folder; remove it or "
                      "choose another folder")
    if case == "duplicate ids":
        write(tmp_path / "q.json", [question("7", tweets("a", 2)), question(7, tweets("b", 2))])
        return argv, f"error: {tmp_path / 'q.json'}: duplicate question ids: 1 (first: 7)"
    if case == "mixed splits":
        write(tmp_path / "q.json", [question("1", tweets("a", 2), "u1"),
                                    question("2", tweets("b", 2))])
        return argv, (f"error: {tmp_path / 'q.json'}: some questions name their user_id and "
                      "some do not (e.g. 1 does, 2 does not); use one split's file")
    if case == "user id type":
        write(tmp_path / "q.json", [question("1", tweets("a", 2), ["u"])])
        return argv, (f"error: {tmp_path / 'q.json'}: question 1: \"user_id\" must be a string "
                      "or an integer, not ['u']")
    if case == "user id too long":
        write(tmp_path / "q.json", [question("1", tweets("a", 2), "/" * 100)])
        return argv, f"error: user id '{'/' * 40}'… is too long for a folder name"
    if case == "empty file":
        write(tmp_path / "q.json", [])
        return argv, f"error: {tmp_path / 'q.json'}: no questions"
    if case == "scheduler":
        return argv + ["--lr_scheduler_type", "warmup_stable_decay"], \
            "error: --lr_scheduler_type warmup_stable_decay: "
    if case == "device":
        return argv + ["--device", "tpu"], "error: unknown device 'tpu'; use cpu, cuda or cuda:N"
    raise AssertionError(case)


BAD_CASES = ["no items", "one-word tweets", "output is the data", "output holds the data",
             "peft none", "is_ranked", "shard id", "no shards", "missing data", "bad json",
             "base adapter missing", "base adapter not mergeable", "another stage's folder",
             "other settings", "duplicate ids", "mixed splits", "user id type",
             "user id too long", "empty file", "scheduler", "device",
             "output inside the model", "output is the base adapter", "users is a file",
             "users.json is a folder"]

DATA_CASES = ("no items", "one-word tweets", "duplicate ids", "mixed splits", "user id type",
              "user id too long", "empty file")


@pytest.mark.parametrize("case", BAD_CASES)
def test_bad_input_is_one_error_line_before_any_model_loads(tmp_path, capsys, no_model_loads,
                                                            case):
    argv, expected = bad_case(tmp_path, case)
    if case in DATA_CASES:
        argv[1] = str(tmp_path / "q.json")
    before = {p: p.read_bytes() for p in tmp_path.rglob("*") if p.is_file()}
    code, lines = run_cli(train_user_peft.main, argv, capsys)
    assert code == 2
    assert lines[-1].startswith(expected), lines
    # One error line, the last; what comes before is the log's progress lines.
    assert [line for line in lines if line.startswith(("error:", "Traceback"))] == lines[-1:]
    assert {p: p.read_bytes() for p in tmp_path.rglob("*") if p.is_file()} == before
    assert not (tmp_path / "out" / "users").is_dir()


def test_a_task_without_a_per_user_template_is_one_error(tmp_path, capsys, monkeypatch):
    from dataclasses import replace

    import LaMP.utils.tasks as tasks

    monkeypatch.setitem(tasks.TASKS, "LaMP-7", replace(TASKS["LaMP-7"], user_template=None))
    code, lines = run_cli(train_user_peft.main,
                          train_argv(sample_users(tmp_path, 1), Path("m"), tmp_path / "o"), capsys)
    assert (code, lines) == (2, ["error: LaMP-7 has no per-user training template"])


def test_a_model_that_cannot_serve_is_one_error_and_writes_nothing(tmp_path, tiny_t5, capsys):
    code, lines = run_cli(train_user_peft.main,
                          train_argv(sample_users(tmp_path, 1), tiny_t5, tmp_path / "out",
                                     "--chat_template"), capsys)
    assert code == 2
    assert lines[-1] == f"error: --chat_template: the tokenizer of {tiny_t5} has no chat template"
    assert not (tmp_path / "out").exists()


def test_a_pipe_as_train_data_is_refused_from_the_command_line(tmp_path):
    done = subprocess.run(
        [sys.executable, str(REPO / "LaMP" / "train_user_peft.py"),
         *train_argv("/dev/stdin", Path("no/model"), tmp_path / "out")],
        input="[]", capture_output=True, text=True, timeout=120)
    assert done.returncode == 2
    assert done.stderr.strip().splitlines() == [
        "error: --train_data /dev/stdin is a pipe; a regular file is needed because it is "
        "read twice: once for its users, once for their profiles"]
    assert not (tmp_path / "out").exists()


def test_an_atomic_folder_appears_whole_or_not_at_all(tmp_path):
    from LaMP.utils.data.fileio import atomic_folder

    target = tmp_path / "users" / "u"
    with pytest.raises(Killed):
        with atomic_folder(target) as temporary:
            (temporary / "adapter_model.safetensors").write_bytes(b"x")
            raise Killed()
    assert list((tmp_path / "users").iterdir()) == []
    with atomic_folder(target) as temporary:
        (temporary / "a").write_text("1")
        assert not target.exists()
    assert [p.name for p in (tmp_path / "users").iterdir()] == ["u"]
    assert (target / "a").read_text() == "1"
    with pytest.raises(LampError, match="written by another run at the same time"):
        with atomic_folder(target) as temporary:
            (temporary / "a").write_text("2")
    assert (target / "a").read_text() == "1"
    assert [p.name for p in (tmp_path / "users").iterdir()] == ["u"]


def test_a_sigkill_mid_run_loses_at_most_the_user_in_progress(tmp_path, tiny_llama):
    """A real kill: the run is stopped (SIGKILL, no clean-up of its own) once its first user
    is saved; the rerun trains exactly the users without a folder and leaves no temporary."""
    import signal
    import time

    data = sample_users(tmp_path, 3)
    out = tmp_path / "out"
    argv = train_argv(data, tiny_llama, out)
    argv[argv.index("--max_steps") + 1] = "150"  # long enough per user to be caught mid-way
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    process = subprocess.Popen([sys.executable, str(REPO / "LaMP" / "train_user_peft.py"),
                                *argv], env=env, stdout=subprocess.DEVNULL,
                               stderr=subprocess.DEVNULL)
    try:
        deadline = time.monotonic() + 300
        while not (out / "users").is_dir() or not any(
                not p.name.startswith(".") for p in (out / "users").iterdir()):
            assert process.poll() is None and time.monotonic() < deadline
            time.sleep(0.05)
    finally:
        process.send_signal(signal.SIGKILL)
        process.wait()
    done = sorted(p.name for p in (out / "users").iterdir() if not p.name.startswith("."))
    users = sorted(q["id"] for q in json.loads(Path(data).read_text()))
    assert 1 <= len(done) < len(users)
    first = {user: adapter_bytes(out, user) for user in done}
    rerun = subprocess.run([sys.executable, str(REPO / "LaMP" / "train_user_peft.py"), *argv],
                           env=env, capture_output=True, text=True, timeout=600)
    assert rerun.returncode == 0, rerun.stderr[-2000:]
    assert sorted(p.name for p in (out / "users").iterdir()) == users  # no temporary left
    assert all(adapter_bytes(out, user) == first[user] for user in done)
    assert f"{len(users)} users, {len(done)} already done" in rerun.stderr
    assert read_users_index(out)["num_missing"] == 0
