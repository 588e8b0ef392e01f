"""Every PEFT method of the table on a tiny T5 and a tiny Llama built offline: it trains only
its own parameters, its saved adapter reloads (directly and through evaluate_llm.py --adapter)
to identical outputs, label scoring (the key/value-cache path) and generation read the virtual
tokens as the adapter's own forward pass does, and the prompt with them fits --max_length."""
from __future__ import annotations

import json
import subprocess
import sys

import pytest
import torch

from conftest import REPO, write_json
from test_evaluate_llm import lamp3_questions, lamp7_questions, run_args
from test_train_llm import EXAMPLES, common_args, lamp_model_for, merged_sample
from LaMP import evaluate_llm, train_llm
from LaMP.utils.errors import LampError
from LaMP.utils.modeling.checkpoints import resume_differences
from LaMP.utils.modeling.examples import ProfileOptions, build_examples
from LaMP.utils.modeling.model import LampModel, load_model
from LaMP.utils.modeling.peft_methods import (PEFT_METHODS, PeftMethod, check_supported,
                                              method_of_adapter)
from LaMP.utils.modeling.predict import predict
from LaMP.utils.modeling.training import PaddingCollator, add_peft, training_features
from LaMP.utils.tasks import get_task

pytestmark = pytest.mark.usefixtures("torch_single_thread")

ADAPTERS = [name for name, method in PEFT_METHODS.items() if method.builder is not None]
VIRTUAL = [name for name, method in PEFT_METHODS.items() if method.virtual_tokens]
N_VIRTUAL = 4  # few, so the tiny models stay fast; enough to be seen in every length check


def options(method: str, folder, **changes) -> dict:
    """The parsed train_llm.py flags for ``method`` (defaults, dropout off for exact checks)."""
    args = train_llm.parse_args(["--train_data", "t", "--validation_data", "v", "--model_name",
                                 str(folder), "--task", "LaMP-3", "--output_dir", "o",
                                 "--peft", method, "--lora_dropout", "0",
                                 "--num_virtual_tokens", str(N_VIRTUAL)])
    return {**vars(args), **changes}


def adapted(folder, method: str) -> LampModel:
    lamp_model = lamp_model_for(folder)
    model = add_peft(lamp_model.model, method, options(method, folder),
                     seq2seq=lamp_model.is_seq2seq)
    return LampModel(model=model, tokenizer=lamp_model.tokenizer,
                     is_seq2seq=lamp_model.is_seq2seq, device=lamp_model.device)


def perturbed(lamp_model: LampModel) -> LampModel:
    """The adapter moved off its initialisation (LoRA starts as a no-op), so that the
    checks below see its effect."""
    torch.manual_seed(1)
    with torch.no_grad():
        for parameter in lamp_model.model.parameters():
            if parameter.requires_grad:
                parameter.add_(0.5 * torch.randn_like(parameter))
    lamp_model.model.eval()
    return lamp_model


@pytest.fixture(params=["t5", "llama"])
def kind_folder(request, tiny_t5, tiny_llama):
    return {"t5": tiny_t5, "llama": tiny_llama}[request.param]


@pytest.mark.parametrize("method", ADAPTERS)
def test_a_few_steps_train_only_the_method_and_the_adapter_reloads_identically(
        method, kind_folder, tmp_path):
    torch.manual_seed(0)
    lamp_model = adapted(kind_folder, method)
    model = lamp_model.model
    before = {name: p.detach().clone() for name, p in model.named_parameters()}
    trainable = {name for name, p in model.named_parameters() if p.requires_grad}
    features = training_features(lamp_model, EXAMPLES, max_length=64, target_max_length=16)
    batch = PaddingCollator(lamp_model.tokenizer.pad_token_id)(features)
    # IA3 scales, and virtual tokens more so, move slowly at LoRA's rate.
    rate = 0.3 if PEFT_METHODS[method].virtual_tokens else 0.1 if method == "ia3" else 1e-2
    optimizer = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=rate)

    def loss_without_dropout() -> float:
        model.eval()
        with torch.no_grad():
            return model(**batch).loss.item()

    first = loss_without_dropout()
    model.train()
    for _ in range(16):
        model(**batch).loss.backward()
        optimizer.step()
        optimizer.zero_grad()
    last = loss_without_dropout()
    # Deterministic losses (no dropout), so a small margin is a real decrease.
    assert last < first - 0.01, (first, last)
    changed = {name for name, p in model.named_parameters() if not torch.equal(p, before[name])}
    # Every trained tensor is the adapter's (peft names them after the adapter, "default");
    # every base weight is bit-identical.
    assert changed and changed <= trainable
    assert all(".default" in name for name in trainable)

    model.eval()
    folder = tmp_path / "adapter"
    model.save_pretrained(folder)
    assert method_of_adapter(json.loads((folder / "adapter_config.json").read_text())) == method
    loaded = load_model(str(kind_folder), device="cpu", adapter=str(folder), dtype=torch.float32)
    assert loaded.virtual_tokens == lamp_model.virtual_tokens
    prompts = [e.prompt for e in EXAMPLES]
    settings = dict(max_length=64, max_new_tokens=4, num_beams=2, progress=False)
    assert loaded.generate(prompts, **settings) == lamp_model.generate(prompts, **settings)

    # Through evaluate_llm.py --adapter: the label each question gets equals the in-memory
    # model's, and is one of the task's labels.
    task = get_task("LaMP-3")
    data = write_json(tmp_path / "merged.json", lamp3_questions())
    returned = evaluate_llm.main(run_args(data, kind_folder, "LaMP-3", tmp_path / "eval",
                                          "--label_scoring", "--max_length", "96",
                                          "--adapter", str(folder)))
    examples = build_examples(str(data), task, lamp_model.prompt_builder(task, 96),
                              ProfileOptions(use_profile=True, num_retrieved=2, is_ranked=True))
    expected = predict(lamp_model, task, examples, max_length=96, max_new_tokens=4,
                       label_scoring=True, progress=False, batch_size=2)
    assert returned["predictions"] == expected
    assert set(expected) <= set(task.labels)


