"""The adapter zoo: LoRA-XS adapters (--peft lora_xs), build_zoo.py, personalize_from_zoo.py
and eval/zoo_bound.py, on tiny models and the bundled sample."""
from __future__ import annotations

import json
import math
from pathlib import Path

import numpy as np
import pytest

from conftest import SAMPLE, build_tiny_llama, load_script, problems, run_cli

build_zoo = load_script("LaMP/build_zoo.py")
personalize = load_script("LaMP/personalize_from_zoo.py")
train_user_peft = load_script("LaMP/train_user_peft.py")
evaluate_llm = load_script("LaMP/evaluate_llm.py")
zoo_bound = load_script("eval/zoo_bound.py")

RANK = 4


def questions(path: Path, picked: list[tuple[str, str]]) -> str:
    """A questions file of sample LaMP-7 questions: (sample id, id to give it)."""
    sample = {q["id"]: q for q in json.loads((SAMPLE / "LaMP_7" / "dev_questions.json")
                                            .read_text())}
    path.write_text(json.dumps([{**sample[source], "id": new} for source, new in picked]))
    return str(path)


def train(data: str, model: Path, out: Path, steps: int = 2, peft: str = "lora_xs") -> Path:
    train_user_peft.main(["--train_data", data, "--task", "LaMP-7", "--model_name", str(model),
                          "--output_dir", str(out), "--max_steps", str(steps),
                          "--per_device_batch_size", "4", "--max_length", "96",
                          "--generation_max_length", "16", "--learning_rate", "2e-1",
                          "--device", "cpu", "--peft", peft, "--lora_r", str(RANK),
                          "--lora_dropout", "0", "--warmup_ratio", "0"])
    return out


@pytest.fixture(scope="module")
def runs(tmp_path_factory):
    """A tiny llama, three users' lora_xs adapters trained hard on their own profiles, and
    their zoo."""
    import torch

    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    root = tmp_path_factory.mktemp("zoo")
    model = build_tiny_llama(root / "llama")
    data = questions(root / "train.json", [("610", "610"), ("611", "611"), ("612", "612")])
    users = train(data, model, root / "users", steps=40)
    build_zoo.main(["--user_adapters", str(users), "--output_dir", str(root / "zoo")])
    yield {"root": root, "model": model, "users": users, "zoo": root / "zoo"}
    torch.set_num_threads(threads)


def tinylora_layers(model):
    from peft.tuners.tinylora.layer import TinyLoraLayer

    return {name: module for name, module in model.named_modules()
            if isinstance(module, TinyLoraLayer)}


# -- LoRA-XS ----------------------------------------------------------------------------------

def test_lora_xs_is_b_r_a_over_frozen_svd_bases_and_trains_only_r(runs):
    import torch

    from LaMP.utils.modeling.model import load_model_and_tokenizer
    from LaMP.utils.modeling.training import add_peft

    base, _, _ = load_model_and_tokenizer(str(runs["model"]), dtype=torch.float32)
    weights = {name: module.weight.detach().clone() for name, module in base.named_modules()
               if name.endswith(("q_proj", "v_proj"))}
    model = add_peft(base, "lora_xs", {"lora_r": RANK, "lora_dropout": 0.0,
                                       "lora_target_modules": None}, seq2seq=False)
    trainable = [(name, p) for name, p in model.named_parameters() if p.requires_grad]
    # Only the r² numbers of each module's R train; A, B and P are buffers.
    assert len(trainable) == len(weights) == 4
    assert all(p.numel() == RANK * RANK and "tinylora_v" in name for name, p in trainable)
    torch.manual_seed(0)
    for _, parameter in trainable:
        parameter.data.normal_()
    for name, layer in tinylora_layers(model).items():
        A, B = layer.tinylora_A["default"], layer.tinylora_B["default"]
        P = layer.tinylora_P["default"]
        # v -> R is invertible: P, as an r² x r² matrix, has full rank.
        assert torch.linalg.matrix_rank(P.reshape(RANK * RANK, -1)) == RANK * RANK
        U, S, Vh = torch.linalg.svd(weights[name.removeprefix("base_model.model.")])
        torch.testing.assert_close(B @ A, U[:, :RANK] @ torch.diag(S[:RANK]) @ Vh[:RANK],
                                   atol=1e-5, rtol=1e-4)
        R = layer._compute_R("default")
        torch.testing.assert_close(layer.get_delta_weight("default"), B @ R @ A)


