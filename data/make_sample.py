"""Write the bundled sample: a small synthetic LaMP dataset for every task.

Example:
    python data/make_sample.py --out_dir data/sample --seed 0

The sample has the layout of ``raw_data/user`` (``user/LaMP_{k}/{train,dev,test}_questions.json``
and ``{train,dev}_outputs.json``), the real LaMP input formats and id scheme, and text we
generate from our own word lists; no LaMP or Avocado text is in it. Every user carries a
personal signal that the profile reveals and the input alone does not (a typical rating, a
favourite tag or news category, a headline, title, subject or tweet style, a research
topic), and each profile
holds a few items close to the input so that retrieval matters. Texts are short (tweets of
8–25 words, the other texts 30–80) so that a CPU demo stays fast. The same seed writes the
same bytes.
"""
from __future__ import annotations

import argparse
import importlib.util
import logging
import random
import sys
from datetime import date, timedelta
from pathlib import Path
from typing import Callable

from tqdm import tqdm

if importlib.util.find_spec("LaMP") is None:
    # Run from a checkout without `pip install -e .` (as the original README's steps
    # do): make the repository root importable.
    sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from LaMP.utils.cli.arguments import add_seed_argument
from LaMP.utils.cli.program import ArgumentParser, run, setup_logging
from LaMP.utils.data.fileio import JsonListWriter, check_outputs
from LaMP.utils.data.outputs import write_outputs
from LaMP.utils.tasks import (MOVIE_TAGS, NEWS_INSTRUCTION, TASK_HELP, TASK_NAMES, Task, get_task,
                              task_arg)

logger = logging.getLogger("make_sample")

# (set, id digit, questions): LaMP ids are f"{task index - 1}{set digit}{row}".
SETS = (("train", "0", 48), ("dev", "1", 24), ("test", "2", 12))
PROFILE_SIZES = (5, 30)  # items per user, inclusive: small, like the shorter real profiles
LONG_WORDS = (30, 80)  # words of an abstract, article, review, description or email
TWEET_WORDS = (8, 25)
FIRST_DAY, DAYS = date(2012, 1, 1), 9 * 365  # profile dates fall in 2012–2020
FILLER = ("the", "a", "new", "local", "small", "recent", "several", "two", "many", "early")

# ----------------------------------------------------------------------------------------
# Word lists, ours. Each topic is a handful of words that texts on it keep coming back to.

RESEARCH = {
    "graphs": ["graph", "node", "edge", "message passing", "neighbourhood", "embedding",
               "link prediction", "community", "spectral filter", "random walk"],
    "speech": ["speech", "acoustic model", "phoneme", "speaker", "waveform", "prosody",
               "transcription", "noise", "spectrogram", "accent"],
    "retrieval": ["retrieval", "query", "ranking", "document", "relevance", "inverted index",
                  "click log", "search engine", "passage", "reranker"],
    "vision": ["image", "pixel", "segmentation", "object detection", "camera", "scene",
               "convolution", "depth map", "video frame", "bounding box"],
    "databases": ["query optimizer", "transaction", "join", "storage engine", "SQL",
                  "schema", "concurrency control", "replication", "buffer pool", "workload"],
    "robotics": ["robot", "grasp", "manipulation", "trajectory", "sensor", "locomotion",
                 "controller", "robot arm", "navigation", "occupancy map"],
    "security": ["malware", "attack", "encryption", "vulnerability", "authentication",
                 "privacy", "intrusion", "firewall", "exploit", "key exchange"],
    "biology": ["protein", "gene", "sequence", "genome", "cell", "expression", "mutation",
                "folding", "RNA", "pathway"],
}
METHODS = ["contrastive learning", "a transformer", "Bayesian inference", "a sparse model",
           "curriculum training", "graph attention", "active learning", "distillation"]
