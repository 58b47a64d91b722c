r"""Training data for the embedded model, written in exactly the protocol the agents run under: the stream.

`example_stream` draws a source with the weights `MIX` (`duet train --mix`) for each problem: synthetic
problems (`duet.train.synthetic`), MAWPS + ASDiv-A rows with fresh numbers, their variations
(`duet.train.variations`: all kinds, or one kind by its name), stories from the generator
(`duet.train.generator`), GSM8K, and the model's own attempts (`onpolicy`); the real problems and the
attempts are loaded and split in `duet.train.sources`.
Each problem becomes the conversations of `duet.train.conversations`, made of the solutions of
`duet.train.solutions` (code cells run for their outputs, and deliberately wrong ones).

A fixed dev split of the real problems (by source row) is never trained on.
"""

from __future__ import annotations

import random
from collections.abc import Iterator

from duet.prompts import Prompts, load_prompts
from duet.train.conversations import Conversation, attempt_conversations, conversations
from duet.train.generator import generated_story
from duet.train.sources import Sources, mawps_problem, story_problem
from duet.train.synthetic import synthetic_problem
from duet.train.variations import VARIATIONS, vary

# How often each source is drawn when building the stream (the default; `duet train --mix` changes it).
MIX = {"synthetic": 0.1, "mawps": 0.3, "variations": 0.3, "stories": 0.25, "gsm8k": 0.05}
# onpolicy: the attempts of `duet train --onpolicy FILE`; a variation's kind (e.g. surface): only that kind
SOURCES = (*MIX, "onpolicy", *VARIATIONS)


def example_stream(sources: Sources, seed: int, prompts: Prompts | None = None,
                   mix: dict[str, float] | None = None) -> Iterator[Conversation]:
    """An endless, deterministic stream of training conversations, drawing sources with weights `mix`."""
    prompts = prompts or load_prompts()
    rng = random.Random(seed)
    mix = mix or MIX
    if set(mix) - set(SOURCES) or not any(w > 0 for w in mix.values()):
        raise ValueError(f"mix must weight some of {', '.join(SOURCES)}; got {mix}")
    if mix.get("onpolicy", 0) > 0 and not sources.attempts:
        raise ValueError("the mix draws onpolicy attempts but none were loaded; pass --onpolicy FILE")
    kinds, weights = zip(*mix.items(), strict=True)
    while True:
        kind = rng.choices(kinds, weights)[0]
        if kind == "synthetic":
            problem = synthetic_problem(rng)
        elif kind == "onpolicy":
            yield from attempt_conversations(rng.choice(sources.attempts), prompts, rng)
            continue
        elif kind == "mawps":
            problem = mawps_problem(rng.choice(sources.mawps_train), rng)
        elif kind == "variations" or kind in VARIATIONS:
            variation = rng.choice(list(VARIATIONS)) if kind == "variations" else kind
            story = vary(rng.choice(sources.mawps_train).story(), variation, rng)
            problem = story_problem(story, rng, "variations") if story else None
        elif kind == "stories":
            story = generated_story(rng)
            problem = story_problem(story, rng, "stories") if story else None
        else:
            problem = rng.choice(sources.gsm8k_train)
        if problem is not None:
            yield from conversations(problem, prompts, rng)
