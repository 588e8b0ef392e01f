"""Training recipes (LaMP/utils/modeling/recipes.py): each row's per-user examples and
hyper-parameters, flags that override a row, gradient clipping in the per-user loop, and
the choice of users (--users most_active:N or a file of ids)."""
from __future__ import annotations

import json
from pathlib import Path

import pytest

from conftest import SAMPLE, load_script
from LaMP.utils.data.users import choose_users, most_active_users, profile_sizes, read_user_ids
from LaMP.utils.errors import LampError
from LaMP.utils.modeling.recipes import RECIPE_FLAGS, RECIPES, TASK_STAGE, USER_STAGE, get_recipe
from LaMP.utils.modeling.user_store import read_users_index
from LaMP.utils.modeling.user_training import item_examples
from LaMP.utils.tasks import MOVIE_TAGS, TASKS

train_user_peft = load_script("LaMP/train_user_peft.py")
train_llm = load_script("LaMP/train_llm.py")
make_subset = load_script("LaMP/utils/make_subset.py")

ITEM = {"id": "9", "title": "A Title", "abstract": "An abstract.", "description": "A heist.",
        "tag": "comedy", "text": "Some text here.", "score": "4", "category": "crime"}
TAGS = ", ".join(MOVIE_TAGS)


# -- the rows' per-user examples -------------------------------------------------------------

@pytest.mark.parametrize("task, expected", [
    ("LaMP-2", ("Which tag does this movie relate to among the following tags? Just answer "
                f"with the tag name without further explanation. tags: [{TAGS}]\n description: "
                "A heist. tag:", "comedy", "A heist.")),
    ("LaMP-2N", ("Which category does this article relate to among the following categories? "
                 "Just answer with the category name without further explanation. categories: "
                 "[travel, education, parents, style & beauty, entertainment, food & drink, "
                 "science & technology, business, sports, healthy living, women, politics, "
                 "crime, culture & arts, religion]\n article: Some text here. category:",
                 "crime", "Some text here.")),
    ("LaMP-3", ("What is the score of the following review on a scale of 1 to 5? just answer "
                "with 1, 2, 3, 4, or 5 without further explanation. review: Some text here.\n "
                "score:", "4", "Some text here.")),
    ("LaMP-4", ("Generate a headline for the following article.\n article: Some text here. "
                "headline:", "A Title", "Some text here.")),
    ("LaMP-5", ("Generate a title for the following abstract of a paper.\n abstract: An "
                "abstract. title:", "A Title", "An abstract.")),
    ("LaMP-7", ("tweet:", "Some text here.", "Some text here.")),
])
def test_oppu_examples_are_its_prompt_json_pairs(task, expected):
    assert get_recipe("oppu").user_template(TASKS[task]).example(ITEM) == expected


def test_oppu_lamp7_learns_the_whole_tweet_mention_and_all():
    """LaMP's template shows a tweet's start (an @mention, for 62% of real LaMP-7 dev
    profile tweets) and learns the rest; OPPU's shows nothing and learns the whole tweet."""
    tweet = {"id": "1", "text": "@alice  see you at the beach tomorrow"}
    items = [tweet, {"id": "2", "text": "hi"}, {"id": "3", "text": "  "}]
    made = item_examples(TASKS["LaMP-7"], "u", items, seed=0,
                         template=get_recipe("oppu").user_template(TASKS["LaMP-7"]))
    # A one-word tweet is a whole target; an empty one has nothing to learn.
    assert [example for _, example in made] == [
        ("tweet:", "@alice see you at the beach tomorrow",
         "@alice see you at the beach tomorrow"), ("tweet:", "hi", "hi")]
    lamp = item_examples(TASKS["LaMP-7"], "u", items, seed=0)
    assert [example[0] for _, example in lamp] == ["Complete the following tweet: @alice"]


def test_oppu_cuts_every_field_to_its_first_768_words():
    words = [f"w{i}" for i in range(800)]
    item = {**ITEM, "abstract": " ".join(words), "title": "T  two"}
    prompt, target, query = get_recipe("oppu").user_template(TASKS["LaMP-5"]).example(item)
    assert query == " ".join(words[:768]) and target == "T two"
    assert prompt.endswith(f"abstract: {' '.join(words[:768])} title:")
    # LaMP's templates keep the field whole.
    assert TASKS["LaMP-5"].user_template.example(item)[2] == " ".join(words)


def test_the_lamp_row_is_each_tasks_own_template():
    for task in TASKS.values():
        assert get_recipe("lamp").user_template(task) is task.user_template


