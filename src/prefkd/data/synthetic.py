"""The embedded instruction suite: deterministic, self-contained, in the PLaD protocol.

A generated world of fictional people, each with facts a model can only know by memorising them, plus
skill tasks solvable from the prompt alone. The people are split by shard:

- D0: labelled shard. The student is fine-tuned on it (references included).
- D:  distillation shard. Its references train the *teacher* and score the test, never the student; the
      student only sees D's prompts (and whatever the teacher answers to them).

So the teacher knows facts the student lacks, and distillation has something to transfer (see findings.md:
when both learn from the same labelled data, no method helps).

Test and validation prompts are never seen in training: world questions use a phrasing held out for that
(person, attribute) pair, profiles use the profile format not trained for that person, skill items are fresh.
"""

from __future__ import annotations

import random
from dataclasses import dataclass, field

from prefkd.config import opt
from prefkd.data.records import Instruction

OCCUPATIONS = ["potter", "baker", "glassblower", "beekeeper", "cartographer", "weaver", "blacksmith",
               "astronomer", "gardener", "tailor", "carpenter", "fisher", "shepherd", "librarian", "brewer",
               "clockmaker", "painter", "sculptor", "miller", "jeweller", "mason", "chemist", "sailor",
               "courier", "archivist", "violinist", "cook", "herbalist", "bookbinder", "surveyor"]
CITY_PARTS = (["vel", "mor", "ka", "tor", "lin", "bri", "sa", "dun", "ev", "ost", "mar", "quel", "fen", "gal"],
              ["mora", "heim", "ford", "dale", "wick", "port", "mere", "holt", "stead", "bury", "gate", "crest"])
ANIMALS = ["ferret", "parrot", "tortoise", "goat", "hedgehog", "rabbit", "owl", "cat", "dog", "donkey", "lizard",
           "goose", "pony", "hamster", "canary", "iguana", "llama", "peacock", "raven", "salamander"]
COLOURS = ["teal", "crimson", "amber", "violet", "olive", "indigo", "scarlet", "ochre", "turquoise", "silver",
           "maroon", "lilac", "emerald", "coral", "beige", "cobalt"]
HOBBIES = ["playing the harp", "climbing hills", "painting birds", "baking bread", "collecting stamps",
           "carving wood", "knitting scarves", "reading poetry", "growing tomatoes", "flying kites",
           "playing chess", "sailing boats", "writing letters", "singing hymns", "fishing for trout",
           "making candles", "riding horses", "building model ships", "studying the stars", "dancing reels"]
FRUITS = ["apple", "pear", "plum", "cherry", "mango", "lemon", "fig", "peach", "melon", "apricot", "grape",
          "kiwi", "lime", "papaya", "quince", "banana"]
INSTRUMENTS = ["harp", "flute", "drum", "lute", "cello", "trumpet", "oboe", "violin", "banjo", "piano",
               "clarinet", "accordion", "mandolin", "bagpipe", "tuba"]
NAME_PARTS = (["za", "kor", "mi", "lu", "ve", "tha", "bro", "sel", "ar", "pim", "dra", "ol", "ny", "fa", "gre",
               "is", "ho", "qua", "ru", "te", "wen", "ya", "el", "bax"],
              ["van", "ra", "lin", "dor", "ssa", "mir", "tek", "nor", "la", "bin", "mo", "rik", "ta", "len"],
              ["", "", "", "a", "o", "en", "is", "ut"])
SURNAMES = (["kel", "mar", "ost", "bren", "tal", "vor", "dun", "hal", "pry", "sor", "wil", "gam", "fin", "rhu"],
            ["wick", "by", "ton", "ley", "more", "ridge", "stone", "field", "brook", "worth", "land", "shaw"])
TRAITS = ["kind", "patient", "cheerful", "stubborn", "curious", "quiet", "generous", "careful", "bold", "witty"]
POSITIVE = ["delicious", "wonderful", "friendly", "superb", "charming", "delightful", "excellent", "lovely"]
NEGATIVE = ["awful", "stale", "rude", "dreadful", "bland", "terrible", "grim", "disappointing"]
LIST_NAMES = {"animals": ANIMALS, "colours": COLOURS, "fruits": FRUITS, "musical instruments": INSTRUMENTS,
              "occupations": OCCUPATIONS}
NUMBER_WORDS = ["two", "three", "four", "five"]

