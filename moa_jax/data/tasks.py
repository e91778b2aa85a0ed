"""The domain registry of the embedded 10-task dataset: reasoning-gym generators, answer extraction, scoring.

Each domain is one reasoning-gym (Apache-2.0) procedural generator with a fixed, deliberately small configuration
and a fixed seed, so the data is a pure function of this file and the pinned `reasoning_gym==0.1.25`. An example
is a dict `{domain, prompt, answer, metadata}`; `metadata` is the reasoning-gym entry metadata as a JSON string,
so `score(domain, prediction, example)` can call the generator's own verifier (`score_answer`) at any later time.

Why these ten. Measured with `scripts/measure_domains.py` (SmolLM2-135M-Instruct Q4_1 GGUF loaded by
transformers+torch, f32, greedy, 32 new tokens, 2 threads, system prompt `TASK_SYSTEM_PROMPT`; the prediction is the
first non-empty line of the completion, stripped, see `extract_answer`). base = untuned model on the first test
items (n=100 for chain_sum, n=50 for the others); exact = verifier score
1.0, score = mean verifier score (partial credit); MCA = share of the most common answer in the 200-item default
test split; train-MCA = accuracy on that test split of always answering the default train split's most common
answer; tokens = prompt + answer + eos with SmolLM2's chat template and our system prompt, on the 200 test items.

  domain                  kind                        base exact/score  MCA   train-MCA  tokens mean/max
  chain_sum               arithmetic                  0.00 / 0.00      0.04  0.01        44 / 49
  leg_counting            word problem (recall + sum) 0.00 / 0.00      0.15  0.15        66 / 71
  word_sequence_reversal  list manipulation           0.00 / 0.01      0.01  0.00        75 / 88
  family_relationships    relational reasoning        0.00 / 0.00      0.29  0.29        58 / 67
  letter_counting         counting                    0.00 / 0.01      0.51  0.51        47 / 58
  word_sorting            sorting (lowercase words)   0.00 / 0.02      0.01  0.00       115 / 125
  calendar_arithmetic     dates (weekday +-<=7 days)  0.00 / 0.00      0.17  0.14        60 / 71
  syllogism               logic (Yes/No)              0.42 / 0.42      0.51  0.49        64 / 67
  number_filtering        comparison / filtering      0.00 / 0.00      0.01  0.00        69 / 83
  spell_backward          character-level strings     0.00 / 0.06      0.01  0.00        40 / 42

The untuned model answers in sentences ("The final answer ... is 84."), hence ~0 exact match everywhere except
the Yes/No domain. Single-domain LoRA evidence (PyTorch+PEFT, r=16 on all projections, lr 5e-4, batch 8, 100
steps): word_sequence_reversal 0 -> 0.78, chain_sum (this config) 0 -> 0.28,
family_relationships 0 -> 0.30 (ours: chain_sum the same config; the other two with fewer words / people than
the generator defaults, so no harder). The other seven have no single-domain LoRA measurement.
Configuration choices made from the numbers: syllogism uses invalid_ratio=0.5 (the default 0.3 makes "Yes" the
answer 70% of the time); letter_counting uses 4-8 words (MCA 0.51; the default 5-15 words gives 0.42 at ~15 more
tokens); word_sorting is lowercase (plain alphabetical order) with 3-4 words, the longest domain (max 125).

Selection rules: ten different kinds of skill; every generator configured small (few terms, few digits, short
lists) so prompt+answer stays under ~128 tokens; an answer the verifier can check exactly; >= 2,400 distinct
prompts per domain; excluded: full-range arithmetic, gsm_symbolic, base_conversion, count_bits (known unlearnable
at 135M), caesar_cipher (plaintexts come from a small word list: only 120 of 300 prompts were distinct at 2-3
words), products of 1-digit numbers (100 distinct prompts), number_sorting (its fixed instruction alone is ~170
tokens), gcd (MCA 0.35 on "1").

Shape glossary: N examples per domain and split.
"""
from __future__ import annotations

import json
from dataclasses import dataclass, field
from typing import Any, Iterator, Mapping

import reasoning_gym

from moa_jax.errors import UserError

# Short system message used with the embedded tasks: it replaces SmolLM2's ~17-token default system prompt
# ("You are a helpful AI assistant named SmolLM, trained by Hugging Face") and asks for the bare answer format
# the verifiers expect.
TASK_SYSTEM_PROMPT = "Reply with only the final answer."


