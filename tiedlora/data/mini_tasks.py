"""Miniature generated versions of the paper's five tasks: the embedded CPU default.

One small fixed *world* (24 made-up people, 12 cities, colours, animals and their
sounds, objects, places, days, and "Velan", a toy language with a word-by-word
dictionary to English) feeds two things:

    pretraining_corpus(n, seed)  plain sentences about the world: facts, stories,
                                 dialogues, arithmetic facts written with digits, a
                                 Velan glossary, Velan and English sentences, and
                                 quoted Velan/English pairs ('"..." is Velan for "..."').
                                 No task format marker ("Context:", "Answer:", "####",
                                 ...) and no task instance ever appears in it.
    TASKS[name].generator(n, seed) -> [{"input", "output"(, "choices", "label")}]

    task            paper analogue   metric     what the adapter has to learn
    mini_qa         SQuAD v1.1       squad      copy the span of the context that answers
    mini_sum        DialogSum        rouge      fill a one-sentence summary template
    mini_mc         HellaSwag        accuracy   copy the ending that fits the world/story
    mini_translate  IWSLT de->en     bleu       translate Velan word by word (the glossary
                                                is in the corpus, the format is not)
    mini_math       GSM8K            gsm8k      "x + y = z #### z" (arithmetic facts are
                                                in the corpus, the format is not)

Every example stays within ``MAX_CHARS = 190`` characters of input + output (at most
about 55 pieces of a 1000-piece SentencePiece vocabulary trained on the corpus). A base pretrained on the corpus knows
the words and facts but has never seen a task format, so it scores near 0 before
fine-tuning. Velan sentences are split between the corpus and the translation task by
the parity of their CRC-32, so no translation pair can leak into the corpus (English
determines Velan, so no English side can either).

``write_task(name, out_dir, n_train, n_val, n_test, seed)`` writes the three JSONL
splits atomically. Splits come from disjoint seeds (``3*seed + {0,1,2}``); the test
split is drawn first, validation excludes test inputs, train excludes both, so the
test set does not depend on ``n_train``.
"""
from __future__ import annotations

import os
import random
import zlib
from pathlib import Path
from typing import Callable, Collection, NamedTuple

from tiedlora.files import atomic_write_bytes, to_json

__all__ = [
    "PEOPLE", "CITIES", "COLOURS", "ANIMALS", "OBJECTS", "PLACES", "DAYS", "ITEMS",
    "VELAN", "WORLD", "FORMAT_MARKERS", "MAX_CHARS",
    "pretraining_corpus",
    "mini_qa", "mini_sum", "mini_mc", "mini_translate", "mini_math",
    "TaskSpec", "TASKS", "SPLITS", "write_task",
]

# ----------------------------------------------------------------------------- world

PEOPLE = (
    "Mara", "Tobin", "Lusa", "Pim", "Oren", "Kessa", "Dov", "Nila", "Rafe", "Juno", "Sela", "Bram",
    "Ilka", "Tamsin", "Ves", "Quill", "Asha", "Hollis", "Ember", "Koa", "Lio", "Wren", "Zeno", "Fenna",
)
CITIES = ("Tovin", "Marrow", "Eskel", "Brindle", "Olvo", "Pellan", "Quorra", "Sorvik", "Vantor", "Yeld",
          "Drumm", "Lisk")
COLOURS = ("red", "blue", "green", "yellow", "black", "white", "orange", "purple")
# animal -> the verb of its sound (third person singular)
ANIMALS = {
    "cat": "meows", "dog": "barks", "cow": "moos", "duck": "quacks", "sheep": "bleats",
    "horse": "neighs", "owl": "hoots", "frog": "croaks", "lion": "roars", "bee": "buzzes",
    "pig": "oinks", "snake": "hisses",
}
OBJECTS = ("book", "lamp", "cup", "hat", "kite", "drum", "ball", "key", "bell", "boat", "coat", "bag")
PLACES = ("market", "bakery", "school", "harbour", "library", "farm", "park", "mill")
DAYS = ("Monday", "Tuesday", "Wednesday", "Thursday", "Friday", "Saturday", "Sunday")
ITEMS = ("apples", "pears", "eggs", "shells", "coins", "marbles", "stamps", "buttons")