# (attribute, question phrasings, answer template): every phrasing appears in training for some people.
WORLD_QUESTIONS = [
    ("occupation", ["What is the occupation of {name}?", "What does {name} do for a living?",
                    "Which trade does {name} work in?"], "{occupation}."),
    ("city", ["Where does {name} live?", "In which town is {name}'s home?", "Name the town where {name} lives."],
     "{city}."),
    ("pet", ["What pet does {name} keep?", "Which animal lives with {name}?", "What is the name of the animal "
             "that {name} owns?"], "{pet}."),
    ("colour", ["What is the favourite colour of {name}?", "Which colour does {name} like best?",
                "Tell me {name}'s favourite colour."], "{colour}."),
    ("hobby", ["What is {name}'s hobby?", "How does {name} spend free time?", "What does {name} enjoy doing?"],
     "{hobby}."),
]
PROFILE_FORMATS = {
    "short": "Write a short profile of {name}.",
    "long": "Write a detailed biography of {name}.",
}
KINDS = ("D", "D0", "skill")


def _a(word: str) -> str:
    return ("an " if word[0] in "aeiou" else "a ") + word


@dataclass(frozen=True)
class Person:
    name: str
    first: str
    occupation: str
    city: str
    pet: str
    colour: str
    hobby: str
    trait: str
    pronoun: str

    def facts(self) -> dict[str, str]:
        # Answers are the bare fact, so a wrong fact scores near zero rather than sharing the question's words.
        return {"occupation": self.occupation.capitalize(), "city": self.city, "pet": self.pet.capitalize(),
                "colour": self.colour.capitalize(), "hobby": self.hobby.capitalize()}


@dataclass
class SuiteConfig:
    """Sizes of the embedded suite. Defaults are the demo's."""

    seed: int = opt(0, "seed of the generated world and items")
    n_people: int = opt(120, "fictional people; half in D0, half in D")
    skill_per_family: int = opt(40, "skill items per family in each training shard")
    test_world_questions: int = opt(40, "held-out world questions per shard (D, D0) in the test split")
    test_profiles: int = opt(15, "held-out profiles per shard in the test split")
    test_skill: int = opt(63, "fresh skill items in the test split, spread over the families")
    val_world_questions: int = opt(20, "as test_world_questions, for the validation split")
    val_profiles: int = opt(5, "as test_profiles, for the validation split")
    val_skill: int = opt(28, "as test_skill, for the validation split")
    corpus_skill_per_family: int = opt(60, "extra skill documents per family in the LM-loss corpus")
    # The large splits: the test (validation) split plus items drawn after everything else, so D, D0, the corpus
    # and the 173-prompt test split are the same records whatever these sizes are (and the data key ignores them).
    large_test_world_questions: int = opt(90, "held-out world questions per shard added to the test split in "
                                              "test_large (as many as remain)")
    large_test_profiles: int = opt(30, "held-out profiles per shard added in test_large (as many as remain)")
    large_test_skill_per_family: int = opt(22, "fresh skill items per family added in test_large")
    large_test_summaries: int = opt(40, "further fresh summaries added in test_large (long-form items)")
    large_val_world_questions: int = opt(60, "as large_test_world_questions, for validation_large")
    large_val_profiles: int = opt(10, "as large_test_profiles, for validation_large")
    large_val_skill_per_family: int = opt(14, "as large_test_skill_per_family, for validation_large")


LARGE_FIELDS = ("large_test_world_questions", "large_test_profiles", "large_test_skill_per_family",
                "large_test_summaries", "large_val_world_questions", "large_val_profiles", "large_val_skill_per_family")


@dataclass
class Suite:
    d0: list[Instruction]  # labelled: SFT data of the student (and the teacher)
    d: list[Instruction]  # distillation shard: prompts for the student, references for the teacher only
    validation: list[Instruction]
    test: list[Instruction]
    corpus: list[str]  # plain-text documents in the same format, for the LM-loss term
    people: list[Person] = field(repr=False, default_factory=list)
    test_large: list[Instruction] = field(repr=False, default_factory=list)  # test + further unseen items
    validation_large: list[Instruction] = field(repr=False, default_factory=list)


def _names(rng: random.Random, n: int) -> list[tuple[str, str]]:
    seen, out = set(), []
    while len(out) < n:
        first = (rng.choice(NAME_PARTS[0]) + rng.choice(NAME_PARTS[1]) + rng.choice(NAME_PARTS[2])).capitalize()
        last = (rng.choice(SURNAMES[0]) + rng.choice(SURNAMES[1])).capitalize()
        if first not in seen:  # unique first names: a person is never confused by a shared first name
            seen.add(first)
            out.append((first, f"{first} {last}"))
    return out


