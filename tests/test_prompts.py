"""Retrieval-augmented prompts: the published LaMP formats, the token budget, truncation.

Every task is built with two generators' tokenizers: ByT5 (one token per byte) and a small
sentencepiece-style Unigram tokenizer (a few characters per token, unknown characters as
``<unk>``); a byte-level BPE tokenizer (GPT-2/Llama-3/SmolLM2 style, where one character can
span several tokens) joins them where characters outside ASCII matter. The published formats
are written out below once, by hand, so that they are checked against the registry rather than
read from it.
"""
from __future__ import annotations

import json
import math
import re
import string
from dataclasses import dataclass, field

import pytest

from conftest import (LAMP_REAL, TOKENIZER_CORPUS, make_unigram_tokenizer, requires_real_data,
                      write_json)
from LaMP.utils.errors import LampError
from LaMP.utils.modeling.examples import ProfileOptions, build_examples
from LaMP.utils.modeling.prompts import PromptBuilder, TokenCounter, make_prompt_fn
from LaMP.utils.tasks import MOVIE_TAGS, TASK_NAMES, get_task

INPUT_SHARE = 0.6  # with profile items the input keeps at most 60% of max_length
GENEROUS = 8192  # a budget no example here comes near

# -- the published formats (LaMP paper code), by hand -----------------------------------
# item pattern, the one field that may be shortened, the text between items and input.
PUBLISHED = {
    "LaMP-1": ('"{title}"', "title", None),
    "LaMP-2": ('the tag for the movie: "{description}" is "{tag}" ', "description", ". "),
    "LaMP-3": ('{score} is the score for "{text}" ', "text", ". "),
    "LaMP-4": ('"{title}" is the title for "{text}" ', "text", ". "),
    "LaMP-5": ('"{title}" is a title for "{abstract}" ', "abstract",
               ". Following the given patterns "),
    "LaMP-6": ('"{title}" is the title for "{text}" ', "text", ". "),
    "LaMP-7": ('"{text}" ', "text", " are written by a person. Following the given patterns "),
    "LaMP-2N": ('the category for the article: "{text}" is "{category}" ', "text", ". "),
}
JOINER = ", and "


def published_prompt(task_name: str, text: str, items) -> str:
    """The prompt as the LaMP paper's code writes it, nothing truncated."""
    pattern, _, suffix = PUBLISHED[task_name]
    joined = JOINER.join(pattern.format_map(item) for item in items)
    if suffix is None:  # LaMP-1: after the first "title" of the input, preceded by ", and "
        end = text.index("title") + len("title")
        return f"{text[:end]}, and {joined}{text[end:]}"
    return f"{joined}{suffix}{text}"


def parse_prompt(task_name: str, prompt: str, items) -> tuple[list[str], str]:
    """(the kept long field of each item, the input text) of a prompt that holds every one of
    ``items`` in order, in the published format; fails the test when it does not."""
    pattern, long_field, suffix = PUBLISHED[task_name]
    item_regexes = []
    for item in items:
        parts = []
        for literal, name, _, _ in string.Formatter().parse(pattern):
            parts.append(re.escape(literal))
            if name is not None:
                parts.append("(.*?)" if name == long_field else re.escape(str(item[name])))
        item_regexes.append("".join(parts))
    joined = re.escape(JOINER).join(item_regexes)
    if suffix is None:
        match = re.fullmatch(f"(.*?title), and {joined}(.*)", prompt, re.S)
        assert match, f"not the LaMP-1 format with {len(items)} items: {prompt!r}"
        groups = match.groups()
        return list(groups[1:-1]), groups[0] + groups[-1]
    match = re.fullmatch(f"{joined}{re.escape(suffix)}(.*)", prompt, re.S)
    assert match, f"not the {task_name} format with {len(items)} items: {prompt!r}"
    return list(match.groups()[:-1]), match.groups()[-1]


def assert_cut_from(kept: str, original: str) -> None:
    """``kept`` is ``original`` or a start of it (a cut may drop trailing spaces)."""
    assert kept == original or (kept and original.startswith(kept)), (kept, original)


# -- realistic examples ------------------------------------------------------------------

@dataclass
class Case:
    task_name: str
    input: str
    items: list = field(default_factory=list)

    @property
    def long_field(self) -> str:
        return PUBLISHED[self.task_name][1]


