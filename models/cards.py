"""Model cards: the JSON beside each ONNX file that says what the model is for and how to feed it.

The card is authoritative.  The ONNX file carries the card's id and input contract in its
``metadata_props`` so a stray file identifies itself; loading refuses a card whose sha256 or
contract disagrees with its ONNX file, naming the file; the metadata is read from the file's
protobuf directly (:func:`onnx_metadata`), so the check runs on every backend.  Models for an
acquisition are chosen by task, kV and convergence angle within stated tolerances, or refused
with the list available.
"""
from __future__ import annotations

import hashlib
import json
from dataclasses import dataclass
from pathlib import Path

SHIPPED_DIR = Path(__file__).parent / "shipped"
REQUIRED = ("id", "task", "onnx_file", "onnx_sha256", "input", "outputs", "training", "validation")
META_ID, META_INPUT = "stemlive_card_id", "stemlive_input"
KV_TOLERANCE = 1.0  # [kV]
ALPHA_TOLERANCE = 0.03  # relative


class ModelMismatch(ValueError):
    """A card and its ONNX file disagree, or a file is not what it claims to be."""


def sha256_of(path: Path) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as fh:
        for chunk in iter(lambda: fh.read(1 << 20), b""):
            h.update(chunk)
    return h.hexdigest()


@dataclass(frozen=True)
class ModelCard:
    data: dict
    path: Path  # the .json file

    @property
    def id(self) -> str:
        return self.data["id"]

    @property
    def task(self) -> str:
        return self.data["task"]

    @property
    def onnx_path(self) -> Path:
        return self.path.parent / self.data["onnx_file"]

    @property
    def kv(self) -> float | None:
        return self.data["training"].get("kv")

    @property
    def alpha_mrad(self) -> float | None:
        return self.data["training"].get("alpha_mrad")

    def input_contract(self) -> str:
        return json.dumps(self.data["input"], sort_keys=True)

    def summary(self) -> str:
        t = self.data["training"]
        return f"{self.id} ({self.task}, {t.get('material')} {t.get('zone')}, {self.kv} kV, {self.alpha_mrad} mrad)"


def load_card(path: str | Path) -> ModelCard:
    path = Path(path)
    try:
        data = json.loads(path.read_text())
    except FileNotFoundError:
        raise FileNotFoundError(f"model card {path} does not exist") from None
    except json.JSONDecodeError as exc:
        raise ModelMismatch(f"model card {path} is not valid JSON: {exc}") from None
    missing = [k for k in REQUIRED if k not in data]
    if missing:
        raise ModelMismatch(f"model card {path} lacks {', '.join(missing)}")
    return ModelCard(data, path)


def verify(card: ModelCard, metadata: dict[str, str] | None = None) -> Path:
    """Check the ONNX file against the card (sha256; metadata if given). Returns the ONNX path."""
    onnx_path = card.onnx_path
    if not onnx_path.exists():
        raise FileNotFoundError(f"{card.path.name} names {onnx_path.name}, which does not exist in {onnx_path.parent}")
    digest = sha256_of(onnx_path)
    if digest != card.data["onnx_sha256"]:
        raise ModelMismatch(
            f"{onnx_path} does not match its card {card.path.name}: sha256 {digest[:12]}… ≠ "
            f"{card.data['onnx_sha256'][:12]}… (a stale or modified model file; re-export it)"
        )
    if metadata is not None:
        if metadata.get(META_ID) != card.id:
            raise ModelMismatch(f"{onnx_path} says it is {metadata.get(META_ID)!r}, its card {card.path.name} "
                                f"says {card.id!r}")
        if metadata.get(META_INPUT) != card.input_contract():
            raise ModelMismatch(f"{onnx_path}: input contract in the file differs from {card.path.name}")
    return onnx_path


def _varint(buf: bytes, pos: int) -> tuple[int, int]:
    """A protobuf varint at ``pos``: (value, position after it)."""
    value = shift = 0
    while True:
        if pos >= len(buf) or shift > 63:
            raise ModelMismatch("truncated or malformed protobuf varint")
        byte = buf[pos]
        pos += 1
        value |= (byte & 0x7F) << shift
        if byte < 0x80:
            return value, pos
        shift += 7