def test_a_zoo_member_served_as_lora_gives_the_trained_adapters_outputs(runs):
    import torch
    from peft import PeftModel

    from LaMP.utils.data.users import user_adapter_dir
    from LaMP.utils.modeling.model import load_model_and_tokenizer
    from LaMP.utils.modeling.zoo import read_zoo, write_lora

    zoo = read_zoo(runs["zoo"])
    assert zoo.users == ["610", "611", "612"]
    ids = torch.tensor([[3, 7, 11, 5, 9, 2]])
    for user in zoo.users:
        base, _, _ = load_model_and_tokenizer(str(runs["model"]), dtype=torch.float32)
        trained = PeftModel.from_pretrained(base, str(user_adapter_dir(runs["users"], user)))
        with torch.no_grad():
            expected = trained(input_ids=ids).logits
            plain = trained.get_base_model()
        folder = runs["root"] / f"lora_{user}"
        folder.mkdir()
        write_lora(folder, zoo, zoo.vectors[zoo.row(user)])
        base, _, _ = load_model_and_tokenizer(str(runs["model"]), dtype=torch.float32)
        served = PeftModel.from_pretrained(base, str(folder))
        with torch.no_grad():
            got = served(input_ids=ids).logits
        torch.testing.assert_close(got, expected, atol=1e-5, rtol=1e-4)
        del plain
    # The adapters differ from the base: the comparison above can fail.
    assert np.abs(zoo.vectors).max() > 1e-3


def test_a_weighted_sum_of_zoo_vectors_is_the_weighted_sum_of_their_delta_w(runs):
    import torch
    from peft import PeftModel

    from LaMP.utils.data.users import user_adapter_dir
    from LaMP.utils.modeling.model import load_model_and_tokenizer
    from LaMP.utils.modeling.zoo import lora_state, read_zoo

    zoo = read_zoo(runs["zoo"])
    deltas = {}
    for user in ("610", "612"):
        base, _, _ = load_model_and_tokenizer(str(runs["model"]), dtype=torch.float32)
        model = PeftModel.from_pretrained(base, str(user_adapter_dir(runs["users"], user)))
        deltas[user] = {name.removeprefix("base_model.model."): layer.get_delta_weight("default")
                        for name, layer in tinylora_layers(model).items()}
    state = lora_state(zoo, zoo.vector_of(["610", "612"], [0.3, -1.2]))
    for name in deltas["610"]:
        A = torch.from_numpy(state[f"base_model.model.{name}.lora_A.weight"])
        B = torch.from_numpy(state[f"base_model.model.{name}.lora_B.weight"])
        torch.testing.assert_close(B @ A, 0.3 * deltas["610"][name] - 1.2 * deltas["612"][name],
                                   atol=1e-5, rtol=1e-4)


# -- build_zoo.py -------------------------------------------------------------------------------

def test_the_zoo_holds_the_basis_once_and_one_row_per_sorted_user(runs):
    index = json.loads((runs["zoo"] / "zoo.json").read_text())
    assert index["users"] == ["610", "611", "612"]
    assert [m["name"] for m in index["modules"]] == [
        f"model.layers.{i}.self_attn.{p}_proj" for i in (0, 1) for p in "qv"]
    assert index["base_model"]["sha256"] and index["base_adapter"] is None
    assert index["members"]["611"]["items"] == 9
    from safetensors.numpy import load_file

    assert load_file(str(runs["zoo"] / "vectors.safetensors"))["R"].shape == (3, 4 * RANK ** 2)
    assert sorted(load_file(str(runs["zoo"] / "basis.safetensors"))) == sorted(
        f"{m['name']}.{part}" for m in index["modules"] for part in "AB")


