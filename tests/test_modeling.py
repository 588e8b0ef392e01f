"""The model wrapper on tiny random models: kinds, padding, batching, label scoring, chat
templates and peft adapters, and model or adapter folders that do not load.

Each check is made against the plain Hugging Face API run one prompt at a time, so a fault in
padding, sorting or slicing shows up as a different answer.
"""
from __future__ import annotations

import json
import shutil
from pathlib import Path

import pytest
import torch

from conftest import CHAT_TEMPLATE, edited_adapter, problems, run_cli
from LaMP.utils.errors import LampError
from LaMP.utils.modeling.model import LampModel, load_model
from LaMP.utils.tasks import get_task

pytestmark = pytest.mark.usefixtures("torch_single_thread")

PROMPTS = [  # different lengths, not in length order, so batching has to sort and restore
    "Generate a title for the following abstract of a paper: new study finds that students "
    "who sleep more learn faster and remember better",
    "Paraphrase the following tweet: I am so tired today",
    "What is the score of the following review on a scale of 1 to 5? just answer with 1, 2, "
    "3, 4, or 5 review: the weather is nice today",
    "the quick brown fox",
    "Generate a subject for the following email: my friends and I will go to the beach "
    "tomorrow morning",
    "Which tag does this movie relate to among the following tags? description: a fox",
]
MAX_LENGTH = 256
NEW_TOKENS = 4  # enough to tell answers apart, short enough to keep the tests fast


def make_printable(lamp: LampModel) -> LampModel:
    """Zero the output rows of all but printable ASCII bytes of a random ByT5 model.

    A random byte-level model mostly emits end-of-sequence or stray bytes that decode to
    nothing, so every answer would be "" and any mix-up of answers would go unseen; with the
    other logits at zero, the printable bytes (random logits, some above zero) win.
    """
    printable = torch.zeros(lamp.model.config.vocab_size, dtype=torch.bool)
    printable[3 + ord(" "):3 + ord("~") + 1] = True  # ByT5 ids are byte values + 3
    with torch.no_grad():
        lamp.model.get_output_embeddings().weight[~printable] = 0.0
    return lamp


@pytest.fixture(scope="module")
def t5(tiny_t5):
    return make_printable(load_model(str(tiny_t5), device="cpu"))


@pytest.fixture(scope="module")
def llama(tiny_llama):
    return load_model(str(tiny_llama), device="cpu")


@pytest.fixture(scope="module")
def llama_chat(tiny_llama):
    return load_model(str(tiny_llama), device="cpu", chat_template=True)


@pytest.fixture(params=["t5", "llama", "llama_chat"])
def lamp(request):
    return request.getfixturevalue(request.param)


def model_input_ids(lamp: LampModel, prompt: str) -> list[int]:
    """The ids the model should read for one prompt, built with the tokenizer directly."""
    if lamp.chat_template:
        text = lamp.tokenizer.apply_chat_template([{"role": "user", "content": prompt}],
                                                  tokenize=False, add_generation_prompt=True)
        return lamp.tokenizer(text, add_special_tokens=False)["input_ids"]
    return lamp.tokenizer(prompt)["input_ids"]


# -- loading ------------------------------------------------------------------------------

def test_the_kind_of_model_comes_from_its_config(tiny_t5, tiny_llama, tmp_path):
    from transformers import LlamaForCausalLM, T5ForConditionalGeneration

    seq2seq = load_model(str(tiny_t5), device="cpu")
    assert seq2seq.is_seq2seq and isinstance(seq2seq.model, T5ForConditionalGeneration)
    assert seq2seq.tokenizer.padding_side == "right"
    # A causal model in a folder named like a T5 checkpoint is still causal.
    misleading = shutil.copytree(tiny_llama, tmp_path / "flan-t5-base")
    causal = load_model(str(misleading), device="cpu")
    assert not causal.is_seq2seq and isinstance(causal.model, LlamaForCausalLM)
    assert causal.tokenizer.padding_side == "left"
    assert causal.tokenizer.pad_token is not None
    assert not causal.model.training


def test_a_missing_model_is_a_user_error(tmp_path):
    with pytest.raises(LampError, match="cannot load model"):
        load_model(str(tmp_path / "no-such-model"), device="cpu")


