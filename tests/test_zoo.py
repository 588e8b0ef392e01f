"""The adapter zoo: LoRA-XS adapters (--peft lora_xs), build_zoo.py, personalize_from_zoo.py
and eval/zoo_bound.py, on tiny models and the bundled sample."""
from __future__ import annotations

import json
import math
from pathlib import Path

import numpy as np
import pytest

from conftest import (SAMPLE, build_tiny_bert, build_tiny_llama, listing, load_script, problems,
                      run_cli)

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


def train(data: str, model: Path, out: Path, steps: int = 2, peft: str = "lora_xs",
          *extra: str) -> Path:
    train_user_peft.main(["--train_data", data, "--task", "LaMP-7", "--model_name", str(model),
                          "--output_dir", str(out), "--max_steps", str(steps),
                          "--per_device_batch_size", "4", "--max_length", "96",
                          "--generation_max_length", "16", "--learning_rate", "2e-1",
                          "--device", "cpu", "--peft", peft, "--lora_r", str(RANK),
                          "--lora_dropout", "0", "--warmup_ratio", "0", *extra])
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
    oppu = train(questions(tmp_path / "p.json", [("615", "615")]), runs["model"],
                 tmp_path / "oppu", 2, "lora_xs", "--recipe", "oppu")
    retrieved = train(questions(tmp_path / "r.json", [("616", "616")]), runs["model"],
                      tmp_path / "retrieved", 2, "lora_xs", "--use_profile", "--num_retrieved",
                      "1")
    cases = {
        (str(runs["users"]), str(other)): "trained on different base models",
        (str(runs["users"]), str(oppu)): "runs of different recipes (lamp, oppu)",
        (str(retrieved),): "trained with retrieved profile items in each prompt",
        (str(runs["users"]), str(again)): "users in more than one run: 1 (first: '610')",
        (str(runs["users"]), str(lora)): "a LORA adapter; a zoo holds lora_xs adapters",
    }
    for sources, message in cases.items():
        status, lines = run_cli(build_zoo.main, ["--user_adapters", *sources, "--output_dir",
                                                 tmp_path / "zoo"], capsys)
        assert status != 0 and len(problems(lines)) == 1 and message in problems(lines)[0]
        assert not (tmp_path / "zoo").exists()


def test_support_sets_and_gates_use_the_template_the_members_learned_from(runs, tmp_path,
                                                                        monkeypatch):
    from LaMP.utils.modeling import user_training
    from LaMP.utils.modeling.recipes import get_recipe
    from LaMP.utils.modeling.zoo import read_zoo
    from LaMP.utils.tasks import get_task

    task = get_task("LaMP-7")
    assert json.loads((runs["zoo"] / "zoo.json").read_text())["recipe"] == "lamp"
    data = questions(tmp_path / "p.json", [("610", "610"), ("611", "611")])
    oppu = train(data, runs["model"], tmp_path / "oppu", 2, "lora_xs", "--recipe", "oppu")
    build_zoo.main(["--user_adapters", str(oppu), "--output_dir", str(tmp_path / "zoo")])
    assert read_zoo(tmp_path / "zoo").index["recipe"] == "oppu"
    # Every example the zoo's scripts make goes through the members' template.
    used = []
    made = user_training.user_examples

    def recording(*args, **kwargs):
        used.append(kwargs.get("template"))
        return made(*args, **kwargs)

    monkeypatch.setattr(user_training, "user_examples", recording)
    checked = []
    check = user_training.check_users_have_items

    def checking(task, profiles, seed, path, template=None):
        checked.append(template)
        return check(task, profiles, seed, path, template)

    monkeypatch.setattr(user_training, "check_users_have_items", checking)
    dev = questions(tmp_path / "dev.json", [("611", "dev611")])
    record = choose(runs, tmp_path / "zoo", dev, tmp_path / "out", "--method", "random",
                    "--no_bf16")["selection"]["users"]["dev611"]
    gate_run(runs, tmp_path / "gates", "--max_steps", "1", "--no_bf16", "--zoo",
             str(tmp_path / "zoo"), "--train_data", data)
    oppu_template = get_recipe("oppu").user_template(task)
    assert oppu_template is not task.user_template and len(used) == 3  # dev611, 610, 611
    assert all(template is oppu_template for template in used)
    assert len(checked) == 2 and all(template is oppu_template for template in checked)
    assert record["support_size"] > 0


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


def test_shards_split_the_users_and_together_write_what_one_run_does(runs, tmp_path, capsys):
    data = questions(tmp_path / "dev.json", [("610", "610"), ("611", "611"), ("612", "612"),
                                             ("610", "dev610")])
    whole = choose(runs, runs["zoo"], data, tmp_path / "whole", "--method", "random")
    shards = [choose(runs, runs["zoo"], data, tmp_path / "shared", "--method", "random",
                     "--num_shards", "2", "--shard_id", str(i)) for i in (0, 1)]
    # Every second user in id order: disjoint, and together every user once.
    assert [s["shard_users"] for s in shards] == [["610", "612"], ["611", "dev610"]]
    assert shards[0]["chosen"] == ["610", "612"] and shards[1]["chosen"] == ["611", "dev610"]
    # The last shard's selection.json and users.json hold the first shard's users too.
    strip = lambda users: {u: {k: v for k, v in r.items() if k != "seconds"}  # noqa: E731
                           for u, r in users.items()}
    for out in ("whole", "shared"):
        assert sorted(json.loads((tmp_path / out / "selection.json").read_text())["users"]) == [
            "610", "611", "612", "dev610"]
    shared = json.loads((tmp_path / "shared" / "selection.json").read_text())["users"]
    assert strip(shared) == strip(whole["selection"]["users"])
    assert json.loads((tmp_path / "shared" / "users.json").read_text())["num_missing"] == 0
    # Shard flags are the run's, not the folder's: args.json is the one-process run's.
    saved = [json.loads((tmp_path / out / "args.json").read_text()) for out in ("shared", "whole")]
    assert "num_shards" not in saved[0] and "shard_id" not in saved[0]
    assert {**saved[0], "output_dir": None} == {**saved[1], "output_dir": None}
    for bad, message in ((["--num_shards", "0"], "--num_shards must be at least 1"),
                         (["--num_shards", "2", "--shard_id", "2"],
                          "--shard_id must be in 0 … 1")):
        status, lines = run_cli(personalize.main, [
            "--validation_data", data, "--task", "LaMP-7", "--model_addr", str(runs["model"]),
            "--zoo", str(runs["zoo"]), "--output_dir", str(tmp_path / "bad"), *bad], capsys)
        assert status == 2 and problems(lines) == [f"error: {message}"]
    assert not (tmp_path / "bad").exists()


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
    # A folder written before the pieces and support flags existed ran at their defaults.
    saved = json.loads((tmp_path / "out" / "args.json").read_text())
    for key in ("gates", "pieces_top_k", "pieces_temperature", "support_items"):
        saved.pop(key)
    (tmp_path / "out" / "args.json").write_text(json.dumps(saved))
    personalize.main([*common, "--method", "random"])
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