def make_people(rng: random.Random, n: int) -> list[Person]:
    cities = sorted({(rng.choice(CITY_PARTS[0]) + rng.choice(CITY_PARTS[1])).capitalize() for _ in range(200)})
    return [Person(name, first, rng.choice(OCCUPATIONS), rng.choice(cities), rng.choice(ANIMALS),
                   rng.choice(COLOURS), rng.choice(HOBBIES), rng.choice(TRAITS), rng.choice(["She", "He"]))
            for first, name in _names(rng, n)]


def profile(p: Person, fmt: str) -> str:
    """Short profiles run 30-70 words, detailed biographies over 70: the paper's length buckets."""
    pos = "Her" if p.pronoun == "She" else "His"
    text = (f"{p.name} is {_a(p.trait)} {p.occupation} who lives in {p.city}. {p.pronoun} shares a small house "
            f"with {_a(p.pet)}, and {pos.lower()} favourite colour is {p.colour}. In the evenings {p.first} "
            f"enjoys {p.hobby}.")
    if fmt == "long":
        text += (f" People in {p.city} know {p.first} as a {p.trait} neighbour who never misses the spring fair. "
                 f"As {_a(p.occupation)}, {p.first} starts work early and takes pride in doing the job well. "
                 f"{pos} {p.pet} follows {p.first} around town, and friends say that {p.first} could talk about "
                 f"{p.hobby} for hours. Anything painted {p.colour} reminds {p.first} of home.")
    return text


def _skill(rng: random.Random, family: str, people: list[Person]) -> tuple[str, str, str]:
    """One skill item (instruction, input, response): solvable from the prompt, no memorised facts."""
    fresh = rng.choice(people)  # strangers: facts come with the passage, never from memory
    if family == "closed_qa":
        attr, questions, answer = rng.choice(WORLD_QUESTIONS)
        passage = profile(fresh, "short")
        return f"Answer using the passage. {rng.choice(questions).format(name=fresh.name)}", passage, \
            answer.format(**fresh.facts())
    if family == "classification":
        label = rng.choice(["positive", "negative"])
        adj = rng.sample(POSITIVE if label == "positive" else NEGATIVE, 2)
        review = (f"The {rng.choice(FRUITS)} pie at the inn in {fresh.city} was {adj[0]}, and the "
                  f"{rng.choice(OCCUPATIONS)} who served it was {adj[1]}.")
        return "Classify the sentiment of this review as positive or negative.", review, label.capitalize() + "."
    if family == "information_extraction":
        a, b = rng.sample(people, 2)
        n = rng.randint(2, 9)
        fruit, animal = rng.choice(FRUITS), rng.choice(ANIMALS)
        text = (f"At the market in {a.city}, {a.name} bought {n} {fruit}s while {b.name} sold {_a(animal)} "
                f"to a {rng.choice(OCCUPATIONS)}.")
        return "Extract the names of the people mentioned in the text.", text, f"{a.name}, {b.name}"
    if family == "summarization":
        f, c, o = rng.choice(FRUITS), rng.choice(COLOURS), rng.choice(OCCUPATIONS)
        i = rng.choice(INSTRUMENTS)
        text = (f"In the morning, {fresh.first} walked to {fresh.city} under a grey sky. After a long lunch, "
                f"{fresh.first} met {_a(o)} near the old bridge. Later that day, {fresh.first} bought a {c} {f} "
                f"from a stall. In the evening, {fresh.first} played the {i} for the neighbours.")
        return ("Summarise the passage in one sentence.", text,
                f"{fresh.first} visited {fresh.city}, met {_a(o)}, bought a {c} {f} and played the {i}.")
    if family == "brainstorming":
        k = rng.randint(2, 5)
        name, words = rng.choice(list(LIST_NAMES.items()))
        items = rng.sample(words, k)
        return (f"List {NUMBER_WORDS[k - 2]} {name} that a {rng.choice(OCCUPATIONS)} in {fresh.city} might like.",
                "", "\n".join(f"{j + 1}. {w}" for j, w in enumerate(items)))
    if family == "arithmetic":
        a, b = rng.randint(10, 99), rng.randint(1, 9)
        return f"What is {a} plus {b}?", "", f"{a} plus {b} is {a + b}."
    if family == "string_transform":
        words = rng.sample(FRUITS + ANIMALS + COLOURS, rng.randint(3, 5))
        return ("Reverse the order of these words.", " ".join(words), " ".join(reversed(words)))
    raise ValueError(family)


