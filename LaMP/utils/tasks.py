"""The one description of the LaMP tasks: the seven of the benchmark, and LaMP-2N.

Every stage looks a task up here instead of branching on its name: labels, profile fields,
how to build the retrieval query and corpus, the prompt template, the metrics and the metric
that picks a best checkpoint. Facts follow the LaMP paper and its published data format.
Adding a task is one ``Task`` entry in ``_TASKS`` (and, for the committed sample, one
builder in ``data/make_sample.py``): names, help strings and checks all read this table.
"""
from __future__ import annotations

import random
from dataclasses import dataclass
from operator import itemgetter
from typing import Callable, Iterable, Mapping, Sequence

from LaMP.utils.errors import LampError

CLASSIFICATION = "classification"
RATING = "rating"
GENERATION = "generation"


@dataclass(frozen=True)
class PromptTemplate:
    """How retrieved profile items are written into the prompt.

    ``item`` is a ``str.format`` pattern over profile fields. Only ``truncate_field`` may be
    shortened to fit the budget. With ``insert_after`` set, the joined items are inserted
    after the first occurrence of that word in the input (LaMP-1); otherwise they are placed
    before the input, followed by ``suffix``.
    """

    item: str
    truncate_field: str
    joiner: str = ", and "
    suffix: str = ". "
    insert_after: str | None = None
    # The official prompt code's fixed constants, used by --prompt_budget official
    # (docs/deviations.md): the tokens it keeps back from the items' room, the words it
    # counts for the text that follows the items, and what it counts for an item besides
    # its long field: a number, or a pattern over the item's fields (None: ``item`` with the
    # long field a single space). Its counts include the tokenizer's special tokens.
    official_reserve: int = 1
    official_fixed: str | None = None
    official_overhead: str | int | None = None


@dataclass(frozen=True)
class UserTemplate:
    """How one profile item becomes a per-user training example (per-user PEFT: the LaMP
    authors' and OPPU's recipes train each user's adapter on their own profile).

    ``input`` is a ``str.format`` pattern over the item's fields, ``target`` the field the
    model learns to write and ``query`` the field retrieval searches the user's other items
    with (per-user PEFT with retrieval in training). ``split`` derives further fields from
    an item with a seeded ``random.Random`` (LaMP-7 shows a tweet's start and learns the
    rest); it returns ``None`` for an item it cannot use, as ``example`` does for an item
    whose target is empty. With ``field_words`` every field
    is first cut to its first that many whitespace-separated words, joined by single spaces
    (OPPU's code does this to every field of an item).
    """

    input: str
    target: str
    query: str
    split: Callable[[Mapping[str, str], random.Random], Mapping[str, str] | None] | None = None
    field_words: int | None = None

    def example(self, item: Mapping, rng: random.Random | None = None
                ) -> tuple[str, str, str] | None:
        """``(input, target, query)`` of one profile item, or ``None`` when ``split``
        cannot use it; ``rng`` is needed only by a template with ``split``."""
        fields = {key: str(value) for key, value in item.items()}
        if self.field_words is not None:
            fields = {key: " ".join(value.split()[:self.field_words])
                      for key, value in fields.items()}
        if self.split is not None:
            derived = self.split(fields, rng)
            if derived is None:
                return None
            fields.update(derived)
        if not fields[self.target].strip():
            return None  # nothing to learn but the end of the answer
        return self.input.format_map(fields), fields[self.target], fields[self.query]


