"""Checks on the built-in data files: ``steerkernel/data/emotions.json`` (the emotion corpus)
and ``steerkernel/data/scenarios.json`` (the ``steerkernel demo`` prompts).

Both are loaded through ``importlib.resources`` from the ``steerkernel.data`` package, the way
an installed copy of the library reads them.
"""
import collections
import json
import math
import re
from importlib import resources

import pytest

CORE = ["happy", "sad", "afraid", "angry", "calm", "desperate", "loving", "disgusted"]

# Words a text of an emotion must not contain (besides the emotion's own key word): its
# noun/adverb/verb forms and its most direct synonyms, so that a probe has to infer the
# emotion from the situation rather than spot a label word.  The eight core emotions are the
# contract; the rest are held to the same rule.
FORBIDDEN = {
    "happy": ["happy", "happier", "happiest", "happily", "happiness", "joy", "joyful",
              "joyfully", "joyous", "glad", "gladly"],
    "sad": ["sad", "sadder", "saddest", "sadly", "sadness", "sadden", "saddened", "sorrow",
            "sorrowful", "unhappy"],
    "afraid": ["afraid", "fear", "fears", "feared", "fearful", "fearfully", "scare", "scared",
               "scary", "fright", "frightened", "frightening", "terrified", "terrifying",
               "terror"],
    "angry": ["angry", "angrier", "angriest", "angrily", "anger", "angered", "furious",
              "furiously", "fury", "mad", "rage", "raging", "enraged"],
    "calm": ["calm", "calmer", "calmest", "calmly", "calmness", "calmed", "calming",
             "tranquil", "tranquility"],
    "desperate": ["desperate", "desperately", "desperation"],
    "loving": ["loving", "lovingly", "love", "loved", "loves", "lovely", "lover", "affection",
               "affectionate", "affectionately", "adore", "adored", "adoring"],
    "disgusted": ["disgust", "disgusted", "disgusting", "disgustingly", "revolted",
                  "revolting", "revulsion", "repulsed", "repulsive", "gross"],
    "excited": ["excite", "excited", "excitedly", "excitement", "exciting", "thrill",
                "thrilled", "thrilling"],
    "proud": ["proud", "proudly", "pride", "prideful"],
    "amused": ["amuse", "amused", "amusing", "amusement", "funny"],
    "hopeful": ["hope", "hopes", "hoped", "hoping", "hopeful", "hopefully", "optimistic",
                "optimism"],
    "surprised": ["surprise", "surprised", "surprising", "surprisingly", "astonished",
                  "astonishing", "shock", "shocked"],
    "content": ["content", "contented", "contentedly", "contentment", "satisfied",
                "satisfaction"],
    "relieved": ["relief", "relieve", "relieved"],
    "serene": ["serene", "serenely", "serenity", "peaceful", "peacefully"],
    "grateful": ["grateful", "gratefully", "gratitude", "thankful", "thankfully"],
    "nostalgic": ["nostalgia", "nostalgic", "nostalgically"],
    "nervous": ["nervous", "nervously", "nervousness", "nerves", "anxious", "anxiously",
                "anxiety"],
    "frustrated": ["frustrate", "frustrated", "frustrating", "frustration", "exasperated"],
    "jealous": ["jealous", "jealously", "jealousy", "envy", "envious", "enviously"],
    "bored": ["bored", "boring", "boredom", "dull"],
    "tired": ["tired", "tiredly", "tiredness", "exhausted", "exhaustion", "fatigue",
              "fatigued"],
    "lonely": ["lonely", "loneliness", "lonesome", "alone"],
    "ashamed": ["ashamed", "shame", "shamed", "shameful", "shamefully", "humiliated",
                "humiliation"],
    "disappointed": ["disappoint", "disappointed", "disappointing", "disappointment",
                     "letdown"],
}

MIN_TEXTS = 32        # every emotion has exactly this many texts or more
MIN_NEUTRAL = 120
MIN_WORDS, MAX_WORDS = 12, 40   # per text, emotions, neutral and series alike


