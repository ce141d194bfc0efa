"""Generated tasks with an exact-match answer, for the demo, `peftkit compare` and `peftkit sweep`.

Each task draws (question, answer) pairs from a seeded `random.Random`, so every run writes the
same files. Rows are chat rows (`{"messages": [user, assistant]}`, one of `peftkit train`'s
formats); the test split is drawn from another seed and keeps only questions absent from the
train split, so exact match on it measures generalization, not recall.

    peftkit task --list
    peftkit task arithmetic --out data/arithmetic      # train.jsonl, test.jsonl
"""

from __future__ import annotations

import calendar
import datetime
import json
import os
import random
from dataclasses import dataclass
from typing import Callable

from .checkpoint import atomic_write_text

MONTHS = list(calendar.month_name)[1:]


@dataclass(frozen=True)
class Task:
    name: str
    description: str
    example: Callable[[random.Random], tuple[str, str]]  # rng -> (question, answer)
    max_new_tokens: int  # enough for every answer, with room for a wrong longer one


def _ledger(rng: random.Random) -> tuple[str, str]:
    day = datetime.date(1950, 1, 1) + datetime.timedelta(days=rng.randrange(365 * 100))
    written = f"{MONTHS[day.month - 1]} {day.day}, {day.year}"
    return f"Ledger code for {written}?", f"{day.year}.{day.month:02d}.{day.day:02d}"


FIRST = ["Maria", "Ken", "Aisha", "Tomas", "Lena", "Omar", "Yuki", "Pavel", "Nia", "Diego",
         "Sofia", "Arjun", "Chloe", "Ivan", "Zara", "Felix", "Mei", "Hugo", "Amara", "Leo"]
LAST = ["Lopez", "Sato", "Okafor", "Novak", "Berg", "Haddad", "Tanaka", "Ivanov", "Mensah",
        "Rossi", "Keller", "Singh", "Dubois", "Costa", "Nilsen", "Park", "Moreau", "Adeyemi"]
CITIES = ["Lyon", "Osaka", "Lagos", "Porto", "Quito", "Bergen", "Austin", "Krakow", "Dakar",
          "Leeds", "Hanoi", "Perth", "Cusco", "Graz", "Izmir", "Malmo", "Tampa", "Turin"]
JOBS = ["nurse", "welder", "pilot", "teacher", "chef", "baker", "architect", "plumber",
        "editor", "farmer", "lawyer", "dentist", "painter", "librarian", "mechanic", "tailor"]
SENTENCES = [
    "{name}, {age}, works as {a_job} in {city}.",
    "Meet {name} from {city}: {a_age}-year-old {job}.",
    "In {city}, the {job} {name} just turned {age}.",
    "{name} ({age}) has been {a_job} in {city} for years.",
    "The new {job} in {city} is {name}, aged {age}.",
]


def _article(word: str) -> str:
    return f"an {word}" if word[0] in "aeiou8" or word in ("11", "18") else f"a {word}"


def _extract(rng: random.Random) -> tuple[str, str]:
    person = {"name": f"{rng.choice(FIRST)} {rng.choice(LAST)}", "age": rng.randint(19, 79),
              "city": rng.choice(CITIES), "job": rng.choice(JOBS)}
    text = rng.choice(SENTENCES).format(**person, a_job=_article(person["job"]),
                                        a_age=_article(str(person["age"])))
    return (f"Extract name, age, city and job as JSON: {text}",
            json.dumps(person, separators=(", ", ": ")))


WORDS = ["data", "user", "report", "cache", "queue", "token", "index", "batch", "model", "file",
         "price", "order", "event", "image", "list", "total", "max", "min", "raw", "new", "old",
         "next", "last", "open", "final", "daily", "unique", "error", "count", "time"]


def _snake(rng: random.Random) -> tuple[str, str]:
    words = rng.sample(WORDS, rng.randint(2, 4))
    shown = [rng.choice((str.lower, str.upper, str.capitalize))(w) for w in words]
    return (f"Convert to snake_case: {rng.choice((' ', '-')).join(shown)}",
            "_".join(words))