SKILL_FAMILIES = ("closed_qa", "classification", "information_extraction", "summarization", "brainstorming",
                  "arithmetic", "string_transform")


def build_suite(cfg: SuiteConfig | None = None) -> Suite:
    """Build the whole suite from `cfg.seed`; the same config always gives the same records."""
    cfg = cfg or SuiteConfig()
    rng = random.Random(cfg.seed)
    people = make_people(rng, cfg.n_people + 200)
    world, strangers = people[: cfg.n_people], people[cfg.n_people:]
    shard_of = {p.name: ("D0" if i % 2 == 0 else "D") for i, p in enumerate(world)}
    train: dict[str, list[Instruction]] = {"D0": [], "D": []}
    held_out: dict[str, list[Instruction]] = {"D0": [], "D": []}  # unseen prompts about world facts
    held_profiles: dict[str, list[Instruction]] = {"D0": [], "D": []}
    for p in world:
        shard, facts = shard_of[p.name], p.facts()
        for attr, questions, answer in WORLD_QUESTIONS:
            order = rng.sample(range(len(questions)), len(questions))
            ref = answer.format(**facts)
            for j, q in enumerate(order):
                rec = Instruction(questions[q].format(name=p.name), "", (ref,), "world_qa", shard,
                                  f"{p.name}/{attr}/{q}")
                (held_out[shard] if j == 0 else train[shard]).append(rec)
        fmts = rng.sample(sorted(PROFILE_FORMATS), 2)
        for j, fmt in enumerate(fmts):
            rec = Instruction(PROFILE_FORMATS[fmt].format(name=p.name), "", (profile(p, fmt),), "profile", shard,
                              f"{p.name}/profile/{fmt}")
            (train[shard] if j == 0 else held_profiles[shard]).append(rec)

    seen: set[str] = set()

    def skills(n: int, tag: str, families: tuple[str, ...] = SKILL_FAMILIES) -> list[Instruction]:
        """`n` items of every family whose prompts are new to the suite."""
        out = []
        for fam in families:
            for i in range(n):
                for _ in range(1000):
                    instr, inp, resp = _skill(rng, fam, strangers)
                    rec = Instruction(instr, inp, (resp,), fam, "skill", f"{tag}/{fam}/{i}")
                    if rec.prompt not in seen:
                        break
                else:
                    raise RuntimeError(f"could not draw a new {fam} prompt; lower the suite sizes")
                seen.add(rec.prompt)
                out.append(rec)
        return out

    d0 = train["D0"] + skills(cfg.skill_per_family, "d0")
    d = train["D"] + skills(cfg.skill_per_family, "d")
    test, val = [], []
    for shard in ("D", "D0"):
        qs, ps = held_out[shard], held_profiles[shard]
        rng.shuffle(qs)
        rng.shuffle(ps)
        test += qs[: cfg.test_world_questions] + ps[: cfg.test_profiles]
        val += (qs[cfg.test_world_questions: cfg.test_world_questions + cfg.val_world_questions]
                + ps[cfg.test_profiles: cfg.test_profiles + cfg.val_profiles])
    test += skills(cfg.test_skill // len(SKILL_FAMILIES), "test")
    val += skills(cfg.val_skill // len(SKILL_FAMILIES), "val")
    corpus = [r.prompt + r.references[0] for r in d0 + skills(cfg.corpus_skill_per_family, "corpus")]
    rng.shuffle(d0)
    rng.shuffle(d)
    # Drawn last, from what the splits above left, so that every record above stays what it was.
    test_large, val_large = list(test), list(val)
    q0, p0 = cfg.test_world_questions + cfg.val_world_questions, cfg.test_profiles + cfg.val_profiles
    for shard in ("D", "D0"):
        qs, ps = held_out[shard][q0:], held_profiles[shard][p0:]
        nq, np_ = cfg.large_test_world_questions, cfg.large_test_profiles
        test_large += qs[:nq] + ps[:np_]
        val_large += qs[nq: nq + cfg.large_val_world_questions] + ps[np_: np_ + cfg.large_val_profiles]
    test_large += skills(cfg.large_test_skill_per_family, "test_large")
    test_large += skills(cfg.large_test_summaries, "test_large_summaries", ("summarization",))
    val_large += skills(cfg.large_val_skill_per_family, "validation_large")
    return Suite(d0=d0, d=d, validation=val, test=test, corpus=corpus, people=world, test_large=test_large,
                 validation_large=val_large)
