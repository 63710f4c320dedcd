"""BABILong-style qa1..qa5: bAbI-like facts scattered through a long haystack (our own generator).

- qa1 single supporting fact: "Mary went to the kitchen." -- Where is Mary?
- qa2 two supporting facts: "John picked up the apple. John went to the garden." -- Where is the apple?
- qa3 three supporting facts (temporal): Where was the apple before the garden?
- qa4 two-argument relations: "The office is north of the kitchen." -- What is north of the kitchen?
- qa5 three-argument relations: "Mary gave the milk to Fred." -- Who gave the milk to Fred?

Facts keep their order and are inserted at sorted random depths.  Every sample carries its ``facts`` and
``question``; :func:`oracle` answers from the prompt text alone by replaying the facts it finds there.
"""

from __future__ import annotations

import random
import re

PEOPLE = ("Mary", "John", "Daniel", "Sandra", "Fred", "Bill", "Jeff", "Julie")
LOCATIONS = ("bathroom", "hallway", "kitchen", "garden", "office", "bedroom")
OBJECTS = ("football", "apple", "milk")
MOVES = ("went to", "moved to", "journeyed to", "travelled to")
DIRECTIONS = {"north": "south", "south": "north", "east": "west", "west": "east"}
TASKS = ("qa1", "qa2", "qa3", "qa4", "qa5")

INSTRUCTION = (
    "I will give you context with the facts about positions of objects and people hidden in some random "
    "text and a question. You need to answer the question based only on the information from the facts.\n\n"
)

_MOVE_RE = re.compile(r"\b(" + "|".join(PEOPLE) + r") (?:" + "|".join(MOVES) + r") the (\w+)\.")
_TAKE_RE = re.compile(r"\b(" + "|".join(PEOPLE) + r") (?:picked up|grabbed|got) the (\w+)\.")
_DROP_RE = re.compile(r"\b(" + "|".join(PEOPLE) + r") (?:dropped|put down|discarded) the (\w+)\.")
_GIVE_RE = re.compile(r"\b(" + "|".join(PEOPLE) + r") (?:gave|handed|passed) the (\w+) to (\w+)\.")
_REL_RE = re.compile(r"\bThe (\w+) is (north|south|east|west) of the (\w+)\.")


def _world_events(rng: random.Random, n: int, objects: bool) -> list[str]:
    """A consistent story of ``n`` moves / pick-ups / drops among four people."""
    people = rng.sample(PEOPLE, 4)
    where: dict[str, str] = {}
    holder: dict[str, str | None] = {o: None for o in OBJECTS}
    facts = []
    while len(facts) < n:
        p = rng.choice(people)
        r = rng.random()
        held = [o for o, h in holder.items() if h == p]
        free = [o for o, h in holder.items() if h is None]
        if objects and p in where and free and r < 0.3:
            o = rng.choice(free)
            holder[o] = p
            facts.append(f"{p} {rng.choice(('picked up', 'grabbed', 'got'))} the {o}.")
        elif objects and held and r < 0.4:
            o = rng.choice(held)
            holder[o] = None
            facts.append(f"{p} {rng.choice(('dropped', 'put down', 'discarded'))} the {o}.")
        else:
            loc = rng.choice([x for x in LOCATIONS if x != where.get(p)])
            where[p] = loc
            facts.append(f"{p} {rng.choice(MOVES)} the {loc}.")
    return facts


def replay(text: str) -> dict:
    """Replay the facts found in ``text`` in order: people's places, objects' places and histories."""
    where: dict[str, str] = {}
    holder: dict[str, str | None] = {}
    obj_at: dict[str, str] = {}
    history: dict[str, list[str]] = {}
    gives: list[tuple[str, str, str]] = []
    relations: list[tuple[str, str, str]] = []
    events = []
    for rx, kind in (
        (_MOVE_RE, "move"),
        (_TAKE_RE, "take"),
        (_DROP_RE, "drop"),
        (_GIVE_RE, "give"),
        (_REL_RE, "rel"),
    ):
        events += [(m.start(), kind, m.groups()) for m in rx.finditer(text)]
    for _, kind, g in sorted(events):
        if kind == "move":
            where[g[0]] = g[1]
            for o, h in holder.items():
                if h == g[0]:
                    obj_at[o] = g[1]
                    if not history[o] or history[o][-1] != g[1]:
                        history[o].append(g[1])
        elif kind == "take":
            holder[g[1]] = g[0]
            history.setdefault(g[1], [])
            if g[0] in where:
                obj_at[g[1]] = where[g[0]]
                if not history[g[1]] or history[g[1]][-1] != where[g[0]]:
                    history[g[1]].append(where[g[0]])
        elif kind == "drop":
            holder[g[1]] = None
        elif kind == "give":
            gives.append(g)
        else:
            relations.append(g)
    return {"where": where, "obj_at": obj_at, "history": history, "gives": gives, "relations": relations}


