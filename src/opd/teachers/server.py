"""`opd serve-teacher`: a teacher model behind an HTTP JSON API (FastAPI + uvicorn, the
`serve` extra), so training runs on other processes or machines score with it.

The `hf` backend runs the model through transformers exactly as the trainer does (backbone
once, then output head and log-softmax a chunk of positions at a time), so a served teacher's
log-probs equal an in-process one's. Requests are batched inside the server by a token budget
and run one batch at a time. The `vllm` backend (`vllm_backend`) scores through vLLM's prompt
log-probs: top-k only, with a top-k entropy estimate. The wire format and its checks are in
`protocol`.
"""

# No `from __future__ import annotations`: FastAPI reads the endpoints' annotations
# (fastapi.Request, imported when the app is made) at run time.
import hmac
import os
import threading
from dataclasses import dataclass
from typing import Any, Protocol

import torch

from opd.config.fields import ModelLoading, OneModel, VLLMConfig
from opd.config.settings import group, setting
from opd.errors import OPDError
from opd.models.loading import default_device, load_model, load_tokenizer
from opd.step.distributions import entropy, topk_indices
from opd.step.engines import require_engine
from opd.step.rollout import generate_rollouts
from opd.step.scoring import output_head, response_states
from opd.teachers.protocol import (
    API_KEY_ENV,
    LOCAL_HOSTS,
    BadRequest,
    GenerateRequest,
    Limits,
    ScoreRequest,
    encode_array,
    parse_json,
    tokenizer_files,
    vocabulary_fingerprint,
)
from opd.version import __version__


@dataclass(frozen=True, kw_only=True)
class ServeConfig(ModelLoading, OneModel):
    """Settings of `opd serve-teacher`."""

    model: str = setting("", "Teacher model folder (or hub id) to serve.")
    host: str = setting("127.0.0.1", "Address to bind; anything but 127.0.0.1 / localhost "
                        "needs an API key.")
    port: int = setting(8000, "TCP port.", minimum=0, maximum=65535)
    backend: str = setting("hf", "Scoring backend: hf (transformers; CPU or GPU; exact "
                           "log-probs and entropy; any temperature; the student's candidates) or "
                           "vllm (the vllm extra; top-k and the tokens' log-probs at temperature "
                           "1, a top-k entropy estimate, no candidates).", choices=("hf", "vllm"))
    vllm: VLLMConfig = group(VLLMConfig, "The vLLM engine (backend vllm; memory_share is the "
                             "share of the GPU it takes, sleep does not apply).")
    api_key: str | None = setting(None, f"Key clients must send (Authorization: Bearer KEY); "
                                  f"default: the {API_KEY_ENV} environment variable.")
    batch_tokens: int = setting(16384, "Token budget of one forward pass: a request's "
                                "sequences are run in batches of at most this many tokens.",
                                minimum=1)
    chunk_size: int = setting(256, "Positions per chunk of output head and log-softmax.",
                              minimum=1)
    max_request_bytes: int = setting(Limits.max_request_bytes, "Largest request body (413 "
                                     "beyond).", minimum=1)
    max_sequences: int = setting(Limits.max_sequences, "Most sequences (or prompts) per "
                                 "request.", minimum=1)
    max_sequence_tokens: int = setting(Limits.max_sequence_tokens, "Longest sequence (or "
                                       "prompt) in tokens.", minimum=1)
    max_k: int = setting(Limits.max_k, "Largest top-k and candidate list per position.",
                         minimum=1)
    max_new_tokens: int = setting(Limits.max_new_tokens, "Longest generation asked of "
                                  "/v1/generate.", minimum=1)

    def check(self) -> None:
        if not self.model:
            raise OPDError("model: no teacher given; pass --model PATH")
        if self.backend == "vllm":
            require_engine("vllm", "backend")

    def limits(self) -> Limits:
        return Limits(self.max_request_bytes, self.max_sequences, self.max_sequence_tokens,
                      self.max_k, self.max_new_tokens)

    def key(self) -> str | None:
        """The API key in force; binding beyond this machine without one is refused."""
        key = self.api_key or os.environ.get(API_KEY_ENV) or None
        if key is None and self.host not in LOCAL_HOSTS:
            raise OPDError(f"api_key: binding {self.host} makes the teacher reachable from other "
                           f"machines; pass --api-key KEY (or set {API_KEY_ENV}), or bind "
                           "127.0.0.1")
        return key


class Backend(Protocol):
    """What the app serves: a model's scoring and sampling, and what it can answer."""

    kind: str
    name: str
    vocab_size: int
    fingerprint: str
    files: dict[str, str]
    """The tokenizer and generation config files (`protocol.tokenizer_files`)."""
    entropy: str
    """exact, or topk: the entropy sent is an estimate from the top-k."""
    candidates: bool
    """Whether it scores given candidate ids (the student-side top-k strategies)."""
    temperatures: bool
    """Whether it scores at temperatures other than 1."""

    def score(self, request: ScoreRequest) -> dict[str, Any]: ...

    def generate(self, request: GenerateRequest) -> dict[str, Any]: ...