@pytest.mark.parametrize("task", ["LaMP-1", "LaMP-6"])
def test_a_task_without_an_oppu_template_is_one_error(task, capsys):
    with pytest.raises(SystemExit) as exited:
        train_user_peft.parse_args(["--train_data", "q.json", "--task", task, "--model_name",
                                    "m", "--output_dir", "out", "--recipe", "oppu"])
    assert exited.value.code == 2
    assert capsys.readouterr().err == (
        f"error: --recipe oppu has no per-user template for {task} (OPPU's LaMP-1 template "
        "writes a 'citation' field LaMP profile items do not have, and OPPU has no LaMP-6); "
        "its tasks: LaMP-2, LaMP-2N, LaMP-3, LaMP-4, LaMP-5, LaMP-7\n")


# -- the rows' hyper-parameters --------------------------------------------------------------

USER_ARGV = ["--train_data", "q.json", "--task", "LaMP-7", "--model_name", "m",
             "--output_dir", "out"]
TASK_ARGV = ["--train_data", "t.json", "--validation_data", "v.json", "--task", "LaMP-7",
             "--model_name", "m", "--output_dir", "out"]
QKV = ["q", "k", "v", "q_proj", "k_proj", "v_proj"]

# (script, recipe) -> the values as read from each paper's released code.
EXPECTED = {
    ("user", "lamp"): dict(learning_rate=5e-5, num_train_epochs=30, per_device_batch_size=16,
                           weight_decay=1e-4, warmup_ratio=0.05, lr_scheduler_type="linear",
                           max_grad_norm=1.0, lora_r=8, lora_alpha=32, lora_dropout=0.1,
                           lora_target_modules=None),
    ("user", "oppu"): dict(learning_rate=1e-4, num_train_epochs=2, per_device_batch_size=16,
                           weight_decay=0.01, warmup_ratio=0.1, lr_scheduler_type="linear",
                           max_grad_norm=0.3, lora_r=8, lora_alpha=8, lora_dropout=0.05,
                           lora_target_modules=None),
    ("task", "lamp"): dict(learning_rate=5e-5, num_train_epochs=10, per_device_batch_size=16,
                           weight_decay=1e-4, warmup_ratio=0.05, lr_scheduler_type="linear",
                           max_grad_norm=1.0, lora_r=16, lora_alpha=32, lora_dropout=0.05,
                           lora_target_modules=None),
    ("task", "oppu"): dict(learning_rate=1e-4, num_train_epochs=3, per_device_batch_size=16,
                           weight_decay=0.01, warmup_ratio=0.1, lr_scheduler_type="linear",
                           max_grad_norm=0.3, lora_r=8, lora_alpha=8, lora_dropout=0.05,
                           lora_target_modules=QKV),
}


def parsed(script: str, *extra: str):
    if script == "user":
        return train_user_peft.parse_args(USER_ARGV + list(extra))
    return train_llm.parse_args(TASK_ARGV + list(extra))


@pytest.mark.parametrize("script, recipe", sorted(EXPECTED))
def test_each_recipe_sets_its_hyperparameters(script, recipe):
    args = parsed(script, "--recipe", recipe)
    assert {flag: getattr(args, flag) for flag in EXPECTED[script, recipe]} == \
        EXPECTED[script, recipe]
    assert args.recipe == recipe


@pytest.mark.parametrize("script", ["user", "task"])
def test_without_recipe_the_defaults_are_the_lamp_row(script):
    args = parsed(script)
    assert args.recipe == "lamp"
    assert {flag: getattr(args, flag) for flag in RECIPE_FLAGS} == EXPECTED[script, "lamp"]


def test_every_row_sets_every_recipe_flag_for_both_stages():
    for recipe in RECIPES.values():
        for stage in (USER_STAGE, TASK_STAGE):
            assert sorted(recipe.settings[stage]) == sorted(RECIPE_FLAGS), (recipe.name, stage)


@pytest.mark.parametrize("script", ["user", "task"])
def test_explicit_flags_override_the_recipe(script):
    args = parsed(script, "--recipe", "oppu", "--learning_rate", "3e-4", "--lora_alpha", "16",
                  "--max_grad_norm", "1.0", "--lora_target_modules", "q_proj")
    expected = {**EXPECTED[script, "oppu"], "learning_rate": 3e-4, "lora_alpha": 16,
                "max_grad_norm": 1.0, "lora_target_modules": ["q_proj"]}
    assert {flag: getattr(args, flag) for flag in RECIPE_FLAGS} == expected
    # Given before --recipe, or equal to the lamp row's value: still the user's.
    args = parsed(script, "--num_train_epochs", "30", "--recipe", "oppu")
    assert args.num_train_epochs == 30 and args.lora_alpha == 8