def _answer(question: str, state: dict) -> str | None:
    if m := re.fullmatch(r"Where is (?:the )?(\w+)\?", question):
        x = m.group(1)
        return state["where"].get(x) if x in PEOPLE else state["obj_at"].get(x)
    if m := re.fullmatch(r"Where was the (\w+) before the (\w+)\?", question):
        h = state["history"].get(m.group(1), [])
        idx = [i for i, loc in enumerate(h) if loc == m.group(2) and i > 0]
        return h[idx[-1] - 1] if idx else None
    if m := re.fullmatch(r"What is (\w+) of the (\w+)\?", question):
        hits = [a for a, d, b in state["relations"] if d == m.group(1) and b == m.group(2)]
        hits += [b for a, d, b in state["relations"] if DIRECTIONS[d] == m.group(1) and a == m.group(2)]
        return hits[-1] if hits else None
    if m := re.fullmatch(r"What is the (\w+) (\w+) of\?", question):
        hits = [b for a, d, b in state["relations"] if d == m.group(2) and a == m.group(1)]
        hits += [a for a, d, b in state["relations"] if DIRECTIONS[d] == m.group(2) and b == m.group(1)]
        return hits[-1] if hits else None
    if m := re.fullmatch(r"Who gave the (\w+) to (\w+)\?", question):
        hits = [g for g, o, r in state["gives"] if o == m.group(1) and r == m.group(2)]
        return hits[-1] if hits else None
    if m := re.fullmatch(r"Who did (\w+) give the (\w+) to\?", question):
        hits = [r for g, o, r in state["gives"] if g == m.group(1) and o == m.group(2)]
        return hits[-1] if hits else None
    if m := re.fullmatch(r"What did (\w+) give to (\w+)\?", question):
        hits = [o for g, o, r in state["gives"] if g == m.group(1) and r == m.group(2)]
        return hits[-1] if hits else None
    raise ValueError(f"unknown question form {question!r}")


def facts_and_question(task: str, rng: random.Random) -> tuple[list[str], str, str, tuple[str, ...]]:
    """(facts, question, answer, labels) of one sample; the answer is checked by replaying the facts."""
    for _ in range(1000):
        if task == "qa1":
            facts = _world_events(rng, rng.randint(4, 8), objects=False)
            state = replay(" ".join(facts))
            question = f"Where is {rng.choice(sorted(state['where']))}?"
            labels = LOCATIONS
        elif task in ("qa2", "qa3"):
            facts = _world_events(rng, rng.randint(8, 14), objects=True)
            state = replay(" ".join(facts))
            if task == "qa2":
                known = sorted(state["obj_at"])
                if not known:
                    continue
                question = f"Where is the {rng.choice(known)}?"
            else:
                cands = [(o, h[i]) for o, h in state["history"].items() for i in range(1, len(h))]
                if not cands:
                    continue
                o, loc = rng.choice(sorted(cands))
                question = f"Where was the {o} before the {loc}?"
            labels = LOCATIONS
        elif task == "qa4":
            center, a, b = rng.sample(LOCATIONS, 3)
            d = rng.choice(sorted(DIRECTIONS))
            facts = [f"The {a} is {d} of the {center}.", f"The {b} is {DIRECTIONS[d]} of the {center}."]
            rng.shuffle(facts)
            question = rng.choice([f"What is {d} of the {center}?", f"What is the {center} {d} of?"])
            labels = LOCATIONS
        elif task == "qa5":
            people = rng.sample(PEOPLE, 4)
            facts = []
            for _ in range(rng.randint(3, 6)):
                g, r = rng.sample(people, 2)
                if rng.random() < 0.3:
                    facts.append(f"{g} {rng.choice(MOVES)} the {rng.choice(LOCATIONS)}.")
                facts.append(f"{g} {rng.choice(('gave', 'handed', 'passed'))} the {rng.choice(OBJECTS)} to {r}.")
            g, o, r = replay(" ".join(facts))["gives"][-1]
            question = rng.choice(
                [f"Who gave the {o} to {r}?", f"Who did {g} give the {o} to?", f"What did {g} give to {r}?"]
            )
            labels = PEOPLE + OBJECTS
        else:
            raise ValueError(f"unknown BABILong task {task!r}; choose one of {', '.join(TASKS)}")
        answer = _answer(question, replay(" ".join(facts)))
        if answer is not None and _unambiguous(question, facts, answer):
            return facts, question, answer, labels
    raise RuntimeError(f"could not generate a {task} sample")


def _unambiguous(question: str, facts: list[str], answer: str) -> bool:
    """qa5 questions must have one answer over all give events (not just the last)."""
    if not question.startswith(("Who gave", "Who did", "What did")):
        return True
    state = replay(" ".join(facts))
    answers = set()
    for g, o, r in state["gives"]:
        single = {"gives": [(g, o, r)]}
        got = _answer(question, single)
        if got is not None:
            answers.add(got)
    return answers == {answer}


def prompt_parts(context: str, question: str) -> str:
    return f"{INSTRUCTION}<context>\n{context}\n</context>\n\nQuestion: {question}\nAnswer with a single word."


def oracle(sample: dict) -> str:
    """The answer, derived from the prompt text alone (the facts found in it, replayed in order)."""
    text = sample["input"]
    context = text[text.index("<context>") : text.index("</context>")]
    question = re.search(r"Question: (.*)\n", text).group(1)
    return _answer(question, replay(context)) or ""
