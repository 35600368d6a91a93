"""A deterministic chat workload for the throughput benchmark: varied, real-ish English.

`make_records(n, seed)` returns n validated chat records (teacher_cache.records.parse_record),
built from the word lists below by a small sentence grammar: a user turn (an instruction, a
question, or a passage to work on, sometimes after a system message) and an assistant answer of
a few hundred words, so a few hundred tokens each under any BPE tokenizer. Same n and seed, same
records, byte for byte. Imports only the standard library and teacher_cache.records.
"""

from __future__ import annotations

import random

from teacher_cache.records import Record, parse_record


def _words(text: str) -> list[str]:
    return text.split()


NOUNS = _words("""
river mountain city village market teacher student engineer farmer doctor nurse painter
garden forest library museum school hospital bridge road harbour island valley desert
machine engine computer network signal battery circuit sensor motor pump valve turbine
history language music poetry theory method experiment result model system process pattern
winter summer autumn spring morning evening night season weather storm cloud rain wind
coffee bread cheese apple orange tomato potato rice soup kitchen table window door roof
company budget contract meeting customer product service price market report strategy
planet star galaxy telescope orbit satellite rocket mission crew station signal journey
child parent friend neighbour stranger family community government council court law
question answer problem solution idea argument example detail reason effect cause change
""")

ADJECTIVES = _words("""
quiet busy ancient modern small large narrow wide bright dark warm cold gentle rough
careful careless simple complex useful strange familiar rare common early late quick slow
honest clever patient nervous curious famous local foreign public private
important difficult easy expensive cheap heavy light fresh dry wet green blue golden
practical theoretical detailed general accurate reliable efficient fragile stable
""")

VERBS = _words("""
builds explains describes measures changes improves protects follows crosses repairs
studies watches supports carries collects compares connects creates delivers discovers
examines finds gathers guides holds imagines includes keeps leads moves opens organises
prepares produces reduces remembers returns reveals shapes shares solves teaches tests
""")

ADVERBS = _words("""
slowly quickly carefully quietly often rarely usually always sometimes suddenly gradually
clearly simply mostly nearly barely gently firmly openly
""")

PREPOSITIONS = _words("near across behind beside under over through along around beyond within")

CONNECTORS = [
    "However,",
    "In practice,",
    "For example,",
    "As a result,",
    "At the same time,",
    "On the other hand,",
    "In most cases,",
    "Over the years,",
    "First,",
    "Finally,",
    "Because of this,",
    "In short,",
]

NAMES = _words("Ada Bruno Chen Dara Elif Farid Greta Hugo Ines Jonas Kemal Lena Mateo Nadia Omar Priya")

INSTRUCTIONS = [
    "Explain how a {adj} {noun} can {verb} the {noun2}, step by step.",
    "Write a short story about a {adj} {noun} and a {noun2}.",
    "Summarise the following passage in plain words.",
    "What are the main differences between a {noun} and a {noun2}?",
    "Give me practical advice: how should a {noun} {verb} a {adj} {noun2}?",
    "Describe a day in the life of {name}, who has to {verb} every {noun}.",
    "Why does the {noun} matter for the {noun2}? Answer with examples.",
    "Rewrite the text below so that a child can follow it.",
]

SYSTEMS = [
    "You are a patient assistant. Answer clearly and completely.",
    "You are a helpful expert who writes in short, precise paragraphs.",
    "Answer as a friendly teacher would, with one example per idea.",
]


def _base_form(verb: str) -> str:
    """'carries' -> 'carry', 'teaches' -> 'teach', 'builds' -> 'build'."""
    if verb.endswith("ies"):
        return verb[:-3] + "y"
    if verb.endswith(("ches", "shes", "sses", "xes")):
        return verb[:-2]
    return verb[:-1]


def _sentence(rng: random.Random) -> str:
    """One sentence, 8 to 30 words, from a handful of shapes."""
    n, n2, n3 = rng.choice(NOUNS), rng.choice(NOUNS), rng.choice(NOUNS)
    a, a2 = rng.choice(ADJECTIVES), rng.choice(ADJECTIVES)
    v, v2 = rng.choice(VERBS), rng.choice(VERBS)
    adv, prep, name = rng.choice(ADVERBS), rng.choice(PREPOSITIONS), rng.choice(NAMES)
    shapes = [
        f"the {a} {n} {v} the {n2} {prep} the {n3}",
        f"{name} {adv} {v} a {a} {n} and {v2} the {a2} {n2}",
        f"every {n} {v} its own {n2}, which {v2} the {a} {n3} {adv}",
        f"a {a} {n} {prep} the {n2} {v} more than {rng.randint(2, 90)} {n3}s",
        f"when the {n} {v} the {n2}, the {a} {n3} {adv} {v2} too",
        f"the {n} that {name} {v} is {a}, but the {n2} is {a2}",
        f"in {rng.randint(1850, 2024)} the {a} {n} {v} the {n2} for the first time",
    ]
    s = rng.choice(shapes)
    if rng.random() < 0.3:
        s = f"{rng.choice(CONNECTORS)} {s}"
    return s[0].upper() + s[1:] + "."


def _paragraph(rng: random.Random, words: int) -> str:
    out: list[str] = []
    count = 0
    while count < words:
        s = _sentence(rng)
        out.append(s)
        count += len(s.split())
    return " ".join(out)


def _text(rng: random.Random, words: int) -> str:
    """Paragraphs (sometimes a short list) adding up to about `words` words."""
    parts = []
    left = words
    while left > 0:
        n = min(left, rng.randint(40, 120))
        if rng.random() < 0.15:
            items = [_sentence(rng) for _ in range(rng.randint(3, 5))]
            parts.append("\n".join(f"{i + 1}. {s}" for i, s in enumerate(items)))
            n = sum(len(s.split()) for s in items)
        else:
            parts.append(_paragraph(rng, n))
        left -= n
    return "\n\n".join(parts)


def _instruction(rng: random.Random) -> str:
    return rng.choice(INSTRUCTIONS).format(
        adj=rng.choice(ADJECTIVES),
        noun=rng.choice(NOUNS),
        noun2=rng.choice(NOUNS),
        verb=_base_form(rng.choice(VERBS)),
        name=rng.choice(NAMES),
    )


def make_records(n: int, seed: int = 0, prompt_words: tuple[int, int] = (20, 220),
                 response_words: tuple[int, int] = (120, 360)) -> list[Record]:  # fmt: skip
    """n chat records: [system?] user (instruction [+ passage]) -> assistant, some two-turn."""
    rng = random.Random(seed)
    records = []
    for i in range(n):
        messages = []
        if rng.random() < 0.25:
            messages.append({"role": "system", "content": rng.choice(SYSTEMS)})
        turns = 2 if rng.random() < 0.2 else 1
        for t in range(turns):
            lo, hi = prompt_words if t == 0 else (10, 60)
            words = rng.randint(lo, hi)
            ask = _instruction(rng)
            user = ask if words < 40 else f"{ask}\n\n{_text(rng, words)}"
            wlo, whi = response_words if turns == 1 else (response_words[0] // 2, response_words[1] // 2)
            messages.append({"role": "user", "content": user})
            messages.append({"role": "assistant", "content": _text(rng, rng.randint(wlo, whi))})
        records.append(parse_record({"id": f"bench-{seed}-{i:05d}", "messages": messages}, f"workload:{i + 1}"))
    return records