class DataError(UserError, ValueError):
    """Bad input data or a bad data request; the message names the file/line, domain or field."""


@dataclass(frozen=True)
class Domain:
    """One domain: a reasoning-gym generator with a fixed configuration and seed."""
    name: str                    # domain label (the expert it trains)
    generator: str               # reasoning-gym dataset name
    kind: str                    # what skill it exercises (documentation)
    seed: int                    # reasoning-gym item i is drawn from Random(seed + i)
    options: Mapping[str, Any] = field(default_factory=dict)  # generator config overrides
    family: str = ""             # a group of similar domains (reports give routing accuracy per family)

    def dataset(self, size: int):
        """The reasoning-gym dataset object (lazy: items are generated on indexing)."""
        return reasoning_gym.create_dataset(self.generator, size=size, seed=self.seed, **_resolve(self.options))


def _resolve(options: Mapping[str, Any]) -> dict:
    """Registry options are plain values; convert the ones reasoning-gym wants as enums."""
    out = dict(options)
    if "transformation" in out:
        from reasoning_gym.algorithmic.word_sorting import TextTransformation
        out["transformation"] = TextTransformation(out["transformation"])
    return out


DOMAINS: tuple[Domain, ...] = (
    Domain("chain_sum", "chain_sum", "arithmetic", 101,
           dict(min_terms=2, max_terms=3, min_digits=1, max_digits=2), family="arithmetic"),
    Domain("leg_counting", "leg_counting", "word problem (recall + arithmetic)", 102,
           dict(min_animals=1, max_animals=2, min_instances=1, max_instances=3), family="arithmetic"),
    Domain("word_sequence_reversal", "word_sequence_reversal", "list manipulation", 103,
           dict(min_words=3, max_words=5), family="lists and sorting"),
    Domain("family_relationships", "family_relationships", "relational reasoning", 104,
           dict(min_family_size=3, max_family_size=4), family="logic"),
    Domain("letter_counting", "letter_counting", "counting", 105,
           dict(min_words=4, max_words=8), family="strings"),
    Domain("word_sorting", "word_sorting", "sorting", 106,
           dict(min_words=3, max_words=4, min_word_length=3, max_word_length=7, transformation="lowercase"),
           family="lists and sorting"),
    Domain("calendar_arithmetic", "calendar_arithmetic", "dates (weekday offsets)", 107,
           dict(tasks=["weekday_offset"], offset_upper_bound=7), family="dates and times"),
    Domain("syllogism", "syllogism", "logic (Yes/No, balanced)", 108,
           dict(invalid_ratio=0.5), family="logic"),
    Domain("number_filtering", "number_filtering", "comparison / filtering", 109,
           dict(min_numbers=3, max_numbers=5, min_decimals=0, max_decimals=0), family="lists and sorting"),
    Domain("spell_backward", "spell_backward", "character-level string manipulation", 110,
           dict(min_word_len=3, max_word_len=5), family="strings"),
)
DOMAIN_NAMES: tuple[str, ...] = tuple(d.name for d in DOMAINS)