def test_mixed_bases_a_user_in_two_runs_and_other_methods_are_refused(runs, tmp_path, capsys):
    other_model = build_tiny_llama(tmp_path / "other", seed=1)
    other = train(questions(tmp_path / "o.json", [("613", "613")]), other_model,
                  tmp_path / "other_users")
    again = train(questions(tmp_path / "a.json", [("610", "610")]), runs["model"],
                  tmp_path / "again")
    lora = train(questions(tmp_path / "l.json", [("614", "614")]), runs["model"],
                 tmp_path / "lora", peft="lora")
    cases = {
        (str(runs["users"]), str(other)): "trained on different base models",
        (str(runs["users"]), str(again)): "users in more than one run: 1 (first: '610')",
        (str(runs["users"]), str(lora)): "a LORA adapter; a zoo holds lora_xs adapters",
    }
    for sources, message in cases.items():
        status, lines = run_cli(build_zoo.main, ["--user_adapters", *sources, "--output_dir",
                                                 tmp_path / "zoo"], capsys)
        assert status != 0 and len(problems(lines)) == 1 and message in problems(lines)[0]
        assert not (tmp_path / "zoo").exists()


def test_clusters_find_planted_groups_with_their_medoids_first():
    from LaMP.utils.modeling.zoo import cluster_zoo

    rng = np.random.default_rng(0)
    directions = np.eye(6)[[0, 3]]
    vectors = np.concatenate([directions[0] + 0.05 * rng.normal(size=(5, 6)),
                              3.0 * (directions[1] + 0.05 * rng.normal(size=(4, 6)))])
    users = [f"u{i}" for i in range(9)]
    clusters = cluster_zoo(users, vectors, k=None, seed=0, k_max=5)
    assert clusters["k"] == 2 and clusters["chosen_by"] == "silhouette"
    assert sorted(sorted(c["members"]) for c in clusters["clusters"]) == [
        users[:5], users[5:]]
    assert cluster_zoo(users, vectors, k=None, seed=0, k_max=5) == clusters
    for cluster in clusters["clusters"]:
        assert cluster["medoid"] == cluster["members"][0]


# -- choosing ----------------------------------------------------------------------------------

def test_selection_reranks_the_loss_shortlist_by_the_metric():
    from LaMP.utils.modeling.zoo import select_member

    losses = {"a": 0.1, "b": 0.2, "c": 0.3, "d": 0.05}
    utilities = {"a": 0.2, "b": 0.9, "c": 1.0, "d": 0.3}
    winner, seen, scored = select_member(list(losses), losses.get, utilities.get, shortlist=3)
    # c has the best metric but is outside the three lowest losses.
    assert winner == "b" and seen == losses and set(scored) == {"d", "a", "b"}
    assert select_member(list(losses), losses.get, None, shortlist=3)[0] == "d"


@pytest.fixture
def planted_zoo(runs, tmp_path) -> Path:
    """The zoo with 610's and 612's matrices replaced by large random ones, which wreck the
    model: 611's adapter is then the best fit for any profile."""
    import shutil

    from safetensors.numpy import load_file, save_file

    zoo = tmp_path / "planted"
    shutil.copytree(runs["zoo"], zoo)
    vectors = load_file(str(zoo / "vectors.safetensors"))["R"]
    rng = np.random.default_rng(0)
    for row in (0, 2):
        vectors[row] = 30.0 * rng.normal(size=vectors.shape[1])
    save_file({"R": vectors}, str(zoo / "vectors.safetensors"))
    return zoo


