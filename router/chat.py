"""Chat prompts in the router: a GenerateRequest whose prompt is a `Chat`
(a list of role/content messages) is checked here before admission and,
once admitted, rendered with the model's chat template (generation prompt
appended) and tokenized without adding special tokens again: the template
writes its own (braid.tokenizer.chat).

In a request's life: Orchestrator._check calls `check_chat` (INVALID_ARGUMENT
without a tokenizer, a template or messages), Orchestrator._prompt_ids calls
`chat_prompt_ids` for the ids the attempts send to the nodes. The messages'
count and size are bounded by the router's request size limit, checked first.
"""
from __future__ import annotations

import asyncio

import grpc

from braid.router.attempt import RequestError
from braid.tokenizer import ChatTemplateError

RENDER_INLINE_CHARS = 8192
"""Chats whose messages hold more characters are rendered and tokenized in a worker thread, off the event loop."""


def check_chat(tokenizer, chat) -> None:
    """INVALID_ARGUMENT naming why the chat cannot be served; nothing is rendered yet."""
    if tokenizer is None:
        raise RequestError(grpc.StatusCode.INVALID_ARGUMENT, "chat needs the router's tokenizer; send token ids")
    if not getattr(tokenizer, "chat_template", None):
        raise RequestError(grpc.StatusCode.INVALID_ARGUMENT,
                           "the model has no chat template; send the prompt as text or token ids")
    if not chat.messages:
        raise RequestError(grpc.StatusCode.INVALID_ARGUMENT, "chat: messages is empty")
    for i, m in enumerate(chat.messages):
        if not m.role:
            raise RequestError(grpc.StatusCode.INVALID_ARGUMENT, f"chat: message {i} has no role")


def _render_and_encode(tokenizer, messages: list[dict]) -> list[int]:
    text = tokenizer.apply_chat_template(messages, add_generation_prompt=True)
    return tokenizer.encode(text, add_special_tokens=False)


async def chat_prompt_ids(tokenizer, chat) -> list[int]:
    """The token ids of the rendered chat; INVALID_ARGUMENT when the template refuses it."""
    messages = [{"role": m.role, "content": m.content} for m in chat.messages]
    try:
        if sum(len(m["content"]) for m in messages) <= RENDER_INLINE_CHARS:
            ids = _render_and_encode(tokenizer, messages)
        else:
            ids = await asyncio.to_thread(_render_and_encode, tokenizer, messages)
    except ChatTemplateError as e:
        raise RequestError(grpc.StatusCode.INVALID_ARGUMENT, str(e)) from None
    if not ids:
        raise RequestError(grpc.StatusCode.INVALID_ARGUMENT, "the rendered chat is empty")
    return list(ids)
