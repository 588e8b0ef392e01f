"""Shared test helpers: repository paths, the real-data location, script loading, running a
script as its ``__main__`` does, tiny models and adapters, and fixtures that refuse model
loads or the network."""
from __future__ import annotations

import importlib.util
import json
import os
import socket
import stat
import sys
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]
# The bundled synthetic sample (data/make_sample.py): the fixture for stage tests, laid out
# like raw_data/user (SAMPLE / "LaMP_3" / "dev_questions.json").
SAMPLE = REPO / "data" / "sample" / "user"
# Real LaMP files for tests, present in CI and on the development machine but never in a
# user's clone; tests that need them skip with a reason when they are absent.
LAMP_REAL = Path(os.environ.get("LAMP_REAL_DIR", REPO.parent / "shared" / "lamp-real"))

requires_real_data = pytest.mark.skipif(
    not (LAMP_REAL / "LaMP_7" / "dev" / "dev_questions.json").exists(),
    reason=f"real LaMP data not found at {LAMP_REAL} (set LAMP_REAL_DIR)",
)


def load_script(relative_path: str):
    """Import a script such as ``eval/eval_task.py`` as a module, to call its ``main``."""
    path = REPO / relative_path
    name = "script_" + relative_path.replace("/", "_").removesuffix(".py")
    spec = importlib.util.spec_from_file_location(name, path)
    module = importlib.util.module_from_spec(spec)
    sys.modules[name] = module
    spec.loader.exec_module(module)
    return module


def write_json(path: Path, obj) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(obj), encoding="utf-8")
    return path


def outputs_doc(task_file_name: str, pairs) -> dict:
    return {"task": task_file_name, "golds": [{"id": i, "output": o} for i, o in pairs]}


def lamp3_files(tmp_path: Path, prediction: str = "4") -> tuple[Path, Path]:
    """LaMP-3 golds (3, 5) and predictions (``prediction``, 5) for questions 1 and 2."""
    golds = write_json(tmp_path / "golds.json", outputs_doc("LaMP_3", [("1", "3"), ("2", "5")]))
    preds = write_json(tmp_path / "preds.json", outputs_doc("LaMP_3", [("1", prediction),
                                                                         ("2", "5")]))
    return golds, preds


def run_cli(main, argv, capsys) -> tuple[int, list[str]]:
    """Exit status and non-blank stderr lines of ``main`` run as its script's ``__main__``
    runs it (``cli.program.run``); a usage error, which argparse exits on from inside
    ``main``, gives its exit status."""
    from LaMP.utils.cli.program import run

    capsys.readouterr()
    try:
        status = run(main, [str(arg) for arg in argv])
    except SystemExit as exited:
        status = exited.code
    return status, [line for line in capsys.readouterr().err.splitlines() if line.strip()]


def problems(lines: list[str]) -> list[str]:
    """The ``error:`` lines and traceback heads among ``lines``, leaving out what logging
    wrote: a user mistake must come to exactly one ``error:`` line and no traceback."""
    return [line for line in lines if line.startswith(("error:", "Traceback"))]


def listing(folder: Path) -> dict[str, object]:
    """Every entry under ``folder``: a file's bytes, a link's target, any other's kind (a
    folder, a device), to compare before and after a run."""
    entries = {}
    for path in sorted(folder.rglob("*")):
        name = str(path.relative_to(folder))
        mode = os.lstat(path).st_mode
        if stat.S_ISLNK(mode):
            entries[name] = "-> " + os.readlink(path)
        elif stat.S_ISREG(mode):
            entries[name] = path.read_bytes()
        else:
            entries[name] = stat.S_IFMT(mode)
    return entries


@pytest.fixture
def no_model_loads(monkeypatch):
    """Any model, tokenizer or config load fails the test: user errors must come first."""
    import LaMP.utils.modeling.model as modeling

    def refuse(*args, **kwargs):
        raise AssertionError("a model was loaded before the user error was reported")

    for name in ("load_model", "load_model_and_tokenizer", "load_pretrained", "load_config",
                 "load_config_and_tokenizer", "load_tokenizer"):
        monkeypatch.setattr(modeling, name, refuse)