@pytest.mark.parametrize("method", ADAPTERS)
def test_label_scores_and_answers_are_those_of_the_adapters_own_forward(method, kind_folder):
    lamp_model = perturbed(adapted(kind_folder, method))
    model, tokenizer = lamp_model.model, lamp_model.tokenizer
    # Prompts of different lengths: the shorter is padded in the batch.
    prompts = ["the quick brown fox", "I am so tired today but my friends and I will go"]
    labels = ["1", "2", "the beach", "lazy dog"]
    label_ids = [lamp_model._label_ids(label) for label in labels]
    with torch.inference_mode():
        scores = lamp_model._label_log_likelihoods(lamp_model.encode(prompts, 64), label_ids)
        for i, prompt in enumerate(prompts):  # one prompt, one label, no padding, no cache
            for j, ids in enumerate(label_ids):
                if lamp_model.is_seq2seq:
                    encoded = tokenizer([prompt], return_tensors="pt")
                    logits = model(**encoded, labels=torch.tensor([ids])).logits[0]
                else:
                    row = torch.tensor([tokenizer(prompt)["input_ids"] + ids])
                    logits = model(input_ids=row,
                                   attention_mask=torch.ones_like(row)).logits[0, -len(ids) - 1:-1]
                reference = torch.log_softmax(logits.float(), -1)[-len(ids):]
                expected = reference.gather(-1, torch.tensor(ids)[:, None]).sum()
                assert scores[i, j].item() == pytest.approx(expected.item(), abs=1e-4)
    assert lamp_model.score_labels(prompts, labels, max_length=64, progress=False) == [
        labels[j] for j in scores.argmax(dim=1).tolist()]
    # A prompt's answer does not depend on the batch it is padded in.
    for beams in (1, 2):
        settings = dict(max_length=64, max_new_tokens=4, num_beams=beams, progress=False)
        together = lamp_model.generate(prompts, **settings)
        assert together == [lamp_model.generate([p], **settings)[0] for p in prompts]
    # The answer is greedy decoding by the adapter's own forward pass over the whole text
    # (no cache, no padding). peft's ``generate`` is no reference: under transformers 5 it
    # drifts for prompt tuning and starts wrong for prefix tuning.
    for prompt in prompts:
        assert lamp_model.generate([prompt], max_length=64, max_new_tokens=4,
                                   progress=False) == [greedy_by_full_forward(lamp_model, prompt, 4)]


def greedy_by_full_forward(lamp_model: LampModel, prompt: str, steps: int) -> str:
    model, tokenizer = lamp_model.model, lamp_model.tokenizer
    ids = tokenizer([prompt])["input_ids"][0]
    new: list[int] = []
    with torch.inference_mode():
        for _ in range(steps):
            if lamp_model.is_seq2seq:
                start = model.config.decoder_start_token_id
                logits = model(input_ids=torch.tensor([ids]), attention_mask=torch.ones(1, len(ids)),
                               decoder_input_ids=torch.tensor([[start] + new])).logits
            else:
                row = torch.tensor([ids + new])
                logits = model(input_ids=row, attention_mask=torch.ones_like(row)).logits
            new.append(int(logits[0, -1].argmax()))
            if new[-1] == tokenizer.eos_token_id:
                break
    return tokenizer.decode(new, skip_special_tokens=True).strip()