# -- Personalized Pieces ----------------------------------------------------------------------

train_zoo_gates = load_script("LaMP/train_zoo_gates.py")


def test_piece_scores_top_k_and_the_assembly_by_hand():
    from LaMP.utils.modeling.pieces import (assemble, choose_pieces, example_scores,
                                            layer_norm, top_pieces)
    from LaMP.utils.modeling.zoo import Zoo

    states = np.array([[1.0, 2.0, 3.0, 4.0], [0.0, 1.0, 0.0, -1.0], [2.0, 2.0, 2.0, 5.0]])
    gates = np.array([[1.0, 0.0, 0.0, 0.0], [0.0, 0.0, 0.0, 3.0], [-1.0, 1.0, -1.0, 1.0]])

    def normalised(row):
        centred = row - row.mean()
        return centred / math.sqrt((centred ** 2).mean() + 1e-5)

    by_hand = [sum(normalised(x) @ normalised(g) for x in states) / 3 / 2.0 for g in gates]
    np.testing.assert_allclose(example_scores(states, gates), by_hand, rtol=1e-12)
    np.testing.assert_allclose(layer_norm(states)[0], normalised(states[0]))
    # The top two (a tie goes to the earlier sharer), weighted by softmax(score / T).
    order, weights = top_pieces(np.array([0.1, 0.7, 0.7, -2.0]), 2, 0.5)
    assert order == [1, 2] and weights == pytest.approx([0.5, 0.5])
    order, weights = top_pieces(np.array([0.3, -0.2, 0.9]), 2, 2.0)
    e = [math.exp(0.9 / 2), math.exp(0.3 / 2)]
    assert order == [2, 0] and weights == pytest.approx([e[0] / sum(e), e[1] / sum(e)])
    # Two modules (ranks 2 and 1) of three members; each module adds its own pieces.
    vectors = np.arange(15, dtype=np.float32).reshape(3, 5)
    zoo = Zoo(index={"users": ["a", "b", "c"], "modules": [
        {"name": "m1", "rank": 2, "offset": 0}, {"name": "m2", "rank": 1, "offset": 4}]},
        basis={}, vectors=vectors)
    pieces = choose_pieces({"m1": np.array([0.0, 1.0, 2.0]), "m2": np.array([5.0, 0.0, 0.0])},
                           ["a", "b", "c"], 2, 1.0)
    assert pieces["m1"]["members"] == ["c", "b"] and pieces["m2"]["members"] == ["a", "b"]
    w1, w2 = pieces["m1"]["weights"], pieces["m2"]["weights"]
    assert w1[0] == pytest.approx(math.exp(1) / (1 + math.exp(1)))
    expected = np.concatenate([w1[0] * vectors[2, :4] + w1[1] * vectors[1, :4],
                               [w2[0] * vectors[0, 4] + w2[1] * vectors[1, 4]]])
    np.testing.assert_allclose(assemble(zoo, pieces), expected, rtol=1e-6)


def zoo_model_args(runs, **extra):
    import argparse

    from LaMP.utils.tasks import get_task

    return argparse.Namespace(model_addr=str(runs["model"]), device="cpu", chat_template=False,
                              trust_remote_code=False, cache_dir=None, max_length=96,
                              generation_max_length=16, task=get_task("LaMP-7"),
                              input_truncation="share", prompt_budget="exact", **extra)


def test_a_gate_feeds_the_branch_x_times_sigmoid_of_x_dot_g_and_answers_mark_positions(runs):
    import torch

    from LaMP.utils.modeling.pieces import Gates, HistoryScorer
    from LaMP.utils.modeling.zoo import load_zoo_model, read_zoo

    zoo = read_zoo(runs["zoo"])
    lamp_model, slot, _ = load_zoo_model(zoo_model_args(runs), zoo)
    slot.use(zoo.vector_of(["611"], [1.0]))
    module = zoo.modules[0]
    layer = slot.layers[module["name"]]
    torch.manual_seed(0)
    x = torch.randn(2, 5, module["in"])
    gates = Gates(slot, "cpu")
    with torch.no_grad():
        gates.params[module["name"]].copy_(torch.randn(module["in"]))
        g = gates.params[module["name"]]
        gate = torch.sigmoid(x @ g).unsqueeze(-1)
        delta = torch.from_numpy(zoo.basis[f"{module['name']}.B"]).double() @ torch.from_numpy(
            zoo.vectors[1, module["offset"]:module["offset"] + module["rank"] ** 2].reshape(
                module["rank"], module["rank"])).double() @ torch.from_numpy(
            zoo.basis[f"{module['name']}.A"]).double()
        base = layer.base_layer(x)
        expected = base.double() + (x * gate).double() @ delta.T
        torch.testing.assert_close(layer(x).double(), expected, atol=1e-5, rtol=1e-4)
        gates.remove()
        torch.testing.assert_close(layer(x).double(), base.double() + x.double() @ delta.T,
                                   atol=1e-5, rtol=1e-4)
    # A causal model's answer positions are those that predict an answer token.
    scorer = HistoryScorer(lamp_model, slot, 2)
    labels = torch.tensor([[-100, -100, 7, 8], [-100, 5, -100, -100]])
    where = scorer.positions(module["name"], {"labels": labels})
    assert where.tolist() == [[False, True, True, False], [True, False, False, False]]