ABSTRACT_SENTENCES = [
    "We study {t0} and {t1} in {f} settings.",
    "Our approach combines {m} with {t2} to model {t3}.",
    "Existing work on {t1} ignores {t4}, which limits {f} systems.",
    "We propose a simple method that learns {t0} from {t2}.",
    "Experiments on {f} benchmarks show gains in {t3} over strong baselines.",
    "An analysis shows that {t4} explains most of the errors on {t0}.",
    "We release code and data for {t1} and {t2}.",
]
NEUTRAL_TITLES = ["Lessons from a decade of {f} experiments", "A note on {f} evaluation",
                  "What we learned building {f} systems", "Revisiting {f} baselines"]

NEWS = {
    "politics": ["senate", "budget vote", "governor", "election", "campaign", "policy",
                 "lawmakers", "city council", "tax plan", "voters"],
    "sports": ["coach", "playoffs", "striker", "season", "stadium", "injury", "trade",
               "championship", "rookie", "fans"],
    "food": ["recipe", "bakery", "chef", "street food", "menu", "sourdough", "farmers market",
             "spice", "brunch", "dumplings"],
    "travel": ["airline", "passport", "beach town", "hostel", "train route", "museum",
               "island", "road trip", "visa", "old town"],
    "health": ["sleep", "vaccine", "clinic", "diet", "nurses", "exercise", "blood pressure",
               "hospital", "anxiety", "screening"],
    "technology": ["smartphone", "startup", "battery", "app", "chip", "privacy rules",
                   "cloud service", "robot vacuum", "software update", "data centre"],
    "parenting": ["toddler", "school lunch", "bedtime", "teenager", "homework", "daycare",
                  "screen time", "playground", "family trip", "siblings"],
    "money": ["mortgage", "savings", "interest rates", "pension", "credit card", "rent",
              "stock market", "budget app", "inflation", "side job"],
}
# The LaMP-2N category each news topic is written about.
NEWS_CATEGORY = {"politics": "politics", "sports": "sports", "food": "food & drink",
                 "travel": "travel", "health": "healthy living",
                 "technology": "science & technology", "parenting": "parents",
                 "money": "business"}
ARTICLE_SENTENCES = [
    "The {t0} has people talking about {t1} again this week.",
    "Officials said the {t2} would change how {f} families deal with {t3}.",
    "Critics of the {t1} point to {t4} as the real problem.",
    "For now the {t0} story is far from over, and the {t2} debate goes on.",
    "Here is what readers should know about {t3} and {t4}.",
    "Experts expect {f} changes to {t1} before the end of the year.",
    "Several readers wrote in with questions about {t0} and {t2}.",
]

MOVIE_WORDS = {
    "sci-fi": ["spaceship", "alien", "planet", "galaxy", "android", "starship", "orbit",
               "colony"],
    "based on a book": ["novel", "author", "chapters", "adaptation", "bestseller",
                        "manuscript", "library", "storyteller"],
    "comedy": ["jokes", "prank", "awkward", "clown", "hilarious", "misadventure", "sitcom",
               "laughter"],
    "action": ["explosion", "chase", "heist", "gunfight", "stunt", "mercenary", "rescue",
               "helicopter"],
    "twist ending": ["secret", "reveal", "deception", "mystery", "unexpected", "hidden truth",
                     "clue", "double life"],
    "dystopia": ["regime", "surveillance", "rebellion", "ruins", "curfew", "wasteland",
                 "resistance", "ration cards"],
    "dark comedy": ["funeral", "morbid", "blackmail", "absurd", "corpse", "grim joke",
                    "satire", "misfortune"],
    "classic": ["timeless", "golden age", "legendary", "black-and-white", "masterpiece",
                "studio era", "restored print", "matinee"],
    "psychology": ["trauma", "memory", "therapist", "obsession", "paranoia", "mind",
                   "identity", "nightmare"],
    "fantasy": ["dragon", "wizard", "kingdom", "quest", "sword", "spell", "elf", "prophecy"],
    "romance": ["love", "wedding", "couple", "heart", "kiss", "love letters", "summer fling",
                "first date"],
    "thought-provoking": ["philosophy", "meaning", "ethics", "choice", "existence",
                          "reflection", "conscience", "big questions"],
    "social commentary": ["inequality", "class", "protest", "workers", "media", "poverty",
                          "corruption", "housing"],
    "violence": ["brutal", "gang", "revenge", "blood", "massacre", "killer", "war",
                 "assault"],
    "true story": ["real events", "biography", "survivor", "historical", "journalist",
                   "trial", "archive", "documented"],
}
MOVIE_SENTENCES = [
    "A story of {t0} and {t1} in a {f} town.",
    "When {t2} meets {t3}, nothing goes to plan.",
    "The film follows {t4} through {t0} and {t5}.",
    "Critics called it a tale of {t1}, {t2} and {t3}.",
    "Years later, {t5} and {t4} return to haunt everyone.",
    "Expect {t0}, {t3} and a lot of {t1}.",
]

