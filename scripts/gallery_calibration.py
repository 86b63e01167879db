"""Calibrate the open-set 1:N identification thresholds (faces and voices) on ../shared/data.

What it measures
    A gallery holds subjects, each enrolled with one or more templates
    (embeddings). A search scores a probe against every subject (a subject's
    score is the best cosine over its templates) and returns the top subject as
    the match only when that score clears the threshold. Following NIST FRTE
    1:N, for a threshold t:

    * FPIR(t), false-positive identification rate: the share of non-mated
      searches (probes of people not in the gallery) whose top score is >= t;
    * FNIR(t), false-negative identification rate: the share of mated searches
      whose own subject is not returned as the match (top-1 is someone else,
      or the top score is under t);
    * rank-1 rate: the share of mated searches whose top-1 is their subject,
      whatever the score.

How
    Embeddings come from the project's own pipelines (VisionPipeline,
    AudioPipeline) on CPU sessions opened by models.runtime.open_session, as a
    worker opens them. Then, per modality and per number of templates k:

    * leave-one-identity-out splits: each labelled identity in turn is a
      stranger and the others are enrolled; people the labels call "unknown"
      (the other faces of the group selfie, unlabelled voices) are strangers
      in every split. Each split is repeated with random template choices.
      A subject's templates come from as few sessions (photos, recordings) as
      possible, and its mated probes only from its other sessions, so chunks
      of one recording are never matched against each other;
    * empirical FPIR/FNIR/rank-1 over all searches of all splits, at the
      gallery size the data allows (5-6 subjects);
    * parametric estimates, because FPIR 0.003 cannot be read off a few dozen
      distinct strangers, and because deployed galleries hold 100-1000
      subjects: (a) a normal fit of the non-mated top scores (a check at the
      data's gallery size), and (b) a normal fit of the 1:1 impostor scores,
      FMR(t) = P(impostor >= t), with FPIR(t) = 1 - (1 - FMR(t))^(N*k) for N
      subjects of k templates (independent tries; templates of one subject are
      correlated, so this over-states FPIR a little), and FNIR(t) = 1 -
      integral over s >= t of f_mated(s) * (1 - FMR(s))^(k*(N-1)) ds, which
      also counts the rank-1 losses a large gallery brings;
    * a cluster bootstrap over identities (people, not pairs, are the unit the
      data has few of) for the range of the recommended threshold.

    Recommended threshold: the model's (b) threshold for FPIR 1 % in a gallery
    of 1000 subjects with up to 3 templates each, rounded up to 0.01.

    The genuine (same person, different session) and impostor cosine scores of
    templates against templates are reported as mean and sd, pooled over pairs
    and balanced (each person, or pair of people, weighs the same); the
    parametric fits use the balanced ones, so that one person with many chunks
    does not set the tail.

What goes in
    Faces: the largest face of every labelled person's photo; Angelina Jolie's
    face in the group selfie and Barack Obama's in the side-by-side composite
    (probes only: enrolment refuses a photo with two faces of a similar size);
    the other selfie faces and the live subject of the liveness set as
    strangers. Voices: every
    bona fide wideband recording with at least IDENT_GALLERY_MIN_SPEECH_S of
    speech, the utterances placed in vad/speech_with_long_gaps_16k.wav, and
    recordings with >= 2 * --chunk-s of speech cut into chunks of about
    --chunk-s seconds of detected speech; unlabelled voices are strangers. See
    face_samples and voice_samples for what is left out and why.

Usage (project virtualenv, 1-2 minutes on 2 cores)::

    .venv/bin/python scripts/gallery_calibration.py --plot docs/img/gallery_thresholds.png --json /tmp/gallery.json
"""

from __future__ import annotations

import argparse
import io
import json
import math
import sys
from collections import Counter, defaultdict
from dataclasses import dataclass, field
from itertools import combinations
from pathlib import Path
from statistics import NormalDist
from typing import Any, Sequence

import numpy as np

REPO = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO))

from models.catalog import selected_models  # noqa: E402
from models.runtime import open_session, plan_device  # noqa: E402
from tasks.settings import Settings  # noqa: E402
from workers.audio.decoding import TARGET_RATE, decode  # noqa: E402
from workers.audio.pipeline import AudioPipeline, speech_audio  # noqa: E402
from workers.galleries import BACKGROUND_FACE_RATIO  # noqa: E402
from workers.vision.pipeline import VisionPipeline  # noqa: E402

FPIR_TARGETS = (0.01, 0.003)
GALLERY_SIZES = (100, 1000)
# The recommendation aims at FPIR <= 1 % for the largest gallery in that range, with up to three
# templates per subject: N * k = 3000 tries under the model (an upper bound, see the module doc).
RECOMMEND_FPIR, RECOMMEND_N, RECOMMEND_K = 0.01, 1000, 3
TEMPLATE_COUNTS = (1, 2, 3)
TRADEOFF_THRESHOLDS = (0.35, 0.40, 0.42, 0.45, 0.50, 0.55)

# Faces in multi-face photos whose identity labels.json states, located by a
# point inside the face (labels give "lower left centre" and "left=Obama").
# "others": what the photo's remaining faces are: "unknown" strangers (the
# labels list them as "unknown") or None, left out.
FACE_PICKS: dict[str, dict[str, Any]] = {
    "images/multi_face/selfie_many_people.jpg": {"angelina_jolie": (150, 370), "others": "unknown"},
    # The right half (Biden) is a crop of faces/joe_biden_01.jpg: a duplicate, not a second photo.
    "images/multi_face/two_people.jpg": {"barack_obama": (310, 130), "others": None},
}

NORMAL = NormalDist()


# -- samples ------------------------------------------------------------------------------------


@dataclass(frozen=True)
class Sample:
    """One embedding: whose it is, where it came from, and whether it may be a template."""

    identity: str
    session: str  # photo or recording; templates and mated probes never share one
    label: str  # for the reader: file, face or chunk
    vector: np.ndarray = field(repr=False)
    labelled: bool  # a labelled person (can be enrolled) or a stranger the labels call unknown
    enrollable: bool  # passes the enrolment rules (one face, big enough, live; enough speech)


def open_sessions(specs: dict, models_dir: Path) -> dict:
    """CPU sessions as a worker opens them (checksum, CPU graph rewrites, warm-up), one thread each."""
    plan = plan_device("cpu", 0)
    return {role: open_session(spec, models_dir, plan, threads=1) for role, spec in specs.items()}


