"""LoRA adapters on the OpenAI server: their `/v1/models` cards and vLLM's runtime load / unload routes.

`POST /v1/load_lora_adapter {"lora_name", "lora_path"}` reads a PEFT adapter folder into a free
slot (any folder `train` or PEFT wrote, also while the server runs); `POST /v1/unload_lora_adapter
{"lora_name"}` removes the name at once: requests already running with it finish on its weights,
new ones get 404 (`serving/lora/manager.py`). Both answer plain text as vLLM does; both run on the
engine thread between two steps. They exist only when the server allows runtime updating
(`--allow-runtime-lora-updating`, or vLLM's `VLLM_ALLOW_RUNTIME_LORA_UPDATING=true`): a client
that may name server paths to read.
"""

from __future__ import annotations

from typing import Any

from fastapi import FastAPI
from fastapi.responses import PlainTextResponse
from pydantic import BaseModel, ConfigDict, Field
from starlette.exceptions import HTTPException

from serving.async_engine import AsyncLLMEngine
from serving.lora import LoRAManager

MAX_NAME_LEN = 256
MAX_PATH_LEN = 4096


class LoadLoRAAdapterRequest(BaseModel):
    model_config = ConfigDict(extra="forbid", strict=True)
    lora_name: str = Field(min_length=1, max_length=MAX_NAME_LEN)
    lora_path: str = Field(min_length=1, max_length=MAX_PATH_LEN)


class UnloadLoRAAdapterRequest(BaseModel):
    model_config = ConfigDict(extra="forbid", strict=True)
    lora_name: str = Field(min_length=1, max_length=MAX_NAME_LEN)
    lora_int_id: int | None = None  # vLLM's field; adapters are told apart by name here


def adapter_cards(lora: LoRAManager | None, base: dict[str, Any]) -> list[dict[str, Any]]:
    """A `/v1/models` card per loaded adapter (vLLM's shape: `root` is its folder, `parent` the base)."""
    if lora is None:
        return []
    return [{**base, "id": a.name, "root": a.path, "parent": base["id"]} for a in list(lora.adapters.values())]


def add_lora_routes(app: FastAPI, engine: AsyncLLMEngine, base_name: str) -> None:
    lora = engine.engine.lora

    @app.post("/v1/load_lora_adapter", response_class=PlainTextResponse)
    async def load_lora_adapter(body: LoadLoRAAdapterRequest) -> str:
        if body.lora_name == base_name:
            raise HTTPException(400, f"`{base_name}` is the base model's name")
        try:
            await engine.call(lambda: lora.load(body.lora_name, body.lora_path))
        except FileNotFoundError as e:
            raise HTTPException(404, str(e)) from None
        except ValueError as e:
            raise HTTPException(400, str(e)) from None
        except (KeyError, TypeError) as e:  # a config.json without PEFT's fields
            raise HTTPException(400, f"{body.lora_path} is not a PEFT LoRA adapter: {e!r}") from None
        return f"Success: LoRA adapter '{body.lora_name}' added successfully."

    @app.post("/v1/unload_lora_adapter", response_class=PlainTextResponse)
    async def unload_lora_adapter(body: UnloadLoRAAdapterRequest) -> str:
        try:
            await engine.call(lambda: lora.unload(body.lora_name))
        except KeyError as e:
            raise HTTPException(404, e.args[0]) from None
        return f"Success: LoRA adapter '{body.lora_name}' removed successfully."