LAMP2_INSTRUCTION = ("Which tag does this movie relate to among the following tags? Just answer "
                     "with the tag name without further explanation. tags: ["
                     + ", ".join(MOVIE_TAGS) + "] description: ")

HAND_CASES = {
    "LaMP-1": Case(
        "LaMP-1",
        'For an author who has written the paper with the title "Learning to Rank for '
        'Personalized Search in Professional Networks", which reference is related? Just '
        'answer with [1] or [2] without explanation. [1]: "Collaborative Filtering for '
        'Implicit Feedback Datasets" [2]: "Synthesis of Gold Nanoparticles by Laser Ablation"',
        [{"id": "1010", "title": "Personalized Query Expansion from Social Tagging Data for "
                                 "Web Search in Professional Communities",
          "abstract": "We expand queries with tags that colleagues gave to documents."},
         {"id": "1011", "title": "Learning User Interests from Click Logs to Rank Results in "
                                 "Enterprise Search Engines at Scale",
          "abstract": "Click logs of a large company reveal what each employee looks for."},
         {"id": "1012", "title": "Expertise Retrieval in Online Professional Networks with "
                                 "Graph Neural Networks and Skill Endorsements",
          "abstract": "Endorsed skills and connections point to the experts on a topic."},
         {"id": "1013", "title": "A Study of Position Bias in Personalized Job Recommendation "
                                 "Rankings on Career Websites",
          "abstract": "Members click the first results whatever they hold."}]),
    "LaMP-2": Case(
        "LaMP-2",
        LAMP2_INSTRUCTION + "A retired detective is drawn back into one last case when a "
        "string of murders mirrors the plot of the novel he never finished writing.",
        [{"id": "2000", "tag": "dark comedy",
          "description": "Two hapless brothers try to hide a body during their mother's "
                         "birthday party, and every guest seems to know a little too much."},
         {"id": "2001", "tag": "sci-fi",
          "description": "A lonely engineer builds a robot companion that slowly learns to "
                         "feel, and the two cross a ruined continent to find the last "
                         "working power station."}]),
    "LaMP-3": Case(
        "LaMP-3",
        "What is the score of the following review on a scale of 1 to 5? just answer with 1, "
        "2, 3, 4, or 5 without further explanation. review: The motor burned out after two "
        "weeks of making smoothies every morning, and support never answered my emails.",
        [{"id": "3000", "score": "5",
          "text": "Great blender! It crushes ice in seconds, the jug is easy to clean and it "
                  "is much quieter than my old one. Would buy again."},
         {"id": "3001", "score": "2",
          "text": "It works, but the lid leaks whenever I make anything thicker than juice "
                  "and the buttons stopped lighting up after a month."}]),
    "LaMP-4": Case(
        "LaMP-4",
        "Generate a headline for the following article: City officials say the new bike "
        "lanes downtown cut commuting times by a fifth in their first year, and more "
        "residents now cycle to work than drive.",
        [{"id": "4000", "title": "Why Your City Needs Protected Bike Lanes",
          "text": "Cities that built protected bike lanes saw fewer injuries, more customers "
                  "for local shops and quieter streets, a new report finds."},
         {"id": "4001", "title": "The Hidden Cost of Free Parking",
          "text": "Free parking is never free: drivers and non-drivers alike pay for it "
                  "through higher rents, prices and taxes, economists argue."}]),
    "LaMP-5": Case(
        "LaMP-5",
        "Generate a title for the following abstract of a paper: We study how large language "
        "models can be personalized by retrieving items from a user's profile and adding "
        "them to the prompt, and compare sparse and dense retrievers on seven tasks.",
        [{"id": "5000", "title": "Dense Passage Retrieval for Open-Domain Question Answering",
          "abstract": "Open-domain question answering relies on efficient passage retrieval to "
                      "select candidate contexts. We show that retrieval can be practically "
                      "implemented using dense representations alone."},
         {"id": "5001", "title": "Sparse Lexical Matching Still Matters",
          "abstract": "We revisit BM25 as a baseline for neural ranking and find that careful "
                      "tuning closes most of the gap to learned sparse models."}]),
    "LaMP-6": Case(
        "LaMP-6",
        "Generate a subject for the following email: Hi all, the quarterly planning meeting "
        "moves to Thursday at 3pm in room 204. Please bring your updated budget sheets and "
        "a list of open hiring requests.",
        [{"id": "6000", "title": "Budget review moved to Friday",
          "text": "Hello team, because of the holiday the budget review is moved to Friday "
                  "morning. Send me your numbers by Wednesday evening, thanks."},
         {"id": "6001", "title": "New hires starting Monday",
          "text": "Please welcome Ana and Raj, who join the analytics group on Monday. Their "
                  "laptops are ready; someone please show them around."}]),
    "LaMP-7": Case(
        "LaMP-7",
        "Paraphrase the following tweet without any explanation before or after it: I am "
        "so tired today but my friends and I are going to the beach tomorrow morning.",
        [{"id": "7000", "text": "ugh mondays.. coffee machine broke AGAIN and the bus was 20 "
                                "min late lol #whyme"},
         {"id": "7001", "text": "finally finished my exams!! beach with the girls tomorrow, "
                                "can't wait to sleep in the sun "}]),
    "LaMP-2N": Case(
        "LaMP-2N",
        "Which category does this article relate to among the following categories? Just "
        "answer with the category name without further explanation. categories: [women, "
        "religion, politics, style & beauty, entertainment, culture & arts, sports, science "
        "& technology, travel, business, crime, education, healthy living, parents, food & "
        "drink] article: A small bakery on the corner sells out of its rye loaves before "
        "eight every morning, and the owners now plan a second oven.",
        [{"id": "1000", "title": "Sourdough Is Having a Moment", "category": "food & drink",
          "text": "Home bakers kept their starters alive long after the lockdowns ended, and "
                  "the neighbourhood bakeries that taught them are busier than ever."},
         {"id": "1001", "title": "Five Cheap Weeknight Dinners", "category": "food & drink",
          "text": "Beans, rice and a good spice drawer go a long way: these five dinners cost "
                  "little and take less than half an hour each."}]),
}