def choose(runs, zoo: Path, data: str, out: Path, *extra: str) -> dict:
    return personalize.main(["--validation_data", data, "--task", "LaMP-7", "--model_addr",
                             str(runs["model"]), "--zoo", str(zoo), "--output_dir", str(out),
                             "--device", "cpu", "--max_length", "96",
                             "--generation_max_length", "8", *extra])


def test_the_planted_best_member_is_chosen_and_a_users_own_adapter_never(runs, planted_zoo,
                                                                         tmp_path):
    # "dev611" is a new user with 611's profile; user 611 is a zoo member, whose own
    # (planted best) adapter must not be chosen.
    data = questions(tmp_path / "dev.json", [("611", "dev611"), ("611", "611")])
    result = choose(runs, planted_zoo, data, tmp_path / "out", "--rerank_metric", "none")
    chosen = result["selection"]["users"]
    assert chosen["dev611"]["members"] == ["611"] and chosen["dev611"]["candidates"] == 3
    losses = chosen["dev611"]["support_losses"]
    assert losses["611"] < min(losses["610"], losses["612"])
    assert chosen["611"]["excluded_own"] and sorted(chosen["611"]["support_losses"]) == [
        "610", "612"]
    assert chosen["611"]["members"][0] in ("610", "612")
    # With the base model as a candidate, user 611 gets no adapter rather than a wrecking one.
    with_null = choose(runs, planted_zoo, data, tmp_path / "null", "--include_null")
    assert with_null["selection"]["users"]["611"]["members"] == ["__null__"]
    # A rerun finds every user done and changes nothing.
    again = choose(runs, planted_zoo, data, tmp_path / "out", "--rerank_metric", "none")
    assert again["chosen"] == [] and again["selection"] == result["selection"]


def test_random_choice_is_seeded_and_never_the_users_own(runs, tmp_path):
    data = questions(tmp_path / "dev.json", [("610", "610"), ("611", "611"), ("612", "612")])
    picks = []
    for run in ("a", "b"):
        result = personalize.main(["--validation_data", data, "--task", "LaMP-7",
                                   "--model_addr", str(runs["model"]), "--zoo",
                                   str(runs["zoo"]), "--output_dir", str(tmp_path / run),
                                   "--device", "cpu", "--max_length", "96",
                                   "--generation_max_length", "8", "--method", "random"])
        picks.append({user: r["members"] for user, r in result["selection"]["users"].items()})
    assert picks[0] == picks[1]
    assert all(members[0] != user for user, members in picks[0].items())


def test_a_rerun_with_other_settings_into_the_same_folder_is_refused(runs, tmp_path, capsys):
    data = questions(tmp_path / "dev.json", [("610", "610")])
    common = ["--validation_data", data, "--task", "LaMP-7", "--model_addr", str(runs["model"]),
              "--zoo", str(runs["zoo"]), "--output_dir", str(tmp_path / "out"), "--device",
              "cpu", "--max_length", "96", "--generation_max_length", "8"]
    personalize.main([*common, "--method", "random"])
    before = (tmp_path / "out" / "selection.json").read_bytes()
    for other in (["--method", "select"], ["--method", "random", "--seed", "7"]):
        status, lines = run_cli(personalize.main, [*common, *other], capsys)
        assert status == 2 and len(problems(lines)) == 1
        assert "holds users personalized with other settings" in problems(lines)[0]
    assert (tmp_path / "out" / "selection.json").read_bytes() == before
    # The same flags continue the run; other users' questions may join it.
    more = questions(tmp_path / "more.json", [("611", "611")])
    personalize.main([*common[:1], more, *common[2:], "--method", "random"])
    assert json.loads((tmp_path / "out" / "users.json").read_text())["num_users"] == 2