@dataclass(frozen=True)
class Task:
    name: str  # "LaMP-3": the spelling used by the ranking and training scripts
    file_name: str  # "LaMP_3": the spelling inside LaMP output files and zips
    number: int  # the N of LaMP-N: published ids start with N - 1 (LaMP-7 dev: 610 …)
    title: str
    kind: str  # CLASSIFICATION, RATING or GENERATION
    labels: tuple[str, ...] | None  # the valid outputs of a classification/rating task
    metrics: tuple[str, ...]  # result keys, as the official evaluator names them
    selection_metric: str  # the metric that picks a best checkpoint
    profile_fields: tuple[str, ...]  # fields of a profile item besides id and date
    query_marker: str | None  # the input's query is the text after this marker
    corpus_fields: tuple[str, ...]  # profile fields joined (by a space) into the corpus text
    prompt: PromptTemplate
    query_fn: Callable[[str], str | None] | None = None  # overrides query_marker when set
    # The fixed opening of every input in the published data; an input without it is a
    # malformed question (LaMP-2's user-split dev question 110 is one).
    input_prefix: str | None = None
    # How a profile item becomes a per-user training example (train_user_peft.py); None: the
    # task has no per-user recipe.
    user_template: UserTemplate | None = None
    # False for a task outside the current seven-task benchmark (LaMP-2N): it is scored
    # when present but never required (eval_all.py --require_all) nor run by default.
    benchmark: bool = True
    # More spellings that name the task (the download folder of LaMP-2N is LaMP_2_old).
    aliases: tuple[str, ...] = ()
    # The "task" its published files write when that is another task's file name (the
    # original LaMP-2's files say "LaMP_2"): such a file is this task's when its outputs are
    # this task's labels and none is a label of the task the name belongs to.
    published_as: str | None = None
    # Its folder in download_data.py's layout (raw_data/{split}/<folder>/) when that is not
    # file_name: the original LaMP-2 stays in LaMP_2_old/, as it always has been downloaded.
    download_folder: str | None = None

    def __str__(self) -> str:
        return self.name

    @property
    def folder(self) -> str:
        """The task's folder under raw_data/{split}/ (and in the bundled sample)."""
        return self.download_folder or self.file_name

    @property
    def id_digit(self) -> str:
        """The first character of the task's published ids."""
        return str(self.number - 1)

    @property
    def spellings(self) -> tuple[str, ...]:
        """Every name that looks this task up, as written (lookups ignore case)."""
        return (self.name, self.file_name, *self.aliases)

    @property
    def greater_is_better(self) -> bool:
        """The direction of ``selection_metric`` (from ``LOWER_IS_BETTER``)."""
        return self.selection_metric not in LOWER_IS_BETTER

    def query(self, text: str, question_id: str = "?") -> str:
        """The retrieval query for one input; a missing marker is the user's data error."""
        if self.query_fn is not None:
            query = self.query_fn(text)
        else:
            position = text.find(self.query_marker)
            query = None if position < 0 else text[position + len(self.query_marker):].strip()
        if query is None:
            raise LampError(
                f"{self.name} question {question_id}: input lacks "
                f"{self.query_description()}; cannot build the retrieval query"
            )
        return query

    def corpus_text(self, item: Mapping[str, str], use_date: bool = False) -> str:
        """The text of one profile item as the retrievers see it."""
        return self.corpus([item], use_date)[0]

    def corpus(self, profile: Sequence[Mapping[str, str]], use_date: bool = False) -> list[str]:
        """The corpus texts of a profile: ``corpus_fields`` joined by a space, in profile order.

        With ``use_date`` each text ends with `` date: <date>``, as the published ranker
        writes it; an item without a date is then an error naming the item.
        """
        # itemgetter over the whole profile: ranking builds this for every item of every
        # question, and a per-item Python loop here costs as much as BM25 itself.
        getter = itemgetter(*self.corpus_fields)
        try:
            values = list(map(getter, profile))
        except KeyError as error:
            missing = next(item for item in profile
                           if any(field not in item for field in self.corpus_fields))
            raise LampError(f"{self.name} profile item {missing.get('id', '?')} lacks the field "
                            f"{error.args[0]!r} needed for retrieval") from None
        if len(self.corpus_fields) == 1:
            texts = list(map(str, values))  # str() of a str is that same str, at C speed
        else:
            texts = [" ".join(map(str, parts)) for parts in values]
        if use_date:
            texts = [f"{text} date: {_item_date(self, item)}" for text, item in zip(texts, profile)]
        return texts

    def query_description(self) -> str:
        if self.query_fn is not None:
            return "the quoted candidate titles"
        return f"the marker {self.query_marker!r}"