def test_seq2seq_answer_positions_follow_where_a_module_reads_from():
    import types

    import torch

    from LaMP.utils.modeling.pieces import HistoryScorer

    scorer = HistoryScorer(types.SimpleNamespace(is_seq2seq=True), None, 1)
    batch = {"labels": torch.tensor([[5, 6, -100]]),
             "attention_mask": torch.tensor([[1, 1, 1, 1, 0]])}
    prompt, answer = [[True, True, True, True, False]], [[True, True, False]]
    for name in ("encoder.block.0.layer.0.SelfAttention.q",
                 "decoder.block.1.layer.1.EncDecAttention.v",
                 "model.decoder.layers.0.encoder_attn.k_proj"):
        assert scorer.positions(name, batch).tolist() == prompt, name
    for name in ("decoder.block.0.layer.0.SelfAttention.v",
                 "decoder.block.1.layer.1.EncDecAttention.q",
                 "model.decoder.layers.0.self_attn.v_proj"):
        assert scorer.positions(name, batch).tolist() == answer, name


def gate_run(runs, out: Path, *extra: str) -> dict:
    return train_zoo_gates.main([
        "--zoo", str(runs["zoo"]), "--train_data", str(runs["root"] / "train.json"), "--task",
        "LaMP-7", "--model_addr", str(runs["model"]), "--output_dir", str(out), "--device",
        "cpu", "--max_length", "96", "--generation_max_length", "16", "--max_steps", "4",
        "--per_device_batch_size", "2", "--learning_rate", "0.5", *extra])


def gates_refused(runs, capsys, folder: Path, *extra) -> str:
    """train_zoo_gates.py's one error line for ``extra`` (the flags of gate_run, one step);
    ``folder`` left unchanged."""
    before = listing(folder) if folder.exists() else None
    status, lines = run_cli(train_zoo_gates.main, [
        "--zoo", runs["zoo"], "--train_data", runs["root"] / "train.json", "--task", "LaMP-7",
        "--model_addr", runs["model"], "--output_dir", folder, "--device", "cpu",
        "--max_length", "96", "--generation_max_length", "16", "--max_steps", "1",
        "--per_device_batch_size", "2", "--learning_rate", "0.5", *extra], capsys)
    assert status != 0 and len(problems(lines)) == 1, lines
    assert (listing(folder) if folder.exists() else None) == before
    return problems(lines)[0]


@pytest.fixture(scope="module")
def gates(runs):
    out = runs["root"] / "gates"
    before = (runs["zoo"] / "vectors.safetensors").read_bytes()
    result = gate_run(runs, out)
    assert (runs["zoo"] / "vectors.safetensors").read_bytes() == before
    return {"folder": out, "result": result}


def test_every_members_gates_train_once_and_a_rerun_trains_none(runs, gates):
    from safetensors.numpy import load_file

    from LaMP.utils.data.users import user_adapter_dir
    from LaMP.utils.modeling.zoo import read_zoo

    zoo = read_zoo(runs["zoo"])
    index = json.loads((gates["folder"] / "gates.json").read_text())
    assert index["sharers"] == ["610", "611", "612"] and gates["result"]["trained"] == [
        "610", "611", "612"]
    for user in index["sharers"]:
        state = load_file(str(user_adapter_dir(gates["folder"], user) / "gate.safetensors"))
        assert sorted(state) == sorted(m["name"] for m in zoo.modules)
        assert all(np.abs(g).max() > 0 for g in state.values())  # the gates moved from 0
        record = json.loads((user_adapter_dir(gates["folder"], user) / "user.json").read_text())
        assert record["user"] == user and record["steps"] == 4
    again = gate_run(runs, gates["folder"])
    assert again["trained"] == [] and again["index"] == index


def test_gates_of_another_run_join_the_index_and_a_rebuilt_zoo_is_refused(runs, tmp_path,
                                                                          capsys):
    import shutil

    from safetensors.numpy import load_file, save_file

    zoo = tmp_path / "zoo"
    shutil.copytree(runs["zoo"], zoo)
    (tmp_path / "a.txt").write_text("610\n")
    (tmp_path / "b.txt").write_text("612\n")
    common = ["--zoo", zoo, "--train_data", runs["root"] / "train.json", "--task", "LaMP-7",
              "--model_addr", runs["model"], "--output_dir", tmp_path / "gates", "--device",
              "cpu", "--max_length", "96", "--generation_max_length", "16", "--max_steps", "1",
              "--per_device_batch_size", "2"]
    train_zoo_gates.main([str(a) for a in [*common, "--users", tmp_path / "a.txt"]])
    (tmp_path / "gates" / "gates.json").unlink()  # as if killed before the index
    result = train_zoo_gates.main([str(a) for a in [*common, "--users", tmp_path / "b.txt"]])
    assert result["trained"] == ["612"] and result["index"]["sharers"] == ["610", "612"]
    vectors = load_file(str(zoo / "vectors.safetensors"))["R"]
    save_file({"R": vectors * 2}, str(zoo / "vectors.safetensors"))  # the zoo rebuilt
    before = listing(tmp_path / "gates")
    status, lines = run_cli(train_zoo_gates.main, [*common, "--users", tmp_path / "b.txt"],
                            capsys)
    assert status != 0 and len(problems(lines)) == 1 and "zoo_sha256" in problems(lines)[0]
    assert listing(tmp_path / "gates") == before