def face_samples(pipeline: VisionPipeline, settings: Settings, data: Path, labels: dict) -> list[Sample]:
    """The largest face of each labelled person's photo, plus the labelled faces of multi-face photos.

    Strangers: the faces of the group selfie other than Angelina Jolie (labels:
    "unknown"), and the live subject of the liveness set. The spoof photos are
    left out (enrolment refuses them, and the print shows the same man as
    live_T1). Background faces of single-person photos are left out: the labels
    do not say who they are.
    """
    entries = {e["path"]: e for e in labels["files"]}
    person_of = {path: person for person, paths in labels["persons"].items() for path in paths}
    live_strangers = sorted(
        p for p, e in entries.items() if e["category"] == "face_liveness" and e["labels"].get("liveness") == "real"
    )
    paths = sorted(person_of) + sorted(FACE_PICKS) + live_strangers
    results = pipeline.analyze_many([(data / p).read_bytes() for p in paths], [{"liveness": True}] * len(paths))
    samples = []
    for path, result in zip(paths, results):
        if isinstance(result, Exception):
            raise SystemExit(f"{path}: {result}")
        faces = result["faces"]
        if not faces:
            raise SystemExit(f"{path}: no face found")

        def sample(face: dict, identity: str, labelled: bool, index: int) -> Sample:
            # Enrolment's rules (workers/galleries.py): the largest face, big enough, with no other
            # face of a similar size beside it (background people are ignored), and live.
            sides = [_side(f) for f in faces]
            floor = max(settings.gallery_min_face_px, BACKGROUND_FACE_RATIO * max(sides))
            rivals = sum(side >= floor for side in sides)
            enrollable = (face is faces[0] and sides[0] >= settings.gallery_min_face_px and rivals == 1
                          and bool(face["liveness"]["is_live"]))
            return Sample(identity, path, f"{Path(path).name}#{index}", np.asarray(face["embedding"], np.float32),
                          labelled, enrollable)

        if path in person_of:
            samples.append(sample(faces[0], person_of[path], True, 0))  # analyze lists the largest face first
        elif path in FACE_PICKS:
            picks = dict(FACE_PICKS[path])
            others = picks.pop("others")
            for index, face in enumerate(faces):
                x1, y1, x2, y2 = face["bbox"]
                named = [who for who, (x, y) in picks.items() if x1 <= x <= x2 and y1 <= y <= y2]
                if named:
                    samples.append(sample(face, named[0], True, index))
                elif others == "unknown":
                    samples.append(sample(face, f"unknown:{Path(path).name}#{index}", False, index))
        else:
            person = entries[path]["labels"]["person_ids"][0]
            samples.append(sample(faces[0], f"unknown:{person}", False, 0))
    return samples


def _side(face: dict) -> float:
    """The shorter side of a face's box, as enrolment measures it."""
    x1, y1, x2, y2 = face["bbox"]
    return min(x2 - x1, y2 - y1)


def _wav_bytes(wave: np.ndarray) -> bytes:
    import soundfile as sf

    buffer = io.BytesIO()
    sf.write(buffer, wave, TARGET_RATE, format="WAV", subtype="FLOAT")
    return buffer.getvalue()


def voice_samples(pipeline: AudioPipeline, settings: Settings, data: Path, labels: dict,
                  chunk_s: float) -> list[Sample]:
    """Speaker embeddings of the bona fide wideband recordings, long ones cut into chunks.

    * Only bona fide speech (the anti-spoofing check is not run: spoofs are
      refused at enrolment, and these recordings are labelled bona fide).
    * Only wideband (>= 16 kHz) recordings: the 8 kHz clips (FSDD digits, the
      8 kHz copy of a LibriSpeech utterance) are another channel, across which
      one speaker scores under the 1:1 threshold (docs/audio.md, "Channel"),
      and the FSDD digits have under 1 s of speech, which enrolment refuses.
    * A recording whose source another labelled file shares (the 10 s WAV
      excerpts of the Trump MP3s) is used once, in its longest form.
    * The construction of vad/speech_with_long_gaps_16k.wav says which
      LibriSpeech speaker says what when: each placed utterance is one sample.
    * A recording with at least 2 * chunk_s of speech is cut into equal,
      non-overlapping chunks of its detected speech (about chunk_s each), each
      embedded by the pipeline's own speaker model: more samples of its
      speaker, all of one session.
    """
    entries = []
    by_source: dict[tuple, list[dict]] = defaultdict(list)
    for entry in labels["files"]:
        lab = entry["labels"]
        if lab.get("spoof") != "bonafide" or lab.get("has_speech") is not True:
            continue
        if entry.get("format", {}).get("sample_rate", 0) < TARGET_RATE:
            continue
        source = entry.get("source", {})
        by_source[(source.get("repo"), source.get("path"), source.get("commit"))].append(entry)
    for group in by_source.values():
        entries.append(max(group, key=lambda e: e["format"]["duration_s"]))

    samples = []
    for entry in sorted(entries, key=lambda e: e["path"]):
        path, lab = entry["path"], entry["labels"]
        payload = (data / path).read_bytes()
        if "placed_utterances" in lab:
            wave, _ = decode(payload, settings.max_audio_seconds)
            for placed in lab["placed_utterances"]:
                part = wave[int(placed["start"] * TARGET_RATE) : int(placed["end"] * TARGET_RATE)]
                result = pipeline.analyze(_wav_bytes(part), {"spoof": False})
                samples += _speech_samples(pipeline, settings, result, part, placed["speaker_id"],
                                           f"{path}@{placed['start']:g}s", chunk_s)
            continue
        if lab.get("speaker_ids"):  # several speakers and no timing: no single voiceprint
            continue
        result = pipeline.analyze(payload, {"spoof": False})
        speaker = lab.get("speaker_id")
        identity = speaker if speaker else f"unknown:{Path(path).name}"
        wave = decode(payload, settings.max_audio_seconds)[0] if _speech_s(result) >= 2 * chunk_s else None
        samples += _speech_samples(pipeline, settings, result, wave, identity, path, chunk_s,
                                   labelled=speaker is not None)
    return samples