PEOPLE = ["Ana", "Ben", "Chen", "Dara", "Eli", "Fatima", "Gus", "Hana", "Ravi", "Sara"]
ITEMS = ["apples", "stamps", "marbles", "books", "coins", "shells", "cards", "pencils"]


def _arithmetic(rng: random.Random) -> tuple[str, str]:
    a, b = rng.sample(PEOPLE, 2)
    item = rng.choice(ITEMS)
    start, gain = rng.randint(10, 60), rng.randint(2, 40)
    loss = rng.randint(1, start + gain - 1)
    if rng.random() < 0.5:
        story = (f"{a} has {start} {item}. {a} buys {gain} more, then gives {loss} to {b}. "
                 f"How many {item} does {a} have now?")
    else:
        story = (f"{a} had {start} {item}. {b} gave {a} {gain} more, and {a} then lost "
                 f"{loss}. How many {item} does {a} have left?")
    return story, str(start + gain - loss)


def _shifts(rng: random.Random) -> tuple[str, str]:
    """Two durations summed with a carry from minutes to hours half the time: harder than the
    one-step tasks for a small model (zero-shot ~0: it answers in words, not h:mm)."""
    a, b = (rng.randint(0, 9) * 60 + rng.randint(0, 59) for _ in range(2))
    total = a + b
    return (f"Shift log: {a // 60}:{a % 60:02d} then {b // 60}:{b % 60:02d}. Total?",
            f"{total // 60}:{total % 60:02d}")


TASKS: dict[str, Task] = {t.name: t for t in (
    Task("ledger", 'a written date to a "ledger code": March 5, 2021 -> 2021.03.05', _ledger, 16),
    Task("extract-json", "a sentence about a person to a JSON record (structured extraction)",
         _extract, 40),
    Task("snake-case", "a phrase in mixed case to snake_case (string transformation)",
         _snake, 24),
    Task("arithmetic", "a two-step word problem to its number (arithmetic)", _arithmetic, 8),
    Task("shifts", "two h:mm durations to their sum, carrying minutes into hours: 1:45 then "
         "2:30 -> 4:15 (harder: methods separate within a short budget)", _shifts, 8),
)}


def chat_row(question: str, answer: str) -> dict:
    return {"messages": [{"role": "user", "content": question},
                         {"role": "assistant", "content": answer}]}


def examples(name: str, n: int, seed: int,
             exclude: set[str] = frozenset()) -> list[tuple[str, str]]:
    """`n` distinct (question, answer) pairs of task `name` from `seed`, none in `exclude`."""
    task = get(name)
    rng, seen, out = random.Random(f"{name}:{seed}"), set(exclude), []
    for _ in range(100 * n):
        if len(out) == n:
            return out
        question, answer = task.example(rng)
        if question not in seen:
            seen.add(question)
            out.append((question, answer))
    raise ValueError(f"task {name!r} cannot make {n} distinct rows; ask for fewer")


def get(name: str) -> Task:
    if name not in TASKS:
        raise ValueError(f"unknown task {name!r}; choose one of {', '.join(TASKS)} "
                         "(or give your own data files)")
    return TASKS[name]


def write(name: str, out_dir: str, n_train: int = 400, n_test: int = 100,
          seed: int = 0) -> tuple[str, str]:
    """Write `out_dir/train.jsonl` and `out_dir/test.jsonl` (atomically); return their paths."""
    train = examples(name, n_train, seed)
    test = examples(name, n_test, seed + 1, exclude={q for q, _ in train})
    os.makedirs(out_dir, exist_ok=True)
    paths = []
    for split, pairs in (("train", train), ("test", test)):
        path = os.path.join(out_dir, f"{split}.jsonl")
        atomic_write_text(path, "".join(json.dumps(chat_row(q, a)) + "\n" for q, a in pairs))
        paths.append(path)
    return paths[0], paths[1]
