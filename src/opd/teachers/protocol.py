"""The JSON wire format of `opd serve-teacher`, shared by the server and the client.

Plain JSON both ways (no pickle). A score answer's arrays are JSON lists (`"encoding":
"json"`, the default, for people and curl) or, as the client asks, `"base64"`: each array's
little-endian float32 / int32 bytes in base64, a tenth of the size and parsing time. Either way
a float32 log-prob arrives bit for bit. Every request is
checked field by field here; a bad one raises `BadRequest` with the HTTP status and one line
naming the field (or the limit) and the fix, which the server sends back as `{"error": ...}`.

    POST /v1/score     {"sequences": [[id, ...]], "response_starts": [i, ...], "k": 16,
                        "temperature": 1.0, "candidates": [[[id, ...] per position] ...] | null,
                        "encoding": "json" | "base64"}
                    →  {"results": [{"token_logprobs": [...], "topk_ids": [[...]],
                        "topk_logprobs": [[...]], "candidate_logprobs": [[...]] | null,
                        "entropy": [...]}], "entropy": "exact", "encoding": "json"}
                       (base64: each array flattened, candidates concatenated over positions)
    POST /v1/generate  {"prompts": [[id, ...]], "n": 1, "max_new_tokens": 64,
                        "temperature": 1.0, "top_p": 1.0, "seed": 0, "prompt_ids": [...] | null}
                    →  {"responses": [[id, ...]]}   (prompt-major, n per prompt)
    GET  /v1/model  →  {"model", "backend", "vocab_size", "tokenizer_fingerprint", "entropy",
                        "candidates", "temperatures", "limits"}
    GET  /v1/tokenizer → {"files": {name: text}}  (the tokenizer's text files as save_pretrained
                        writes them, chat template included, and generation_config.json)
    GET  /health    →  {"status": "ok"}

Position j of a sequence's answer scores the token at `response_starts + j` (every token from
the response start to the end of the sequence), given all the tokens before it.
"""

from __future__ import annotations

import base64
import hashlib
import json
import math
import tempfile
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

import torch

API_KEY_ENV = "OPD_TEACHER_API_KEY"
"""Environment variable holding the API key, for the server and for clients (so the key is in
no command line, config.yaml or run folder)."""

ENCODINGS = ("json", "base64")
"""How a score answer writes its arrays."""
WIRE_TYPES = {torch.float32: "<f4", torch.int64: "<i4"}
"""The bytes of each array type in base64 (token ids fit int32)."""

LOCAL_HOSTS = ("127.0.0.1", "localhost", "::1")
"""Hosts a server may bind without an API key."""


@dataclass(frozen=True)
class Limits:
    """What one request may ask of the server; beyond them it answers 413 or 422."""

    max_request_bytes: int = 32 * 2**20
    max_sequences: int = 1024
    max_sequence_tokens: int = 8192
    max_k: int = 1024
    max_new_tokens: int = 8192


class BadRequest(Exception):
    """A request the server refuses: `status` (400, 413, 422) and one line naming the field."""

    def __init__(self, status: int, message: str) -> None:
        super().__init__(message)
        self.status = status


def vocabulary_fingerprint(tokenizer: Any) -> str:
    """A digest of the token ↔ id map: two tokenizers with the same fingerprint give every
    token the same id, which token-level scoring needs."""
    items = sorted(tokenizer.get_vocab().items(), key=lambda item: item[1])
    return hashlib.sha256(json.dumps(items, ensure_ascii=False).encode()).hexdigest()[:32]


TOKENIZER_SUFFIXES = (".json", ".jinja", ".txt")
"""The files `GET /v1/tokenizer` sends: text only (JSON, the chat template, vocabularies);
a fast tokenizer loads from them without its binary sentencepiece model."""


def tokenizer_files(tokenizer: Any, generation: Any) -> dict[str, str]:
    """The tokenizer's text files as `save_pretrained` writes them, and the generation config
    (the EOS ids that end a response) when there is one: what a client needs to render prompts,
    encode and decode as the served teacher does."""
    with tempfile.TemporaryDirectory() as folder:
        tokenizer.save_pretrained(folder)
        if generation is not None:
            generation.save_pretrained(folder)
        return {path.name: path.read_text(encoding="utf-8")
                for path in sorted(Path(folder).iterdir()) if path.suffix in TOKENIZER_SUFFIXES}