# The wide registry (builder config `wide`, preset moa_52task): the ten above and 42 more reasoning-gym generators in
# families of similar tasks, each configured small. Checked with reasoning_gym 0.1.25 (these options, 300 draws of
# seed 7, SmolLM2's chat template and TASK_SYSTEM_PROMPT): every generator's verifier gives its reference answer full
# marks; prompt + answer is at most 232 tokens (number_sorting: its fixed instruction is long), most under 160; every
# domain yields the 200 distinct prompts the `wide` config takes (160/20/20) within generate()'s draws. Left out:
# string_insertion, spiral_matrix, string_manipulation (over 240 tokens), tower_of_hanoi, string_splitting (too few
# distinct prompts), propositional_logic, graph_color (the verifier refuses the reference answer), number_sequence,
# puzzle24, quantum_lock (slow generators: 0.2-0.35 s an item).
_WIDE = (   # name, kind, family, options; seeds 111, 112, ... in this order
    ("decimal_chain_sum", "decimal sums", "arithmetic",
     dict(min_terms=2, max_terms=3, min_digits=1, max_digits=2, min_decimal_places=1, max_decimal_places=2)),
    ("basic_arithmetic", "+ - * / with parentheses", "arithmetic",
     dict(min_terms=2, max_terms=3, min_digits=1, max_digits=2)),
    ("decimal_arithmetic", "decimal + - * /", "arithmetic",
     dict(min_terms=2, max_terms=3, min_num_decimal_places=1, max_num_decimal_places=2)),
    ("complex_arithmetic", "complex numbers", "arithmetic",
     dict(min_real=-5, max_real=5, min_imag=-5, max_imag=5, operations=("+", "-", "*"),
          operations_weights=(0.4, 0.4, 0.2))),
    ("products", "products of two numbers", "arithmetic", dict(min_terms=2, max_terms=2, min_digits=1, max_digits=2)),
    ("bitwise_arithmetic", "shifts and bitwise ops", "arithmetic", dict(difficulty=1)),
    ("power_function", "powers", "arithmetic", dict(min_base=-10.0, max_base=10.0, min_exponent=0, max_exponent=3)),
    ("simple_equations", "one linear equation", "arithmetic",
     dict(min_terms=2, max_terms=3, min_value=1, max_value=20)),
    ("gcd", "greatest common divisor", "number theory", dict(min_value=1, max_value=100)),
    ("lcm", "least common multiple", "number theory", dict(min_value=1, max_value=30)),
    ("prime_factorization", "prime factors", "number theory", dict(min_value=2, max_value=300)),
    ("count_primes", "primes in a range", "number theory", dict(min_n=1, max_n=300)),
    ("fraction_simplification", "lowest terms", "number theory",
     dict(min_value=1, max_value=100, min_factor=2, max_factor=10, styles=("plain",))),
    ("base_conversion", "number bases", "number theory", dict(min_base=2, max_base=16, min_value=0, max_value=255)),
    ("count_bits", "1 bits of a number", "number theory", dict(min_n=1, max_n=4095)),
    ("number_sorting", "sorting numbers", "lists and sorting",
     dict(min_numbers=3, max_numbers=5, min_decimals=0, max_decimals=0, min_value=-50.0, max_value=50.0)),
    ("sentence_reordering", "unscramble a sentence", "lists and sorting",
     dict(min_words_in_sentence=3, max_words_in_sentence=8)),
    ("group_anagrams", "group anagrams", "lists and sorting",
     dict(min_anagram_groups=2, max_anagram_groups=3, min_words_per_group=2, max_words_per_group=3)),
    ("number_format", "largest / smallest of formatted numbers", "lists and sorting",
     dict(min_num_candidates=2, max_num_candidates=3, min_n=1000, max_n=100000)),
    ("letter_jumble", "unscramble words", "strings", dict(min_word_len=3, max_word_len=8, min_words=3, max_words=5)),
    ("caesar_cipher", "decrypt a Caesar cipher", "strings", dict(min_words=3, max_words=5)),
    ("isomorphic_strings", "isomorphic strings (True/False)", "strings",
     dict(min_string_length=2, max_string_length=6)),
    ("ransom_note", "ransom note (True/False)", "strings",
     dict(min_note_length=1, max_note_length=5, min_magazine_length=2, max_magazine_length=12)),
    ("palindrome_generation", "make a palindrome", "strings", dict(min_length=3, max_length=6)),
    ("binary_alternation", "swaps to alternate a binary string", "strings", dict(min_n=4, max_n=10)),
    ("word_ladder", "word ladder", "strings", {}),
    ("knights_knaves", "knights and knaves", "logic", {}),
    ("aiw", "Alice in Wonderland relations", "logic", dict(max_entities=4)),
    ("dice", "dice probabilities", "probability", dict(num_dice=3, max_dice_size=10)),
    ("coin_flip", "coin-flip probabilities", "probability", dict(min_trials=3, max_trials=20)),
    ("time_intervals", "durations between times and dates", "dates and times", {}),
    ("simple_geometry", "missing polygon angle", "geometry", {}),
    ("advanced_geometry", "triangle centres and angles", "geometry", {}),
    ("color_cube_rotation", "colours of a rotated cube", "geometry", {}),
    ("rotate_matrix", "rotate a matrix", "grids and matrices",
     dict(min_n=2, max_n=4, min_rotations=1, max_rotations=3)),
    ("pool_matrix", "max / average pooling", "grids and matrices",
     dict(min_rows=2, max_rows=4, min_cols=2, max_cols=4, min_pool_size=1, max_pool_size=2)),
    ("binary_matrix", "distance to the nearest 0", "grids and matrices", dict(min_n=2, max_n=4)),
    ("largest_island", "largest island in a grid", "grids and matrices",
     dict(min_rows=4, max_rows=5, min_cols=4, max_cols=5, min_num_islands=1, max_num_islands=3, min_island_size=1,
          max_island_size=4)),
    ("mini_sudoku", "4x4 sudoku", "grids and matrices", {}),
    ("cryptarithm", "letter-digit puzzles", "puzzles", {}),
    ("ab", "A::B token rewriting", "puzzles", dict(length=5)),
    ("course_schedule", "can the courses be finished", "puzzles", {}),
)
WIDE_DOMAINS: tuple[Domain, ...] = DOMAINS + tuple(Domain(name, name, kind, 111 + i, options, family)
                                                   for i, (name, kind, family, options) in enumerate(_WIDE))
