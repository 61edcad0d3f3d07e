"""Coding data for the trainer: the built-in demo set (synthetic note-like texts over real
ICD-10-CM codes from `simple_icd_10_cm`, long-tailed, never patient data) and a JSONL reader
for real data (one {"text": ..., "codes": [...]} object per line, e.g. exported from
MIMIC, which is credentialed and never bundled)."""
from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path

import numpy as np

# Chapters of the demo codes: endocrine, mental, nervous, circulatory, respiratory,
# digestive, musculoskeletal, genitourinary, symptoms, injury.
_CHAPTERS = ("4", "5", "6", "9", "10", "11", "13", "14", "18", "19")
_TEMPLATES = ("Patient presents with {}.", "History of {}.", "Assessment and plan: {}.",
              "{} was diagnosed during this admission.", "Discharge diagnosis: {}.",
              "Known {}, continued on the home regimen.")
_FILLER = ("Vital signs were stable on the floor.", "The patient tolerated a regular diet.",
           "Physical therapy evaluated the patient.", "No acute events overnight.",
           "Labs were notable for a mild leukocytosis that resolved.",
           "The patient was discharged home in good condition.",
           "Follow up with primary care in two weeks.",
           "Medications were reconciled at discharge.",
           "The patient was seen and examined with the attending physician.",
           "Pain was controlled with oral analgesics.")


@dataclass
class CodingData:
    """texts[i] and its label ids codes[i] (into `code_names`, e.g. ICD-10-CM codes)."""

    texts: list[str]
    codes: list[list[int]]
    code_names: list[str]
    descriptions: list[str]

    def __post_init__(self) -> None:
        if len(self.texts) != len(self.codes):
            raise ValueError(f"codes: {len(self.codes)} label lists for {len(self.texts)} texts")

    @property
    def num_labels(self) -> int:
        return len(self.code_names)

    def subset(self, idx) -> CodingData:
        return CodingData([self.texts[i] for i in idx], [self.codes[i] for i in idx],
                          self.code_names, self.descriptions)

    def split(self, fractions=(0.7, 0.15, 0.15), seed: int = 0
              ) -> tuple[CodingData, CodingData, CodingData]:
        """Random train / validation / test split (deterministic for a seed)."""
        if len(fractions) != 3 or abs(sum(fractions) - 1) > 1e-9 or min(fractions) <= 0:
            raise ValueError(f"fractions: three positive shares summing to 1, got {fractions}")
        perm = np.random.default_rng(seed).permutation(len(self.texts))
        a = round(fractions[0] * len(perm))
        b = a + round(fractions[1] * len(perm))
        return self.subset(perm[:a]), self.subset(perm[a:b]), self.subset(perm[b:])


def _demo_codes(num_codes: int, rng: np.random.Generator) -> list[str]:
    import simple_icd_10_cm as cm  # a dependency of the trainer only

    by_chapter: dict[str, list[str]] = {ch: [] for ch in _CHAPTERS}
    for c in cm.get_all_codes(with_dots=True):
        if cm.is_leaf(c) and (ch := cm.get_ancestors(c)[-1]) in by_chapter:
            by_chapter[ch].append(c)
    # As many codes from each chapter (injury codes, with their 7th characters, would
    # otherwise be most of them).
    pools = [rng.permutation(by_chapter[ch]).tolist() for ch in _CHAPTERS]
    return sorted(pools[i % len(pools)][i // len(pools)] for i in range(num_codes))


def builtin_notes(num_notes: int = 600, num_codes: int = 60, mean_codes: float = 4.0,
                  filler: int = 8, label_noise: float = 0.0, seed: int = 0) -> CodingData:
    """Synthetic notes: each mentions its codes' ICD-10-CM descriptions in template
    sentences among filler sentences; code frequencies are Zipf-like (a long tail).
    label_noise: share of notes whose label list loses one mentioned code or gains one
    that is not mentioned (to exercise noise detection)."""
    if num_codes < 2 or num_notes < 1 or mean_codes < 1 or not 0 <= label_noise <= 1:
        raise ValueError("builtin_notes: need num_codes >= 2, num_notes >= 1, mean_codes >= 1 "
                         "and label_noise in [0, 1]")
    import simple_icd_10_cm as cm

    rng = np.random.default_rng(seed)
    names = _demo_codes(num_codes, rng)
    desc = [cm.get_description(c) for c in names]
    p = 1.0 / np.arange(1, num_codes + 1) ** 1.1
    p = p[rng.permutation(num_codes)] / p.sum()
    noise_rng = np.random.default_rng([seed, 1])  # own stream: same texts at any label_noise
    texts, codes = [], []
    for _ in range(num_notes):
        n = min(num_codes, 1 + rng.poisson(mean_codes - 1))
        own = sorted(rng.choice(num_codes, n, replace=False, p=p).tolist())
        sentences = [rng.choice(_TEMPLATES).format(desc[c].lower()) for c in own]
        sentences += rng.choice(_FILLER, filler).tolist()
        rng.shuffle(sentences)
        labels = list(own)
        if noise_rng.random() < label_noise:
            extra = [c for c in range(num_codes) if c not in labels]
            if len(labels) > 1 and (noise_rng.random() < 0.5 or not extra):
                labels.remove(int(noise_rng.choice(labels)))  # a mentioned code left out
            elif extra:  # a code the note does not mention
                pick = noise_rng.choice(extra, p=p[extra] / p[extra].sum())
                labels = sorted([*labels, int(pick)])
        texts.append(" ".join(s[0].upper() + s[1:] for s in sentences))
        codes.append(labels)
    return CodingData(texts, codes, names, desc)


def load_jsonl(path: str | Path) -> CodingData:
    """One JSON object per line with "text" and "codes" (code strings); the label set is
    every code seen, sorted."""
    texts, raw = [], []
    with open(path) as f:
        for n, line in enumerate(f, 1):
            if not line.strip():
                continue
            try:
                obj = json.loads(line)
                texts.append(str(obj["text"]))
                raw.append([str(c) for c in obj["codes"]])
            except (json.JSONDecodeError, KeyError, TypeError) as e:
                raise ValueError(f"{path}:{n}: expected {{\"text\": ..., \"codes\": [...]}}: "
                                 f"{e}") from e
    names = sorted({c for cs in raw for c in cs})
    index = {c: i for i, c in enumerate(names)}
    return CodingData(texts, [sorted({index[c] for c in cs}) for cs in raw], names, names)