def test_a_flag_set_by_the_recipe_is_still_checked(capsys):
    with pytest.raises(SystemExit):
        parsed("user", "--recipe", "oppu", "--max_grad_norm", "-1")
    assert capsys.readouterr().err == "error: --max_grad_norm must be >= 0 (0: no clipping)\n"


def test_train_llm_passes_clipping_and_the_recipe_to_the_trainer(tmp_path):
    arguments = train_llm.training_arguments(parsed("task", "--recipe", "oppu"), tmp_path)
    assert (arguments.max_grad_norm, arguments.learning_rate, arguments.weight_decay,
            arguments.num_train_epochs) == (0.3, 1e-4, 0.01, 3)
    assert train_llm.training_arguments(parsed("task"), tmp_path).max_grad_norm == 1.0


def sample_users(tmp_path: Path, n: int) -> str:
    questions = json.loads((SAMPLE / "LaMP_7" / "dev_questions.json").read_text())[:n]
    path = tmp_path / "q.json"
    path.write_text(json.dumps(questions))
    return str(path)


def train_argv(data: str, model: Path, out: Path, *extra: str) -> list[str]:
    return ["--train_data", data, "--task", "LaMP-7", "--model_name", str(model),
            "--output_dir", str(out), "--max_steps", "2", "--per_device_batch_size", "4",
            "--max_length", "96", "--generation_max_length", "16", "--device", "cpu", *extra]


def test_a_run_records_its_recipe_and_the_values_it_trained_with(tmp_path, tiny_llama,
                                                                 torch_single_thread):
    data = sample_users(tmp_path, 1)
    train_user_peft.main(train_argv(data, tiny_llama, tmp_path / "out", "--recipe", "oppu",
                                    "--learning_rate", "1e-2"))
    args = json.loads((tmp_path / "out" / "args.json").read_text())
    index = read_users_index(tmp_path / "out")
    effective = {**EXPECTED["user", "oppu"], "learning_rate": 1e-2, "per_device_batch_size": 4}
    assert args["recipe"] == index["recipe"] == "oppu"
    assert {flag: args[flag] for flag in RECIPE_FLAGS} == index["training"] == effective
    config = json.loads(next((tmp_path / "out" / "users").glob("*/adapter_config.json"))
                        .read_text())
    assert (config["r"], config["lora_alpha"], config["lora_dropout"]) == (8, 8, 0.05)
    assert sorted(config["target_modules"]) == ["q_proj", "v_proj"]  # q/v, as OPPU's


def test_a_rerun_under_another_recipe_is_refused(tmp_path, tiny_llama, capsys,
                                                 torch_single_thread):
    from LaMP.utils.cli.program import run

    data = sample_users(tmp_path, 1)
    out = tmp_path / "out"
    train_user_peft.main(train_argv(data, tiny_llama, out, "--recipe", "oppu"))
    assert run(train_user_peft.main, train_argv(data, tiny_llama, out)) == 2
    assert "(--learning_rate 0.0001 then, 5e-05 now, --lora_alpha 8 then, 32 now, " \
        "--lora_dropout 0.05 then, 0.1 now)" in capsys.readouterr().err


# -- gradient clipping in the per-user loop -----------------------------------------------

def steep_llama(folder: Path, tiny_llama: Path) -> Path:
    """The tiny Llama with its output layer scaled up 10,000 times: every step's gradient
    is enormous, so a loop without clipping applies it whole."""
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    model = AutoModelForCausalLM.from_pretrained(tiny_llama)
    with torch.no_grad():
        model.lm_head.weight.mul_(1e4)
    model.save_pretrained(folder)
    AutoTokenizer.from_pretrained(tiny_llama).save_pretrained(folder)
    return folder


@pytest.fixture
def optimizer_steps(monkeypatch):
    """Each AdamW step of the per-user loop: its weight decay and the total norm of the
    gradient it applies."""
    import torch

    steps: list[dict] = []
    original = torch.optim.AdamW.step

    def step(self, *args, **kwargs):
        grads = [p.grad for group in self.param_groups for p in group["params"]
                 if p.grad is not None]
        steps.append({"norm": float(torch.linalg.vector_norm(
            torch.stack([torch.linalg.vector_norm(g) for g in grads]))),
            "weight_decay": self.param_groups[0]["weight_decay"]})
        return original(self, *args, **kwargs)

    monkeypatch.setattr(torch.optim.AdamW, "step", step)
    return steps