def test_chat_template_needs_a_tokenizer_that_has_one(tiny_t5):
    with pytest.raises(LampError, match="no chat template"):
        load_model(str(tiny_t5), device="cpu", chat_template=True)


def edit_json(path: Path, **changes) -> None:
    path.write_text(json.dumps({**json.loads(path.read_text()), **changes}))


@pytest.mark.parametrize("damage, message", [
    ("cut config", "cannot load model"),
    ("cut tokenizer", "cannot load the tokenizer"),
    ("other shapes", "cannot load the weights"),
])
def test_a_model_folder_that_does_not_load_is_one_error(tmp_path, tiny_llama, no_network,
                                                        damage, message):
    folder = tmp_path / "model"
    shutil.copytree(tiny_llama, folder)
    if damage == "cut config":
        (folder / "config.json").write_text((folder / "config.json").read_text()[:30])
    elif damage == "cut tokenizer":
        (folder / "tokenizer.json").write_text((folder / "tokenizer.json").read_text()[:50])
    else:  # the weights of another model size under this config
        edit_json(folder / "config.json", hidden_size=64, intermediate_size=128)
    with pytest.raises(LampError, match=message) as raised:
        load_model(str(folder), device="cpu")
    assert str(folder) in str(raised.value) and "\n" not in str(raised.value)
    assert no_network == []


def test_a_whole_adapter_loads_without_any_network(tiny_llama, tiny_adapter, no_network):
    from peft import PeftModel

    lamp_model = load_model(str(tiny_llama), device="cpu", adapter=str(tiny_adapter))
    assert isinstance(lamp_model.model, PeftModel)
    assert no_network == []


def test_an_adapter_of_another_model_is_one_error(tiny_t5, tiny_adapter, no_network):
    with pytest.raises(LampError, match=f"cannot load adapter {tiny_adapter} onto {tiny_t5}"):
        load_model(str(tiny_t5), device="cpu", adapter=str(tiny_adapter))
    assert no_network == []


def test_an_unknown_peft_type_is_one_line(tiny_llama, tiny_adapter, tmp_path):
    folder = edited_adapter(tiny_adapter, tmp_path, {"peft_type": "NOPE"})
    with pytest.raises(LampError) as raised:
        load_model(str(tiny_llama), device="cpu", adapter=str(folder))
    assert str(raised.value) == (f"cannot load adapter {folder} onto {tiny_llama}: its "
                                 "adapter_config.json does not suit peft (KeyError: 'NOPE')")


# -- generation ---------------------------------------------------------------------------

def test_causal_models_pad_on_the_left(llama):
    encoded = llama.encode(["the fox", PROMPTS[0]], MAX_LENGTH)
    short = model_input_ids(llama, "the fox")
    assert encoded["input_ids"][0, -len(short):].tolist() == short  # the prompt ends the row
    assert encoded["attention_mask"][0].tolist() == (
        [0] * (encoded["input_ids"].shape[1] - len(short)) + [1] * len(short))
    assert encoded["attention_mask"][1].all()


def plain_answer(lamp: LampModel, prompt: str) -> str:
    """One prompt through ``model.generate`` directly, no padding; a causal model's output
    starts with the prompt, so its answer is what follows."""
    ids = torch.tensor([model_input_ids(lamp, prompt)])
    generated = lamp.model.generate(input_ids=ids, attention_mask=torch.ones_like(ids),
                                    generation_config=lamp.generation_config(NEW_TOKENS, 1))[0]
    if not lamp.is_seq2seq:
        generated = generated[ids.shape[1]:]
    return lamp.tokenizer.decode(generated, skip_special_tokens=True).strip()


def test_answers_match_the_plain_api(lamp):
    answers = lamp.generate(PROMPTS, max_length=MAX_LENGTH, max_new_tokens=NEW_TOKENS,
                            batch_size=4, progress=False)
    for prompt, answer in zip(PROMPTS, answers):
        assert answer == plain_answer(lamp, prompt)
        assert answer and not answer.startswith(prompt[:12])  # the answer, not the prompt