PRODUCTS = {
    "kettle": ["kettle", "boil", "spout", "lid", "steam", "handle", "kitchen", "limescale"],
    "headphones": ["headphones", "bass", "ear cups", "battery", "bluetooth", "noise cancelling",
                   "cable", "commute"],
    "novel": ["novel", "plot", "characters", "ending", "paperback", "author", "chapters",
              "pacing"],
    "running shoes": ["shoes", "sole", "laces", "fit", "marathon", "cushioning", "trail",
                      "blisters"],
    "garden hose": ["hose", "nozzle", "garden", "leak", "reel", "water pressure", "kinks",
                    "tap"],
    "board game": ["board game", "dice", "rules", "cards", "family night", "pieces",
                   "strategy", "box"],
    "desk lamp": ["lamp", "bulb", "brightness", "desk", "switch", "base", "glare", "cord"],
    "backpack": ["backpack", "zipper", "straps", "pockets", "laptop sleeve", "rain", "weight",
                 "stitching"],
}
REVIEW_SENTENCES = [
    "I bought this {t0} for my {f} flat and used it every day.",
    "The {t1} and the {t2} are what you would expect.",
    "It arrived on time and the {t3} was fine.",
    "After a month the {t4} still works and the {t5} is okay.",
    "My partner mostly cares about the {t1}.",
    "Compared with my old {t0}, the {t2} is different.",
]
SENTIMENT = {  # one clause per rating: a weak hint, not the answer (profiles carry that)
    "1": "Honestly it was a waste of money.",
    "2": "It disappointed me more often than not.",
    "3": "It is fine, nothing special.",
    "4": "Pretty happy with it overall.",
    "5": "Absolutely love it, would buy again.",
}
RATING_WEIGHTS = {"1": 1, "2": 1, "3": 2, "4": 3, "5": 5}  # skewed high, as real reviews are

WORK = {
    "budget": ["budget", "forecast", "spreadsheet", "cost centre", "invoice", "approval",
               "quarter", "finance"],
    "hiring": ["candidate", "interview", "offer", "recruiter", "job posting", "panel",
               "references", "start date"],
    "outage": ["server", "outage", "incident", "logs", "database", "on-call", "fix",
               "monitoring"],
    "offsite": ["offsite", "agenda", "venue", "travel", "dinner", "workshop", "slides",
                "team building"],
    "contract": ["contract", "vendor", "legal review", "signature", "terms", "renewal",
                 "pricing", "deadline"],
    "launch": ["launch", "release notes", "customers", "beta", "press", "demo",
               "marketing plan", "feedback"],
}
EMAIL_SENTENCES = [
    "Hi all, quick update on the {t0} and the {t1}.",
    "Can you look at the {t2} before {f} meetings on Thursday?",
    "We still need the {t3} from finance and the {t4} from legal.",
    "Let me know if the {t0} is blocking the {t5}.",
    "Thanks for the help with the {t1} last week.",
    "I attached the {t2} and some notes on the {t3}.",
]