def encode_array(values: torch.Tensor | list[torch.Tensor], encoding: str) -> Any:
    """An array (or a list of rows of different lengths) as JSON lists or base64 bytes."""
    if encoding == "json":
        return values.tolist() if isinstance(values, torch.Tensor) else [v.tolist() for v in values]
    flat = values.flatten() if isinstance(values, torch.Tensor) else torch.cat(values)
    wire = WIRE_TYPES[flat.dtype]
    return base64.b64encode(flat.cpu().numpy().astype(wire).tobytes()).decode("ascii")


def decode_array(value: Any, dtype: torch.dtype) -> torch.Tensor:
    """`encode_array`'s output back as a flat tensor of `dtype` (float32 or int64)."""
    if isinstance(value, str):
        import numpy as np

        raw = np.frombuffer(base64.b64decode(value), dtype=WIRE_TYPES[dtype])
        return torch.from_numpy(raw.astype(raw.dtype.newbyteorder("="))).to(dtype)
    return torch.tensor(value, dtype=dtype).flatten()


def parse_json(body: bytes) -> dict[str, Any]:
    """The request body as a JSON object, or a 400 saying why not."""
    try:
        data = json.loads(body)
    except (UnicodeDecodeError, json.JSONDecodeError) as err:
        raise BadRequest(400, f"body: not valid JSON ({err}); send a JSON object") from None
    if not isinstance(data, dict):
        raise BadRequest(400, f"body: a JSON {type(data).__name__}, not an object; send a "
                         "JSON object with the documented fields")
    return data


def _int(value: Any, name: str, low: int, high: int | None = None,
         limit: str | None = None) -> int:
    if isinstance(value, bool) or not isinstance(value, int):
        raise BadRequest(422, f"{name}: expected an integer, got {json.dumps(value)[:40]}")
    if value < low or (high is not None and value > high):
        bound = f"between {low} and {high}" if high is not None else f"at least {low}"
        why = f" (the server's {limit})" if limit else ""
        raise BadRequest(422, f"{name}: {value} is not {bound}{why}")
    return value


def _float(value: Any, name: str, *, positive: bool = False) -> float:
    if isinstance(value, bool) or not isinstance(value, int | float) or not math.isfinite(value):
        raise BadRequest(422, f"{name}: expected a finite number, got {json.dumps(value)[:40]}")
    if positive and value <= 0:
        raise BadRequest(422, f"{name}: {value} must be above 0")
    return float(value)


def _list(value: Any, name: str, limit: int | None = None, limit_name: str = "") -> list:
    if not isinstance(value, list):
        raise BadRequest(422, f"{name}: expected a list, got {json.dumps(value)[:40]}")
    if limit is not None and len(value) > limit:
        raise BadRequest(413 if limit_name.startswith("max_sequences") else 422,
                         f"{name}: {len(value)} entries, more than {limit_name} ({limit}); "
                         "send fewer per request")
    return value


def _token_ids(value: Any, name: str, vocab_size: int, limits: Limits) -> list[int]:
    ids = _list(value, name)
    if len(ids) > limits.max_sequence_tokens:
        raise BadRequest(422, f"{name}: {len(ids)} tokens, more than max_sequence_tokens "
                         f"({limits.max_sequence_tokens}); send shorter sequences or start "
                         "the server with a higher --max-sequence-tokens")
    _check_ids(ids, name, vocab_size)
    return ids


def _check_ids(ids: list, name: str, vocab_size: int) -> None:
    """Every entry a token id of the vocabulary; the first bad one is named."""
    if all(type(t) is int for t in ids) and (not ids or 0 <= min(ids) <= max(ids) < vocab_size):
        return
    for i, token in enumerate(ids):
        _int(token, f"{name}[{i}]", 0, vocab_size - 1, "vocabulary")


def _known(data: dict[str, Any], allowed: set[str]) -> None:
    unknown = sorted(set(data) - allowed)
    if unknown:
        raise BadRequest(422, f"{unknown[0]}: not a field of this request; the fields are "
                         f"{sorted(allowed)}")


def _required(data: dict[str, Any], name: str) -> Any:
    if name not in data:
        raise BadRequest(422, f"{name}: missing (a required field)")
    return data[name]


