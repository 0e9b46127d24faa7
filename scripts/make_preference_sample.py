"""Write ringtrain/data/samples/preference.jsonl and preference_chat.jsonl: tiny deterministic preference sets
(prompt, chosen, rejected).

preference.jsonl holds plain-text records, preference_chat.jsonl chat records (the prompt a list of messages, the
responses strings; a file's records share one type per field, as Arrow reads them); the chosen response is the
correct one, the rejected one a plausible mistake. Small enough for the byte tokenizer at a short sequence length; the retrieval
records carry a longer prompt, the case where packing a pair into one sequence saves the most.
    python scripts/make_preference_sample.py   (the file is shipped; running it again writes the same bytes)
"""

from __future__ import annotations

import json
import random
from pathlib import Path

SAMPLES = Path(__file__).resolve().parents[1] / "ringtrain" / "data" / "samples"
WORDS = ["apple", "river", "stone", "candle", "forest", "harbor", "pencil", "silver", "garden", "window", "rocket",
         "meadow", "violin", "planet", "copper", "lantern"]
SENTENCES = ["The train left at dawn.", "A cat slept on the warm roof.", "Rain fell over the quiet town.",
             "The market opened late.", "Two boats crossed the bay.", "The old clock struck nine.",
             "Snow covered the northern road.", "A bell rang in the valley."]


def arithmetic(rng: random.Random) -> tuple[str, str, str]:
    a, b = rng.randint(10, 99), rng.randint(10, 99)
    wrong = a + b + rng.choice([-10, -1, 1, 10])
    return f"Compute {a} + {b}.", f"{a} + {b} = {a + b}.", f"{a} + {b} = {wrong}."


def reverse(rng: random.Random) -> tuple[str, str, str]:
    w = rng.choice(WORDS)
    return f"Spell the word '{w}' backwards.", f"'{w}' backwards is '{w[::-1]}'.", f"'{w}' backwards is '{w}'."


def sort(rng: random.Random) -> tuple[str, str, str]:
    xs = rng.sample(range(1, 50), 5)
    good, bad = sorted(xs), sorted(xs, reverse=True)
    fmt = lambda v: ", ".join(map(str, v))  # noqa: E731
    return f"Sort in increasing order: {fmt(xs)}.", f"{fmt(good)}.", f"{fmt(bad)}."


def retrieval(rng: random.Random) -> tuple[str, str, str]:
    key, value, other = rng.choice(WORDS), rng.randint(1000, 9999), rng.randint(1000, 9999)
    filler = [rng.choice(SENTENCES) for _ in range(rng.randint(6, 12))]
    filler.insert(rng.randint(0, len(filler)), f"The code for {key} is {value}.")
    return (" ".join(filler) + f"\nWhat is the code for {key}?", f"The code for {key} is {value}.",
            f"The code for {key} is {other}.")


def main() -> None:
    rng = random.Random(29)
    tasks = [arithmetic, reverse, sort, retrieval]
    plain, chat = [], []
    for i in range(240):
        prompt, chosen, rejected = rng.choice(tasks)(rng)
        if i % 5 == 4:  # chat: the prompt as messages (sometimes with a system turn), the responses as strings
            messages = [{"role": "user", "content": prompt}]
            if rng.random() < 0.5:
                messages.insert(0, {"role": "system", "content": "Answer briefly and exactly."})
            chat.append(json.dumps({"prompt": messages, "chosen": chosen, "rejected": rejected}))
        else:
            plain.append(json.dumps({"prompt": f"Question: {prompt}\nAnswer: ", "chosen": chosen, "rejected": rejected}))
    (SAMPLES / "preference.jsonl").write_text("\n".join(plain) + "\n")
    (SAMPLES / "preference_chat.jsonl").write_text("\n".join(chat) + "\n")


if __name__ == "__main__":
    main()