EVERYDAY = {
    "coffee": ["coffee", "latte", "barista", "espresso", "mug", "cafe"],
    "rain": ["rain", "umbrella", "puddles", "storm", "wet socks", "clouds"],
    "exams": ["exam", "revision", "library", "notes", "finals", "study group"],
    "concert": ["concert", "band", "tickets", "encore", "crowd", "setlist"],
    "gym": ["gym", "workout", "treadmill", "leg day", "protein shake", "trainer"],
    "commute": ["train", "bus", "delay", "platform", "traffic", "commute"],
    "weekend": ["weekend", "brunch", "lie-in", "park", "friends", "movie night"],
    "phone": ["phone", "charger", "screen", "update", "battery", "apps"],
}
TWEET_SENTENCES = [
    "Finally got my {t0} after the {t1} this morning.",
    "Nothing beats {t2} and {t3} on a {f} day.",
    "Why is the {t1} always like this when I need {t0}.",
    "Spent the whole afternoon on {t3} and {t4}.",
    "Cannot believe the {t4} was so good today.",
    "Thinking about {t2} and {t5} all day.",
]

# ----------------------------------------------------------------------------------------
# Per-user styles: the personal signal of the generation tasks.

# A style turns the key words of a text (and the user's own tag word, for the styles that
# use one) into its title.
HEADLINE_STYLES = {
    "question": lambda k, tag: f"Is {k[0].title()} the Answer to {k[1].title()}?",
    "howto": lambda k, tag: f"How to Think About {k[0].title()} and {k[1].title()}",
    "listicle": lambda k, tag: f"5 Things to Know About {k[0].title()}",
    "colon": lambda k, tag: f"{k[0].title()}: What the {k[1].title()} Means for You",
    "why": lambda k, tag: f"Why {k[0].title()} Matters More Than {k[1].title()}",
}
PAPER_TITLE_STYLES = {
    "named": lambda k, tag: f"{tag}: {k[0].title()} for {k[1].title()}",
    "towards": lambda k, tag: f"Towards {k[0].title()} for {k[1].title()}",
    "on_the": lambda k, tag: f"On the Role of {k[0].title()} in {k[1].title()}",
    "learning": lambda k, tag: f"Learning {k[0].title()} from {k[1].title()}",
    "via": lambda k, tag: f"{k[0].title()} via {k[1].title()}",
}
SUBJECT_STYLES = {
    "team": lambda k, tag: f"[{tag}] {k[0]} and {k[1]}",
    "fyi": lambda k, tag: f"FYI: {k[0]} update",
    "lower": lambda k, tag: f"re: {k[0]} / {k[1]}".lower(),
    "action": lambda k, tag: f"{k[0].title()} - action needed",
    "question": lambda k, tag: f"Quick question about the {k[0]}",
}
# The user's own word for the styles that use one: a team in subjects, a system name in
# paper titles (the other styles ignore it).
TEAMS = ("ops", "sales", "infra", "design", "legal", "data")
SYSTEM_NAMES = ("GraphMix", "Quill", "Atlas", "Beacon", "Tern", "Marlin")
TWEET_SIGNATURES = (":)", ":D", "<3", "xoxo", "#mondays", "#blessed", "#nerdlife",
                    "#coffeetime", ";)", "#nofilter")


# ----------------------------------------------------------------------------------------
# Text helpers.

def words_of(text: str) -> int:
    return len(text.split())


def fill(rng: random.Random, template: str, keywords: list[str]) -> str:
    """Fill ``{t0}``…``{t5}`` with keywords (cycled), ``{f}`` with a filler word and ``{m}``
    with a method name."""
    slots = {f"t{i}": keywords[i % len(keywords)] for i in range(6)}
    return template.format(f=rng.choice(FILLER), m=rng.choice(METHODS), **slots)


def paragraph(rng: random.Random, sentences: list[str], keywords: list[str],
              bounds: tuple[int, int], extra: str = "") -> str:
    """Sentences on ``keywords`` until the text has at least ``bounds[0]`` words."""
    low, high = bounds
    pool = sentences[:]
    rng.shuffle(pool)
    parts = [extra] if extra else []
    for template in pool * 3:
        if words_of(" ".join(parts)) >= low:
            break
        candidate = fill(rng, template, rng.sample(keywords, len(keywords)))
        if words_of(" ".join(parts + [candidate])) > high:
            continue
        parts.append(candidate)
    text = " ".join(parts)
    assert low <= words_of(text) <= high, (words_of(text), text)
    return text


def keywords(rng: random.Random, bank: dict[str, list[str]], topic: str, count: int = 5
             ) -> list[str]:
    return rng.sample(bank[topic], count)


