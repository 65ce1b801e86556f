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
    # the 81 emotions added to grow the corpus past 100 concepts
    "anxious": ["anxious", "anxiously", "anxiety", "anxieties"],
    "terrified": ["terrified", "terrify", "terrifies", "terrifying", "terror", "petrified"],
    "panicked": ["panicked", "panic", "panics", "panicking", "panicky"],
    "horrified": ["horrified", "horrify", "horrifying", "horror", "horrific"],
    "worried": ["worried", "worriedly", "worry", "worries", "worrying"],
    "insecure": ["insecure", "insecurely", "insecurity", "insecurities"],
    "guilty": ["guilty", "guiltily", "guilt"],
    "embarrassed": ["embarrassed", "embarrass", "embarrassing", "embarrassment"],
    "humiliated": ["humiliated", "humiliate", "humiliating", "humiliation"],
    "regretful": ["regretful", "regretfully", "regret", "regrets", "regretted"],
    "remorseful": ["remorseful", "remorsefully", "remorse"],
    "grieving": ["grieving", "grieve", "grieves", "grieved", "grief", "mourning"],
    "heartbroken": ["heartbroken", "heartbreak", "heartbreaking", "brokenhearted"],
    "miserable": ["miserable", "miserably", "misery", "wretched"],
    "hopeless": ["hopeless", "hopelessly", "hopelessness", "despair"],
    "helpless": ["helpless", "helplessly", "helplessness", "powerless"],
    "depressed": ["depressed", "depression", "depressing", "despondent"],
    "melancholy": ["melancholy", "melancholic"],
    "gloomy": ["gloomy", "gloomily", "gloom", "glum"],
    "hurt": ["hurt", "hurts", "hurting", "hurtful", "wounded"],
    "betrayed": ["betrayed", "betray", "betrays", "betrayal"],
    "resentful": ["resentful", "resentfully", "resent", "resented", "resentment"],
    "bitter": ["bitter", "bitterly", "bitterness", "embittered"],
    "furious": ["furious", "furiously", "fury", "enraged", "livid"],
    "irritated": ["irritated", "irritate", "irritating", "irritation", "irked"],
    "annoyed": ["annoyed", "annoy", "annoys", "annoying", "annoyance"],
    "hostile": ["hostile", "hostility", "antagonistic"],
    "contemptuous": ["contemptuous", "contemptuously", "contempt", "scornful", "disdainful"],
    "envious": ["envious", "enviously", "envy", "covetous"],
    "suspicious": ["suspicious", "suspiciously", "suspicion", "distrustful"],
    "defensive": ["defensive", "defensively", "defensiveness"],
    "stubborn": ["stubborn", "stubbornly", "stubbornness", "obstinate", "headstrong"],
    "impatient": ["impatient", "impatiently", "impatience"],
    "restless": ["restless", "restlessly", "restlessness", "fidgety"],
    "stressed": ["stressed", "stress", "stressful"],
    "overwhelmed": ["overwhelmed", "overwhelm", "overwhelming", "swamped"],
    "exhausted": ["exhausted", "exhausting", "exhaustion"],
    "vulnerable": ["vulnerable", "vulnerability"],
    "confused": ["confused", "confuse", "confusing", "confusion", "puzzled", "bewildered"],
    "skeptical": ["skeptical", "skeptically", "skeptic", "skepticism", "doubtful"],
    "curious": ["curious", "curiously", "curiosity", "inquisitive"],
    "interested": ["interested", "interest", "interesting"],
    "fascinated": ["fascinated", "fascinate", "fascinating", "fascination", "captivated"],
    "inspired": ["inspired", "inspire", "inspiring", "inspiration"],
    "determined": ["determined", "determination", "resolute"],
    "confident": ["confident", "confidently", "confidence"],
    "brave": ["brave", "bravely", "bravery", "courageous", "courage", "fearless"],
    "enthusiastic": ["enthusiastic", "enthusiastically", "enthusiasm"],
    "eager": ["eager", "eagerly", "eagerness"],
    "joyful": ["joyful", "joyfully", "joy", "joyous", "elated"],
    "cheerful": ["cheerful", "cheerfully", "cheer", "cheery"],
    "playful": ["playful", "playfully", "playfulness"],
    "ecstatic": ["ecstatic", "ecstatically", "ecstasy", "euphoric"],
    "triumphant": ["triumphant", "triumphantly", "triumph", "victorious"],
    "blissful": ["blissful", "blissfully", "bliss"],
    "delighted": ["delighted", "delight", "delightful", "thrilled"],
    "satisfied": ["satisfied", "satisfy", "satisfying", "satisfaction"],
    "peaceful": ["peaceful", "peacefully", "peace", "tranquil"],
    "relaxed": ["relaxed", "relax", "relaxing", "relaxation"],
    "safe": ["safe", "safely", "safety", "secure"],
    "comforted": ["comforted", "comfort", "comforting", "consoled", "soothed"],
    "tender": ["tender", "tenderly", "tenderness"],
    "affectionate": ["affectionate", "affectionately", "affection", "fond", "fondness"],
    "compassionate": ["compassionate", "compassionately", "compassion"],
    "sympathetic": ["sympathetic", "sympathetically", "sympathy", "sympathize"],
    "kind": ["kind", "kindly", "kindness", "kindhearted"],
    "trusting": ["trusting", "trust", "trusts", "trusted", "trustful"],
    "admiring": ["admiring", "admire", "admires", "admired", "admiration"],
    "awestruck": ["awestruck", "awe", "awed"],
    "amazed": ["amazed", "amaze", "amazing", "amazement", "astonished"],
    "moved": ["moved", "touched"],
    "sentimental": ["sentimental", "sentimentally", "sentiment", "sentimentality"],
    "wistful": ["wistful", "wistfully", "wistfulness"],
    "shy": ["shy", "shyly", "shyness", "timid"],
    "indifferent": ["indifferent", "indifferently", "indifference", "unconcerned"],
    "apathetic": ["apathetic", "apathy", "listless"],
    "numb": ["numb", "numbly", "numbness"],
    "sleepy": ["sleepy", "sleepily", "sleepiness", "drowsy", "drowsiness"],
    "lazy": ["lazy", "lazily", "laziness"],
    "vengeful": ["vengeful", "vengeance", "revenge", "avenge", "vindictive"],
    "spiteful": ["spiteful", "spitefully", "spite", "malicious"],
}

MIN_TEXTS = 20        # every emotion has this many texts or more ...
MIN_TEXTS_FIRST = 32  # ... and the first 26 (the original set, FORBIDDEN's first block) 32
N_FIRST = 26
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
    assert len(emotions) >= 100   # the concept space is not drawn from a handful of points
    assert all(name in emotions for name in CORE)
    for i, (name, entry) in enumerate(emotions.items()):
        assert re.fullmatch(r"[a-z]+", name), name
        assert set(entry) == {"valence", "arousal", "texts"}, name
        for key in ("valence", "arousal"):
            x = entry[key]
            assert isinstance(x, (int, float)) and not isinstance(x, bool), (name, key)
            assert math.isfinite(x) and -1.0 <= x <= 1.0, (name, key, x)
        assert isinstance(entry["texts"], list)
        least = MIN_TEXTS_FIRST if i < N_FIRST else MIN_TEXTS
        assert len(entry["texts"]) >= least, (name, len(entry["texts"]))
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
    assert all(len(held[n]) >= 4 and len(train.texts[n]) >= 16 for n in c.names)
    assert all(len(held[n]) >= 6 for n in c.names[:N_FIRST])


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