def test_pieces_assemble_other_sharers_pieces_and_serve_them(runs, gates, tmp_path):
    from safetensors.numpy import load_file

    from LaMP.utils.data.users import user_adapter_dir
    from LaMP.utils.modeling import zoo as zoo_module
    from LaMP.utils.modeling.pieces import assemble

    data = questions(tmp_path / "dev.json", [("611", "dev611"), ("611", "611")])
    result = choose(runs, runs["zoo"], data, tmp_path / "out", "--method", "pieces",
                    "--gates", str(gates["folder"]), "--pieces_top_k", "2")
    chosen = result["selection"]["users"]
    zoo = zoo_module.read_zoo(runs["zoo"])
    for user, sharers in (("dev611", {"610", "611", "612"}), ("611", {"610", "612"})):
        record = chosen[user]
        assert record["method"] == "pieces" and record["candidates"] is None
        assert sorted(record["pieces"]) == sorted(m["name"] for m in zoo.modules)
        for piece in record["pieces"].values():
            assert len(piece["members"]) == 2 and set(piece["members"]) <= sharers
            assert sum(piece["weights"]) == pytest.approx(1.0)
            assert piece["weights"] == sorted(piece["weights"], reverse=True)
        served = load_file(str(user_adapter_dir(tmp_path / "out", user) /
                               "adapter_model.safetensors"))
        expected = zoo_module.lora_state(zoo, assemble(zoo, record["pieces"]))
        for key in expected:
            np.testing.assert_allclose(served[key], expected[key], atol=1e-6)
    assert chosen["611"]["excluded_own"] and chosen["611"]["sharers"] == 2
    # The same user's history scores the sharers the same way every time.
    again = choose(runs, runs["zoo"], data, tmp_path / "again", "--method", "pieces",
                   "--gates", str(gates["folder"]), "--pieces_top_k", "2")
    def timeless(users):
        return {user: {k: v for k, v in r.items() if k != "seconds"} for user, r in users.items()}

    assert timeless(again["selection"]["users"]) == timeless(chosen)


def test_bad_pieces_input_is_one_error_line(runs, gates, tmp_path, capsys):
    import shutil

    other = tmp_path / "other_zoo"
    shutil.copytree(runs["zoo"], other)
    index = json.loads((other / "zoo.json").read_text())
    index["users"] = list(index["users"])  # same members; a changed index is another zoo
    (other / "zoo.json").write_text(json.dumps(index) + " ")
    (tmp_path / "pcs.json").write_text(json.dumps({"users": {"u": {
        "method": "pieces", "support_error": 0.1, "candidates": None, "support_size": 3}}}))
    bad_index = tmp_path / "bad_gates"
    shutil.copytree(gates["folder"], bad_index)
    index = json.loads((bad_index / "gates.json").read_text())
    (bad_index / "gates.json").write_text(json.dumps({**index, "sharers": ["610", "610"]}))
    data = questions(tmp_path / "d.json", [("610", "x")])
    common = ["--validation_data", data, "--task", "LaMP-7", "--model_addr", runs["model"],
              "--output_dir", tmp_path / "out"]
    cases = [
        (personalize.main, [*common, "--zoo", runs["zoo"], "--method", "pieces"],
         "--method pieces and --gates go together"),
        (personalize.main, [*common, "--zoo", runs["zoo"], "--gates", gates["folder"]],
         "--method pieces and --gates go together"),
        (personalize.main, [*common, "--zoo", other, "--method", "pieces", "--gates",
                            gates["folder"]], "trained on another zoo"),
        (personalize.main, [*common, "--zoo", runs["zoo"], "--method", "pieces", "--gates",
                            runs["zoo"]], "no gates.json"),
        (personalize.main, [*common, "--zoo", runs["zoo"], "--method", "pieces", "--gates",
                            bad_index], "not a gates index"),
        (personalize.main, [*common, "--zoo", runs["zoo"], "--method", "pieces", "--gates",
                            gates["folder"], "--pieces_top_k", "0"], "must be >= 1"),
        (zoo_bound.main, ["--selection", tmp_path / "pcs.json", "--output_file",
                          tmp_path / "b.json"], "the certificate does not cover it"),
        (train_zoo_gates.main, ["--zoo", runs["zoo"], "--train_data", data, "--task", "LaMP-7",
                                "--model_addr", runs["model"], "--output_dir",
                                tmp_path / "out"], "none of its users is a member"),
        (train_zoo_gates.main, ["--zoo", runs["zoo"], "--train_data", data, "--task", "LaMP-7",
                                "--model_addr", runs["model"], "--output_dir",
                                tmp_path / "out", "--users", "most_active:5"], "has 1 users"),
        (train_zoo_gates.main, ["--zoo", runs["zoo"], "--train_data", data, "--task", "LaMP-7",
                                "--model_addr", runs["model"], "--output_dir", runs["zoo"]],
         "--output_dir"),
    ]
    for main, argv, message in cases:
        status, lines = run_cli(main, argv, capsys)
        assert status != 0 and len(problems(lines)) == 1 and message in problems(lines)[0], \
            (message, lines)
    assert not (tmp_path / "out").exists() and not (tmp_path / "b.json").exists()