def test_batched_generation_equals_one_prompt_at_a_time(lamp):
    batched = lamp.generate(PROMPTS, max_length=MAX_LENGTH, max_new_tokens=NEW_TOKENS,
                            batch_size=4, progress=False)
    alone = [lamp.generate([prompt], max_length=MAX_LENGTH, max_new_tokens=NEW_TOKENS,
                           progress=False)[0] for prompt in PROMPTS]
    assert batched == alone
    assert all(batched)
    if not lamp.chat_template:
        # Answers differ between prompts, so an answer given to the wrong prompt would show.
        # (Behind the chat wrapping a random 2-layer model answers every prompt alike.)
        assert len(set(batched)) >= 3


def test_beam_search_runs_and_keeps_the_order(llama):
    batched = llama.generate(PROMPTS, max_length=MAX_LENGTH, max_new_tokens=NEW_TOKENS,
                             num_beams=2, batch_size=4, progress=False)
    alone = [llama.generate([prompt], max_length=MAX_LENGTH, max_new_tokens=NEW_TOKENS,
                            num_beams=2, progress=False)[0] for prompt in PROMPTS]
    assert batched == alone


# -- label scoring ------------------------------------------------------------------------

def label_log_likelihoods(lamp: LampModel, prompt: str, labels) -> list[float]:
    """Each label's summed token log-probability after ``prompt``, label followed by the
    end-of-sequence token, computed one label at a time without padding."""
    tokenizer, scores = lamp.tokenizer, []
    source = model_input_ids(lamp, prompt)
    for label in labels:
        target = tokenizer(label, add_special_tokens=False)["input_ids"] + [tokenizer.eos_token_id]
        with torch.no_grad():
            if lamp.is_seq2seq:
                logits = lamp.model(input_ids=torch.tensor([source]),
                                    labels=torch.tensor([target])).logits[0]
                positions = range(len(target))  # decoder step i predicts target[i]
            else:
                logits = lamp.model(input_ids=torch.tensor([source + target])).logits[0]
                positions = range(len(source) - 1, len(source) + len(target) - 1)
        log_probs = torch.log_softmax(logits.double(), dim=-1)
        scores.append(sum(log_probs[p, t].item() for p, t in zip(positions, target)))
    return scores


@pytest.mark.parametrize("task_name", ["LaMP-2", "LaMP-3"])
def test_label_scoring_picks_the_most_likely_label(lamp, task_name):
    labels = list(get_task(task_name).labels)
    picked = lamp.score_labels(PROMPTS, labels, max_length=MAX_LENGTH, batch_size=4,
                               progress=False)
    # A batch larger than the labels puts several prompts of different lengths together.
    assert lamp.score_labels(PROMPTS, labels, max_length=MAX_LENGTH, batch_size=64,
                             progress=False) == picked
    assert set(picked) <= set(labels)
    for prompt, label in zip(PROMPTS, picked):
        scores = label_log_likelihoods(lamp, prompt, labels)
        # The brute-force argmax, up to float noise between batched and single runs.
        assert scores[labels.index(label)] == pytest.approx(max(scores), abs=1e-4)


# -- prompts and chat templates -----------------------------------------------------------

def test_chat_template_wraps_the_prompt_as_a_user_turn(llama_chat, llama, t5):
    assert llama_chat.tokenizer.chat_template == CHAT_TEMPLATE
    assert llama_chat.wrap("Hi there") == "<s>user\nHi there</s>\n<s>assistant\n"
    assert llama.wrap("Hi there") == "Hi there"
    wrapped_empty = llama_chat.tokenizer("<s>user\n</s>\n<s>assistant\n",
                                         add_special_tokens=False)["input_ids"]
    assert llama_chat.prompt_overhead() == len(wrapped_empty) > 0
    assert t5.prompt_overhead() == 1  # the </s> T5 appends
    assert llama.prompt_overhead() == len(llama.tokenizer("")["input_ids"])


