"""An OpenAI-style chat server as a user writes it with FastAPI: mlx_lm.generate on asyncio.to_thread.

It knows nothing of mlx_threadsafe. The model is loaded once at start-up; each request
applies the tokenizer's chat template and runs `generate` (greedy at temperature 0, the
default sampler) on a worker thread, so the event loop keeps serving while requests
generate side by side. A streaming request gets the same text, computed the same way,
as server-sent events. The conformance harness runs it unchanged (`servers.py`,
`to-thread-app`): without the shim, under it, and with its batch mode on.

    python to_thread_app.py --model PATH [--host 127.0.0.1] [--port 8000]
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import time
import uuid
from contextlib import asynccontextmanager

import uvicorn
from fastapi import FastAPI, Request
from fastapi.responses import JSONResponse, StreamingResponse
from mlx_lm import generate, load
from mlx_lm.sample_utils import make_sampler

MODEL_PATH = os.environ.get("MODEL_PATH", "")
state = {}


@asynccontextmanager
async def lifespan(app: FastAPI):
    state["model"], state["tokenizer"] = load(MODEL_PATH)
    state["id"] = os.path.basename(os.path.normpath(MODEL_PATH))
    yield
    state.clear()


app = FastAPI(lifespan=lifespan)


@app.get("/v1/models")
async def models():
    return {"object": "list", "data": [{"id": state["id"], "object": "model", "owned_by": "local"}]}


@app.post("/v1/chat/completions")
async def chat_completions(request: Request):
    body = await request.json()
    model, tokenizer = state["model"], state["tokenizer"]
    prompt = tokenizer.apply_chat_template(body["messages"], add_generation_prompt=True, tokenize=False)
    max_tokens = int(body.get("max_tokens") or 256)
    options = {}
    temperature = float(body.get("temperature") or 0.0)
    if temperature > 0:
        options["sampler"] = make_sampler(temp=temperature, top_p=float(body.get("top_p") or 1.0))

    text = await asyncio.to_thread(generate, model, tokenizer, prompt, max_tokens=max_tokens, **options)

    prompt_tokens = len(tokenizer.encode(prompt))
    completion_tokens = len(tokenizer.encode(text, add_special_tokens=False))
    usage = {"prompt_tokens": prompt_tokens, "completion_tokens": completion_tokens,
             "total_tokens": prompt_tokens + completion_tokens}
    finish_reason = "length" if completion_tokens >= max_tokens else "stop"
    head = {"id": f"chatcmpl-{uuid.uuid4().hex[:24]}", "created": int(time.time()), "model": state["id"]}

    if not body.get("stream"):
        return JSONResponse(dict(head, object="chat.completion", usage=usage, choices=[
            {"index": 0, "message": {"role": "assistant", "content": text}, "finish_reason": finish_reason}]))

    def event(choices, **extra):
        return "data: " + json.dumps(dict(head, object="chat.completion.chunk", choices=choices, **extra)) + "\n\n"

    async def events():
        yield event([{"index": 0, "delta": {"role": "assistant", "content": text}, "finish_reason": None}])
        yield event([{"index": 0, "delta": {}, "finish_reason": finish_reason}])
        if (body.get("stream_options") or {}).get("include_usage"):
            yield event([], usage=usage)
        yield "data: [DONE]\n\n"

    return StreamingResponse(events(), media_type="text/event-stream")


if __name__ == "__main__":
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--model", required=True)
    parser.add_argument("--host", default="127.0.0.1")
    parser.add_argument("--port", type=int, default=8000)
    args = parser.parse_args()
    MODEL_PATH = args.model
    uvicorn.run(app, host=args.host, port=args.port)