WIDE_DOMAIN_NAMES: tuple[str, ...] = tuple(d.name for d in WIDE_DOMAINS)
_BY_NAME = {d.name: d for d in WIDE_DOMAINS}


def has_verifier(name: str) -> bool:
    """True for a registered domain (embedded or wide): `score` can call its generator's verifier."""
    return name in _BY_NAME


def family_of(name: str) -> str:
    """The family of a registered domain; "" for any other domain."""
    return _BY_NAME[name].family if name in _BY_NAME else ""


def get_domain(name: str) -> Domain:
    if name not in _BY_NAME:
        raise DataError(f"unknown domain {name!r}; the embedded domains are {list(DOMAIN_NAMES)} (the wide "
                        f"registry adds {list(WIDE_DOMAIN_NAMES[len(DOMAIN_NAMES):])})")
    return _BY_NAME[name]


def resolve_domains(names) -> tuple[str, ...]:
    """Validates a user's domain selection (None or empty = all ten) and returns it in the given order."""
    if not names:
        return DOMAIN_NAMES
    names = tuple(names)
    for n in names:
        get_domain(n)
    if len(set(names)) != len(names):
        raise DataError(f"duplicate domain in {list(names)}")
    return names


def generate(domain: "str | Domain", n: int, *, exclude: set[str] | None = None) -> Iterator[dict]:
    """Yields the first `n` examples of `domain` (an embedded domain's name, or any `Domain`) with distinct prompts
    (skipping any prompt in `exclude`).

    Deterministic: the stream is reasoning-gym items 0, 1, 2, ... of the domain's fixed seed, duplicates skipped.
    Raises DataError if the generator cannot produce `n` distinct prompts within 50*n draws.
    """
    d = domain if isinstance(domain, Domain) else get_domain(domain)
    limit = 50 * n + 100
    ds = d.dataset(size=limit)
    seen = set(exclude or ())
    made = 0
    for i in range(limit):
        item = ds[i]
        q = item["question"]
        if q in seen:
            continue
        seen.add(q)
        yield {"domain": d.name, "prompt": q, "answer": str(item["answer"]),
               "metadata": json.dumps(item["metadata"], sort_keys=True, default=str)}
        made += 1
        if made == n:
            return
    raise DataError(f"domain {d.name!r}: only {made} distinct prompts in {limit} draws (wanted {n}); "
                    f"its generator options {dict(d.options)} are too narrow")


def extract_answer(text: str) -> str:
    """The model's answer from a completion: the first non-empty line, stripped (the tasks ask for the bare
    answer, so anything after the first line is commentary). A trailing period is dropped."""
    for line in text.splitlines():
        line = line.strip()
        if line:
            return line[:-1].rstrip() if line.endswith(".") and not line.endswith("..") else line
    return ""


def score(domain: str, prediction: str, example: Mapping[str, Any]) -> float:
    """The domain verifier's score in [0, 1] (reasoning-gym `score_answer`; partial credit exists for some
    domains; 0 for an answer the verifier fails to parse). `prediction` is the already-extracted answer; `example`
    holds `prompt`, `answer`, `metadata`."""
    d = get_domain(domain)
    meta = example["metadata"]
    entry = {"question": example.get("prompt", ""), "answer": example["answer"],
             "metadata": json.loads(meta) if isinstance(meta, (str, bytes)) else dict(meta)}
    try:
        return float(d.dataset(size=1).score_answer(prediction, entry))
    except Exception:   # noqa: BLE001 - some verifiers parse without checking (prime_factorization: int('23 7'))
        return 0.0      # a completion the verifier cannot read is wrong, not a crash of the evaluation


def is_correct(domain: str, prediction: str, example: Mapping[str, Any]) -> bool:
    """Exact correctness: the verifier gives full marks."""
    return score(domain, prediction, example) >= 1.0