def test_served_answers_equal_the_chosen_adapter_loaded_by_hand(runs, tmp_path):
    from LaMP.utils.data.users import user_adapter_dir

    data = questions(tmp_path / "dev.json", [("611", "dev611")])
    common = ["--validation_data", data, "--task", "LaMP-7", "--model_addr", str(runs["model"]),
              "--device", "cpu", "--max_length", "96", "--generation_max_length", "8"]
    chosen = personalize.main([*common, "--zoo", str(runs["zoo"]), "--output_dir",
                               str(tmp_path / "zoo_out")])["selection"]["users"]["dev611"]
    member = chosen["members"][0]
    evaluate_llm.main([*common, "--output_dir", str(tmp_path / "served"), "--user_adapters",
                       str(tmp_path / "zoo_out"), "--generation_num_beams", "1"])
    evaluate_llm.main([*common, "--output_dir", str(tmp_path / "by_hand"), "--adapter",
                       str(user_adapter_dir(runs["users"], member)),
                       "--generation_num_beams", "1"])
    served = json.loads((tmp_path / "served" / "predictions.json").read_text())
    by_hand = json.loads((tmp_path / "by_hand" / "predictions.json").read_text())
    assert served["golds"] == by_hand["golds"]


# -- LoRA-hub ------------------------------------------------------------------------------------

def tiny_zoo(vectors: np.ndarray, users: list[str]):
    from LaMP.utils.modeling.zoo import Zoo

    return Zoo(index={"users": users, "modules": []}, basis={}, vectors=vectors)


def test_the_lorahub_objective_is_the_loss_of_the_weighted_sum_plus_the_mean_abs_weight():
    from LaMP.utils.modeling.zoo import lorahub_objective

    zoo = tiny_zoo(np.array([[1.0, 0.0, 2.0], [0.0, 3.0, -1.0], [5.0, 5.0, 5.0]]),
                   ["a", "b", "c"])
    seen = []
    loss = lambda vector: seen.append(vector) or float(vector.sum())  # noqa: E731
    objective = lorahub_objective(zoo, ["a", "b"], loss)
    # 0.5·a - 1·b = (0.5, -3, 2); its sum -0.5; 0.05 · (0.5 + 1) / 2 = 0.0375.
    assert objective([0.5, -1.0]) == pytest.approx(-0.5 + 0.0375)
    np.testing.assert_allclose(seen[0], [0.5, -3.0, 2.0])
    assert objective(np.zeros(2)) == 0.0


def test_lorahub_draws_a_seeded_subset_in_the_candidates_order():
    from LaMP.utils.modeling.zoo import lorahub_members

    candidates = [f"u{i}" for i in range(30)]
    drawn = lorahub_members(candidates, 20, seed=3)
    assert len(set(drawn)) == 20 and set(drawn) <= set(candidates)
    assert drawn == sorted(drawn, key=candidates.index) == lorahub_members(candidates, 20, 3)
    assert drawn != lorahub_members(candidates, 20, seed=4)
    assert lorahub_members(candidates[:5], 20, seed=3) == candidates[:5]


def test_lorahub_weights_are_the_minimisers_held_to_the_bounds():
    from LaMP.utils.modeling.zoo import lorahub_weights

    calls = []

    def minimise(objective, dimension, budget, seed):
        calls.append((dimension, budget, seed))
        return np.array([3.0, -1.5000001, 0.25])

    assert lorahub_weights(len, 3, 40, 7, minimise) == [1.5, -1.5, 0.25]
    assert calls == [(3, 40, 7)]


def test_nevergrad_searches_within_the_bounds_and_budget_reproducibly():
    pytest.importorskip("nevergrad", reason="nevergrad is an optional extra "
                                            "(pip install nevergrad)")
    from LaMP.utils.modeling.zoo import lorahub_weights, nevergrad_minimiser

    target = np.array([1.0, -0.5, 2.0])
    calls = []

    def objective(weights):
        calls.append(np.asarray(weights).copy())
        return float(((np.asarray(weights) - target) ** 2).sum())

    weights = lorahub_weights(objective, 3, 40, 7, nevergrad_minimiser())
    assert len(calls) <= 40 and all(np.abs(w).max() <= 1.5 for w in calls)
    # The third weight's optimum lies outside ±1.5: the search stops at the bound.
    assert objective(weights) < objective(np.zeros(3)) - 3.0
    assert lorahub_weights(objective, 3, 40, 7, nevergrad_minimiser()) == weights