def other(rng: random.Random, choices, excluded):
    return rng.choice([choice for choice in choices if choice != excluded])


def profile_topics(rng: random.Random, near: str, usual: str, topics) -> list[str]:
    """Topics of one user's profile: 2–4 items near the input, most of the rest on the
    user's usual topic. Sizes span PROFILE_SIZES but lean small (most users have few items,
    as in LaMP), which keeps the sample and the demo small."""
    low, high = PROFILE_SIZES
    size = low + int((high - low + 1) * rng.random() ** 2)
    close = min(size - 1, rng.randint(2, 4))
    rest = [usual if rng.random() < 0.6 else rng.choice(list(topics))
            for _ in range(size - close)]
    chosen = [near] * close + rest
    rng.shuffle(chosen)
    return chosen


# ----------------------------------------------------------------------------------------
# One builder per task: (rng) -> (input, gold output, profile items without id/date).

def citation_question(rng):
    usual = rng.choice(list(RESEARCH))
    wrong_topic = other(rng, RESEARCH, usual)
    tag = rng.choice(SYSTEM_NAMES)
    # Half the time the author's own title gives the topic away; then only the profile does.
    own = (PAPER_TITLE_STYLES["towards"](keywords(rng, RESEARCH, usual, 2), tag)
           if rng.random() < 0.5 else rng.choice(NEUTRAL_TITLES).format(f=rng.choice(FILLER)))
    right = rng.choice(list(PAPER_TITLE_STYLES.values()))(keywords(rng, RESEARCH, usual, 2), tag)
    wrong = rng.choice(list(PAPER_TITLE_STYLES.values()))(
        keywords(rng, RESEARCH, wrong_topic, 2), other(rng, SYSTEM_NAMES, tag))
    first_is_right = rng.random() < 0.5
    one, two = (right, wrong) if first_is_right else (wrong, right)
    text = (f'For an author who has written the paper with the title "{own}", which reference '
            f'is related? Just answer with [1] or [2] without explanation. [1]: "{one}" '
            f'[2]: "{two}"')
    style = PAPER_TITLE_STYLES[rng.choice(list(PAPER_TITLE_STYLES))]
    profile = []
    for topic in profile_topics(rng, usual, usual, RESEARCH):
        words = keywords(rng, RESEARCH, topic, 5)
        profile.append({"title": style(words, tag),
                        "abstract": paragraph(rng, ABSTRACT_SENTENCES, words, LONG_WORDS)})
    return text, "[1]" if first_is_right else "[2]", profile


def movie_question(rng):
    favourite = rng.choice(MOVIE_TAGS)
    other_tag = other(rng, MOVIE_TAGS, favourite)
    description, gold = favourite_or_other(rng, MOVIE_WORDS, MOVIE_SENTENCES, favourite,
                                           other_tag)
    text = ("Which tag does this movie relate to among the following tags? Just answer with the "
            f"tag name without further explanation. tags: [{', '.join(MOVIE_TAGS)}] "
            f"description: {description}")
    profile = []
    for topic in profile_topics(rng, other_tag, favourite, MOVIE_TAGS):
        profile.append({"description": movie_description(rng, topic), "tag": topic})
    return text, gold, profile


def news_question(rng):
    """LaMP-2N: like movie tagging, an article on two topics is filed under the user's usual
    category; a plain article on another topic under that topic's."""
    usual = rng.choice(list(NEWS))
    other_topic = other(rng, NEWS, usual)
    body, gold = favourite_or_other(rng, NEWS, ARTICLE_SENTENCES, usual, other_topic)
    style = HEADLINE_STYLES[rng.choice(list(HEADLINE_STYLES))]
    profile = []
    for topic in profile_topics(rng, other_topic, usual, NEWS):
        words = keywords(rng, NEWS, topic, 6)
        profile.append({"text": paragraph(rng, ARTICLE_SENTENCES, words, LONG_WORDS),
                        "title": style(words, ""), "category": NEWS_CATEGORY[topic]})
    return f"{NEWS_INSTRUCTION} article: {body}", NEWS_CATEGORY[gold], profile


