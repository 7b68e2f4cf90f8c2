"""The client of `opd serve-teacher`, and the served teacher the trainer scores with.

Standard library only (urllib, threads), so training against a served teacher needs no extra.
Requests are split into parts of `SEQUENCES_PER_REQUEST` sequences, several in flight at once;
a connection error, a timeout or a 5xx answer is retried with exponential backoff for
`timeout` seconds, after which `TeacherUnavailable` (an `OPDError`) stops the caller in one
line. A 4xx answer is the caller's mistake and stops at once, with the server's message.
"""

from __future__ import annotations

import functools
import json
import os
import tempfile
import time
import urllib.error
import urllib.request
from collections.abc import Sequence
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from transformers import GenerationConfig

from opd.errors import OPDError, one_line
from opd.models.loading import load_tokenizer
from opd.step.distributions import UNKNOWN_LOGPROB
from opd.step.rollout import Rollouts, assemble_rollouts, eos_token_ids, pad_token_id, prompt_token_rows
from opd.step.scoring import Head, ResponseStates, TeacherChunk, student_topk_ids
from opd.teachers.protocol import API_KEY_ENV, GenerateRequest, ScoreRequest, decode_array

SEQUENCES_PER_REQUEST = 16
IN_FLIGHT = 4
FIRST_BACKOFF_S, MAX_BACKOFF_S = 0.1, 2.0


class TeacherUnavailable(OPDError):
    """The served teacher did not answer within the timeout."""


class TeacherClient:
    """Talks to one served teacher at `url` (http://host:port)."""

    def __init__(self, url: str, *, timeout: float = 60.0, api_key: str | None = None) -> None:
        self.url = url.rstrip("/")
        self.timeout = timeout
        self.api_key = api_key if api_key is not None else os.environ.get(API_KEY_ENV)

    def _once(self, path: str, payload: dict[str, Any] | None) -> dict[str, Any]:
        headers = {"Content-Type": "application/json"}
        if self.api_key:
            headers["Authorization"] = f"Bearer {self.api_key}"
        data = None if payload is None else json.dumps(payload).encode()
        request = urllib.request.Request(self.url + path, data=data, headers=headers,
                                         method="GET" if payload is None else "POST")
        with urllib.request.urlopen(request, timeout=self.timeout) as response:
            return json.loads(response.read())

    def call(self, path: str, payload: dict[str, Any] | None = None) -> dict[str, Any]:
        """One request, retried with backoff while the teacher is unreachable or failing."""
        deadline, wait = time.monotonic() + self.timeout, FIRST_BACKOFF_S
        while True:
            try:
                return self._once(path, payload)
            except urllib.error.HTTPError as err:
                if err.code < 500:
                    raise OPDError(f"teacher: {self.url}{path} refused the request "
                                   f"({err.code}): {_server_message(err)}") from None
                problem = f"HTTP {err.code}: {_server_message(err)}"
            except (urllib.error.URLError, OSError) as err:  # refused, reset, timed out
                problem = one_line(getattr(err, "reason", err), 120)
            if time.monotonic() + wait > deadline:
                raise TeacherUnavailable(
                    f"teacher: {self.url} did not answer for teacher_timeout ({self.timeout:g} "
                    f"s; last: {problem}); start the teacher again (or raise teacher_timeout), "
                    "then continue with --resume") from None
            time.sleep(wait)
            wait = min(2 * wait, MAX_BACKOFF_S)

    def info(self) -> dict[str, Any]:
        """The served model: name, backend, vocab_size, tokenizer_fingerprint, limits."""
        return self.call("/v1/model")

    def score(self, request: ScoreRequest) -> list[dict[str, Any]]:
        """The answer for each sequence, in order; the request is sent in parts, several at
        once."""
        parts = []
        for start in range(0, len(request.sequences), SEQUENCES_PER_REQUEST):
            rows = slice(start, start + SEQUENCES_PER_REQUEST)
            parts.append(ScoreRequest(
                request.sequences[rows], request.response_starts[rows], request.k,
                request.temperature,
                None if request.candidates is None else request.candidates[rows],
                request.encoding).to_json())
        with ThreadPoolExecutor(IN_FLIGHT) as pool:
            answers = list(pool.map(lambda part: self.call("/v1/score", part), parts))
        return [result for answer in answers for result in answer["results"]]

    def generate(self, request: GenerateRequest) -> list[list[int]]:
        """The teacher's sampled responses (token ids), prompt-major, `n` per prompt."""
        return self.call("/v1/generate", request.to_json())["responses"]

    @functools.cached_property
    def files(self) -> dict[str, str]:
        """The served tokenizer's files and generation config (`GET /v1/tokenizer`)."""
        files = self.call("/v1/tokenizer")["files"]
        for name in files:
            if Path(name).name != name or name.startswith("."):
                raise OPDError(f"teacher: {self.url} sent a tokenizer file named {name!r}, not a "
                               "plain file name; is it an opd serve-teacher?")
        return files

    def tokenizer(self, role: str, trust_remote_code: bool = False) -> Any:
        """The served teacher's tokenizer, chat template included, loaded as from a folder (its
        files written to a temporary one)."""
        with tempfile.TemporaryDirectory() as folder:
            for name, text in self.files.items():
                (Path(folder) / name).write_text(text, encoding="utf-8")
            return load_tokenizer(folder, role, trust_remote_code)

    def rollouts(self, tokenizer: Any, prompts: Sequence[str] | Sequence[list[int]], *, n: int = 1,
                 max_new_tokens: int = 256, temperature: float = 1.0, top_p: float = 1.0,
                 seed: int = 0, prompt_ids: Sequence[int] | None = None,
                 max_prompt_tokens: int | None = None) -> Rollouts:
        """`generate_rollouts`' rollouts (same seeds, rows and padding) sampled by the served
        teacher; `tokenizer` is its own (`tokenizer`). Sent in parts, several at once."""
        encoded = prompt_token_rows(tokenizer, prompts, max_prompt_tokens)
        ids = list(range(len(encoded))) if prompt_ids is None else list(prompt_ids)
        parts = [GenerateRequest(encoded[start:start + SEQUENCES_PER_REQUEST], n, max_new_tokens,
                                 temperature, top_p, seed, ids[start:start + SEQUENCES_PER_REQUEST])
                 for start in range(0, len(encoded), SEQUENCES_PER_REQUEST)]
        with ThreadPoolExecutor(IN_FLIGHT) as pool:
            answers = list(pool.map(self.generate, parts))
        generation = self.files.get("generation_config.json")
        eos_ids = eos_token_ids(tokenizer, None if generation is None else
                                GenerationConfig.from_dict(json.loads(generation)))
        return assemble_rollouts(tokenizer, encoded, [i for i in range(len(encoded)) for _ in range(n)],
                                 [r for answer in answers for r in answer], eos_ids,
                                 pad_token_id(tokenizer))