def test_clipping_bounds_every_steps_gradient_where_it_would_explode_without(
        tmp_path, tiny_llama, optimizer_steps, torch_single_thread):
    model = steep_llama(tmp_path / "steep", tiny_llama)
    data = sample_users(tmp_path, 1)
    flags = ["--max_steps", "4", "--weight_decay", "0.01", "--learning_rate", "1e-3"]
    train_user_peft.main(train_argv(data, model, tmp_path / "raw", *flags,
                                    "--max_grad_norm", "0"))
    unclipped = list(optimizer_steps)
    optimizer_steps.clear()
    train_user_peft.main(train_argv(data, model, tmp_path / "clipped", *flags,
                                    "--max_grad_norm", "0.3"))
    assert len(unclipped) == len(optimizer_steps) == 4
    assert min(step["norm"] for step in unclipped) > 1000 * 0.3  # explodes without
    assert all(step["norm"] <= 0.3 * (1 + 1e-5) for step in optimizer_steps)
    assert {step["weight_decay"] for step in unclipped + optimizer_steps} == {0.01}
    user = read_users_index(tmp_path / "clipped")["users"]
    assert all(record["final_loss"] == record["final_loss"] for record in user.values())


def test_a_gradient_within_the_bound_is_left_alone(tmp_path, tiny_llama, optimizer_steps,
                                                   torch_single_thread):
    data = sample_users(tmp_path, 1)
    train_user_peft.main(train_argv(data, tiny_llama, tmp_path / "a", "--max_grad_norm", "0"))
    free = [step["norm"] for step in optimizer_steps]
    optimizer_steps.clear()
    train_user_peft.main(train_argv(data, tiny_llama, tmp_path / "b", "--max_grad_norm",
                                    str(2 * max(free))))
    assert [step["norm"] for step in optimizer_steps] == free
    assert (next((tmp_path / "a" / "users").glob("*/adapter_model.safetensors")).read_bytes()
            == next((tmp_path / "b" / "users").glob("*/adapter_model.safetensors")).read_bytes())


# -- choosing users --------------------------------------------------------------------------

def q(qid, items, user=None) -> dict:
    entry = {"id": qid, "input": "Paraphrase the following tweet without any explanation "
             "before or after it: x", "profile": [{"id": i, "text": f"tweet {i}"} for i in items]}
    if user is not None:
        entry["user_id"] = user
    return entry


def test_most_active_takes_the_longest_profiles_ties_by_id():
    questions = [q("1", "ab"), q("2", "abcd"), q("3", "xyz"), q("4", "pqr"), q("5", "z")]
    sizes = profile_sizes(questions)
    assert sizes == {"1": 2, "2": 4, "3": 3, "4": 3, "5": 1}
    assert most_active_users(sizes, 3) == ["2", "3", "4"]
    assert most_active_users(sizes, 2) == ["2", "3"]  # 3 and 4 tie: the smaller id
    assert choose_users("most_active:2", sorted(sizes), lambda: sizes) == ["2", "3"]


def test_a_time_split_users_shared_items_count_once():
    questions = [q("1", "abc", "A"), q("2", "bcd", "A"), q("3", "wxyz", "B"),
                 q("4", "a", "C"), q("5", "ab", "C"), q("6", "bcd", "C")]
    # A has a-d (4), B w-z (4), C a-d (4): three-way tie, by id.
    assert profile_sizes(questions) == {"A": 4, "B": 4, "C": 4}
    questions.append(q("7", "e", "C"))
    assert most_active_users(profile_sizes(questions), 2) == ["C", "A"]


def test_a_file_of_ids_is_a_json_list_or_one_id_a_line(tmp_path):
    (tmp_path / "ids.json").write_text('[7, "b", "7", 8]')
    (tmp_path / "ids.txt").write_text("\ufeff b\n\n7 \n")
    assert read_user_ids(tmp_path / "ids.json") == ["7", "b", "8"]
    assert read_user_ids(tmp_path / "ids.txt") == ["b", "7"]
    assert choose_users(str(tmp_path / "ids.txt"), ["7", "8", "b"]) == ["7", "b"]


@pytest.mark.parametrize("content, error", [
    ('["a", ["b"]]', "a user id must be a string or an integer, not ['b']"),
    ("[1, 2", "malformed JSON"),
    ("\n \n", "no user ids"),
    ("a\nzz\nyy\n", "ids that are no user of the data: 2 (first: zz, yy)"),
])
def test_a_bad_file_of_ids_is_one_error(tmp_path, content, error):
    (tmp_path / "ids").write_text(content)
    with pytest.raises(LampError) as raised:
        choose_users(str(tmp_path / "ids"), ["a", "b"])
    assert error in str(raised.value)


