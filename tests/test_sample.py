"""The bundled sample (data/sample): valid LaMP files, reproducible, and personal."""
from __future__ import annotations

import collections
import json
import re

import pytest

from LaMP.utils.data.outputs import load_outputs
from LaMP.utils.data.questions import input_problem, iter_questions
from LaMP.utils.evaluation.scoring import invalid_gold_ids
from LaMP.utils.tasks import TASK_NAMES, TASKS, get_task
from conftest import SAMPLE, load_script

make_sample = load_script("data/make_sample.py")
evaluator = load_script("eval/eval_task.py")

SIZES = {"train": ("0", 48), "dev": ("1", 24), "test": ("2", 12)}
# The long text field of each task's profile items, and its word bounds.
TEXT_FIELDS = {"LaMP-1": "abstract", "LaMP-2": "description", "LaMP-3": "text",
               "LaMP-4": "text", "LaMP-5": "abstract", "LaMP-6": "text", "LaMP-7": "text",
               "LaMP-2N": "text"}
LONG, TWEET = (30, 80), (8, 25)


def bounds(task_name: str) -> tuple[int, int]:
    return TWEET if task_name == "LaMP-7" else LONG


def questions(task_name: str, set_name: str) -> list[dict]:
    return list(iter_questions(
        SAMPLE / get_task(task_name).folder / f"{set_name}_questions.json", get_task(task_name)))


def golds(task_name: str, set_name: str) -> dict[str, str]:
    return load_outputs(SAMPLE / get_task(task_name).folder / f"{set_name}_outputs.json").outputs


def words(text: str) -> set[str]:
    return set(re.findall(r"[a-z]+", text.lower()))


def tokens(text: str) -> set[str]:
    """Words, numbers and runs of punctuation (so that ":D" and "#blessed" count)."""
    return set(re.findall(r"\w+|[^\w\s]+", text.lower()))


@pytest.mark.parametrize("task_name", TASK_NAMES)
def test_sample_files_are_valid_lamp(task_name):
    task = get_task(task_name)
    folder = SAMPLE / task.folder
    assert sorted(path.name for path in folder.iterdir()) == [
        "dev_outputs.json", "dev_questions.json", "test_questions.json", "train_outputs.json",
        "train_questions.json"]
    for set_name, (digit, size) in SIZES.items():
        items = list(iter_questions(folder / f"{set_name}_questions.json", task))
        prefix = f"{task.id_digit}{digit}"
        assert [q["id"] for q in items] == [f"{prefix}{row}" for row in range(size)]
        for question in items:
            assert input_problem(question["input"], task) is None
            assert 5 <= len(question["profile"]) <= 30
            for index, item in enumerate(question["profile"]):
                assert item["id"] == f"{question['id']}{index}"
                expected = {"id", *task.profile_fields} | ({"date"} if task_name != "LaMP-7"
                                                           else set())
                assert set(item) == expected
                if "date" in item:
                    assert re.fullmatch(r"20(1[2-9]|20)-\d\d-\d\d", item["date"])
        if set_name == "test":
            continue
        outputs = load_outputs(folder / f"{set_name}_outputs.json")
        assert outputs.task is task
        assert list(outputs.outputs) == [q["id"] for q in items]
        assert invalid_gold_ids(outputs) == []
        if task.labels is not None:
            assert set(outputs.outputs.values()) <= set(task.labels)


@pytest.mark.parametrize("task_name, metric, perfect", [("LaMP-2", "accuracy", 1.0),
                                                        ("LaMP-3", "MAE", 0.0)])
def test_the_evaluator_accepts_the_sample(task_name, metric, perfect, tmp_path):
    gold_file = SAMPLE / get_task(task_name).folder / "dev_outputs.json"
    result = evaluator.main(["--golds_json", str(gold_file), "--preds_json", str(gold_file),
                             "--task_name", task_name, "--output_file", str(tmp_path / "r.json")])
    assert result["count"] == 24
    assert result[metric] == pytest.approx(perfect)


@pytest.mark.parametrize("task_name", TASK_NAMES)
def test_texts_are_short(task_name):
    task = get_task(task_name)
    low, high = bounds(task_name)
    for set_name in SIZES:
        for question in questions(task_name, set_name):
            for item in question["profile"]:
                assert low <= len(item[TEXT_FIELDS[task_name]].split()) <= high, item["id"]
            if task_name != "LaMP-1":  # LaMP-1's input is a title and two references
                assert low <= len(task.query(question["input"]).split()) <= high
    if task_name == "LaMP-7":
        assert all(low <= len(text.split()) <= high for text in golds(task_name, "dev").values())