def _fields(buf: bytes):
    """(field number, wire type, value) of one protobuf message's top-level fields; nested
    messages come back as bytes, unparsed (a 2 MB model's graph is skipped, not decoded)."""
    pos = 0
    while pos < len(buf):
        tag, pos = _varint(buf, pos)
        number, wire = tag >> 3, tag & 7
        if wire == 0:
            value, pos = _varint(buf, pos)
        elif wire == 1:
            value, pos = buf[pos:pos + 8], pos + 8
        elif wire == 2:
            size, pos = _varint(buf, pos)
            value, pos = buf[pos:pos + size], pos + size
        elif wire == 5:
            value, pos = buf[pos:pos + 4], pos + 4
        else:  # 3/4: proto2 groups, which ONNX never uses
            raise ModelMismatch(f"unsupported protobuf wire type {wire}")
        if pos > len(buf):
            raise ModelMismatch("truncated protobuf message")
        yield number, wire, value


_MODEL_METADATA_PROPS, _ENTRY_KEY, _ENTRY_VALUE = 14, 1, 2  # onnx.proto: ModelProto, StringStringEntryProto


def onnx_metadata(path: str | Path) -> dict[str, str]:
    """The ``metadata_props`` of an ONNX file, read from its protobuf wire format directly.

    Every backend can then check a model against its card (TensorRT has no way to report them,
    and the onnx package is a development dependency only).  Only the top level of the ModelProto
    is walked; the graph is skipped by its length prefix."""
    path = Path(path)
    props: dict[str, str] = {}
    try:
        for number, wire, value in _fields(path.read_bytes()):
            if number != _MODEL_METADATA_PROPS or wire != 2:
                continue
            entry = {n: v for n, w, v in _fields(value) if w == 2 and n in (_ENTRY_KEY, _ENTRY_VALUE)}
            props[bytes(entry.get(_ENTRY_KEY, b"")).decode()] = bytes(entry.get(_ENTRY_VALUE, b"")).decode()
    except (ModelMismatch, UnicodeDecodeError) as exc:
        raise ModelMismatch(f"{path} is not a readable ONNX file: {exc}") from None
    return props


# JSON files beside the cards that are not cards: the library check's σ calibration
NOT_CARDS = ("_check_sigma.json",)


def find_cards(directory: str | Path = SHIPPED_DIR, task: str | None = None) -> list[ModelCard]:
    cards = []
    for p in sorted(Path(directory).glob("*.json")):
        if p.name.endswith(NOT_CARDS):
            continue
        card = load_card(p)
        if task is None or card.task == task:
            cards.append(card)
    return cards


def latest_card(directory: str | Path, task: str, train_with: str) -> ModelCard:
    """The newest card of ``task`` in ``directory``, or a FileNotFoundError naming what the
    directory holds and how to train one (``train_with``: the command)."""
    cards = find_cards(directory, task)
    if not cards:
        have = sorted({c.task for c in find_cards(directory)})
        raise FileNotFoundError(f"no {task} model in {directory} (it holds: {', '.join(have) or 'nothing'}); "
                                f"train one with {train_with}")
    return cards[-1]


def select(cards: list[ModelCard], task: str, kv: float, alpha_mrad: float) -> ModelCard:
    """The card for ``task`` whose kV and convergence angle match the acquisition."""
    ok = [c for c in cards if c.task == task and c.kv is not None and abs(c.kv - kv) <= KV_TOLERANCE
          and abs(c.alpha_mrad - alpha_mrad) <= ALPHA_TOLERANCE * c.alpha_mrad]
    if not ok:
        avail = "; ".join(c.summary() for c in cards if c.task == task) or "none"
        raise ValueError(f"no {task} model for {kv:g} kV and {alpha_mrad:g} mrad (tolerance ±{KV_TOLERANCE:g} kV, "
                         f"±{ALPHA_TOLERANCE:.0%}); available: {avail}")
    return min(ok, key=lambda c: abs(c.alpha_mrad - alpha_mrad))


def write_metadata(onnx_path: Path, card_data: dict) -> None:
    """Put the card id and input contract into the ONNX file (before its sha256 is taken)."""
    import onnx

    model = onnx.load(str(onnx_path))
    keep = [p for p in model.metadata_props if p.key not in (META_ID, META_INPUT)]
    del model.metadata_props[:]
    model.metadata_props.extend(keep)
    for key, value in ((META_ID, card_data["id"]), (META_INPUT, json.dumps(card_data["input"], sort_keys=True))):
        prop = model.metadata_props.add()
        prop.key, prop.value = key, value
    onnx.save(model, str(onnx_path))