def test_most_active_asks_for_no_more_users_than_there_are():
    with pytest.raises(LampError, match=r"--users most_active:3: the data has 2 users"):
        choose_users("most_active:3", ["a", "b"], lambda: {"a": 1, "b": 2})


@pytest.mark.parametrize("spec", ["most_active:0", "most_active:x", "most_active:", ""])
def test_a_malformed_users_flag_is_a_parse_error(spec, capsys):
    with pytest.raises(SystemExit) as exited:
        train_user_peft.parse_args(USER_ARGV + ["--users", spec])
    assert exited.value.code == 2
    assert capsys.readouterr().err.startswith("error: argument --users: ")


def test_training_takes_only_the_users_asked_for(tmp_path, tiny_llama, torch_single_thread):
    questions = json.loads((SAMPLE / "LaMP_7" / "dev_questions.json").read_text())[:4]
    data = tmp_path / "q.json"
    data.write_text(json.dumps(questions))
    ranked = sorted(questions, key=lambda x: (-len(x["profile"]), x["id"]))
    result = train_user_peft.main(train_argv(str(data), tiny_llama, tmp_path / "out",
                                             "--users", "most_active:1"))
    assert result["trained"] == [ranked[0]["id"]]
    assert read_users_index(tmp_path / "out")["num_users_in_data"] == 1
    (tmp_path / "ids").write_text(f"{ranked[1]['id']}\n")
    # The choice is the run's own: another one may fill the same folder.
    result = train_user_peft.main(train_argv(str(data), tiny_llama, tmp_path / "out",
                                             "--users", str(tmp_path / "ids")))
    assert result["trained"] == [ranked[1]["id"]]
    assert read_users_index(tmp_path / "out")["num_users"] == 2


def subset(tmp_path, questions, *extra) -> tuple[int, list]:
    from LaMP.utils.cli.program import run

    (tmp_path / "q.json").write_text(json.dumps(questions))
    (tmp_path / "o.json").write_text(json.dumps({"task": "LaMP_7", "golds": [
        {"id": x["id"], "output": f"gold {x['id']}"} for x in questions]}))
    argv = ["--questions_addr", str(tmp_path / "q.json"), "--outputs_addr",
            str(tmp_path / "o.json"), "--output_questions_addr", str(tmp_path / "kq.json"),
            "--output_outputs_addr", str(tmp_path / "ko.json"), *extra]
    try:
        code = run(make_subset.main, argv)
    except SystemExit as exited:
        code = exited.code
    if code:
        return code, []
    kept = json.loads((tmp_path / "kq.json").read_text())
    golds = json.loads((tmp_path / "ko.json").read_text())["golds"]
    assert [g["id"] for g in golds] == [x["id"] for x in kept]
    return code, [x["id"] for x in kept]


def test_make_subset_keeps_the_most_active_users_questions(tmp_path):
    user_split = [q("1", "ab"), q("2", "abcd"), q("3", "xyz"), q("4", "pqr"), q("5", "z")]
    assert subset(tmp_path, user_split, "--users", "most_active:3") == (0, ["2", "3", "4"])
    assert subset(tmp_path, user_split, "--users", "most_active:3", "--count", "1",
                  "--skip", "1") == (0, ["3"])
    time_split = [q("1", "a", "A"), q("2", "abc", "B"), q("3", "bcd", "A"), q("4", "z", "C")]
    # A has 4 items over two questions, B 3: both of A's questions are kept, in file order.
    assert subset(tmp_path, time_split, "--users", "most_active:1") == (0, ["1", "3"])
    (tmp_path / "ids").write_text('["C", "B"]')
    assert subset(tmp_path, time_split, "--users", str(tmp_path / "ids")) == (0, ["2", "4"])


def test_make_subset_needs_a_count_or_users(tmp_path, capsys):
    assert subset(tmp_path, [q("1", "a")]) == (2, [])
    assert capsys.readouterr().err.strip().endswith("error: --count is required (or give "
                                                    "--users)")
    assert subset(tmp_path, [q("1", "a")], "--users", "most_active:1", "--skip", "1") == (2, [])
    assert capsys.readouterr().err.strip().splitlines()[-1].endswith(
        "1 questions of --users most_active:1, fewer than --skip 1 and one more")


def test_make_subset_refuses_a_user_id_that_is_no_id(tmp_path, capsys):
    assert subset(tmp_path, [q("1", "a", ["u"])], "--users", "most_active:1") == (2, [])
    assert capsys.readouterr().err.strip().splitlines()[-1].endswith(
        "question 1: \"user_id\" must be a string or an integer, not ['u']")