# Velan -> English is word for word, in the same order; names and cities stay as they are.
VELAN = {
    "the": "ka", "a": "e",
    "sees": "vela", "has": "toma", "likes": "ama", "finds": "trova", "wants": "desa",
    "carries": "porta", "follows": "sega", "paints": "pinta",
    "in": "su", "near": "pel", "with": "kon",
    "red": "rusa", "blue": "belo", "green": "vira", "yellow": "jalo", "black": "noka",
    "white": "bianu", "orange": "oranu", "purple": "purpa",
    "cat": "miro", "dog": "tuvo", "cow": "baska", "duck": "kwalo", "sheep": "lanu", "horse": "kavo",
    "owl": "hubo", "frog": "rano", "lion": "leku", "bee": "abi", "pig": "poro", "snake": "sibu",
    "book": "lipo", "lamp": "luma", "cup": "tasi", "hat": "kapo", "kite": "vento", "drum": "tamu",
    "ball": "bolo", "key": "klavi", "bell": "sonu", "boat": "navo", "coat": "mantu", "bag": "saku",
}
_VELAN_VERBS = ("sees", "has", "likes", "finds", "wants", "carries", "follows", "paints")
_NOUNS = tuple(ANIMALS) + OBJECTS

# Longest example (input + output characters) a generator returns: at most about 55 pieces of a
# 1000-piece SentencePiece vocabulary trained on the corpus.
MAX_CHARS = 190

# Task format markers: they appear in task inputs/templates and never in the corpus.
FORMAT_MARKERS = ("Context:", "Question:", "Answer:", "Dialogue:", "Summary:", "Story:", "Endings:",
                  "Velan:", "English:", "####")


class Person(NamedTuple):
    name: str
    city: str       # where they live
    place: str      # where they work
    pet: str        # their animal
    pet_colour: str
    colour: str     # favourite colour


def _build_world() -> dict[str, Person]:
    rng = random.Random("tiedlora-mini-world-v1")
    return {
        name: Person(name, rng.choice(CITIES), rng.choice(PLACES), rng.choice(tuple(ANIMALS)),
                     rng.choice(COLOURS), rng.choice(COLOURS))
        for name in PEOPLE
    }


WORLD: dict[str, Person] = _build_world()


def _cap(s: str) -> str:
    return s[:1].upper() + s[1:]


def _a(word: str) -> str:
    """``word`` with its indefinite article: "a red cat", "an orange cat"."""
    return ("an " if word[:1] in "aeiou" else "a ") + word


def _is_task_side(velan_sentence: str) -> bool:
    """Velan sentences with even CRC-32 belong to the translation task, odd to the corpus."""
    return zlib.crc32(velan_sentence.encode("utf-8")) % 2 == 0


def _velan_pair(rng: random.Random) -> tuple[str, str]:
    """A random English sentence of the toy grammar and its word-by-word Velan."""

    def noun_phrase() -> list[str]:
        words = [rng.choice(("the", "a"))]
        if rng.random() < 0.5:
            words.append(rng.choice(COLOURS))
        return words + [rng.choice(_NOUNS)]

    subject = [rng.choice(PEOPLE)] if rng.random() < 0.4 else noun_phrase()
    words = subject + [rng.choice(_VELAN_VERBS)] + noun_phrase()
    r = rng.random()
    if r < 0.3:
        words += ["in", rng.choice(CITIES)]
    elif r < 0.5:
        words += ["near"] + noun_phrase()
    elif r < 0.6:
        words += ["with", rng.choice(PEOPLE)]
    velan = _cap(" ".join(VELAN.get(w, w) for w in words)) + "."
    # English says "an" before a vowel; Velan's "e" covers both.
    words = ["an" if w == "a" and nxt[0] in "aeiou" else w for w, nxt in zip(words, words[1:] + ["."])]
    english = _cap(" ".join(words)) + "."
    return english, velan


# ----------------------------------------------------------------------------- corpus


