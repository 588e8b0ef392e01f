"""Stacked LoRA serving (LaMP/utils/modeling/lora_stack.py): every row through its own adapter with
batched products, against peft's own LoRA layers and against one user at a time."""
from __future__ import annotations

import json
import re

import pytest

from conftest import run_cli, write_json
from test_user_serving import (one_user_at_a_time, predictions_file, save_user_adapters,
                               serve_args, tweet_questions, write_user_record)
from LaMP import evaluate_llm
from LaMP.utils.data.users import user_adapter_dir
from LaMP.utils.errors import LampError
from LaMP.utils.modeling import lora_stack

pytestmark = pytest.mark.usefixtures("torch_single_thread")


@pytest.fixture
def stacks_built(monkeypatch):
    """How many LoraStacks serving built (0: it went through peft)."""
    built = []
    original = lora_stack.LoraStack.__init__

    def counting(self, *args, **kwargs):
        built.append(1)
        original(self, *args, **kwargs)

    monkeypatch.setattr(lora_stack.LoraStack, "__init__", counting)
    return built


def load_base(model_path):
    from transformers import AutoConfig, AutoModelForCausalLM, AutoModelForSeq2SeqLM

    seq2seq = AutoConfig.from_pretrained(model_path).is_encoder_decoder
    return (AutoModelForSeq2SeqLM if seq2seq else AutoModelForCausalLM).from_pretrained(
        model_path).eval()


def random_adapters(model_path, folder, ranks, **config) -> dict:
    """One random (non-zero) LoRA adapter per rank in ``ranks``, named u0, u1, …"""
    import torch
    from peft import LoraConfig, get_peft_model

    folders = {}
    for number, rank in enumerate(ranks):
        torch.manual_seed(number)
        folders[f"u{number}"] = folder / f"a{number}"
        options = {"init_lora_weights": False, **config}  # random B: a term that shows
        get_peft_model(load_base(model_path), LoraConfig(r=rank, **options)
                       ).save_pretrained(folders[f"u{number}"])
    return folders


@pytest.mark.parametrize("rslora", [False, True], ids=["lora", "rslora"])
def test_each_rows_lora_term_is_peft_s_for_its_adapter(tiny_model, tmp_path, rslora):
    """Layer by layer: the stacked hook adds to each row what peft's LoRA layer adds for that
    row's adapter (nothing for a base-model row), with adapters of different ranks."""
    import torch
    from peft import PeftModel

    folders = random_adapters(tiny_model, tmp_path, (2, 4, 3), lora_alpha=8,
                              use_rslora=rslora, target_modules="all-linear")
    base = load_base(tiny_model)
    stack = lora_stack.LoraStack(base, folders)
    assert len(stack.layers) > 4
    names = ["u1", "__base__", "u0", "u2", "u1"]
    x_by_layer = {}
    modules = dict(base.named_modules())
    generator = torch.Generator().manual_seed(0)
    for module_name in stack.layers:
        layer = modules[module_name]
        x = torch.randn(len(names), 3, layer.in_features, generator=generator)
        x_by_layer[module_name] = x
        with torch.no_grad(), stack.rows(names, "__base__"):
            stacked = layer(x)
        plain = layer(x).detach()
        for row, name in enumerate(names):
            if name == "__base__":
                assert torch.equal(stacked[row], plain[row])
                continue
            peft_model = PeftModel.from_pretrained(load_base(tiny_model), str(folders[name]))
            peft_layer = dict(peft_model.base_model.model.named_modules())[module_name]
            with torch.no_grad():
                expected = peft_layer(x[row:row + 1])[0]
            torch.testing.assert_close(stacked[row], expected, rtol=1e-5, atol=1e-6)
    # The hooks are gone after the block: every layer is the base model's again.
    for module_name in stack.layers:
        layer, x = modules[module_name], x_by_layer[module_name]
        assert not layer._forward_hooks
        assert torch.equal(layer(x), torch.nn.functional.linear(x, layer.weight, layer.bias))