def test_prompt_builder_fits_the_whole_model_input(lamp):
    task = get_task("LaMP-5")
    abstract = ("We study how large language models can be personalized by retrieving items "
                "from a user's profile and adding them to the prompt. ") * 4
    items = [{"id": str(i), "title": f"Paper number {i}", "abstract": abstract} for i in range(3)]
    text = "Generate a title for the following abstract of a paper: " + abstract
    for max_length in (48, 96, 200, 400):
        build = lamp.prompt_builder(task, max_length)
        prompt = build(text, items)
        length = lamp.prompt_lengths([prompt])[0]
        assert length <= max_length
        assert length == len(model_input_ids(lamp, prompt))
        assert lamp.encode([prompt], max_length)["input_ids"].shape[1] == length  # no cut
        # Without items the input gets the whole budget: what is reserved for special tokens
        # and chat wrapping is what they take, no more.
        bare = lamp.prompt_lengths([build(text, [])])[0]
        assert max_length - 2 <= bare <= max_length
    assert '" is a title for "' in prompt  # at 400 tokens items are in, cut to fit


# -- peft adapters ------------------------------------------------------------------------

def forward_logits(model, lamp: LampModel, prompts) -> torch.Tensor:
    encoded = lamp.encode(prompts, MAX_LENGTH)
    extra = {}
    if lamp.is_seq2seq:
        extra["labels"] = torch.tensor([[3 + ord(c) for c in "ok"]] * len(prompts))
    with torch.no_grad():
        return model(**encoded, **extra).logits


def test_a_saved_adapter_changes_outputs_and_reloads_identically(tiny_model, tmp_path):
    from peft import LoraConfig, get_peft_model
    from transformers import AutoModelForCausalLM, AutoModelForSeq2SeqLM

    base = load_model(str(tiny_model), device="cpu")
    model_class = AutoModelForSeq2SeqLM if base.is_seq2seq else AutoModelForCausalLM
    torch.manual_seed(1)
    config = LoraConfig(r=4, lora_alpha=8, init_lora_weights=False,  # random B: not a no-op
                        target_modules=["q", "v"] if base.is_seq2seq else ["q_proj", "v_proj"],
                        task_type="SEQ_2_SEQ_LM" if base.is_seq2seq else "CAUSAL_LM")
    in_memory = get_peft_model(model_class.from_pretrained(tiny_model), config).eval()
    in_memory.save_pretrained(tmp_path / "adapter")
    reloaded = load_model(str(tiny_model), device="cpu", adapter=str(tmp_path / "adapter"))

    before = forward_logits(base.model, base, PROMPTS)
    after = forward_logits(in_memory, base, PROMPTS)
    assert not torch.allclose(before, after, atol=1e-3)
    assert torch.equal(forward_logits(reloaded.model, reloaded, PROMPTS), after)

    labels = list(get_task("LaMP-2").labels)
    in_memory_lamp = LampModel(model=in_memory, tokenizer=base.tokenizer,
                               is_seq2seq=base.is_seq2seq, device=base.device)
    assert (reloaded.score_labels(PROMPTS, labels, max_length=MAX_LENGTH, progress=False)
            == in_memory_lamp.score_labels(PROMPTS, labels, max_length=MAX_LENGTH,
                                           progress=False))


def test_no_prompts_give_no_answers(llama, t5):
    # Under several processes a small evaluation set can leave a process nothing to do.
    for lamp in (llama, t5):
        assert lamp.generate([], max_length=MAX_LENGTH, max_new_tokens=2, progress=False) == []
        assert lamp.score_labels([], ["1", "2"], max_length=MAX_LENGTH, progress=False) == []


# -- models that cannot generate ------------------------------------------------------------

def configs_that_cannot_generate():
    from transformers import (BertConfig, DistilBertConfig, ElectraConfig, RobertaConfig,
                              T5Config, ViTConfig, XLMConfig)

    return {"bert": (BertConfig(), "is an encoder (is_decoder is not set"),
            "roberta": (RobertaConfig(), "is an encoder (is_decoder is not set"),
            "electra": (ElectraConfig(), "is an encoder (is_decoder is not set"),
            "xlm": (XLMConfig(), "is an encoder (causal is not set"),
            "distilbert": (DistilBertConfig(), "has no causal language-model head"),
            "vit": (ViTConfig(), "has no causal language-model head"),
            "t5": (T5Config(is_encoder_decoder=False), "has no causal language-model head")}


@pytest.mark.parametrize("model_type", ["bert", "roberta", "electra", "xlm", "distilbert", "vit",
                                        "t5"])