@pytest.mark.parametrize("method", VIRTUAL)
def test_prompts_and_training_inputs_leave_room_for_the_virtual_tokens(method, kind_folder,
                                                                       tmp_path):
    lamp_model = adapted(kind_folder, method)
    assert lamp_model.virtual_tokens == N_VIRTUAL
    plain = lamp_model_for(kind_folder)
    task = get_task("LaMP-7")
    data = write_json(tmp_path / "merged.json", lamp7_questions())
    profile = ProfileOptions(use_profile=True, num_retrieved=2, is_ranked=True)
    max_length = 48
    for example in build_examples(str(data), task, lamp_model.prompt_builder(task, max_length),
                                  profile, require_output=True):
        length = lamp_model.prompt_lengths([example.prompt])[0]
        assert length + N_VIRTUAL <= max_length
        # Long inputs use the budget: the virtual tokens cost the prompt their own number.
        assert length + N_VIRTUAL >= max_length - 3
    longest = max(plain.prompt_lengths([e.prompt for e in build_examples(
        str(data), task, plain.prompt_builder(task, max_length), profile)]))
    assert longest > max_length - N_VIRTUAL  # without virtual tokens the budget is larger
    long = [EXAMPLES[0].__class__(id="1", prompt=" ".join(["the quick brown fox"] * 40),
                                  target="lazy dog")]
    (feature,) = training_features(lamp_model, long, max_length=max_length, target_max_length=4)
    prompt_tokens = sum(1 for label in feature["labels"] if label == -100) \
        if not lamp_model.is_seq2seq else len(feature["input_ids"])
    assert prompt_tokens == max_length - N_VIRTUAL
    with pytest.raises(LampError, match="virtual tokens"):
        lamp_model.prompt_builder(task, N_VIRTUAL + 7)


def test_train_llm_trains_and_saves_a_prompt_learning_adapter(tmp_path, tiny_llama):
    train = merged_sample(tmp_path, 3, "train", 8)
    valid = merged_sample(tmp_path, 3, "dev", 4)
    results = train_llm.main(common_args(tmp_path, tiny_llama, train, valid, "LaMP-3",
                                         "--peft", "prefix_tuning", "--num_virtual_tokens", "3",
                                         "--label_scoring", "--max_steps", "2",
                                         "--max_length", "64"))
    out = tmp_path / "out"
    config = json.loads((out / "adapter_config.json").read_text())
    assert config["peft_type"] == "PREFIX_TUNING" and config["num_virtual_tokens"] == 3
    assert json.loads((out / "args.json").read_text())["peft"] == "prefix_tuning"
    assert results["global_step"] == 2
    # Its predictions are labels, and the adapter reloads to the same ones.
    predictions = [row["output"] for row in
                   json.loads((out / "predictions.json").read_text())["golds"]]
    assert set(predictions) <= set(get_task("LaMP-3").labels)
    again = evaluate_llm.main(["--validation_data", valid, "--model_addr", str(tiny_llama),
                               "--task", "LaMP-3", "--output_dir", str(tmp_path / "eval"),
                               "--max_length", "64", "--label_scoring", "--device", "cpu",
                               "--adapter", str(out)])
    assert again["predictions"] == predictions


def checkpoint_with(tmp_path, adapter_config: dict | None):
    folder = tmp_path / "checkpoint-2"
    write_json(folder / "trainer_state.json", {})
    if adapter_config is not None:
        write_json(folder / "adapter_config.json", adapter_config)
    return folder


@pytest.mark.parametrize("saved, now, expected", [
    ({"peft_type": "PROMPT_TUNING", "num_virtual_tokens": 4},
     {"peft": "prompt_tuning", "num_virtual_tokens": 8}, ["--num_virtual_tokens 4 (now: 8)"]),
    ({"peft_type": "PROMPT_TUNING", "num_virtual_tokens": 4},
     {"peft": "prompt_tuning", "num_virtual_tokens": 4}, []),
    ({"peft_type": "LORA", "r": 4, "lora_alpha": 8},
     {"peft": "dora", "lora_r": 4, "lora_alpha": 8}, ["--peft lora (now: dora)"]),
    ({"peft_type": "LORA", "use_dora": True, "r": 4, "lora_alpha": 8},
     {"peft": "dora", "lora_r": 8, "lora_alpha": 8}, ["--lora_r 4 (now: 8)"]),
    ({"peft_type": "PREFIX_TUNING", "num_virtual_tokens": 4, "prefix_projection": False},
     {"peft": "prefix_tuning", "num_virtual_tokens": 4, "prefix_projection": True},
     ["--prefix_projection False (now: True)"]),
    ({"peft_type": "P_TUNING", "num_virtual_tokens": 4, "encoder_hidden_size": 32},
     {"peft": "p_tuning", "num_virtual_tokens": 4, "prompt_encoder_hidden_size": None}, []),
    ({"peft_type": "IA3", "target_modules": ["k", "v", "wo"]},
     {"peft": "ia3", "ia3_target_modules": ["v", "k"]}, ["--ia3_target_modules k v wo (now: k v)"]),
    (None, {"peft": "prompt_tuning", "num_virtual_tokens": 4}, ["--peft none (now: prompt_tuning)"]),
])
def test_resume_compares_the_shape_flags_of_the_method(tmp_path, saved, now, expected):
    assert resume_differences(checkpoint_with(tmp_path, saved), now) == expected


