"""What the simulator and the endpoint picker agree a prompt is: its text, and its blocks.

An engine caches a prompt's KV in blocks (vLLM: 16 tokens), found again by a hash chained
over every block before it, so equal hashes mean equal prefixes. Here a token is about
CHARS_PER_TOKEN characters (an approximate tokenizer, the same for both), so a block is
`block_size * CHARS_PER_TOKEN` characters of the prompt's text. The simulator caches these
blocks; the picker (controlplane/picker/) remembers which server it sent which blocks to.
Both compute them here, the same way: what the picker believes a server has cached is what
that simulator has (within the picker's own limits: docs/routing.md).

Characters, not words: the picker hashes every request on its hot path, and slicing a
string is about five times cheaper in Python than splitting it into words.
"""

from __future__ import annotations

from typing import Any

CHARS_PER_TOKEN = 4
BLOCK_TOKENS = 16  # vLLM's default block size


def block_chars(block_size: int = BLOCK_TOKENS) -> int:
    """The characters of one block of `block_size` tokens."""
    return block_size * CHARS_PER_TOKEN


def prompt_text(body: Any) -> str:
    """The text an engine would tokenize for this request body: a chat request's messages
    (each role, then its text parts), a completion's prompt. Anything else is ''."""
    if not isinstance(body, dict):
        return ""
    messages = body.get("messages")
    if isinstance(messages, list):
        parts = []
        for message in messages:
            if not isinstance(message, dict):
                continue
            role, content = message.get("role"), message.get("content")
            parts.append(role if isinstance(role, str) else "")
            if isinstance(content, str):
                parts.append(content)
            elif isinstance(content, list):
                parts.extend(
                    part["text"]
                    for part in content
                    if isinstance(part, dict) and isinstance(part.get("text"), str)
                )
        return "\n".join(parts)
    prompt = body.get("prompt")
    if isinstance(prompt, str):
        return prompt
    if isinstance(prompt, list):
        return "\n".join(item if isinstance(item, str) else str(item) for item in prompt)
    return ""


def block_hashes(text: str, size: int, limit: int | None = None) -> list[int]:
    """The chained hashes of the full blocks of `size` characters of `text` (at most
    `limit`). Python's string hash is salted per process: compare hashes made by one
    process only."""
    count = len(text) // size
    if limit is not None:
        count = min(count, limit)
    hashes, chained = [], 0
    for start in range(0, count * size, size):
        chained = hash((chained, text[start : start + size]))
        hashes.append(chained)
    return hashes