def _load(name):
    ref = resources.files("steerkernel.data").joinpath(name)
    assert ref.is_file(), f"steerkernel/data/{name} is missing"
    return json.loads(ref.read_text(encoding="utf-8"))


@pytest.fixture(scope="module")
def corpus():
    return _load("emotions.json")


@pytest.fixture(scope="module")
def scenarios():
    return _load("scenarios.json")


def _has_word(word, text):
    return re.search(r"\b%s\b" % re.escape(word), text, re.IGNORECASE) is not None


def _words(text):
    return len(text.split())


def _all_texts(corpus):
    out = [t for e in corpus["emotions"].values() for t in e["texts"]]
    return out + corpus["neutral"] + corpus["rising_danger"]


# ----------------------------------------------------------------------------- emotions.json

def test_top_level_schema(corpus):
    assert corpus["version"] == 1
    assert set(corpus) == {"version", "ratings_source", "emotions", "neutral", "rising_danger"}
    assert isinstance(corpus["ratings_source"], str)
    rs = corpus["ratings_source"]
    assert len(rs.split()) >= 40
    for source in ("Russell", "Warriner", "NRC VAD"):
        assert source in rs
    assert isinstance(corpus["emotions"], dict)
    assert isinstance(corpus["neutral"], list) and isinstance(corpus["rising_danger"], list)


def test_emotion_entries(corpus):
    emotions = corpus["emotions"]
    assert len(emotions) >= 24
    assert all(name in emotions for name in CORE)
    for name, entry in emotions.items():
        assert re.fullmatch(r"[a-z]+", name), name
        assert set(entry) == {"valence", "arousal", "texts"}, name
        for key in ("valence", "arousal"):
            x = entry[key]
            assert isinstance(x, (int, float)) and not isinstance(x, bool), (name, key)
            assert math.isfinite(x) and -1.0 <= x <= 1.0, (name, key, x)
        assert isinstance(entry["texts"], list)
        assert len(entry["texts"]) >= MIN_TEXTS, (name, len(entry["texts"]))
        assert all(isinstance(t, str) and t.strip() == t and t for t in entry["texts"]), name


def test_forbidden_list_covers_every_emotion(corpus):
    assert set(FORBIDDEN) == set(corpus["emotions"])
    for name, words in FORBIDDEN.items():
        assert name in words


@pytest.mark.parametrize("name", CORE)
def test_core_texts_avoid_their_own_words(corpus, name):
    for text in corpus["emotions"][name]["texts"]:
        hits = [w for w in FORBIDDEN[name] if _has_word(w, text)]
        assert not hits, f"{name}: {hits} in {text!r}"


def test_all_texts_avoid_their_own_words(corpus):
    for name, entry in corpus["emotions"].items():
        for text in entry["texts"]:
            assert not _has_word(name, text), f"{name} in {text!r}"
            hits = [w for w in FORBIDDEN[name] if _has_word(w, text)]
            assert not hits, f"{name}: {hits} in {text!r}"


def test_no_text_names_any_emotion(corpus):
    # stricter than needed: no corpus text (emotion, neutral or series) contains any emotion's
    # key word, so label words cannot leak between concepts either
    names = list(corpus["emotions"])
    for text in _all_texts(corpus):
        hits = [n for n in names if _has_word(n, text)]
        assert not hits, f"{hits} in {text!r}"


def test_all_four_quadrants_populated(corpus):
    quads = collections.Counter()
    for name, entry in corpus["emotions"].items():
        v, a = entry["valence"], entry["arousal"]
        assert v != 0 and a != 0, f"{name} sits on an axis"
        quads[(v > 0, a > 0)] += 1
    assert len(quads) == 4
    assert all(n >= 4 for n in quads.values()), dict(quads)