def test_rows_repeated_for_beams_and_labels_take_their_prompts_adapter(tiny_llama, tmp_path):
    import torch

    folders = random_adapters(tiny_llama, tmp_path, (2, 2))
    base = load_base(tiny_llama)
    stack = lora_stack.LoraStack(base, folders)
    name = next(iter(stack.layers))
    layer = dict(base.named_modules())[name]
    x = torch.randn(2, 1, layer.in_features)
    with torch.no_grad():
        with stack.rows(["u0", "u1"], "__base__"):
            once = layer(x)
        with stack.rows(["u0", "u1"], "__base__"):
            thrice = layer(x.repeat_interleave(3, 0))  # beams, or one row per label
        with stack.rows(["u0", "u1"], "__base__"):
            with pytest.raises(RuntimeError, match="a pass of 3 rows for 2 prompts"):
                layer(x[:1].repeat(3, 1, 1))
    torch.testing.assert_close(thrice, once.repeat_interleave(3, 0))


@pytest.mark.parametrize("num_beams", [1, 2])
def test_serving_stacks_lora_adapters_and_answers_as_peft_and_each_user_alone(
        tiny_model, tmp_path, stacks_built, num_beams):
    questions = tweet_questions(6)
    data = write_json(tmp_path / "LaMP_7_dev.json", questions)
    root = save_user_adapters(tiny_model, tmp_path / "per_user", [q["id"] for q in questions])
    flags = ("--user_adapters", str(root), "--max_loaded_adapters", "4",
             "--generation_num_beams", str(num_beams))
    evaluate_llm.main(serve_args(data, tiny_model, "LaMP-7", tmp_path / "stacked", *flags))
    assert len(stacks_built) == 2  # two groups: 4 users, then 2
    stacks_built.clear()
    evaluate_llm.main(serve_args(data, tiny_model, "LaMP-7", tmp_path / "peft", *flags,
                                 "--user_adapter_batches", "peft"))
    assert not stacks_built
    stacked, through_peft = (predictions_file(tmp_path / d) for d in ("stacked", "peft"))
    assert stacked == through_peft
    assert [answer for _, answer in stacked] == one_user_at_a_time(
        tiny_model, root, questions, "LaMP-7", tmp_path, num_beams=num_beams)


@pytest.mark.parametrize("change, reason", [
    ({"use_dora": True}, "DoRA"),
    ({"rank_pattern": {"q": 2}}, "per-module ranks"),
    ({"alpha_pattern": {"q": 2}}, "per-module alphas"),
    ({"modules_to_save": ["lm_head"]}, "other trained modules"),
    ({"lora_bias": True}, "a LoRA bias"),
    ({"fan_in_fan_out": True}, "fan_in_fan_out"),
    ({"peft_type": "IA3"}, "not LoRA"),
    ({"alora_invocation_tokens": [5, 6]}, "aLoRA"),
    ({"bias": "lora_only"}, "trained biases"),
    ({"trainable_token_indices": [3]}, "trained token embeddings"),
    ({"init_lora_weights": "pissa"}, "changes the base weights"),
    ({"init_lora_weights": "olora"}, "changes the base weights"),
    # A field peft adds later, set: served by peft's own layers, not as plain LoRA.
    ({"some_future_variant": {"k": 1}}, "some_future_variant = {'k': 1}"),
])
def test_what_cannot_be_stacked_is_named(change, reason):
    config = {"peft_type": "LORA", "r": 4, "lora_alpha": 8, "use_dora": False,
              "rank_pattern": {}, "alpha_pattern": {}, "modules_to_save": None,
              "lora_bias": False, "fan_in_fan_out": False}
    assert lora_stack.stackable(config) is None
    assert reason in lora_stack.stackable({**config, **change})