def _corpus_line(rng: random.Random) -> str:
    kind = rng.choices(
        ("fact", "sound", "story", "dialogue", "number", "glossary", "velan", "english", "bilingual", "misc"),
        weights=(20, 8, 16, 16, 14, 8, 4, 4, 6, 8),
    )[0]
    p = WORLD[rng.choice(PEOPLE)]
    q = WORLD[rng.choice([n for n in PEOPLE if n != p.name])]
    c, o, pl, d = rng.choice(COLOURS), rng.choice(OBJECTS), rng.choice(PLACES), rng.choice(DAYS)
    a, it, n, h = rng.choice(tuple(ANIMALS)), rng.choice(ITEMS), rng.randint(2, 20), rng.randint(1, 12)
    if kind == "fact":
        return rng.choice((
            f"{p.name} lives in {p.city}.",
            f"{p.name} is from {p.city}.",
            f"{p.name} works at the {p.place}.",
            f"{p.name} has {_a(p.pet_colour)} {p.pet}.",
            f"{p.name}'s {p.pet} is {p.pet_colour}.",
            f"The favourite colour of {p.name} is {p.colour}.",
            f"{p.name} lives in {p.city} and works at the {p.place}.",
            f"In {p.city}, {p.name} walks the {p.pet_colour} {p.pet} every day.",
            f"{p.name} walks to the {p.place} every morning.",
            f"{p.name} took the train to {p.city} after work.",
        ))
    if kind == "sound":
        return rng.choice((
            f"The {a} {ANIMALS[a]}.",
            f"{_cap(_a(a))} {ANIMALS[a]} when it is hungry.",
            f"{p.name}'s {p.pet} {ANIMALS[p.pet]} at night.",
            f"Every {a} {ANIMALS[a]}; no {a} is quiet for long.",
            f"The {a} next door {ANIMALS[a]} all night, so {p.name} woke up early.",
            f"When {p.name} came home, the {p.pet} {ANIMALS[p.pet]} loudly.",
        ))
    if kind == "story":
        return rng.choice((
            f"{p.name} went to the {pl} on {d}. There {p.name} found {_a(c)} {o}.",
            f"{p.name} lost {_a(c)} {o} in {p.city}. {q.name} saw it at the {pl}.",
            f"On {d}, {q.name} will bring the {c} {o} to the {pl}.",
            f"{p.name} bought {n} {it} at the {pl} and gave them to {q.name}.",
            f"{p.name} and {q.name} met at the {pl} on {d}. They talked about the {c} {o}.",
            f"{p.name} and {q.name} meet at the {pl} every {d}.",
            f"{p.name} put the {c} {o} in a box. Later, {q.name} opened the box.",
            f"After work at the {p.place}, {p.name} went home to {p.city}.",
            f"{p.name} told a story about {_a(c)} {a} that lived near the {pl}.",
            # facts stated, then used again: reading back from the context
            f"{p.name} met {q.name} at the {pl}. {q.name} gave {p.name} {_a(c)} {o}, and {p.name} took the {c} {o} home.",
            f"{p.name} has {n} {it} and {q.name} has none. {p.name} keeps the {n} {it} in {_a(c)} {o}.",
            f"{_cap(_a(c))} {a} lives near the {pl}. Every {d}, the {c} {a} {ANIMALS[a]} at the {pl}.",
        ))
    if kind == "dialogue":
        return rng.choice((
            f"{p.name}: Hello {q.name}, how are you? {q.name}: I am fine, thanks!",
            f"{p.name}: Hi {q.name}! Where do you live? {q.name}: I live in {q.city}.",
            f"{p.name}: Where do you work? {q.name}: At the {q.place}. {p.name}: Great.",
            f"{p.name}: Is your {q.pet} well? {q.name}: Yes, it {ANIMALS[q.pet]} all day.",
            f"{p.name}: What is your favourite colour? {q.name}: It is {q.colour}.",
            f"{p.name}: Can you help me on {d}? {q.name}: Sure, no problem.",
            f"{p.name}: Shall we go to the {pl}? {q.name}: Of course. See you at {h} o'clock.",
            f"{p.name}: I saw your {q.pet} at the {pl}. {q.name}: Thanks!",
            f"{p.name}: What did you buy? {q.name}: I bought {_a(c)} {o}. {p.name}: Nice.",
            f"{p.name}: Will you come? {q.name}: Yes, I will.",
            f"{p.name}: How many {it} do you have? {q.name}: I have {n}.",
            f"{p.name}: Where does {q.name} live? Someone: In {q.city}.",
            f"{p.name}: Who works at the {q.place}? Someone: {q.name} does.",
            f"{p.name}: What animal does {q.name} have? Someone: {_cap(_a(q.pet_colour))} {q.pet}.",
            f"{p.name}: What colour is your {q.pet}? {q.name}: My {q.pet} is {q.pet_colour}.",
        ))
    if kind == "number":
        x, y = rng.randint(1, 20), rng.randint(1, 20)
        hi, lo = max(x, y), min(x, y)
        u, v = rng.randint(2, 9), rng.randint(2, 9)
        return rng.choice((
            f"{x} plus {y} is {x + y}.",
            f"{hi} minus {lo} is {hi - lo}.",
            f"{u} times {v} is {u * v}.",
            f"{p.name} wrote {x} + {y} = {x + y} and {u} * {v} = {u * v} on the board.",
            f"{q.name} wrote {hi} - {lo} = {hi - lo} on the board.",
            f"{p.name} has {x} {it}.",
            f"{p.name} buys {y} more {it} and gives {x} {it} to {q.name}.",
            f"Each bag has {u} {it} in it, and {p.name} has {v} bags.",
            f"{p.name} gave away {lo} {it}; now {p.name} has {hi} {it} left.",
            f"{p.name} sleeps in room #{x} of the inn in {p.city}.",
            f"The {pl} opens at {rng.randint(6, 11)} and closes at {rng.randint(4, 9)}.",
        ))
    if kind == "glossary":
        w = rng.choice(tuple(VELAN))
        return rng.choice((
            f"In Velan, {VELAN[w]} means {w}.",
            f"The Velan word for {w} is {VELAN[w]}.",
            f"People in {p.city} say {VELAN[w]} for {w}.",
            f"{VELAN[w]} is Velan; in English it is {w}.",
        ))
    if kind == "misc":
        return rng.choice((
            f"{p.name} asked a question and {q.name} gave the answer.",
            f"{p.name} wrote a short summary of the story.",
            f"{p.name} speaks Velan and English.",
            f"The story had two endings, and {p.name} liked the second one.",
            f"{p.name} and {q.name} wrote a dialogue for the school play.",
            f"In this context, {p.name} meant the {c} {o}.",
            f"Answer me, {q.name}, said {p.name}.",
            f"Question after question, {p.name} learned Velan.",
            f"Story time at the {pl} starts at {h} o'clock.",
            f"Summary writing is hard, said {p.name}.",
            f"Dialogue helps {p.name} learn English.",
            f"English and Velan are spoken in {p.city}.",
            f"Endings of sad stories make {p.name} cry.",
            f"Context helps {p.name} read the story.",
        ))
    while True:  # Velan and/or English, from the corpus side of the split only
        english, velan = _velan_pair(rng)
        if not _is_task_side(velan):
            if kind == "bilingual":
                return f'"{velan}" is Velan for "{english}"'
            return velan if kind == "velan" else english


