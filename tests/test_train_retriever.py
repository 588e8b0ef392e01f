"""ROPG (train_retriever.py): the two objectives, a training run, and its checkpoint served by
rank_profiles.py's dense ranker unchanged."""
from __future__ import annotations

import json
import math
from pathlib import Path

import pytest

torch = pytest.importorskip("torch")

from conftest import build_tiny_bert, write_json  # noqa: E402
from LaMP import rank_profiles, train_retriever  # noqa: E402
from LaMP.utils.errors import LampError  # noqa: E402
from LaMP.utils.modeling.feedback_training import (Group, TrainSettings,  # noqa: E402
                                                   distillation_loss, mean_distillation_loss,
                                                   reinforce_loss, retriever_loss,
                                                   retriever_scores, reward, train_groups)
from LaMP.utils.retrieval.dense import load_encoder  # noqa: E402

pytestmark = pytest.mark.usefixtures("torch_single_thread")

PREFIX = "Paraphrase the following tweet without any explanation before or after it: "
TWEETS = ["the cat sat on the mat", "rain again today so i stay in", "love the sun on a good day",
          "bad night no sleep", "my dog hates the rain", "good morning all"]


def questions() -> list[dict]:
    return [{"id": f"q{i}", "input": PREFIX + TWEETS[i],
             "profile": [{"id": f"q{i}-{j}", "text": TWEETS[(i + j + 1) % 6]} for j in range(4)],
             "output": TWEETS[i]} for i in range(3)]


# Each question's best item (utility 1) is its third candidate; the top one is worth 0.2.
def feedback_line(question: dict) -> dict:
    candidates = [item["id"] for item in question["profile"]]
    return {"id": question["id"], "candidates": candidates, "utilities": [0.2, 0.0, 1.0, 0.1],
            "outputs": ["a", "b", "c", "d"]}


@pytest.fixture(scope="module")
def encoder(tmp_path_factory) -> str:
    return build_tiny_bert(tmp_path_factory.mktemp("bert"), TWEETS)


@pytest.fixture
def files(tmp_path):
    data = write_json(tmp_path / "train.json", questions())
    feedback = tmp_path / "feedback.jsonl"
    feedback.write_text("".join(json.dumps(feedback_line(q)) + "\n" for q in questions()),
                        encoding="utf-8")
    return data, feedback


def train(files, encoder, output: Path, *extra: str) -> dict:
    data, feedback = files
    return train_retriever.main(["--feedback", str(feedback), "--train_data", str(data),
                                 "--task", "LaMP-7", "--contriever_checkpoint", encoder,
                                 "--output_dir", str(output), "--device", "cpu",
                                 "--warmup_steps", "0", "--learning_rate", "3e-3",
                                 "--logging_steps", "0", *extra])


# -- the objectives, by hand ------------------------------------------------------------

def test_distillation_is_the_kl_divergence_computed_by_hand():
    # target softmax([ln 3, 0]) = [3/4, 1/4]; model softmax([0, 0]) = [1/2, 1/2]
    loss = distillation_loss(torch.zeros(2), torch.tensor([math.log(3.0), 0.0]))
    assert float(loss) == pytest.approx(0.75 * math.log(1.5) + 0.25 * math.log(0.5))
    # Scores that agree with the utilities (up to a shift) cost nothing: one softmax each,
    # not the released code's two (whose cross-entropy is never 0).
    assert float(distillation_loss(torch.tensor([3.2, 1.2, 2.0]),
                                   torch.tensor([1.0, -1.0, -0.2]))) == pytest.approx(0, abs=1e-6)
    # The temperature divides both: τ = 2 on doubled numbers is the first case again.
    halved = distillation_loss(torch.zeros(2), torch.tensor([2 * math.log(3.0), 0.0]), 2.0)
    assert float(halved) == pytest.approx(float(loss))


@pytest.mark.parametrize("utilities, sampled, direction", [
    ([0.5, 0.2, 0.9], 2, 1),   # better than the top item: more likely after a step
    ([0.5, 0.2, 0.9], 1, -1),  # worse: less likely
    ([0.5, 0.5, 0.9], 1, 0),   # as good: no change
])
def test_reinforce_moves_the_sampled_item_by_the_sign_of_its_reward(utilities, sampled,
                                                                     direction):
    target = torch.tensor(utilities)
    assert float(reward(target, sampled)) == pytest.approx(utilities[sampled] - utilities[0])
    scores = torch.zeros(3, requires_grad=True)
    reinforce_loss(scores, target, sampled).backward()
    before = torch.softmax(scores.detach(), 0)[sampled]
    after = torch.softmax(scores.detach() - 0.5 * scores.grad, 0)[sampled]
    assert torch.sign(after - before).item() == direction