def _item_date(task: Task, item: Mapping[str, str]) -> str:
    date = item.get("date")
    if date is None or date == "":
        raise LampError(f"{task.name} profile item {item.get('id', '?')} has no date, "
                        "which --use_date needs")
    return str(date)


def quoted_strings(text: str) -> list[str]:
    """The strings between successive pairs of double quotes, in order (an unclosed one is dropped)."""
    parts = text.split('"')
    return parts[1:len(parts) - 1:2]


def _citation_query(text: str) -> str | None:
    # LaMP-1 inputs quote the author's paper title first, then the two candidate references;
    # the query is the two candidates.
    quoted = quoted_strings(text)
    if len(quoted) < 3:
        return None
    return f"{quoted[1]} {quoted[2]}"


# LaMP-7's per-user examples show the first 10-25% of a tweet's words (drawn per item) and
# learn the rest, the LaMP authors' per-user recipe.
TWEET_START_SHARE = (0.10, 0.25)


def _tweet_start(fields: Mapping[str, str], rng: random.Random) -> dict[str, str] | None:
    """The shown start and the rest of a tweet; ``None`` for a tweet of one word (nothing
    would be left to complete)."""
    words = fields["text"].split()
    if len(words) < 2:
        return None
    shown = round(rng.uniform(*TWEET_START_SHARE) * len(words))
    shown = min(max(shown, 1), len(words) - 1)  # at least one word shown, one to write
    return {"start": " ".join(words[:shown]), "rest": " ".join(words[shown:])}


MOVIE_TAGS = (
    "sci-fi", "based on a book", "comedy", "action", "twist ending", "dystopia",
    "dark comedy", "classic", "psychology", "fantasy", "romance", "thought-provoking",
    "social commentary", "violence", "true story",
)

# The instructions of the published LaMP-2 and LaMP-3 inputs, without their description or
# review, which the per-user templates append (as the tasks' own inputs end).
MOVIE_INSTRUCTION = ("Which tag does this movie relate to among the following tags? Just answer "
                      f"with the tag name without further explanation. tags: [{', '.join(MOVIE_TAGS)}]")
NEWS_CATEGORIES = (
    "food & drink", "sports", "education", "parents", "religion", "travel", "business",
    "crime", "science & technology", "culture & arts", "entertainment", "politics", "women",
    "style & beauty", "healthy living",
)
# The instruction of the published news-categorization inputs, which list the categories
# in this order (not the order above).
NEWS_INSTRUCTION = (
    "Which category does this article relate to among the following categories? Just answer "
    "with the category name without further explanation. categories: [women, religion, "
    "politics, style & beauty, entertainment, culture & arts, sports, science & technology, "
    "travel, business, crime, education, healthy living, parents, food & drink]")
RATING_INSTRUCTION = ("What is the score of the following review on a scale of 1 to 5? just "
                       "answer with 1, 2, 3, 4, or 5 without further explanation.")

_CLASSIFICATION_METRICS = ("accuracy", "f1")
_RATING_METRICS = ("MAE", "RMSE")
# The metrics that are errors rather than scores: the one statement of every metric's
# direction (checkpoint selection, tables, comparisons and plots all read it).
LOWER_IS_BETTER: tuple[str, ...] = _RATING_METRICS
_ROUGE_METRICS = ("rouge-1", "rouge-L")