def test_per_module_ranks_are_served_through_peft_with_the_same_answers(
        tiny_t5, tmp_path, stacks_built):
    questions = tweet_questions(4)
    data = write_json(tmp_path / "LaMP_7_dev.json", questions)
    root = save_user_adapters(tiny_t5, tmp_path / "per_user", [q["id"] for q in questions])
    config_path = user_adapter_dir(root, "q0") / "adapter_config.json"
    config = json.loads(config_path.read_text())
    config["alpha_pattern"] = {"q": 8}  # the default alpha written out: same adapter
    config_path.write_text(json.dumps(config))
    evaluate_llm.main(serve_args(data, tiny_t5, "LaMP-7", tmp_path / "eval",
                                 "--user_adapters", str(root)))
    assert not stacks_built
    assert [a for _, a in predictions_file(tmp_path / "eval")] == one_user_at_a_time(
        tiny_t5, root, questions, "LaMP-7", tmp_path)


@pytest.mark.parametrize("damage, message", [
    ("foreign key", r"weight base_model\.model\.extra\.weight is not one its "
                    r"adapter_config\.json makes on this model"),
    ("one matrix", r"no weight base_model\.model\..*\.lora_B\.weight, which its "
                   r"adapter_config\.json makes on this model"),
    ("wrong width", r"lora_A\.weight is \(4, 33\); its adapter_config\.json makes it "
                    r"\(4, 32\) on this model \(another r, or another base model\?\)"),
    ("a layer it lacks", r"weight base_model\.model\.model\.layers\.9\.self_attn\.q_proj"
                         r"\.lora_A\.weight is not one its adapter_config\.json makes"),
])
@pytest.mark.parametrize("batches", ["stacked", "peft"])
def test_damaged_weights_are_one_error_naming_the_user(tiny_llama, tmp_path, damage, message,
                                                       batches):
    import torch
    from safetensors.torch import load_file, save_file

    data = write_json(tmp_path / "LaMP_7_dev.json", tweet_questions(2))
    root = save_user_adapters(tiny_llama, tmp_path / "per_user", ["q0", "q1"])
    weights_path = user_adapter_dir(root, "q1") / "adapter_model.safetensors"
    weights = load_file(str(weights_path))
    if damage == "foreign key":
        weights["base_model.model.extra.weight"] = torch.zeros(2)
    elif damage == "one matrix":
        weights.pop(next(key for key in weights if key.endswith("lora_B.weight")))
    elif damage == "wrong width":
        key = next(key for key in weights if key.endswith("lora_A.weight"))
        weights[key] = torch.zeros(weights[key].shape[0], weights[key].shape[1] + 1)
    elif damage == "a layer it lacks":  # the tiny model has two layers
        for matrix, shape in (("lora_A", (4, 32)), ("lora_B", (32, 4))):
            weights[f"base_model.model.model.layers.9.self_attn.q_proj.{matrix}.weight"] = (
                torch.zeros(shape))
    save_file(weights, str(weights_path))
    with pytest.raises(LampError) as error:
        evaluate_llm.main(serve_args(data, tiny_llama, "LaMP-7", tmp_path / "eval",
                                     "--user_adapters", str(root),
                                     "--user_adapter_batches", batches))
    text = str(error.value)
    assert re.match(r"cannot load user 'q1'\'s adapter .*/users/q1: ", text), text
    assert re.search(message, text) and len(text.splitlines()) == 1, text
    assert not (tmp_path / "eval").exists()


def test_a_stack_refuses_weights_of_another_rank_than_the_config_says(tiny_llama, tmp_path):
    folders = random_adapters(tiny_llama, tmp_path, (2, 4))
    config_path = folders["u1"] / "adapter_config.json"
    config_path.write_text(json.dumps({**json.loads(config_path.read_text()), "r": 8}))
    with pytest.raises(LampError, match=r"^cannot load adapter .*/a1: the LoRA matrices of "
                                        r".* \(\(4, 32\), \(32, 4\)\) are not of rank r 8, as its "
                                        r"adapter_config\.json says$"):
        lora_stack.LoraStack(load_base(tiny_llama), folders)