@pytest.fixture
def no_weight_loads(monkeypatch):
    """Loading weights fails the test; the config and tokenizer may load (train_llm.py builds
    its examples, and so checks its data, with the tokenizer alone; evaluate_llm.py checks
    per-user adapters against the model's config)."""
    import LaMP.utils.modeling.model as modeling

    def refuse(*args, **kwargs):
        raise AssertionError("the weights were loaded before the user error was reported")

    for name in ("load_model", "load_model_and_tokenizer", "load_pretrained"):
        monkeypatch.setattr(modeling, name, refuse)


@pytest.fixture
def no_network(monkeypatch):
    """Every connection attempt (and name look-up) is recorded and refused."""
    attempts = []

    def refuse(*args, **kwargs):
        attempts.append(args)
        raise OSError("network access attempted in a test")

    monkeypatch.setattr(socket.socket, "connect", refuse)
    monkeypatch.setattr(socket, "create_connection", refuse)
    monkeypatch.setattr(socket, "getaddrinfo", refuse)
    return attempts


# -- tiny models built offline ------------------------------------------------------------
# Random weights and tokenizers made here, so model tests need no hub and run in seconds.

TOKENIZER_CORPUS = [
    "Paraphrase the following tweet without any explanation before or after it:",
    "Generate a headline for the following article:",
    "Generate a title for the following abstract of a paper:",
    "Generate a subject for the following email:",
    "What is the score of the following review on a scale of 1 to 5? just answer with 1, 2, 3, 4, or 5",
    "Which tag does this movie relate to among the following tags? description: tags: [",
    "For an author who has written the paper with the title, which reference is related? [1] [2]",
    "sci-fi, based on a book, comedy, action, twist ending, dystopia, dark comedy, classic,",
    "psychology, fantasy, romance, thought-provoking, social commentary, violence, true story",
    '"is the title for" "is a title for" "is the score for" "the tag for the movie:"',
    "are written by a person. Following the given patterns , and",
    "the quick brown fox jumps over the lazy dog while the weather is nice today",
    "I am so tired today but my friends and I will go to the beach tomorrow morning",
    "new study finds that students who sleep more learn faster and remember better",
]
CHAT_TEMPLATE = ("{% for m in messages %}<s>{{ m['role'] }}\n{{ m['content'] }}</s>\n{% endfor %}"
                 "{% if add_generation_prompt %}<s>assistant\n{% endif %}")