def _speech_s(result: dict) -> float:
    return sum(s["end_s"] - s["start_s"] for s in result["speech_segments"])


def _speech_samples(pipeline: AudioPipeline, settings: Settings, result: dict, wave: np.ndarray | None,
                    identity: str, session: str, chunk_s: float, labelled: bool = True) -> list[Sample]:
    speech_s = _speech_s(result)
    if result["embedding"] is None or speech_s < settings.gallery_min_speech_s:
        return []  # enrolment refuses it, and a search on it means little
    if speech_s < 2 * chunk_s or wave is None:
        return [Sample(identity, session, Path(session).name, np.asarray(result["embedding"], np.float32),
                       labelled, True)]
    speech = speech_audio(wave, [(s["start_s"], s["end_s"]) for s in result["speech_segments"]])
    count = int(len(speech) // (chunk_s * TARGET_RATE))
    pieces = np.array_split(speech, count)
    vectors = pipeline.speaker.embed_many(pieces)
    return [Sample(identity, session, f"{Path(session).name}[{i + 1}/{count}]", v, labelled, True)
            for i, v in enumerate(vectors)]


# -- 1:1 scores ---------------------------------------------------------------------------------


@dataclass
class PairSet:
    """Scores with the person (genuine) or pair of people (impostor) each belongs to."""

    scores: np.ndarray
    keys: list[tuple[str, ...]]
    people: list[str] = field(init=False, repr=False)
    _members: np.ndarray = field(init=False, repr=False)  # [score, person of its key] -> index in people
    _key_index: np.ndarray = field(init=False, repr=False)
    _base: np.ndarray = field(init=False, repr=False)  # 1 / (scores of the same key)

    def __post_init__(self) -> None:
        counts = Counter(self.keys)
        order = {key: i for i, key in enumerate(counts)}
        self.people = sorted({p for key in self.keys for p in key})
        index = {p: i for i, p in enumerate(self.people)}
        width = max((len(key) for key in self.keys), default=1)
        self._members = np.array([[index[p] for p in key] for key in self.keys], dtype=int).reshape(-1, width)
        self._key_index = np.array([order[key] for key in self.keys], dtype=int)
        self._base = np.array([1.0 / counts[key] for key in self.keys])

    def stats(self, multiplicity: dict[str, int] | None = None) -> dict[str, float]:
        """Pooled and balanced mean and sd; balanced gives each key equal weight.

        ``multiplicity`` (bootstrap) multiplies each key's weight by how often
        its people were drawn; "keys" then counts the keys drawn.
        """
        weights = self._base
        if multiplicity is not None:
            drawn = np.array([multiplicity.get(p, 0) for p in self.people], dtype=float)
            weights = weights * drawn[self._members].prod(axis=1)
        total = weights.sum()
        keys = int(np.unique(self._key_index[weights > 0]).size)
        if total <= 0:
            return {"n": int(len(self.scores)), "keys": 0}
        weights = weights / total
        mean = float(weights @ self.scores)
        sd = float(np.sqrt(weights @ (self.scores - mean) ** 2))
        return {"n": int(len(self.scores)), "keys": keys, "mean": float(self.scores.mean()),
                "sd": float(self.scores.std()), "balanced_mean": mean, "balanced_sd": sd,
                "min": float(self.scores.min()), "max": float(self.scores.max())}


def one_to_one(samples: Sequence[Sample]) -> tuple[PairSet, PairSet]:
    """Template-vs-template scores: genuine (one labelled person, two sessions) and impostor (two people).

    Chunks of one recording are neither: same person, same session.
    Strangers of different sources are taken to be different people.
    """
    genuine, impostor = ([], []), ([], [])
    for a, b in combinations(samples, 2):
        score = float(a.vector @ b.vector)
        if a.identity == b.identity:
            if a.labelled and a.session != b.session:
                genuine[0].append(score)
                genuine[1].append((a.identity,))
        else:
            impostor[0].append(score)
            impostor[1].append(tuple(sorted((a.identity, b.identity))))
    return PairSet(np.array(genuine[0]), genuine[1]), PairSet(np.array(impostor[0]), impostor[1])


# -- 1:N searches -------------------------------------------------------------------------------


@dataclass
class Searches:
    """Outcomes of all searches of one modality and template count."""

    k: int
    gallery_sizes: list[int] = field(default_factory=list)
    nonmated_top: list[float] = field(default_factory=list)
    nonmated_probe: list[str] = field(default_factory=list)
    nonmated_identity: list[str] = field(default_factory=list)
    mated_top: list[float] = field(default_factory=list)
    mated_own: list[float] = field(default_factory=list)  # the probe's own subject's score
    mated_hit: list[bool] = field(default_factory=list)  # top-1 is the probe's own subject
    mated_probe: list[str] = field(default_factory=list)
    mated_identity: list[str] = field(default_factory=list)

    def arrays(self) -> None:
        for name in ("nonmated_top", "mated_top", "mated_own", "mated_hit"):
            setattr(self, name, np.asarray(getattr(self, name)))

    def fpir(self, t: np.ndarray | float) -> np.ndarray:
        return (self.nonmated_top[None, :] >= np.atleast_1d(t)[:, None]).mean(axis=1)

    def fnir(self, t: np.ndarray | float) -> np.ndarray:
        found = self.mated_hit[None, :] & (self.mated_top[None, :] >= np.atleast_1d(t)[:, None])
        return 1.0 - found.mean(axis=1)

    def fpir_per_person(self, t: float) -> float:
        """FPIR with each stranger identity weighing the same, however many samples it has."""
        people = np.asarray(self.nonmated_identity)
        return float(np.mean([(self.nonmated_top[people == p] >= t).mean() for p in sorted(set(people))]))

    def fpir_by_person(self, t: float) -> dict[str, float]:
        people = np.asarray(self.nonmated_identity)
        return {p: float((self.nonmated_top[people == p] >= t).mean()) for p in sorted(set(people))}

    def fnir_by_person(self, t: float) -> dict[str, float]:
        people = np.asarray(self.mated_identity)
        found = self.mated_hit & (self.mated_top >= t)
        return {p: float(1.0 - found[people == p].mean()) for p in sorted(set(people))}

    def only(self, people: set[str]) -> "Searches":
        """The mated searches of ``people`` alone (the non-mated ones unchanged)."""
        keep = np.isin(np.asarray(self.mated_identity), sorted(people))
        out = Searches(self.k, list(self.gallery_sizes), self.nonmated_top, self.nonmated_probe,
                       self.nonmated_identity)
        for name in ("mated_top", "mated_own", "mated_hit"):
            setattr(out, name, getattr(self, name)[keep])
        out.mated_probe = [x for x, kept in zip(self.mated_probe, keep) if kept]
        out.mated_identity = [x for x, kept in zip(self.mated_identity, keep) if kept]
        return out

    @property
    def rank1(self) -> float:
        return float(self.mated_hit.mean())

    def counts(self) -> dict[str, int]:
        return {
            "gallery_subjects": int(round(float(np.mean(self.gallery_sizes)))),
            "splits": len(self.gallery_sizes),
            "mated_searches": int(len(self.mated_top)),
            "mated_probes": len(set(self.mated_probe)),
            "mated_identities": len(set(self.mated_identity)),
            "nonmated_searches": int(len(self.nonmated_top)),
            "nonmated_probes": len(set(self.nonmated_probe)),
            "nonmated_identities": len(set(self.nonmated_identity)),
        }


def pick_templates(own: Sequence[int], samples: Sequence[Sample], k: int, rng: np.random.Generator) -> list[int]:
    """Up to k enrollable samples, from as few sessions as possible (sessions in random order)."""
    sessions: dict[str, list[int]] = defaultdict(list)
    for i in own:
        if samples[i].enrollable:
            sessions[samples[i].session].append(i)
    chosen: list[int] = []
    for name in rng.permutation(sorted(sessions)):
        members = list(rng.permutation(sessions[name]))
        chosen += members[: k - len(chosen)]
        if len(chosen) == k:
            break
    return chosen


def run_searches(samples: Sequence[Sample], k: int, draws: int, seed: int) -> Searches:
    """Leave-one-identity-out splits, each with ``draws`` random template choices."""
    rng = np.random.default_rng(seed)
    matrix = np.stack([s.vector for s in samples])
    scores = matrix @ matrix.T
    by_identity: dict[str, list[int]] = defaultdict(list)
    for i, s in enumerate(samples):
        by_identity[s.identity].append(i)
    labelled = sorted(p for p in by_identity if samples[by_identity[p][0]].labelled)
    strangers = [i for i, s in enumerate(samples) if not s.labelled]
    out = Searches(k)
    for held_out in labelled:
        enrolled = [p for p in labelled if p != held_out]
        nonmated = by_identity[held_out] + strangers
        for _ in range(draws):
            templates = {p: pick_templates(by_identity[p], samples, k, rng) for p in enrolled}
            subjects = [p for p in enrolled if templates[p]]
            out.gallery_sizes.append(len(subjects))

            def subject_scores(probe: int) -> np.ndarray:
                return np.array([scores[probe, templates[p]].max() for p in subjects])

            for probe in nonmated:
                out.nonmated_top.append(float(subject_scores(probe).max()))
                out.nonmated_probe.append(samples[probe].label)
                out.nonmated_identity.append(samples[probe].identity)
            for own, person in enumerate(subjects):
                used = {samples[i].session for i in templates[person]}
                for probe in by_identity[person]:
                    if samples[probe].session in used:
                        continue
                    row = subject_scores(probe)
                    top = int(np.argmax(row))
                    out.mated_top.append(float(row[top]))
                    out.mated_own.append(float(row[own]))
                    out.mated_hit.append(top == own)
                    out.mated_probe.append(samples[probe].label)
                    out.mated_identity.append(person)
    out.arrays()
    return out


def empirical_threshold(nonmated_top: np.ndarray, target: float) -> float:
    """The lowest threshold whose empirical FPIR is at most ``target``."""
    ordered = np.sort(nonmated_top)[::-1]
    allowed = int(math.floor(target * len(ordered) + 1e-9))
    if allowed >= len(ordered):
        return float(ordered[-1])
    # Just above the (allowed+1)-th highest score: exactly ``allowed`` searches clear it.
    return float(np.nextafter(ordered[allowed], np.inf))


# -- normal models ------------------------------------------------------------------------------


def upper_tail(t: np.ndarray | float, mean: float, sd: float) -> np.ndarray:
    """P(X >= t) for X ~ N(mean, sd), accurate far into the tail."""
    z = (np.asarray(t, dtype=np.float64) - mean) / (sd * math.sqrt(2.0))
    return 0.5 * np.vectorize(math.erfc)(z)


def fpir_model(t: np.ndarray | float, imp_mean: float, imp_sd: float, tries: int) -> np.ndarray:
    """FPIR = 1 - (1 - FMR(t))^tries, with tries = N subjects * k templates."""
    with np.errstate(divide="ignore"):
        return -np.expm1(tries * np.log1p(-upper_tail(t, imp_mean, imp_sd)))


def threshold_model(target: float, imp_mean: float, imp_sd: float, tries: int) -> float:
    """The threshold at which :func:`fpir_model` equals ``target``."""
    fmr = -math.expm1(math.log1p(-target) / tries)
    return imp_mean - imp_sd * NORMAL.inv_cdf(fmr)


def fnir_model(t: float, gen_mean: float, gen_sd: float, imp_mean: float, imp_sd: float,
               competitors: int) -> tuple[float, float]:
    """(FNIR at t, rank-1 rate) when the mate scores N(gen) and each of ``competitors`` other
    templates N(imp): found iff the mate's score clears t and beats every competitor."""
    low, high = gen_mean - 8 * gen_sd, gen_mean + 8 * gen_sd

    def mass(s: np.ndarray) -> np.ndarray:
        density = np.exp(-0.5 * ((s - gen_mean) / gen_sd) ** 2) / (gen_sd * math.sqrt(2 * math.pi))
        if not competitors:
            return density
        with np.errstate(divide="ignore"):  # log(0) far below the impostor mean: beats nobody, exp(-inf) = 0
            return density * np.exp(competitors * np.log1p(-upper_tail(s, imp_mean, imp_sd)))

    grid = np.linspace(low, high, 2001)
    rank1 = float(np.trapezoid(mass(grid), grid))
    above = np.linspace(max(t, low), high, 2001)  # starts at t exactly
    found = float(np.trapezoid(mass(above), above)) if t < high else 0.0
    return 1.0 - found, rank1


def mated_fit(searches: Searches) -> dict[str, float]:
    """Normal fit of the mated searches' own-subject scores, each person weighing the same."""
    return PairSet(searches.mated_own, [(p,) for p in searches.mated_identity]).stats()


# -- the report -----------------------------------------------------------------------------------


@dataclass
class Modality:
    name: str
    model: str
    dims: int
    samples: list[Sample]
    genuine: PairSet
    impostor: PairSet
    searches: dict[int, Searches]
    verify_threshold: float


def _model_at(t: float, searches: Searches, imp: tuple[float, float], n: int) -> dict[str, float]:
    """Model FPIR, FNIR and rank-1 at threshold t for N = n subjects of the searches' k templates."""
    mated = mated_fit(searches)
    fnir, rank1 = fnir_model(t, mated["balanced_mean"], mated["balanced_sd"], *imp, searches.k * (n - 1))
    return {"fpir_model": float(fpir_model(t, *imp, n * searches.k)), "fnir_model": fnir, "rank1_model": rank1}


def _by_key(pairs: PairSet) -> dict[str, list[float]]:
    grouped: dict[str, list[float]] = defaultdict(list)
    for score, key in zip(pairs.scores, pairs.keys):
        grouped[" / ".join(key)].append(float(score))
    return grouped


def synthetic_genuine_sd(noise_sd: float, dims: int, seed: int, draws: int = 20000) -> float:
    """The sd of genuine cosines when every template is unit(u + e), e ~ N(0, noise_sd^2 I)."""
    rng = np.random.default_rng(seed)
    centre = rng.standard_normal((draws, dims))
    centre /= np.linalg.norm(centre, axis=1, keepdims=True)
    a, b = (centre + noise_sd * rng.standard_normal((draws, dims)) for _ in range(2))
    cosines = (a * b).sum(axis=1) / (np.linalg.norm(a, axis=1) * np.linalg.norm(b, axis=1))
    return float(cosines.std())


def analyse(mod: Modality, seed: int, bootstrap: int) -> dict[str, Any]:
    """Every figure of one modality, as plain JSON types."""
    gen, imp_stats = mod.genuine.stats(), mod.impostor.stats()
    imp = (imp_stats["balanced_mean"], imp_stats["balanced_sd"])
    noise_sd = math.sqrt(max(1.0 / gen["balanced_mean"] - 1.0, 0.0) / mod.dims)
    by_pair = _by_key(mod.impostor)
    out: dict[str, Any] = {
        "model": mod.model, "dims": mod.dims,
        "samples": {
            "labelled_identities": len({s.identity for s in mod.samples if s.labelled}),
            "labelled_samples": sum(s.labelled for s in mod.samples),
            "stranger_identities": len({s.identity for s in mod.samples if not s.labelled}),
            "stranger_samples": sum(not s.labelled for s in mod.samples),
            "per_identity": dict(sorted(Counter(s.identity for s in mod.samples).items())),
        },
        "genuine": gen, "impostor": imp_stats,
        "genuine_by_person": {
            person: {"pairs": int(len(v)), "mean": float(np.mean(v)), "min": float(np.min(v))}
            for person, v in sorted(_by_key(mod.genuine).items())
        },
        # A synthetic gallery that draws templates as unit(u + e), e ~ N(0, s^2 I_d), around a random
        # unit vector u per subject gets a mean genuine cosine of about 1 / (1 + d s^2).
        "synthetic_noise_sd_per_dim": noise_sd,
        "synthetic_genuine_sd": synthetic_genuine_sd(noise_sd, mod.dims, seed),
        "random_unit_vector_cosine_sd": 1.0 / math.sqrt(mod.dims),
        "impostor_highest_pairs_of_people": [
            {"people": key, "pairs": len(v), "mean": float(np.mean(v)), "max": float(np.max(v))}
            for key, v in sorted(by_pair.items(), key=lambda kv: -float(np.mean(kv[1])))[:5]
        ],
        "by_templates": {},
    }
    # The recommendation: the impostor model's threshold for FPIR 1 % at N = 1000 subjects of up to
    # 3 templates each, rounded up to 0.01.
    t_model = threshold_model(RECOMMEND_FPIR, *imp, RECOMMEND_N * RECOMMEND_K)
    t_rec = math.ceil(t_model * 100 - 1e-9) / 100
    base = mod.searches[1]
    n_data = base.counts()["gallery_subjects"]
    # The model checked where it can be: at the data's own gallery size.
    t_check = threshold_model(RECOMMEND_FPIR, *imp, n_data)
    out["model_check"] = {"gallery_subjects": n_data, "threshold_for_fpir_1pc": t_check,
                          "fpir_measured_per_search": float(base.fpir(t_check)[0]),
                          "fpir_measured_per_stranger": base.fpir_per_person(t_check),
                          "fpir_measured_by_stranger": {p: v for p, v in base.fpir_by_person(t_check).items() if v}}
    for k, searches in mod.searches.items():
        if not len(searches.mated_top):
            continue
        counts = searches.counts()
        top_mean, top_sd = float(searches.nonmated_top.mean()), float(searches.nonmated_top.std())
        row: dict[str, Any] = {
            "counts": counts, "mated_people": sorted(set(searches.mated_identity)), "rank1": searches.rank1,
            "nonmated_top_mean": top_mean, "nonmated_top_sd": top_sd, "mated_own": mated_fit(searches),
            "targets": {},
        }
        for target in FPIR_TARGETS:
            t_emp = empirical_threshold(searches.nonmated_top, target)
            t_top = top_mean - top_sd * NORMAL.inv_cdf(target)
            entry: dict[str, Any] = {
                "empirical": {"threshold": t_emp, "fpir": float(searches.fpir(t_emp)[0]),
                              "fnir": float(searches.fnir(t_emp)[0])},
                "nonmated_top_fit": {"threshold": t_top, "fnir": float(searches.fnir(t_top)[0])},
                "impostor_model": {},
            }
            for n in (counts["gallery_subjects"], *GALLERY_SIZES):
                t = threshold_model(target, *imp, n * k)
                entry["impostor_model"][str(n)] = {"threshold": t, **_model_at(t, searches, imp, n),
                                                   "fnir_measured": float(searches.fnir(t)[0])}
            row["targets"][str(target)] = entry
        at = {"fpir_measured": float(searches.fpir(t_rec)[0]), "fpir_measured_per_stranger":
              searches.fpir_per_person(t_rec), "fnir_measured": float(searches.fnir(t_rec)[0]),
              "fnir_measured_by_person": searches.fnir_by_person(t_rec)}
        for n in (counts["gallery_subjects"], *GALLERY_SIZES):
            at[f"N{n}"] = _model_at(t_rec, searches, imp, n)
        row["at_recommended"] = at
        if k > 1:
            # k = 1 on the same people: only those with more than k photos or recordings have mated
            # searches at k, so the k rows alone would compare different people.
            same = base.only(set(searches.mated_identity))
            row["k1_same_people"] = {"rank1": same.rank1, "fnir_measured_at_recommended": float(same.fnir(t_rec)[0]),
                                     "mated_own": mated_fit(same)}
        out["by_templates"][str(k)] = row
    # What other thresholds would trade (k = 1): FPIR of the model at 100 and 1000 subjects, FNIR of
    # the model at 1000 and as measured.
    out["tradeoff"] = []
    for t in sorted({*TRADEOFF_THRESHOLDS, mod.verify_threshold, t_rec}):
        entry = {"threshold": t, "fnir_measured": float(base.fnir(t)[0])}
        for n in GALLERY_SIZES:
            model = _model_at(t, base, imp, n)
            entry[f"fpir_model_N{n}"], entry[f"fnir_model_N{n}"] = model["fpir_model"], model["fnir_model"]
        out["tradeoff"].append(entry)
    pooled = (imp_stats["mean"], imp_stats["sd"])
    out["recommended"] = {
        "threshold": t_rec, "model_threshold": t_model,
        # The same model fitted to all impostor pairs alike (people with many samples weigh more).
        "model_threshold_k1": threshold_model(RECOMMEND_FPIR, *imp, RECOMMEND_N),
        "model_threshold_pooled_fit": threshold_model(RECOMMEND_FPIR, *pooled, RECOMMEND_N * RECOMMEND_K),
        "bootstrap": bootstrap_threshold(mod, bootstrap, seed, t_rec),
        "verify_threshold": {"threshold": mod.verify_threshold,
                             **{f"fpir_model_N{n}": float(fpir_model(mod.verify_threshold, *imp, n))
                                for n in GALLERY_SIZES}},
    }
    return out


def bootstrap_threshold(mod: Modality, rounds: int, seed: int, t_rec: float) -> dict[str, Any]:
    """Cluster bootstrap over people: the recommendation's model threshold, and the FPIR (N = 1000,
    k = 1 and the k = 3 bound) and FNIR (N = 1000, k = 1) the recommended threshold gives, when the
    people themselves are drawn again."""
    rng = np.random.default_rng(seed + 1)
    people = sorted({s.identity for s in mod.samples})
    labelled = sorted({s.identity for s in mod.samples if s.labelled})
    thresholds, fpirs, fpirs_k, fnirs = [], [], [], []
    for _ in range(rounds):
        drawn = Counter(rng.choice(people, size=len(people)).tolist())
        drawn_labelled = Counter(rng.choice(labelled, size=len(labelled)).tolist())
        imp = mod.impostor.stats(drawn)
        gen = mod.genuine.stats(drawn_labelled)
        # A draw needs two pairs of people and two people with genuine pairs to fit an sd.
        if imp["keys"] < 2 or gen["keys"] < 2:
            continue
        imp_fit = (imp["balanced_mean"], imp["balanced_sd"])
        thresholds.append(threshold_model(RECOMMEND_FPIR, *imp_fit, RECOMMEND_N * RECOMMEND_K))
        fpirs.append(float(fpir_model(t_rec, *imp_fit, RECOMMEND_N)))
        fpirs_k.append(float(fpir_model(t_rec, *imp_fit, RECOMMEND_N * RECOMMEND_K)))
        fnirs.append(fnir_model(t_rec, gen["balanced_mean"], gen["balanced_sd"], *imp_fit, RECOMMEND_N - 1)[0])

    def q(values: list[float]) -> list[float]:
        return [float(v) for v in np.quantile(values, [0.05, 0.5, 0.95])]

    return {"rounds": len(thresholds), "threshold_q05_q50_q95": q(thresholds),
            "fpir_N1000_q05_q50_q95": q(fpirs), "fpir_N1000_k3_q05_q50_q95": q(fpirs_k),
            "fnir_N1000_q05_q50_q95": q(fnirs)}


def _pct(x: float) -> str:
    if x == 0:
        return "0"
    return f"{100 * x:.1f} %" if x >= 0.001 else f"{100 * x:.2g} %"


def _table(header: Sequence[str], rows: Sequence[Sequence[Any]]) -> None:
    print("| " + " | ".join(header) + " |")
    print("|" + "---|" * len(header))
    for row in rows:
        print("| " + " | ".join(str(c) for c in row) + " |")


def print_report(name: str, r: dict[str, Any]) -> None:
    s, gen, imp = r["samples"], r["genuine"], r["impostor"]
    print(f"\n## {name}: {r['model']} ({r['dims']}-d)\n")
    print(f"{s['labelled_samples']} samples of {s['labelled_identities']} labelled people, "
          f"{s['stranger_samples']} of {s['stranger_identities']} strangers: "
          + ", ".join(f"{k} {v}" for k, v in s["per_identity"].items()) + "\n")
    _table(["1:1, template vs template", "pairs", "people / pairs of people", "mean", "sd", "balanced mean",
            "balanced sd", "min", "max"],
           [[label, st["n"], st["keys"], f"{st['mean']:.3f}", f"{st['sd']:.3f}", f"{st['balanced_mean']:.3f}",
             f"{st['balanced_sd']:.3f}", f"{st['min']:.3f}", f"{st['max']:.3f}"]
            for label, st in (("genuine (same person, other session)", gen), ("impostor", imp))])
    print("\nGenuine by person (pairs, mean, min): " + "; ".join(
        f"{p} {v['pairs']}, {v['mean']:.3f}, {v['min']:.3f}" for p, v in r["genuine_by_person"].items()))
    print("Highest impostor pairs of people (pairs, mean, max): " + "; ".join(
        f"{e['people']} {e['pairs']}, {e['mean']:.3f}, {e['max']:.3f}"
        for e in r["impostor_highest_pairs_of_people"][:3]))
    print(f"\nSynthetic gallery: templates unit(u + e), e ~ N(0, s^2 I), s = {r['synthetic_noise_sd_per_dim']:.4f} "
          f"per dimension, give the balanced genuine mean, with a genuine sd of only "
          f"{r['synthetic_genuine_sd']:.3f} (measured {gen['balanced_sd']:.3f}); random {r['dims']}-d unit vectors "
          f"have cosine sd {r['random_unit_vector_cosine_sd']:.3f} (impostor sd measured: {imp['balanced_sd']:.3f}).")

    print("\nMeasured, leave-one-identity-out (N subjects in each gallery). Thresholds for FPIR 1 % / 0.3 %: "
          "from the searches themselves, and from a normal fit of their non-mated top scores.\n")
    rows = []
    for k, row in r["by_templates"].items():
        c = row["counts"]
        cells = [k, c["gallery_subjects"], f"{c['mated_searches']} ({c['mated_probes']} / {c['mated_identities']})",
                 f"{c['nonmated_searches']} ({c['nonmated_probes']} / {c['nonmated_identities']})",
                 f"{100 * row['rank1']:.1f} %"]
        for kind in ("empirical", "nonmated_top_fit"):
            for target in FPIR_TARGETS:
                e = row["targets"][str(target)][kind]
                cells.append(f"{e['threshold']:.3f} / {_pct(e['fnir'])}")
        rows.append(cells)
    _table(["k", "N", "mated searches (probes / people)", "non-mated searches (probes / people)", "rank-1",
            "FPIR 1 %: t / FNIR", "FPIR 0.3 %: t / FNIR", "fit, FPIR 1 %: t / FNIR",
            "fit, FPIR 0.3 %: t / FNIR"], rows)
    check = r["model_check"]
    print(f"\nImpostor model checked at N = {check['gallery_subjects']}: its threshold for FPIR 1 % is "
          f"{check['threshold_for_fpir_1pc']:.3f}; measured there FPIR "
          f"{_pct(check['fpir_measured_per_search'])} per search, "
          f"{_pct(check['fpir_measured_per_stranger'])} with each stranger weighing the same"
          + ("; by stranger: " + ", ".join(f"{p} {_pct(v)}" for p, v in check["fpir_measured_by_stranger"].items())
             if check["fpir_measured_by_stranger"] else "") + ".")

    print("\nImpostor model, FPIR = 1 - (1 - FMR(t))^(N k): threshold t, then FNIR and rank-1 from the model "
          "and FNIR measured at t on the data's own small galleries:\n")
    rows = []
    for k, row in r["by_templates"].items():
        for target in FPIR_TARGETS:
            for n, e in row["targets"][str(target)]["impostor_model"].items():
                rows.append([k, n, _pct(target), f"{e['threshold']:.3f}", _pct(e["fnir_model"]),
                             f"{100 * e['rank1_model']:.1f} %", _pct(e["fnir_measured"])])
    _table(["k", "N", "FPIR", "t", "FNIR model", "rank-1 model", "FNIR measured"], rows)

    rec = r["recommended"]
    b = rec["bootstrap"]
    def quantiles(key: str, fmt=_pct) -> str:
        return " / ".join(fmt(v) for v in b[key])

    print(f"\nRecommended threshold {rec['threshold']:.2f}: the model's threshold for FPIR 1 % at "
          f"N = {RECOMMEND_N} with k = {RECOMMEND_K} is {rec['model_threshold']:.3f} "
          f"(k = 1: {rec['model_threshold_k1']:.3f}). Bootstrap over people ({b['rounds']} rounds), "
          f"5 / 50 / 95 %: that threshold {quantiles('threshold_q05_q50_q95', lambda v: f'{v:.3f}')}; "
          f"at {rec['threshold']:.2f}, FPIR (N=1000, k=1) {quantiles('fpir_N1000_q05_q50_q95')}, "
          f"FPIR (N=1000, k={RECOMMEND_K}) {quantiles('fpir_N1000_k3_q05_q50_q95')}, "
          f"FNIR (N=1000, k=1) {quantiles('fnir_N1000_q05_q50_q95')}.\n")
    sizes = [str(r["by_templates"]["1"]["counts"]["gallery_subjects"]), *map(str, GALLERY_SIZES)]
    rows = []
    for k, row in r["by_templates"].items():
        at = row["at_recommended"]
        cells = [k, _pct(at["fpir_measured"]), _pct(at["fpir_measured_per_stranger"]), _pct(at["fnir_measured"])]
        for n in (str(row["counts"]["gallery_subjects"]), *map(str, GALLERY_SIZES)):
            cells += [_pct(at[f"N{n}"]["fpir_model"]), _pct(at[f"N{n}"]["fnir_model"])]
        rows.append(cells)
    _table(["k", "FPIR measured", "per stranger", "FNIR measured",
            *[f"{kind} model N={n}" for n in ["data", *sizes[1:]] for kind in ("FPIR", "FNIR")]], rows)
    fails = {p: v for p, v in r["by_templates"]["1"]["at_recommended"]["fnir_measured_by_person"].items() if v}
    print("\nk = 1, FNIR measured by person at the recommended threshold: "
          + (", ".join(f"{p} {_pct(v)}" for p, v in fails.items()) if fails else "none missed"))
    for k, row in r["by_templates"].items():
        if "k1_same_people" in row:
            same = row["k1_same_people"]
            print(f"k = {k} has mated searches for {', '.join(row['mated_people'])} only; k = 1 on them: rank-1 "
                  f"{100 * same['rank1']:.1f} %, FNIR {_pct(same['fnir_measured_at_recommended'])} at the "
                  f"recommended threshold (k = {k}: {_pct(row['at_recommended']['fnir_measured'])}).")
    print(f"Fitted to all impostor pairs alike (not balanced), the model's threshold would be "
          f"{rec['model_threshold_pooled_fit']:.3f}.\n")
    _table(["t (k = 1)", "FPIR model N=100", "FNIR model N=100", "FPIR model N=1000", "FNIR model N=1000",
            "FNIR measured"],
           [[f"{e['threshold']:.2f}", _pct(e["fpir_model_N100"]), _pct(e["fnir_model_N100"]),
             _pct(e["fpir_model_N1000"]), _pct(e["fnir_model_N1000"]), _pct(e["fnir_measured"])]
            for e in r["tradeoff"]])
    v = rec["verify_threshold"]
    print(f"\nThe 1:1 verify threshold {v['threshold']:.2f} would give FPIR (model, k = 1) "
          + ", ".join(f"{_pct(v[f'fpir_model_N{n}'])} at N = {n}" for n in GALLERY_SIZES) + ".")


def plot(mods: list[Modality], results: dict[str, dict], path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(1, len(mods), figsize=(6.4 * len(mods), 6.0), constrained_layout=True)
    for ax, mod in zip(np.atleast_1d(axes), mods):
        r = results[mod.name]
        imp = r["impostor"]
        t = np.linspace(-0.1, 1.0, 1101)
        floor = 1e-5
        searches = mod.searches[1]
        n_data = searches.counts()["gallery_subjects"]
        ax.step(t, np.maximum(searches.fpir(t), floor), where="post", color="tab:red", lw=1.6,
                label=f"FPIR measured (N={n_data}, {searches.counts()['nonmated_probes']} strangers' samples)")
        for n, style in ((n_data, ":"), (100, "--"), (1000, "-")):
            ax.plot(t, np.maximum(fpir_model(t, imp["balanced_mean"], imp["balanced_sd"], n), floor), style,
                    color="tab:red", lw=1.0, alpha=0.8, label=f"FPIR model N={n}")
        ax.plot(t, np.maximum(fpir_model(t, imp["balanced_mean"], imp["balanced_sd"], 1000 * RECOMMEND_K), floor),
                "-.", color="tab:orange", lw=1.0, label=f"FPIR model N=1000, k={RECOMMEND_K} (bound)")
        colours = {1: "tab:blue", 2: "tab:cyan", 3: "tab:purple"}
        for k, s in mod.searches.items():
            if len(s.mated_top):
                ax.step(t, np.maximum(s.fnir(t), floor), where="post", color=colours[k], lw=1.6 if k == 1 else 1.0,
                        label=f"FNIR measured, k={k} ({s.counts()['mated_probes']} probes)")
        mated = mated_fit(searches)
        fnir_1000 = [fnir_model(x, mated["balanced_mean"], mated["balanced_sd"], imp["balanced_mean"],
                                imp["balanced_sd"], 999)[0] for x in t[::10]]
        ax.plot(t[::10], np.maximum(fnir_1000, floor), "-", color="tab:blue", lw=1.0, alpha=0.8,
                label="FNIR model N=1000, k=1")
        rec = r["recommended"]["threshold"]
        ax.axvline(rec, color="k", lw=0.8)
        ax.text(rec + 0.01, 2e-5, f"recommended {rec:.2f}", fontsize=8)
        ax.axvline(mod.verify_threshold, color="grey", lw=0.8, ls="--")
        ax.text(mod.verify_threshold + 0.01, 6e-5, f"1:1 verify {mod.verify_threshold:.2f}", fontsize=8, color="grey")
        for target in FPIR_TARGETS:
            ax.axhline(target, color="grey", lw=0.5, ls=":")
        ax.set_yscale("log")
        ax.set_ylim(floor, 1.2)
        ax.set_xlim(0.0, 1.0)
        ax.set_xlabel("threshold (cosine)")
        ax.set_ylabel("error rate")
        ax.set_title(f"{mod.name}: {mod.model}")
        ax.grid(alpha=0.3, which="both", lw=0.3)
        ax.legend(fontsize=7, loc="upper center", bbox_to_anchor=(0.5, -0.13), ncol=2)
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=110)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--data", type=Path, default=REPO.parent / "shared" / "data")
    parser.add_argument("--models", type=Path, default=REPO.parent / "shared" / "models")
    parser.add_argument("--face-model", default="arcface_mobilefacenet")
    parser.add_argument("--speaker-model", default="campplus_sv_zh_en")
    parser.add_argument("--chunk-s", type=float, default=4.0, help="seconds of speech per chunk of a long recording")
    parser.add_argument("--draws", type=int, default=200, help="random template choices per split")
    parser.add_argument("--bootstrap", type=int, default=2000, help="bootstrap rounds over people")
    parser.add_argument("--seed", type=int, default=20261207)
    parser.add_argument("--plot", type=Path, help="write the FPIR/FNIR curves here (PNG)")
    parser.add_argument("--json", type=Path, help="write every figure here")
    args = parser.parse_args()

    settings = Settings(models_dir=args.models.resolve(), face_embedding_model=args.face_model,
                        speaker_model=args.speaker_model)
    labels = json.loads((args.data / "labels.json").read_text())
    mods = []
    for name, kind in (("faces", "vision"), ("voices", "audio")):
        specs = selected_models(settings, kind)
        sessions = open_sessions(specs, settings.models_dir)
        if kind == "vision":
            pipeline: Any = VisionPipeline(sessions, specs, settings)
            samples = face_samples(pipeline, settings, args.data, labels)
            model = specs["face_embedding"].key
        else:
            pipeline = AudioPipeline(sessions, specs, settings)
            samples = voice_samples(pipeline, settings, args.data, labels, args.chunk_s)
            model = specs["speaker_embedding"].key
        genuine, impostor = one_to_one(samples)
        searches = {k: run_searches(samples, k, args.draws, args.seed + k) for k in TEMPLATE_COUNTS}
        mods.append(Modality(name, model, int(samples[0].vector.shape[0]), samples, genuine, impostor, searches,
                             float(pipeline.match_threshold)))

    print("# Open-set 1:N thresholds on ../shared/data")
    print(f"(leave-one-identity-out, {args.draws} template draws per split, seed {args.seed}; "
          f"chunks of {args.chunk_s:g} s of speech)")
    results = {}
    for mod in mods:
        results[mod.name] = analyse(mod, args.seed, args.bootstrap)
        print_report(mod.name, results[mod.name])
    if args.plot:
        plot(mods, results, args.plot)
        print(f"\nplot: {args.plot}")
    if args.json:
        args.json.parent.mkdir(parents=True, exist_ok=True)
        args.json.write_text(json.dumps({"args": {k: str(v) for k, v in vars(args).items()}, **results}, indent=1))
        print(f"json: {args.json}")


if __name__ == "__main__":
    main()