def pretraining_corpus(num_sentences: int, seed: int = 0) -> list[str]:
    """``num_sentences`` lines (each 1-3 short sentences) of plain text about the world."""
    rng = random.Random(f"corpus:{seed}")
    return [_corpus_line(rng) for _ in range(num_sentences)]


# ----------------------------------------------------------------------------- tasks


def _unique(make: Callable[[random.Random], dict], name: str, n: int, seed: int,
            exclude: Collection[str] = ()) -> list[dict]:
    """``n`` records from ``make``, unique by input and disjoint from ``exclude``."""
    rng = random.Random(f"{name}:{seed}")
    seen, out = set(exclude), []
    for _ in range(100 * n + 100):
        if len(out) == n:
            return out
        rec = make(rng)
        if len(rec["input"]) + len(rec["output"]) > MAX_CHARS:
            continue
        if rec["input"] not in seen:
            seen.add(rec["input"])
            out.append(rec)
    if len(out) == n:
        return out
    raise ValueError(f"{name}: could not draw {n} distinct examples (got {len(out)})")


def _qa_example(rng: random.Random) -> dict:
    people = rng.sample(PEOPLE, rng.randint(2, 3))
    cities, places = rng.sample(CITIES, 3), rng.sample(PLACES, 3)
    animals, items = rng.sample(tuple(ANIMALS), 3), rng.sample(ITEMS, 3)
    facts, qas = [], []
    for i, p in enumerate(people):
        kind = rng.choice(("city", "place", "pet", "count"))
        if kind == "city":
            facts.append(f"{p} lives in {cities[i]}.")
            qas += [(f"Where does {p} live?", cities[i]), (f"Who lives in {cities[i]}?", p)]
        elif kind == "place":
            facts.append(f"{p} works at the {places[i]}.")
            qas += [(f"Where does {p} work?", f"the {places[i]}"), (f"Who works at the {places[i]}?", p)]
        elif kind == "pet":
            c = rng.choice(COLOURS)
            facts.append(f"{p} has {_a(c)} {animals[i]}.")
            qas += [(f"What colour is {p}'s {animals[i]}?", c), (f"What animal does {p} have?", animals[i])]
        else:
            k = rng.randint(2, 20)
            facts.append(f"{p} has {k} {items[i]}.")
            qas.append((f"How many {items[i]} does {p} have?", str(k)))
    question, answer = rng.choice(qas)
    return {"input": f"Context: {' '.join(facts)} Question: {question}", "output": answer}