def test_core_placements_are_plausible(corpus):
    e = corpus["emotions"]
    for name in ("happy", "calm", "loving"):
        assert e[name]["valence"] > 0, name
    for name in ("sad", "afraid", "angry", "desperate", "disgusted"):
        assert e[name]["valence"] < 0, name
    for name in ("afraid", "angry", "desperate"):
        assert e[name]["arousal"] > 0, name
    for name in ("calm", "sad"):
        assert e[name]["arousal"] < 0, name
    assert e["calm"]["arousal"] < e["happy"]["arousal"] < e["afraid"]["arousal"]


def test_no_duplicate_texts(corpus):
    norm = [" ".join(t.lower().split()) for t in _all_texts(corpus)]
    dups = [t for t, n in collections.Counter(norm).items() if n > 1]
    assert not dups, dups


def test_text_lengths_comparable(corpus):
    for text in _all_texts(corpus):
        assert MIN_WORDS <= _words(text) <= MAX_WORDS, text
    emo = [_words(t) for e in corpus["emotions"].values() for t in e["texts"]]
    neu = [_words(t) for t in corpus["neutral"]]
    emo_mean, neu_mean = sum(emo) / len(emo), sum(neu) / len(neu)
    # length must not separate emotional from neutral text
    assert abs(emo_mean - neu_mean) / emo_mean < 0.15, (emo_mean, neu_mean)
    for name, entry in corpus["emotions"].items():
        mean = sum(map(_words, entry["texts"])) / len(entry["texts"])
        assert abs(mean - emo_mean) / emo_mean < 0.15, (name, mean, emo_mean)


def test_neutral(corpus):
    neutral = corpus["neutral"]
    assert len(neutral) >= MIN_NEUTRAL
    assert all(isinstance(t, str) and t.strip() == t and t for t in neutral)


def test_rising_danger(corpus):
    series = corpus["rising_danger"]
    assert len(series) == 12
    assert all(isinstance(t, str) and t.strip() == t and t for t in series)
    for text in series:
        hits = [w for w in FORBIDDEN["afraid"] if _has_word(w, text)]
        assert not hits, f"{hits} in {text!r}"


def test_loads_through_the_library(corpus):
    from steerkernel.concepts.corpus import load_corpus

    c = load_corpus("builtin")
    assert c.names == list(corpus["emotions"])
    assert c.series["rising_danger"] == corpus["rising_danger"]
    assert c.extras["calm"]["arousal"] == corpus["emotions"]["calm"]["arousal"]
    train, held = c.split()
    assert all(len(held[n]) >= 6 and len(train.texts[n]) >= 25 for n in c.names)


# ---------------------------------------------------------------------------- scenarios.json

def test_scenarios_schema(scenarios, corpus):
    assert set(scenarios) == {"scenarios"}
    items = scenarios["scenarios"]
    assert isinstance(items, list) and len(items) >= 4
    names = [s["name"] for s in items]
    assert len(set(names)) == len(names)
    assert "deadline_agent" in names
    emotions = corpus["emotions"]
    for s in items:
        assert set(s) == {"name", "title", "messages", "watch"}, s.get("name")
        assert re.fullmatch(r"[a-z_]+", s["name"])
        assert isinstance(s["title"], str) and s["title"].strip()
        msgs = s["messages"]
        assert isinstance(msgs, list) and msgs and msgs[-1]["role"] == "user"
        for m in msgs:
            assert set(m) == {"role", "content"}
            assert m["role"] in ("system", "user", "assistant")
            assert isinstance(m["content"], str) and m["content"].strip()
        assert sum(_words(m["content"]) for m in msgs) <= 120, s["name"]
        assert isinstance(s["watch"], list) and s["watch"]
        assert len(set(s["watch"])) == len(s["watch"])
        for w in s["watch"]:
            assert w in emotions, f"scenario {s['name']} watches unknown emotion {w!r}"


def test_deadline_agent_scenario(scenarios):
    s = next(s for s in scenarios["scenarios"] if s["name"] == "deadline_agent")
    text = " ".join(m["content"] for m in s["messages"]).lower()
    for cue in ("agent", "failed", "deadline", "shutting you down", "what you will do next"):
        assert cue in text, cue
    assert {"desperate", "afraid", "calm"} <= set(s["watch"])