def unit_search(objective, dimension, budget, seed):
    """A stand-in for nevergrad: w = 0 and each member alone at weight 1, the best of them."""
    points = [np.zeros(dimension)] + [np.eye(dimension)[j] for j in range(dimension)]
    assert len(points) <= budget
    unit_search.calls.append((dimension, budget, [objective(p) for p in points]))
    return points[int(np.argmin(unit_search.calls[-1][2]))]


def test_lorahub_serves_the_weighted_sum_of_other_users_members(runs, planted_zoo, tmp_path,
                                                                 monkeypatch):
    from safetensors.numpy import load_file

    from LaMP.utils.data.users import user_adapter_dir
    from LaMP.utils.modeling import zoo as zoo_module

    unit_search.calls = []
    monkeypatch.setattr(zoo_module, "nevergrad_minimiser", lambda: unit_search)
    data = questions(tmp_path / "dev.json", [("611", "dev611"), ("611", "611")])
    result = choose(runs, planted_zoo, data, tmp_path / "out", "--method", "lorahub",
                    "--lorahub_adapters", "3", "--lorahub_budget", "5")
    chosen = result["selection"]["users"]
    assert result["selection"]["method"] == "lorahub"
    assert sorted((d, b) for d, b, _ in unit_search.calls) == [(2, 5), (3, 5)]
    # dev611 draws all three members; 611's own adapter is planted best, wrecking ones not.
    assert chosen["dev611"]["members"] == ["610", "611", "612"]
    assert chosen["dev611"]["weights"] == [0.0, 1.0, 0.0]
    values = dict((d, v) for d, _, v in unit_search.calls)
    assert chosen["dev611"]["objective"] == pytest.approx(values[3][2])
    # 611 is a member: never its own adapter; only the wrecking members are left.
    assert chosen["611"]["members"] == ["610", "612"] and chosen["611"]["excluded_own"]
    assert chosen["611"]["candidates"] is None and chosen["611"]["budget"] == 5
    zoo = zoo_module.read_zoo(planted_zoo)
    for user in ("dev611", "611"):
        served = load_file(str(user_adapter_dir(tmp_path / "out", user) /
                               "adapter_model.safetensors"))
        expected = zoo_module.lora_state(zoo, zoo.vector_of(chosen[user]["members"],
                                                            chosen[user]["weights"]))
        assert sorted(served) == sorted(expected)
        for key in expected:
            np.testing.assert_allclose(served[key], expected[key], atol=1e-6)


def test_lorahub_without_nevergrad_or_with_bad_flags_is_one_error_line(runs, tmp_path,
                                                                       capsys, monkeypatch):
    import sys

    monkeypatch.setitem(sys.modules, "nevergrad", None)  # import nevergrad fails
    common = ["--validation_data", questions(tmp_path / "d.json", [("610", "x")]), "--task",
              "LaMP-7", "--model_addr", runs["model"], "--zoo", runs["zoo"], "--output_dir",
              tmp_path / "out", "--method", "lorahub"]
    cases = {(): "pip install nevergrad",
             ("--lorahub_budget", "0"): "must be >= 1",
             ("--lorahub_adapters", "0"): "must be >= 1",
             ("--include_null",): "--include_null: lorahub's weights reach the base model"}
    for extra, message in cases.items():
        status, lines = run_cli(personalize.main, [*common, *extra], capsys)
        assert status != 0 and len(problems(lines)) == 1 and message in problems(lines)[0], lines
    assert not (tmp_path / "out").exists()


# -- the certificate -----------------------------------------------------------------------------