def test_a_kd_step_moves_the_retrievers_distribution_toward_the_utilities(encoder):
    tokenizer, model = load_encoder(encoder, torch.float32)
    groups = [Group(f"g{i}", TWEETS[i + 1:i + 4], [0.0, 1.0, 0.3], TWEETS[i]) for i in range(2)]

    def score(group):
        return retriever_scores(model, tokenizer, group, 64, "cpu")

    model.eval()
    before = mean_distillation_loss(score, groups)
    settings = TrainSettings(max_steps=1, learning_rate=1e-3, warmup_steps=0, batch_size=2,
                             max_grad_norm=1.0, seed=0)
    losses = train_groups(model, groups, retriever_loss(model, tokenizer, 64, "cpu", "kd", 1.0),
                          settings, progress=False)
    after = mean_distillation_loss(score, groups)
    assert after < before
    assert len(losses) == 1


# -- the script -------------------------------------------------------------------------

# REINFORCE learns from one sampled item per step: more, smaller steps than KD.
@pytest.mark.parametrize("objective, steps, rate", [("kd", 60, "3e-3"), ("rl", 600, "1e-3")])
def test_the_trained_checkpoint_ranks_with_rank_profiles_unchanged(files, encoder, tmp_path,
                                                                  objective, steps, rate):
    out = tmp_path / f"ropg_{objective}"
    summary = train(files, encoder, out, "--objective", objective, "--max_steps", str(steps),
                    "--learning_rate", rate)
    assert summary["groups"] == 3 and len(summary["losses"]) == steps
    log = json.loads((out / "training_log.json").read_text())
    assert log["objective"] == objective and log["losses"] == summary["losses"]
    assert json.loads((out / "args.json").read_text())["objective"] == objective
    ranking_file = tmp_path / "ranking.json"
    rank_profiles.main(["--input_data_addr", str(files[0]), "--output_ranking_addr",
                        str(ranking_file), "--task", "LaMP-7", "--ranker", "contriever",
                        "--contriever_checkpoint", str(out), "--device", "cpu"])
    ranking = json.loads(ranking_file.read_text())
    for question in questions():
        assert sorted(ranking[question["id"]]) == sorted(i["id"] for i in question["profile"])
        # The item the LLM found best has been learnt to come first.
        assert ranking[question["id"]][0] == question["profile"][2]["id"], question["id"]
    # The weights moved away from the starting encoder's.
    _, start = load_encoder(encoder, torch.float32)
    _, trained = load_encoder(str(out), torch.float32)
    assert any(not torch.equal(a, b) for a, b in zip(start.state_dict().values(),
                                                    trained.state_dict().values()))


def test_the_same_seed_trains_the_same_weights(files, encoder, tmp_path):
    runs = [train(files, encoder, tmp_path / f"run{i}", "--objective", "rl", "--max_steps", "3")
            for i in range(2)]
    assert runs[0]["losses"] == runs[1]["losses"]


def test_feedback_for_items_the_profile_lacks_is_refused(files, encoder, tmp_path):
    data, feedback = files
    line = feedback_line(questions()[0])
    line["candidates"][1] = "elsewhere"
    feedback.write_text(json.dumps(line) + "\n", encoding="utf-8")
    with pytest.raises(LampError, match="question q0: candidates its profile lacks"):
        train(files, encoder, tmp_path / "out", "--objective", "kd")
    assert not (tmp_path / "out").exists()


def test_feedback_for_questions_the_data_lacks_is_refused(files, encoder, tmp_path):
    data, feedback = files
    line = feedback_line(questions()[0])
    line["id"] = "q99"
    with feedback.open("a", encoding="utf-8") as handle:
        handle.write(json.dumps(line) + "\n")
    with pytest.raises(LampError, match=r"does not hold: 1 \(first: q99\)"):
        train(files, encoder, tmp_path / "out", "--objective", "kd")


def test_an_output_folder_that_holds_files_is_refused(files, encoder, tmp_path):
    out = tmp_path / "out"
    out.mkdir()
    (out / "notes.txt").write_text("mine", encoding="utf-8")
    with pytest.raises(LampError, match="not an empty folder"):
        train(files, encoder, out, "--objective", "kd")
    assert (out / "notes.txt").read_text(encoding="utf-8") == "mine"


@pytest.mark.parametrize("flags, message", [
    (["--learning_rate", "nan"], "--learning_rate must be a finite number > 0"),
    (["--temperature", "0"], "--temperature must be a finite number > 0"),
    (["--max_steps", "0"], "--max_steps must be in 1"),
    (["--warmup_steps", "-1"], "--warmup_steps must be in 0"),
])
def test_bad_numbers_end_in_one_line(files, encoder, tmp_path, capsys, flags, message):
    with pytest.raises(SystemExit) as ended:
        train(files, encoder, tmp_path / "out", "--objective", "kd", *flags)
    assert ended.value.code == 2
    err = capsys.readouterr().err.strip()
    assert err.startswith("error: ") and message in err and len(err.splitlines()) == 1