class HFBackend:
    """A transformers teacher: exact log-probs, top-k and entropy, batched by a token budget."""

    kind = "hf"
    entropy = "exact"
    candidates = True
    temperatures = True

    def __init__(self, path: str, *, dtype: str = "auto", device: torch.device | None = None,
                 batch_tokens: int = 16384, chunk_size: int = 256,
                 trust_remote_code: bool = False) -> None:
        self.name = path
        self.tokenizer = load_tokenizer(path, "model", trust_remote_code)
        self.model = load_model(path, "model", trainable=False, device=device or default_device(),
                                dtype=dtype, trust_remote_code=trust_remote_code)
        self.head = output_head(self.model)
        self.vocab_size = int(self.model.get_output_embeddings().weight.shape[0])
        self.fingerprint = vocabulary_fingerprint(self.tokenizer)
        self.files = tokenizer_files(self.tokenizer, self.model.generation_config)
        self.batch_tokens, self.chunk_size = batch_tokens, chunk_size
        self.lock = threading.Lock()

    def _batches(self, lengths: list[int]) -> list[list[int]]:
        """Indices of the sequences, in order, grouped so each group holds at most
        `batch_tokens` tokens (padding included; a longer sequence goes alone)."""
        groups: list[list[int]] = []
        for i, length in enumerate(lengths):
            widest = max([lengths[j] for j in groups[-1]] + [length]) if groups else length
            if groups and widest * (len(groups[-1]) + 1) <= self.batch_tokens:
                groups[-1].append(i)
            else:
                groups.append([i])
        return groups

    @torch.no_grad()
    def _score_batch(self, request: ScoreRequest, batch: list[int]) -> list[dict[str, Any]]:
        seqs = [request.sequences[i] for i in batch]
        width = max(len(s) for s in seqs)
        ids = torch.zeros(len(seqs), width, dtype=torch.long)
        attention = torch.zeros_like(ids)
        response = torch.zeros_like(ids, dtype=torch.bool)
        for row, (i, seq) in enumerate(zip(batch, seqs, strict=True)):
            ids[row, : len(seq)] = torch.tensor(seq)
            attention[row, : len(seq)] = 1
            response[row, request.response_starts[i] : len(seq)] = True
        states = response_states(self.model, ids, attention, response)
        k = request.k
        parts: dict[str, list[torch.Tensor]] = {"token": [], "ids": [], "top": [], "entropy": []}
        for start in range(0, states.hidden.shape[0], self.chunk_size):
            part = slice(start, start + self.chunk_size)
            log_probs = (self.head(states.hidden[part]) / request.temperature).log_softmax(-1)
            top_ids = topk_indices(log_probs, k).sort(-1).values
            parts["token"].append(log_probs.gather(-1, states.targets[part, None]).squeeze(-1))
            parts["ids"].append(top_ids)
            parts["top"].append(log_probs.gather(-1, top_ids))
            parts["entropy"].append(entropy(log_probs))
            if request.candidates is not None:
                parts.setdefault("log_probs", []).append(log_probs)
        joined = {name: torch.cat(values) for name, values in parts.items()}
        results, offset = [], 0
        for i in batch:
            n = len(request.sequences[i]) - request.response_starts[i]
            rows = slice(offset, offset + n)
            arrays: dict[str, torch.Tensor | list[torch.Tensor] | None] = {
                "token_logprobs": joined["token"][rows], "topk_ids": joined["ids"][rows],
                "topk_logprobs": joined["top"][rows], "entropy": joined["entropy"][rows],
                "candidate_logprobs": None}
            if request.candidates is not None:
                arrays["candidate_logprobs"] = _gather_ragged(joined["log_probs"][rows],
                                                              request.candidates[i])
            results.append({name: None if value is None else encode_array(value, request.encoding)
                            for name, value in arrays.items()})
            offset += n
        return results

    def score(self, request: ScoreRequest) -> dict[str, Any]:
        results: list[dict[str, Any] | None] = [None] * len(request.sequences)
        with self.lock:
            for batch in self._batches([len(s) for s in request.sequences]):
                for i, result in zip(batch, self._score_batch(request, batch), strict=True):
                    results[i] = result
        return {"results": results, "entropy": self.entropy, "encoding": request.encoding}

    def generate(self, request: GenerateRequest) -> dict[str, Any]:
        with self.lock:
            rollouts = generate_rollouts(
                self.model, self.tokenizer, request.prompts, n=request.n,
                max_new_tokens=request.max_new_tokens, temperature=request.temperature,
                top_p=request.top_p, seed=request.seed, prompt_ids=request.prompt_ids,
            )
        return {"responses": rollouts.response_ids}