def test_lora_on_embeddings_is_served_through_peft_with_the_same_answers(
        tiny_llama, tmp_path, capfd):
    import torch
    from peft import LoraConfig, get_peft_model

    questions = tweet_questions(4)
    data = write_json(tmp_path / "LaMP_7_dev.json", questions)
    root = tmp_path / "per_user"
    for number, question in enumerate(questions):
        torch.manual_seed(number)
        config = LoraConfig(r=2, init_lora_weights=False, task_type="CAUSAL_LM",
                            target_modules=["q_proj", "embed_tokens"])
        get_peft_model(load_base(tiny_llama), config).save_pretrained(
            user_adapter_dir(root, question["id"]))
        write_user_record(root, question["id"])
    capfd.readouterr()
    evaluate_llm.main(serve_args(data, tiny_llama, "LaMP-7", tmp_path / "eval",
                                 "--user_adapters", str(root)))
    assert "mixed batches through peft from group 1 on" in capfd.readouterr().err
    assert [a for _, a in predictions_file(tmp_path / "eval")] == one_user_at_a_time(
        tiny_llama, root, questions, "LaMP-7", tmp_path)


def test_a_bf16_models_terms_are_computed_and_added_as_peft_does(tiny_llama, tmp_path):
    """peft keeps adapters of a bf16 model in float32 and adds their term before rounding;
    the stack does the same, so its rows equal peft's bit for bit."""
    import torch
    from peft import PeftModel
    from transformers import AutoModelForCausalLM

    folders = random_adapters(tiny_llama, tmp_path, (4, 4))
    base = AutoModelForCausalLM.from_pretrained(tiny_llama, dtype=torch.bfloat16).eval()
    stack = lora_stack.LoraStack(base, folders)
    modules = dict(base.named_modules())
    generator = torch.Generator().manual_seed(0)
    peft_layers = {}
    for name in folders:
        peft_model = PeftModel.from_pretrained(
            AutoModelForCausalLM.from_pretrained(tiny_llama, dtype=torch.bfloat16),
            str(folders[name])).eval()
        peft_layers[name] = dict(peft_model.base_model.model.named_modules())
    for module_name in stack.layers:
        layer = modules[module_name]
        x = torch.randn(2, 3, layer.in_features, generator=generator).to(torch.bfloat16)
        with torch.no_grad(), stack.rows(["u0", "u1"], "__base__"):
            stacked = layer(x)
        assert stacked.dtype == torch.bfloat16
        for row, name in enumerate(["u0", "u1"]):
            with torch.no_grad():
                expected = peft_layers[name][module_name](x[row:row + 1])[0]
            assert torch.equal(stacked[row], expected), module_name


@pytest.mark.parametrize("options", [
    {}, {"use_rslora": True}, {"init_lora_weights": "gaussian"},
    {"target_modules": ["q_proj", "v_proj"], "lora_alpha": 32, "lora_dropout": 0.1},
], ids=["defaults", "rslora", "gaussian init", "the per-user recipe"])
def test_configs_peft_saves_for_plain_lora_are_stackable(tiny_llama, tmp_path, options):
    folders = random_adapters(tiny_llama, tmp_path, (2,), task_type="CAUSAL_LM", **options)
    config = json.loads((folders["u0"] / "adapter_config.json").read_text())
    assert lora_stack.stackable(config) is None