def real_case(task_name: str, k: int = 3) -> Case:
    """The first real dev question of LaMP-4 or LaMP-7 with its first ``k`` profile items."""
    number = task_name[-1]
    name = {"4": "dev_questions.subset_first1.json", "7": "dev_questions.json"}[number]
    with open(LAMP_REAL / f"LaMP_{number}" / "dev" / name, encoding="utf-8") as handle:
        question = json.load(handle)[0]
    return Case(task_name, question["input"], question["profile"][:k])


CASE_PARAMS = [pytest.param(("hand", name), id=f"{name}-hand") for name in TASK_NAMES] + [
    pytest.param(("real", name), id=f"{name}-real", marks=[requires_real_data,
                                                           pytest.mark.real_data])
    for name in ("LaMP-4", "LaMP-7")]


@pytest.fixture(params=CASE_PARAMS)
def case(request) -> Case:
    source, name = request.param
    return HAND_CASES[name] if source == "hand" else real_case(name)


# -- tokenizers ---------------------------------------------------------------------------

def make_byte_bpe_tokenizer():
    """A byte-level BPE tokenizer (GPT-2 / Llama-3 / SmolLM2 style) trained offline."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
    from transformers import PreTrainedTokenizerFast

    core = Tokenizer(models.BPE())
    core.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    core.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(vocab_size=600, special_tokens=["<|endoftext|>"],
                                  initial_alphabet=pre_tokenizers.ByteLevel.alphabet())
    core.train_from_iterator(TOKENIZER_CORPUS * 20, trainer)
    return PreTrainedTokenizerFast(tokenizer_object=core, eos_token="<|endoftext|>",
                                   pad_token="<|endoftext|>")


@pytest.fixture(scope="module")
def tokenizers() -> dict:
    from transformers import ByT5Tokenizer

    return {"bytes": ByT5Tokenizer(), "unigram": make_unigram_tokenizer(),
            "byte_bpe": make_byte_bpe_tokenizer()}


@pytest.fixture(params=["bytes", "unigram"])
def tokenizer(request, tokenizers):
    return tokenizers[request.param]


def build(case: Case, tokenizer, max_length: int, items=None, text=None) -> str:
    prompt_fn = make_prompt_fn(get_task(case.task_name), tokenizer, max_length)
    return prompt_fn(case.input if text is None else text, case.items if items is None else items)


def tight_budget(case: Case, counter: TokenCounter, items=None, keep_input=True) -> int:
    """A budget that cannot hold every item's long field (and, with ``keep_input``, leaves
    the input whole)."""
    items = case.items if items is None else items
    n_input = counter.count(case.input)
    n_full = counter.count(published_prompt(case.task_name, case.input, items))
    budget = (n_input + n_full) // 2
    if keep_input:
        budget = max(math.ceil(n_input / INPUT_SHARE) + 1, budget)
    assert budget < n_full, "the example is too short to need truncation"
    return budget


# -- the formats --------------------------------------------------------------------------

LITERAL_FORMATS = {
    "LaMP-1": ('the paper with the title "Q", which reference is related? [1]: "A" [2]: "B"',
               [{"id": "1", "title": "T1", "abstract": "x"}, {"id": "2", "title": "T2",
                                                               "abstract": "y"}],
               'the paper with the title, and "T1", and "T2" "Q", which reference is related?'
               ' [1]: "A" [2]: "B"'),
    "LaMP-2": ("description: a heist", [{"id": "1", "description": "D1", "tag": "comedy"},
                                        {"id": "2", "description": "D2", "tag": "true story"}],
               'the tag for the movie: "D1" is "comedy" , and the tag for the movie: "D2" is '
               '"true story" . description: a heist'),
    "LaMP-3": ("review: meh", [{"id": "1", "text": "Great", "score": "5"},
                               {"id": "2", "text": "Fine", "score": "3"}],
               '5 is the score for "Great" , and 3 is the score for "Fine" . review: meh'),
    "LaMP-4": ("article: rain", [{"id": "1", "text": "A1", "title": "H1"},
                                 {"id": "2", "text": "A2", "title": "H2"}],
               '"H1" is the title for "A1" , and "H2" is the title for "A2" . article: rain'),
    "LaMP-5": ("paper: abc", [{"id": "1", "title": "T1", "abstract": "A1"},
                              {"id": "2", "title": "T2", "abstract": "A2"}],
               '"T1" is a title for "A1" , and "T2" is a title for "A2" . Following the given '
               'patterns paper: abc'),
    "LaMP-6": ("email: hi", [{"id": "1", "text": "E1", "title": "S1"},
                             {"id": "2", "text": "E2", "title": "S2"}],
               '"S1" is the title for "E1" , and "S2" is the title for "E2" . email: hi'),
    "LaMP-7": ("tweet: sunny", [{"id": "1", "text": "t1"}, {"id": "2", "text": "t2"}],
               '"t1" , and "t2"  are written by a person. Following the given patterns '
               'tweet: sunny'),
    "LaMP-2N": ("article: rain", [{"id": "1", "text": "A1", "title": "H1", "category": "women"},
                                  {"id": "2", "text": "A2", "title": "H2", "category": "crime"}],
                'the category for the article: "A1" is "women" , and the category for the '
                'article: "A2" is "crime" . article: rain'),
}


@pytest.mark.parametrize("task_name", TASK_NAMES)
def test_each_task_writes_the_published_format(task_name, tokenizers):
    text, items, expected = LITERAL_FORMATS[task_name]
    for tokenizer in (tokenizers["bytes"], tokenizers["unigram"]):
        prompt_fn = make_prompt_fn(get_task(task_name), tokenizer, GENEROUS)
        assert prompt_fn(text, items) == expected
        assert published_prompt(task_name, text, items) == expected  # the table above agrees


def test_lamp1_inserts_after_the_first_title_only():
    text = 'the title "Entitled titles", which reference is related? [1]: "a title" [2]: "b"'
    items = [{"id": "1", "title": "Mine", "abstract": "x"}]
    prompt = make_prompt_fn(get_task("LaMP-1"), make_unigram_tokenizer(), GENEROUS)(text, items)
    assert prompt == ('the title, and "Mine" "Entitled titles", which reference is related? '
                      '[1]: "a title" [2]: "b"')


def test_generous_budget_truncates_nothing(case, tokenizer):
    prompt = build(case, tokenizer, GENEROUS)
    assert prompt == published_prompt(case.task_name, case.input, case.items)
    assert TokenCounter(tokenizer).count(prompt) <= GENEROUS


def test_tight_budget_shortens_only_the_long_field(case, tokenizer):
    counter = TokenCounter(tokenizer)
    budget = tight_budget(case, counter)
    prompt = build(case, tokenizer, budget)
    assert counter.count(prompt) <= budget
    # Every item is still there in the published format, in rank order, with its short
    # fields (title, tag, score) whole: parse_prompt matches them literally.
    kept, text = parse_prompt(case.task_name, prompt, case.items)
    assert text == case.input
    for kept_field, item in zip(kept, case.items):
        assert_cut_from(kept_field, item[case.long_field])
    assert any(kept_field != item[case.long_field] for kept_field, item in zip(kept, case.items))


def test_input_keeps_at_most_its_share_when_items_are_present(case, tokenizer):
    counter = TokenCounter(tokenizer)
    long_input = case.input + " " + " ".join([case.items[0][case.long_field]] * 3)
    budget = counter.count(long_input)  # the input alone would fill the budget
    prompt = build(case, tokenizer, budget, text=long_input)
    assert counter.count(prompt) <= budget
    kept, text = parse_prompt(case.task_name, prompt, case.items)
    assert_cut_from(text, long_input)
    assert 0.5 * budget < counter.count(text) <= int(INPUT_SHARE * budget)
    # Without items the same input keeps the whole budget.
    assert build(case, tokenizer, budget, items=[], text=long_input) == long_input


def test_unused_share_rolls_over_to_the_next_item(case, tokenizer):
    counter = TokenCounter(tokenizer)
    first, second = case.items[0], case.items[1]
    short_first = {**first, case.long_field: "Nice one"}
    budget = tight_budget(case, counter, [first, second], keep_input=False)

    def kept_of_second(items):
        kept, _ = parse_prompt(case.task_name, build(case, tokenizer, budget, items=items), items)
        assert_cut_from(kept[1], second[case.long_field])
        return counter.count(kept[1])

    # A short first item leaves the second more than an equal share.
    assert kept_of_second([short_first, second]) > kept_of_second([first, second])


def test_no_items_gives_the_bare_input(case, tokenizer):
    for budget in (GENEROUS, tight_budget(case, TokenCounter(tokenizer))):
        assert build(case, tokenizer, budget, items=[]) == case.input


def test_truncation_counts_the_generators_tokens(case, tokenizers):
    budget = tight_budget(case, TokenCounter(tokenizers["bytes"]))
    prompts = {name: build(case, tokenizers[name], budget) for name in ("bytes", "unigram")}
    assert prompts["bytes"] != prompts["unigram"]
    for name, prompt in prompts.items():
        assert TokenCounter(tokenizers[name]).count(prompt) <= budget
        parse_prompt(case.task_name, prompt, case.items)
    # A Unigram token carries several bytes: its prompt holds more text than bytes allow.
    assert len(prompts["unigram"]) > len(prompts["bytes"])
    assert TokenCounter(tokenizers["bytes"]).count(prompts["unigram"]) > budget


UNICODE_TWEET = ("Paraphrase the following tweet without any explanation before or after it: "
                 "Café crème with Zoë 😀😀 then 東京タワー at night — naïve me forgot my coat 🧥 "
                 "brrr… #cold @friend")


@pytest.mark.parametrize("name", ["bytes", "unigram", "byte_bpe"])
def test_an_input_longer_than_the_budget_is_cut_to_fit(tokenizers, name):
    tokenizer = tokenizers[name]
    counter = TokenCounter(tokenizer)
    task = get_task("LaMP-7")
    items = [{"id": "1", "text": "Zoë’s café 😀 is the best ☕"}, {"id": "2", "text": "brrr ❄❄"}]
    n_input = counter.count(UNICODE_TWEET)
    for budget in range(8, n_input + 1, 3):
        prompt_fn = make_prompt_fn(task, tokenizer, budget)
        bare = prompt_fn(UNICODE_TWEET, [])
        assert 0 < counter.count(bare) <= budget
        assert_cut_from(bare, UNICODE_TWEET)
        with_items = prompt_fn(UNICODE_TWEET, items)
        assert counter.count(with_items) <= budget
        assert "\ufffd" not in with_items  # no half characters turned into replacement marks


@pytest.mark.parametrize("name", ["bytes", "unigram", "byte_bpe"])
def test_truncate_keeps_a_start_of_the_text_within_the_count(tokenizers, name):
    counter = TokenCounter(tokenizers[name])
    for max_tokens in range(1, counter.count(UNICODE_TWEET) + 2):
        kept = counter.truncate(UNICODE_TWEET, max_tokens)
        assert counter.count(kept) <= max_tokens
        # One token may be too few for any text ("P" alone is "▁", "P" in Unigram).
        assert UNICODE_TWEET.startswith(kept) and (kept or max_tokens < 3)
    assert counter.truncate(UNICODE_TWEET, 0) == ""


def test_reserved_tokens_come_off_the_budget(tokenizers):
    counter = TokenCounter(tokenizers["unigram"])
    case = HAND_CASES["LaMP-3"]
    builder = PromptBuilder(get_task("LaMP-3"), counter, max_length=120, reserved=20)
    prompt = builder.build(case.input, case.items)
    assert counter.count(prompt) <= 100
    assert counter.count(PromptBuilder(get_task("LaMP-3"), counter, 120).build(
        case.input, case.items)) > 100


# -- from a questions file to prompts -----------------------------------------------------

def questions_file(tmp_path, case: Case, n: int = 3, with_output: bool = True):
    # Golds the task's metric accepts (ratings for LaMP-3): examples are checked as built.
    labels = get_task(case.task_name).labels
    questions = [{"id": f"q{i}", "input": case.input, "profile": case.items,
                  **({"output": labels[i % len(labels)] if labels else f"gold {i}"}
                     if with_output else {})} for i in range(n)]
    return write_json(tmp_path / "questions.json", questions)


def test_ranked_profile_gives_the_first_k_items_in_file_order(tmp_path, tokenizers):
    case = HAND_CASES["LaMP-3"]
    path = questions_file(tmp_path, case)
    prompt_fn = make_prompt_fn(get_task("LaMP-3"), tokenizers["unigram"], GENEROUS)
    options = ProfileOptions(use_profile=True, num_retrieved=1, is_ranked=True)
    examples = build_examples(str(path), get_task("LaMP-3"), prompt_fn, options)
    assert [e.id for e in examples] == ["q0", "q1", "q2"]
    assert [e.target for e in examples] == ["1", "2", "3"]
    assert examples[0].prompt == published_prompt("LaMP-3", case.input, case.items[:1])


@pytest.mark.parametrize("options", [
    ProfileOptions(use_profile=False, num_retrieved=2, is_ranked=True),
    ProfileOptions(use_profile=True, num_retrieved=0, is_ranked=True),
    ProfileOptions(use_profile=False, num_retrieved=2, is_ranked=False),  # no ranker is needed
], ids=["no-profile", "k0", "no-profile-unranked"])
def test_without_profile_items_prompts_are_the_bare_inputs(tmp_path, tokenizers, options):
    case = HAND_CASES["LaMP-5"]
    path = questions_file(tmp_path, case)
    prompt_fn = make_prompt_fn(get_task("LaMP-5"), tokenizers["unigram"], GENEROUS)
    examples = build_examples(str(path), get_task("LaMP-5"), prompt_fn, options, limit=2)
    assert [e.prompt for e in examples] == [case.input, case.input]


def test_some_outputs_missing_is_a_user_error(tmp_path, tokenizers):
    case = HAND_CASES["LaMP-6"]
    path = questions_file(tmp_path, case)
    questions = json.loads(path.read_text())
    del questions[1]["output"]
    write_json(path, questions)
    prompt_fn = make_prompt_fn(get_task("LaMP-6"), tokenizers["unigram"], GENEROUS)
    with pytest.raises(LampError, match="q1"):
        build_examples(str(path), get_task("LaMP-6"), prompt_fn, ProfileOptions())


def test_when_items_crowd_out_the_lowest_ranked_is_dropped_not_the_best(tokenizers):
    # LaMP-4 template words include the whole title: two long titles and a short one. With
    # room for about two items the best two stay, in rank order, and the third is dropped.
    task = get_task("LaMP-4")
    counter = TokenCounter(tokenizers["bytes"])
    text = "Generate a headline for the following article: rain returns to the valley"
    items = [{"id": "1", "title": "A" * 60, "text": "first body " * 20},
             {"id": "2", "title": "B" * 60, "text": "second body " * 20},
             {"id": "3", "title": "C", "text": "third body " * 20}]
    budget = counter.count(text) + 2 * 100
    prompt = PromptBuilder(task, counter, budget).build(text, items)
    assert "A" * 60 in prompt and "B" * 60 in prompt and prompt.index("A") < prompt.index("B")
    assert '"C" is the title' not in prompt
    assert counter.count(prompt) <= budget


def test_when_no_item_fits_the_input_gets_the_whole_budget(tokenizers):
    task = get_task("LaMP-4")
    counter = TokenCounter(tokenizers["bytes"])
    text = "Generate a headline for the following article: " + "word " * 40
    items = [{"id": "1", "title": "T" * 200, "text": "body"}]
    budget = counter.count(text) + 5  # the title alone overruns any share
    assert PromptBuilder(task, counter, budget).build(text, items) == text