def test_same_seed_same_bytes_other_seed_other_data(tmp_path):
    make_sample.main(["--out_dir", str(tmp_path / "again"), "--seed", "0"])
    committed = sorted(path.relative_to(SAMPLE.parent) for path in SAMPLE.parent.rglob("*.json"))
    rebuilt = sorted(path.relative_to(tmp_path / "again")
                     for path in (tmp_path / "again").rglob("*.json"))
    assert rebuilt == committed and len(committed) == 5 * len(TASK_NAMES)
    for relative in committed:
        assert (tmp_path / "again" / relative).read_bytes() == \
               (SAMPLE.parent / relative).read_bytes(), relative
    make_sample.main(["--out_dir", str(tmp_path / "other"), "--seed", "1", "--tasks", "LaMP_3"])
    other = (tmp_path / "other" / "user" / "LaMP_3" / "dev_questions.json").read_bytes()
    assert other != (SAMPLE / "LaMP_3" / "dev_questions.json").read_bytes()
    assert not (tmp_path / "other" / "user" / "LaMP_4").exists()


def majority(values) -> str:
    # Ties go to the smallest value so that the baseline does not depend on order.
    counts = collections.Counter(values)
    return min(counts, key=lambda value: (-counts[value], value))


def test_a_users_typical_rating_beats_the_global_majority():
    train_majority = majority(golds("LaMP-3", "train").values())
    dev, gold = questions("LaMP-3", "dev"), golds("LaMP-3", "dev")
    global_mae = sum(abs(int(gold[q["id"]]) - int(train_majority)) for q in dev) / len(dev)
    personal_mae = sum(abs(int(gold[q["id"]]) - int(majority(i["score"] for i in q["profile"])))
                       for q in dev) / len(dev)
    assert personal_mae < global_mae - 0.3


@pytest.mark.parametrize("task_name, field", [("LaMP-2", "tag"), ("LaMP-2N", "category")])
def test_a_users_favourite_label_beats_the_global_majority(task_name, field):
    train_majority = majority(golds(task_name, "train").values())
    dev, gold = questions(task_name, "dev"), golds(task_name, "dev")
    global_accuracy = sum(gold[q["id"]] == train_majority for q in dev) / len(dev)
    personal = sum(gold[q["id"]] == majority(i[field] for i in q["profile"]) for q in dev)
    assert personal / len(dev) > global_accuracy + 0.25


def test_the_related_reference_shares_words_with_the_profile():
    dev, gold = questions("LaMP-1", "dev"), golds("LaMP-1", "dev")
    correct = 0
    for question in dev:
        quoted = question["input"].split('"')
        first, second = words(quoted[3]), words(quoted[5])
        profile = set().union(*(words(i["title"] + " " + i["abstract"])
                                for i in question["profile"]))
        guess = "[1]" if len(first & profile) >= len(second & profile) else "[2]"
        correct += guess == gold[question["id"]]
    assert correct / len(dev) >= 0.65


@pytest.mark.parametrize("task_name, field", [("LaMP-4", "title"), ("LaMP-5", "title"),
                                              ("LaMP-6", "title"), ("LaMP-7", "text")])
def test_the_gold_carries_the_users_style(task_name, field):
    """What the gold adds to the input (a headline form, a signature) is in the user's own
    profile, and much less often in another user's."""
    dev, gold = questions(task_name, "dev"), golds(task_name, "dev")

    def style_found(shift: int) -> float:
        found = 0
        for position, question in enumerate(dev):
            profile = dev[(position + shift) % len(dev)]["profile"]
            added = tokens(gold[question["id"]]) - tokens(question["input"])
            seen = set().union(*(tokens(item[field]) for item in profile))
            found += bool(added) and added <= seen
        return found / len(dev)

    own, others = style_found(0), style_found(1)
    assert own >= 0.6 and own >= others + 0.4, (own, others)


def test_tweet_golds_carry_a_signature_the_input_lacks():
    for question in questions("LaMP-7", "dev"):
        gold = golds("LaMP-7", "dev")[question["id"]]
        signature = gold.split()[-1]
        assert signature not in question["input"].split()
        assert all(item["text"].endswith(signature) for item in question["profile"])
        body = gold.rsplit(" ", 1)[0]
        assert body == body.lower()


@pytest.mark.parametrize("task_name", TASK_NAMES)
def test_profiles_hold_items_close_to_the_input(task_name):
    """Retrieval has something to find: some profile items share the input's distinctive
    words, others share none."""
    task = TASKS[task_name]
    dev = questions(task_name, "dev")
    useful = 0
    for question in dev:
        documents = [words(text) for text in task.corpus(question["profile"])]
        frequency = collections.Counter(word for document in documents for word in document)
        distinctive = {word for word, count in frequency.items() if count <= len(documents) / 2}
        query = words(task.query(question["input"])) & distinctive
        overlaps = [len(document & query) for document in documents]
        useful += max(overlaps) >= 2 and min(overlaps) == 0
    assert useful / len(dev) >= 0.5


def test_sample_is_small():
    total = sum(path.stat().st_size for path in SAMPLE.rglob("*.json"))
    assert total < 3_000_000
    assert json.loads((SAMPLE / "LaMP_7" / "dev_outputs.json").read_text())["task"] == "LaMP_7"