def favourite_or_other(rng, bank: dict[str, list[str]], sentences: list[str], favourite: str,
                       other_topic: str) -> tuple[str, str]:
    """(text, its gold topic) of the labelling tasks: usually the text could carry either
    topic and the user files it under their favourite; otherwise it is plainly the other
    topic's."""
    if rng.random() < 0.7:
        mixed = bank[favourite][:4] + bank[other_topic][:4]
        return paragraph(rng, sentences, rng.sample(mixed, 6), LONG_WORDS), favourite
    return (paragraph(rng, sentences, keywords(rng, bank, other_topic, 6), LONG_WORDS),
            other_topic)


def movie_description(rng, tag: str) -> str:
    return paragraph(rng, MOVIE_SENTENCES, keywords(rng, MOVIE_WORDS, tag, 6), LONG_WORDS)


def rating_near(rng, typical: str) -> str:
    """The user's typical rating most of the time, otherwise one step away."""
    if rng.random() < 0.7:
        return typical
    return str(min(5, max(1, int(typical) + rng.choice((-1, 1)))))


def review_question(rng):
    typical = rng.choices(list(RATING_WEIGHTS), weights=list(RATING_WEIGHTS.values()))[0]
    product = rng.choice(list(PRODUCTS))
    gold = rating_near(rng, typical)
    text = ("What is the score of the following review on a scale of 1 to 5? just answer with "
            f"1, 2, 3, 4, or 5 without further explanation. review: {review(rng, product, gold)}")
    profile = []
    for topic in profile_topics(rng, product, product, PRODUCTS):
        score = rating_near(rng, typical)
        profile.append({"text": review(rng, topic, score), "score": score})
    return text, gold, profile


def review(rng, product: str, score: str) -> str:
    # Half the reviews say how the writer feels; the other half only describe the product.
    hint = SENTIMENT[score] if rng.random() < 0.5 else ""
    return paragraph(rng, REVIEW_SENTENCES, keywords(rng, PRODUCTS, product, 6), LONG_WORDS,
                     extra=hint)


def styled_question(bank, sentences, styles, tags, instruction: str):
    """A builder for the text-to-title tasks (LaMP-4, 5 and 6): the gold follows the user's
    style and names the input's key words; the profile pairs texts with styled titles."""
    def build(rng):
        style = styles[rng.choice(list(styles))]
        usual = rng.choice(list(bank))
        topic = usual if rng.random() < 0.5 else other(rng, bank, usual)
        tag = rng.choice(tags) if tags else ""

        def pair(on: str) -> tuple[str, str]:
            words = keywords(rng, bank, on, 6)
            return paragraph(rng, sentences, words, LONG_WORDS), style(words, tag)

        body, gold = pair(topic)
        profile = []
        for item_topic in profile_topics(rng, topic, usual, bank):
            item_body, title = pair(item_topic)
            profile.append({"text": item_body, "title": title})
        return f"{instruction} {body}", gold, profile
    return build


def as_paper(build):
    """LaMP-5 profile items name their fields title/abstract instead of title/text."""
    def wrapped(rng):
        text, gold, profile = build(rng)
        return text, gold, [{"title": item["title"], "abstract": item["text"]}
                            for item in profile]
    return wrapped


def tweet_question(rng):
    signature = rng.choice(TWEET_SIGNATURES)
    ellipsis = rng.random() < 0.5

    def styled(plain: str) -> str:
        body = plain.lower().rstrip(".")
        return f"{body}{'..' if ellipsis else ''} {signature}"

    topic = rng.choice(list(EVERYDAY))
    plain = paragraph(rng, TWEET_SENTENCES, keywords(rng, EVERYDAY, topic, 6),
                      (TWEET_WORDS[0], TWEET_WORDS[1] - 1))
    text = f"{get_task('LaMP-7').input_prefix} {plain}"
    profile = []
    for item_topic in profile_topics(rng, topic, topic, EVERYDAY):
        tweet = paragraph(rng, TWEET_SENTENCES, keywords(rng, EVERYDAY, item_topic, 6),
                          (TWEET_WORDS[0], TWEET_WORDS[1] - 1))
        profile.append({"text": styled(tweet)})
    return text, styled(plain), profile