def test_an_architecture_that_cannot_generate_is_named_from_its_config(model_type):
    from LaMP.utils.modeling.model import generation_problem

    config, why = configs_that_cannot_generate()[model_type]
    problem = generation_problem(config)
    assert problem.startswith(f"its type, {model_type}, {why}")
    assert problem.endswith("it cannot generate text (use a seq2seq or causal LM)")


def test_architectures_that_generate_pass(tiny_t5):
    from transformers import AutoConfig, BartConfig, BertConfig, GPT2Config, LlamaConfig, XLMConfig

    from LaMP.utils.modeling.model import generation_problem

    for config in (AutoConfig.from_pretrained(tiny_t5), LlamaConfig(), GPT2Config(),
                   BertConfig(is_decoder=True), XLMConfig(causal=True),
                   BartConfig(is_encoder_decoder=False)):  # BartForCausalLM: its decoder
        assert generation_problem(config) is None, config.model_type
    # Remote code names its own class; only with trust_remote_code is that class used.
    remote = BertConfig(auto_map={"AutoModelForCausalLM": "modeling_x.XForCausalLM"})
    assert generation_problem(remote, trust_remote_code=True) is None
    assert generation_problem(remote) is not None


def build_tiny_bert(folder):
    """A 1-layer random BERT (masked-LM head) with the Unigram tokenizer."""
    from transformers import BertConfig, BertForMaskedLM

    from conftest import make_unigram_tokenizer

    torch.manual_seed(0)
    tokenizer = make_unigram_tokenizer(chat_template=False)
    config = BertConfig(vocab_size=len(tokenizer), hidden_size=32, num_hidden_layers=1,
                        num_attention_heads=2, intermediate_size=64, max_position_embeddings=256,
                        pad_token_id=tokenizer.pad_token_id)
    BertForMaskedLM(config).save_pretrained(folder)
    tokenizer.save_pretrained(folder)
    return folder


@pytest.fixture(scope="module")
def tiny_bert(tmp_path_factory):
    return build_tiny_bert(tmp_path_factory.mktemp("tiny_bert"))


@pytest.fixture
def no_auto_model_weights(monkeypatch):
    from transformers import AutoModelForCausalLM, AutoModelForSeq2SeqLM

    def refuse(*args, **kwargs):
        raise AssertionError("weights were loaded for a model that cannot generate")

    for auto_class in (AutoModelForCausalLM, AutoModelForSeq2SeqLM):
        monkeypatch.setattr(auto_class, "from_pretrained", refuse)


def test_load_model_refuses_an_encoder_before_its_weights(tiny_bert, no_auto_model_weights):
    with pytest.raises(LampError) as raised:
        load_model(str(tiny_bert), device="cpu")
    assert str(raised.value) == (f"model {str(tiny_bert)!r}: its type, bert, is an encoder "
                                 "(is_decoder is not set in its config): its attention sees "
                                 "the whole text, so it cannot generate text (use a seq2seq "
                                 "or causal LM)")


def encoder_runs(tmp_path, model):
    """(script, argv) of every script that loads a model, on the sample's LaMP-7 dev set."""
    from conftest import SAMPLE
    from LaMP import evaluate_llm, train_llm, train_user_peft

    questions = json.loads((SAMPLE / "LaMP_7" / "dev_questions.json").read_text())[:4]
    golds = {gold["id"]: gold["output"] for gold in
             json.loads((SAMPLE / "LaMP_7" / "dev_outputs.json").read_text())["golds"]}
    merged = tmp_path / "merged.json"
    merged.write_text(json.dumps([{**q, "output": golds[q["id"]]} for q in questions]))
    common = ["--task", "LaMP-7", "--device", "cpu", "--max_length", "64"]
    return {
        "train_llm": (train_llm.main, ["--train_data", merged, "--validation_data", merged,
                                       "--model_name", model, "--output_dir",
                                       tmp_path / "train", *common]),
        "evaluate_llm": (evaluate_llm.main, ["--validation_data", merged, "--model_addr", model,
                                             "--output_dir", tmp_path / "eval", *common]),
        "train_user_peft": (train_user_peft.main, ["--train_data", merged, "--model_name", model,
                                                   "--output_dir", tmp_path / "users",
                                                   *common]),
    }