def test_support_items_caps_the_support_set_with_the_seed(runs, tmp_path):
    data = questions(tmp_path / "dev.json", [("611", "dev611")])
    sizes = {}
    for run, extra in (("all", ()), ("a", ("--support_items", "2")), ("b", ("--support_items", "2"))):
        result = choose(runs, runs["zoo"], data, tmp_path / run, "--method", "random", *extra)
        record = result["selection"]["users"]["dev611"]
        sizes[run] = (record["support_size"], record["support_error"])
        assert record["seconds"] >= 0
    profile = json.loads(Path(data).read_text())[0]["profile"]
    assert sizes["all"][0] == len(profile) > 2
    assert sizes["a"] == sizes["b"] and sizes["a"][0] == 2


def test_bf16_scores_under_autocast_and_an_older_folder_continues_only_in_fp32(
        runs, planted_zoo, tmp_path, capsys, monkeypatch):
    from LaMP.utils.modeling import training

    native = training.bf16_supported(True)
    data = questions(tmp_path / "dev.json", [("611", "dev611")])
    fp32 = choose(runs, planted_zoo, data, tmp_path / "fp32", "--no_bf16",
                  "--rerank_metric", "none")
    assert fp32["selection"]["bf16"] is False and fp32["index"]["bf16"] is False
    common = ["--task", "LaMP-7", "--model_addr", str(runs["model"]), "--zoo", str(planted_zoo),
              "--device", "cpu", "--max_length", "96", "--generation_max_length", "8",
              "--rerank_metric", "none"]
    # Where bf16 is not native, --bf16 is one error line and the default is fp32.
    monkeypatch.setattr(training, "bf16_supported", lambda use_cpu: False)
    status, lines = run_cli(personalize.main, ["--validation_data", data, *common,
                                               "--output_dir", tmp_path / "bf16", "--bf16"],
                            capsys)
    assert status != 0 and problems(lines) == [
        "error: --bf16: this CPU has no AVX512-BF16 or AMX-BF16 instructions; use --no_bf16 "
        "or leave both out"]
    assert not (tmp_path / "bf16").exists()
    assert choose(runs, planted_zoo, data, tmp_path / "default")["selection"]["bf16"] is False
    # A folder from before the flag ran in fp32: where the default is bf16, it continues with
    # --no_bf16 only, and the refusal says why.
    monkeypatch.setattr(training, "bf16_supported", lambda use_cpu: True)
    saved = json.loads((tmp_path / "fp32" / "args.json").read_text())
    saved.pop("bf16")
    (tmp_path / "fp32" / "args.json").write_text(json.dumps(saved))
    more = questions(tmp_path / "more.json", [("610", "dev610")])
    before = listing(tmp_path / "fp32")
    status, lines = run_cli(personalize.main, ["--validation_data", more, *common,
                                               "--output_dir", tmp_path / "fp32"], capsys)
    assert status == 2 and len(problems(lines)) == 1
    assert "(--bf16 False then, True now); it was made before --bf16 existed, so it ran at " \
           "False" in problems(lines)[0]
    assert listing(tmp_path / "fp32") == before
    assert personalize.main(["--validation_data", more, *common, "--output_dir",
                             str(tmp_path / "fp32"), "--no_bf16"])["chosen"] == ["dev610"]
    monkeypatch.undo()
    if not native:
        pytest.skip("what bf16 autocast changes needs hardware that runs it natively")
    bf16 = choose(runs, planted_zoo, data, tmp_path / "bf16", "--bf16", "--rerank_metric", "none")
    ours, theirs = (run["selection"]["users"]["dev611"] for run in (bf16, fp32))
    assert bf16["selection"]["bf16"] is True
    assert json.loads((tmp_path / "bf16" / "args.json").read_text())["bf16"] is True
    # The planted best member still wins; the losses are bf16's, near fp32's but not them.
    assert ours["members"] == theirs["members"] == ["611"]
    for member, loss in theirs["support_losses"].items():
        assert ours["support_losses"][member] == pytest.approx(loss, rel=0.05)
    assert ours["support_losses"] != theirs["support_losses"]


def test_gate_shards_split_the_sharers_and_pieces_wait_for_the_last(runs, gates, tmp_path,
                                                                   capsys):
    from LaMP.utils.data.users import user_adapter_dir

    out = tmp_path / "gates"
    first = gate_run(runs, out, "--num_shards", "2", "--shard_id", "1")
    assert first["shard_sharers"] == first["trained"] == ["611"]
    assert first["index"]["sharers"] == ["611"] and first["index"]["pending"] == ["610", "612"]
    data = questions(tmp_path / "dev.json", [("611", "dev611")])
    status, lines = run_cli(personalize.main, [
        "--validation_data", data, "--task", "LaMP-7", "--model_addr", str(runs["model"]),
        "--zoo", str(runs["zoo"]), "--output_dir", str(tmp_path / "out"), "--device", "cpu",
        "--method", "pieces", "--gates", str(out)], capsys)
    assert status != 0 and len(problems(lines)) == 1
    assert "2 sharers still to train" in problems(lines)[0] and "610" in problems(lines)[0]
    assert not (tmp_path / "out").exists()
    last = gate_run(runs, out, "--num_shards", "2", "--shard_id", "0")
    assert last["trained"] == ["610", "612"]
    assert last["index"]["sharers"] == ["610", "611", "612"] and last["index"]["pending"] == []
    # Each sharer's gates are those of one process training them all (seeded per sharer).
    for user in ("610", "611", "612"):
        mine, whole = (json.loads((user_adapter_dir(folder, user) / "user.json").read_text())
                       for folder in (out, gates["folder"]))
        assert mine["final_loss"] == pytest.approx(whole["final_loss"], rel=1e-6)
    shards_args, whole_args = (json.loads((f / "args.json").read_text())
                               for f in (out, gates["folder"]))
    assert {**shards_args, "output_dir": None} == {**whole_args, "output_dir": None}
    assert choose(runs, runs["zoo"], data, tmp_path / "out", "--method", "pieces", "--gates",
                  str(out))["chosen"] == ["dev611"]