def test_trained_biases_are_served_through_peft_with_the_same_answers(tmp_path, stacks_built):
    """bias="lora_only" on a model whose adapted layers have biases: peft saves the trained
    biases with the adapter, which the stack cannot hold, so peft serves it."""
    import torch
    from peft import LoraConfig, get_peft_model
    from transformers import LlamaConfig, LlamaForCausalLM

    from conftest import build_tiny_llama

    model_path = build_tiny_llama(tmp_path / "model")
    config = LlamaConfig.from_pretrained(model_path)
    config.attention_bias = True
    torch.manual_seed(0)
    LlamaForCausalLM(config).save_pretrained(model_path)
    questions = tweet_questions(2)
    data = write_json(tmp_path / "LaMP_7_dev.json", questions)
    root = tmp_path / "per_user"
    for number, question in enumerate(questions):
        torch.manual_seed(number)
        get_peft_model(load_base(model_path), LoraConfig(
            r=2, init_lora_weights=False, bias="lora_only" if number == 0 else "none",
            task_type="CAUSAL_LM")).save_pretrained(user_adapter_dir(root, question["id"]))
        write_user_record(root, question["id"])
    evaluate_llm.main(serve_args(data, model_path, "LaMP-7", tmp_path / "eval",
                                 "--user_adapters", str(root)))
    assert not stacks_built
    assert [a for _, a in predictions_file(tmp_path / "eval")] == one_user_at_a_time(
        model_path, root, questions, "LaMP-7", tmp_path)


def tamper(folder, change: str) -> None:
    """Edit one user's adapter after training (its weights: r 4 on q_proj and v_proj)."""
    path = folder / "adapter_config.json"
    config = json.loads(path.read_text())
    if change == "no adapter_config.json":
        path.unlink()
        return
    if change == "no weights":
        (folder / "adapter_model.safetensors").unlink()
        return
    edits = {"r": {"r": 8}, "lora_alpha": {"lora_alpha": 32}, "use_rslora": {"use_rslora": True},
             "lora_dropout": {"lora_dropout": 0.5},
             "target_modules as a pattern": {"target_modules": r".*\.(q_proj|v_proj)"},
             "fewer target_modules": {"target_modules": ["q_proj"]},
             "more target_modules": {"target_modules": ["q_proj", "v_proj", "k_proj"]},
             "layers_to_transform": {"layers_to_transform": [0]},
             "rank_pattern": {"rank_pattern": {"q_proj": 2}}, "use_dora": {"use_dora": True},
             "peft_type": {"peft_type": "IA3"}}
    path.write_text(json.dumps({**config, **edits[change]}))


# What changes only the scaling (or nothing, at inference) is served, as peft serves it;
# anything that does not match the weights (rank, which layers) is refused, whichever way
# batches are served (rsLoRA beside LoRA: two kinds, refused).
@pytest.mark.parametrize("change, served", [
    ("r", False), ("lora_alpha", True), ("lora_dropout", True),
    ("target_modules as a pattern", True), ("use_rslora", False),
    ("fewer target_modules", False),
    ("more target_modules", False), ("layers_to_transform", False), ("rank_pattern", False),
    ("use_dora", False), ("peft_type", False), ("no adapter_config.json", False),
    ("no weights", False)])
def test_both_ways_of_serving_take_and_refuse_the_same_edited_folders(tiny_llama, tmp_path,
                                                                     capsys, change, served):
    questions = tweet_questions(4)
    data = write_json(tmp_path / "LaMP_7_dev.json", questions)
    root = save_user_adapters(tiny_llama, tmp_path / "per_user", [q["id"] for q in questions])
    tamper(user_adapter_dir(root, "q1"), change)
    outcomes = {}
    for batches in ("stacked", "peft"):
        status, lines = run_cli(evaluate_llm.main, serve_args(
            data, tiny_llama, "LaMP-7", tmp_path / batches, "--user_adapters", str(root),
            "--user_adapter_batches", batches), capsys)
        err = [line for line in lines if line.startswith("error")]
        answers = predictions_file(tmp_path / batches) if status == 0 else None
        outcomes[batches] = (status, err, answers)
    assert outcomes["stacked"] == outcomes["peft"]
    status, err, answers = outcomes["stacked"]
    if served:
        assert status == 0 and [a for _, a in answers] == one_user_at_a_time(
            tiny_llama, root, questions, "LaMP-7", tmp_path)
    else:
        assert status == 2 and len(err) == 1, err
        assert re.match(r"error: (cannot load user 'q1'\'s adapter|--user_adapters \(user "
                        r"'q1'\)|--user_adapters .*: the adapters are of different kinds)",
                        err[0]), err[0]