Builder = Callable[[random.Random], tuple[str, str, list[dict]]]
# task -> (its builder, whether profile items carry a date: LaMP-7 items have text and id only)
BUILDERS: dict[str, tuple[Builder, bool]] = {
    "LaMP-1": (citation_question, True),
    "LaMP-2": (movie_question, True),
    "LaMP-3": (review_question, True),
    "LaMP-4": (styled_question(NEWS, ARTICLE_SENTENCES, HEADLINE_STYLES, (),
                               get_task("LaMP-4").input_prefix), True),
    "LaMP-5": (as_paper(styled_question(RESEARCH, ABSTRACT_SENTENCES, PAPER_TITLE_STYLES,
                                        SYSTEM_NAMES, get_task("LaMP-5").input_prefix)), True),
    "LaMP-6": (styled_question(WORK, EMAIL_SENTENCES, SUBJECT_STYLES, TEAMS,
                               get_task("LaMP-6").input_prefix), True),
    "LaMP-7": (tweet_question, False),
    "LaMP-2N": (news_question, True),
}


def make_question(task: Task, set_digit: str, row: int, seed: int) -> tuple[dict, str]:
    """One user's question, its gold output and profile; the same arguments, the same result."""
    rng = random.Random(f"{seed}/{task.name}/{set_digit}/{row}")
    build, dated = BUILDERS[task.name]
    text, gold, items = build(rng)
    qid = f"{task.id_digit}{set_digit}{row}"
    profile = []
    for index, item in enumerate(items):
        entry = {**item, "id": f"{qid}{index}"}
        if dated:
            entry["date"] = (FIRST_DAY + timedelta(days=rng.randrange(DAYS))).isoformat()
        profile.append(entry)
    return {"id": qid, "input": text, "profile": profile}, gold


def sample_files(tasks: list[Task]) -> list[str]:
    """What ``write_sample`` writes, relative to its folder."""
    return [f"user/{task.folder}/{set_name}_{kind}.json" for task in tasks
            for set_name, _, _ in SETS
            for kind in (("questions",) if set_name == "test" else ("questions", "outputs"))]


def write_sample(out_dir: Path, seed: int, tasks: list[Task]) -> dict[str, dict[str, int]]:
    counts: dict[str, dict[str, int]] = {}
    for task in tqdm(tasks, desc="tasks", disable=None):
        folder = out_dir / "user" / task.folder
        for set_name, digit, size in SETS:
            golds = []
            with JsonListWriter(folder / f"{set_name}_questions.json") as out:
                for row in range(size):
                    question, gold = make_question(task, digit, row, seed)
                    out.write(question)
                    golds.append((question["id"], gold))
            if set_name != "test":  # like the real data: test golds are not published
                write_outputs(folder / f"{set_name}_outputs.json", task, golds)
            counts.setdefault(task.file_name, {})[set_name] = size
    return counts


def parse_args(argv=None) -> argparse.Namespace:
    parser = ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out_dir", default=str(Path(__file__).resolve().parent / "sample"),
                        help="where user/LaMP_{k}/ is written (default: data/sample)")
    add_seed_argument(parser, "seed of every random choice; the committed sample uses 0",
                      default=0)
    parser.add_argument("--tasks", nargs="+", type=task_arg,
                        default=[get_task(name) for name in TASK_NAMES],
                        help=f"tasks to write: {TASK_HELP} (default: every task)")
    args = parser.parse_args(argv)
    args.tasks = sorted(set(args.tasks), key=lambda task: task.name)
    return args


def main(argv=None) -> dict:
    args = parse_args(argv)
    setup_logging()
    check_outputs(folders={"--out_dir": args.out_dir},
                  contents={"--out_dir": sample_files(args.tasks)}, inputs={})
    counts = write_sample(Path(args.out_dir), args.seed, args.tasks)
    logger.info("wrote %d tasks to %s", len(counts), args.out_dir)
    return counts


if __name__ == "__main__":
    sys.exit(run(main))