def test_pending_sharers_survive_a_run_with_other_users_and_bad_gate_input_is_one_line(
        runs, tmp_path, capsys, monkeypatch):
    from LaMP.utils.modeling import training

    (tmp_path / "a.txt").write_text("610\n612\n")
    (tmp_path / "b.txt").write_text("611\n")
    out = tmp_path / "gates"
    common = ["--max_steps", "1", "--no_bf16"]
    first = gate_run(runs, out, *common, "--users", str(tmp_path / "a.txt"), "--num_shards",
                     "2", "--shard_id", "0")
    assert first["trained"] == ["610"] and first["index"]["pending"] == ["612"]
    # Another run's sharers join; the first run's other shard is still owed.
    other = gate_run(runs, out, *common, "--users", str(tmp_path / "b.txt"))
    assert other["index"]["sharers"] == ["610", "611"] and other["index"]["pending"] == ["612"]
    last = gate_run(runs, out, *common, "--users", str(tmp_path / "a.txt"), "--num_shards", "2",
                    "--shard_id", "1")
    assert last["trained"] == ["612"] and last["index"]["pending"] == []
    assert last["index"]["sharers"] == ["610", "611", "612"] and last["index"]["bf16"] is False


    # A damaged "pending": one line before any training, from both scripts.
    index = json.loads((out / "gates.json").read_text())
    for hostile in (5, ["610", 3], {"610": 1}):
        (out / "gates.json").write_text(json.dumps({**index, "pending": hostile}))
        assert "not a gates index" in gates_refused(runs, capsys, out, "--no_bf16", "--users",
                                                    tmp_path / "b.txt")
        data = questions(tmp_path / "dev.json", [("611", "dev611")])
        status, lines = run_cli(personalize.main, [
            "--validation_data", data, "--task", "LaMP-7", "--model_addr", str(runs["model"]),
            "--zoo", str(runs["zoo"]), "--output_dir", str(tmp_path / "out"), "--device", "cpu",
            "--method", "pieces", "--gates", str(out)], capsys)
        assert status != 0 and len(problems(lines)) == 1 and "not a gates index" in problems(
            lines)[0]
    (out / "gates.json").write_text(json.dumps(index))
    # --bf16 where it is not native; a folder from before the flag, where the default is bf16.
    monkeypatch.setattr(training, "bf16_supported", lambda use_cpu: False)
    assert "--bf16: this CPU has no AVX512-BF16" in gates_refused(runs, capsys, tmp_path / "new",
                                                                  "--bf16")
    monkeypatch.setattr(training, "bf16_supported", lambda use_cpu: True)
    saved = json.loads((out / "args.json").read_text())
    saved.pop("bf16")
    (out / "args.json").write_text(json.dumps(saved))
    assert "made before --bf16 existed" in gates_refused(runs, capsys, out, "--users",
                                                         tmp_path / "b.txt")
    assert gate_run(runs, out, *common, "--users", str(tmp_path / "b.txt"))["trained"] == []