def model_info(backend: Backend) -> dict[str, Any]:
    """The served model as `/v1/model` tells it (the limits aside)."""
    return {"model": backend.name, "backend": backend.kind, "vocab_size": backend.vocab_size,
            "tokenizer_fingerprint": backend.fingerprint, "entropy": backend.entropy,
            "candidates": backend.candidates, "temperatures": backend.temperatures,
            "opd_version": __version__}


def _gather_ragged(log_probs: torch.Tensor,
                   ids: list[list[int]]) -> torch.Tensor | list[torch.Tensor]:
    """`log_probs[j, ids[j]]` for each position j: one gather when every list has one length."""
    if len({len(row) for row in ids}) <= 1:
        index = torch.tensor(ids, dtype=torch.long).view(log_probs.shape[0], -1)
        return log_probs.gather(-1, index)
    return [log_probs[j, row] for j, row in enumerate(ids)]


def _fastapi():
    try:
        import fastapi
        import uvicorn
    except ImportError as err:
        raise OPDError("serve-teacher needs FastAPI and uvicorn: pip install 'opd[serve]'") from err
    return fastapi, uvicorn


def make_app(backend: Backend, *, api_key: str | None, limits: Limits) -> Any:
    """The FastAPI application: the five endpoints, the key check, the size limit, and every
    refusal as `{"error": one line}` with its status (never a traceback)."""
    fastapi, _ = _fastapi()
    from fastapi.responses import JSONResponse

    app = fastapi.FastAPI(title="opd teacher", version=__version__, docs_url=None,
                          redoc_url=None, openapi_url=None)

    def refuse(status: int, message: str) -> JSONResponse:
        return JSONResponse({"error": message}, status_code=status)

    def unauthorised() -> JSONResponse:
        return refuse(401, f"authorization: missing or wrong API key; send 'Authorization: "
                      f"Bearer KEY' (clients read {API_KEY_ENV})")

    def authorised(request: Any) -> bool:
        if api_key is None:
            return True
        sent = request.headers.get("authorization", "")
        token = sent[len("Bearer "):] if sent.startswith("Bearer ") else ""
        return hmac.compare_digest(token.encode(), api_key.encode())

    async def body(request: Any) -> bytes:
        declared = request.headers.get("content-length")
        limit = limits.max_request_bytes
        too_big = (f"body: larger than max_request_bytes ({limit}); send fewer sequences per "
                   "request")
        if declared is not None and declared.isdigit() and int(declared) > limit:
            raise BadRequest(413, too_big)
        data = bytearray()
        async for piece in request.stream():
            data += piece
            if len(data) > limit:
                raise BadRequest(413, too_big)
        return bytes(data)

    def answer(run: Any) -> Any:
        async def endpoint(request: fastapi.Request) -> Any:
            if not authorised(request):
                return unauthorised()
            try:
                parsed = parse_json(await body(request))
                return await fastapi.concurrency.run_in_threadpool(run, parsed)
            except BadRequest as err:
                return refuse(err.status, str(err))
        return endpoint

    app.post("/v1/score")(answer(lambda data: backend.score(
        ScoreRequest.parse(data, backend.vocab_size, limits))))
    app.post("/v1/generate")(answer(lambda data: backend.generate(
        GenerateRequest.parse(data, backend.vocab_size, limits))))

    @app.get("/health")
    def health() -> dict[str, str]:
        return {"status": "ok"}

    @app.get("/v1/model")
    def model(request: fastapi.Request) -> Any:
        if not authorised(request):
            return unauthorised()
        limits_json = {name: getattr(limits, name) for name in Limits.__dataclass_fields__}
        return {**model_info(backend), "limits": limits_json}

    @app.get("/v1/tokenizer")
    def tokenizer(request: fastapi.Request) -> Any:
        if not authorised(request):
            return unauthorised()
        return {"files": backend.files}

    return app


def load_backend(config: ServeConfig) -> Backend:
    """The configured backend with its model loaded."""
    if config.backend == "vllm":
        from opd.teachers.vllm_backend import VLLMBackend

        return VLLMBackend(config.model, limits=config.limits(), dtype=config.dtype,
                           settings=config.vllm, trust_remote_code=config.trust_remote_code)
    return HFBackend(config.model, dtype=config.dtype, batch_tokens=config.batch_tokens,
                     chunk_size=config.chunk_size, trust_remote_code=config.trust_remote_code)


def build_server(config: ServeConfig) -> Any:
    """A uvicorn server for `config`, not yet started (`.run()` blocks; tests run it in a
    thread and set `.should_exit`)."""
    _, uvicorn = _fastapi()
    key = config.key()
    app = make_app(load_backend(config), api_key=key, limits=config.limits())
    return uvicorn.Server(uvicorn.Config(app, host=config.host, port=config.port,
                                         log_level="warning", access_log=False))


def serve(config: ServeConfig) -> None:
    """Load the teacher and answer requests until interrupted."""
    server = build_server(config)
    print(f"opd serve-teacher: {config.model} ({config.backend}) on "
          f"http://{config.host}:{config.port}",
          flush=True)
    server.run()