def make_unigram_tokenizer(chat_template: bool = True):
    """A small sentencepiece-style Unigram tokenizer trained on the corpus above."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
    from transformers import PreTrainedTokenizerFast

    core = Tokenizer(models.Unigram())
    core.pre_tokenizer = pre_tokenizers.Metaspace()
    core.decoder = decoders.Metaspace()
    trainer = trainers.UnigramTrainer(vocab_size=400, unk_token="<unk>",
                                      special_tokens=["<pad>", "</s>", "<unk>", "<s>"])
    core.train_from_iterator(TOKENIZER_CORPUS * 20, trainer)
    tokenizer = PreTrainedTokenizerFast(tokenizer_object=core, pad_token="<pad>",
                                        eos_token="</s>", unk_token="<unk>", bos_token="<s>")
    if chat_template:
        tokenizer.chat_template = CHAT_TEMPLATE
    return tokenizer


def build_tiny_t5(folder: Path, seed: int = 0) -> Path:
    """A 2-layer random T5 with the byte-level ByT5 tokenizer (which needs no files)."""
    import torch
    from transformers import ByT5Tokenizer, T5Config, T5ForConditionalGeneration

    torch.manual_seed(seed)
    tokenizer = ByT5Tokenizer()
    config = T5Config(vocab_size=len(tokenizer), d_model=32, d_ff=64, num_layers=2,
                      num_decoder_layers=2, num_heads=2, d_kv=16,
                      decoder_start_token_id=tokenizer.pad_token_id,
                      pad_token_id=tokenizer.pad_token_id, eos_token_id=tokenizer.eos_token_id)
    T5ForConditionalGeneration(config).save_pretrained(folder)
    tokenizer.save_pretrained(folder)
    return folder


def build_tiny_llama(folder: Path, seed: int = 0) -> Path:
    """A 2-layer random Llama-style causal LM with a Unigram tokenizer and a chat template."""
    import torch
    from transformers import LlamaConfig, LlamaForCausalLM

    torch.manual_seed(seed)
    tokenizer = make_unigram_tokenizer()
    config = LlamaConfig(vocab_size=len(tokenizer), hidden_size=32, intermediate_size=64,
                         num_hidden_layers=2, num_attention_heads=2, num_key_value_heads=2,
                         max_position_embeddings=1024, pad_token_id=tokenizer.pad_token_id,
                         eos_token_id=tokenizer.eos_token_id, bos_token_id=tokenizer.bos_token_id)
    LlamaForCausalLM(config).save_pretrained(folder)
    tokenizer.save_pretrained(folder)
    return folder


def build_tiny_bert(folder: Path, texts, seed: int = 0) -> str:
    """A 2-layer BERT encoder with random weights and a WordPiece tokenizer over the words
    of ``texts`` (a dense ranker, a ROPG retriever or an RSPG selector to start from)."""
    import torch
    import transformers

    words = sorted({word for text in texts for word in text.split()})
    vocab = {token: index for index, token in
             enumerate(["[PAD]", "[UNK]", "[CLS]", "[SEP]", "[MASK]", *words])}
    tokenizer = transformers.BertTokenizer(vocab=vocab)
    tokenizer.save_pretrained(folder)
    torch.manual_seed(seed)
    config = transformers.BertConfig(vocab_size=len(vocab), hidden_size=32, num_hidden_layers=2,
                                     num_attention_heads=2, intermediate_size=64,
                                     max_position_embeddings=64)
    transformers.BertModel(config).save_pretrained(folder)
    return str(folder)


@pytest.fixture(scope="session")
def tiny_t5(tmp_path_factory) -> Path:
    return build_tiny_t5(tmp_path_factory.mktemp("tiny_t5"))


@pytest.fixture(scope="session")
def tiny_llama(tmp_path_factory) -> Path:
    return build_tiny_llama(tmp_path_factory.mktemp("tiny_llama"))


@pytest.fixture(scope="session")
def tiny_adapter(tiny_llama, tmp_path_factory) -> Path:
    """A LoRA adapter (r 4, alpha 8) of ``tiny_llama``, saved as peft saves one."""
    from LaMP.utils.modeling.model import load_pretrained
    from LaMP.utils.modeling.training import add_lora

    model, _ = load_pretrained(str(tiny_llama))
    folder = tmp_path_factory.mktemp("adapter")
    add_lora(model, seq2seq=False, r=4, alpha=8, dropout=0.0,
             target_modules=None).save_pretrained(folder)
    return folder


def edited_adapter(adapter: Path, tmp_path: Path, config) -> Path:
    """A copy of ``adapter`` whose adapter_config.json is ``config`` (a mapping: merged into
    the saved one)."""
    import shutil

    folder = tmp_path / "adapter"
    shutil.copytree(adapter, folder)
    saved = json.loads((folder / "adapter_config.json").read_text())
    text = json.dumps(config if not isinstance(config, dict) else {**saved, **config})
    (folder / "adapter_config.json").write_text(text)
    return folder


@pytest.fixture(params=["t5", "llama"])
def tiny_model(request, tiny_t5, tiny_llama) -> Path:
    """Each test using this runs once with a seq2seq and once with a causal model."""
    return {"t5": tiny_t5, "llama": tiny_llama}[request.param]


@pytest.fixture
def torch_single_thread():
    """One torch thread for the test. Tiny models run as many small ops, each ending at a
    barrier that waits for every thread; on a shared machine a descheduled thread turns
    seconds into minutes (tests/test_modeling.py: 13 s with one thread, 215 s with two
    while other jobs held the cores)."""
    import torch

    previous = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(previous)