@pytest.mark.parametrize("script", ["train_llm", "evaluate_llm", "train_user_peft"])
def test_every_script_that_loads_a_model_refuses_an_encoder_in_one_line(tmp_path, capsys,
                                                                         tiny_bert,
                                                                         no_auto_model_weights,
                                                                         script):
    main, argv = encoder_runs(tmp_path, tiny_bert)[script]
    status, lines = run_cli(main, argv, capsys)
    assert status == 2
    assert problems(lines) == [f"error: model {str(tiny_bert)!r}: its type, bert, is an encoder "
                     "(is_decoder is not set in its config): its attention sees the whole "
                     "text, so it cannot generate text (use a seq2seq or causal LM)"]
    assert sorted(path.name for path in tmp_path.iterdir()) == ["merged.json"]


@pytest.fixture(scope="module")
def decoder_bert(tmp_path_factory):
    """conftest's tiny BERT configured as a decoder (BertLMHeadModel): a generation head,
    but a WordPiece tokenizer with no end-of-sequence token."""
    from conftest import TOKENIZER_CORPUS
    from conftest import build_tiny_bert as build_wordpiece_bert

    folder = Path(build_wordpiece_bert(tmp_path_factory.mktemp("decoder_bert"),
                                       TOKENIZER_CORPUS))
    config = json.loads((folder / "config.json").read_text())
    # Positions for the scripts' default lengths (the weights never load in these tests).
    (folder / "config.json").write_text(json.dumps({**config, "is_decoder": True,
                                                    "max_position_embeddings": 512}))
    return folder


@pytest.mark.parametrize("script", ["train_llm", "evaluate_llm", "train_user_peft"])
def test_a_tokenizer_without_an_end_token_is_one_line_before_the_weights(
        tmp_path, capsys, decoder_bert, no_auto_model_weights, script):
    # Every training target and scored label ends in the eos token: without one, training
    # failed inside the collator and label scoring inside the model.
    main, argv = encoder_runs(tmp_path, decoder_bert)[script]
    status, lines = run_cli(main, argv, capsys)
    assert status == 2
    assert problems(lines) == [f"error: model {str(decoder_bert)!r}: its tokenizer "
                               "(BertTokenizer) has no end-of-sequence token (eos_token), so "
                               "no answer could end (use a seq2seq or causal LM's tokenizer)"]
    assert sorted(path.name for path in tmp_path.iterdir()) == ["merged.json"]


def test_lengths_past_a_models_positions_are_named_from_its_config():
    from transformers import BartConfig, GPT2Config, T5Config

    from LaMP.utils.modeling.model import positions_problem

    gpt2 = GPT2Config(n_positions=40)
    assert positions_problem(gpt2, 16, 24) is None  # 40 positions hold 16 + 24
    assert positions_problem(gpt2, 16, 32) == (
        "--max_length 16 + --generation_max_length 32 = 48 tokens exceed its 40 positions; "
        "lower the flag")
    bart = BartConfig(max_position_embeddings=64)  # each side on its own
    assert positions_problem(bart, 64, 64) is None
    assert "--max_length 65 or --generation_max_length 8 exceed its 64" in \
        positions_problem(bart, 65, 8)
    assert positions_problem(T5Config(), 10_000, 10_000) is None  # relative positions


@pytest.mark.parametrize("script", ["train_llm", "evaluate_llm", "train_user_peft"])
def test_lengths_a_model_cannot_hold_are_one_line_before_its_weights(
        tmp_path, capsys, tiny_llama, no_auto_model_weights, script):
    import shutil

    short = tmp_path / "short_llama"
    shutil.copytree(tiny_llama, short)
    config = json.loads((short / "config.json").read_text())
    (short / "config.json").write_text(json.dumps({**config, "max_position_embeddings": 32}))
    main, argv = encoder_runs(tmp_path, short)[script]
    status, lines = run_cli(main, argv, capsys)
    assert status == 2
    assert len(problems(lines)) == 1
    assert problems(lines)[0].startswith(f"error: model {str(short)!r}: --max_length 64 + "
                                         "--generation_max_length ")
    assert problems(lines)[0].endswith("exceed its 32 positions; lower the flag")