def _server_message(err: urllib.error.HTTPError) -> str:
    try:
        return one_line(json.loads(err.read()).get("error", ""), 300) or err.reason
    except (ValueError, AttributeError, OSError):
        return str(err.reason)


def check_served_vocabulary(info: dict[str, Any], fingerprint: str, vocab_size: int,
                            url: str) -> None:
    """A served teacher must give every token the id the student gives it, and score the same
    number of ids; refuse it before the first step otherwise."""
    if info.get("tokenizer_fingerprint") != fingerprint or info.get("vocab_size") != vocab_size:
        raise OPDError(
            f"teacher: the model served at {url} ({info.get('model')!r}, {info.get('vocab_size')} "
            f"ids, tokenizer {info.get('tokenizer_fingerprint')}) has another vocabulary than the "
            f"student ({vocab_size} ids, tokenizer {fingerprint}); token-level OPD needs one "
            "vocabulary: serve a teacher from the student's tokenizer family")


def check_served_capabilities(info: dict[str, Any], url: str, *, candidates: bool,
                              temperature: float) -> None:
    """Refuse, before the first step, a served teacher whose backend cannot answer what the
    objective will ask: the student's candidate tokens, or a temperature other than 1."""
    backend = f"the teacher served at {url} ({info.get('backend')} backend)"
    if candidates and not info.get("candidates", True):
        raise OPDError(f"objective.strategy: {backend} cannot score the student's candidate "
                       "tokens, which the student-side top-k strategies (student, union, "
                       "symmetric-difference) need; serve it with --backend hf, or choose "
                       "strategy teacher or intersection")
    if temperature != 1 and not info.get("temperatures", True):
        raise OPDError(f"objective.teacher_temperature: {backend} scores at temperature 1 only; "
                       "set objective.teacher_temperature=1, or serve it with --backend hf")