def test_the_bound_is_hoeffding_plus_a_union_bound_by_hand(tmp_path):
    from LaMP.utils.evaluation.bounds import selection_bound

    # ln(10 / 0.05) = ln 200 = 5.298317; / (2 * 50) = 0.052983; sqrt = 0.230181
    assert selection_bound(0.2, 10, 50, 0.05) == pytest.approx(0.430181, abs=1e-6)
    selection = {"task": "LaMP-3", "users": {
        "u1": {"support_error": 0.25, "candidates": 4, "support_size": 8},
        "u2": {"support_error": 0.0, "candidates": 4, "support_size": 2}}}
    (tmp_path / "sel.json").write_text(json.dumps(selection))
    golds = {"task": "LaMP_3", "golds": [{"id": "u1", "output": "5"}, {"id": "u2", "output": "1"}]}
    preds = {"task": "LaMP_3", "golds": [{"id": "u1", "output": "5"}, {"id": "u2", "output": "2"}]}
    (tmp_path / "g.json").write_text(json.dumps(golds))
    (tmp_path / "p.json").write_text(json.dumps(preds))
    result = zoo_bound.main([str(arg) for arg in (
        "--selection", tmp_path / "sel.json", "--output_file", tmp_path / "bound.json",
        "--golds_json", tmp_path / "g.json", "--preds_json", tmp_path / "p.json")])
    # u1: sqrt(ln(80) / 16) = sqrt(4.382027 / 16) = 0.523332; u2: sqrt(ln(80) / 4) = 1.046665
    assert result["users"]["u1"]["bound"] == pytest.approx(0.25 + 0.523332, abs=1e-6)
    assert result["users"]["u2"]["bound"] == pytest.approx(1.046665, abs=1e-6)
    # LaMP-3's loss: |2 - 1| / 4 (the farther end of the scale from 1 is 5).
    assert result["users"]["u2"]["query_loss"] == pytest.approx(0.25)
    assert result["summary"]["share_within_bound"] == 1.0
    assert json.loads((tmp_path / "bound.json").read_text()) == json.loads(json.dumps(result))


def test_bad_zoo_input_is_one_error_line(runs, tmp_path, capsys):
    (tmp_path / "sel.json").write_text(json.dumps({"users": {"u": {"candidates": 2}}}))
    (tmp_path / "hub.json").write_text(json.dumps({"users": {"u": {
        "method": "lorahub", "support_error": 0.1, "candidates": None, "support_size": 3}}}))
    cases = [
        (zoo_bound.main, ["--selection", tmp_path / "hub.json", "--output_file",
                          tmp_path / "b.json"], "the certificate does not cover it"),
        (zoo_bound.main, ["--selection", tmp_path / "sel.json", "--output_file",
                          tmp_path / "b.json"], "lacks support_error"),
        (personalize.main, ["--validation_data", questions(tmp_path / "d.json",
                                                           [("610", "x")]),
                            "--task", "LaMP-7", "--model_addr", runs["model"], "--zoo",
                            runs["users"], "--output_dir", tmp_path / "out"], "no zoo.json"),
        (personalize.main, ["--validation_data", questions(tmp_path / "d.json", [("610", "x")]),
                            "--task", "LaMP-7", "--model_addr", runs["model"], "--zoo",
                            runs["zoo"], "--output_dir", tmp_path / "out", "--use_clusters"],
         "has no clusters"),
        (personalize.main, ["--validation_data", questions(tmp_path / "d.json", [("610", "x")]),
                            "--task", "LaMP-5", "--model_addr", runs["model"], "--zoo",
                            runs["zoo"], "--output_dir", tmp_path / "out"],
         "were trained for LaMP-7, not LaMP-5"),
    ]
    for main, argv, message in cases:
        status, lines = run_cli(main, argv, capsys)
        assert status != 0 and len(problems(lines)) == 1 and message in problems(lines)[0], lines
    assert not (tmp_path / "out").exists() and not (tmp_path / "b.json").exists()