def _sum_example(rng: random.Random) -> dict:
    a, b = rng.sample(PEOPLE, 2)
    c, o, pl, d = rng.choice(COLOURS), rng.choice(OBJECTS), rng.choice(PLACES), rng.choice(DAYS)
    kind = rng.choice(("bring", "meet", "lost", "buy"))
    if kind == "bring":
        turns = [(a, f"Can you bring my {c} {o} to the {pl} on {d}?"),
                 (b, rng.choice(("Yes, I will.", "Sure, no problem.", "Of course.")))]
        summary = f"{b} will bring {a}'s {c} {o} to the {pl} on {d}."
    elif kind == "meet":
        h = rng.randint(1, 12)
        turns = [(a, f"Shall we meet at the {pl} on {d}?"), (b, f"Yes, at {h}.")]
        summary = f"{a} and {b} will meet at the {pl} on {d} at {h}."
    elif kind == "lost":
        turns = [(a, f"I lost my {c} {o} in {rng.choice(CITIES)}."), (b, f"I saw it at the {pl}.")]
        summary = f"{a} lost {_a(c)} {o} and {b} saw it at the {pl}."
    else:
        n, it = rng.randint(2, 20), rng.choice(ITEMS)
        turns = [(a, f"How many {it} did you buy?"), (b, f"I bought {n} at the {pl}.")]
        summary = f"{b} bought {n} {it} at the {pl}."
    shape = rng.randrange(3)  # 2, 3 or 4 turns
    if shape >= 1:
        turns.insert(0, (b, f"Hi {a}!") if shape == 2 else (a, f"Hi {b}!"))
    if shape == 2:
        turns.append((a, rng.choice(("Thanks!", "Great.", "See you."))))
    dialogue = " ".join(f"{s}: {t}" for s, t in turns)
    return {"input": f"Dialogue: {dialogue}", "output": summary}


def _mc_example(rng: random.Random) -> dict:
    p = WORLD[rng.choice(PEOPLE)]
    kind = rng.choice(("sound", "home", "work", "box"))
    if kind == "sound":
        a = rng.choice(tuple(ANIMALS))
        context = f"{p.name} woke up because the {a} next door"
        right = f"{ANIMALS[a]} loudly"
        wrong = [f"{ANIMALS[x]} loudly" for x in rng.sample([x for x in ANIMALS if x != a], 3)]
    elif kind == "home":
        context = f"After work, {p.name} took the train home to"
        right = p.city
        wrong = rng.sample([c for c in CITIES if c != p.city], 3)
    elif kind == "work":
        context = f"Every morning, {p.name} walks to work at the"
        right = p.place
        wrong = rng.sample([x for x in PLACES if x != p.place], 3)
    else:
        c, o = rng.choice(COLOURS), rng.choice(OBJECTS)
        context = f"{p.name} put {_a(c)} {o} in the box. Later {p.name} opened the box and found"
        right = f"{_a(c)} {o}"
        c2 = rng.choice([x for x in COLOURS if x != c])
        o2 = rng.choice([x for x in OBJECTS if x != o])
        wrong = [f"{_a(c2)} {o}", f"{_a(c)} {o2}", f"{_a(c2)} {o2}"]
    label = rng.randrange(4)
    rng.shuffle(wrong)
    choices = wrong[:label] + [right] + wrong[label:]
    return {"input": f"Story: {context} ... Endings: {'; '.join(choices)}",
            "output": right, "choices": choices, "label": label}


def _translate_example(rng: random.Random) -> dict:
    while True:
        english, velan = _velan_pair(rng)
        if _is_task_side(velan):
            return {"input": f"Velan: {velan}", "output": english}


