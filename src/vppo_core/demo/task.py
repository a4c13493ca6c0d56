"""A synthetic visual question the answer of which needs the image: "what colour is the circle ?".

Each image shows one circle and, optionally, distractor shapes (squares, triangles) in other colours,
on a light background at random positions and sizes. The circle's colour is uniform over
`COLOURS`, so a policy that ignores the image cannot beat ``1 / len(COLOURS)``.

The reference response is ``"the circle is <colour> ."``: three tokens fixed by the format, one that
depends on the image, and the end-of-turn token, which makes the sparsity of visual dependency easy
to see in the demo's per-token plots.
"""

import random
from dataclasses import dataclass

from PIL import Image, ImageDraw

COLOURS: dict[str, tuple[int, int, int]] = {
    "red": (215, 40, 40),
    "green": (40, 160, 60),
    "blue": (40, 80, 215),
    "yellow": (225, 195, 30),
}
DISTRACTOR_SHAPES: tuple[str, ...] = ("square", "triangle")
QUESTION = "what colour is the circle ?"


@dataclass(frozen=True)
class Example:
    """One task instance: the image, the question, the gold colour and the reference response."""

    image: Image.Image
    question: str
    answer: str
    response: str


def _box(rng: random.Random, size: int, radius: int, taken: list[tuple[int, int, int]]) -> tuple[int, int]:
    """A centre for a shape of ``radius`` that does not overlap the shapes already drawn (best effort)."""
    for _ in range(50):
        cx, cy = rng.randint(radius, size - 1 - radius), rng.randint(radius, size - 1 - radius)
        if all((cx - x) ** 2 + (cy - y) ** 2 > (radius + r + 2) ** 2 for x, y, r in taken):
            return cx, cy
    return cx, cy


def make_example(rng: random.Random, *, size: int = 56, distractors: int = 1) -> Example:
    """Draw one example with ``rng`` (reproducible: same seed, same example)."""
    names = list(COLOURS)
    answer = rng.choice(names)
    image = Image.new("RGB", (size, size), (235, 235, 235))
    draw = ImageDraw.Draw(image)
    taken: list[tuple[int, int, int]] = []
    r = rng.randint(size // 6, size // 4)
    cx, cy = _box(rng, size, r, taken)
    taken.append((cx, cy, r))
    draw.ellipse((cx - r, cy - r, cx + r, cy + r), fill=COLOURS[answer])
    others = [c for c in names if c != answer]
    for _ in range(distractors):
        shape, colour = rng.choice(DISTRACTOR_SHAPES), rng.choice(others)
        r = rng.randint(size // 8, size // 5)
        x, y = _box(rng, size, r, taken)
        taken.append((x, y, r))
        if shape == "square":
            draw.rectangle((x - r, y - r, x + r, y + r), fill=COLOURS[colour])
        else:
            draw.polygon([(x, y - r), (x - r, y + r), (x + r, y + r)], fill=COLOURS[colour])
    return Example(image=image, question=QUESTION, answer=answer, response=f"the circle is {answer} .")


def make_dataset(n: int, seed: int, *, size: int = 56, distractors: int = 1) -> list[Example]:
    rng = random.Random(seed)
    return [make_example(rng, size=size, distractors=distractors) for _ in range(n)]


def reward(response: str, answer: str) -> float:
    """1 if the first colour word of the response is the answer, else 0 (a verifiable reward)."""
    for word in response.split():
        if word in COLOURS:
            return float(word == answer)
    return 0.0
