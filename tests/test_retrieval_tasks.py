"""The retrieval query and corpus of every task, on inputs shaped like LaMP's."""
from __future__ import annotations

import json

import pytest

from LaMP.utils.errors import LampError
from LaMP.utils.tasks import TASK_NAMES, get_task, quoted_strings
from conftest import LAMP_REAL, requires_real_data

LAMP_1_INPUT = ('For an author who has written the paper with the title "Deep Learning for '
                'Graphs: A Survey", which reference is related? Just answer with [1] or [2] '
                'without explanation. [1]: "Graph Neural Networks in Practice" [2]: "A Study '
                'of Protein Folding"')
LAMP_2_INPUT = ("Which tag does this movie relate to among the following tags? Just answer with "
                "the tag name without further explanation. tags: [sci-fi, based on a book, "
                "comedy, action, twist ending, dystopia, dark comedy, classic, psychology, "
                "fantasy, romance, thought-provoking, social commentary, violence, true story] "
                "description: A hacker learns that reality is a simulation: he joins a rebellion.")
LAMP_3_INPUT = ("What is the score of the following review on a scale of 1 to 5? just answer "
                "with 1, 2, 3, 4, or 5 without further explanation. review: Works fine: the "
                "battery lasts two days, though the strap broke after a month.")
LAMP_5_INPUT = ("Generate a title for the following abstract of a paper: We study retrieval "
                "for personalization: a user's profile is ranked by relevance to the input.")
LAMP_6_INPUT = ("Generate a subject for the following email: Hi all, the meeting moved to "
                "3pm: room 4B. Bring the Q3 numbers.")


def test_lamp_1_query_is_the_two_candidate_titles():
    task = get_task("LaMP-1")
    assert task.query(LAMP_1_INPUT, "10") == ("Graph Neural Networks in Practice "
                                              "A Study of Protein Folding")


def test_quoted_strings_drops_an_unclosed_quote():
    assert quoted_strings('a "b" c "d" e "f') == ["b", "d"]
    assert quoted_strings("no quotes") == []
    assert quoted_strings('"" and "x"') == ["", "x"]


@pytest.mark.parametrize("name, text, expected", [
    ("LaMP-2", LAMP_2_INPUT,
     "A hacker learns that reality is a simulation: he joins a rebellion."),
    ("LaMP-3", LAMP_3_INPUT,
     "Works fine: the battery lasts two days, though the strap broke after a month."),
    ("LaMP-5", LAMP_5_INPUT,
     "We study retrieval for personalization: a user's profile is ranked by relevance to "
     "the input."),
    ("LaMP-6", LAMP_6_INPUT, "Hi all, the meeting moved to 3pm: room 4B. Bring the Q3 numbers."),
    ("LaMP-7", "Paraphrase the following tweet without any explanation before or after it: "
               "ugh: monday again  ", "ugh: monday again"),
])
def test_query_is_the_text_after_the_marker(name, text, expected):
    # Only the first marker counts: later colons belong to the query.
    assert get_task(name).query(text, "q1") == expected


def test_lamp_4_query_after_article():
    text = "Generate a headline for the following article: Markets rallied: stocks rose 3%."
    assert get_task("LaMP-4").query(text) == "Markets rallied: stocks rose 3%."


@pytest.mark.parametrize("name", TASK_NAMES)
def test_missing_marker_names_the_question(name):
    with pytest.raises(LampError, match=r"question q-77\b"):
        get_task(name).query("an input without any marker or quotes", "q-77")


def test_lamp_1_with_fewer_than_three_quoted_strings_is_an_error():
    with pytest.raises(LampError, match="question 5: input lacks the quoted candidate titles"):
        get_task("LaMP-1").query('the title "X", which reference? [1]: "A"', "5")


PROFILE_ITEMS = {
    "LaMP-1": ({"id": "1", "title": "T", "abstract": "A b", "date": "2010"}, "T A b"),
    "LaMP-2": ({"id": "2", "description": "a film", "tag": "comedy", "date": "2009-05-01"},
               "a film"),
    "LaMP-3": ({"id": "3", "text": "great", "score": "5", "date": "2011-02"}, "great"),
    "LaMP-4": ({"id": "4", "title": "Head", "text": "body text", "date": "2015-01-02"},
               "Head body text"),
    "LaMP-5": ({"id": "5", "title": "Title", "abstract": "Abs.", "date": "1999"}, "Title Abs."),
    "LaMP-6": ({"id": "6", "title": "Subj", "text": "mail body", "date": "2001-09-10"},
               "mail body"),
    "LaMP-7": ({"id": "7", "text": "a tweet ", "date": "2009-06-01"}, "a tweet "),
    "LaMP-2N": ({"id": "8", "title": "Head", "text": "news body", "category": "crime",
                 "date": "2016-03-04"}, "Head news body"),
}


@pytest.mark.parametrize("name", TASK_NAMES)
def test_corpus_text_per_task_with_and_without_date(name):
    task = get_task(name)
    item, expected = PROFILE_ITEMS[name]
    assert task.corpus_text(item) == expected
    assert task.corpus_text(item, use_date=True) == f"{expected} date: {item['date']}"
    assert task.corpus([item, item], use_date=True) == [f"{expected} date: {item['date']}"] * 2
    assert task.corpus([]) == []


def test_use_date_without_a_date_names_the_item():
    with pytest.raises(LampError, match="LaMP-7 profile item 9 has no date"):
        get_task("LaMP-7").corpus([{"id": "9", "text": "x"}], use_date=True)


def test_corpus_without_a_field_names_the_item():
    with pytest.raises(LampError, match="LaMP-4 profile item 8 lacks the field 'title'"):
        get_task("LaMP-4").corpus([{"id": "7", "title": "t", "text": "x"},
                                   {"id": "8", "text": "x"}])


def test_corpus_turns_numbers_into_text():
    task = get_task("LaMP-3")
    assert task.corpus([{"id": "1", "text": 5}]) == ["5"]
    assert get_task("LaMP-4").corpus([{"id": "1", "title": 1, "text": 2.5}]) == ["1 2.5"]


@requires_real_data
def test_real_lamp_7_dev_queries_and_corpus():
    task = get_task("LaMP-7")
    questions = json.loads((LAMP_REAL / "LaMP_7" / "dev" / "dev_questions.json").read_text())
    first = questions[0]
    assert task.query(first["input"], first["id"]) == (
        "Although I have a lot to do today, I am currently feeling unoccupied.")
    prefix = "Paraphrase the following tweet without any explanation before or after it:"
    for question in questions:
        query = task.query(question["input"], question["id"])
        assert question["input"].startswith(prefix)
        assert query == question["input"][len(prefix):].strip()
        assert task.corpus(question["profile"]) == [item["text"] for item in question["profile"]]


@requires_real_data
def test_real_lamp_4_dev_query_and_corpus():
    task = get_task("LaMP-4")
    path = LAMP_REAL / "LaMP_4" / "dev" / "dev_questions.subset_first1.json"
    question = json.loads(path.read_text())[0]
    assert task.query(question["input"], question["id"]).startswith(
        "Here are a few tips to keep your teen safe when using the Internet")
    corpus = task.corpus(question["profile"])
    assert len(corpus) == len(question["profile"]) == 17
    first = question["profile"][0]
    assert corpus[0] == f"{first['title']} {first['text']}"
    assert corpus[0].startswith("If You See Something, Please Do Something to Prevent Child Abuse "
                                "Although the age of social media")