@dataclass
class PartialTeacher:
    """A served teacher's answer for the scored positions, as `TeacherLogprobs`: dense [n, V]
    log-probs a chunk at a time, with the sent entries (sampled token, teacher top-k, student
    candidates) and `UNKNOWN_LOGPROB` elsewhere, plus the entropy the server sent (exact, or a
    top-k estimate: `ServedTeacher.entropy`)."""

    targets: torch.Tensor  # [M]
    token_lp: torch.Tensor  # [M]
    ids: torch.Tensor  # [M, k + c]: teacher top-k, then candidates
    values: torch.Tensor  # [M, k + c]
    entropy: torch.Tensor  # [M]
    vocab_size: int

    def chunk(self, part: slice, device: torch.device) -> TeacherChunk:
        targets = self.targets[part].to(device)
        dense = torch.full((targets.shape[0], self.vocab_size), UNKNOWN_LOGPROB, device=device)
        dense.scatter_(-1, self.ids[part].to(device), self.values[part].to(device))
        dense.scatter_(-1, targets[:, None], self.token_lp[part, None].to(device))
        return TeacherChunk(dense, self.entropy[part].to(device))


class ServedTeacher:
    """The trainer's teacher when `teacher` is a URL: per micro-batch, one scoring request for
    the rollouts with the student's own top-`candidates_k` ids as candidates. `entropy` is what
    the server's entropies are: exact, or topk (estimates from the top-k)."""

    reads_student = True
    reads_text = False

    def __init__(self, client: TeacherClient, *, vocab_size: int, k: int, candidates_k: int,
                 temperature: float, chunk_size: int = 256, entropy: str = "exact") -> None:
        self.client, self.vocab_size, self.entropy = client, vocab_size, entropy
        self.k, self.candidates_k = k, candidates_k
        self.temperature, self.chunk_size = temperature, chunk_size

    def token_logprobs(self, inputs: tuple[torch.Tensor, torch.Tensor, torch.Tensor]
                       ) -> torch.Tensor:
        """The teacher's log-prob [M] of each response token of `inputs`, row-major (as
        `ResponseStates`), at its temperature."""
        scored = _scored_sequences(inputs)
        results = self.client.score(ScoreRequest(
            [s for s, _ in scored], [start for _, start in scored], 1, self.temperature,
            encoding="base64")) if scored else []
        parts = [decode_array(r["token_logprobs"], torch.float32) for r in results]
        return torch.cat(parts) if parts else torch.empty(0)

    def logprobs(self, inputs: tuple[torch.Tensor, torch.Tensor, torch.Tensor],
                 student: ResponseStates, student_head: Head) -> PartialTeacher:
        scored = _scored_sequences(inputs)
        candidates = None
        if self.candidates_k:
            per_token = student_topk_ids(student, student_head, self.candidates_k,
                                         self.chunk_size).cpu()
            lengths = [len(s) - start for s, start in scored]
            candidates = [part.tolist() for part in per_token.split(lengths)]
        results = self.client.score(ScoreRequest(
            [s for s, _ in scored], [start for _, start in scored], self.k, self.temperature,
            candidates, encoding="base64")) if scored else []
        width = self.k + self.candidates_k
        ids, values = [], []
        for result, per in zip(results, candidates or [None] * len(results), strict=True):
            n = decode_array(result["entropy"], torch.float32).shape[0]
            ids.append(torch.cat([decode_array(result["topk_ids"], torch.long).view(n, -1),
                                  torch.tensor(per or [[]] * n, dtype=torch.long).view(n, -1)], 1))
            values.append(torch.cat([
                decode_array(result["topk_logprobs"], torch.float32).view(n, -1),
                decode_array(result["candidate_logprobs"] or [], torch.float32).view(n, -1)], 1))

        def joined(name: str | list[torch.Tensor], dtype: torch.dtype) -> torch.Tensor:
            parts = name if isinstance(name, list) else [decode_array(r[name], dtype)
                                                         for r in results]
            return torch.cat(parts) if parts else torch.empty(0, dtype=dtype)

        return PartialTeacher(
            targets=student.targets.cpu(),
            token_lp=joined("token_logprobs", torch.float32),
            ids=joined(ids, torch.long).view(-1, width),
            values=joined(values, torch.float32).view(-1, width),
            entropy=joined("entropy", torch.float32),
            vocab_size=self.vocab_size,
        )


def _scored_sequences(inputs: tuple[torch.Tensor, torch.Tensor, torch.Tensor]
                      ) -> list[tuple[list[int], int]]:
    """Each row of a packed batch (input ids, attention, response mask) as its tokens and the
    index of its first response token; rows without a response token are left out."""
    input_ids, attention, response = inputs
    sequences = []
    for ids, keep, answer in zip(input_ids, attention.bool(), response, strict=True):
        kept = ids[keep].tolist()
        first = int(answer[keep].nonzero()[0]) if answer.any() else len(kept)
        if first < len(kept):
            sequences.append((kept, first))
    return sequences