_TASKS = (
    Task(
        name="LaMP-1", file_name="LaMP_1", number=1, title="Personalized Citation Identification",
        kind=CLASSIFICATION, labels=("[1]", "[2]"), metrics=_CLASSIFICATION_METRICS,
        selection_metric="accuracy",
        profile_fields=("title", "abstract"), query_marker=None, query_fn=_citation_query,
        corpus_fields=("title", "abstract"),
        prompt=PromptTemplate(item='"{title}"', truncate_field="title", insert_after="title",
                              official_reserve=0, official_overhead=2),
        input_prefix="For an author who has written the paper with the title",
        user_template=UserTemplate("Write an abstract for this title: {title}", target="abstract",
                                   query="title"),
    ),
    Task(
        name="LaMP-2", file_name="LaMP_2", number=2, title="Personalized Movie Tagging",
        kind=CLASSIFICATION, labels=MOVIE_TAGS, metrics=_CLASSIFICATION_METRICS,
        selection_metric="accuracy",
        profile_fields=("description", "tag"), query_marker="description:",
        corpus_fields=("description",),
        prompt=PromptTemplate(item='the tag for the movie: "{description}" is "{tag}" ',
                              truncate_field="description"),
        input_prefix="Which tag does this movie relate to among the following tags?",
        user_template=UserTemplate(MOVIE_INSTRUCTION + " description: {description}",
                                   target="tag", query="description"),
    ),
    Task(
        name="LaMP-3", file_name="LaMP_3", number=3, title="Personalized Product Rating",
        kind=RATING, labels=("1", "2", "3", "4", "5"), metrics=_RATING_METRICS,
        selection_metric="MAE",
        profile_fields=("text", "score"), query_marker="review:", corpus_fields=("text",),
        prompt=PromptTemplate(item='{score} is the score for "{text}" ', truncate_field="text"),
        input_prefix="What is the score of the following review on a scale of 1 to 5?",
        user_template=UserTemplate(RATING_INSTRUCTION + " review: {text}", target="score",
                                   query="text"),
    ),
    Task(
        name="LaMP-4", file_name="LaMP_4", number=4, title="Personalized News Headline Generation",
        kind=GENERATION, labels=None, metrics=_ROUGE_METRICS,
        selection_metric="rouge-1",
        profile_fields=("text", "title"), query_marker="article:",
        corpus_fields=("title", "text"),
        prompt=PromptTemplate(item='"{title}" is the title for "{text}" ', truncate_field="text"),
        input_prefix="Generate a headline for the following article:",
        user_template=UserTemplate("Generate a headline for the following article: {text}",
                                   target="title", query="text"),
    ),
    Task(
        name="LaMP-5", file_name="LaMP_5", number=5, title="Personalized Scholarly Title Generation",
        kind=GENERATION, labels=None, metrics=_ROUGE_METRICS,
        selection_metric="rouge-1",
        profile_fields=("title", "abstract"), query_marker="paper:",
        corpus_fields=("title", "abstract"),
        prompt=PromptTemplate(item='"{title}" is a title for "{abstract}" ',
                              truncate_field="abstract",
                              suffix=". Following the given patterns ",
                              # Counted without the "for" the item has (as published).
                              official_fixed="Following the given patterns",
                              official_overhead='"{title}" is a title " " '),
        input_prefix="Generate a title for the following abstract of a paper:",
        user_template=UserTemplate(
            "Generate a title for the following abstract of a paper: {abstract}",
            target="title", query="abstract"),
    ),
    Task(
        name="LaMP-6", file_name="LaMP_6", number=6, title="Personalized Email Subject Generation",
        kind=GENERATION, labels=None, metrics=_ROUGE_METRICS,
        selection_metric="rouge-1",
        profile_fields=("text", "title"), query_marker=":", corpus_fields=("text",),
        prompt=PromptTemplate(item='"{title}" is the title for "{text}" ', truncate_field="text"),
        input_prefix="Generate a subject for the following email:",
        user_template=UserTemplate("Generate a subject for the following email: {text}",
                                   target="title", query="text"),
    ),
    Task(
        name="LaMP-7", file_name="LaMP_7", number=7, title="Personalized Tweet Paraphrasing",
        kind=GENERATION, labels=None, metrics=_ROUGE_METRICS,
        selection_metric="rouge-1",
        profile_fields=("text",), query_marker=":", corpus_fields=("text",),
        prompt=PromptTemplate(item='"{text}" ', truncate_field="text",
                              suffix=" are written by a person. Following the given patterns ",
                              # Counted as "by user", not "by a person" (as published).
                              official_fixed="are written by user. Following the given patterns",
                              official_overhead='"" '),
        input_prefix="Paraphrase the following tweet without any explanation before or after it:",
        user_template=UserTemplate("Complete the following tweet: {start}", target="rest",
                                   query="start", split=_tweet_start),
    ),
    # The original LaMP-2 (news categorization, replaced by movie tagging in the benchmark;
    # OPPU reports it as LaMP-2N). download_data.py fetches it on request as LaMP_2_old.
    Task(
        name="LaMP-2N", file_name="LaMP_2N", number=2,
        title="Personalized News Categorization",
        kind=CLASSIFICATION, labels=NEWS_CATEGORIES, metrics=_CLASSIFICATION_METRICS,
        selection_metric="accuracy",
        profile_fields=("text", "title", "category"), query_marker="article:",
        corpus_fields=("title", "text"),
        prompt=PromptTemplate(item='the category for the article: "{text}" is "{category}" ',
                              truncate_field="text"),
        input_prefix="Which category does this article relate to among the following "
                     "categories?",
        user_template=UserTemplate(NEWS_INSTRUCTION + " article: {text}", target="category",
                                   query="text"),
        benchmark=False, aliases=("LaMP_2_old",), published_as="LaMP_2",
        download_folder="LaMP_2_old",
    ),
)