@pytest.mark.parametrize("argv, message", [
    (["--peft", "adapters"], "argument --peft: invalid choice: 'adapters'"),
    (["--num_virtual_tokens", "0"], "--num_virtual_tokens must be >= 1"),
    (["--peft", "prompt_tuning", "--prompt_tuning_init", "text"],
     "--prompt_tuning_init text needs --prompt_tuning_init_text"),
    (["--prompt_encoder_hidden_size", "0"], "--prompt_encoder_hidden_size must be >= 1"),
    (["--peft", "p_tuning", "--num_virtual_tokens", "60", "--max_length", "64"],
     "--num_virtual_tokens 60 leaves no room for a prompt within --max_length 64"),
    (["--ia3_target_modules", "k", "--ia3_feedforward_modules", "wo"],
     "--ia3_feedforward_modules wo: not among --ia3_target_modules"),
])
def test_bad_method_flags_are_one_line_and_exit_2(argv, message, capsys):
    with pytest.raises(SystemExit) as raised:
        train_llm.parse_args(["--train_data", "t", "--validation_data", "v", "--model_name", "m",
                              "--task", "LaMP-3", "--output_dir", "o", *argv])
    assert raised.value.code == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and err[0].startswith("error: ") and message in err[0]


def test_a_method_peft_lacks_for_a_model_kind_is_one_line():
    causal_only = PeftMethod("causal_only", "test row", "x:y", seq2seq=False)
    with pytest.raises(LampError, match=r"^--peft causal_only is not available for seq2seq "
                                        r"models such as t5$"):
        check_supported(causal_only, seq2seq=True, model_name="t5")
    check_supported(causal_only, seq2seq=False, model_name="llama")


def test_the_table_names_every_method_and_imports_neither_torch_nor_peft():
    assert {"lora", "dora", "rslora", "ia3", "prompt_tuning", "prefix_tuning", "p_tuning",
            "none"} <= set(PEFT_METHODS)
    code = ("import sys, LaMP.utils.modeling.peft_methods, LaMP.utils.modeling.checkpoints; "
            "print(sorted({'torch', 'peft', 'transformers'} & set(sys.modules)))")
    done = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True,
                          cwd=REPO, check=True)
    assert done.stdout.strip() == "[]"


def test_prompt_tuning_can_start_from_the_words_of_a_text(tiny_llama):
    lamp_model = lamp_model_for(tiny_llama)
    words = lamp_model.tokenizer("the quick brown fox", add_special_tokens=False)["input_ids"]
    embedding = lamp_model.model.get_input_embeddings().weight.detach().clone()
    model = add_peft(lamp_model.model, "prompt_tuning",
                     options("prompt_tuning", tiny_llama, prompt_tuning_init="text",
                             prompt_tuning_init_text="the quick brown fox"), seq2seq=False)
    virtual = model.get_prompt(batch_size=1)[0].detach()
    # peft repeats the words (or cuts them) to fill the virtual tokens.
    expected = [words[i % len(words)] for i in range(N_VIRTUAL)]
    assert torch.equal(virtual, embedding[expected])


@pytest.mark.parametrize("method, flag", [("lora", "--lora_target_modules"),
                                          ("dora", "--lora_target_modules"),
                                          ("ia3", "--ia3_target_modules")])
def test_layers_the_model_lacks_are_one_line_naming_the_flag(method, flag, tiny_llama):
    lamp_model = lamp_model_for(tiny_llama)
    changes = {flag.removeprefix("--"): ["no_such_layer"]}
    with pytest.raises(LampError, match=rf"^--peft {method} set-up failed \(.*\); name the "
                                        rf"layers with {flag}$"):
        add_peft(lamp_model.model, method, options(method, tiny_llama, **changes),
                 seq2seq=False)