def test_cluster_sharers_are_the_most_active_of_planted_groups():
    from LaMP.utils.errors import LampError
    from LaMP.utils.modeling.pieces import cluster_sharers

    rng = np.random.default_rng(0)
    centres = np.eye(3) * 10
    users = [f"u{i}" for i in range(9)]
    embeddings = np.vstack([centres[i // 3] + 0.01 * rng.normal(size=3) for i in range(9)])
    sizes = {"u0": 5, "u1": 9, "u2": 9, "u3": 1, "u4": 2, "u5": 3, "u6": 4, "u7": 4, "u8": 4}
    result = cluster_sharers(users, embeddings, sizes, 3, seed=0)
    # u1 and u2 tie on 9 items: the smaller id; u6, u7, u8 tie on 4: u6.
    assert result["sharers"] == ["u1", "u5", "u6"]
    assert sorted(map(tuple, (c["members"] for c in result["clusters"]))) == [
        ("u0", "u1", "u2"), ("u3", "u4", "u5"), ("u6", "u7", "u8")]
    assert cluster_sharers(users, embeddings, sizes, 3, seed=0) == result
    # The direction matters, not the length (the embeddings are L2-normalised first).
    assert cluster_sharers(users, embeddings * np.arange(1, 10)[:, None], sizes, 3, 0) == result
    assert cluster_sharers(users, embeddings, sizes, 1, 0)["sharers"] == ["u1"]
    with pytest.raises(LampError, match="clusters:10: must be in 1 … 9"):
        cluster_sharers(users, embeddings, sizes, 10, 0)


def test_profile_embeddings_are_the_mean_of_the_items_embeddings(tmp_path):
    import torch

    from LaMP.utils.retrieval.dense import embed, load_encoder, profile_embeddings
    from LaMP.utils.tasks import get_task

    task = get_task("LaMP-7")
    profiles = {"a": [{"id": "1", "text": "red fox jumps"}, {"id": "2", "text": "blue"}],
                "b": [{"id": "3", "text": "green green fox"}]}
    folder = build_tiny_bert(tmp_path / "bert", ["red fox jumps", "blue", "green green fox"])
    tokenizer, model = load_encoder(folder, torch.float32)
    model.eval()
    rows = profile_embeddings(task, profiles, model, tokenizer, torch.device("cpu"), batch_size=2)
    with torch.inference_mode():
        one = {text: embed(model, tokenizer, [text], 64, "cpu")[0].numpy()
               for text in ("red fox jumps", "blue", "green green fox")}
    assert rows.shape == (2, 32)
    np.testing.assert_allclose(rows[0], (one["red fox jumps"] + one["blue"]) / 2, atol=1e-5)
    np.testing.assert_allclose(rows[1], one["green green fox"], atol=1e-5)


def test_clusters_n_trains_the_most_active_member_of_each_cluster_once(runs, tmp_path, capsys,
                                                                     monkeypatch):
    profiles = {q["id"]: q["profile"] for q in json.loads((runs["root"] / "train.json")
                                                           .read_text())}
    encoder = build_tiny_bert(tmp_path / "bert", [item["text"] for items in profiles.values()
                                                  for item in items])
    out = tmp_path / "gates"
    flags = ["--users", "clusters:2", "--sharer_encoder", encoder, "--max_steps", "1",
             "--no_bf16"]
    result = gate_run(runs, out, *flags)
    stored = json.loads((out / "sharers.json").read_text())
    (key, clustering), = stored.items()
    assert key.startswith(f"clusters:2 {encoder} seed 42 members ")
    assert result["index"]["sharers"] == result["trained"] == clustering["sharers"]
    assert sorted(u for c in clustering["clusters"] for u in c["members"]) == [
        "610", "611", "612"]
    for cluster in clustering["clusters"]:
        most = max(len(profiles[u]) for u in cluster["members"])
        assert len(profiles[cluster["sharer"]]) == most
        assert cluster["sharer"] == min(u for u in cluster["members"] if len(profiles[u]) == most)
    # A rerun (or another shard) takes the stored clustering: no encoder runs again.
    from LaMP.utils.retrieval import dense

    monkeypatch.setattr(dense, "profile_embeddings", lambda *a, **k: pytest.fail("re-embedded"))
    again = gate_run(runs, out, *flags)
    assert again["trained"] == [] and again["index"]["sharers"] == clustering["sharers"]
    monkeypatch.undo()
    new = tmp_path / "new"
    for extra, message in (
            (["--users", "clusters:4", "--sharer_encoder", encoder], "has 3 zoo members"),
            (["--users", "clusters:0"], "clusters:N needs a whole number"),
            (["--sharer_encoder", encoder], "--sharer_encoder goes with --users clusters:N"),
            (["--users", "clusters:2", "--sharer_encoder", tmp_path / "nothing"],
             "cannot load the encoder")):
        assert message in gates_refused(runs, capsys, new, "--no_bf16", *extra)
    # Who shares is the run's choice, not the folder's: other --users (and encoders) add.
    mixed = tmp_path / "mixed"
    gate_run(runs, mixed, "--users", "most_active:1", "--max_steps", "1", "--no_bf16")
    gate_run(runs, mixed, *flags)
    assert gate_run(runs, mixed, "--max_steps", "1", "--no_bf16")["index"]["sharers"] == [
        "610", "611", "612"]
    # clusters:02 is clusters:2: the same stored clustering, nothing embedded again.
    monkeypatch.setattr(dense, "profile_embeddings", lambda *a, **k: pytest.fail("re-embedded"))
    assert gate_run(runs, out, "--users", "clusters:02", *flags[2:])["trained"] == []
    monkeypatch.undo()
    for hostile, message in (("[1, 2]", "not a sharers file"),
                             (json.dumps({key: {"sharers": 5}}), "not a gates index"),
                             ("{", "sharers.json"),
                             (json.dumps({key: {**clustering, "sharers": ["610", "dev9"]}}),
                              "sharers that are no zoo member of the data: 1 (first: dev9)")):
        (out / "sharers.json").write_text(hostile)
        assert message in gates_refused(runs, capsys, out, *flags)


def test_a_seq2seq_zoo_selects_assembles_pieces_and_serves_them(tmp_path):
    """The whole zoo on a tiny T5: LoRA-XS users, the zoo, gates, a chosen member and
    assembled pieces, each served by evaluate_llm.py as loading its folder by hand does."""
    import torch

    from conftest import build_tiny_t5

    from LaMP.utils.data.users import user_adapter_dir
    from LaMP.utils.modeling.zoo import read_zoo

    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        model = build_tiny_t5(tmp_path / "t5")
        data = questions(tmp_path / "train.json", [("610", "610"), ("611", "611"), ("612", "612")])
        users = train(data, model, tmp_path / "users", steps=40)
        build_zoo.main(["--user_adapters", str(users), "--output_dir", str(tmp_path / "zoo")])
        zoo = read_zoo(tmp_path / "zoo")
        names = [m["name"] for m in zoo.modules]
        assert any(".encoder." in f".{n}" for n in names) and any("EncDecAttention" in n
                                                                 for n in names)
        train_zoo_gates.main([
            "--zoo", str(tmp_path / "zoo"), "--train_data", data, "--task", "LaMP-7",
            "--model_addr", str(model), "--output_dir", str(tmp_path / "gates"), "--device",
            "cpu", "--max_length", "96", "--generation_max_length", "16", "--max_steps", "2",
            "--per_device_batch_size", "2", "--learning_rate", "0.5", "--no_bf16"])
        dev = questions(tmp_path / "dev.json", [("611", "dev611")])
        common = ["--validation_data", dev, "--task", "LaMP-7", "--model_addr", str(model),
                  "--device", "cpu", "--max_length", "96", "--generation_max_length", "8"]
        chosen = {}
        for method, extra in (("select", []), ("pieces", ["--gates", str(tmp_path / "gates"),
                                                          "--pieces_top_k", "1"])):
            chosen[method] = personalize.main([
                *common, "--zoo", str(tmp_path / "zoo"), "--output_dir", str(tmp_path / method),
                "--method", method, "--no_bf16", *extra])["selection"]["users"]["dev611"]
        pieces = chosen["pieces"]["pieces"]
        assert sorted(pieces) == sorted(names)  # encoder, decoder and cross-attention alike
        assert all(len(p["members"]) == 1 and p["weights"] == [1.0] for p in pieces.values())
        served = {}
        for method, by_hand in (("select", user_adapter_dir(users, chosen["select"]["members"][0])),
                                ("pieces", user_adapter_dir(tmp_path / "pieces", "dev611"))):
            answers = []
            for out, flags in (("served", ["--user_adapters", str(tmp_path / method)]),
                               ("by_hand", ["--adapter", str(by_hand)])):
                evaluate_llm.main([*common, "--output_dir", str(tmp_path / f"{method}_{out}"),
                                   "--generation_num_beams", "1", *flags])
                answers.append(json.loads((tmp_path / f"{method}_{out}" / "predictions.json")
                                          .read_text())["golds"])
            assert answers[0] == answers[1] and answers[0][0]["output"], method
            served[method] = answers[0]
        evaluate_llm.main([*common, "--output_dir", str(tmp_path / "base"),
                           "--generation_num_beams", "1"])
        base = json.loads((tmp_path / "base" / "predictions.json").read_text())["golds"]
        assert served["select"] != base and served["pieces"] != base  # the adapters act
    finally:
        torch.set_num_threads(threads)


def test_a_zoo_without_its_recipe_takes_its_runs_and_bad_recipes_are_one_line(runs, tmp_path,
                                                                             capsys):
    import shutil

    from LaMP.utils.modeling.zoo import read_zoo, zoo_recipe

    data = questions(tmp_path / "p.json", [("610", "610"), ("611", "611")])
    oppu = train(data, runs["model"], tmp_path / "oppu", 2, "lora_xs", "--recipe", "oppu")
    # A run stopped before its users.json: its args.json says the recipe.
    (oppu / "users.json").unlink()
    build_zoo.main(["--user_adapters", str(oppu), "--output_dir", str(tmp_path / "zoo")])
    assert read_zoo(tmp_path / "zoo").index["recipe"] == "oppu"
    # A zoo built before the recipe was recorded: its members' runs say it.
    index = json.loads((tmp_path / "zoo" / "zoo.json").read_text())
    (tmp_path / "zoo" / "zoo.json").write_text(json.dumps(
        {k: v for k, v in index.items() if k != "recipe"}))
    assert zoo_recipe(read_zoo(tmp_path / "zoo")) == "oppu"
    dev = questions(tmp_path / "dev.json", [("612", "dev612")])
    common = ["--validation_data", dev, "--task", "LaMP-7", "--model_addr", str(runs["model"]),
              "--device", "cpu", "--max_length", "96", "--generation_max_length", "8",
              "--method", "random", "--no_bf16"]
    shutil.rmtree(oppu)  # ... and once they are gone, nothing does
    for zoo_json, message in (
            ({k: v for k, v in index.items() if k != "recipe"}, "rebuild it with build_zoo.py"),
            ({**index, "recipe": ["oppu"]}, "zoo.json's recipe ['oppu'] is none of"),
            ({**index, "recipe": "nosuch"}, "zoo.json's recipe 'nosuch' is none of")):
        (tmp_path / "zoo" / "zoo.json").write_text(json.dumps(zoo_json))
        status, lines = run_cli(personalize.main, [*common, "--zoo", tmp_path / "zoo",
                                                   "--output_dir", tmp_path / "out"], capsys)
        assert status != 0 and len(problems(lines)) == 1 and message in problems(lines)[0], lines
        assert not (tmp_path / "out").exists()
    # A run whose record names a recipe this project does not know.
    again = train(data, runs["model"], tmp_path / "again", 1)
    for recipe in (["oppu"], "nosuch", 3):
        record = json.loads((again / "users.json").read_text())
        (again / "users.json").write_text(json.dumps({**record, "recipe": recipe}))
        status, lines = run_cli(build_zoo.main, ["--user_adapters", again, "--output_dir",
                                                 tmp_path / "zoo2"], capsys)
        assert status != 0 and len(problems(lines)) == 1 and "is none of lamp, oppu" in \
            problems(lines)[0], lines
        assert not (tmp_path / "zoo2").exists()


def test_a_selection_folder_refuses_a_zoo_rebuilt_at_its_path(runs, tmp_path, capsys):
    import shutil

    from safetensors.numpy import load_file, save_file

    zoo = tmp_path / "zoo"
    shutil.copytree(runs["zoo"], zoo)
    data = questions(tmp_path / "dev.json", [("610", "dev610")])
    common = ["--validation_data", data, "--task", "LaMP-7", "--model_addr", str(runs["model"]),
              "--zoo", str(zoo), "--output_dir", str(tmp_path / "out"), "--device", "cpu",
              "--max_length", "96", "--generation_max_length", "8", "--method", "random"]
    personalize.main(common)
    # A folder from before the digest was recorded continues as it did.
    saved = json.loads((tmp_path / "out" / "args.json").read_text())
    (tmp_path / "out" / "args.json").write_text(json.dumps(
        {k: v for k, v in saved.items() if k != "zoo_sha256"}))
    more = questions(tmp_path / "more.json", [("611", "dev611")])
    assert personalize.main([*common[:1], more, *common[2:]])["chosen"] == ["dev611"]
    vectors = load_file(str(zoo / "vectors.safetensors"))["R"]
    save_file({"R": vectors * 2}, str(zoo / "vectors.safetensors"))  # the zoo rebuilt
    before = listing(tmp_path / "out")
    status, lines = run_cli(personalize.main, common, capsys)
    assert status == 2 and len(problems(lines)) == 1 and "--zoo_sha256" in problems(lines)[0]
    assert listing(tmp_path / "out") == before