TASKS: dict[str, Task] = {task.name: task for task in _TASKS}
TASK_NAMES: tuple[str, ...] = tuple(TASKS)
# The seven tasks of the current benchmark: what runs and is required by default.
BENCHMARK_TASK_NAMES: tuple[str, ...] = tuple(task.name for task in _TASKS if task.benchmark)
# For flags' help= and error messages: the registry's names, whatever it holds.
TASK_HELP = (f"{', '.join(TASK_NAMES)} (or the file-name spelling, "
             f"{', '.join(task.file_name for task in _TASKS[:2])} …; any case"
             + "".join(f"; {task.name} also as {', '.join(task.aliases)}"
                       for task in _TASKS if task.aliases) + ")")


def get_task(name: str) -> Task:
    """Look a task up by any of its spellings (``LaMP-N``, ``LaMP_N``, an alias), in any
    case."""
    spelling = str(name).strip().lower()
    for task in TASKS.values():  # the registry as it is now (tests swap entries)
        if spelling in (written.lower() for written in task.spellings):
            return task
    raise LampError(f"unknown task {name!r}; valid tasks: {TASK_HELP}")


def task_of_file(declared: str, outputs: Iterable[str]) -> Task:
    """The task of a LaMP outputs file whose "task" field is ``declared``.

    A name some task is ``published_as`` is ambiguous (the original LaMP-2's files say
    "LaMP_2", as movie tagging's do): the outputs decide. They are that task's when some
    output is one of its labels and none is a label of the task the name belongs to (after
    stripping, as the metrics compare them). A prediction file's outputs may be no label at
    all: where golds are at hand, ``could_be`` lets the golds decide instead.
    """
    named = get_task(declared)
    candidates = ambiguous_with(named)
    if not candidates:  # nearly every file: no need to look at its outputs
        return named
    texts = {str(text).strip() for text in outputs}
    for task in candidates:
        if texts & set(task.labels or ()) and not texts & set(named.labels or ()):
            return task
    return named


def ambiguous_with(named: Task) -> list[Task]:
    """The other tasks whose published files carry ``named``'s file name."""
    return [task for task in TASKS.values() if task is not named and task.published_as
            and get_task(task.published_as) is named]


def could_be(declared: str, task: Task) -> bool:
    """Whether a file whose "task" field is ``declared`` may hold ``task``'s outputs: it names
    ``task``, or the name ``task`` was published under (a LaMP-2N file saying "LaMP_2")."""
    named = get_task(declared)
    return named is task or task in ambiguous_with(named)


def task_arg(name: str) -> Task:
    """argparse ``type=`` for task flags: the error message lists the valid names."""
    import argparse

    try:
        return get_task(name)
    except LampError as error:
        raise argparse.ArgumentTypeError(str(error)) from None