def _math_example(rng: random.Random) -> dict:
    p, q = rng.sample(PEOPLE, 2)
    it = rng.choice(ITEMS)
    kind = rng.choice(("add", "sub", "mul", "two_step"))
    if kind == "add":
        x, y = rng.randint(1, 20), rng.randint(1, 20)
        question = f"{p} has {x} {it}. {q} gives {p} {y} more. How many {it} does {p} have now?"
        work, answer = f"{x} + {y} = {x + y}", x + y
    elif kind == "sub":
        x = rng.randint(2, 20)
        y = rng.randint(1, x - 1)
        question = f"{p} has {x} {it} and gives {y} to {q}. How many {it} does {p} have left?"
        work, answer = f"{x} - {y} = {x - y}", x - y
    elif kind == "mul":
        x, y = rng.randint(2, 9), rng.randint(2, 9)
        question = f"{p} has {x} bags with {y} {it} in each bag. How many {it} does {p} have?"
        work, answer = f"{x} * {y} = {x * y}", x * y
    else:
        x, y = rng.randint(1, 9), rng.randint(1, 9)
        z = rng.randint(1, x + y - 1)
        question = f"{p} has {x} {it}, buys {y} more and gives {z} to {q}. How many are left?"
        work, answer = f"{x} + {y} = {x + y}. {x + y} - {z} = {x + y - z}", x + y - z
    return {"input": question, "output": f"{work} #### {answer}"}


def mini_qa(n: int, seed: int, exclude: Collection[str] = ()) -> list[dict]:
    """Extractive QA: 2-3 random facts and a question answered by a span of them."""
    return _unique(_qa_example, "mini_qa", n, seed, exclude)


def mini_sum(n: int, seed: int, exclude: Collection[str] = ()) -> list[dict]:
    """Dialogue summarisation: a 2-4 turn dialogue -> a one-sentence templated summary."""
    return _unique(_sum_example, "mini_sum", n, seed, exclude)


def mini_mc(n: int, seed: int, exclude: Collection[str] = ()) -> list[dict]:
    """Multiple choice: a story start and 4 endings; the right one fits the world
    (animal sounds, where people live and work) or the story itself."""
    return _unique(_mc_example, "mini_mc", n, seed, exclude)


def mini_translate(n: int, seed: int, exclude: Collection[str] = ()) -> list[dict]:
    """Velan -> English, word by word."""
    return _unique(_translate_example, "mini_translate", n, seed, exclude)


def mini_math(n: int, seed: int, exclude: Collection[str] = ()) -> list[dict]:
    """One- or two-step arithmetic word problems; output ``"<work> #### <number>"``."""
    return _unique(_math_example, "mini_math", n, seed, exclude)


class TaskSpec(NamedTuple):
    generator: Callable[..., list[dict]]
    metric: str            # a name of tiedlora.metrics.compute_metrics
    template: str          # default prompt template
    max_new_tokens: int    # generation budget; with the 1000-piece corpus vocabulary the longest
                           # gold answers (+EOS) take 5 / 16 / 6 / 14 / 28 tokens


TASKS: dict[str, TaskSpec] = {
    "mini_qa": TaskSpec(mini_qa, "squad", "{input} Answer: {output}", 8),
    "mini_sum": TaskSpec(mini_sum, "rouge", "{input} Summary: {output}", 24),
    "mini_mc": TaskSpec(mini_mc, "accuracy", "{input} Answer: {output}", 10),
    "mini_translate": TaskSpec(mini_translate, "bleu", "{input} English: {output}", 24),
    "mini_math": TaskSpec(mini_math, "gsm8k", "{input} Answer: {output}", 36),
}

SPLITS = ("train", "validation", "test")


def _write_jsonl_atomic(path: Path, records: list[dict]) -> None:
    atomic_write_bytes(path, "".join(to_json(r, ensure_ascii=False) + "\n" for r in records).encode("utf-8"))


def write_task(name: str, out_dir: str | os.PathLike, n_train: int = 2000, n_val: int = 200,
               n_test: int = 200, seed: int = 0) -> dict[str, Path]:
    """Write ``train.jsonl``, ``validation.jsonl`` and ``test.jsonl`` of task ``name`` into
    ``out_dir``; returns ``{split: path}``. Same arguments -> byte-identical files."""
    if name not in TASKS:
        raise ValueError(f"unknown mini task {name!r}; expected one of {sorted(TASKS)}")
    for arg, v in (("n_train", n_train), ("n_val", n_val), ("n_test", n_test)):
        if v < 1:
            raise ValueError(f"{arg}={v} must be at least 1")
    gen = TASKS[name].generator
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    test = gen(n_test, 3 * seed + 2)
    val = gen(n_val, 3 * seed + 1, exclude={r["input"] for r in test})
    train = gen(n_train, 3 * seed, exclude={r["input"] for r in test + val})
    paths = {}
    for split, recs in zip(SPLITS, (train, val, test)):
        paths[split] = out / f"{split}.jsonl"
        _write_jsonl_atomic(paths[split], recs)
    return paths