@dataclass(frozen=True)
class ScoreRequest:
    """Token sequences to score from `response_starts` on: per position the teacher's log-prob
    of the token, its top-`k` ids and log-probs, the log-probs of `candidates` and its entropy,
    all at `temperature`."""

    sequences: list[list[int]]
    response_starts: list[int]
    k: int
    temperature: float = 1.0
    candidates: list[list[list[int]]] | None = None
    encoding: str = "json"

    def to_json(self) -> dict[str, Any]:
        return {"sequences": self.sequences, "response_starts": self.response_starts,
                "k": self.k, "temperature": self.temperature, "candidates": self.candidates,
                "encoding": self.encoding}

    @classmethod
    def parse(cls, data: dict[str, Any], vocab_size: int, limits: Limits) -> ScoreRequest:
        _known(data, {"sequences", "response_starts", "k", "temperature", "candidates",
                      "encoding"})
        sequences = _list(_required(data, "sequences"), "sequences", limits.max_sequences,
                          "max_sequences")
        sequences = [_token_ids(s, f"sequences[{i}]", vocab_size, limits)
                     for i, s in enumerate(sequences)]
        starts = _list(_required(data, "response_starts"), "response_starts")
        if len(starts) != len(sequences):
            raise BadRequest(422, f"response_starts: {len(starts)} entries for {len(sequences)} "
                             "sequences; give one start per sequence")
        starts = [_int(s, f"response_starts[{i}]", 1, max(1, len(sequences[i]) - 1))
                  for i, s in enumerate(starts)]
        k = _int(_required(data, "k"), "k", 1, min(limits.max_k, vocab_size), "max_k")
        temperature = _float(data.get("temperature", 1.0), "temperature", positive=True)
        candidates = data.get("candidates")
        if candidates is not None:
            candidates = _list(candidates, "candidates")
            if len(candidates) != len(sequences):
                raise BadRequest(422, f"candidates: {len(candidates)} entries for "
                                 f"{len(sequences)} sequences; give one list per sequence")
            for i, (rows, seq, start) in enumerate(zip(candidates, sequences, starts, strict=True)):
                rows = _list(rows, f"candidates[{i}]")
                if len(rows) != len(seq) - start:
                    raise BadRequest(422, f"candidates[{i}]: {len(rows)} positions, but the "
                                     f"response has {len(seq) - start}; give one list per "
                                     "response position")
                for j, row in enumerate(rows):
                    ids = _list(row, f"candidates[{i}][{j}]", limits.max_k, "max_k")
                    _check_ids(ids, f"candidates[{i}][{j}]", vocab_size)
        encoding = data.get("encoding", "json")
        if encoding not in ENCODINGS:
            raise BadRequest(422, f"encoding: {json.dumps(encoding)[:40]} is not one of "
                             f"{json.dumps(ENCODINGS)}")
        return cls(sequences, starts, k, temperature, candidates, encoding)


@dataclass(frozen=True)
class GenerateRequest:
    """Prompts (token ids) the teacher continues, `n` samples each, seeded per sample."""

    prompts: list[list[int]]
    n: int = 1
    max_new_tokens: int = 64
    temperature: float = 1.0
    top_p: float = 1.0
    seed: int = 0
    prompt_ids: list[int] | None = None

    def to_json(self) -> dict[str, Any]:
        return asdict(self)

    @classmethod
    def parse(cls, data: dict[str, Any], vocab_size: int, limits: Limits) -> GenerateRequest:
        _known(data, {"prompts", "n", "max_new_tokens", "temperature", "top_p", "seed",
                      "prompt_ids"})
        prompts = _list(_required(data, "prompts"), "prompts", limits.max_sequences,
                        "max_sequences")
        prompts = [_token_ids(p, f"prompts[{i}]", vocab_size, limits)
                   for i, p in enumerate(prompts)]
        for i, prompt in enumerate(prompts):
            if not prompt:
                raise BadRequest(422, f"prompts[{i}]: empty; give at least one token")
        n = _int(data.get("n", 1), "n", 1, limits.max_sequences, "max_sequences")
        max_new = _int(data.get("max_new_tokens", 64), "max_new_tokens", 1,
                       limits.max_new_tokens, "max_new_tokens")
        temperature = _float(data.get("temperature", 1.0), "temperature")
        if temperature < 0:
            raise BadRequest(422, f"temperature: {temperature} must be at least 0")
        top_p = _float(data.get("top_p", 1.0), "top_p", positive=True)
        if top_p > 1:
            raise BadRequest(422, f"top_p: {top_p} must be at most 1")
        seed = _int(data.get("seed", 0), "seed", -(2**63), 2**63 - 1)
        prompt_ids = data.get("prompt_ids")
        if prompt_ids is not None:
            prompt_ids = _list(prompt_ids, "prompt_ids")
            if len(prompt_ids) != len(prompts):
                raise BadRequest(422, f"prompt_ids: {len(prompt_ids)} entries for "
                                 f"{len(prompts)} prompts; give one id per prompt")
            prompt_ids = [_int(p, f"prompt_ids[{i}]", 0) for i, p in enumerate(prompt_ids)]
        return cls(prompts, n, max_new, temperature, top_p, seed, prompt_ids)
